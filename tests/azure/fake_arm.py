"""A small fake of the Azure Resource Manager endpoints the flexible-server SDK calls.

It serves HTTPS (the SDK's bearer-token policy refuses plain HTTP) from a thread and
keeps servers in a dict. Implemented, with the status codes and headers ARM uses:

- GET/PUT/DELETE `.../resourceGroups/{rg}/providers/Microsoft.DBforPostgreSQL/flexibleServers/{name}`
- GET `.../flexibleServers` (list by resource group), POST `.../{name}/start`
- PUT and DELETE answer 202 with `Azure-AsyncOperation` and `Location`; the operation
  answers `InProgress` for `polls_to_finish` polls, then `Succeeded` (or `Failed`).
- PUT validates like ARM does: 400 for a missing location or a restore without its
  source/time, 409 `ServerAlreadyExists` when the name is taken, 404-ish 400 for an
  unknown source.
- A server in the middle of an operation (Provisioning, Dropping, Starting, Stopping,
  Updating, Restarting) refuses a DELETE, a start/stop/restart or an update with 409
  `ServerIsBusy`, as Azure does; `busy_for(name, gets, state)` puts a server in such a state
  for `gets` reads of it (someone else's operation), then leaves it in `then`.
- Server names are global and linger: a name that any server has (in any resource group),
  or that a dropped server holds while Azure keeps it (`dropped_retention_days`, 5), is
  refused with 409 `ServerAlreadyExists` ("Specified server name 'x' is already used.
  Please use a different name and try again."), and `checkNameAvailability` says so.
- A geo-restore is refused (400) from a source without `geoRedundantBackup: Enabled`, and
  from a source in a virtual network without a delegated subnet and a private DNS zone for
  the new server (the rules of Microsoft's geo-restore docs; the wording is the fake's).
- `.../{server}/firewallRules[/{rule}]`: list, get, PUT (202 + operation) and DELETE, per
  server; a restored, revived or geo-restored server starts with none and without high
  availability, as on Azure.
- `.../{server}/configurations[/{name}]` (server parameters): list, get and PUT (202 +
  operation) of the parameters in `PARAMETERS`, with Azure's `source`, `isReadOnly`,
  `isDynamicConfig` and `isConfigPendingRestart`; a value outside `allowedValues` (for
  `azure.extensions`: an extension Azure does not offer) is refused with 400
  `InvalidParameterValue`, a read-only one too; a static parameter stays pending until a
  restart. A new server starts with the defaults; a restore, revive or geo-restore keeps
  its source's values. `on_configuration(name, parameter, value)` and `on_restart(name)`
  are the hooks a backed fake applies them with.
- DELETE of a missing server answers 204, as the spec says; `Date` headers carry the fake's
  own clock (`clock_skew`), as Azure's carry Azure's.
- Faults: `inject(method, path_contains, status, ...)` answers the next matching
  requests with a canned status (429 with Retry-After, 503, 400, 404, ...).

Every request is recorded with its JSON body, so tests can assert what the SDK sent.
What is NOT faked: the SDK, its serialisation, its retry and polling policies, TLS and
the bearer-token header are all the real ones.
"""

from __future__ import annotations

import copy
import json
import re
import ssl
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PROVIDER = "providers/Microsoft.DBforPostgreSQL"
SERVER_RE = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.DBforPostgreSQL/"
    r"flexibleServers(?:/(?P<name>[^/]+)(?:/(?P<action>start|stop|restart))?)?$", re.IGNORECASE)
OPERATION_RE = re.compile(r"^/subscriptions/[^/]+/providers/Microsoft\.DBforPostgreSQL/locations/[^/]+/"
                          r"(?P<kind>azureAsyncOperation|operationResults)/(?P<op>[^/]+)$", re.IGNORECASE)
DNS_LINKS_RE = re.compile(r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Network/"
                          r"privateDnsZones/[^/]+/virtualNetworkLinks$", re.IGNORECASE)
NAME_CHECK_RE = re.compile(r"^/subscriptions/[^/]+/providers/Microsoft\.DBforPostgreSQL/(?:locations/[^/]+/)?"
                           r"checkNameAvailability$", re.IGNORECASE)
