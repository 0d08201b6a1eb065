"""A parallel restore that starts loading rows, and building indexes, while the backup is still being read.

`pg_restore -j N` restores a custom archive table by table, N at a time, but it needs the
archive as a local file (it seeks), so a stored backup must be downloaded and decompressed
whole before the first row is loaded. For an uncompressed custom archive (our `custom-zstd`
backups, decompressed on the way) this loader instead:

1. reads the archive's header and table of contents (`dr.pgarchive`) and writes those bytes alone
   to a small file: an archive without data;
2. restores the schema from it with `pg_restore -L` (the pre-data entries);
3. streams the rows while the backup is still being read and its checksum computed: each table's
   COPY rows go to one of `jobs` connections, which loads them frozen (`TRUNCATE` and
   `COPY ... FREEZE` in one transaction; see `_frozen`), the next table to the least busy one;
4. as soon as a table's rows are committed, builds its indexes and constraints (and a foreign
   key once both its tables are in), one `pg_restore -L` per entry, `jobs` at a time (one fewer
   while rows are still loading), following the dependencies pg_dump recorded in the TOC;
5. restores everything else after the data from the small file with `pg_restore -j N -L`:
   sequence values, statistics, comments, privileges, and whatever waits on them, in
   pg_restore's own order and parallelism.

The archive stays exactly what pg_dump wrote (a hand restore is `zstd -d | pg_restore`); the rows
arrive in the same tables through the same COPY statements pg_restore would run (frozen), and
every other entry is restored by pg_restore itself. Any failure raises and leaves the (new)
database to the caller to drop.
"""

from __future__ import annotations

import logging
import queue
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import psycopg
from psycopg import sql

from dr.commands import ConnInfo, PgTools, Running
from dr.errors import RestoreError
from dr.pgarchive import ArchiveHead, ArchiveStream, TocEntry

log = logging.getLogger("dr.loader")

#: session settings pg_restore makes before loading data (`_doSetFixedOutputState`), besides the
#: archive's own ENCODING / STDSTRINGS / SEARCHPATH entries
_SESSION = ("SET statement_timeout = 0", "SET lock_timeout = 0", "SET idle_in_transaction_session_timeout = 0",
            "SET client_min_messages = warning", "SET row_security = off")
_SPECIAL = ("ENCODING", "STDSTRINGS", "SEARCHPATH")
#: pieces of rows (one per buffer of the decompressed stream) waiting for each connection
QUEUED = 2


def _write_list(path: Path, entries: list[TocEntry]) -> Path:
    """A `pg_restore -L` list: the dump ids to restore, in this order."""
    path.write_text("".join(f"{e.dump_id};\n" for e in entries))
    return path


def _copy_target(copy_stmt: str) -> tuple[str, ...] | None:
    """The (schema, table) a pg_dump COPY statement loads, its identifiers unquoted as pg_dump's
    `fmtId` quotes them; None if the statement does not read as one."""
    m = re.match(r'COPY ((?:"(?:[^"]|"")*"|[a-z_][a-z0-9_]*)(?:\.(?:"(?:[^"]|"")*"|[a-z_][a-z0-9_]*))*) ', copy_stmt)
    if not m:
        return None
    parts = re.findall(r'"((?:[^"]|"")*)"|([a-z_][a-z0-9_]*)', m.group(1))
    return tuple(q.replace('""', '"') if q else bare for q, bare in parts)


def _frozen(entry: TocEntry) -> str | None:
    """The COPY statement loading this table's rows frozen, or None if they cannot be.

    `COPY ... FREEZE` writes the rows already frozen and visible to all (PostgreSQL requires the
    table to be created or truncated in the same transaction, hence one connection per table): the
    first reads of the new rows (index builds, constraint checks, the row counts) then need not set
    their hint bits, which on a server with data checksums writes every page read to the WAL a
    second time after each checkpoint (42 % of the WAL of a 1 GB restore), and vacuum need not
    freeze them later. Not for rows loaded through a partitioned table's root.
    """
    stmt = entry.copy_stmt or ""
    if not stmt.rstrip().endswith("FROM stdin;") or _copy_target(stmt) != (entry.namespace, entry.tag):
        return None
    return stmt.rstrip()[:-1] + " WITH (FREEZE);"


