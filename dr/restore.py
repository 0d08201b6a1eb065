"""Restoring a backup without ever half-applying it to the live database.

1. Restore into a NEW database `<db>_restore_<stamp>` on the target server, streaming
   from the store. A `.pgdump.zst` backup (an uncompressed custom archive, zstd-compressed)
   with `jobs > 1` is loaded as it arrives by `dr.loader`: schema first, then every table's
   rows, frozen, through `jobs` connections (a table each), each table's indexes and constraints
   as soon as its rows are in, then the rest with `pg_restore -j`; nothing is spooled. Other custom archives with `jobs > 1` are spooled to
   a local file for `pg_restore -j`; with `jobs = 1` every custom archive streams into
   `pg_restore --exit-on-error`, and plain `.sql.gz` into `psql -v ON_ERROR_STOP=1`.
2. Check the bytes read against the checksum recorded at backup time.
3. Check the new database against the backup's manifest (rows per table, sequences, objects).
4. Give the planner statistics, so the app is not slow on its first queries: a custom-format
   backup made by pg_dump 18+ carries them and pg_restore sets them (milliseconds); ANALYZE
   runs on whatever still has none (every table, for older or plain backups).
5. Swap: rename the live database to `<db>_replaced_<stamp>` and the new one to `<db>`
   in one transaction. The replaced database is kept until tidy-up; its comment says whether
   the safety backup taken before the restore holds it exactly (same database, no write since:
   `dr.database.held_by`), which tidy-up checks again before it drops anything.

A restore is skipped only when the live database already holds the backup, swapped in for the
same incident or run (`resume_key`); the result then says so in words (`skipped`).

Any failure before step 5 drops the new database and leaves the live one exactly as it was.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import zstandard
from psycopg import sql

from dr.backup import CHUNK, ZSTD_FORMATS, format_of
from dr.commands import PgTools, Running, passfile_env
from dr.database import (
    analyze,
    connect,
    create_database,
    database_comment,
    database_exists,
    drop_database,
    free_database_name,
    replaced_name,
    restore_db_name,
    server_major_version,
    set_database_comment,
    swap_databases,
    swap_refusal,
    verify_against_manifest,
)
from dr.errors import BackupCorrupted, BackupNotFound, CommandError, DrError, RestoreError
from dr.loader import stream_restore
from dr.pgarchive import ArchiveFormatError, ArchiveStream
from dr.platforms.base import BackupInfo, BackupReader, BackupStore, ServerPlatform
from dr.preflight import preflight_restore
from dr.progress import Progress, ProgressHook

log = logging.getLogger("dr.restore")

COMMENT_PREFIX = "dr: restored from "


@dataclass(frozen=True)
class RestoreResult:
    backup: str
    server: str
    database: str
    replaced_database: str | None
    seconds: float
    verified_manifest: bool
    already_done: bool = False
    #: rows per table of the restored database, as counted by the manifest check (None: not counted)
    rows: dict[str, int] | None = None
    #: why nothing was restored, in words (set exactly when `already_done`)
    skipped: str | None = None
    #: what holds the replaced database: "held by backup ..." or why no backup does
    replaced_held_by: str | None = None


def latest_complete_backup(store: BackupStore, *, kinds: tuple[str, ...] | None = None,
                           database: str | None = None, prefix: str | None = None) -> BackupInfo:
    """The newest complete backup by its recorded finish time (not by a date in its name)."""
    for info in store.list_backups():  # newest first
        if not info.complete:
            continue
        if kinds and info.kind not in kinds and not (info.kind == "unknown" and "nightly" in kinds):
            continue
        if database and info.database not in (None, database):
            continue
        if prefix and not info.name.startswith(prefix):
            continue
        return info
    raise BackupNotFound("no complete backup in the store" + (f" of kind {', '.join(kinds)}" if kinds else "")
                         + (f" named {prefix}*" if prefix else ""))


def _restored_marker(info: BackupInfo, resume_key: str | None) -> str:
    """The live database's comment after a swap: which backup, and for which incident or run."""
    return f"{COMMENT_PREFIX}{info.name} sha256={info.sha256 or 'unknown'}" + (f" for {resume_key}" if resume_key else "")


