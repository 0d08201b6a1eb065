"""Taking a backup: `pg_dump` streamed straight into the store, with a same-snapshot manifest.

1. Read the database's identity and write fingerprint (`dr.database.write_fingerprint`; they let
   tidy-up prove later that this backup holds a replaced database exactly), then open a
   repeatable-read transaction and export its snapshot.
2. Start `pg_dump --snapshot=<it>` writing to a pipe; stream its output into a staged upload,
   compressing it with zstd on the way for the `custom-zstd` format (the default).
   A custom-format dump also carries the optimizer statistics (pg_dump 18+).
3. While it runs, count every table's rows in the same snapshot (the manifest), and record what a
   restore of it needs (`needs`: extensions with versions, the server's version, pg_dump's, the
   server's non-default parameters; see dr/preflight.py). Every backup but a PTR server's also
   records a snapshot of the server (`server_snapshot`: version, size, network, parameters, every
   database's extensions), from which a lost server is recreated.
4. Commit the upload only when `pg_dump` exited 0 and every byte is stored.

Nothing is held whole in memory or on local disk; a failure at any point commits nothing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import zstandard

from dr.commands import PgTools, passfile_env
from dr.database import SnapshotSession, connect, database_identity, write_fingerprint
from dr.errors import BackupError, CommandError, DrError, InvalidInput, PlatformError
from dr.platforms.base import BackupInfo, BackupStore, ServerPlatform, ServerSnapshot
from dr.progress import Progress, ProgressHook

log = logging.getLogger("dr.backup")

CHUNK = 1024 * 1024

#: format name → (file extension, pg_dump arguments)
FORMATS: dict[str, tuple[str, list[str]]] = {
    # the default: an uncompressed custom archive (restorable in parallel, table by table),
    # compressed by zstd level 1 in our process (python-zstandard, in its own threads) as it
    # streams to the store. pg_dump's own compression runs zlib in pg_dump's single thread and was
    # the bottleneck of the dump; zstd -1 is several times cheaper and ~10% smaller than gzip -1,
    # and a restore decompresses it as it loads the rows (dr/loader.py). It
    # needs no zstd support in pg_dump/pg_restore (the embedded PostgreSQL 18 build has none).
    # See bench/README.md for the measurements.
    "custom-zstd": (".pgdump.zst", ["--format=custom", "--compress=0"]),
    # custom archive compressed by pg_dump with gzip level 1 (the previous default; restorable
    # by any pg_restore as it is)
    "custom": (".pgdump", ["--format=custom", "--compress=1"]),
    # what the existing nightly tooling writes: plain SQL, gzip level 1
    "plain-gzip": (".sql.gz", ["--format=plain", "--encoding=UTF8", "--clean", "--if-exists", "--no-owner", "--compress=1"]),
}
DEFAULT_FORMAT = "custom-zstd"
#: formats that can carry the optimizer statistics (pg_dump 18+), so that a restore sets them
#: instead of running a full ANALYZE
STATISTICS_FORMATS = ("custom", "custom-zstd")
#: formats that we compress with zstd after pg_dump (level 1: the dump is on the recovery path)
ZSTD_FORMATS = ("custom-zstd",)
ZSTD_LEVEL = 1
#: zstd worker threads: compression overlaps with reading pg_dump's output; more threads buy
#: nothing while pg_dump and the server are busy on the other cores
ZSTD_THREADS = 1


def format_of(info: BackupInfo) -> str:
    """The format of a stored backup, by its recorded format or else by its name's extension."""
    if info.format in FORMATS:
        return info.format
    for fmt, (ext, _) in sorted(FORMATS.items(), key=lambda kv: -len(kv[1][0])):
        if info.name.endswith(ext):
            return fmt
    return info.format


def pg_dump_args(tools: PgTools, fmt: str) -> list[str]:
    """pg_dump's arguments for a format, with `--statistics` where this pg_dump can dump them."""
    args = list(FORMATS[fmt][1])
    if fmt in STATISTICS_FORMATS and tools.major_version("pg_dump") >= 18:
        args.append("--statistics")
    return args
KINDS = ("nightly", "adhoc", "pre-restore-safety", "ptr", "drill")


def backup_name(service: str, env_short: str, kind: str, fmt: str, when: datetime, label: str | None = None) -> str:
    """The store name of a backup, following the existing tooling's conventions.

    Nightly backups are `<service>_<env>_<YYYY-MM-DD><ext>`; any other kind carries its
    kind and a UTC timestamp (and an optional label such as the incident id).
    """
    ext = FORMATS[fmt][0]
    when = when.astimezone(timezone.utc)
    if kind == "nightly":
        return f"{service}_{env_short}_{when:%Y-%m-%d}{ext}"
    tag = f"_{label}" if label else ""
    return f"{service}_{env_short}_{kind}{tag}_{when:%Y%m%dT%H%M%SZ}{ext}"


