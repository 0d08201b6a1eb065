#!/usr/bin/env python
"""The kill -9 soak: a data-loss recovery killed at a random moment of one of its phases, then resumed.

A benchmark-style run, not a test (`tests/faults/test_chaos.py` runs a short version in CI):

    .venv/bin/python bench/chaos.py                       # 50 rounds, walking every phase in turn
    .venv/bin/python bench/chaos.py --rounds 10 --order random --size 50mb --seed 7
    .venv/bin/python bench/chaos.py --rounds 0 --load     # only the concurrent load
    .venv/bin/python bench/chaos.py --from-json out.json  # print an earlier run's table again

It makes a local platform in a work directory (a PostgreSQL server with WAL archiving and the
sample database at `--size`, plus large objects; the backup store; the app with its maintenance
page) and a Prefect server of its own (`prefect server start --no-services`). Every round:

1. takes a base backup (as Azure does daily, so that a point-in-time restore replays one round's
   WAL), records the live database as the *new set* (what the recovery must bring back: row
   checksums of every table, sequences, large objects), waits a second, notes the restore time
   T, waits a second, damages the data (deletes, updates, inserts, sequence values, large
   objects) and records that as the *old set*;
2. starts `dr data-loss --time T --incident chaos-<n> --auto-approve` as a user would, in a
   process group of its own, and watches it from outside: its log (the `step:` lines), its
   process group (`pg_dump`), the PTR server's directory, the app's record, and on the live
   server `pg_stat_activity`, `pg_stat_progress_copy`, `pg_stat_progress_create_index` and
   `pg_database.datallowconn`. Once the round's phase is seen, the whole group is frozen
   (SIGSTOP) and let run in 20-ms slices until a random moment inside the phase (uniform over
   the phase's length measured in the calibration run), checked to be still inside, and then
   SIGKILLed as a whole (`kill -9 -<pgid>`): the CLI, the flow and its pg_dump/pg_restore/psql
   children. A phase that ended within the last slice is counted as a miss (and the kill
   still lands, in whatever came next);
3. checks the invariants at once: (live) the live database answers and holds exactly the old or
   exactly the new set; (store) every backup stored before the round is byte-for-byte as it was,
   and every backup listed as complete matches its recorded sha256 and size; (users) what users
   got from the main URL all round long (polled every 100 ms): the maintenance page, or the app
   serving the old or the new set's row counts, never any other data; the router's "no app
   replica" page counts apart, as "error page";
4. counts whether the killed run left its recovery slot taken (once no process of the run is
   left); nothing frees it by hand: the resume must find the holder provably dead (its process
   on this host is gone) and free it at once, and says so in its log;
5. resumes with the same command and incident id, and checks the final state: the new set
   exactly, the app out of maintenance with its replicas, one complete safety backup and one
   complete PTR backup of the incident, nothing stored before changed;
6. runs `dr tidy-up` and counts what is left: the incident's PTR server, `_restore_`/`_replaced_`
   databases, holds and staging files in the store, spool directories, passfiles in the runs'
   temporary directory, the recovery slot, recorded replica counts. What is left is then cleared
   by the soak (so that rounds stay independent) and reported.

A round's logs (the run, the resume, the tidy-up, what was observed) are kept under
`<workdir>/failed-rounds/` when anything in it failed. `--load` runs, at once, two recoveries of
different environments, a nightly backup of a third and 200 alert POSTs (valid, duplicate,
unauthenticated, oversized) against `dr alerts`, and checks each outcome.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402

from dr.platforms.base import TAG_INCIDENT  # noqa: E402
from dr.platforms.local.store import META_SUFFIX  # noqa: E402
from dr.platforms.holds import running_since  # noqa: E402
from dr.runtime import Ref  # noqa: E402
from flows.ptr import ptr_server_name  # noqa: E402
from tests.faults.harness import db_state  # noqa: E402
from tests.processes import env_without_prefect, free_port  # noqa: E402

#: every phase of a data-loss recovery the soak kills in, in the order a run goes through them
PHASES = ("maintenance-on", "backup", "ptr-create", "ptr-backup", "row-load", "index-build", "manifest-check",
          "swap", "maintenance-off", "tidy-up")
#: one round per main phase: the short version CI runs
CI_PHASES = ("backup", "ptr-create", "ptr-backup", "row-load", "swap", "maintenance-on")
LABELS = {
    "maintenance-on": "stop the app, maintenance on",
    "backup": "safety backup streaming",
    "ptr-create": "PTR server being created",
    "ptr-backup": "PTR backup",
    "row-load": "restore: row load",
    "index-build": "restore: index build",
    "manifest-check": "restore: manifest check",
    "swap": "restore: swap",
    "maintenance-off": "maintenance off",
    "tidy-up": "tidy-up (PTR server deleted)",
}
INVARIANTS = ("live", "store", "users")
#: the `step:` lines of the data-loss flow's timeline (flows/data_loss.py)
STEP = {
    "maintenance-on": "stop the app and enable maintenance",
    "backup": "safety backup of the flawed database",
    "ptr-create": "point-in-time restore to a new server",
    "ptr-backup": "back up the PTR server to the store",
    "restore": "restore into the live server",
    "maintenance-off": "disable maintenance",
    "tidy-up": "tidy up: delete the PTR server",
}
SLICE = 0.02  # seconds a frozen run is let go at a time on its way to the chosen moment
#: phases the server works through while the run only waits: killed the moment they are seen
SERVER_SIDE = ("index-build",)
SETTLE = 0.005  # seconds after freezing a run before its state is read (a statement it sent is still arriving)
#: phase lengths (s) assumed without a calibration run (the short CI version): kills land early in each phase
DEFAULT_ESTIMATES = {p: 0.05 for p in PHASES} | {"backup": 0.01, "ptr-backup": 0.01, "manifest-check": 0.01,
                                                  "swap": 0.003, "ptr-create": 0.5}
SERVICE = "soak"
#: the environments of the concurrent load (two recoveries and a nightly); the rounds use the first
LOAD_ENVIRONMENTS = ("development", "test", "qa")

CONFIG = """
prefix = "k"
timezone = "Europe/London"

[local]
state_dir = "{state}"
archive_timeout_seconds = 30
fsync = false        # the server is never killed here, only the client: durability is not under test
wal_segment_mb = 1

[alerts]
token_env = "DR_SOAK_ALERT_TOKEN"
max_body_bytes = 4096
rate_limit_per_minute = {alert_rate}

[[alerts.routes]]
match_rule = "soak-database-down"
service = "soak"
environment = "development"
scenario = "data-loss"