class _Decoder:
    """Decompresses a stored backup on its way to pg_restore or psql (gzip or zstd, one stream or several
    concatenated); damage shows as `BackupCorrupted`."""

    def __init__(self, codec: str, backup: str):
        self.codec, self.backup = codec, backup
        self._d = self._new()

    def _new(self) -> zlib._Decompress | zstandard.ZstdDecompressionObj:
        return zlib.decompressobj(wbits=31) if self.codec == "gzip" else zstandard.ZstdDecompressor().decompressobj()

    def decompress(self, chunk: bytes) -> bytes:
        try:
            out = [self._d.decompress(chunk)]
            while self._d.eof and self._d.unused_data:  # the next member or frame
                rest = self._d.unused_data
                self._d = self._new()
                out.append(self._d.decompress(rest))
        except (zlib.error, zstandard.ZstdError) as exc:
            raise BackupCorrupted(f"backup '{self.backup}' is not valid {self.codec}: {exc}", backup=self.backup) from exc
        return b"".join(out)

    def finish(self) -> bytes:
        """The last bytes; raises `BackupCorrupted` if the stream stops short of its end."""
        tail = self._d.flush() if self.codec == "gzip" else b""
        if not self._d.eof:
            raise BackupCorrupted(f"backup '{self.backup}' ends in the middle of its {self.codec} stream (truncated)",
                                  backup=self.backup)
        return tail


def _codec(fmt: str) -> str | None:
    """What we decompress before the PostgreSQL tool reads the backup (pg_restore reads `custom` as it is)."""
    return {"plain-gzip": "gzip", "custom-zstd": "zstd"}.get(fmt)


def _feed(reader: BackupReader, proc: Running, progress: Progress, decoder: _Decoder | None) -> None:
    """Copy the backup into the child's stdin, decompressing it on the way if asked."""
    try:
        while chunk := reader.read(DECODE_CHUNK if decoder else CHUNK):
            progress.add(len(chunk))
            data = decoder.decompress(chunk) if decoder else chunk
            if data:
                proc.stdin.write(data)
        if decoder:
            proc.stdin.write(decoder.finish())
    except BrokenPipeError:
        pass  # the child died; its exit code and stderr say why
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass


def _spool_bytes(info: BackupInfo, fmt: str) -> int:
    """Local disk a parallel restore needs for the (decompressed) archive."""
    if fmt in ZSTD_FORMATS:
        recorded = info.extra.get("archive_bytes", "")
        return int(recorded) if recorded.isdigit() else (info.size or 0) * 4
    return info.size or 0


def _pg_restore_args(tools: PgTools, server_major: int) -> list[str]:
    """Options for pg_restore: set the statistics a backup carries, where both ends know them."""
    if tools.major_version("pg_restore") < 18:
        return []
    return ["--statistics"] if server_major >= 18 else ["--no-statistics"]


#: every user table, and whether the planner has no statistics for it: never analyzed, rows but no
#: column statistics, extended statistics (pg_dump does not carry them), or an expression index
#: without statistics
_TABLE_STATISTICS = """
SELECT n.nspname, c.relname,
       c.reltuples < 0
       OR (c.reltuples > 0 AND NOT EXISTS (SELECT 1 FROM pg_stats s WHERE s.schemaname = n.nspname AND s.tablename = c.relname))
       OR EXISTS (SELECT 1 FROM pg_statistic_ext x JOIN pg_namespace xn ON xn.oid = x.stxnamespace
                  WHERE x.stxrelid = c.oid
                    AND NOT EXISTS (SELECT 1 FROM pg_stats_ext e WHERE e.statistics_schemaname = xn.nspname
                                      AND e.statistics_name = x.stxname))
       OR EXISTS (SELECT 1 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                  WHERE i.indrelid = c.oid AND i.indexprs IS NOT NULL
                    AND NOT EXISTS (SELECT 1 FROM pg_stats s WHERE s.schemaname = n.nspname AND s.tablename = ic.relname))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r','m','p') AND n.nspname NOT IN ('pg_catalog','information_schema')
  AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
"""


def _analyze_where_needed(target) -> list[str]:
    """ANALYZE the tables that came without statistics (all of them: the whole database); returns them."""
    with connect(target) as c:
        tables = c.execute(_TABLE_STATISTICS).fetchall()
        missing = [(schema, table) for schema, table, needs in tables if needs]
        if missing and len(missing) < len(tables):
            for schema, table in missing:
                c.execute(sql.SQL("ANALYZE {}.{}").format(sql.Identifier(schema), sql.Identifier(table)))
    if missing and len(missing) == len(tables):
        analyze(target)  # a backup without statistics: the whole database, as always
        return ["*"]
    return [f"{schema}.{table}" for schema, table in missing]


#: compressed bytes decompressed at a time: what one read can expand to is bounded by it (a 1 MiB
#: read of well-compressing rows came out as tens of MB at once)
DECODE_CHUNK = 128 * 1024


