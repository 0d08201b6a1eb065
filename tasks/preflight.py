"""Tasks for restores of real databases: the preflight check, server snapshots, server parameters."""

from __future__ import annotations

from dr.platforms.base import ParameterChange, ServerInfo, ServerSnapshot
from dr.runtime import Ref
from tasks.common import dr_task


@dr_task(retries=2)
def check_backup_fits(ref: Ref, backup: str, server: str | None = None) -> None:
    """Refuse a backup the target server cannot take (extensions, versions, client tools), changing nothing."""
    from dr.preflight import preflight_restore

    rt = ref.rt()
    preflight_restore(rt.servers, rt.store, rt.tools, rt.store.get_backup(backup), server or rt.target.server)


@dr_task(retries=2)
def latest_server_snapshot_task(ref: Ref) -> tuple[ServerSnapshot, str] | None:
    """The newest snapshot of the environment's server in the store, and the backup it came with."""
    from dr.preflight import latest_server_snapshot

    rt = ref.rt()
    found = latest_server_snapshot(rt.store, rt.target.server)
    return (found[0], found[1].name) if found else None


@dr_task(retries=1)
def recreate_server_from_snapshot(ref: Ref, snapshot: ServerSnapshot, tags: dict[str, str] | None = None,
                                  name: str | None = None) -> ServerInfo:
    """Create the server again, empty, as its snapshot describes it, as `name` (default its own; reused if it exists)."""
    rt = ref.rt()
    name = name or rt.target.server
    if rt.servers.server_exists(name):
        return rt.servers.get_server(name)
    return rt.servers.create_server_from_snapshot(name, snapshot, tags=tags)


@dr_task(retries=1)
def apply_server_parameters(ref: Ref, parameters: dict[str, str], server: str | None = None) -> ParameterChange:
    """Set the server's parameters (restarting it if they need it) and wait until it is ready."""
    rt = ref.rt()
    return rt.servers.set_server_parameters(server or rt.target.server, parameters)