[[alerts.routes]]
match_resource = "k-soak-ts-pg"
service = "soak"
environment = "test"
scenario = "server-loss"
{environments}
"""
ENVIRONMENT = """
[services.soak.environments.{name}]
platform = "local"
recovery_slot_wait_minutes = 2
checks = [
  {{ kind = "healthcheck" }},
  {{ kind = "row_count", table = "candidates", min = 1 }},
  {{ kind = "row_count", table = "applications", min = 1 }},
]
"""


def say(*parts: Any) -> None:
    print(*parts, flush=True)


# --- the world: the live database's sets, the store, what users see --------------------------------


def counts_of(state: dict[str, str]) -> dict[str, int]:
    """Row counts per table name (as the app's /api/counts shows them) from a `db_state`."""
    return {k.split(".", 1)[1]: int(v.split(":", 1)[0]) for k, v in state.items() if k.startswith("table public.")}


#: how far ahead of its last value PostgreSQL WAL-logs a sequence (SEQ_LOG_VALS)
SEQUENCE_LOG_AHEAD = 32


def is_new_set(now: dict[str, str], new: dict[str, str], old: dict[str, str] | None) -> bool:
    """Whether `now` is the new set as a point-in-time restore gives it back.

    Tables and large objects exactly. A sequence is never behind the new set, and at most
    `SEQUENCE_LOG_AHEAD` past the old one: sequences are not transactional, and PostgreSQL
    WAL-logs them ahead, so recovery to T replays a `nextval` made after T (by the damage) up to
    the value it logged. No value handed out before T can come again.
    """
    if set(now) != set(new):
        return False
    for key, value in now.items():
        if not key.startswith("sequence "):
            if value != new[key]:
                return False
            continue
        if value == new[key]:
            continue
        try:
            got = int(value)
        except ValueError:  # never called now, called in the new set: behind it
            return False
        low = int(new[key]) if new[key] != "None" else 1
        high = max(low, int(old[key]) if old and old.get(key, "None") != "None" else low) + SEQUENCE_LOG_AHEAD
        if not low <= got <= high:
            return False
    return True


def store_files(root: Path) -> dict[str, tuple[str, int, str | None]]:
    """Every backup file of the store: name -> (sha256, size, its sidecar's text or None)."""
    out = {}
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.name.endswith(META_SUFFIX) or not p.is_file():
            continue
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        meta = root / (p.name + META_SUFFIX)
        out[p.name] = (h.hexdigest(), p.stat().st_size, meta.read_text() if meta.exists() else None)
    return out


def store_problems(before: dict[str, tuple[str, int, str | None]], root: Path) -> list[str]:
    """Backups stored before that changed or vanished; backups listed as complete whose bytes do not match."""
    problems = []
    now = store_files(root)
    for name, (sha, size, meta) in before.items():
        if name not in now:
            problems.append(f"backup {name} vanished")
        elif now[name] != (sha, size, meta):
            problems.append(f"backup {name} changed")
    for name, (sha, size, meta) in now.items():
        if name in before or meta is None:
            continue
        try:
            m = json.loads(meta)
        except ValueError:
            problems.append(f"the sidecar of new backup {name} is unreadable")
            continue
        if m.get("complete") and (m.get("sha256") != sha or m.get("size") != size):
            problems.append(f"{name} is listed as complete but its bytes do not match its sha256/size")
    for p in root.iterdir():  # a sidecar that says complete with no data file beside it
        if p.name.endswith(META_SUFFIX) and not p.name.startswith("."):
            data = root / p.name.removesuffix(META_SUFFIX)
            try:
                complete = json.loads(p.read_text()).get("complete")
            except ValueError:
                complete = False
            if complete and not data.exists():
                problems.append(f"{data.name} is listed as complete but has no data")
    return problems


class Users:
    """A user loading the main URL's /api/counts every 100 ms; every answer is kept with its time."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") + "/api/counts"
        self.seen: list[tuple[float, str, dict[str, int] | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="users", daemon=True)

    def look(self, client: httpx.Client) -> tuple[str, dict[str, int] | None]:
        try:
            r = client.get(self.url)
        except httpx.HTTPError:
            return "no answer", None
        if r.headers.get("x-dr-maintenance") == "on":
            return "maintenance page", None
        if r.status_code == 502 and "no app replica is running" in r.text:
            return "error page", None
        if r.status_code == 200:
            try:
                return "app", {k: int(v) for k, v in r.json().items()}
            except (ValueError, AttributeError):
                return "app (unreadable)", None
        return f"app ({r.status_code})", None

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                what, counts = self.look(client)
                self.seen.append((time.monotonic(), what, counts))
                self._stop.wait(0.1)

    def __enter__(self) -> "Users":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def problems(self, sets: list[dict[str, int]]) -> list[str]:
        """Answers that are neither the maintenance page nor the app serving one of `sets`."""
        out = Counter()
        for _, what, counts in self.seen:
            if what == "app" and counts not in sets:
                out["the app served data that is neither the old nor the new set"] += 1
            elif what.startswith("app (") and what != "app (200)":
                out[f"the app answered {what[5:-1]}"] += 1
        return [f"{msg} ({n}x)" for msg, n in out.items()]

    def kinds(self) -> Counter:
        return Counter(what for _, what, _ in self.seen)


# --- processes --------------------------------------------------------------------------------------


def group_members(pgid: int) -> dict[int, str]:
    """Live processes of a process group: pid -> comm."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            raw = (p / "stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rindex(")") + 2:].split()
        if rest[0] != "Z" and int(rest[2]) == pgid:
            out[int(p.name)] = raw[raw.index("(") + 1: raw.rindex(")")]
    return out


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of `pid`, pid -> comm (through /proc/<pid>/task/*/children: cheap to poll)."""
    out, frontier = {}, [pid]
    while frontier:
        kids = []
        for p in frontier:
            for f in Path(f"/proc/{p}/task").glob("*/children"):
                try:
                    kids += [int(x) for x in f.read_text().split()]
                except OSError:
                    pass
        for k in kids:
            try:
                out[k] = Path(f"/proc/{k}/comm").read_text().strip()
            except OSError:
                pass
        frontier = kids
    return out


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    if sig == signal.SIGSTOP:  # let what the group sent just before it stopped reach the server, then look
        time.sleep(SETTLE)


def wait_group_gone(pgid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return True
        time.sleep(0.05)
    return False


# --- the local platform and the Prefect server -------------------------------------------------------


@dataclass
class Env:
    """One service environment of the soak's local platform."""

    name: str
    config_path: Path

    def __post_init__(self) -> None:
        rt = Ref(SERVICE, self.name, str(self.config_path)).rt()
        self.config, self.target, self.platform = rt.config, rt.target, rt.platform
        self.servers, self.store, self.app = rt.servers, rt.store, rt.app

    def conn(self, database: str | None = None, server: str | None = None) -> dict[str, Any]:
        return self.servers.connection(server or self.target.server, database or self.target.database).psycopg_kwargs()

    def query(self, sql: str, params: Any = None, *, database: str | None = None) -> list[tuple]:
        with psycopg.connect(**self.conn(database), autocommit=True) as c:
            cur = c.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def state(self) -> dict[str, str]:
        return db_state(self.conn())

    def databases(self) -> list[str]:
        return [r[0] for r in self.query("SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1",
                                         database="postgres")]


class PrefectApi:
    """A Prefect server for the runs: `prefect server start --no-services` of the soak's own, or a given URL."""

    def __init__(self, workdir: Path, api: str | None = None):
        self.workdir, self.proc, self.log = workdir, None, workdir / "prefect-server.log"
        if api:
            self.api = api
            return
        port = free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        env = env_without_prefect(PREFECT_HOME=str(workdir / "prefect-server-home"), PREFECT_API_URL=self.api,
                                  PREFECT_SERVER_LOGGING_LEVEL="WARNING", PREFECT_SERVER_UI_ENABLED="false")
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
                 "--no-services"], env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=fh,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Prefect server exited:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.api}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the Prefect server did not answer within 240 s:\n{self.log.read_text()[-2000:]}")

    def client(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        class _Ctx:
            def __enter__(inner):
                inner.settings = temporary_settings({PREFECT_API_URL: self.api})
                inner.settings.__enter__()
                inner.client = get_client(sync_client=True)
                return inner.client.__enter__()

            def __exit__(inner, *exc):
                inner.client.__exit__(*exc)
                inner.settings.__exit__(*exc)

        return _Ctx()

    def active_slots(self, name: str) -> int:
        r = httpx.get(f"{self.api}/v2/concurrency_limits/{name}", timeout=10)
        return r.json()["active_slots"] if r.status_code == 200 else 0

    def free_slot(self, name: str) -> None:
        """What an operator does for a slot held by a dead run: `prefect gcl update <name> --active-slots 0`."""
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        with self.client() as client:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


# --- watching a run from outside ----------------------------------------------------------------------

_ACTIVITY = """
SELECT
  EXISTS (SELECT 1 FROM pg_stat_progress_copy p JOIN pg_database d ON d.oid = p.datid
          WHERE d.datname LIKE %(restore)s AND p.tuples_processed > 0),
  EXISTS (SELECT 1 FROM pg_stat_progress_create_index p JOIN pg_database d ON d.oid = p.datid
          WHERE d.datname LIKE %(restore)s),
  EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname LIKE %(restore)s AND query LIKE 'SELECT count(*) FROM %%'
          AND state IN ('active', 'idle in transaction')),
  EXISTS (SELECT 1 FROM pg_database WHERE (datname = %(live)s OR datname LIKE %(replaced)s) AND NOT datallowconn)
    OR EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid <> pg_backend_pid()
               AND state IN ('active', 'idle in transaction') AND xact_start < query_start
               AND (query LIKE '%%ALTER DATABASE %%RENAME TO%%' OR query LIKE 'COMMENT ON DATABASE %%')),
  EXISTS (SELECT 1 FROM pg_database WHERE datname LIKE %(restore)s
          AND shobj_description(oid, 'pg_database') LIKE 'dr: restored from %%'),
  EXISTS (SELECT 1 FROM pg_database WHERE datname LIKE %(restore)s)
"""


class Watch:
    """What a run is doing, seen from outside: its log, its process group, the files and the live server."""

    def __init__(self, env: Env, pgid: int, log: Path, ptr_name: str):
        self.env, self.pgid, self.log, self.ptr_name = env, pgid, log, ptr_name
        self.ptr_dir = env.servers.servers_dir / ptr_name
        db = env.target.database
        self.params = {"restore": f"{db}\\_restore\\_%", "live": db, "replaced": f"{db}\\_replaced\\_%"}
        self.admin = psycopg.connect(**env.conn("postgres"), autocommit=True)
        self.seen_loading = self.seen_restoring = False

    def close(self) -> None:
        self.admin.close()

    def steps(self) -> list[str]:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return re.findall(r"step: (.+?)\s*$", text, re.M)

    def last_step(self) -> str | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def dumping(self) -> bool:
        """A pg_dump of the run is streaming (not one asked for its --version)."""
        for pid, comm in descendants(self.pgid).items():
            if comm == "pg_dump":
                try:
                    if b"--version" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                        return True
                except OSError:
                    pass
        return False

    def ptr_state(self) -> str:
        meta = self.ptr_dir / "server.json"
        if not self.ptr_dir.exists():
            return "absent"
        try:
            return "creating" if json.loads(meta.read_text()).get("restoring") else "ready"
        except (OSError, ValueError):
            return "creating"

    def activity(self) -> tuple[bool, bool, bool, bool, bool, bool]:
        """(rows loading, an index building, the manifest counted, the swap, a restored database ready to swap,
        a database being restored)."""
        try:
            return tuple(self.admin.execute(_ACTIVITY, self.params).fetchone())  # type: ignore[return-value]
        except psycopg.Error:
            return (False, False, False, False, False, False)

    def past(self, phase: str) -> bool:
        """The run went past the phase while it was being approached (see `near`)."""
        steps = self.steps()
        key = {"swap": "restore", "backup": "backup", "ptr-backup": "ptr-backup"}.get(phase)
        if key is None or STEP[key] not in steps:
            return False
        if steps[-1] != STEP[key]:
            return True
        return phase == "swap" and self.seen_restoring and not self.activity()[5]

    def near(self, phase: str) -> float:
        """Seconds to let the run go at a time while a short phase is about to start; 0 when it is not.

        The swap follows the restored database's marker by milliseconds (and its transaction lasts a few),
        so the whole restore is stepped, finely once the manifest is being checked. A backup's pg_dump is
        stepped towards from the start of its step."""
        if phase == "swap":
            loading, _, counting, _, marked, restoring = self.activity()
            self.seen_loading |= loading
            self.seen_restoring |= restoring
            if self.last_step() != STEP["restore"] or not restoring:
                return 0.0
            return 0.0003 if (marked or counting) else 0.002
        if phase in ("backup", "ptr-backup"):  # the step has begun; its pg_dump is about to start
            return 0.003 if self.last_step() == STEP[phase] and not self.dumping() else 0.0
        return 0.0

    def inside(self, phase: str) -> bool:
        step = self.last_step()
        if phase == "maintenance-on":
            return step == STEP["maintenance-on"]
        if phase == "backup":
            return step == STEP["backup"] and self.dumping()
        if phase == "ptr-create":
            return step == STEP["ptr-create"] and self.ptr_state() == "creating"
        if phase == "ptr-backup":
            return step == STEP["ptr-backup"] and self.dumping()
        if phase in ("row-load", "index-build", "manifest-check", "swap"):
            if step != STEP["restore"]:
                return False
            loading, indexing, counting, swapping, marked, restoring = self.activity()
            self.seen_loading |= loading
            # rows load table by table, each table's indexes built as its rows are in: from the first COPY to the
            # manifest check it is the row load (with index builds inside it, which are also the index build)
            between = self.seen_loading and restoring and not (counting or swapping or marked)
            return {"row-load": loading or between, "index-build": indexing, "manifest-check": counting,
                    "swap": swapping}[phase]
        if phase == "maintenance-off":
            return step == STEP["maintenance-off"]
        if phase == "tidy-up":
            return step == STEP["tidy-up"] and (self.ptr_dir / "server.json").exists()
        raise ValueError(phase)

    def describe(self) -> str:
        """What was seen, for a round whose kill missed its phase."""
        names = ("loading", "indexing", "counting", "swapping", "marked", "restoring")
        seen = [n for n, v in zip(names, self.activity()) if v]
        return (f"step '{self.last_step()}', live server: {', '.join(seen) or 'nothing'}, pg_dump: {self.dumping()}, "
                f"PTR server: {self.ptr_state()}, rows seen loading: {self.seen_loading}")

    def where(self) -> str:
        """The phase the run is in now, or the last step it started."""
        for phase in PHASES:
            if self.inside(phase):
                return phase
        return f"step '{self.last_step()}'"


# --- one round ------------------------------------------------------------------------------------------


@dataclass
class RoundResult:
    n: int
    phase: str  # what the round aimed at ("calibration" for the run that is not killed)
    hit: bool = False  # killed inside the aimed phase
    killed_in: str = ""  # where the run was at the kill
    kill_after: float | None = None  # seconds from the run's start to the kill
    violations: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in INVARIANTS})
    error_page: bool = False  # users got the router's "no app replica" page after the kill, until the resume
    slot_left_taken: bool = False  # the killed run's recovery slot was still taken after the kill
    slot_freed_by_resume: bool = False  # the resume said it freed it at once (its holder provably dead)
    resumed: bool = False
    resume_seconds: float | None = None
    final: list[str] = field(default_factory=list)  # what was wrong with the final state
    leftovers: list[str] = field(default_factory=list)
    run_seconds: float | None = None
    users_saw: dict[str, int] = field(default_factory=dict)  # what users got from the main URL, by kind
    incomplete_backups: list[str] = field(default_factory=list)  # listed as incomplete, kept for a person
    logs: str | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return (self.resumed and not self.final and not self.leftovers
                and not any(self.violations.values()))