class _Loaders:
    """`jobs` threads, each with its own connection, loading tables' COPY rows from its own queue:
    every table by one connection in one transaction (frozen where it can be), the next table by
    the least busy connection while the previous one is still being committed."""

    def __init__(self, target: ConnInfo, head: ArchiveHead, jobs: int):
        self.target, self.jobs = target, jobs
        self.tables = head.table_data()
        self.session = [e.defn for e in head.entries if e.desc in _SPECIAL and e.defn] + list(_SESSION)
        self.queues: list[queue.Queue] = [queue.Queue(maxsize=QUEUED) for _ in range(jobs)]
        self.assigned: dict[int, int] = {}  # dump id -> connection
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), name=f"dr-loader-{i}", daemon=True)
                        for i in range(jobs)]
        #: called with (dump id, bytes of rows) once a table's rows are committed
        self.on_loaded: Callable[[int, int], None] = lambda dump_id, size: None
        self.frozen: list[int] = []  # tables loaded frozen

    def __enter__(self) -> "_Loaders":
        for t in self.threads:
            t.start()
        return self

    def _put(self, i: int, item: tuple[int, bytes | None]) -> None:
        while not self.failed.is_set():
            try:
                self.queues[i].put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        self.raise_first()

    def put(self, dump_id: int, piece: bytes) -> None:
        i = self.assigned.get(dump_id)
        if i is None:  # a new table: to the connection with the least left to load
            i = self.assigned[dump_id] = min(range(self.jobs), key=lambda k: self.queues[k].qsize())
        self._put(i, (dump_id, piece))

    def end_of_table(self, dump_id: int) -> None:
        """Every piece of this table has been handed out; `on_loaded` follows its commit."""
        if dump_id in self.assigned:
            self._put(self.assigned[dump_id], (dump_id, None))
        else:  # no rows: nothing to load
            self.on_loaded(dump_id, 0)

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]

    def finish(self) -> None:
        """Wait for every piece to be loaded; raises the first loader's error."""
        for i in range(self.jobs):
            self._put(i, (0, None))  # the end
        for t in self.threads:
            t.join()
        self.raise_first()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # stop the loaders without committing what they hold
            self.failed.set()
            for t in self.threads:
                t.join(timeout=30)

    def _name(self, dump_id: int) -> str:
        e = self.tables.get(dump_id)
        return f"{e.namespace}.{e.tag}" if e else f"dump id {dump_id}"

    def _run(self, i: int) -> None:
        current, copy_cm, copy, size = None, None, None, 0
        con = None
        try:
            con = psycopg.connect(**self.target.psycopg_kwargs(), autocommit=True)
            for statement in self.session:
                con.execute(statement)
            cur = con.cursor()
            while not self.failed.is_set():
                try:
                    dump_id, piece = self.queues[i].get(timeout=0.5)
                except queue.Empty:
                    continue
                if dump_id == 0:  # the end
                    break
                if piece is None:  # the end of the table: commit
                    cm, copy_cm = copy_cm, None
                    cm.__exit__(None, None, None)
                    con.execute("COMMIT")
                    self.on_loaded(current, size)
                    current = None
                    continue
                if copy_cm is None:
                    current, size = dump_id, 0
                    entry = self.tables[dump_id]
                    con.execute("BEGIN")
                    stmt = _frozen(entry)
                    if stmt:
                        cur.execute(sql.SQL("TRUNCATE ONLY {}").format(sql.Identifier(entry.namespace, entry.tag)))
                        self.frozen.append(dump_id)
                    copy_cm = cur.copy(stmt or entry.copy_stmt)
                    copy = copy_cm.__enter__()
                copy.write(piece)
                size += len(piece)
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            what = self._name(current) if current is not None else "the restore session"
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.errors.append(RestoreError(f"loading the rows of {what} into {self.target.dbname} failed: {detail}",
                                            database=self.target.dbname))
            self.failed.set()
        finally:
            if con is not None:
                con.close()  # in the middle of a COPY or transaction (stopped): the server rolls it back


