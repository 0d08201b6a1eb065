"""Read-only checks of what a restore or re-creation of a flexible server will need.

`AzureServers.preflight(name)` runs them: each check answers `(check, ok, detail)`; a check
that cannot be read (no permission, an error) says "could not check" instead of passing.
"""

from __future__ import annotations

import fnmatch
import os
from typing import TYPE_CHECKING, Any, Callable

from dr.errors import DrError, ServerNotFound
from dr.platforms.azure._arm import SDK_ERRORS, value_of

if TYPE_CHECKING:
    from dr.platforms.azure.servers import AzureServers

Check = tuple[str, bool, str]

#: what a recovery does in the resource group, as ARM actions (checked against the caller's permissions)
NEEDED_ACTIONS = (
    "Microsoft.DBforPostgreSQL/flexibleServers/read",
    "Microsoft.DBforPostgreSQL/flexibleServers/write",
    "Microsoft.DBforPostgreSQL/flexibleServers/delete",
    "Microsoft.DBforPostgreSQL/flexibleServers/start/action",
)


class AzurePreflight:
    """The preflight checks of the servers of one resource group (see `run`)."""

    def __init__(self, servers: "AzureServers", password_env: str):
        self.servers = servers
        self.password_env = password_env

    def _arm_get(self, path: str, api_version: str) -> Any:
        """GET any ARM resource through the management client's pipeline (auth, retries): JSON, or raises."""
        from azure.core.rest import HttpRequest

        request = HttpRequest("GET", f"{path}?api-version={api_version}")
        response = self.servers.client.send_request(request)
        response.raise_for_status()
        return response.json()

    @staticmethod
    def _check(what: str, fn: Callable[[], tuple[bool, str]]) -> Check:
        try:
            ok, detail = fn()
        except SDK_ERRORS as exc:
            status = getattr(exc, "status_code", None)
            reason = "not allowed to read it" if status in (401, 403) else f"HTTP {status}" if status else str(exc)
            return what, False, f"could not check ({reason})"
        return what, ok, detail

    def permissions(self) -> tuple[bool, str]:
        """Whether the caller's role assignments on the resource group allow every NEEDED_ACTIONS."""
        s = self.servers
        rg = f"/subscriptions/{s.subscription_id}/resourceGroups/{s.resource_group}"
        perms = self._arm_get(f"{rg}/providers/Microsoft.Authorization/permissions", "2022-04-01").get("value", [])

        def allowed(action: str) -> bool:
            a = action.lower()
            for p in perms:
                if any(fnmatch.fnmatchcase(a, x.lower()) for x in p.get("actions", [])) and \
                        not any(fnmatch.fnmatchcase(a, x.lower()) for x in p.get("notActions", [])):
                    return True
            return False

        missing = [a for a in NEEDED_ACTIONS if not allowed(a)]
        if missing:
            return False, f"missing on resource group '{s.resource_group}': {', '.join(missing)} (docs/azure.md)"
        return True, f"allowed on resource group '{s.resource_group}'"

    def dns_link(self, dns_zone: str, subnet: str | None) -> tuple[bool, str]:
        """Whether the private DNS zone is linked to the virtual network of the subnet."""
        links = self._arm_get(f"{dns_zone}/virtualNetworkLinks", "2024-06-01").get("value", [])
        vnet = subnet.split("/subnets/")[0].lower() if subnet else None
        linked = [link for link in links
                  if ((link.get("properties") or {}).get("virtualNetwork") or {}).get("id", "").lower() == vnet]
        if vnet and linked:
            return True, f"linked to {vnet.rsplit('/', 1)[-1]} ({linked[0].get('name')})"
        names = ", ".join(link.get("name", "?") for link in links) or "none"
        return False, (f"the zone is not linked to the server's virtual network (links: {names}): restored servers "
                       "would not be found by name")

    def leftover_diagnostics(self, name: str) -> tuple[bool, str]:
        """Diagnostic settings left by a deleted server of this name block re-creating it with them."""
        rid = self.servers.resource_id(name)
        found = self._arm_get(f"{rid}/providers/Microsoft.Insights/diagnosticSettings",
                              "2021-05-01-preview").get("value", [])
        if found:
            names = ", ".join(d.get("name", "?") for d in found)
            return False, (f"diagnostic settings of the deleted '{name}' remain ({names}); delete them before "
                           f"re-creating it: az monitor diagnostic-settings delete --resource {rid} --name <name>")
        return True, "none left behind"

    def server_name(self, name: str) -> tuple[bool, str]:
        """Whether a lost server can come back under its own name (Azure keeps a dropped one's name)."""
        try:
            free, why = self.servers.name_available(name)
        except DrError as exc:
            return False, f"could not check ({exc.message})"
        if free:
            return True, f"free: a revived or re-created '{name}' keeps its name, and the app its address"
        return False, (f"{why}: as Microsoft advises, the server comes back under a new name, and the recovery pauses "
                       "for the app to be pointed at it")

    def run(self, name: str) -> list[Check]:
        """The checks of server `name` (see `AzureServers.preflight`)."""
        s = self.servers
        has_password = bool(os.environ.get(self.password_env))
        password = ("admin password", has_password,
                    f"{self.password_env} is set" if has_password else f"{self.password_env} is not set")
        roles = self._check("permissions", self.permissions)
        live = s._find(name)
        if live is None:
            out = [("server", False, f"'{name}' not found in resource group '{s.resource_group}'"), roles, password,
                   self._check("leftover diagnostic settings", lambda: self.leftover_diagnostics(name)),
                   self._check("server name", lambda: self.server_name(name))]
            try:
                net = (s._template_settings(name).get("network") or {})
            except ServerNotFound:
                return out
            subnet, dns = net.get("delegatedSubnetResourceId"), net.get("privateDnsZoneArmResourceId")
            if dns:
                out.append(self._check("private DNS zone link", lambda: self.dns_link(dns, subnet)))
            return out
        out = [("server", True, f"'{name}' is {value_of(live.state)}, PostgreSQL {value_of(live.version)}, "
                                f"in {live.location}")]
        net = live.network
        subnet = net.delegated_subnet_resource_id if net else None
        dns = net.private_dns_zone_arm_resource_id if net else None
        out.append(("delegated subnet", bool(subnet), subnet or "none: the server uses public access, and so will a "
                    "restored one"))
        out.append(("private DNS zone", bool(dns), dns or "none: a VNet server needs one to be found by name"))
        if dns:
            out.append(self._check("private DNS zone link", lambda: self.dns_link(dns, subnet)))
        earliest = live.backup.earliest_restore_date if live.backup else None
        out.append(("restore point", earliest is not None,
                    f"earliest {earliest.isoformat()}" if earliest else "Azure reports none yet"))
        out.append(password)
        out.append(roles)
        return out
