"""The DR readiness board: one row per service environment, and why it is green, amber or red.

Everything is read from where it lives; nothing is stored by us:

- the backup stores: the newest complete nightly backup of each environment (one listing per
  store: each environment has a store of its own);
- the servers: one `list_servers` per platform scope (a local state directory, an Azure
  resource group) gives each live server's state and the PTR servers left behind; one query
  per live server lists the replaced and half-restored databases (`<db>_replaced_<time>`);
- Prefect's API, one paginated query per kind of fact for the whole fleet (not per
  environment): the nightly, verify and drill runs of a recent window, sorted newest first;
  the open runs (Running, Paused, Pending, Cancelling); the latest drill and verify artifacts.
  Runs are matched to environments by their `service`/`environment` parameters; `--service`
  narrows the run queries by tag (runs of these flows carry their service and environment tags).

Stores, servers and Prefect are read at the same time (a thread pool), so the board costs
about its slowest source, not their sum.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from dr.config import DrConfig, Target
from dr.errors import ConfigError

GREEN, AMBER, RED = "green", "amber", "red"
_RANK = {GREEN: 0, AMBER: 1, RED: 2}
#: the scheduled flows the board reads; every other open run naming an environment is a recovery
NIGHTLY, VERIFY, DRILL = "nightly-backup", "verify-backup", "dr-drill"
ROUTINE_FLOWS = (NIGHTLY, VERIFY, DRILL, "fleet-check", "validate-service", "backup-database")
OPEN_STATES = ("RUNNING", "PAUSED", "PENDING", "CANCELLING")
PAGE = 200
#: how far back the nightly runs are read: the newest final one is all the board needs (an older
#: failure is covered by the backup's age against the RPO)
NIGHTLY_DAYS = 1.1
#: what a paused run waits for, from its pause key (flows/approval.py)
PAUSE_KEYS = {"restore-time": "the restore time", "recovery-choice": "the choice: revive or recreate"}
_STAMP = re.compile(r"_(\d{14})(?:_\d+)?$")  # <db>_replaced_<YYYYmmddHHMMSS>[_n], as tasks/tidy.py reads it


@dataclass
class Finding:
    """One reason for a row's colour; `alert` is the stable key fleet-check notifies it under."""

    level: str
    text: str
    alert: str | None = None


@dataclass
class Row:
    service: str
    environment: str
    production: bool
    status: str = GREEN
    reason: str = ""
    findings: list[Finding] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)
    backup: dict[str, Any] | None = None
    nightly_run: dict[str, Any] | None = None
    verify: dict[str, Any] | None = None
    drill: dict[str, Any] | None = None
    drill_scheduled: bool = False
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    leftovers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.service}-{self.environment}"

    def add(self, level: str, text: str, alert: str | None = None) -> None:
        self.findings.append(Finding(level, text, alert))


@dataclass
class Board:
    built_at: datetime
    seconds: float
    rows: list[Row]
    #: requests made per kind of fact (the board's cost does not grow with environments but for stores/servers)
    requests: dict[str, int] = field(default_factory=dict)
    #: the slowest read of each source, in seconds (they run at the same time)
    sources: dict[str, float] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = {GREEN: 0, AMBER: 0, RED: 0}
        for r in self.rows:
            out[r.status] += 1
        return out

    def row(self, service: str, environment: str) -> Row:
        for r in self.rows:
            if r.service == service and r.environment == environment:
                return r
        raise KeyError(f"{service} {environment}")

    def summary(self) -> str:
        c = self.counts()
        return (f"DR readiness at {self.built_at:%Y-%m-%d %H:%M} UTC: {len(self.rows)} environments, "
                f"{c[GREEN]} green, {c[AMBER]} amber, {c[RED]} red")

    def to_json(self) -> dict[str, Any]:
        return {"built_at": self.built_at.isoformat(), "seconds": round(self.seconds, 3), "summary": self.counts(),
                "environments": [{**asdict(r), "findings": [asdict(f) for f in r.findings]} for r in self.rows]}

    def table_rows(self) -> list[list[str]]:
        """One line per environment for a person: status, backup age vs RPO, verify, drill, open, leftovers, why."""
        out = []
        for r in self.rows:
            why = "; ".join(_short(f.text) for f in r.findings) or r.reason  # in full: --json
            out.append([r.service, r.environment, r.status.upper(), _backup_cell(r), _verify_cell(r), _drill_cell(r),
                        _recoveries_cell(r), _leftovers_cell(r), why])
        return out

    HEADERS = ["service", "environment", "status", "last backup (age / RPO)", "verified restore",
               "last drill (RTO / RPO)", "open recoveries", "leftovers", "why"]

    def markdown(self) -> str:
        def cell(v: str) -> str:
            return v.replace("|", "\\|").replace("\n", " ")

        lines = ["# DR readiness", "", self.summary() + f" (built in {self.seconds:.2f} s)", "",
                 "| " + " | ".join(self.HEADERS) + " |", "|" + "---|" * len(self.HEADERS)]
        for r in self.table_rows():
            lines.append("| " + " | ".join(cell(v) for v in r) + " |")
        links = [(r, x) for r in self.rows for x in r.recoveries]
        if links:
            lines += ["", "## Open recoveries", ""]
            lines += [f"- {r.service} {r.environment}: [{x['flow']} {x['run']}]({x['link']}) {x['state']}, "
                      f"{x['waiting_for']}" for r, x in links]
        return "\n".join(lines)