CHILD_RE = re.compile(r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.DBforPostgreSQL/"
                      r"flexibleServers/(?P<name>[^/]+)/(?P<kind>firewallRules|configurations)(?:/(?P<child>[^/]+))?$",
                      re.IGNORECASE)
DIAGNOSTICS_RE = re.compile(r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.DBforPostgreSQL/"
                            r"flexibleServers/(?P<name>[^/]+)/providers/Microsoft\.Insights/diagnosticSettings$",
                            re.IGNORECASE)
TOKEN = "test-token"
#: the extensions Azure offers for `azure.extensions` (its allowedValues, upper case as Azure lists them)
AZURE_EXTENSIONS = ("ADDRESS_STANDARDIZER,AMCHECK,BLOOM,BTREE_GIN,BTREE_GIST,CITEXT,CUBE,DBLINK,DICT_INT,DICT_XSYN,"
                    "EARTHDISTANCE,FUZZYSTRMATCH,HSTORE,INTAGG,INTARRAY,ISN,LO,LTREE,PAGEINSPECT,PG_BUFFERCACHE,PG_CRON,"
                    "PG_FREESPACEMAP,PG_PARTMAN,PG_PREWARM,PG_STAT_STATEMENTS,PG_TRGM,PG_VISIBILITY,PGCRYPTO,PGROWLOCKS,"
                    "PGSTATTUPLE,POSTGIS,POSTGRES_FDW,SEG,TABLEFUNC,TSM_SYSTEM_ROWS,TSM_SYSTEM_TIME,UNACCENT,UUID-OSSP,"
                    "VECTOR")
#: the server parameters the fake models (Azure has hundreds): name -> (default, data type, allowed values,
#: dynamic, read-only)
PARAMETERS: dict[str, tuple[str, str, str, bool, bool]] = {
    "azure.extensions": ("", "Set", AZURE_EXTENSIONS, True, False),
    "shared_preload_libraries": ("pg_cron,pg_stat_statements", "Set", "AUTO_EXPLAIN,PG_CRON,PG_PARTMAN_BGW,"
                                 "PG_PREWARM,PG_SQUEEZE,PG_STAT_STATEMENTS,PGAUDIT,PGLOGICAL,WAL2JSON", False, False),
    "max_connections": ("859", "Integer", "25-5000", False, False),
    "work_mem": ("4096", "Integer", "4096-2097151", True, False),
    "log_min_duration_statement": ("-1", "Integer", "-1-2147483647", True, False),
    "idle_in_transaction_session_timeout": ("0", "Integer", "0-2147483647", True, False),
    "archive_command": ("BlobLogUpload.sh %f %p", "String", ".*", True, True),
}

#: states in which Azure refuses another operation on the server (409 ServerIsBusy)
BUSY_STATES = {"Provisioning", "Dropping", "Starting", "Stopping", "Updating", "Restarting"}


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class Fault:
    method: str
    path_contains: str
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1
    on_hit: Any = None


@dataclass
class Operation:
    id: str
    remaining: int
    on_success: Any
    fail_with: dict[str, str] | None = None
    server: str = ""
    status: str = "InProgress"
    polls: int = 0


