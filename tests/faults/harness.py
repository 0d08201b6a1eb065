"""Fault-injection harness: a snapshot of the world, the nothing-lost invariant, process control.

A fault test takes a `snapshot` of the world, injects its fault at the boundary (a killed
or frozen process, a stopped server, damaged bytes, a full disk), takes another snapshot
and calls `assert_nothing_lost`. The world is:

- the live database, as one md5 per table over every row (`t::text`, in a fixed order),
  the value of every sequence and the bytes of every large object;
- every file in the backup store (hidden ones too) and, per backup, the sha256 of its
  bytes and its sidecar;
- every server with its tags, and every database of every running server with its comment;
- what a run leaves in the state directory (spool directories).

Processes are found through /proc (children of this process, by their `comm`), frozen with
SIGSTOP the moment they appear, let run a few hundred kilobytes of I/O at a time (SIGCONT,
watching /proc/<pid>/io, SIGSTOP) until the world is at the wanted point, and killed with
SIGKILL: the product's own Python is never patched.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from dr.database import REPLACED_COMMENT
from dr.platforms.base import (
    TAG_CREATED_BY,
    TAG_CREATED_BY_VALUE,
    TAG_PURPOSE,
    TAG_SOURCE,
)
from dr.platforms.local.store import META_SUFFIX

#: the words a DR error uses to say what the world looks like after it (see STYLE.md, rule 1)
WORLD_STATE_WORDS = ("untouched", "the world is now", "to resume")

_TABLES = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'
ORDER BY 1, 2
"""
_ROWS = "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text COLLATE \"C\"), '')) FROM {}.{} t"
_SEQUENCES = """SELECT schemaname, sequencename, last_value FROM pg_sequences
                WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"""
_LARGE_OBJECTS = """SELECT m.oid::text, length(lo_get(m.oid)), md5(lo_get(m.oid))
                    FROM pg_largeobject_metadata m ORDER BY m.oid"""


# --- the world ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredBackup:
    """One backup file as it is on disk."""

    sha256: str
    size: int
    meta: dict[str, Any] | None  # the sidecar; None for a file put there by other tooling

    @property
    def complete(self) -> bool:
        return bool(self.meta and self.meta.get("complete"))


@dataclass(frozen=True)
class World:
    live: dict[str, str]  # "table schema.name" -> "<rows>:<md5>", "sequence schema.name" -> last value,
    #                       "large object <oid>" -> "<bytes>:<md5>"
    backups: dict[str, StoredBackup]
    store_files: frozenset[str]
    servers: dict[str, dict[str, str]]  # name -> tags
    databases: dict[str, dict[str, str | None]]  # running server -> {database: comment}
    strays: frozenset[str] = field(default_factory=frozenset)
    live_server: str = ""

    def backups_of_kind(self, kind: str) -> list[str]:
        return sorted(n for n, b in self.backups.items() if b.meta and b.meta.get("kind") == kind)


def db_state(conn_kwargs: dict[str, Any]) -> dict[str, str]:
    """Every table's row count and row checksum, every sequence's value and every large object's bytes."""
    state: dict[str, str] = {}
    with psycopg.connect(**conn_kwargs, autocommit=True) as c:
        c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        for schema, table in c.execute(_TABLES).fetchall():
            n, digest = c.execute(sql.SQL(_ROWS).format(sql.Identifier(schema), sql.Identifier(table))).fetchone()
            state[f"table {schema}.{table}"] = f"{n}:{digest}"
        for schema, seq, value in c.execute(_SEQUENCES).fetchall():
            state[f"sequence {schema}.{seq}"] = str(value)
        for oid, size, digest in c.execute(_LARGE_OBJECTS).fetchall():
            state[f"large object {oid}"] = f"{size}:{digest}"
        c.execute("COMMIT")
    return state