def _london(t: datetime) -> str:
    return t.astimezone(ZoneInfo("Europe/London")).strftime("%Y-%m-%d %H:%M:%S")



#: the loggers a flow's own lines go to (its run logger, or dr.flows outside a run)
SAID_BY = ("prefect.flow_runs", "dr.flows")


class _Said(logging.Handler):
    """What the product's flows logged (warnings and up) while a round ran in this process."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

class Soak:
    """The soak's platform, Prefect server and rounds.

    Args:
        workdir: where everything goes (a temporary directory by default).
        size: the sample database's size (`small`, `30mb`...).
        api: a Prefect API URL to use instead of starting a server.
        seed: the random seed (phases in random order, moments inside phases, damage).
        environments: the environments to bring up (the rounds use development).
        alert_rate: the alert endpoint's rate limit per minute (for `--load`).
        in_process: resume and tidy up with the flows called here, not with `dr` commands.
    """

    def __init__(self, workdir: Path, *, size: str = "30mb", api: str | None = None, seed: int = 1,
                 environments: tuple[str, ...] = ("development",), alert_rate: int = 120,
                 in_process: bool = False):
        self.workdir = workdir
        self.workdir.chmod(0o755)  # the PostgreSQL OS user enters it when run as root
        self.size, self.rng = size, random.Random(seed)
        self.config_path = workdir / "dr.toml"
        self.config_path.write_text(CONFIG.format(
            state=workdir / "state", alert_rate=alert_rate,
            environments="".join(ENVIRONMENT.format(name=e) for e in LOAD_ENVIRONMENTS)))
        self.envs = {e: Env(e, self.config_path) for e in environments}
        self.env = self.envs["development"]
        self.prefect = PrefectApi(workdir, api)
        self.estimates: dict[str, float] = dict(DEFAULT_ESTIMATES)
        #: resume and tidy up by calling the flows in this process (the CI version: no interpreter start-up)
        #: instead of `dr` commands; the run that is killed is always a `dr` command of its own
        self.in_process = in_process
        self._tempdir_before = tempfile.tempdir
        if in_process:
            # a temporary directory of the soak's own for this process and its runs (where tidy-up looks for
            # passfiles): other programs on the machine (CI's other pytest sessions) kill processes too, and
            # their passfiles in the shared /tmp are not this soak's leftovers
            private = workdir / "tmp"
            private.mkdir(exist_ok=True)
            tempfile.tempdir = str(private)
        self.json_path: Path | None = None  # every round's result is written here as it ends
        self.passfiles_before: set[str] = set()
        self.results: list[RoundResult] = []
        self.failed_dir = workdir / "failed-rounds"

    # --- set-up --------------------------------------------------------------------------------------

    def up(self) -> None:
        from dr.platforms.local import lifecycle

        for env in self.envs.values():
            lifecycle.up(env.config, env.target, self.size)
            # large objects: pg_dump carries them apart from the tables; the restore must bring them back too
            env.query("CREATE TABLE IF NOT EXISTS documents (id serial PRIMARY KEY, title text NOT NULL, body oid)")
            if not env.query("SELECT 1 FROM documents LIMIT 1"):
                env.query("INSERT INTO documents (title, body) SELECT 'document ' || g, "
                          "lo_from_bytea(0, decode(repeat(md5(g::text), 2048), 'hex')) FROM generate_series(1, 20) g")

    def tmpdir(self, tmp: Path) -> Path:
        """Where the runs' tools put their passfiles: the round's own directory, or (the resume and tidy-up
        running in this process) this process's temporary directory, where tidy-up looks (the soak's own)."""
        return Path(tempfile.gettempdir()) if self.in_process else tmp

    def cli_env(self, tmp: Path) -> dict[str, str]:
        return env_without_prefect(PREFECT_API_URL=self.prefect.api, PREFECT_HOME=str(self.workdir / "client-home"),
                                   TMPDIR=str(self.tmpdir(tmp)), PYTHONUNBUFFERED="1", DR_LOG_LEVEL="WARNING",
                                   PREFECT_LOGGING_LEVEL="INFO")

    def dr(self, args: list[str], log: Path, tmp: Path) -> subprocess.Popen:
        """`dr <args>` in a process group of its own, its output to `log`."""
        with open(log, "ab") as fh:
            return subprocess.Popen([sys.executable, "-m", "dr.cli", *args, "--config", str(self.config_path)],
                                    cwd=self.workdir, env=self.cli_env(tmp), stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    # --- the round's data ------------------------------------------------------------------------------

    def prepare(self, n: int) -> tuple[datetime, dict[str, str], dict[str, str]]:
        """A base backup, the new set, T, the damage; returns (T, new set, old set)."""
        env = self.env
        env.servers.take_base_backup(env.target.server)
        time.sleep(1.2)  # T is more than the 1-s resolution after the base backup...
        new = env.state()
        t = datetime.now(timezone.utc).replace(microsecond=0)  # no commit between reading the new set and T
        time.sleep(1.2)  # ...and more than a second before the damage
        r = self.rng.randrange(1, 1 << 30)
        env.query(f"""
            DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events ORDER BY md5(id::text || '{r}') LIMIT 40);
            UPDATE candidates SET first_name = 'damaged {n}' WHERE id % 53 = {r % 53};
            UPDATE applications SET status = 'withdrawn', updated_at = now() WHERE id % 41 = {r % 41};
            INSERT INTO providers (code, name, address) VALUES ('DMG{n}-{r}', 'after the damage', '{{}}');
            SELECT lo_put(body, {r % 1000}, '\\xdeadbeef'::bytea) FROM documents WHERE id = 1 + {r % 20};
            SELECT lo_unlink(body) FROM documents WHERE id = (SELECT min(id) FROM documents);
            DELETE FROM documents WHERE id = (SELECT min(id) FROM documents);
            INSERT INTO documents (title, body) VALUES ('after the damage {n}', lo_from_bytea(0, '\\x0102'::bytea));
        """)
        old = env.state()
        assert old != new
        return t, new, old

    # --- invariants ---------------------------------------------------------------------------------------

    def check_live(self, old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
        """Problems unless the live database answers and holds exactly the old set or exactly the new one."""
        try:
            now = self.env.state()
        except psycopg.Error as exc:
            return [f"the live database does not answer: {str(exc).strip().splitlines()[0]}"]
        if (old is not None and now == old) or is_new_set(now, new, old):
            return []
        closest = min([s for s in (old, new) if s is not None], key=lambda s: len(set(s.items()) ^ set(now.items())))
        diff = sorted(k for k in set(closest) | set(now) if closest.get(k) != now.get(k))
        what = "neither the old nor the new set" if old is not None else "not the new set"
        return [f"the live database is {what}: {', '.join(diff[:6])}" + (f" (+{len(diff) - 6} more)" if len(diff) > 6 else "")]

    def leftovers(self, incident: str, tmp: Path) -> list[str]:
        """What the incident left behind after tidy-up."""
        env, out = self.env, []
        for s in env.servers.list_servers():
            if s.tags.get(TAG_INCIDENT) == incident:
                out.append(f"PTR server {s.name}")
        for db in env.databases():
            if "_restore_" in db or "_replaced_" in db:
                out.append(f"database {db}")
        for p in env.store.root.iterdir():
            if p.name.startswith(".") and ".hold-" in p.name:
                out.append(f"hold {p.name}")
            elif p.name.startswith("."):
                out.append(f"staging file {p.name}")

        state_dir = env.config.local.state_dir
        out += [f"spool directory {p.name}" for p in state_dir.glob("dr-spool-*")]
        for p in self.tmpdir(tmp).glob("dr-pass-*"):  # a running process's own (another test's) is not a leftover
            if p.name in self.passfiles_before:
                continue
            m = re.match(r"dr-pass-(\d+)-", p.name)
            try:
                when = datetime.fromtimestamp(p.lstat().st_mtime, timezone.utc)
            except FileNotFoundError:
                continue
            if m is None and self.in_process:
                continue  # the shared temporary directory: not named by this code, so another program's
            if not (m and running_since(int(m.group(1)), when)):
                out.append(f"passfile directory {p.name} (holds the password)")
        slot = f"dr-{SERVICE}-{env.target.environment}"
        if self.prefect.active_slots(slot):
            out.append(f"recovery slot {slot} taken")
        st = env.app.get_status()
        if st.recorded_replicas is not None:
            out.append(f"recorded replica counts {st.recorded_replicas}")
        return out

    def clear(self, incident: str, tmp: Path) -> None:
        """Remove whatever a round left, so that the next one starts clean (counted before, in `leftovers`)."""
        env = self.env
        for s in env.servers.list_servers():
            if s.tags.get(TAG_INCIDENT) == incident:
                env.servers.delete_server(s.name)
        for db in env.databases():
            if "_restore_" in db or "_replaced_" in db:
                env.query(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)', database="postgres")
        for p in env.store.root.iterdir():
            if p.name.startswith("."):
                p.unlink(missing_ok=True)
        for b in env.store.list_backups():
            if not b.complete and b.extra.get("label") == incident:
                env.store.delete_backup(b.name)
        for p in env.config.local.state_dir.glob("dr-spool-*"):
            shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        slot = f"dr-{SERVICE}-{env.target.environment}"
        if self.prefect.active_slots(slot):
            self.prefect.free_slot(slot)
        st = env.app.get_status()
        if st.maintenance or st.recorded_replicas is not None:
            env.app.scale_up()
            env.app.disable_maintenance()
        # housekeeping, not a leftover: dropped servers stay revivable for days; the soak makes one a round
        shutil.rmtree(env.servers.dropped_dir, ignore_errors=True)

    # --- kill -------------------------------------------------------------------------------------------

    def strike(self, proc: subprocess.Popen, watch: Watch, phase: str, res: RoundResult, started: float,
               timeout: float = 900) -> None:
        """Wait for `phase`, go on to a random moment inside it (frozen between slices), kill the group."""
        pgid = proc.pid
        deadline = time.monotonic() + timeout
        frozen = False
        while not watch.inside(phase):
            if proc.poll() is not None:
                res.note = f"the run ended ({proc.returncode}) before {phase} was seen"
                return
            if time.monotonic() > deadline:
                res.note = f"{phase} was not seen within {timeout:.0f} s"
                break
            if watch.past(phase):  # went past it between two looks
                break
            if step := watch.near(phase):  # a short phase ahead: a few milliseconds at a time
                frozen = True
                signal_group(pgid, signal.SIGCONT)
                time.sleep(step)
                signal_group(pgid, signal.SIGSTOP)
                continue
            if frozen:
                frozen = False
                signal_group(pgid, signal.SIGCONT)
            time.sleep(0.01)
        if phase in SERVER_SIDE and res.note == "":
            # the server builds the index while its client waits: freezing the client would not hold it, so the
            # kill goes the moment one is seen (which one, and how far in, differs from round to round)
            signal_group(pgid, signal.SIGKILL)
            res.hit, res.killed_in = True, phase
            res.kill_after = time.monotonic() - started
            proc.wait(30)
            if not wait_group_gone(pgid):
                res.note += f"; processes of the killed run still alive: {group_members(pgid)}"
            return
        target = self.rng.uniform(0, 0.9 * self.estimates.get(phase, 0.05))
        signal_group(pgid, signal.SIGSTOP)
        elapsed = 0.0
        while True:
            if not watch.inside(phase):
                res.hit, res.killed_in = False, watch.where()
                res.note = f"missed {phase} after {elapsed * 1000:.1f} of {target * 1000:.1f} ms: {watch.describe()}"
                # the phase lasted at most this long of the run's own time: aim within that from now on (the
                # calibration measured it in wall time, while the server went on working)
                self.estimates[phase] = max(min(self.estimates[phase], elapsed), 0.001)
                break
            if elapsed >= target:
                res.hit, res.killed_in = True, phase
                break
            step = min(SLICE, max(target / 20, 0.0002), target - elapsed)
            signal_group(pgid, signal.SIGCONT)
            time.sleep(step)
            signal_group(pgid, signal.SIGSTOP)
            elapsed += step
        signal_group(pgid, signal.SIGKILL)
        signal_group(pgid, signal.SIGCONT)
        res.kill_after = time.monotonic() - started
        proc.wait(30)
        if not wait_group_gone(pgid):
            res.note += f"; processes of the killed run still alive: {group_members(pgid)}"

    def trace(self, proc: subprocess.Popen, watch: Watch) -> dict[str, float]:
        """The calibration run: how long each phase is seen for (polled every 10 ms), the run not touched."""
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        while proc.poll() is None:
            now = time.monotonic()
            for phase in PHASES:
                if watch.inside(phase):
                    first.setdefault(phase, now)
                    last[phase] = now
            time.sleep(0.01)
        return {p: max(last[p] - first[p], 0.02) for p in first}

    # --- the round --------------------------------------------------------------------------------------

    def round(self, n: int, phase: str | None) -> RoundResult:
        """One round aimed at `phase` (None: the calibration run, not killed)."""
        env = self.env
        res = RoundResult(n, phase or "calibration")
        incident = f"chaos-{n}-{int(time.time())}"
        rdir = self.workdir / "rounds" / f"{n:03d}-{res.phase}"
        rdir.mkdir(parents=True, exist_ok=True)
        tmp = rdir / "tmp"
        tmp.mkdir(exist_ok=True)
        t, new, old = self.prepare(n)
        self.passfiles_before = {p.name for p in self.tmpdir(tmp).glob("dr-pass-*")}  # not this round's
        counts = [counts_of(old), counts_of(new)]
        stored = store_files(env.store.root)
        slot = f"dr-{SERVICE}-{env.target.environment}"
        args = ["data-loss", "--service", SERVICE, "--env", env.target.environment, "--time", _london(t),
                "--incident", incident, "--auto-approve"]
        say(f"round {n}: {LABELS.get(res.phase, res.phase)} (incident {incident})")
        with Users(env.app.get_status().main_url) as users:
            started = time.monotonic()
            proc = self.dr(args, rdir / "run.log", tmp)
            watch = Watch(env, proc.pid, rdir / "run.log", ptr_server_name(env.target.server, t))
            try:
                if phase is None:
                    self.estimates.update(self.trace(proc, watch))
                    res.run_seconds = time.monotonic() - started
                    res.resumed = proc.returncode == 0
                    res.resume_seconds = res.run_seconds
                    if not res.resumed:
                        res.final.append(f"the run failed ({proc.returncode}); see run.log")
                else:
                    self.strike(proc, watch, phase, res, started)
            finally:
                if proc.poll() is None:
                    signal_group(proc.pid, signal.SIGKILL)
                    proc.wait(30)
                watch.close()
            if phase is not None:
                # the invariants, at once
                res.violations["live"] = self.check_live(old, new)
                res.violations["store"] = store_problems(stored, env.store.root)
                with httpx.Client(timeout=5) as client:
                    now = [users.look(client) for _ in range(3)]
                res.error_page = any(what == "error page" for what, _ in now)
                # the killed run's slot: left taken? (nothing frees it here: the resume must, at once)
                res.slot_left_taken = not group_members(proc.pid) and bool(self.prefect.active_slots(slot))
                # resume: the same command, the same incident
                t0 = time.monotonic()
                why = self.resume(args, incident, t, rdir / "resume.log", tmp)
                res.resume_seconds = time.monotonic() - t0
                res.resumed = why is None
                resume_log = rdir / "resume.log"
                res.slot_freed_by_resume = resume_log.exists() and "freed the recovery slot" in resume_log.read_text(
                    errors="replace")
                if why:
                    res.final.append(f"the resume failed: {why}")
            res.violations["users"] = users.problems(counts)
            res.users_saw = dict(users.kinds())
        res.final += self.final_problems(incident, new, old, stored)
        why = self.tidy_up(rdir / "tidy.log", tmp)
        if why:
            res.final.append(f"tidy-up failed: {why}")
        res.leftovers = self.leftovers(incident, tmp)
        # a backup killed between linking its data and marking its sidecar complete is listed as incomplete and
        # kept for a person to look at (the store's and retention's rule), not deleted by tidy-up: counted apart
        res.incomplete_backups = [b.name for b in env.store.list_backups()
                                  if not b.complete and b.extra.get("label") == incident]
        self.clear(incident, tmp)
        (rdir / "round.json").write_text(json.dumps({**asdict(res), "estimates": self.estimates}, indent=2, default=str))
        if res.ok and not res.note:
            shutil.rmtree(rdir, ignore_errors=True)
        else:
            self.failed_dir.mkdir(exist_ok=True)
            dest = self.failed_dir / rdir.name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.move(str(rdir), dest)
            res.logs = str(dest)
        verdict = "ok" if res.ok else "PROBLEMS"
        say(f"  killed in {res.killed_in or '-'} after {res.kill_after or 0:.1f} s; resume "
            f"{'finished' if res.resumed else 'FAILED'} in {res.resume_seconds or 0:.1f} s; {verdict}"
            + "".join(f"\n  {k}: {v}" for k, vs in res.violations.items() for v in vs)
            + "".join(f"\n  final: {x}" for x in res.final) + "".join(f"\n  leftover: {x}" for x in res.leftovers)
            + (f"\n  note: {res.note}" if res.note else ""))
        self.results.append(res)
        if self.json_path:
            self.json_path.write_text(json.dumps({"rounds": [asdict(r) for r in self.results]}, indent=2, default=str))
        return res

    def resume(self, args: list[str], incident: str, t: datetime, log: Path, tmp: Path) -> str | None:
        """Run the same recovery again with the same incident id; None when it finished, else why not."""
        if self.in_process:
            from flows.data_loss import data_loss

            said = _Said()
            for name in SAID_BY:
                logging.getLogger(name).addHandler(said)
            try:
                data_loss(SERVICE, self.env.target.environment, restore_time=_london(t), incident=incident,
                          auto_approve=True, config_path=str(self.config_path))
                return None
            except Exception as exc:  # noqa: BLE001 - reported in the round's result
                said.lines.append(f"{type(exc).__name__}: {exc}")
                return f"{type(exc).__name__}: {str(exc)[:400]}"
            finally:
                for name in SAID_BY:
                    logging.getLogger(name).removeHandler(said)
                log.write_text("".join(f"{line}\n" for line in said.lines))
        proc = self.dr(args, log, tmp)
        try:
            rc = proc.wait(1200)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            rc = proc.wait(30)
        return None if rc == 0 else f"exit {rc}: {_last_error(log)}"

    def tidy_up(self, log: Path, tmp: Path) -> str | None:
        """`dr tidy-up` of the environment; None when it finished, else why not."""
        if self.in_process:
            from flows.tidy_up import tidy_up

            try:
                tidy_up(SERVICE, self.env.target.environment, config_path=str(self.config_path))
                return None
            except Exception as exc:  # noqa: BLE001
                log.write_text(f"{type(exc).__name__}: {exc}\n")
                return f"{type(exc).__name__}: {str(exc)[:400]}"
        proc = self.dr(["tidy-up", "--service", SERVICE, "--env", self.env.target.environment], log, tmp)
        return None if proc.wait(600) == 0 else f"exit {proc.returncode}: {_last_error(log)}"

    def final_problems(self, incident: str, new: dict[str, str], old: dict[str, str], stored: dict) -> list[str]:
        env, out = self.env, []
        try:
            now = env.state()
        except psycopg.Error as exc:
            now = None
            out.append(f"the live database does not answer: {exc}")
        if now is not None and not is_new_set(now, new, old):
            out += self.check_live(None, new)
        st = env.app.get_status()
        if st.maintenance or st.replicas != {"web": 1, "worker": 1}:
            out.append(f"the app is not back: maintenance {'on' if st.maintenance else 'off'}, replicas {st.replicas}")
        out += store_problems(stored, env.store.root)
        kinds = Counter(b.kind for b in env.store.list_backups() if b.complete and b.extra.get("label") == incident)
        if kinds != Counter({"pre-restore-safety": 1, "ptr": 1}):
            out.append(f"the incident's complete backups are {dict(kinds)}, not one safety and one PTR backup")
        return out

    def run(self, rounds: int, phases: tuple[str, ...] = PHASES, order: str = "walk",
            calibrate: bool = True) -> list[RoundResult]:
        """A calibration run (measures each phase's length; it is not killed), then `rounds` rounds."""
        if calibrate:
            self.round(0, None)
            say("calibration: phase lengths " + ", ".join(f"{p} {s:.2f} s" for p, s in self.estimates.items()))
        first = len(self.results) + 1  # a later call goes on numbering (its logs never overwrite a round's)
        for n in range(first, first + rounds):
            phase = phases[(n - first) % len(phases)] if order == "walk" else self.rng.choice(phases)
            try:
                self.round(n, phase)
            except Exception as exc:  # a round that could not even be checked is a failure of its own
                res = RoundResult(n, phase, note=f"the soak itself failed: {type(exc).__name__}: {exc}")
                self.results.append(res)
                say(f"  {res.note}")
        return self.results

    def close(self) -> None:
        from dr.platforms.local import lifecycle

        try:
            lifecycle.down(self.env.config)
        finally:
            tempfile.tempdir = self._tempdir_before
            self.prefect.stop()


def _last_error(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    errors = [ln for ln in lines if ln.startswith("error") or "Error" in ln]
    return (errors or lines or ["(empty log)"])[-1][:400]


# --- under load: two recoveries, a nightly and 200 alerts at once ---------------------------------------

NIGHTLY_RUNNER = """
import json, sys
from flows.nightly import nightly_backup
print(json.dumps(nightly_backup("soak", "qa", config_path=sys.argv[1]), default=str))
"""


def _alert_body(alert_id: str, rule: str, target: str) -> dict[str, Any]:
    return {"schemaId": "azureMonitorCommonAlertSchema", "data": {"essentials": {
        "alertId": alert_id, "alertRule": rule, "severity": "Sev1", "signalType": "Metric",
        "monitorCondition": "Fired", "alertTargetIDs": [target], "firedDateTime": datetime.now(timezone.utc).isoformat()}}}


def _make_deployments(soak: "Soak") -> None:
    """The deployments the alert routes start (no worker: their runs wait, Scheduled, and change nothing)."""
    from prefect.client.schemas.actions import DeploymentCreate  # noqa: F401 - the client builds it

    with soak.prefect.client() as client:
        for flow, env in (("data-loss", "development"), ("server-loss", "test")):
            flow_id = client.create_flow_from_name(flow)
            client.create_deployment(flow_id=flow_id, name=f"{SERVICE}-{env}", parameters={})


def run_load(soak: "Soak", alerts: int = 200) -> dict[str, Any]:
    """Two data-loss recoveries (development, test), a nightly backup of qa and `alerts` alert POSTs, all at once.

    Checks: both recoveries finish with exactly their own new set, and ran at the same time without
    touching each other's environment (each incident's backups and PTR server are of its own
    server); the nightly is complete and matches qa's rows; every alert POST gets one answer: the
    valid ones a started run or "duplicate" (one run per alert id, the same run for its repeat),
    the unauthenticated 401, the oversized 413, and beyond the rate limit 429, exactly
    `alerts - limit` of them; no run is lost (each started alert id has its Scheduled run, waiting
    for a go-ahead) and no other run was made.
    """
    import concurrent.futures

    dev, test, qa = soak.envs["development"], soak.envs["test"], soak.envs["qa"]
    out: dict[str, Any] = {"problems": []}
    problems: list[str] = out["problems"]
    rdir = soak.workdir / "load"
    rdir.mkdir(exist_ok=True)
    tmp = rdir / "tmp"
    tmp.mkdir(exist_ok=True)
    _make_deployments(soak)
    token = "soak-alert-token-" + hashlib.sha256(str(soak.workdir).encode()).hexdigest()[:16]
    port = free_port()
    alert_env = {**soak.cli_env(tmp), soak.envs["development"].config.alerts.token_env: token}
    with open(rdir / "alerts.log", "ab") as fh:
        server = subprocess.Popen([sys.executable, "-m", "dr.cli", "alerts", "--host", "127.0.0.1", "--port", str(port),
                                   "--config", str(soak.config_path)], cwd=soak.workdir, env=alert_env,
                                  stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/alerts"
    try:
        deadline = time.monotonic() + 120
        while True:  # a GET is refused (405) without counting against the rate limit of POSTs
            try:
                if httpx.get(url, timeout=2).status_code == 405:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"the alert endpoint did not come up: {_last_error(rdir / 'alerts.log')}")
            time.sleep(0.3)

        # the two recoveries' data: a new set, T, the damage (as in a round)
        plans = {}
        for env in (dev, test):
            soak.env = env
            t, new, old = soak.prepare(0)
            plans[env.name] = (t, new, old, f"load-{env.name}-{int(time.time())}")
        soak.env = dev
        qa_rows = counts_of(qa.state())

        # the requests: valid (each id twice: a duplicate), unauthenticated, oversized
        requests: list[tuple[str, str | None, dict[str, Any] | bytes, str | None]] = []
        n_ids = alerts * 3 // 10
        for i in range(n_ids):
            rule, target = (("soak-database-down", "/subscriptions/x/resourceGroups/rg/servers/any")
                            if i % 2 == 0 else ("db-cpu", "/subscriptions/x/resourceGroups/rg/servers/k-soak-ts-pg"))
            body = _alert_body(f"/subscriptions/x/alerts/soak-{i:04d}", rule, target)
            requests += [("valid", token, body, body["data"]["essentials"]["alertId"])] * 2
        while len(requests) < alerts * 8 // 10:
            requests.append(("unauthenticated", "wrong-token" if len(requests) % 2 else None,
                             _alert_body(f"/subscriptions/x/alerts/unauth-{len(requests)}", "soak-database-down", "x"),
                             None))
        while len(requests) < alerts:
            requests.append(("oversized", token, b'{"pad": "' + b"x" * 8192 + b'"}', None))
        soak.rng.shuffle(requests)

        def post(req: tuple[str, str | None, Any, str | None]) -> tuple[str, str | None, int, dict[str, Any]]:
            kind, tok, body, alert_id = req
            headers = {"Authorization": f"Bearer {tok}"} if tok else {}
            try:
                if isinstance(body, bytes):
                    r = httpx.post(url, content=body, headers={**headers, "content-type": "application/json"},
                                   timeout=120)
                else:
                    r = httpx.post(url, json=body, headers=headers, timeout=120)
            except httpx.HTTPError as exc:
                return kind, alert_id, 0, {"error": f"{type(exc).__name__}: {exc}"}
            try:
                return kind, alert_id, r.status_code, r.json()
            except ValueError:
                return kind, alert_id, r.status_code, {"raw": r.text[:200]}

        # everything at once
        t0 = time.monotonic()
        runs = {}
        for env in (dev, test):
            t, _, _, incident = plans[env.name]
            runs[env.name] = soak.dr(["data-loss", "--service", SERVICE, "--env", env.name, "--time", _london(t),
                                      "--incident", incident, "--auto-approve"], rdir / f"{env.name}.log", tmp)
        with open(rdir / "nightly.log", "wb") as fh:
            nightly = subprocess.Popen([sys.executable, "-c", NIGHTLY_RUNNER, str(soak.config_path)], cwd=ROOT,
                                       env=soak.cli_env(tmp), stdin=subprocess.DEVNULL, stdout=fh,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(post, requests))
        out["alerts_seconds"] = time.monotonic() - t0
        ended: dict[str, tuple[int, float]] = {}
        procs = {**runs, "nightly": nightly}
        while len(ended) < len(procs):  # each one's own end time
            for name, proc in procs.items():
                if name not in ended and proc.poll() is not None:
                    ended[name] = (proc.returncode, time.monotonic() - t0)
            if time.monotonic() - t0 > 1800:
                for name, proc in procs.items():
                    if name not in ended:
                        signal_group(proc.pid, signal.SIGKILL)
                        ended[name] = (proc.wait(30), time.monotonic() - t0)
            time.sleep(0.2)
        out["ended"] = {k: {"rc": rc, "seconds": round(secs, 1)} for k, (rc, secs) in ended.items()}

        # the recoveries: exactly their own new set, their own backups and PTR servers, at the same time
        for env in (dev, test):
            t, new, old, incident = plans[env.name]
            rc = ended[env.name][0]
            if rc != 0:
                problems.append(f"the {env.name} recovery failed ({rc}): {_last_error(rdir / f'{env.name}.log')}")
                continue
            soak.env = env
            problems += [f"{env.name}: {p}" for p in soak.check_live(None, new) if not is_new_set(env.state(), new, old)]
            mine = [b for b in env.store.list_backups() if b.extra.get("label") == incident]
            if Counter(b.kind for b in mine if b.complete) != Counter({"pre-restore-safety": 1, "ptr": 1}):
                problems.append(f"{env.name}: the incident's backups are {[b.name for b in mine]}")
            for b in mine:
                if b.source_server not in (env.target.server, ptr_server_name(env.target.server, t)):
                    problems.append(f"{env.name}: backup {b.name} was taken of {b.source_server}: interleaved")
            steps = re.findall(r"step: (.+?)\s*$", (rdir / f"{env.name}.log").read_text(errors="replace"), re.M)
            if len(steps) != len(set(steps)) or STEP["tidy-up"] not in steps:
                problems.append(f"{env.name}: its steps ran out of order or twice: {steps}")
            why = soak.tidy_up(rdir / f"{env.name}-tidy.log", tmp)
            left = soak.leftovers(incident, tmp) if why is None else [f"tidy-up failed: {why}"]
            problems += [f"{env.name}: left after tidy-up: {x}" for x in left]
            soak.clear(incident, tmp)
        soak.env = dev

        # the nightly: complete, checksummed, and qa's rows
        if ended["nightly"][0] != 0:
            problems.append(f"the nightly failed: {_last_error(rdir / 'nightly.log')}")
        else:
            nightlies = [b for b in qa.store.list_backups() if b.kind == "nightly" and b.complete]
            if len(nightlies) != 1:
                problems.append(f"qa's store holds {len(nightlies)} complete nightlies, not 1")
            else:
                b = nightlies[0]
                sha, size, _ = store_files(qa.store.root)[b.name]
                if (sha, size) != (b.sha256, b.size):
                    problems.append(f"the nightly {b.name} does not match its recorded sha256/size")
                if {k.split(".", 1)[1]: v for k, v in (b.manifest or {}).get("rows", {}).items()} != qa_rows:
                    problems.append("the nightly's rows are not qa's")

        # the alerts
        limit = dev.config.alerts.rate_limit_per_minute
        codes = Counter(code for _, _, code, _ in answers)
        out["alert_answers"] = {str(k): v for k, v in sorted(codes.items())}
        if len(answers) != alerts:
            problems.append(f"{alerts} alerts sent, {len(answers)} answered")
        if codes[429] != max(alerts - limit, 0):
            problems.append(f"{codes[429]} alerts were rate-limited, expected {max(alerts - limit, 0)} "
                            f"(limit {limit} a minute)")
        expected = {"valid": {202, 200}, "unauthenticated": {401}, "oversized": {413}}
        for kind, alert_id, code, body in answers:
            if code != 429 and code not in expected[kind]:
                problems.append(f"a {kind} alert was answered {code}: {body}")
        started: dict[str, str] = {}
        by_id: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for kind, alert_id, code, body in answers:
            if kind == "valid" and code in (200, 202):
                by_id.setdefault(alert_id, []).append((code, body))
        for alert_id, got in by_id.items():
            firsts = [b for c, b in got if c == 202]
            if len(firsts) != 1 or len({b.get("flow_run_id") for _, b in got}) != 1:
                problems.append(f"alert {alert_id}: answers {[(c, b.get('status')) for c, b in got]} (not one started "
                                "run, or its repeat named another run)")
            if firsts:
                started[alert_id] = firsts[0]["flow_run_id"]
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

        with soak.prefect.client() as client:
            made = client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=[f"{SERVICE}-development", f"{SERVICE}-test"])), limit=200)
        made_ids = {str(r.id) for r in made}
        if made_ids != set(started.values()):
            problems.append(f"{len(made_ids)} runs were made for {len(started)} started alerts "
                            f"(lost: {len(set(started.values()) - made_ids)}, extra: {len(made_ids - set(started.values()))})")
        for r in made:
            if not (r.parameters or {}).get("wait_for_go_ahead") or r.state_type.value not in ("SCHEDULED", "PENDING"):
                problems.append(f"run {r.name} of an alert is {r.state_type.value}, go-ahead "
                                f"{(r.parameters or {}).get('wait_for_go_ahead')}: it did not wait for a person")
        out["alerts_started"] = len(started)
        out["alerts_duplicates"] = sum(1 for *_, code, body in answers if code == 200 and body.get("status") == "duplicate")
    finally:
        signal_group(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            signal_group(server.pid, signal.SIGKILL)
    out["ok"] = not problems
    return out


def load_table(out: dict[str, Any]) -> str:
    ended = out.get("ended", {})
    lines = ["| under load, at once | outcome |", "|---|---|"]
    for name, label in (("development", "data-loss recovery of development"), ("test", "data-loss recovery of test"),
                        ("nightly", "nightly backup of qa")):
        e = ended.get(name, {})
        lines.append(f"| {label} | exit {e.get('rc')}, {e.get('seconds')} s |")
    lines.append(f"| alert POSTs (answers by status) | {out.get('alert_answers')}; runs started "
                 f"{out.get('alerts_started')}, duplicates {out.get('alerts_duplicates')} |")
    lines.append(f"| problems | {len(out.get('problems', []))} |")
    return "\n".join(lines + [f"- {p}" for p in out.get("problems", [])])


# --- the table ------------------------------------------------------------------------------------------


def table(results: list[RoundResult]) -> str:
    """Kills per phase, each invariant's violations, resumes that finished, mean time to resume, leftovers."""
    rounds = [r for r in results if r.phase != "calibration"]
    head = ["phase", "kills", "in phase", *[f"{i} viol." for i in INVARIANTS], "error page", "resumed",
            "mean resume s", "final wrong", "leftovers", "incomplete kept"]
    rows = []
    for phase in [p for p in PHASES if any(r.phase == p for r in rounds)] + ["all"]:
        rs = [r for r in rounds if phase == "all" or r.phase == phase]
        resumes = [r.resume_seconds for r in rs if r.resumed and r.resume_seconds is not None]
        rows.append([
            LABELS.get(phase, phase), str(len(rs)), str(sum(r.hit for r in rs)),
            *[str(sum(len(r.violations[i]) for r in rs)) for i in INVARIANTS],
            str(sum(r.error_page for r in rs)), f"{sum(r.resumed for r in rs)}/{len(rs)}",
            f"{statistics.mean(resumes):.1f}" if resumes else "-", str(sum(bool(r.final) for r in rs)),
            str(sum(len(r.leftovers) for r in rs)), str(sum(len(r.incomplete_backups) for r in rs)),
        ])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    taken = sum(r.slot_left_taken for r in rounds)
    freed = sum(r.slot_left_taken and r.slot_freed_by_resume for r in rounds)
    out.append(f"\nrecovery slots a killed run left taken: {taken}/{len(rounds)}; freed at once by the resume "
               f"(its holder's process provably gone, said in its log): {freed}/{taken}; freed by hand: 0")
    return "\n".join(out)


def details(results: list[RoundResult]) -> str:
    lines = []
    for r in results:
        problems = ([f"{k}: {v}" for k, vs in r.violations.items() for v in vs] + [f"final: {x}" for x in r.final]
                    + [f"leftover: {x}" for x in r.leftovers] + ([f"note: {r.note}"] if r.note else []))
        if problems:
            lines.append(f"round {r.n} ({r.phase}, killed in {r.killed_in}; logs {r.logs}):")
            lines += [f"  - {p}" for p in problems]
    return "\n".join(lines) or "no violation, failure or leftover in any round"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases to kill in: " + ", ".join(PHASES))
    ap.add_argument("--order", choices=("walk", "random"), default="walk",
                    help="walk the phases in turn (default) or pick one at random each round")
    ap.add_argument("--size", default="30mb", help="sample database size (default 30mb)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, help="default: a new directory under /tmp (kept: it holds the logs)")
    ap.add_argument("--load", action="store_true", help="also run the concurrent load (recoveries, nightly, alerts)")
    ap.add_argument("--json", type=Path, help="write every round's result here")
    ap.add_argument("--from-json", type=Path, help="print the table of an earlier run and exit")
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        results = [RoundResult(**{k: v for k, v in r.items() if k in RoundResult.__dataclass_fields__})
                   for r in data["rounds"]]
        say(table(results))
        say(details(results))
        return 0
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        ap.error(f"unknown phases {unknown}; accepted: {', '.join(PHASES)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dr-chaos-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"work directory {workdir}")
    envs = ("development", "test", "qa") if args.load else ("development",)
    soak = Soak(workdir, size=args.size, seed=args.seed, environments=envs)
    soak.json_path = args.json
    load_result = None
    try:
        soak.up()
        if args.rounds:
            soak.run(args.rounds, phases, args.order)
        if args.load:
            try:
                load_result = run_load(soak)
            except Exception as exc:  # the rounds' table is still printed
                load_result = {"ok": False, "problems": [f"the load run itself failed: {type(exc).__name__}: {exc}"]}
    finally:
        soak.close()
    say("\n" + table(soak.results))
    say(details(soak.results))
    if load_result is not None:
        say("\n" + load_table(load_result))
    if args.json:
        args.json.write_text(json.dumps({"rounds": [asdict(r) for r in soak.results], "load": load_result,
                                         "size": args.size, "seed": args.seed}, indent=2, default=str))
    bad = [r for r in soak.results if not r.ok]
    return 1 if bad or (load_result and not load_result.get("ok")) else 0


if __name__ == "__main__":
    sys.exit(main())