class FakeArm:
    """The fake ARM service. Start with `start()`, reset between tests with `reset()`."""

    def __init__(self, cert_file: str, key_file: str):
        self.cert_file, self.key_file = cert_file, key_file
        self.lock = threading.RLock()
        self.httpd: ThreadingHTTPServer | None = None
        self.reset()

    # --- control ------------------------------------------------------------------

    def reset(self) -> None:
        with getattr(self, "lock", threading.RLock()):
            self.servers: dict[str, dict[str, Any]] = {}  # resource id (lower) -> server JSON
            self.dropped: dict[str, dict[str, Any]] = {}  # resource id (lower) -> last JSON
            self.dropped_at: dict[str, datetime] = {}  # resource id (lower) -> when its drop finished
            self.dropped_retention_days = 5
            self.operations: dict[str, Operation] = {}
            self.requests: list[Recorded] = []
            self.faults: list[Fault] = []
            self.polls_to_finish = 2
            self.never_finish: set[str] = set()  # server names whose operations stay InProgress
            self.settles: dict[str, list[Any]] = {}  # server name -> [reads left, state after]
            self.fail_operations: dict[str, dict[str, str]] = {}  # server name -> error of its next operation
            self.delete_missing_status = 204
            self.firewall: dict[str, dict[str, dict[str, str]]] = {}  # server name -> rule name -> properties
            self.configs: dict[str, dict[str, str]] = {}  # server name -> parameter -> value set by a user
            self.pending_restart: dict[str, set[str]] = {}  # server name -> static parameters set since a start
            self.clock_skew = timedelta(0)  # Azure's clock, in the Date headers, against ours
            self.poll_retry_after: str | None = None
            # what the preflight reads: the caller's permissions (Contributor), DNS zone links (None: one link
            # to the resource group's VNet), and diagnostic settings left by deleted servers (by server name)
            self.permissions: list[dict[str, Any]] = [{"actions": ["*"], "notActions": [
                "Microsoft.Authorization/*/Delete", "Microsoft.Authorization/*/Write"]}]
            self.dns_links: list[dict[str, Any]] | None = None
            self.diagnostic_settings: dict[str, list[dict[str, Any]]] = {}  # Retry-After on operation answers (the SDK honours it)

    @property
    def url(self) -> str:
        assert self.httpd is not None
        return f"https://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> "FakeArm":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        fake = self

        class Handler(_Handler):
            arm = fake

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, name="fake-arm", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()

    def inject(self, method: str, path_contains: str, status: int, *, body: Any = None,
               headers: dict[str, str] | None = None, times: int = 1, on_hit: Any = None) -> None:
        """Answer the next `times` requests matching method and path with `status` (calling `on_hit` first)."""
        with self.lock:
            self.faults.append(Fault(method.upper(), path_contains, status, body, headers or {}, times, on_hit))

    def busy_for(self, name: str, gets: int, state: str = "Updating", then: str = "Ready") -> None:
        """Server `name` is busy with an operation not ours (`state`) for its next `gets` reads, then `then`."""
        with self.lock:
            doc = self.server(name)
            assert doc is not None, name
            doc["properties"]["state"] = state
            self.settles[name] = [gets, then]

    def finish_after(self, name: str, polls: int) -> None:
        """The running operations on server `name` finish after `polls` more polls (Azure got there meanwhile)."""
        with self.lock:
            self.never_finish.discard(name)
            for op in self.operations.values():
                if op.server == name and op.status == "InProgress":
                    op.remaining = polls

    def name_held(self, name: str) -> str | None:
        """Azure's message when `name` cannot be given to a new server (None when it is free)."""
        now = datetime.now(timezone.utc)
        taken = any(d["name"].lower() == name.lower() for d in self.servers.values()) or any(
            d["name"].lower() == name.lower() and now - self.dropped_at.get(rid, now) < timedelta(
                days=self.dropped_retention_days) for rid, d in self.dropped.items())
        return (f"Specified server name '{name}' is already used. Please use a different name and try again."
                if taken else None)

    def age_drop(self, name: str, days: float) -> None:
        """Make the drop of server `name` `days` older (its name is free again after the retention)."""
        with self.lock:
            for rid, d in self.dropped.items():
                if d["name"] == name:
                    self.dropped_at[rid] = self.dropped_at.get(rid, datetime.now(timezone.utc)) - timedelta(days=days)

    def finish_everything(self) -> None:
        """Let every running operation succeed at its next poll."""
        with self.lock:
            self.never_finish.clear()
            for op in self.operations.values():
                op.remaining = 0

    # --- hooks for a subclass that backs the servers with real ones (backed_arm.py) ------

    def materialize(self, name: str, mode: str, props: dict[str, Any], doc: dict[str, Any]) -> None:
        """Called when a create/restore/revive operation succeeds, before the server turns Ready."""

    def dematerialize(self, name: str, doc: dict[str, Any]) -> None:
        """Called when a delete operation succeeds, before the server is gone."""

    def on_configuration(self, name: str, parameter: str, value: str) -> None:
        """Called when a configuration PUT succeeds (a backed fake applies it to its cluster)."""

    def on_restart(self, name: str) -> None:
        """Called when a restart (or start) succeeds."""

    # --- data ---------------------------------------------------------------------

    def server_id(self, sub: str, rg: str, name: str) -> str:
        return f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.DBforPostgreSQL/flexibleServers/{name}"

    def add_server(self, sub: str, rg: str, name: str, *, tags: dict[str, str] | None = None, state: str = "Ready",
                   vnet: bool = True, location: str = "uksouth", earliest: datetime | None = None,
                   created: datetime | None = None) -> dict[str, Any]:
        """A server as ARM returns it (2026-10-01 API shape)."""
        now = datetime.now(timezone.utc)
        vnet_id = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/virtualNetworks/{rg}-vnet"
        network: dict[str, Any] = {"publicNetworkAccess": "Disabled",
                                   "delegatedSubnetResourceId": f"{vnet_id}/subnets/postgres",
                                   "privateDnsZoneArmResourceId": (
                                       f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/"
                                       "privateDnsZones/private.postgres.database.azure.com")}
        if not vnet:
            network = {"publicNetworkAccess": "Enabled"}
        doc = {
            "id": self.server_id(sub, rg, name),
            "name": name,
            "type": "Microsoft.DBforPostgreSQL/flexibleServers",
            "location": location,
            "tags": dict(tags or {}),
            "sku": {"name": "Standard_D2ds_v5", "tier": "GeneralPurpose"},
            "systemData": {"createdBy": "someone@example.org", "createdAt": iso(created or now - timedelta(days=30))},
            "properties": {
                "administratorLogin": "dradmin",
                "version": "16",
                "minorVersion": "9",
                "state": state,
                "fullyQualifiedDomainName": f"{name}.private.postgres.database.azure.com" if vnet
                else f"{name}.postgres.database.azure.com",
                "storage": {"storageSizeGB": 128, "autoGrow": "Enabled", "tier": "P10", "type": "Premium_LRS",
                            "iops": 500},
                "backup": {"backupRetentionDays": 7, "geoRedundantBackup": "Enabled",
                           "earliestRestoreDate": iso(earliest or now - timedelta(days=7))},
                "network": network,
                "highAvailability": {"mode": "ZoneRedundant", "state": "Healthy", "standbyAvailabilityZone": "2"},
                "availabilityZone": "1",
                "replicationRole": "Primary",
                "replicaCapacity": 5,
            },
        }
        with self.lock:
            self.servers[doc["id"].lower()] = doc
        return doc

    def server(self, name: str) -> dict[str, Any] | None:
        with self.lock:
            for doc in self.servers.values():
                if doc["name"] == name:
                    return doc
        return None

    def calls(self, method: str, path_contains: str = "") -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.method == method and path_contains.lower() in r.path.lower()]

    def server_calls(self, method: str, name: str) -> list[Recorded]:
        """Requests to exactly the server resource `name` (not its sub-resources)."""
        with self.lock:
            suffix = f"/flexibleservers/{name}".lower()
            return [r for r in self.requests if r.method == method and r.path.lower().endswith(suffix)]

    # --- request handling -----------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str],
               body: Any) -> tuple[int, dict[str, str], Any]:
        with self.lock:
            m = OPERATION_RE.match(path)
            if m and m.group("op") not in self.operations:
                # a poller left running by an earlier test (before reset): answer, but keep it out of the record
                return 404, {}, _error("OperationNotFound", f"operation {m.group('op')} not found")
            self.requests.append(Recorded(method, path, query, headers, body))
            if headers.get("authorization") != f"Bearer {TOKEN}":
                return 401, {}, _error("AuthenticationFailed", "missing or wrong bearer token")
            for f in self.faults:
                if f.times > 0 and f.method == method and f.path_contains.lower() in path.lower():
                    f.times -= 1
                    if f.on_hit:
                        f.on_hit()
                    return f.status, dict(f.headers), f.body
            if "api-version" not in query:
                return 400, {}, _error("MissingApiVersionParameter", "The api-version query parameter is required")
            m = OPERATION_RE.match(path)
            if m and method == "GET":
                return self._poll(m.group("kind"), m.group("op"))
            if method == "GET" and path.lower().endswith("/providers/microsoft.authorization/permissions"):
                return 200, {}, {"value": copy.deepcopy(self.permissions)}
            if NAME_CHECK_RE.match(path) and method == "POST":
                name = (body or {}).get("name", "")
                held = self.name_held(name)
                return 200, {}, {"name": name, "type": (body or {}).get("type"), "nameAvailable": held is None,
                                 "reason": "AlreadyExists" if held else None, "message": held or ""}
            m = DNS_LINKS_RE.match(path)
            if m and method == "GET":
                vnet = (f"/subscriptions/{m.group('sub')}/resourceGroups/{m.group('rg')}/providers/Microsoft.Network/"
                        f"virtualNetworks/{m.group('rg')}-vnet")
                links = self.dns_links if self.dns_links is not None else [
                    {"name": "pg-link", "properties": {"virtualNetwork": {"id": vnet},
                                                       "provisioningState": "Succeeded"}}]
                return 200, {}, {"value": copy.deepcopy(links)}
            m = DIAGNOSTICS_RE.match(path)
            if m and method == "GET":
                return 200, {}, {"value": copy.deepcopy(self.diagnostic_settings.get(m.group("name"), []))}
            m = CHILD_RE.match(path)
            if m:
                return self._child(method, m.group("sub"), m.group("rg"), m.group("name"), m.group("kind").lower(),
                                   m.group("child"), body)
            m = SERVER_RE.match(path)
            if not m:
                return 404, {}, _error("InvalidResourceType", f"no such endpoint {path}")
            sub, rg, name, action = m.group("sub"), m.group("rg"), m.group("name"), m.group("action")
            if name is None:
                if method != "GET":
                    return 405, {}, _error("MethodNotAllowed", method)
                prefix = f"/subscriptions/{sub}/resourcegroups/{rg}/".lower()
                return 200, {}, {"value": [copy.deepcopy(d) for k, d in self.servers.items() if k.startswith(prefix)]}
            rid = self.server_id(sub, rg, name)
            if action:
                return self._action(rid, name, action)
            if method == "GET":
                doc = self.servers.get(rid.lower())
                settle = self.settles.get(name)
                if doc is not None and settle is not None:
                    settle[0] -= 1
                    if settle[0] < 0:
                        doc["properties"]["state"] = settle[1]
                        del self.settles[name]
                if doc is None:
                    return 404, {}, _error("ResourceNotFound", f"The Resource '{PROVIDER}/flexibleServers/{name}' "
                                           f"under resource group '{rg}' was not found.")
                return 200, {}, copy.deepcopy(doc)
            if method == "PUT":
                return self._put(sub, rg, name, rid, body)
            if method == "DELETE":
                return self._delete(sub, name, rid)
            return 405, {}, _error("MethodNotAllowed", method)

    def _start_operation(self, sub: str, location: str, name: str, on_success: Any) -> dict[str, str]:
        op = Operation(uuid.uuid4().hex, self.polls_to_finish, on_success,
                       fail_with=self.fail_operations.pop(name, None), server=name)
        if name in self.never_finish:
            op.remaining = 10**9
        self.operations[op.id] = op
        base = f"{self.url}/subscriptions/{sub}/providers/Microsoft.DBforPostgreSQL/locations/{location}"
        headers = {"Azure-AsyncOperation": f"{base}/azureAsyncOperation/{op.id}?api-version=2026-10-01",
                   "Location": f"{base}/operationResults/{op.id}?api-version=2026-10-01"}
        if self.poll_retry_after is not None:
            headers["Retry-After"] = self.poll_retry_after
        return headers

    def _poll(self, kind: str, op_id: str) -> tuple[int, dict[str, str], Any]:
        op = self.operations.get(op_id)
        if op is None:
            return 404, {}, _error("OperationNotFound", f"operation {op_id} not found")
        if kind.lower() == "operationresults":
            return (202, {}, None) if op.status == "InProgress" else (200, {}, None)
        op.polls += 1
        if op.status == "InProgress":
            if op.remaining > 0:
                op.remaining -= 1
            elif op.fail_with:
                op.status = "Failed"
            else:
                try:
                    op.on_success()
                    op.status = "Succeeded"
                except Exception as exc:  # the backing work failed: the operation fails, as in Azure
                    op.status = "Failed"
                    op.fail_with = {"code": "InternalServerError", "message": f"{type(exc).__name__}: {exc}"}
        doc: dict[str, Any] = {"name": op.id, "status": op.status, "startTime": iso(datetime.now(timezone.utc))}
        if op.status == "Failed" and op.fail_with:
            doc["error"] = op.fail_with
        return 200, ({"Retry-After": self.poll_retry_after} if self.poll_retry_after is not None else {}), doc

    def _put(self, sub: str, rg: str, name: str, rid: str, body: Any) -> tuple[int, dict[str, str], Any]:
        if not isinstance(body, dict) or not body.get("location"):
            return 400, {}, _error("LocationRequired", "The location property is required for this definition.")
        props = body.get("properties") or {}
        mode = props.get("createMode", "Default")
        if rid.lower() in self.servers and mode not in ("Default", "Update"):
            return 409, {}, _error("ServerAlreadyExists", f"Specified server name '{name}' is already used.")
        if rid.lower() in self.servers and (busy := self._busy(rid, name)):
            return busy
        if rid.lower() not in self.servers and (held := self.name_held(name)):
            return 409, {}, _error("ServerAlreadyExists", held)
        subnet = (props.get("network") or {}).get("delegatedSubnetResourceId", "")
        if "missing-subnet" in subnet:
            return 400, {}, _error("SubnetNotFound", f"The subnet '{subnet}' does not exist or is not delegated "
                                   "to Microsoft.DBforPostgreSQL/flexibleServers.")
        template: dict[str, Any] | None = None
        if mode in ("PointInTimeRestore", "GeoRestore", "ReviveDropped"):
            src, when = props.get("sourceServerResourceId"), props.get("pointInTimeUTC")
            if not src or not when:
                return 400, {}, _error("InvalidParameterValue", "sourceServerResourceId and pointInTimeUTC are "
                                       f"required for createMode {mode}.")
            pool = self.dropped if mode == "ReviveDropped" else self.servers
            template = pool.get(src.lower())
            if template is None:
                return 400, {}, _error("InvalidSourceServer", f"The source server '{src}' was not found.")
            if mode == "GeoRestore" and (refused := self._geo_refusal(template, props, body["location"])):
                return refused
        elif mode in ("Create", "Default"):
            if not props.get("administratorLoginPassword") or not body.get("sku"):
                return 400, {}, _error("InvalidParameterValue", "sku and administratorLoginPassword are required.")
        now = datetime.now(timezone.utc)
        doc = self.add_server(sub, rg, name, location=body["location"], state="Provisioning", created=now,
                              earliest=now)
        self.configs[name] = dict(self.configs.get(template["name"], {})) if template is not None else {}
        self.pending_restart[name] = set()
        if template is not None:
            for k in ("sku",):
                doc[k] = copy.deepcopy(template[k])
            for k in ("version", "storage"):
                doc["properties"][k] = copy.deepcopy(template["properties"][k])
            doc["properties"]["highAvailability"] = {"mode": "Disabled", "state": "NotEnabled"}
            doc["properties"]["network"] = {"publicNetworkAccess": "Enabled"}
        else:
            doc["sku"] = body.get("sku", doc["sku"])
            for k in ("version", "storage", "highAvailability", "backup"):
                if k in props:
                    doc["properties"][k] = {**doc["properties"].get(k, {}), **props[k]} if isinstance(props[k], dict) \
                        else props[k]
        if props.get("network"):
            doc["properties"]["network"] = {"publicNetworkAccess": "Disabled", **props["network"]}
        doc["tags"] = dict(body.get("tags") or {})

        def done() -> None:
            self.materialize(name, mode, props, doc)
            doc["properties"]["state"] = "Ready"

        headers = self._start_operation(sub, body["location"], name, done)
        return 202, headers, None

    def _child(self, method: str, sub: str, rg: str, name: str, kind: str, child: str | None,
               body: Any) -> tuple[int, dict[str, str], Any]:
        """A server's firewall rules (and, in subclasses, other sub-resources)."""
        doc = self.servers.get(self.server_id(sub, rg, name).lower())
        if doc is None:
            return 404, {}, _error("ResourceNotFound", f"The Resource '{PROVIDER}/flexibleServers/{name}' under "
                                   f"resource group '{rg}' was not found.")
        if kind != "firewallrules":
            return self._configurations(method, doc, child, body)
        rules = self.firewall.setdefault(name, {})

        def rule(rule_name: str) -> dict[str, Any]:
            return {"id": f"{doc['id']}/firewallRules/{rule_name}", "name": rule_name,
                    "type": "Microsoft.DBforPostgreSQL/flexibleServers/firewallRules",
                    "properties": dict(rules[rule_name])}

        if child is None and method == "GET":
            return 200, {}, {"value": [rule(r) for r in sorted(rules)]}
        if child is None:
            return 405, {}, _error("MethodNotAllowed", method)
        if method == "GET":
            return (200, {}, rule(child)) if child in rules else (404, {}, _error("ResourceNotFound", child))
        if method == "PUT":
            props = (body or {}).get("properties") or {}
            if not props.get("startIpAddress") or not props.get("endIpAddress"):
                return 400, {}, _error("InvalidParameterValue", "startIpAddress and endIpAddress are required.")
            if busy := self._busy(doc["id"], name):
                return busy

            def done() -> None:
                rules[child] = {"startIpAddress": props["startIpAddress"], "endIpAddress": props["endIpAddress"]}

            return 202, self._start_operation(sub, doc["location"], name, done), None
        if method == "DELETE":
            if child not in rules:
                return 204, {}, None
            return 202, self._start_operation(sub, doc["location"], name, lambda: rules.pop(child, None)), None
        return 405, {}, _error("MethodNotAllowed", method)

    def _configurations(self, method: str, doc: dict[str, Any], child: str | None,
                        body: Any) -> tuple[int, dict[str, str], Any]:
        name = doc["name"]
        values = self.configs.setdefault(name, {})
        pending = self.pending_restart.setdefault(name, set())

        def config(parameter: str) -> dict[str, Any]:
            default, kind, allowed, dynamic, read_only = PARAMETERS[parameter]
            value = values.get(parameter, default)
            source = "user-override" if parameter in values or read_only else "system-default"
            return {"id": f"{doc['id']}/configurations/{parameter}", "name": parameter,
                    "type": "Microsoft.DBforPostgreSQL/flexibleServers/configurations",
                    "properties": {"value": value, "defaultValue": default, "dataType": kind, "allowedValues": allowed,
                                   "source": source, "isDynamicConfig": dynamic, "isReadOnly": read_only,
                                   "isConfigPendingRestart": parameter in pending,
                                   "description": f"{parameter} (modelled by the fake)"}}

        if child is None:
            if method != "GET":
                return 405, {}, _error("MethodNotAllowed", method)
            return 200, {}, {"value": [config(p) for p in sorted(PARAMETERS)]}
        if child not in PARAMETERS:
            return 404, {}, _error("ResourceNotFound", f"The configuration '{child}' does not exist for server "
                                   f"'{name}'.")
        if method == "GET":
            return 200, {}, config(child)
        if method not in ("PUT", "PATCH"):
            return 405, {}, _error("MethodNotAllowed", method)
        value = str(((body or {}).get("properties") or {}).get("value", ""))
        default, kind, allowed, dynamic, read_only = PARAMETERS[child]
        invalid = _error("InvalidParameterValue", f"Invalid value given for parameter '{child}'. Specify a valid "
                         "parameter value.")
        if read_only:
            return 400, {}, _error("ReadOnlyConfiguration", f"The parameter '{child}' is read-only.")
        if kind == "Set":
            offered = {a.strip().lower() for a in allowed.split(",")}
            if any(v.strip().lower() not in offered for v in value.split(",") if v.strip()):
                return 400, {}, invalid
        elif kind == "Integer":
            low, high = (int(x) for x in re.fullmatch(r"(-?\d+)-(-?\d+)", allowed).groups())  # type: ignore[union-attr]
            if not re.fullmatch(r"-?\d+", value) or not low <= int(value) <= high:
                return 400, {}, invalid
        if busy := self._busy(doc["id"], name):
            return busy
        sub = doc["id"].split("/")[2]

        def done() -> None:
            values[child] = value
            if not dynamic:
                pending.add(child)
            self.on_configuration(name, child, value)

        return 202, self._start_operation(sub, doc["location"], name, done), None

    @staticmethod
    def _geo_refusal(source: dict[str, Any], props: dict[str, Any], location: str) -> tuple[int, dict[str, str], Any] | None:
        """Why Azure refuses a geo-restore of `source` with these properties (None: it accepts it)."""
        name = source["name"]
        if (source["properties"].get("backup") or {}).get("geoRedundantBackup") != "Enabled":
            return 400, {}, _error("GeoRestoreNotSupported", f"Geo-restore is not possible: server '{name}' was "
                                   "created without geo-redundant backup (backup.geoRedundantBackup is not Enabled).")
        if (source["properties"].get("network") or {}).get("delegatedSubnetResourceId"):
            net = props.get("network") or {}
            if not (net.get("delegatedSubnetResourceId") and net.get("privateDnsZoneArmResourceId")):
                return 400, {}, _error("InvalidParameterValue", f"Server '{name}' uses private access: a geo-restore "
                                       f"needs a delegated subnet and a private DNS zone for the new server in "
                                       f"region '{location}'.")
        return None

    def _busy(self, rid: str, name: str) -> tuple[int, dict[str, str], Any] | None:
        """Azure's refusal of an operation on a server that is in the middle of another one."""
        doc = self.servers.get(rid.lower())
        if doc is not None and doc["properties"]["state"] in BUSY_STATES:
            return 409, {}, _error("ServerIsBusy", f"Cannot complete operation while server '{name}' is busy "
                                   "processing another operation. Try again later.")
        return None

    def _delete(self, sub: str, name: str, rid: str) -> tuple[int, dict[str, str], Any]:
        doc = self.servers.get(rid.lower())
        if doc is None:
            if self.delete_missing_status == 204:
                return 204, {}, None
            return 404, {}, _error("ResourceNotFound",
                                   f"The Resource '{PROVIDER}/flexibleServers/{name}' was not found.")
        if busy := self._busy(rid, name):
            return busy
        doc["properties"]["state"] = "Dropping"

        def done() -> None:
            self.dematerialize(name, doc)
            self.servers.pop(rid.lower(), None)
            self.dropped[rid.lower()] = doc
            self.dropped_at[rid.lower()] = datetime.now(timezone.utc)

        return 202, self._start_operation(sub, doc["location"], name, done), None

    def _action(self, rid: str, name: str, action: str) -> tuple[int, dict[str, str], Any]:
        doc = self.servers.get(rid.lower())
        if doc is None:
            return 404, {}, _error("ResourceNotFound", f"server {name} not found")
        if busy := self._busy(rid, name):
            return busy
        doc["properties"]["state"] = {"start": "Starting", "stop": "Stopping", "restart": "Restarting"}[action]

        def done() -> None:
            if action in ("start", "restart"):
                self.pending_restart[name] = set()
                self.on_restart(name)
            doc["properties"]["state"] = "Ready" if action in ("start", "restart") else "Stopped"

        sub = rid.split("/")[2]
        return 202, self._start_operation(sub, doc["location"], name, done), None


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    arm: FakeArm

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The `Date` header, on the fake Azure's clock."""
        import email.utils
        import time as _time

        when = (timestamp if timestamp is not None else _time.time()) + self.arm.clock_skew.total_seconds()
        return email.utils.formatdate(when, usegmt=True)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        parts = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, out_headers, out = self.arm.handle(self.command, parts.path, parse_qs(parts.query), headers, body)
        payload = b"" if out is None else json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("x-ms-request-id", uuid.uuid4().hex)
        for k, v in out_headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    do_GET = do_PUT = do_DELETE = do_POST = do_PATCH = _serve
