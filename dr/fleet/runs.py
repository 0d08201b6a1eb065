"""What the scheduled flows do for the board: tag their runs, and refresh `dr-readiness` when they end."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("dr.fleet")


def tag_this_run(service: str, environment: str) -> None:
    """Give the current flow run its service and environment tags (deployment runs have them already).

    Runs started from the CLI or as a subflow then carry them too, so the board (and the UI's
    tag filter) find every nightly, verify and drill run of a service by tag.
    """
    try:
        from prefect.client.orchestration import get_client
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        if ctx is None or ctx.flow_run is None:
            return
        have = set(ctx.flow_run.tags or [])
        if {service, environment} <= have:
            return
        with get_client(sync_client=True) as client:
            client.update_flow_run(ctx.flow_run.id, tags=sorted(have | {service, environment}))
    except Exception as exc:  # noqa: BLE001 - a tag is a convenience; the run goes on
        log.warning("could not tag this run with %s %s: %s", service, environment, exc)


def refresh_readiness(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook (on completion and on failure): rebuild the fleet's board into the `dr-readiness` artifact.

    Prefect calls it once the run's final state is recorded, so the board already counts this
    run. A subflow (the verify inside a nightly backup) leaves it to its parent.
    """
    if getattr(flow_run, "parent_task_run_id", None):
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        from dr.config import load_config
        from dr.fleet import READINESS_KEY
        from dr.fleet.board import build_board

        board = build_board(load_config((flow_run.parameters or {}).get("config_path")))
        create_markdown_artifact(key=READINESS_KEY, markdown=board.markdown(), description=board.summary())
    except Exception as exc:  # noqa: BLE001 - the board is a view; never fail the backup for it
        log.warning("could not refresh the dr-readiness board: %s: %s", type(exc).__name__, exc)
