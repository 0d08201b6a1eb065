"""What a flexible server offers and how it is configured: extensions, parameters, snapshots.

The `ServerPlatform` methods restores of real databases need (see `dr/platforms/base.py`),
for Azure: the extension allow-list and the non-default parameters come from the
configurations API (`configurations.py`), never from `pg_settings`; a snapshot records what
a lost server must be made again with (version, SKU, storage, high availability, network,
backup redundancy, region, parameters, extensions); a server is made again from it with a
`Create` PUT, and its parameters set as a step of their own, with the restart they need.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from azure.mgmt.postgresqlflexibleservers import models as pg

from dr.catalog import available_extensions, database_extensions
from dr.database import list_databases
from dr.errors import InvalidInput
from dr.platforms.azure._arm import value_of
from dr.platforms.azure.configurations import ALLOW_LIST, split_list
from dr.platforms.base import ExtensionSupport, ParameterChange, ServerInfo, ServerSnapshot

if TYPE_CHECKING:
    from dr.platforms.azure.servers import AzureServers

log = logging.getLogger("dr.azure.servers")

ALLOW_FIX = ("allow-list it: `dr allow-extensions --extensions <names>` (the approval gate guards production), or "
             f"az postgres flexible-server parameter set --name {ALLOW_LIST} --value <current list>,<name>")
INSTALL_FIX = "Azure does not offer it: only the extensions Azure supports can be created on a flexible server"


class SnapshotsAndParameters:
    """The extension, parameter and snapshot methods of `AzureServers` (a mixin of it)."""

    def get_extension_support(self: "AzureServers", name: str) -> ExtensionSupport:
        """`pg_available_extensions`, and the allow-list `azure.extensions` from the configurations API."""
        s = self._get(name)
        return ExtensionSupport(
            server=name, version=int(str(value_of(s.version)).split(".")[0]),
            available=available_extensions(self.connection(name, "postgres")),
            allow_list=self.configurations.allow_list(name),
            description=f"Azure Database for PostgreSQL {value_of(s.version)} ({s.location})",
            install_fix=INSTALL_FIX, allow_fix=ALLOW_FIX)

    def expected_extension_support(self: "AzureServers", snapshot: ServerSnapshot) -> ExtensionSupport:
        """A server made from `snapshot` allows exactly the snapshot's `azure.extensions` (none if it had none)."""
        return ExtensionSupport(server=snapshot.server, version=snapshot.version, available=None,
                                allow_list=split_list(snapshot.parameters.get(ALLOW_LIST)),
                                description=f"Azure Database for PostgreSQL {snapshot.version}, from a snapshot",
                                install_fix=INSTALL_FIX, allow_fix=ALLOW_FIX)

    def get_server_parameters(self: "AzureServers", name: str) -> dict[str, str]:
        """The parameters a user set on the server (configurations with `source: user-override`)."""
        return self.configurations.user_set(name)

    def set_server_parameters(self: "AzureServers", name: str, parameters: dict[str, str], *,
                              timeout: float = 1800) -> ParameterChange:
        """Set parameters through the configurations API; restart the server if any needs it, and wait until Ready.

        Idempotent: a parameter that already has the value is not sent again, and a restart
        happens only while one is pending.
        """
        deadline = time.monotonic() + timeout
        applied, unchanged, pending = self.configurations.set(name, parameters, timeout=timeout)
        if pending:
            what = f"restart of server '{name}' for its new parameters"
            log.info("%s: %s need a restart", name, ", ".join(applied) or "parameters set earlier")
            poller = self.ops.begin(name, lambda: self.client.servers.begin_restart(self.resource_group, name),
                                    what=what, timeout=max(0.0, deadline - time.monotonic()))
            self.ops.wait(poller, what=what, server=name, timeout=max(0.0, deadline - time.monotonic()),
                          budget=timeout)
            self._ensure_ready(self.get_server(name), max(0.0, deadline - time.monotonic()))
        return ParameterChange(server=name, applied=applied, unchanged=unchanged, restarted=pending)

    def get_server_snapshot(self: "AzureServers", name: str) -> ServerSnapshot:
        """What the server is: version, SKU, storage, HA, network, region, parameters, every database's extensions."""
        s = self._get(name)
        admin = self.connection(name, "postgres")
        net = s.network
        network = {k: v for k, v in (("delegatedSubnetResourceId", net.delegated_subnet_resource_id if net else None),
                                     ("privateDnsZoneArmResourceId", net.private_dns_zone_arm_resource_id if net else None),
                                     ("publicNetworkAccess", value_of(net.public_network_access) if net else None))
                   if v}
        extra = {"location": s.location or "", "tier": str(value_of(s.sku.tier)) if s.sku else "",
                 "availability_zone": s.availability_zone or "",
                 "geo_redundant_backup": str(value_of(s.backup.geo_redundant_backup)) if s.backup and
                 s.backup.geo_redundant_backup else "",
                 "backup_retention_days": str(s.backup.backup_retention_days) if s.backup and
                 s.backup.backup_retention_days else ""}
        major = str(value_of(s.version))
        return ServerSnapshot(
            server=name, platform="azure", taken_at=datetime.now(timezone.utc), version=int(major.split(".")[0]),
            version_full=f"{major}.{s.minor_version}" if s.minor_version else major,
            sku=s.sku.name if s.sku else None, storage_gb=s.storage.storage_size_gb if s.storage else None,
            high_availability=str(value_of(s.high_availability.mode)) if s.high_availability and
            s.high_availability.mode else "Disabled",
            network=network, parameters=self.get_server_parameters(name),
            extensions={db: database_extensions(self.connection(name, db)) for db in list_databases(admin)},
            extra={k: v for k, v in extra.items() if v})

    def create_server_from_snapshot(self: "AzureServers", name: str, snapshot: ServerSnapshot, *,
                                    tags: dict[str, str] | None = None, timeout: float = 1800) -> ServerInfo:
        """An empty server as the snapshot describes it; its parameters are `set_server_parameters`' step.

        Raises:
            InvalidInput: the snapshot was not taken on Azure, or lacks the region or SKU a server needs.
            ServerExists: a server of that name exists.
        """
        if snapshot.platform != "azure" or not snapshot.extra.get("location") or not snapshot.sku:
            raise InvalidInput(f"the snapshot of '{snapshot.server}' (platform {snapshot.platform}) does not say "
                               "where and how big an Azure server to make: its region and SKU are missing")
        net = dict(snapshot.network)
        public = net.get("publicNetworkAccess") if not net.get("delegatedSubnetResourceId") else None
        network = {k: v for k, v in (("delegatedSubnetResourceId", net.get("delegatedSubnetResourceId")),
                                     ("privateDnsZoneArmResourceId", net.get("privateDnsZoneArmResourceId")),
                                     ("publicNetworkAccess", public)) if v}
        backup: dict[str, Any] = {k: v for k, v in (
            ("geoRedundantBackup", snapshot.extra.get("geo_redundant_backup")),
            ("backupRetentionDays", int(snapshot.extra["backup_retention_days"])
             if snapshot.extra.get("backup_retention_days") else None)) if v}

        def build() -> pg.Server:
            props = pg.ServerProperties(
                create_mode=pg.CreateMode.CREATE, version=str(snapshot.version),
                administrator_login=self.admin_user, administrator_login_password=self._admin_password(),
                storage=pg.Storage(storage_size_gb=snapshot.storage_gb) if snapshot.storage_gb else None,
                network=pg.Network(network) if network else None, backup=pg.Backup(backup) if backup else None,
                high_availability=pg.HighAvailability(mode=snapshot.high_availability)
                if snapshot.high_availability else None,
                availability_zone=snapshot.extra.get("availability_zone") or None)
            sku = pg.Sku(name=snapshot.sku, tier=snapshot.extra.get("tier") or None)
            return pg.Server(location=snapshot.extra["location"], tags=dict(tags or {}), sku=sku, properties=props)

        info = self._create_idempotently(
            name, operation="create", fingerprint={"snapshot": snapshot.server, "taken_at": snapshot.taken_at.isoformat()},
            matches=lambda i: False, build=build,
            what=f"creation of server '{name}' from the snapshot of '{snapshot.server}' taken {snapshot.taken_at:%Y-%m-%d %H:%M} UTC",
            timeout=timeout)
        # its firewall rules: from the old server when it is still there, else as recorded when it was dropped
        live = snapshot.server != name and self._find(snapshot.server) is not None
        recorded = None if live else self._recorded_settings(snapshot.server)
        if live or recorded is not None:
            self._carry_firewall_rules(snapshot.server, name, recorded=recorded, timeout=timeout)
        elif "publicNetworkAccess" in network:
            log.warning("the firewall rules of %s are not known (it was not dropped by this tool); %s has none: add "
                        "the app's addresses to it", snapshot.server, name)
        return info
