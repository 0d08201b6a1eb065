"""Azure Database for PostgreSQL flexible servers behind `ServerPlatform`: the servers' lifecycle.

Every call goes through the management SDK (`azure-mgmt-postgresqlflexibleservers`); its
client, retry policy and the mapping of its errors to ours are in `_arm.py`. Creating,
deleting and starting a server are long-running operations, recorded and re-attached to
by `operations.py`; the read-only checks before a recovery are in `preflight.py`.

Dropped servers: Azure keeps a deleted flexible server for 5 days and can revive it
(`createMode=ReviveDropped`). Azure itself only tells of the drop through the activity
log, so this backend records every deletion IT makes (`_state.DroppedLog`) and also
accepts an explicit resource id and drop time for a server deleted by someone else.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from azure.mgmt.postgresqlflexibleservers import PostgreSQLManagementClient
from azure.mgmt.postgresqlflexibleservers import models as pg

from dr.commands import ConnInfo, register_secret
from dr.errors import (
    ConfigError,
    DrError,
    InvalidInput,
    InvalidRestoreTime,
    OperationTimedOut,
    PlatformError,
    ServerExists,
    ServerNotFound,
)
from dr.platforms.azure._arm import (
    EPOCH,
    PROVIDER_PATH,
    SDK_ERRORS,
    arm_error,
    as_utc,
    aware,
    build_management_client,
    utcnow,
    value_of,
)
from dr.platforms.azure._state import DroppedLog, OperationLog, default_state_dir
from dr.platforms.azure.configurations import ServerConfigurations
from dr.platforms.azure.firewall import FirewallRules, is_public
from dr.platforms.azure.operations import ServerOperations
from dr.platforms.azure.preflight import NEEDED_ACTIONS, AzurePreflight
from dr.platforms.azure.snapshots import SnapshotsAndParameters
from dr.platforms.base import (
    TAG_CREATED_BY,
    TAG_CREATED_BY_VALUE,
    TAG_PURPOSE,
    TAG_RESTORE_TIME,
    TAG_SOURCE,
    DroppedServer,
    RestoreWindow,
    ServerInfo,
    ServerPlatform,
)

__all__ = ["AzureServers", "build_management_client"]

log = logging.getLogger("dr.azure.servers")

PASSWORD_ENV = "DR_AZURE_PG_PASSWORD"
PG_PORT = 5432
REVIVE_WINDOW = timedelta(days=5)
#: Azure can restore up to a few minutes before now; ask for no later than this.
RESTORE_LAG = timedelta(minutes=5)
TAG_REVIVED_FROM = "dr-revived-from-drop-utc"
#: states a server passes through on its way to Ready (or Stopped): waited for, never taken as ready
_TRANSITIONAL = {"Provisioning", "Starting", "Stopping", "Updating", "Restarting"}


def _settings_of(server: pg.Server) -> dict[str, Any]:
    """The settings of a server that a re-creation or a revive needs, as REST JSON."""
    def rest(model: Any) -> dict[str, Any] | None:
        return model.as_dict() if model is not None else None

    return {
        "location": server.location,
        "sku": rest(server.sku),
        "version": value_of(server.version),
        "storage": rest(server.storage),
        "network": rest(server.network),
        "backup": rest(server.backup),
        "highAvailability": rest(server.high_availability),
        "availabilityZone": server.availability_zone,
        "tags": dict(server.tags or {}),
    }


def _network_to_copy(network: dict[str, Any] | pg.Network | None) -> pg.Network | None:
    """The VNet settings a new server needs to land next to the old one (None: public)."""
    if network is None:
        return None
    n = network.as_dict() if isinstance(network, pg.Network) else dict(network)
    keep = {k: n[k] for k in ("delegatedSubnetResourceId", "privateDnsZoneArmResourceId") if n.get(k)}
    if not keep and n.get("publicNetworkAccess"):
        keep["publicNetworkAccess"] = n["publicNetworkAccess"]
    return pg.Network(keep) if keep else None


class AzureServers(SnapshotsAndParameters, ServerPlatform):
    """`ServerPlatform` on Azure Database for PostgreSQL flexible servers in one resource group.

    Args:
        client: the management client (see `build_management_client`).
        subscription_id: the subscription that holds the resource group.
        resource_group: the resource group of the servers.
        admin_user: the administrator login of the servers (and of servers created here).
        default_template: the server whose settings `create_server` copies when no `like`
            is given (the target's own server).
        state_dir: where the operation and dropped-server records live
            (default `$DR_AZURE_STATE_DIR` or `~/.dr`).
        progress_interval: seconds between two progress log lines while waiting.
    """

    name = "azure"
    supports_geo_restore = True

    def __init__(self, client: PostgreSQLManagementClient, subscription_id: str, resource_group: str, *,
                 admin_user: str = "dradmin", default_template: str | None = None,
                 state_dir: Path | None = None, progress_interval: float = 30.0):
        self.client = client
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.admin_user = admin_user
        self.default_template = default_template
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.operations = OperationLog(self.state_dir)
        self.dropped = DroppedLog(self.state_dir)
        self.progress_interval = progress_interval
        self.ops = ServerOperations(client, resource_group, self.resource_id, self.operations,
                                    state_of=self._state_of, progress_interval=progress_interval)
        self.firewall = FirewallRules(client, resource_group, self.ops)
        self.configurations = ServerConfigurations(client, resource_group, self.ops)

    def __repr__(self) -> str:
        return f"AzureServers(resource_group={self.resource_group!r})"

    # --- helpers --------------------------------------------------------------------

    def resource_id(self, name: str) -> str:
        """The ARM resource id of a server in this resource group."""
        return f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}/{PROVIDER_PATH}/{name}"

    def _error(self, exc: Exception, *, server: str | None, doing: str) -> DrError:
        """Our error for an SDK failure (the caller chains it with `from exc`)."""
        return arm_error(exc, server=server, doing=doing, resource_group=self.resource_group)

    def _get(self, name: str) -> pg.Server:
        try:
            return self.client.servers.get(self.resource_group, name)
        except SDK_ERRORS as exc:
            raise self._error(exc, server=name, doing=f"reading server '{name}'") from exc

    def _find(self, name: str) -> pg.Server | None:
        try:
            return self._get(name)
        except ServerNotFound:
            return None

    def _state_of(self, name: str) -> str:
        """The server's state as Azure reports it, for people ("gone" when it does not exist)."""
        try:
            s = self._find(name)
        except DrError as exc:
            return f"state unknown: {exc.message}"
        return str(value_of(s.state)) if s is not None else "gone"

    def _info(self, s: pg.Server) -> ServerInfo:
        version = str(value_of(s.version) or "0").split(".")[0]
        created = aware(s.system_data.created_at) if s.system_data and s.system_data.created_at else EPOCH
        return ServerInfo(
            name=s.name or "",
            state=str(value_of(s.state) or "Unknown"),
            version=int(version) if version.isdigit() else 0,
            host=s.fully_qualified_domain_name or "",
            port=PG_PORT,
            created_at=created,
            tags=dict(s.tags or {}),
        )

    def _admin_password(self) -> str:
        password = os.environ.get(PASSWORD_ENV)
        if not password:
            raise ConfigError(f"set {PASSWORD_ENV} to the administrator password of the Azure PostgreSQL servers",
                              field=PASSWORD_ENV, source="environment")
        register_secret(password)
        return password

    # --- creating servers -------------------------------------------------------------

    def _create(self, name: str, body: pg.Server, *, operation: str, fingerprint: dict[str, Any], what: str,
                timeout: float) -> ServerInfo:
        """Start a server-creating operation, record it at once, and wait for it."""
        deadline = time.monotonic() + timeout
        poller = self.ops.start(
            name, lambda: self.client.servers.begin_create_or_update(self.resource_group, name, body),
            operation=operation, fingerprint=fingerprint, what=what, timeout=timeout)
        log.info("%s: accepted by Azure; waiting up to %.0f s", what, deadline - time.monotonic())
        self.ops.finish(name, poller, what=what, timeout=max(0.0, deadline - time.monotonic()), budget=timeout)
        return self.get_server(name)

    def _create_idempotently(self, name: str, *, operation: str, fingerprint: dict[str, Any],
                             matches: Callable[[ServerInfo], bool], build: Callable[[], pg.Server],
                             what: str, timeout: float) -> ServerInfo:
        """Re-attach, or reuse a matching server, or else create one; never two operations."""
        # 1. an operation for this very request recorded by an earlier run: finish it
        if self.ops.finish_recorded(name, operation, fingerprint, what, timeout):
            return self._ensure_ready(self.get_server(name), timeout)
        # 2. the server exists: reuse it only when its tags say it is what was asked for
        existing = self._find(name)
        if existing is not None:
            info = self._info(existing)
            if matches(info):
                log.info("%s: server %s already exists with the same source and time; reusing it", what, name)
                return self._ensure_ready(info, timeout)
            raise ServerExists(f"{what} is not possible: server '{name}' exists and is not the result of this "
                               f"request (tags {info.tags})", server=name)
        # 3. validate and build the request before anything is sent, then start it
        body = build()
        try:
            return self._create(name, body, operation=operation, fingerprint=fingerprint, what=what, timeout=timeout)
        except ServerExists:
            # a retried PUT whose first answer was lost conflicts with our own server: take it up
            existing = self._find(name)
            if existing is not None and matches(self._info(existing)):
                log.info("%s: Azure already accepted this request; waiting for server %s", what, name)
                return self._ensure_ready(self._info(existing), timeout)
            raise

    def _ensure_ready(self, info: ServerInfo, timeout: float) -> ServerInfo:
        """Wait for a server that is between states (being made, stopped, updated...), then start it if Stopped."""
        deadline = time.monotonic() + timeout
        while info.state in _TRANSITIONAL:
            if time.monotonic() >= deadline:
                raise OperationTimedOut(f"server '{info.name}' is still {info.state} after {timeout:.0f} s",
                                        server=info.name, resume_hint="run the same command again later")
            time.sleep(min(self.progress_interval, max(0.0, deadline - time.monotonic())))
            info = self.get_server(info.name)
            log.info("server %s is %s", info.name, info.state)
        if info.state == "Stopped":
            return self.start_server(info.name, timeout=max(0.0, deadline - time.monotonic()))
        return info

    def _carry_firewall_rules(self, source: str, new: str, *, recorded: dict[str, Any] | None = None,
                              timeout: float) -> None:
        """Copy the firewall rules of a public-access `source` onto `new` (Azure makes it without any).

        Args:
            source: the server replaced or restored.
            new: the server made in its place.
            recorded: the settings recorded when this tool dropped `source` (its rules among them).
            timeout: seconds to wait for Azure.
        """
        live = self._find(source) if recorded is None else None
        settings = _settings_of(live) if live is not None else (recorded or {})
        if not is_public(settings.get("network")) or settings.get("network") is None:
            return
        rules = self.firewall.list(source) if live is not None else settings.get("firewallRules")
        if rules is None:
            log.warning("the firewall rules of %s are not known (not recorded when it was dropped); %s has none: "
                        "add the app's addresses to it", source, new)
            return
        self.firewall.copy(rules, new, timeout=timeout)

    def follow_ups(self, name: str, *, like: str) -> list[str]:
        """What a person must still do on server `name`, made in place of `like`, that the tool does not.

        Azure makes a restored, revived or geo-restored server without high availability: when
        `like` had it, it has to be enabled again (it needs a standby and is billed as such).
        """
        try:
            had = (self._template_settings(like).get("highAvailability") or {}).get("mode") or "Disabled"
        except ServerNotFound:
            return []
        now = self._get(name).high_availability
        mode = str(value_of(now.mode)) if now is not None and now.mode else "Disabled"
        if had != "Disabled" and mode == "Disabled":
            return [f"high availability: {like} had {had}; {name} has none. Enable it again once the service is back: "
                    f"az postgres flexible-server update --resource-group {self.resource_group} --name {name} "
                    f"--high-availability {had}"]
        return []

    # --- ServerPlatform -------------------------------------------------------------

    def get_server(self, name: str) -> ServerInfo:
        """The server; raises `ServerNotFound`."""
        return self._info(self._get(name))

    def list_servers(self) -> list[ServerInfo]:
        """Every flexible server in the resource group."""
        try:
            return [self._info(s) for s in self.client.servers.list_by_resource_group(self.resource_group)]
        except SDK_ERRORS as exc:
            doing = f"listing the servers of resource group '{self.resource_group}'"
            raise self._error(exc, server=None, doing=doing) from exc

    def start_server(self, name: str, *, timeout: float = 1800) -> ServerInfo:
        """Start a stopped server and wait until it is ready."""
        what = f"start of server '{name}'"
        deadline = time.monotonic() + timeout
        poller = self.ops.begin(name, lambda: self.client.servers.begin_start(self.resource_group, name), what=what,
                                timeout=timeout)
        self.ops.wait(poller, what=what, server=name, timeout=max(0.0, deadline - time.monotonic()), budget=timeout)
        return self.get_server(name)

    def _recorded_settings(self, name: str) -> dict[str, Any] | None:
        """The settings of server `name` as recorded when this tool last dropped it, if it did."""
        recorded = [e for e in self.dropped.entries() if e.get("name") == name and e.get("settings")]
        return max(recorded, key=lambda e: e["dropped_at"])["settings"] if recorded else None

    def _template_settings(self, name: str) -> dict[str, Any]:
        """The settings of a server: live when it exists, else as recorded when this tool dropped it."""
        live = self._find(name)
        if live is not None:
            return _settings_of(live)
        recorded = self._recorded_settings(name)
        if recorded is not None:
            log.info("server %s is gone; using the settings recorded when it was dropped", name)
            return recorded
        raise ServerNotFound(f"server '{name}' does not exist and no settings of it are recorded in "
                             f"{self.dropped.path}", server=name)

    def create_server(self, name: str, *, like: str | None = None, tags: dict[str, str] | None = None,
                      timeout: float = 1800) -> ServerInfo:
        """Create an empty server with the recorded settings of another.

        Args:
            name: the new server's name.
            like: the server whose location, SKU, version, storage, network, backup and
                high-availability settings and tags are copied (default: the target's
                server); a server dropped by this tool is copied from its record.
            tags: tags added to (and overriding) the copied ones.
            timeout: seconds to wait for Azure.

        Raises:
            ServerExists: a server of that name exists.
            ServerNotFound: `like` does not exist and nothing is recorded of it.
            ConfigError: `DR_AZURE_PG_PASSWORD` (the admin password) is not set.
        """
        template = like or self.default_template
        if not template:
            raise InvalidInput("create_server on azure needs `like`: the server whose settings to copy")
        fingerprint = {"like": template}

        def build() -> pg.Server:
            s = self._template_settings(template)
            copied = {k: v for k, v in (s.get("tags") or {}).items() if not k.startswith("dr-")}
            props = pg.ServerProperties(
                create_mode=pg.CreateMode.CREATE,
                version=s.get("version"),
                administrator_login=self.admin_user,
                administrator_login_password=self._admin_password(),
                storage=pg.Storage(s["storage"]) if s.get("storage") else None,
                network=pg.Network(s["network"]) if s.get("network") else None,
                backup=pg.Backup(s["backup"]) if s.get("backup") else None,
                high_availability=pg.HighAvailability(s["highAvailability"]) if s.get("highAvailability") else None,
            )
            return pg.Server(location=s["location"], tags={**copied, **(tags or {})},
                             sku=pg.Sku(s["sku"]) if s.get("sku") else None, properties=props)

        info = self._create_idempotently(name, operation="create", fingerprint=fingerprint, matches=lambda i: False,
                                         build=build, what=f"creation of server '{name}' like '{template}'",
                                         timeout=timeout)
        live = self._find(template)
        self._carry_firewall_rules(template, name, recorded=None if live else self._template_settings(template),
                                   timeout=timeout)
        return info

    def delete_server(self, name: str, *, force: bool = False, timeout: float = 1800) -> None:
        """Delete (drop) a server; succeeds if it is already gone.

        Args:
            name: the server.
            force: also delete a server that this tool did not create (no `dr-created-by`
                tag). Without it such a server is refused.
            timeout: seconds to wait for Azure.

        Raises:
            PlatformError: the server was not created by this tool and `force` is not set.
        """
        what = f"deletion of server '{name}'"
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        recorded = self.ops.recorded(name)
        if recorded and recorded.get("operation") != "delete":
            # e.g. a restore that timed out and is now being tidied up: Azure refuses a delete until it has ended
            log.info("%s: waiting for the unfinished %s of %s (started %s) to end first", what,
                     recorded.get("operation"), name, recorded.get("started_at"))
            try:
                self.ops.finish_recorded(name, recorded["operation"], recorded.get("fingerprint") or {},
                                         f"the unfinished {recorded.get('operation')} of {name}", left())
            except OperationTimedOut as exc:
                raise exc.annotate(world_state=f"nothing was deleted: {name} is still being made",
                                   resume_hint="run the same command again later") from None
            except DrError as exc:  # it failed: whatever it left is deleted below
                log.warning("the unfinished %s of %s ended in failure (%s); deleting what is left",
                            recorded.get("operation"), name, exc)
        if self.ops.finish_recorded(name, "delete", {}, what, left()):
            return
        s = self._find(name)
        if s is None:
            log.info("server %s is already gone", name)
            return
        info = self._info(s)
        if not info.created_by_us and not force:
            raise PlatformError(
                f"refusing to delete server '{name}': it was not created by this tool (no tag "
                f"{TAG_CREATED_BY}={TAG_CREATED_BY_VALUE}); pass force=True to delete it anyway", server=name)
        settings = _settings_of(s)
        if is_public(settings.get("network")):  # Azure does not keep them: recorded for a revive or re-creation
            settings["firewallRules"] = self.firewall.list(name)
        asked = utcnow()
        try:
            poller = self.ops.start(name, lambda: self.client.servers.begin_delete(self.resource_group, name),
                                    operation="delete", fingerprint={}, what=what, timeout=left())
        except ServerNotFound:
            return  # gone between the look and the delete
        status, submitted = self.ops.answer_of(poller)
        if status == 204:  # the spec's answer for a server that is not there: nothing was dropped
            self.ops.forget(name)
            log.info("server %s was already gone when the deletion reached Azure", name)
            return
        # the drop's time is its submission, as Azure's activity log has it (Azure's clock, from its answer)
        dropped = {"name": name, "resource_id": s.id or self.resource_id(name),
                   "dropped_at": (submitted or asked).astimezone(timezone.utc).isoformat(), "settings": settings}
        self.dropped.add(dropped)
        try:
            self.ops.finish(name, poller, what=what, timeout=left(), budget=timeout)
        except ServerNotFound:
            pass  # gone while we looked
        except OperationTimedOut:
            raise
        except DrError:
            self.dropped.remove(dropped["resource_id"], dropped["dropped_at"])
            raise
        log.info("dropped server %s (revivable until %s)", name, utcnow() + REVIVE_WINDOW)

    def list_dropped_servers(self) -> list[DroppedServer]:
        """Servers this tool dropped that are still within Azure's 5-day revive window."""
        now = utcnow()
        out = []
        for e in self.dropped.entries():
            if e.get("revived_as"):
                continue
            at = datetime.fromisoformat(e["dropped_at"])
            if at + REVIVE_WINDOW >= now:
                out.append(DroppedServer(e["name"], at, at + REVIVE_WINDOW, e["resource_id"]))
        return sorted(out, key=lambda d: d.dropped_at, reverse=True)

    def name_available(self, name: str, *, location: str | None = None) -> tuple[bool, str]:
        """Whether Azure would give `name` to a new server now, and Azure's word when not.

        Server names are global, and a dropped server's name stays taken while Azure keeps it
        for revival (Microsoft: revive it "with a different name"); `checkNameAvailability` says so.

        Args:
            name: the server name.
            location: the region to ask in (default: the target's server's, live or as recorded).
        """
        if location is None:
            try:
                location = self._template_settings(self.default_template or name)["location"]
            except ServerNotFound:
                location = None
        request = pg.CheckNameAvailabilityRequest(name=name, type="Microsoft.DBforPostgreSQL/flexibleServers")
        try:
            answer = (self.client.name_availability.check_with_location(location, request) if location
                      else self.client.name_availability.check_globally(request))
        except SDK_ERRORS as exc:
            raise self._error(exc, server=name, doing=f"asking Azure whether the name '{name}' is free") from exc
        if answer.name_available:
            return True, f"Azure would give the name '{name}' to a new server"
        return False, answer.message or f"Azure will not give the name '{name}' to a new server ({answer.reason})"

    def revive_dropped_server(self, name: str, *, new_name: str | None = None, resource_id: str | None = None,
                              dropped_at: datetime | None = None, location: str | None = None,
                              timeout: float = 1800) -> ServerInfo:
        """Bring back a dropped server with all its data (`createMode=ReviveDropped`).

        Args:
            name: the dropped server to bring back.
            new_name: the name the revived server gets (default `name`). Azure keeps a dropped
                server's name while it can be revived, and Microsoft's instructions revive it
                under a different one (see `name_available`).
            resource_id: the dropped server's resource id, for a server this tool did not
                drop (find it in the resource group's activity log); default: the newest
                drop of `name` recorded by this tool.
            dropped_at: when it was dropped (needed with `resource_id` when not recorded).
            location: its region, when not recorded (default: the region of the target's server).
            timeout: seconds to wait for Azure.

        Raises:
            ServerNotFound: no such dropped server within the 5-day window.
            ServerExists: a different server of that name exists.
        """
        entries = [e for e in self.dropped.entries() if not e.get("revived_as")
                   and (e["resource_id"].lower() == resource_id.lower() if resource_id else e["name"] == name)]
        entry = max(entries, key=lambda e: e["dropped_at"]) if entries else None
        if entry is None:
            if resource_id is None:
                raise ServerNotFound(
                    f"no dropped server '{name}' is recorded in {self.dropped.path}; for a server dropped by "
                    "someone else pass resource_id= and dropped_at= from the activity log", server=name)
            if dropped_at is None:
                raise InvalidInput("reviving a server this tool did not drop needs dropped_at= (from the activity log)")
            region = location
            if region is None:
                try:
                    region = self._template_settings(self.default_template or name)["location"]
                except ServerNotFound as exc:
                    raise InvalidInput(f"cannot tell the region of dropped server '{name}': pass location=") from exc
            entry = {"name": name, "resource_id": resource_id, "settings": {"location": region},
                     "dropped_at": as_utc(dropped_at, "dropped_at").isoformat()}
        at = datetime.fromisoformat(entry["dropped_at"])
        if at + REVIVE_WINDOW < utcnow():
            raise ServerNotFound(f"server '{name}' was dropped at {at.isoformat()}, more than "
                                 f"{REVIVE_WINDOW.days} days ago; Azure can no longer revive it", server=name)
        settings = entry.get("settings") or {}
        rid = entry["resource_id"]

        def build() -> pg.Server:
            network = settings.get("network")
            if network is None and self.default_template and self.default_template != name:
                # not recorded: put it in the VNet of the target's server, where it most likely was
                template = self._find(self.default_template)
                network = template.network if template is not None else None
            props = pg.ServerProperties(create_mode=pg.CreateMode.REVIVE_DROPPED, source_server_resource_id=rid,
                                        point_in_time_utc=at, network=_network_to_copy(network))
            tags = {**(settings.get("tags") or {}), TAG_REVIVED_FROM: at.isoformat()}
            return pg.Server(location=location or settings["location"], tags=tags, properties=props)

        target = new_name or name
        info = self._create_idempotently(
            target, operation="revive", fingerprint={"resource_id": rid, "dropped_at": at.isoformat()},
            matches=lambda i: i.tags.get(TAG_REVIVED_FROM) == at.isoformat(), build=build,
            what=f"revive of dropped server '{name}' (dropped {at.isoformat()})"
                 + (f" as '{target}'" if target != name else ""), timeout=timeout)
        self._carry_firewall_rules(name, target, recorded=settings, timeout=timeout)
        self.dropped.mark_revived(rid, entry["dropped_at"], target)
        return info

    def get_restore_window(self, name: str) -> RestoreWindow:
        """From Azure's earliest restore point of the server to five minutes ago (UTC)."""
        return self._window_of(self._get(name))

    def _window_of(self, s: pg.Server) -> RestoreWindow:
        earliest = aware(s.backup.earliest_restore_date) if s.backup else None
        if earliest is None:
            raise PlatformError(f"Azure reports no restore point for server '{s.name}' yet (a new server has none "
                                "until its first backup)", server=s.name)
        if earliest.microsecond:
            earliest = earliest.replace(microsecond=0) + timedelta(seconds=1)
        return RestoreWindow(earliest=earliest, latest=(utcnow() - RESTORE_LAG).replace(microsecond=0))

    def _restore_body(self, src: pg.Server, mode: str, when: datetime, tags: dict[str, str],
                      location: str | None = None, network: pg.Network | None = None) -> pg.Server:
        props = pg.ServerProperties(create_mode=mode, source_server_resource_id=src.id or self.resource_id(src.name),
                                    point_in_time_utc=when, network=network)
        return pg.Server(location=location or src.location, tags=tags, properties=props)

    def point_in_time_restore(self, source: str, new_name: str, point_in_time_utc: datetime, *,
                              tags: dict[str, str] | None = None, timeout: float = 3600) -> ServerInfo:
        """Restore `source` as it was at a UTC time onto a NEW server in the same VNet.

        Idempotent: when `new_name` exists and its tags name the same source and time it
        is reused; a run that crashed or timed out re-attaches to its recorded operation.

        Args:
            source: the server to restore.
            new_name: the server to create.
            point_in_time_utc: the time to restore to; must carry a time zone and lie in
                the restore window.
            tags: extra tags for the new server (ours are always added).
            timeout: seconds to wait for Azure.

        Raises:
            InvalidRestoreTime: the time is naive or outside the restore window (checked
                before anything is sent to Azure).
            ServerExists: `new_name` exists and is something else.
            OperationTimedOut: Azure did not finish in time; the operation goes on and is recorded.
        """
        target = as_utc(point_in_time_utc)
        stamp = target.isoformat()
        what = f"point-in-time restore of '{source}' at {stamp} to '{new_name}'"

        def build() -> pg.Server:
            src = self._get(source)
            window = self._window_of(src)
            if not (window.earliest <= target <= window.latest):
                raise InvalidRestoreTime(f"{stamp} is outside the restore window of '{source}': "
                                         f"{window.earliest.isoformat()} .. {window.latest.isoformat()}")
            all_tags = {**(tags or {}), TAG_CREATED_BY: TAG_CREATED_BY_VALUE, TAG_PURPOSE: "point-in-time-restore",
                        TAG_SOURCE: source, TAG_RESTORE_TIME: stamp}
            return self._restore_body(src, pg.CreateMode.POINT_IN_TIME_RESTORE, target, all_tags,
                                      network=_network_to_copy(src.network))

        info = self._create_idempotently(
            new_name, operation="point-in-time-restore", fingerprint={"source": source, "point_in_time_utc": stamp},
            matches=lambda i: i.tags.get(TAG_SOURCE) == source and i.tags.get(TAG_RESTORE_TIME) == stamp,
            build=build, what=what, timeout=timeout)
        self._carry_firewall_rules(source, new_name, timeout=timeout)
        return info

    def geo_restore_refusals(self, source: str, *, location: str, delegated_subnet_resource_id: str | None = None,
                             private_dns_zone_arm_resource_id: str | None = None) -> list[str]:
        """Why a geo-restore of `source` with these settings cannot work (empty: it can), read-only.

        Microsoft's rules: the source must have been created with geo-redundant backups (it
        cannot be turned on later), and a server with private access needs a delegated subnet
        and a private DNS zone in the target region for the new server.
        """
        s = self._template_settings(source)
        out = []
        geo = (s.get("backup") or {}).get("geoRedundantBackup")
        if geo != "Enabled":
            out.append(f"server '{source}' has no geo-redundant backups (backup.geoRedundantBackup is {geo or 'unset'}): "
                       "Azure keeps no copy in the paired region to restore from, and the setting can only be chosen "
                       "when a server is created")
        if (s.get("network") or {}).get("delegatedSubnetResourceId"):
            missing = [what for what, given in (("a delegated subnet (geo_restore.delegated_subnet_resource_id)",
                                                 delegated_subnet_resource_id),
                                                ("a private DNS zone (geo_restore.private_dns_zone_arm_resource_id)",
                                                 private_dns_zone_arm_resource_id)) if not given]
            if missing:
                out.append(f"server '{source}' uses private access (a virtual network): a geo-restored server in "
                           f"{location} needs {' and '.join(missing)} there")
        return out

    def geo_restore(self, source: str, new_name: str, *, location: str, point_in_time_utc: datetime | None = None,
                    delegated_subnet_resource_id: str | None = None,
                    private_dns_zone_arm_resource_id: str | None = None,
                    tags: dict[str, str] | None = None, timeout: float = 3600) -> ServerInfo:
        """Restore `source` from its geo-redundant backup onto a new server in another region.

        Azure restores the latest geo-replicated backup: there is no time to choose, so none is
        tagged and a re-run (same source, name and region) re-attaches to the running operation
        or reuses the server it made.

        Args:
            source: the server to restore (created with geo-redundant backups).
            new_name: the server to create.
            location: the region of the new server (the source's paired region).
            point_in_time_utc: must be None: a geo-restore has no point-in-time choice.
            delegated_subnet_resource_id: the subnet, in that region, for a VNet server.
            private_dns_zone_arm_resource_id: the private DNS zone for a VNet server.
            tags: extra tags for the new server.
            timeout: seconds to wait for Azure.

        Raises:
            InvalidInput: a time was given, or a rule of `geo_restore_refusals` is broken
                (checked before anything is sent).
        """
        if point_in_time_utc is not None:
            raise InvalidInput("a geo-restore takes the latest geo-replicated backup: no restore time can be chosen "
                               "(for a point in time, restore in the server's own region)")
        network = None
        if delegated_subnet_resource_id or private_dns_zone_arm_resource_id:
            network = pg.Network(delegated_subnet_resource_id=delegated_subnet_resource_id,
                                 private_dns_zone_arm_resource_id=private_dns_zone_arm_resource_id)

        def build() -> pg.Server:
            refusals = self.geo_restore_refusals(source, location=location,
                                                 delegated_subnet_resource_id=delegated_subnet_resource_id,
                                                 private_dns_zone_arm_resource_id=private_dns_zone_arm_resource_id)
            if refusals:
                raise InvalidInput(f"geo-restore of '{source}' to {location} is not possible: {'; '.join(refusals)}")
            src = self._get(source)
            all_tags = {**(tags or {}), TAG_CREATED_BY: TAG_CREATED_BY_VALUE, TAG_PURPOSE: "geo-restore",
                        TAG_SOURCE: source}
            # Azure's API wants a time; the request's own is sent, and the latest geo-backup is what comes back
            return self._restore_body(src, pg.CreateMode.GEO_RESTORE, utcnow().replace(microsecond=0), all_tags,
                                      location=location, network=network)

        info = self._create_idempotently(
            new_name, operation="geo-restore", fingerprint={"source": source, "location": location},
            matches=lambda i: i.tags.get(TAG_SOURCE) == source and i.tags.get(TAG_PURPOSE) == "geo-restore",
            build=build, what=f"geo-restore of '{source}' to '{new_name}' in {location}", timeout=timeout)
        try:
            self._carry_firewall_rules(source, new_name, timeout=timeout)
        except DrError as exc:  # the source's region may be the one that is down
            log.warning("could not copy the firewall rules of %s onto %s (%s): add the app's addresses to it",
                        source, new_name, exc.message)
        return info

    def connection(self, name: str, database: str) -> ConnInfo:
        """Connection settings for a database: the server's FQDN, TLS required, the admin login."""
        s = self._get(name)
        if not s.fully_qualified_domain_name:
            raise PlatformError(f"server '{name}' has no host name yet (state {value_of(s.state)})", server=name)
        return ConnInfo(host=s.fully_qualified_domain_name, port=PG_PORT, user=self.admin_user, dbname=database,
                        password=self._admin_password(), sslmode="require")

    # --- preflight ---------------------------------------------------------------------

    #: what a recovery does in the resource group, as ARM actions (checked against the caller's permissions)
    NEEDED_ACTIONS = NEEDED_ACTIONS

    def preflight(self, name: str) -> list[tuple[str, bool, str]]:
        """Checks worth doing before a restore or re-creation of `name`: (check, ok, detail) for each.

        Read-only. For an existing server: it is visible, its delegated subnet and private DNS
        zone (which a restore copies) and the zone's link to the VNet, a restore point, the
        admin password, and the caller's permissions on the resource group. For a missing
        one: the permissions, the network it had (as recorded when this tool dropped it),
        and leftover diagnostic settings that would block re-creating it.
        """
        return AzurePreflight(self, PASSWORD_ENV).run(name)
