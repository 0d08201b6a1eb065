"""Point-in-time restore workflow: a NEW server as the live one was at a given time."""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow

from dr.errors import DrError, InvalidInput
from dr.platforms.base import TAG_INCIDENT
from dr.runtime import Ref
from dr.timeparse import check_in_window, fmt_both, parse_restore_time
from flows.common import run_logger
from tasks.servers import get_restore_window_task, point_in_time_restore_task


def ptr_server_name(source: str, when: datetime) -> str:
    """`<source>-ptr-<UTC yyyymmddhhmmss>`: the same time always gives the same name (idempotent)."""
    suffix = f"-ptr-{when.astimezone(timezone.utc):%Y%m%d%H%M%S}"
    return source[: 63 - len(suffix)].rstrip("-") + suffix


def resolve_restore_time(ref: Ref, restore_time: str, zone: str | None, server: str | None = None) -> datetime:
    """Parse the typed time and check it against the server's window, before anything is touched."""
    rt = ref.rt()
    when = parse_restore_time(restore_time, zone or rt.target.timezone)
    window = get_restore_window_task(ref, server or rt.target.server)
    check_in_window(when, window.earliest, window.latest, zone or rt.target.timezone)
    return when


@flow(name="point-in-time-restore", log_prints=True)
def point_in_time_restore(
    service: str,
    environment: str,
    restore_time: str,
    timezone_name: str | None = None,
    incident: str | None = None,
    config_path: str | None = None,
) -> dict:
    """Restore the live server as it was at `restore_time` onto a NEW server; the live server is not changed.

    Args:
        service: the service short name.
        environment: the environment.
        restore_time: `YYYY-MM-DD HH:MM[:SS]` in UK time (or the given zone), or with an explicit
            offset such as `Z` or `+01:00`. Ambiguous or skipped times at a clock change are refused.
        timezone_name: the zone of `restore_time` when it has no offset; default the configured one.
        incident: incident id to tag the new server with.
        config_path: the configuration file.

    Returns:
        The new server's name, host and port, and the exact UTC time restored to.
    """
    ref = Ref(service, environment, config_path)
    rt = ref.rt()
    zone = timezone_name or rt.target.timezone
    try:
        when = resolve_restore_time(ref, restore_time, zone)
    except DrError as exc:
        raise exc.annotate(step="check the restore time", world_state="nothing was changed")
    new_name = ptr_server_name(rt.target.server, when)
    run_logger().info("restoring %s at %s onto new server %s", rt.target.server, fmt_both(when, zone), new_name)
    tags = {"dr-service": service, "dr-environment": environment}
    if incident:
        tags[TAG_INCIDENT] = incident
    try:
        srv = point_in_time_restore_task(ref, source=rt.target.server, new_name=new_name, point_in_time_utc=when,
                                         tags=tags)
    except DrError as exc:
        raise exc.annotate(step="point-in-time restore",
                           world_state=f"the live server {rt.target.server} is unchanged; {new_name} may be half-made",
                           resume_hint=f"dr ptr --service {service} --env {environment} --time '{when:%Y-%m-%d %H:%M:%S}Z'")
    return {"server": srv.name, "host": srv.host, "port": srv.port, "point_in_time_utc": when.isoformat(),
            "point_in_time_local": fmt_both(when, zone), "source": rt.target.server}


def validate_ptr_input(restore_time: str, zone: str) -> datetime:
    """Parse only (no window): for forms that re-ask on bad input."""
    if not restore_time or not restore_time.strip():
        raise InvalidInput("a restore time is required")
    return parse_restore_time(restore_time, zone)
