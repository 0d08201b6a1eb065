"""Small helpers over Prefect's client API that Prefect has no command for."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID


def resume_with_input(flow_run_id: UUID, run_input: dict[str, Any], *, wait_seconds: float = 15.0) -> None:
    """Resume a paused run with form input (what the UI's form does).

    Right after a run pauses, Prefect saves the form's schema a moment later; a resume in
    that moment is refused with "schema not found", so retry briefly.
    """
    from prefect.flow_runs import resume_flow_run

    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            resume_flow_run(flow_run_id, run_input=run_input)
            return
        except RuntimeError as exc:
            if "schema not found" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.3)
