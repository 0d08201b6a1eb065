"""Tasks on the app: replicas, maintenance page, healthcheck."""

from __future__ import annotations

import time

from dr.errors import OperationTimedOut
from dr.platforms.base import AppStatus
from dr.runtime import Ref
from tasks.common import dr_task


@dr_task
def app_status(ref: Ref) -> AppStatus:
    """Maintenance flag, replicas, recorded replicas and URLs."""
    return ref.rt().app.get_status()


@dr_task
def scale_down_app(ref: Ref) -> dict[str, int]:
    """Record web/worker replica counts, then stop them."""
    return ref.rt().app.scale_down()


@dr_task
def scale_up_app(ref: Ref) -> dict[str, int]:
    """Restore exactly the recorded replica counts."""
    return ref.rt().app.scale_up()


@dr_task
def enable_maintenance(ref: Ref) -> AppStatus:
    """Show users the maintenance page; keep the temporary URL to the app."""
    return ref.rt().app.enable_maintenance()


@dr_task
def disable_maintenance(ref: Ref) -> AppStatus:
    """Send users back to the app."""
    return ref.rt().app.disable_maintenance()


@dr_task(retries=0)
def wait_until_healthy(ref: Ref, timeout: float = 120.0) -> tuple[int, str]:
    """Poll the healthcheck until it answers 200."""
    rt = ref.rt()
    deadline = time.monotonic() + timeout
    status, body = 0, ""
    while time.monotonic() < deadline:
        status, body = rt.app.healthcheck(rt.target.healthcheck_url)
        if status == 200:
            return status, body
        time.sleep(0.25)
    raise OperationTimedOut(f"the app's healthcheck did not answer 200 within {timeout:.0f} s (last: {status} {body[:120]})")