# --- formatting ---------------------------------------------------------------------------------------------


def age_text(seconds: float) -> str:
    """45 s, 12 min, 3.5 h, 4.2 d."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _short(text: str, width: int = 110) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _when(t: str | datetime | None) -> str:
    if t is None:
        return "—"
    t = datetime.fromisoformat(t) if isinstance(t, str) else t
    return f"{t:%Y-%m-%d %H:%M} UTC"


def _backup_cell(r: Row) -> str:
    b = r.backup
    if not b:
        return "none"
    return f"{_when(b['finished_at'])} ({age_text(b['age_seconds'])} / {age_text(b['rpo_seconds'])})"


def _verify_cell(r: Row) -> str:
    v = r.verify
    return "none" if not v else f"{_when(v['at'])} {v['result']}"


def _drill_cell(r: Row) -> str:
    d = r.drill
    if not d:
        return "none" if r.drill_scheduled else "not scheduled"
    times = ""
    if d.get("rto_seconds") is not None:
        times = (f" ({age_text(d['rto_seconds'])} / "
                 f"{age_text(d['rpo_seconds']) if d.get('rpo_seconds') is not None else '—'})")
    return f"{_when(d['at'])} {d['result']}{times}"


def _recoveries_cell(r: Row) -> str:
    return "; ".join(f"{x['flow']} {x['run']} {x['state']}: {x['waiting_for']}" for x in r.recoveries) or "—"


def _leftovers_cell(r: Row) -> str:
    return "; ".join(f"{x['kind']} {x['name']} ({age_text(x['age_seconds'])})" for x in r.leftovers) or "—"


# --- facts -------------------------------------------------------------------------------------------------


@dataclass
class Facts:
    """Everything read, keyed by environment (`<service>-<environment>`) where it belongs to one."""

    backups: dict[str, Any] = field(default_factory=dict)           # key -> BackupInfo | None | Exception
    servers: dict[tuple, Any] = field(default_factory=dict)         # scope -> list[ServerInfo] | Exception
    databases: dict[tuple, Any] = field(default_factory=dict)       # (scope, server) -> [(name, comment)] | Exception
    nightly: dict[str, list[Any]] = field(default_factory=dict)     # key -> runs, newest first
    verify: dict[str, list[Any]] = field(default_factory=dict)
    drills: dict[str, list[Any]] = field(default_factory=dict)
    open_runs: dict[str, list[Any]] = field(default_factory=dict)
    flow_names: dict[Any, str] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)         # key -> latest artifact
    requests: dict[str, int] = field(default_factory=dict)
    #: wall time of each source (they are read at the same time)
    seconds: dict[str, float] = field(default_factory=dict)


def _timed(into: dict[str, float], what: str, fn: Callable[..., Any], *args: Any) -> Any:
    started = time.monotonic()
    try:
        return fn(*args)
    finally:
        into[what] = max(into.get(what, 0.0), time.monotonic() - started)


def env_key(target: Target) -> str:
    """`<service>-<environment>`: how runs (by their parameters) and rows are matched."""
    return f"{target.service}-{target.environment}"


def _scope(target: Target) -> tuple:
    """Which `list_servers` call sees a target's servers."""
    if target.platform == "azure":
        return ("azure", target.subscription_id, target.resource_group)
    return ("local",)


