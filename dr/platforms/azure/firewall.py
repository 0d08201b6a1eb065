"""Firewall rules of public-access servers: read from a server, copied onto the one that replaces it.

A server with public access answers only the addresses its firewall rules allow. Azure
makes a restored, revived or geo-restored server without any, so the app and the tool
would be shut out of it: the rules of the server it replaces are copied onto it (live from
the source, or as recorded when this tool dropped the source). Servers with private access
(a delegated subnet) have no firewall rules; nothing is done for them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from azure.mgmt.postgresqlflexibleservers import models as pg

from dr.platforms.azure._arm import SDK_ERRORS, arm_error
from dr.platforms.azure.operations import ServerOperations

log = logging.getLogger("dr.azure.servers")

#: rule name -> {"startIpAddress": ..., "endIpAddress": ...}
Rules = dict[str, dict[str, str]]


def is_public(network: dict[str, Any] | None) -> bool:
    """Whether a server with these network settings (REST JSON) uses public access."""
    net = network or {}
    return not net.get("delegatedSubnetResourceId") and net.get("publicNetworkAccess", "Enabled") != "Disabled"


class FirewallRules:
    """The firewall rules of the servers of one resource group."""

    def __init__(self, client: Any, resource_group: str, ops: ServerOperations):
        self.client, self.resource_group, self.ops = client, resource_group, ops

    def list(self, server: str) -> Rules:
        """The server's rules."""
        try:
            return {r.name: {"startIpAddress": r.start_ip_address, "endIpAddress": r.end_ip_address}
                    for r in self.client.firewall_rules.list_by_server(self.resource_group, server)}
        except SDK_ERRORS as exc:
            raise arm_error(exc, server=server, doing=f"reading the firewall rules of server '{server}'",
                            resource_group=self.resource_group) from exc

    def copy(self, rules: Rules, to: str, *, timeout: float) -> list[str]:
        """Create `rules` on server `to` (a rule it already has with the same range is left alone); their names."""
        deadline = time.monotonic() + timeout
        have = self.list(to)
        done = []
        for name, rule in sorted(rules.items()):
            if have.get(name) == rule:
                continue
            what = f"firewall rule '{name}' ({rule['startIpAddress']}-{rule['endIpAddress']}) on server '{to}'"
            body = pg.FirewallRule(properties=pg.FirewallRuleProperties(start_ip_address=rule["startIpAddress"],
                                                                        end_ip_address=rule["endIpAddress"]))
            poller = self.ops.begin(
                to, lambda n=name, b=body: self.client.firewall_rules.begin_create_or_update(
                    self.resource_group, to, n, b), what=what, timeout=max(0.0, deadline - time.monotonic()))
            self.ops.wait(poller, what=what, server=to, timeout=max(0.0, deadline - time.monotonic()))
            done.append(name)
        if done:
            log.info("copied %d firewall rule(s) onto %s: %s", len(done), to, ", ".join(done))
        return done
