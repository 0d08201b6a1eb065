"""Tasks that tell people: incident start, approval requests, failures, end."""

from __future__ import annotations

from dr.notify import send
from dr.runtime import Ref
from tasks.common import dr_task


def flow_run_link() -> str | None:
    """The Prefect UI link of the current flow run, when a UI URL is known."""
    try:
        from prefect.context import FlowRunContext
        from prefect.settings import PREFECT_UI_URL

        ctx = FlowRunContext.get()
        base = PREFECT_UI_URL.value()
        if ctx and ctx.flow_run and base:
            return f"{base.rstrip('/')}/runs/flow-run/{ctx.flow_run.id}"
    except Exception:
        return None
    return None


@dr_task(retries=0)
def notify(ref: Ref, title: str, text: str, link: str | None = None) -> list[str]:
    """Send a message to the configured channels (never fails the flow)."""
    try:
        return send(ref.rt().config, f"[{ref.service} {ref.environment}] {title}", text, link)
    except Exception:
        return []
