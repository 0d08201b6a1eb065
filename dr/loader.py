"""A parallel restore that starts loading rows while the backup is still being read.

`pg_restore -j N` restores a custom archive table by table, N at a time, but it needs the
archive as a local file (it seeks), so a stored backup must be downloaded and decompressed
whole before the first row is loaded, and one big table is loaded by one connection however many
jobs there are. For an uncompressed custom archive (our `custom-zstd` backups, decompressed on the
way) this loader instead:

1. reads the archive's header and table of contents (`dr.pgarchive`) and writes those bytes alone
   to a small file: an archive without data;
2. restores the schema from it with `pg_restore -L` (the pre-data entries);
3. streams the rows: every data block's COPY rows are cut at row boundaries into pieces and
   loaded by `jobs` connections at once (`COPY ... FROM STDIN`), so the biggest table is loaded by
   all of them, while the backup is still being read and its checksum computed;
4. restores everything after the data from the small file with `pg_restore -j N -L`: sequence
   values, statistics, indexes, constraints, privileges, in pg_restore's own order and parallelism.

The archive stays exactly what pg_dump wrote (a hand restore is `zstd -d | pg_restore`); the rows
arrive in the same tables through the same COPY statements pg_restore would run; only their
physical order within a table may differ. Any failure raises and leaves the (new) database to the
caller to drop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import psycopg

from dr.commands import ConnInfo, PgTools
from dr.errors import RestoreError
from dr.pgarchive import ArchiveHead, ArchiveStream, TocEntry

log = logging.getLogger("dr.loader")

#: session settings pg_restore makes before loading data (`_doSetFixedOutputState`), besides the
#: archive's own ENCODING / STDSTRINGS / SEARCHPATH entries
_SESSION = ("SET statement_timeout = 0", "SET lock_timeout = 0", "SET idle_in_transaction_session_timeout = 0",
            "SET client_min_messages = warning", "SET row_security = off")
_SPECIAL = ("ENCODING", "STDSTRINGS", "SEARCHPATH")
#: bytes of rows handed to a connection at a time (cut at row ends)
PIECE = 1024 * 1024


def _whole_rows(pieces: Iterable[bytes], size: int = PIECE) -> Iterator[bytes]:
    """The same bytes, cut at row ends into pieces of about `size` (a COPY text row never holds a
    raw newline, so any connection can load any piece); a row longer than `size` stays whole."""
    carry: list[bytes] = []  # the start of a row that goes on in the next piece
    for piece in pieces:
        if carry:
            if b"\n" not in piece:
                carry.append(piece)
                continue
            piece = b"".join([*carry, piece])
            carry = []
        start, end = 0, len(piece)
        while end - start > size:
            cut = piece.rfind(b"\n", start, start + size) + 1
            if cut <= start:  # a row longer than `size`
                cut = piece.find(b"\n", start + size) + 1
                if not cut:
                    break
            yield piece[start:cut]
            start = cut
        cut = piece.rfind(b"\n", start) + 1
        if cut > start:
            yield piece if (start == 0 and cut == end) else piece[start:cut]
            start = cut
        if start < end:
            carry.append(piece[start:])
    if carry:
        yield b"".join(carry)


def _write_list(path: Path, entries: list[TocEntry]) -> Path:
    """A `pg_restore -L` list: the dump ids to restore, in this order."""
    path.write_text("".join(f"{e.dump_id};\n" for e in entries))
    return path


class _Loaders:
    """`jobs` threads, each with its own connection, loading pieces of COPY rows from a queue."""

    def __init__(self, target: ConnInfo, head: ArchiveHead, jobs: int):
        self.target, self.jobs = target, jobs
        self.tables = head.table_data()
        self.session = [e.defn for e in head.entries if e.desc in _SPECIAL and e.defn] + list(_SESSION)
        self.queue: queue.Queue = queue.Queue(maxsize=jobs)  # memory: ~(2 * jobs + 2) pieces
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, name=f"dr-loader-{i}", daemon=True) for i in range(jobs)]

    def __enter__(self) -> "_Loaders":
        for t in self.threads:
            t.start()
        return self

    def put(self, dump_id: int, piece: bytes) -> None:
        while not self.failed.is_set():
            try:
                self.queue.put((dump_id, piece), timeout=0.5)
                return
            except queue.Full:
                continue
        self.raise_first()

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]

    def finish(self) -> None:
        """Wait for every piece to be loaded; raises the first loader's error."""
        for _ in self.threads:
            self.put(0, b"")  # end
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

    def _run(self) -> None:
        current, copy_cm, copy = None, None, None
        con = None
        try:
            con = psycopg.connect(**self.target.psycopg_kwargs(), autocommit=True)
            for statement in self.session:
                con.execute(statement)
            cur = con.cursor()
            while not self.failed.is_set():
                try:
                    dump_id, piece = self.queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                if not piece:
                    break
                if dump_id != current:
                    if copy_cm is not None:
                        copy_cm.__exit__(None, None, None)  # ends the COPY: committed
                    copy_cm = None
                    copy_cm = cur.copy(self.tables[dump_id].copy_stmt)
                    copy = copy_cm.__enter__()
                    current = dump_id
                copy.write(piece)
            if copy_cm is not None and not self.failed.is_set():
                copy_cm.__exit__(None, None, None)
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            what = self._name(current) if current is not None else "the restore session"
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.errors.append(RestoreError(f"loading the rows of {what} into {self.target.dbname} failed: {detail}",
                                            database=self.target.dbname))
            self.failed.set()
        finally:
            if con is not None:
                con.close()  # in the middle of a COPY (stopped): the server rolls it back


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
    with _Loaders(target, head, jobs) as loaders:
        for dump_id, pieces in stream.blocks():
            for rows in _whole_rows(pieces):
                loaders.put(dump_id, rows)
        for _ in stream.rest():  # to the end: the checksum and the zstd frame are checked there
            pass
        loaders.finish()
    times["rows"] = time.monotonic() - t

    t = time.monotonic()
    tools.run("pg_restore", [*common, f"--jobs={jobs}", "-L", str(_write_list(workdir / "rest.list", after)),
                             str(toc)], env=env)
    times["post-data"] = time.monotonic() - t
    log.info("restored in phases: schema %.1f s, rows %.1f s (%d connections), indexes/constraints/rest %.1f s",
             times["schema"], times["rows"], jobs, times["post-data"])
    return times