def _submit(pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Future:
    """Run in the pool with this thread's context (the Prefect settings of a run or a test)."""
    return pool.submit(contextvars.copy_context().run, fn, *args)


def _latest_nightly(platform: Any) -> Any:
    from dr.errors import BackupNotFound
    from dr.restore import latest_complete_backup

    try:
        return latest_complete_backup(platform.store, kinds=("nightly",))
    except BackupNotFound:
        return None


def _databases(servers: Any, server: str) -> list[tuple[str, str]]:
    from dr.database import connect

    with connect(servers.connection(server, "postgres")) as c:
        return c.execute(
            "SELECT datname, coalesce(shobj_description(oid, 'pg_database'), '') FROM pg_database "
            r"WHERE datname LIKE '%\_replaced\_%' OR datname LIKE '%\_restore\_%'").fetchall()


def _key(params: dict[str, Any]) -> str | None:
    s, e = params.get("service"), params.get("environment")
    return f"{s}-{e}" if isinstance(s, str) and isinstance(e, str) else None


async def _paged(read: Any, ahead: int = 2, **kw: Any) -> list[Any]:
    """Every page of a query: the first, then `ahead` pages at a time while they come back full."""
    out = await read(limit=PAGE, offset=0, **kw)
    while len(out) % PAGE == 0 and out:
        pages = await asyncio.gather(*(read(limit=PAGE, offset=len(out) + i * PAGE, **kw) for i in range(ahead)))
        for page in pages:
            out += page
            if len(page) < PAGE:
                return out
    return out


async def _prefect_facts(config: DrConfig, targets: list[Target], now: datetime, service: str | None) -> Facts:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactCollectionFilter,
        ArtifactCollectionFilterKey,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterParentTaskRunId,
        FlowRunFilterStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    fc = config.fleet
    facts = Facts()
    tags = FlowRunFilterTags(all_=[service]) if service else None

    def runs_of(flow: str, days: float) -> Any:
        return _paged(client.read_flow_runs, sort=FlowRunSort.START_TIME_DESC,
                      flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                      flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=now - timedelta(days=days)),
                                                    tags=tags))

    keys = [f"{kind}-{t.service}-{t.environment}" for t in targets for kind in ("drill", "verify")]
    async with get_client() as client:
        nightly, verify, drills, open_runs, artifacts, flows = await asyncio.gather(
            runs_of(NIGHTLY, NIGHTLY_DAYS), runs_of(VERIFY, fc.verify_max_days + 1), runs_of(DRILL, fc.drill_max_days + 7),
            _paged(client.read_flow_runs, flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in OPEN_STATES])),
                parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True))),
            _paged(client.read_latest_artifacts, artifact_filter=ArtifactCollectionFilter(
                key=ArtifactCollectionFilterKey(any_=keys))),
            _paged(client.read_flows),
        )
    facts.flow_names = {f.id: f.name for f in flows}
    for runs, into in ((nightly, facts.nightly), (verify, facts.verify), (drills, facts.drills)):
        for r in runs:
            k = _key(r.parameters or {})
            if k:
                into.setdefault(k, []).append(r)
    for r in open_runs:
        k = _key(r.parameters or {})
        if k and facts.flow_names.get(r.flow_id) not in ROUTINE_FLOWS:
            facts.open_runs.setdefault(k, []).append(r)
    facts.artifacts = {a.key: a for a in artifacts}
    facts.requests = {"prefect: nightly runs": 1, "prefect: verify runs": 1, "prefect: drill runs": 1,
                      "prefect: open runs": 1, "prefect: artifacts": 1, "prefect: flow names": 1}
    return facts