def live_state(env, database: str | None = None, server: str | None = None) -> dict[str, str]:
    """`db_state` of the environment's live database (or another database / server)."""
    return db_state(env.conn(database, server).psycopg_kwargs())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except ValueError:  # damaged: recorded by its bytes, so that any change to it still shows
        return {"unreadable sidecar sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def store_files(env) -> frozenset[str]:
    """Every entry of the store directory, hidden staging files included."""
    return frozenset(p.name for p in env.platform.store.root.iterdir())


def snapshot(env, *, ignore_files: Iterable[str] = ()) -> World:
    """The world of one local environment, as it is now."""
    root: Path = env.platform.store.root
    ignore = set(ignore_files)
    files = frozenset(n for n in store_files(env) if n not in ignore)
    backups = {}
    for name in files:
        if name.startswith(".") or name.endswith(META_SUFFIX) or not (root / name).is_file():
            continue
        meta_path = root / (name + META_SUFFIX)
        meta = _read_sidecar(meta_path) if meta_path.exists() else None
        backups[name] = StoredBackup(_sha256(root / name), (root / name).stat().st_size, meta)
    servers_api = env.platform.servers
    servers, databases = {}, {}
    for srv in servers_api.list_servers():
        servers[srv.name] = dict(srv.tags)
        if srv.state == "Ready":
            admin = servers_api.connection(srv.name, "postgres")
            with psycopg.connect(**admin.psycopg_kwargs(), autocommit=True) as c:
                databases[srv.name] = dict(c.execute(
                    "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
                    "WHERE NOT datistemplate ORDER BY 1").fetchall())
    live = (live_state(env) if env.target.server in databases and env.target.database in databases[env.target.server]
            else {})
    state_dir = Path(env.config.local.state_dir).absolute()
    strays = frozenset(p.name for p in state_dir.glob("dr-spool-*")) if state_dir.exists() else frozenset()
    return World(live, backups, files, servers, databases, strays, env.target.server)


# --- the invariant ------------------------------------------------------------------------


def _diff(a: dict[str, str], b: dict[str, str]) -> str:
    keys = sorted(set(a) | set(b))
    lines = [f"  {k}: {a.get(k, '<missing>')} -> {b.get(k, '<missing>')}" for k in keys if a.get(k) != b.get(k)]
    return "\n".join(lines[:12]) + (f"\n  (+{len(lines) - 12} more)" if len(lines) > 12 else "")


def assert_nothing_lost(
    before: World,
    after: World,
    allowed_states: Iterable[dict[str, str]] = (),
    *,
    new_backup_kinds: Iterable[str] = (),
    servers_may_appear: bool = False,
    replaced_databases: int | None = 0,
    restore_leftovers: Iterable[str] = (),
) -> None:
    """Assert that the fault lost nothing and left nothing unaccounted for.

    Args:
        before: the world before the fault.
        after: the world after it.
        allowed_states: `db_state`s the live database may hold instead of its state before
            (the expected restored states); anything else fails.
        new_backup_kinds: kinds of backup that may have appeared (each must be complete and its
            bytes match its recorded sha256 and size); default: no new backup at all.
        servers_may_appear: whether new servers may appear (each must carry the tool's tags).
        replaced_databases: how many new `<db>_replaced_<stamp>` databases, recorded with their
            comment, must have appeared on the live server (none on any other); None for any number.
        restore_leftovers: names of half-restored `_restore_` databases that the error reported
            as left behind (each must carry the tool's comment, so that tidy-up finds it).
    """
    problems: list[str] = []

    # 1. the live database is exactly as before, or exactly one of the expected restored states
    states = [dict(s) for s in allowed_states]
    if after.live != before.live and after.live not in states:
        closest = min(states, key=lambda s: len(set(s.items()) ^ set(after.live.items()))) if states else before.live
        problems.append("the live database is neither as it was nor an expected restored state:\n"
                        + _diff(closest, after.live))

    # 2. no backup lost or changed
    for name, b in before.backups.items():
        if name not in after.backups:
            problems.append(f"backup {name} was lost")
        elif after.backups[name] != b:
            problems.append(f"backup {name} was changed (sha256 {b.sha256[:12]} -> {after.backups[name].sha256[:12]}, "
                            f"sidecar {'changed' if b.meta != after.backups[name].meta else 'same'})")

    # 3. a new backup is only ever a complete one whose bytes match what was recorded
    kinds = set(new_backup_kinds)
    new = sorted(set(after.backups) - set(before.backups))
    for name in new:
        b = after.backups[name]
        if b.meta is None:
            problems.append(f"{name} appeared without a sidecar: it is listed as a complete foreign backup")
            continue
        if not b.complete:
            problems.append(f"{name} appeared as an incomplete backup")
        if b.meta.get("sha256") != b.sha256 or b.meta.get("size") != b.size:
            problems.append(f"{name}: its bytes do not match its recorded sha256/size")
        if b.meta.get("kind") not in kinds:
            problems.append(f"an unexpected backup {name} of kind {b.meta.get('kind')!r} appeared")
    expected_files = {n for n in new} | {n + META_SUFFIX for n in new}
    for name in sorted(after.store_files - before.store_files - expected_files):
        problems.append(f"a stray file {name} was left in the store")
    for name in sorted(after.strays - before.strays):
        problems.append(f"a stray {name} was left in the state directory")

    # 4. servers: none lost or retagged; new ones only when allowed, and tagged as ours
    for name, tags in before.servers.items():
        if name not in after.servers:
            problems.append(f"server {name} disappeared")
        elif after.servers[name] != tags:
            problems.append(f"the tags of server {name} changed: {tags} -> {after.servers[name]}")
    for name in sorted(set(after.servers) - set(before.servers)):
        tags = after.servers[name]
        if not servers_may_appear:
            problems.append(f"a server {name} appeared")
        if tags.get(TAG_CREATED_BY) != TAG_CREATED_BY_VALUE or not tags.get(TAG_PURPOSE) or not tags.get(TAG_SOURCE):
            problems.append(f"server {name} is not tagged as created by this tool: {tags}")

    # 5. databases: none lost; new ones only the recorded `_replaced_` ones (and reported leftovers)
    leftovers = set(restore_leftovers)
    for server in sorted(set(before.databases) & set(after.databases)):
        was, now = before.databases[server], after.databases[server]
        for db in sorted(set(was) - set(now)):
            problems.append(f"database {db} on {server} disappeared")
        replaced = 0
        for db in sorted(set(now) - set(was)):
            comment = now[db] or ""
            if "_replaced_" in db and comment.startswith(REPLACED_COMMENT):
                replaced += 1
            elif "_restore_" in db and db in leftovers and comment.startswith("dr: restoring "):
                pass
            else:
                problems.append(f"a database {db} was left on {server} (comment {comment!r})")
        want = replaced_databases if server == after.live_server else 0
        if want is not None and replaced != want:
            problems.append(f"{replaced} new replaced databases on {server}, expected {want}")
    for server in sorted(set(before.databases) - set(after.databases)):
        if server in after.servers:
            problems.append(f"server {server} is no longer running")
    assert not problems, "the fault lost or left something:\n- " + "\n- ".join(problems)


def assert_says_world_state(exc: BaseException) -> None:
    """The error tells the person what the world looks like now (STYLE.md rule 1)."""
    text = str(exc)
    assert any(w in text for w in WORLD_STATE_WORDS), f"the error does not say what state the world is in: {text}"


# --- processes -----------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    comm = raw[raw.index("(") + 1: raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2:].split()
    return comm, rest[0], int(rest[1])


def descendants(root: int | None = None) -> dict[int, str]:
    """Every live descendant of `root` (default: this process), pid -> comm."""
    root = root or os.getpid()
    table: dict[int, tuple[str, int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            st = _stat(int(p.name))
            if st and st[1] != "Z":
                table[int(p.name)] = (st[0], st[2])
    out: dict[int, str] = {}
    frontier = {root}
    while frontier:
        nxt = {pid for pid, (_, ppid) in table.items() if ppid in frontier and pid not in out}
        for pid in nxt:
            out[pid] = table[pid][0]
        frontier = nxt
    return out


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] != "Z"


def children(pid: int | None = None) -> dict[int, str]:
    """The live direct children of `pid` (default: this process), pid -> comm; cheap enough to poll."""
    pid = pid or os.getpid()
    out: dict[int, str] = {}
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = f.read_text().split()
        except OSError:
            continue
        for kid in kids:
            st = _stat(int(kid))
            if st and st[1] != "Z":
                out[int(kid)] = st[0]
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def wait_for_child(comm: str, argv_has: str, *, timeout: float = 120,
                   while_: Callable[[], bool] = lambda: True) -> int:
    """The pid of this process's first child named `comm` with `argv_has` among its arguments.

    The child is FROZEN (SIGSTOP) the moment it is seen. `argv_has` tells the real run from
    the tool's other calls of the same program (e.g. `pg_dump --version`).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and while_():
        for pid, name in children().items():
            if name == comm and any(argv_has in arg for arg in cmdline(pid)):
                freeze(pid)
                return pid
        time.sleep(0.001)
    raise AssertionError(f"no {comm} process with {argv_has!r} in its arguments appeared within {timeout} s")


def freeze(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        pass


def thaw(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def io_bytes(pid: int, field: str) -> int:
    """A counter of /proc/<pid>/io (`rchar`: bytes read, `wchar`: bytes written); -1 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == field:
                return int(value)
    except (OSError, ValueError):
        pass
    return -1


def step_until(pid: int, cond: Callable[[], bool], *, progress: str, step: int = 256 * 1024,
               timeout: float = 120) -> bool:
    """Let a frozen process do `step` more bytes of I/O at a time until `cond()` holds. False if it ended first.

    The process is left FROZEN. Steps are measured in bytes (`progress` is `rchar` or `wchar`),
    not in time, so a loaded machine cannot let it run to the end between two looks at the world:
    this is what makes "kill it in the middle" deterministic.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return False
        if cond():
            return alive(pid)
        target = io_bytes(pid, progress) + step
        thaw(pid)
        looked = time.monotonic()
        while alive(pid) and 0 <= io_bytes(pid, progress) < target and time.monotonic() < deadline:
            time.sleep(0.0005)
            if time.monotonic() - looked > 0.02:  # it may be waiting on its own children (pg_restore -j)
                looked = time.monotonic()
                if cond():
                    break
        freeze(pid)
        time.sleep(0.02)  # let the other end of its pipe catch up
    raise AssertionError(f"process {pid} did not reach the wanted point within {timeout} s")


@dataclass
class Outcome:
    """What a flow run in a thread ended with."""

    result: Any = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def join(self, timeout: float = 300) -> Outcome:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the run did not end within {timeout} s"
        return self


def in_thread(fn: Callable[..., Any], **kw: Any) -> Outcome:
    """Start `fn(**kw)` in a thread; `join()` the outcome."""
    out = Outcome()

    def run() -> None:
        try:
            out.result = fn(**kw)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.error = exc

    out.thread = threading.Thread(target=run, daemon=True, name=f"fault-{getattr(fn, '__name__', 'run')}")
    out.thread.start()
    return out