#: what is restored as soon as the rows it reads are in, while other tables' rows are still loading:
#: the expensive post-data entries, each built from its table's rows
EARLY = ("INDEX", "CONSTRAINT", "FK CONSTRAINT")
#: relations whose rows do not come in a data block (a partitioned table, a materialized view)
_RELATIONS = ("TABLE", "MATERIALIZED VIEW", "FOREIGN TABLE", "VIEW")


def early_entries(head: ArchiveHead, after: list[TocEntry]) -> dict[int, tuple[frozenset[int], frozenset[int]]]:
    """The entries of `after` that can run as soon as some tables' rows are in, as
    {dump id: (the TABLE DATA ids whose rows they read, the early entries that must be done first)}.

    Only indexes and constraints qualify, and only when every dependency is either restored with
    the schema, a table with a data block, or another early entry; anything on a partitioned table
    or a materialized view, or depending on an entry restored later, waits for the final pg_restore.
    """
    by_id = {e.dump_id: e for e in head.entries}
    data = head.table_data()
    data_of = {dep: d.dump_id for d in data.values() for dep in d.deps if by_id.get(dep) and by_id[dep].desc == "TABLE"}
    after_ids = {e.dump_id for e in after}
    plan: dict[int, tuple[frozenset[int], frozenset[int]]] = {}
    for e in after:
        if e.desc not in EARLY or e.restore_pass() != 0:
            continue
        reads: set[int] = set()
        first: set[int] = set()
        ok = True
        for dep in e.deps:
            d = by_id.get(dep)
            if d is None:
                ok = False
            elif dep in data:
                reads.add(dep)
            elif dep in after_ids:
                if dep in plan:
                    reads |= plan[dep][0]
                    first.add(dep)
                else:
                    ok = False
            elif d.desc in _RELATIONS:
                if dep in data_of:
                    reads.add(data_of[dep])
                else:
                    ok = False
            if not ok:
                break
        if ok and reads:
            plan[e.dump_id] = (frozenset(reads), frozenset(first))
    return plan


class _Early:
    """Runs the early entries with `jobs` pg_restore processes at a time, each as soon as the rows
    it reads are committed and the entries it needs are done; biggest tables first.

    Two entries touching the same table run together only if both are indexes (CREATE INDEX takes
    a SHARE lock; a constraint takes a lock that conflicts with it and with another constraint's):
    this also keeps two foreign keys from locking the same pair of tables in opposite orders.
    """

    def __init__(self, plan: dict[int, tuple[frozenset[int], frozenset[int]]], head: ArchiveHead,
                 start: Callable[[Path, bool], Running], workdir: Path, jobs: int):
        self.plan, self.start, self.workdir, self.jobs = plan, start, workdir, jobs
        self.loading = True  # rows are still being loaded
        self.entries = {e.dump_id: e for e in head.entries}
        self.order = {e.dump_id: i for i, e in enumerate(head.entries)}
        self.pending = set(plan)
        self.loaded: dict[int, int] = {}  # TABLE DATA id -> bytes
        self.done: set[int] = set()
        self.running: dict[int, Running | None] = {}
        self.cond = threading.Condition()
        self.stopping = False
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, name=f"dr-loader-post-{i}", daemon=True)
                        for i in range(jobs)]

    def __enter__(self) -> "_Early":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # stop: kill what runs, start nothing more
            with self.cond:
                self.stopping = True
                procs = [p for p in self.running.values() if p is not None]
                self.cond.notify_all()
            for p in procs:
                p.kill()
            for t in self.threads:
                t.join(timeout=30)

    def rows_loaded(self) -> None:
        """Every row is in: all `jobs` slots are for indexes and constraints from now on."""
        with self.cond:
            self.loading = False
            self.cond.notify_all()

    def table_loaded(self, dump_id: int, size: int) -> None:
        with self.cond:
            self.loaded[dump_id] = size
            self.cond.notify_all()

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]

    def finish(self) -> set[int]:
        """Wait for every early entry (all rows are in by now); returns the dump ids done."""
        with self.cond:
            self.cond.notify_all()
            while (self.pending or self.running) and not self.errors:
                self.cond.wait(0.5)
            self.stopping = True
            self.cond.notify_all()
        for t in self.threads:
            t.join()
        self.raise_first()
        return set(self.done)

    def _conflicts(self, dump_id: int) -> bool:
        tables = self.plan[dump_id][0]
        index = self.entries[dump_id].desc == "INDEX"
        return any(tables & self.plan[r][0] and not (index and self.entries[r].desc == "INDEX") for r in self.running)

    def _next(self) -> int | None:
        if self.loading and len(self.running) >= max(1, self.jobs - 1):  # a core for the rows
            return None
        ready = [i for i in self.pending
                 if self.plan[i][0] <= self.loaded.keys() and self.plan[i][1] <= self.done and not self._conflicts(i)]
        if not ready:
            return None
        return min(ready, key=lambda i: (-max(self.loaded[t] for t in self.plan[i][0]), self.order[i]))

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and (nxt := self._next()) is None:
                    self.cond.wait(0.5)
                if self.stopping:  # stopped (on a failure: killed below), or nothing left
                    return
                self.pending.discard(nxt)
                self.running[nxt] = None
                loading = self.loading
            try:
                proc = self.start(_write_list(self.workdir / f"early-{nxt}.list", [self.entries[nxt]]), loading)
                with self.cond:
                    self.running[nxt] = proc
                    stop = self.stopping
                if stop:
                    proc.kill()
                proc.finish()
            except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
                with self.cond:
                    self.errors.append(exc)
                    self.stopping = True
                    self.running.pop(nxt, None)
                    self.cond.notify_all()
                return
            with self.cond:
                self.running.pop(nxt, None)
                self.done.add(nxt)
                self.cond.notify_all()