def _decompressed(reader: BackupReader, progress: Progress, decoder: _Decoder | None) -> Iterator[bytes]:
    """The backup's bytes as pg_restore reads them; the checksum is checked before the last ones."""
    while chunk := reader.read(DECODE_CHUNK if decoder else CHUNK):
        progress.add(len(chunk))
        if data := (decoder.decompress(chunk) if decoder else chunk):
            yield data
    reader.verify()
    if decoder and (tail := decoder.finish()):
        yield tail


def _spool_restore(tools: PgTools, info: BackupInfo, fmt: str, data: Iterable[bytes], target_conn, env: dict[str, str],
                   jobs: int, work: Path, server_major: int) -> None:
    """`pg_restore -j` needs a seekable file: write the archive (decompressed) to `work` first."""
    path = work / "backup.pgdump"
    free, need = shutil.disk_usage(work).free, _spool_bytes(info, fmt)
    if need and free < need * 1.1:
        raise RestoreError(f"not enough space in {work} to spool {need} bytes for a parallel restore; "
                           "use --jobs 1 to stream instead")
    with open(path, "wb") as fh:
        for piece in data:
            fh.write(piece)
    tools.run("pg_restore", ["--no-owner", "--exit-on-error", "--no-password", f"--jobs={jobs}",
                             *_pg_restore_args(tools, server_major), "-d", target_conn.dbname, str(path)], env=env)


