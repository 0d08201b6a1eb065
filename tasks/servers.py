"""Tasks on database servers: window, point-in-time restore, delete, revive, recreate."""

from __future__ import annotations

from datetime import datetime

from dr.errors import ServerNotFound
from dr.platforms.base import DroppedServer, RestoreWindow, ServerInfo
from dr.runtime import Ref
from tasks.common import dr_task


@dr_task
def get_server_task(ref: Ref, name: str | None = None) -> ServerInfo | None:
    """The server, or None when it does not exist."""
    rt = ref.rt()
    try:
        return rt.servers.get_server(name or rt.target.server)
    except ServerNotFound:
        return None


@dr_task
def list_servers_task(ref: Ref) -> list[ServerInfo]:
    """Every server the platform sees."""
    return ref.rt().servers.list_servers()


@dr_task
def get_restore_window_task(ref: Ref, name: str | None = None) -> RestoreWindow:
    """The point-in-time restore window of the server."""
    rt = ref.rt()
    return rt.servers.get_restore_window(name or rt.target.server)


@dr_task(retries=2)
def point_in_time_restore_task(ref: Ref, *, source: str, new_name: str, point_in_time_utc: datetime,
                               tags: dict[str, str]) -> ServerInfo:
    """Restore the source server at a UTC time onto a new server (reused if already made)."""
    return ref.rt().servers.point_in_time_restore(source, new_name, point_in_time_utc, tags=tags)


@dr_task
def delete_server_task(ref: Ref, name: str) -> None:
    """Delete (drop) a server; nothing to do if it is already gone."""
    ref.rt().servers.delete_server(name)


@dr_task
def list_dropped_servers_task(ref: Ref) -> list[DroppedServer]:
    """Dropped servers that can still be revived."""
    return ref.rt().servers.list_dropped_servers()


@dr_task(retries=1)
def revive_server_task(ref: Ref, name: str | None = None) -> ServerInfo:
    """Revive the dropped server with all its data, as `name` (default its own name)."""
    rt = ref.rt()
    if name and name != rt.target.server:
        return rt.servers.revive_dropped_server(rt.target.server, new_name=name)
    return rt.servers.revive_dropped_server(rt.target.server)


@dr_task(retries=1)
def recreate_server_task(ref: Ref, name: str | None = None, tags: dict[str, str] | None = None) -> ServerInfo:
    """Create the server again, empty, with its recorded settings, as `name` (default its own name)."""
    rt = ref.rt()
    name = name or rt.target.server
    if rt.servers.server_exists(name):
        return rt.servers.get_server(name)
    return rt.servers.create_server(name, like=rt.target.server, tags=tags)


@dr_task
def recovery_server_name_task(ref: Ref, incident: str) -> tuple[str, str]:
    """The name the lost server comes back under, and why: its own when the platform gives it, else a new one."""
    rt = ref.rt()
    check = getattr(rt.servers, "name_available", None)  # platforms whose names outlive their servers (Azure)
    if check is None:
        return rt.target.server, ""
    free, why = check(rt.target.server)
    return (rt.target.server, "") if free else (recovery_server_name(rt.target.server, incident), why)


def recovery_server_name(server: str, incident: str) -> str:
    """The new name of a lost server brought back under another: `<server>-<8 hex of the incident>`.

    The same for every run of one incident, so a resumed run finds the server it made.
    """
    import hashlib

    return f"{server[:54].rstrip('-')}-{hashlib.sha256(incident.encode()).hexdigest()[:8]}"


@dr_task(retries=1)
def geo_restore_task(ref: Ref, tags: dict[str, str] | None = None) -> ServerInfo:
    """Restore the server from its geo-redundant backup into the configured paired region (reused if made)."""
    rt = ref.rt()
    geo = rt.target.geo_restore
    assert geo is not None  # checked by the flow before anything is changed
    return rt.servers.geo_restore(rt.target.server, geo_server_name(rt.target.server, geo.server),
                                  location=geo.location, delegated_subnet_resource_id=geo.delegated_subnet_resource_id,
                                  private_dns_zone_arm_resource_id=geo.private_dns_zone_arm_resource_id, tags=tags)


@dr_task
def follow_ups_task(ref: Ref, name: str) -> list[str]:
    """What a person must still do on a server made in place of the service's (Azure: high availability)."""
    rt = ref.rt()
    follow_ups = getattr(rt.servers, "follow_ups", None)
    return follow_ups(name, like=rt.target.server) if follow_ups else []


@dr_task
def geo_restore_refusals_task(ref: Ref) -> list[str]:
    """Why a geo-restore of the server into the configured region cannot work (empty: it can); read-only."""
    rt = ref.rt()
    geo = rt.target.geo_restore
    check = getattr(rt.servers, "geo_restore_refusals", None)
    if geo is None or check is None:
        return []
    return check(rt.target.server, location=geo.location, delegated_subnet_resource_id=geo.delegated_subnet_resource_id,
                 private_dns_zone_arm_resource_id=geo.private_dns_zone_arm_resource_id)


def geo_server_name(server: str, configured: str | None = None) -> str:
    """The geo-restored server's name: configured, or `<server>-geo`."""
    return configured or server[:59].rstrip("-") + "-geo"


@dr_task(retries=2)
def extension_support_task(ref: Ref, server: str | None = None):  # -> ExtensionSupport
    """The extensions the server can create: installed, and allow-listed where the platform has a list."""
    rt = ref.rt()
    return rt.servers.get_extension_support(server or rt.target.server)


@dr_task(retries=1)
def set_server_parameters_task(ref: Ref, parameters: dict[str, str], server: str | None = None):  # -> ParameterChange
    """Set server parameters, restarting the server if they need it, and wait until it is ready."""
    rt = ref.rt()
    return rt.servers.set_server_parameters(server or rt.target.server, parameters)