def _compressor() -> zstandard.ZstdCompressionObj:
    """A streaming zstd compressor (one frame, with a content checksum)."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS, write_checksum=True).compressobj()


def _server_facts(servers: ServerPlatform, server: str, kind: str) -> tuple[dict[str, str] | None, ServerSnapshot | None]:
    """The server's non-default parameters and (except for a PTR server's backup) its snapshot.

    Neither stops a backup: what cannot be read is logged and left out (a plan then says so).
    """
    if kind == "ptr":  # a server made for the incident, deleted after it: nothing to recreate from it
        try:
            return servers.get_server_parameters(server), None
        except PlatformError as exc:
            log.info("backup of %s: parameters not recorded (%s)", server, exc.message)
            return None, None
    try:
        snapshot = servers.get_server_snapshot(server)
    except DrError as exc:
        log.warning("backup of %s: could not take a snapshot of the server (%s); the backup goes on without it, and "
                    "a recreate of the server uses an older snapshot", server, exc)
        return None, None
    return (None if "parameters_unknown" in snapshot.extra else snapshot.parameters), snapshot


def _needs(snap: SnapshotSession, tools: PgTools, parameters: dict[str, str] | None) -> Any:
    """What a restore of this dump needs, read in the dump's own snapshot."""
    from dr.preflight import BackupNeeds

    return BackupNeeds(
        extensions=dict(snap.c.execute("SELECT extname, extversion FROM pg_extension ORDER BY 1").fetchall()),
        server_major=snap.server_version, server_version=str(snap.c.execute("SHOW server_version").fetchone()[0]).split()[0],
        dumped_by=tools.major_version("pg_dump"), parameters=parameters, read_from="the backup's manifest")


@dataclass(frozen=True)
class BackupResult:
    info: BackupInfo
    seconds: float
    database_bytes: int


def take_backup(
    servers: ServerPlatform,
    store: BackupStore,
    tools: PgTools,
    *,
    server: str,
    database: str,
    name: str,
    kind: str,
    fmt: str = DEFAULT_FORMAT,
    extra: dict[str, str] | None = None,
    progress_hooks: list[ProgressHook] | None = None,
) -> BackupResult:
    """Dump one database into the store under `name`.

    Raises:
        InvalidInput: unknown kind or format.
        BackupExists: the name is taken (checked before anything is dumped).
        ConnectionFailed: the server does not answer (transient).
        CommandError: pg_dump failed; nothing was committed.
        ToolVersionError: pg_dump is older than the server.
    """
    if kind not in KINDS:
        raise InvalidInput(f"unknown backup kind {kind!r}; accepted: {', '.join(KINDS)}")
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown backup format {fmt!r}; accepted: {', '.join(FORMATS)}")
    started = datetime.now(timezone.utc)
    conn = servers.connection(server, database)
    with connect(conn) as c:
        db_bytes, version_num = c.execute("SELECT pg_database_size(current_database()), "
                                          "current_setting('server_version_num')::int").fetchone()
        # which database this is and its write fingerprint, read BEFORE the snapshot: tidy-up drops a
        # database a restore replaced only when a backup of exactly it, unwritten since, exists
        identity, writes = database_identity(c), write_fingerprint(c)
    tools.check_client_for(version_num // 10000, ("pg_dump",))  # before anything is staged in the store
    parameters, server_snapshot = _server_facts(servers, server, kind)

    with store.writer(name) as writer:  # raises BackupExists before pg_dump starts
        snap = SnapshotSession(conn)
        try:
            needs = _needs(snap, tools, parameters)
            manifest: dict[str, Any] = {}
            manifest_error: list[BaseException] = []

            def count() -> None:
                try:
                    manifest.update(snap.manifest())
                except BaseException as exc:  # reported after the dump
                    manifest_error.append(exc)

            with passfile_env(conn) as env:
                proc = tools.start("pg_dump", [*pg_dump_args(tools, fmt), f"--snapshot={snap.snapshot}", "--no-password"],
                                   env=env)
                counter = threading.Thread(target=count, name="manifest", daemon=True)
                counter.start()
                progress = Progress(f"backup {name}", int(db_bytes * 0.35), hooks=progress_hooks)
                zstd = _compressor() if fmt in ZSTD_FORMATS else None
                archive_bytes = 0
                try:
                    while chunk := proc.stdout.read(CHUNK):
                        archive_bytes += len(chunk)
                        data = zstd.compress(chunk) if zstd else chunk
                        if data:
                            writer.write(data)
                            progress.add(len(data))
                    proc.finish()  # before the end of the zstd frame: a failed dump must not look complete
                    if zstd:
                        writer.write(zstd.flush())
                except BaseException:
                    proc.kill()
                    raise
                counter.join()
            if manifest_error:
                raise BackupError(f"could not read the manifest of {database}: {manifest_error[0]}",
                                  backup=name) from manifest_error[0]
            manifest["needs"] = needs.to_json()
            if server_snapshot is not None:
                manifest["server_snapshot"] = server_snapshot.to_json()
            progress.report()
            manifest.update(identity=identity, writes=writes)
            finished = datetime.now(timezone.utc)
            info = writer.commit(BackupInfo(
                name=name, size=0, complete=True, created_at=started, finished_at=finished, kind=kind, format=fmt,
                source_server=server, database=database, server_version=snap.server_version, manifest=manifest,
                extra={**(extra or {}), **({"archive_bytes": str(archive_bytes)} if zstd else {})},
            ))
        except CommandError as exc:
            raise BackupError(f"pg_dump of {database} on {server} failed; nothing was stored: {exc.message}",
                              backup=name) from exc
        finally:
            snap.close()
    secs = (info.finished_at - started).total_seconds() if info.finished_at else 0.0
    log.info("backup %s: %s bytes of %s.%s in %.1f s, sha256 %s", name, info.size, server, database, secs, info.sha256)
    return BackupResult(info=info, seconds=secs, database_bytes=db_bytes)