def _restore_stream(tools: PgTools, reader: BackupReader, target_conn, progress: Progress, jobs: int,
                    spool_dir: Path | None, server_major: int) -> None:
    info = reader.info
    fmt = format_of(info)
    decoder = _Decoder(codec, info.name) if (codec := _codec(fmt)) else None
    with passfile_env(target_conn) as env:
        if fmt == "plain-gzip":
            proc = tools.start("psql", ["-X", "-q", "-v", "ON_ERROR_STOP=1", "--no-password", "-d", target_conn.dbname],
                               env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
            try:
                _feed(reader, proc, progress, decoder)
            except BaseException:
                proc.kill()
                raise
            proc.finish()
            reader.verify()
        elif jobs > 1 and fmt in ZSTD_FORMATS:
            # an uncompressed custom archive: load its rows as they arrive, with every connection
            stream = ArchiveStream(_decompressed(reader, progress, decoder))
            head = stream.read_head()
            work = Path(tempfile.mkdtemp(prefix=f"dr-spool-{os.getpid()}-", dir=spool_dir))
            try:
                if (why := head.unsupported()) is None:
                    stream_restore(tools, head, stream, target_conn, env, jobs=jobs, workdir=work,
                                   restore_args=_pg_restore_args(tools, server_major))
                else:
                    log.info("backup %s cannot be loaded as it streams (%s): restoring it from a local file",
                             info.name, why)
                    _spool_restore(tools, info, fmt, itertools.chain([head.raw], stream.rest()), target_conn, env,
                                   jobs, work, server_major)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        elif jobs > 1:
            work = Path(tempfile.mkdtemp(prefix=f"dr-spool-{os.getpid()}-", dir=spool_dir))
            try:
                _spool_restore(tools, info, fmt, _decompressed(reader, progress, decoder), target_conn, env,
                               jobs, work, server_major)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        else:
            proc = tools.start("pg_restore", ["--no-owner", "--exit-on-error", "--no-password",
                                              *_pg_restore_args(tools, server_major), "-d", target_conn.dbname],
                               env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
            try:
                _feed(reader, proc, progress, decoder)
            except BaseException:
                proc.kill()
                raise
            proc.finish()
            reader.verify()


def restore_backup(
    servers: ServerPlatform,
    store: BackupStore,
    tools: PgTools,
    *,
    server: str,
    database: str,
    backup: str,
    jobs: int = 1,
    swap: bool = True,
    spool_dir: Path | None = None,
    progress_hooks: list[ProgressHook] | None = None,
    resume_key: str | None = None,
    safety_backup: str | None = None,
) -> RestoreResult:
    """Restore `backup` as database `database` on `server` (new database + verified atomic swap).

    Args:
        jobs: connections loading rows and `pg_restore` jobs for custom-format backups (a `custom`
            archive is spooled to a local file first; a `custom-zstd` one streams).
        swap: swap the restored database in as `database`; when False, it is left beside the
            live one under its `_restore_` name (for checks and reconciliation).
        resume_key: the incident or run this restore belongs to (e.g. "incident INC-1"). When the
            live database already holds `backup`, swapped in for this same key, nothing is done
            (a resumed incident, a retried task). Without a key a restore is always done: a
            person asking again for a backup gets it again, whatever the database holds now.
        safety_backup: the backup taken of the live database just before this restore; the swap
            records whether it holds the replaced database exactly (tidy-up reads that).

    Raises:
        BackupNotFound: no such complete backup.
        BackupCorrupted: the bytes do not match the recorded checksum; the live database is untouched.
        VerificationFailed: the restored data does not match the manifest; the live database is untouched.
        RestoreError: the restore failed; the live database is untouched.
    """
    started = datetime.now(timezone.utc)
    info = store.get_backup(backup)
    if not info.complete:
        raise BackupNotFound(f"backup '{backup}' is incomplete and cannot be restored", backup=backup)
    admin = servers.connection(server, "postgres")
    server_major = server_major_version(admin)
    tools.check_client_for(server_major, ("pg_restore", "psql"))
    preflight_restore(servers, store, tools, info, server)  # extensions, versions: refused before anything changes

    # the same incident (or run) resumed after its swap must not restore again over validated data;
    # any other request restores, whatever the live database holds
    if resume_key and info.sha256 and database_exists(admin, database) \
            and database_comment(admin, database) == _restored_marker(info, resume_key):
        why = f"{database} on {server} already holds backup {backup}, swapped in earlier by {resume_key}; nothing was changed"
        log.info("skipped the restore: %s", why)
        return RestoreResult(backup, server, database, None, 0.0, True, already_done=True, skipped=why)

    refusal = swap_refusal(admin, database) if swap else None
    if refusal:  # found now, not after an hour of restoring
        raise RestoreError(f"cannot restore {backup} into {database} on {server}: {refusal}", database=database,
                           server=server, world_state="nothing was changed")
    new_db = free_database_name(admin, restore_db_name(database, started))
    untouched = f"the live database {database} on {server} is untouched"
    create_database(admin, new_db, comment=f"dr: restoring {info.name}")
    target = servers.connection(server, new_db)
    verified = False
    rows = None
    try:
        progress = Progress(f"restore {backup}", info.size or None, hooks=progress_hooks)
        with store.reader(backup) as reader:
            try:
                _restore_stream(tools, reader, target, progress, jobs, spool_dir, server_major)
            except (CommandError, ArchiveFormatError, RestoreError) as exc:
                # a checksum mismatch explains a failed restore better than the tool's message
                try:
                    while reader.read(CHUNK):
                        pass
                    reader.verify()
                except BackupCorrupted:
                    raise
                except Exception:
                    pass
                if isinstance(exc, ArchiveFormatError):
                    raise BackupCorrupted(f"backup '{backup}' is not a valid pg_dump archive: {exc}",
                                          backup=backup, world_state=untouched) from exc
                if isinstance(exc, CommandError):
                    raise RestoreError(f"restoring {backup} into {new_db} failed: {exc.message}", database=new_db,
                                       server=server, world_state=untouched) from exc
                raise
        progress.report()
        if info.manifest:
            rows = verify_against_manifest(target, info.manifest).get("rows")
            verified = True
        analyzed = _analyze_where_needed(target)
        log.info("statistics: %s", "restored from the backup" if not analyzed else
                 "ANALYZE of the whole database" if analyzed == ["*"] else f"ANALYZE of {', '.join(analyzed)}")
        set_database_comment(admin, new_db, _restored_marker(info, resume_key))
    except BaseException as exc:
        log.error("restore of %s failed; dropping %s (%s)", backup, new_db, untouched)
        world = untouched
        try:
            drop_database(admin, new_db)
        except DrError as drop_error:
            log.exception("could not drop %s; drop it by hand", new_db)
            world = (f"{untouched}; the half-restored database {new_db} is left on {server} "
                     f"({drop_error.message}): `dr tidy-up` drops it once the server is back")
        if isinstance(exc, DrError) and exc.world_state in (None, untouched):
            exc.world_state = world
        raise
    if not swap:
        secs = (datetime.now(timezone.utc) - started).total_seconds()
        return RestoreResult(backup, server, new_db, None, secs, verified, rows=rows)
    safety = store.get_backup(safety_backup) if safety_backup else None
    replaced, held = swap_databases(admin, database, new_db, replaced_name(database, started), safety_backup=safety,
                                    server=server)
    secs = (datetime.now(timezone.utc) - started).total_seconds()
    log.info("restored %s into %s on %s in %.1f s (previous database kept as %s: %s)", backup, database, server, secs,
             replaced, held)
    return RestoreResult(backup, server, database, replaced, secs, verified, rows=rows,
                         replaced_held_by=held if replaced else None)
