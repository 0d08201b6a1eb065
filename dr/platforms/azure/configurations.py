"""Server parameters through the management SDK's configurations API.

Azure keeps a flexible server's parameters as `configurations` resources: each has its value,
its default, whether a user set it (`source: user-override`), whether it is read-only, and
whether it takes effect only after a restart (`isDynamicConfig: false`, then
`isConfigPendingRestart: true` until the server is restarted). `azure.extensions` among them
is the allow-list of extensions `CREATE EXTENSION` accepts.

What is read: the user-set, writable parameters (what a server recreated from a snapshot must
get again). What is written: a `PUT` per parameter whose value differs (`source: user-override`),
each a long-running operation, then, when any is pending a restart, one restart of the server,
waited for until it is Ready again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from azure.mgmt.postgresqlflexibleservers import models as pg

from dr.errors import InvalidInput, PlatformError
from dr.platforms.azure._arm import SDK_ERRORS, arm_error, value_of
from dr.platforms.azure.operations import ServerOperations

log = logging.getLogger("dr.azure.servers")

#: the parameter that holds the allow-list of extensions
ALLOW_LIST = "azure.extensions"


def split_list(value: str | None) -> frozenset[str]:
    """The names in a comma-separated parameter value, lower case (Azure lists them in upper case)."""
    return frozenset(v.strip().lower() for v in (value or "").split(",") if v.strip())


def _same(a: str | None, b: str | None, kind: str | None) -> bool:
    """Whether two values of a parameter are the same setting (sets compare as sets, names without case)."""
    if kind == "Set":
        return split_list(a) == split_list(b)
    return (a or "").strip().lower() == (b or "").strip().lower()


class ServerConfigurations:
    """The server parameters of the servers of one resource group."""

    def __init__(self, client: Any, resource_group: str, ops: ServerOperations):
        self.client, self.resource_group, self.ops = client, resource_group, ops

    def _error(self, exc: Exception, server: str, doing: str) -> PlatformError:
        return arm_error(exc, server=server, doing=doing, resource_group=self.resource_group)  # type: ignore[return-value]

    def list(self, server: str) -> dict[str, pg.Configuration]:
        """Every parameter of the server, by name."""
        try:
            return {c.name: c for c in self.client.configurations.list_by_server(self.resource_group, server)}
        except SDK_ERRORS as exc:
            raise self._error(exc, server, f"reading the parameters of server '{server}'") from exc

    def user_set(self, server: str) -> dict[str, str]:
        """The parameters a user set (not Azure's defaults), leaving out the read-only ones Azure manages."""
        return {name: c.value or "" for name, c in sorted(self.list(server).items())
                if value_of(c.source) == "user-override" and not c.is_read_only}

    def allow_list(self, server: str) -> frozenset[str]:
        """The extensions `CREATE EXTENSION` accepts on the server (`azure.extensions`), lower case."""
        try:
            c = self.client.configurations.get(self.resource_group, server, ALLOW_LIST)
        except SDK_ERRORS as exc:
            raise self._error(exc, server, f"reading {ALLOW_LIST} of server '{server}'") from exc
        return split_list(c.value)

    def set(self, server: str, parameters: dict[str, str], *, timeout: float) -> tuple[dict[str, str], list[str], bool]:
        """Set parameters; returns (set now, already so, whether a restart is now needed).

        Raises:
            InvalidInput: a parameter Azure does not have, or a read-only one (checked before any is set).
            PlatformError: Azure refused a value (its message names the parameter).
        """
        deadline = time.monotonic() + timeout
        current = self.list(server)
        unknown = sorted(n for n in parameters if n not in current)
        read_only = sorted(n for n in parameters if n in current and current[n].is_read_only)
        if unknown or read_only:
            raise InvalidInput("; ".join(
                ([f"server '{server}' has no parameter {', '.join(unknown)}"] if unknown else [])
                + ([f"{', '.join(read_only)} cannot be set on Azure (read-only)"] if read_only else [])))
        applied: dict[str, str] = {}
        unchanged: list[str] = []
        for name, value in sorted(parameters.items()):
            c = current[name]
            if _same(c.value, value, value_of(c.data_type)):
                unchanged.append(name)
                continue
            what = f"setting parameter {name} = {value!r} on server '{server}'"
            body = pg.Configuration(properties=pg.ConfigurationProperties(value=value, source="user-override"))
            poller = self.ops.begin(
                server, lambda n=name, b=body: self.client.configurations.begin_put(self.resource_group, server, n, b),
                what=what, timeout=max(0.0, deadline - time.monotonic()))
            self.ops.wait(poller, what=what, server=server, timeout=max(0.0, deadline - time.monotonic()))
            applied[name] = value
            log.info("server %s: %s = %r (was %r)", server, name, value, c.value)
        # pending: what this call set, or an earlier one that never got its restart
        pending = any(c.is_config_pending_restart for c in (self.list(server) if applied else current).values())
        return applied, unchanged, pending