def gather(config: DrConfig, targets: list[Target], now: datetime, service: str | None = None) -> Facts:
    """Read every fact the board needs: stores, servers and Prefect at the same time."""
    from dr.platforms import get_platform

    platforms = {env_key(t): get_platform(config, t) for t in targets}
    scopes: dict[tuple, Any] = {}
    for t in targets:
        scopes.setdefault(_scope(t), platforms[env_key(t)].servers)
    took: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=16) as pool:
        prefect_f = _submit(pool, _timed, took, "prefect",
                            lambda: asyncio.run(_prefect_facts(config, targets, now, service)))
        backup_fs = {env_key(t): _submit(pool, _timed, took, "stores", _latest_nightly, platforms[env_key(t)])
                     for t in targets}
        server_fs = {s: _submit(pool, _timed, took, "servers", srv.list_servers) for s, srv in scopes.items()}
        servers: dict[tuple, Any] = {}
        for s, f in server_fs.items():
            try:
                servers[s] = f.result()
            except Exception as exc:  # noqa: BLE001 - shown on the rows of that scope
                servers[s] = exc
        db_fs = {}
        for t in targets:
            listed = servers[_scope(t)]
            live = [x for x in listed if x.name == t.server] if isinstance(listed, list) else []
            at = (_scope(t), t.server)
            if live and live[0].state == "Ready" and at not in db_fs:
                db_fs[at] = _submit(pool, _timed, took, "databases", _databases, scopes[_scope(t)], t.server)
        try:
            facts = prefect_f.result()
        except Exception as exc:  # noqa: BLE001 - said once, clearly, instead of a traceback
            from dr.errors import DrError

            raise DrError(f"cannot read the runs from the Prefect API ({ui_base() or 'not configured'}): "
                          f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        facts.servers = servers
        for k, f in backup_fs.items():
            try:
                facts.backups[k] = f.result()
            except Exception as exc:  # noqa: BLE001
                facts.backups[k] = exc
        for at, f in db_fs.items():
            try:
                facts.databases[at] = f.result()
            except Exception as exc:  # noqa: BLE001
                facts.databases[at] = exc
    facts.requests.update({"stores": len(backup_fs), "server listings": len(server_fs), "database listings": len(db_fs)})
    facts.seconds = took
    return facts


# --- rules -------------------------------------------------------------------------------------------------


def _state(run: Any) -> str:
    return run.state.type.value if run.state else "UNKNOWN"


def _final(runs: list[Any]) -> Any:
    """The newest run that ended (Cancelled runs do not count: they proved nothing)."""
    for r in runs:
        if _state(r) in ("COMPLETED", "FAILED", "CRASHED"):
            return r
    return None


def _message(run: Any) -> str:
    msg = (run.state.message or "") if run.state else ""
    msg = msg.removeprefix("Flow run encountered an exception: ")  # Prefect's words around every failure
    return msg.splitlines()[0][:240] if msg else (run.state.name if run.state else "")


def _at(run: Any) -> datetime:
    return run.end_time or run.start_time or run.expected_start_time


def ui_link(run_id: Any, base: str | None) -> str:
    return f"{base.rstrip('/')}/runs/flow-run/{run_id}" if base else f"flow run {run_id}"


def _waiting_for(run: Any) -> str:
    state = _state(run)
    if state == "PAUSED":
        key = (run.state.state_details.pause_key or "") if run.state else ""
        base = re.sub(r"-\d+$", "", key)
        return "waiting for " + PAUSE_KEYS.get(base, f"approval: {base.replace('-', ' ')}" if base else "a person")
    if state == "PENDING":
        return "waiting for a worker to start it"
    if state == "CANCELLING":
        return "being cancelled"
    return "running"


def _drill_times(artifact: Any) -> tuple[float | None, float | None]:
    """The worst RTO and RPO over the drill's scenarios, from its table artifact (flows/drill.py writes `18 s`)."""
    import json

    data = artifact.data
    rows = json.loads(data) if isinstance(data, str) else data
    rto = rpo = None
    for row in rows if isinstance(rows, list) else []:
        for col, cur in (("RTO", "rto"), ("RPO", "rpo")):
            m = re.fullmatch(r"([\d.]+) s", str(row.get(col, "")))
            if m:
                v = float(m.group(1))
                if cur == "rto":
                    rto = v if rto is None else max(rto, v)
                else:
                    rpo = v if rpo is None else max(rpo, v)
    return rto, rpo


def evaluate(config: DrConfig, t: Target, facts: Facts, now: datetime, ui: str | None) -> Row:
    """One environment's row from the facts: what holds, and its colour with the reasons in words."""
    fc = config.fleet
    row = Row(t.service, t.environment, t.production, drill_scheduled=t.drill)
    k = env_key(t)

    # the live server and what recoveries left on it
    listed = facts.servers.get(_scope(t))
    if isinstance(listed, Exception):
        row.server = {"name": t.server, "state": "unknown"}
        row.add(RED, f"cannot list the servers: {str(listed)[:200]}", f"server-down:{k}")
    else:
        live = next((s for s in listed or [] if s.name == t.server), None)
        row.server = {"name": t.server, "state": live.state if live else "missing"}
        if live is None:
            row.add(RED, f"live server {t.server} does not exist", f"server-down:{k}")
        elif live.state != "Ready":
            row.add(RED, f"live server {t.server} is {live.state}", f"server-down:{k}")
        from dr.platforms.base import TAG_PURPOSE, TAG_SOURCE

        for s in listed or []:
            if s.created_by_us and s.tags.get(TAG_SOURCE) == t.server and "restore" in s.tags.get(TAG_PURPOSE, ""):
                row.leftovers.append({"kind": "PTR server", "name": s.name,
                                      "age_seconds": (now - s.created_at).total_seconds()})
    dbs = facts.databases.get((_scope(t), t.server))
    if isinstance(dbs, Exception):
        row.add(RED, f"cannot connect to live server {t.server}: {str(dbs).splitlines()[0][:200]}", f"server-down:{k}")
    else:
        from dr.database import REPLACED_COMMENT

        for name, comment in dbs or []:
            m = _STAMP.search(name)
            if not m or not name.startswith(t.database[:40]):
                continue
            kind = ("replaced database" if "_replaced_" in name and comment.startswith(REPLACED_COMMENT) else
                    "half-restored database" if "_restore_" in name and comment.startswith("dr: restoring ") else None)
            if kind:
                made = datetime.strptime(m.group(1), "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
                row.leftovers.append({"kind": kind, "name": name, "age_seconds": (now - made).total_seconds()})
    for x in row.leftovers:
        if x["age_seconds"] > fc.leftover_max_hours * 3600:
            row.add(AMBER, f"{x['kind']} {x['name']} left for {age_text(x['age_seconds'])} "
                           f"(over {fc.leftover_max_hours:g} h): run tidy-up", f"leftover:{k}:{x['name']}")

    # the newest complete nightly backup, against the RPO
    backup = facts.backups.get(k)
    rpo = t.rpo_minutes * 60
    if isinstance(backup, Exception):
        row.add(RED, f"cannot read the backup store: {str(backup).splitlines()[0][:200]}", f"backup-missing:{k}")
    elif backup is None:
        row.add(RED, "no complete nightly backup in the store", f"backup-missing:{k}")
    else:
        done = backup.finished_at or backup.created_at
        age = (now - done).total_seconds()
        row.backup = {"name": backup.name, "finished_at": done.isoformat(), "age_seconds": age, "rpo_seconds": rpo}
        if age > rpo:
            row.add(RED, f"last complete backup {backup.name} is {age_text(age)} old, over the RPO of {age_text(rpo)}",
                    f"backup-stale:{k}")
    nightly = _final(facts.nightly.get(k, []))
    if nightly is not None:
        row.nightly_run = {"state": _state(nightly), "at": _at(nightly).isoformat(), "message": _message(nightly),
                           "link": ui_link(nightly.id, ui)}
        done_at = datetime.fromisoformat(row.backup["finished_at"]) if row.backup else None
        if _state(nightly) != "COMPLETED" and (done_at is None or _at(nightly) > done_at):
            row.add(RED, f"nightly backup {_state(nightly)} at {_when(_at(nightly))}: {_message(nightly)}",
                    f"backup-failed:{k}")

    # the weekly verify
    verify = _final(facts.verify.get(k, []))
    if verify is not None:
        art = facts.artifacts.get(f"verify-{t.service}-{t.environment}")
        row.verify = {"at": _at(verify).isoformat(), "result": "PASS" if _state(verify) == "COMPLETED" else "FAIL",
                      "backup": (art.description or "") if art is not None and art.flow_run_id == verify.id else "",
                      "message": _message(verify), "link": ui_link(verify.id, ui)}
        if _state(verify) != "COMPLETED":
            row.add(RED, f"last verify FAILED at {_when(_at(verify))}: {_message(verify)}", f"verify-failed:{k}")
        elif (now - _at(verify)).total_seconds() > fc.verify_max_days * 86400:
            row.add(AMBER, f"last verified restore {age_text((now - _at(verify)).total_seconds())} ago "
                           f"(over {fc.verify_max_days:g} d)")
    else:
        row.add(AMBER, f"no verified restore in the last {fc.verify_max_days + 1:g} days")

    # the monthly drill
    drill = _final(facts.drills.get(k, []))
    if drill is not None:
        art = facts.artifacts.get(f"drill-{t.service}-{t.environment}")
        rto, rpo_s = _drill_times(art) if art is not None and art.flow_run_id == drill.id else (None, None)
        row.drill = {"at": _at(drill).isoformat(), "result": "PASS" if _state(drill) == "COMPLETED" else "FAIL",
                     "rto_seconds": rto, "rpo_seconds": rpo_s, "rto_objective_seconds": t.rto_minutes * 60,
                     "rpo_objective_seconds": rpo, "message": _message(drill), "link": ui_link(drill.id, ui)}
        age = (now - _at(drill)).total_seconds()
        if _state(drill) != "COMPLETED":
            row.add(RED, f"last drill FAILED at {_when(_at(drill))}: {_message(drill)}", f"drill-failed:{k}")
        elif t.drill and age > fc.drill_max_days * 86400:
            row.add(AMBER, f"drill overdue: the last one was {age_text(age)} ago (over {fc.drill_max_days:g} d)",
                    f"drill-overdue:{k}")
        if rto is not None and rto > t.rto_minutes * 60:
            row.add(AMBER, f"drill RTO {age_text(rto)} over the objective {age_text(t.rto_minutes * 60)}")
        if rpo_s is not None and rpo_s > rpo:
            row.add(AMBER, f"drill RPO {age_text(rpo_s)} over the objective {age_text(rpo)}")
    elif t.drill:
        row.add(AMBER, f"drill overdue: none in the last {fc.drill_max_days + 7:g} days", f"drill-overdue:{k}")

    # open recoveries: what they wait for, and a link
    for run in facts.open_runs.get(k, []):
        since = run.state.timestamp if run.state else now
        waited = (now - since).total_seconds()
        rec = {"flow": facts.flow_names.get(run.flow_id, "?"), "run": run.name, "id": str(run.id),
               "state": run.state.name if run.state else "?", "waiting_for": _waiting_for(run),
               "since": since.isoformat(), "link": ui_link(run.id, ui)}
        row.recoveries.append(rec)
        timeout = ((run.parameters or {}).get("approval_timeout_minutes") or t.approval_timeout_minutes) * 60
        if _state(run) == "PAUSED" and waited > timeout:
            row.add(RED, f"{rec['flow']} run {run.name} has been {rec['waiting_for']} for {age_text(waited)} "
                         f"(approval timeout {age_text(timeout)}): {rec['link']}", f"recovery-waiting:{run.id}")
        else:
            waiting = "" if rec["waiting_for"] == "running" else f", {rec['waiting_for']}"
            row.add(AMBER, f"recovery in progress: {rec['flow']} run {run.name} {rec['state']}{waiting} "
                           f"since {_when(since)}")

    row.findings.sort(key=lambda f: -_RANK[f.level])
    row.status = row.findings[0].level if row.findings else GREEN
    if row.findings:
        row.reason = "; ".join(f.text for f in row.findings)
    else:
        parts = [f"backup {age_text(row.backup['age_seconds'])} old (RPO {age_text(rpo)})" if row.backup else ""]
        if row.verify:
            parts.append(f"restore verified {_when(row.verify['at'])}")
        if row.drill:
            parts.append(f"drilled {_when(row.drill['at'])}")
        elif not t.drill:
            parts.append("no drill scheduled" + (" (production)" if t.production else ""))
        row.reason = "protected: " + "; ".join(p for p in parts if p)
    return row


def ui_base() -> str | None:
    """The Prefect UI's address (PREFECT_UI_URL, by default the API's without /api)."""
    try:
        from prefect.settings import PREFECT_UI_URL

        return PREFECT_UI_URL.value()
    except Exception:  # noqa: BLE001
        return None


def build_board(config: DrConfig, *, service: str | None = None, now: datetime | None = None) -> Board:
    """The board of the whole fleet, or of one service.

    Args:
        config: the configuration (every configured environment gets a row).
        service: only this service's environments.
        now: the time the ages are measured to (default: now).

    Raises:
        ConfigError: `service` is not configured.
    """
    started = time.monotonic()
    now = now or datetime.now(timezone.utc)
    if service is not None and service not in config.services:
        raise ConfigError(f"unknown service '{service}'; configured: {', '.join(sorted(config.services))}",
                          field="service", source=config.source)
    targets = [t for t in config.targets() if service is None or t.service == service]
    facts = gather(config, targets, now, service)
    ui = ui_base()
    rows = [evaluate(config, t, facts, now, ui) for t in targets]
    return Board(now, time.monotonic() - started, rows, facts.requests, facts.seconds)