def stream_restore(tools: PgTools, head: ArchiveHead, stream: ArchiveStream, target: ConnInfo, env: dict[str, str],
                   *, jobs: int, workdir: Path, restore_args: Iterable[str] = ()) -> dict[str, float]:
    """Restore the archive whose head `stream` has just read into the empty database `target`.

    Returns the seconds each phase took. Raises `ArchiveFormatError` if the stream is damaged,
    `CommandError` if pg_restore fails, `RestoreError` if loading rows fails.
    """
    toc = workdir / "toc.pgdump"
    toc.write_bytes(head.raw)
    before, after = head.phases()
    common = ["--no-owner", "--exit-on-error", "--no-password", *restore_args, "-d", target.dbname]
    times: dict[str, float] = {}

    t = time.monotonic()
    tools.run("pg_restore", [*common, "-L", str(_write_list(workdir / "schema.list", before)), str(toc)], env=env)
    times["schema"] = time.monotonic() - t

    t = time.monotonic()
    plan = early_entries(head, after)

    def start(path: Path, loading: bool) -> Running:
        # while rows are loading, an index build keeps to one core (no parallel workers) and leaves the
        # other to the COPY, whose table is the next one's chain
        options = {**env, "PGOPTIONS": "-c max_parallel_maintenance_workers=0"} if loading else env
        return tools.start("pg_restore", [*common, "-L", str(path), str(toc)], env=options, stdout=subprocess.DEVNULL)

    with _Loaders(target, head, jobs) as loaders, _Early(plan, head, start, workdir, jobs) as early:
        loaders.on_loaded = early.table_loaded
        for dump_id, pieces in stream.blocks():
            for rows in pieces:
                loaders.put(dump_id, rows)
            loaders.end_of_table(dump_id)
            early.raise_first()
        for _ in stream.rest():  # to the end: the checksum and the zstd frame are checked there
            pass
        loaders.finish()
        early.rows_loaded()
        times["rows"] = time.monotonic() - t
        done = early.finish()
    times["early"] = time.monotonic() - t

    t = time.monotonic()
    rest = [e for e in after if e.dump_id not in done]
    tools.run("pg_restore", [*common, f"--jobs={jobs}", "-L", str(_write_list(workdir / "rest.list", rest)),
                             str(toc)], env=env)
    times["post-data"] = time.monotonic() - t
    log.info("restored in phases: schema %.1f s, rows %.1f s (%d connections, %d of %d tables frozen; %d indexes and "
             "constraints built as their tables' rows came in, done at %.1f s), the rest %.1f s", times["schema"],
             times["rows"], jobs, len(loaders.frozen), len(loaders.tables), len(done), times["early"], times["post-data"])
    return times
