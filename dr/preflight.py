"""Preflight: will a backup restore into a server? Answered before anything changes.

What a backup needs (`BackupNeeds`):

- a backup we take records it in its manifest (`needs`), read in the dump's own snapshot: the
  database's extensions with their versions, the server's version, pg_dump's major version and
  the server's non-default parameters (`ServerPlatform.get_server_parameters`);
- a backup made by other tooling (or by us before we recorded it) is read as it streams, and
  never written to disk: a custom archive's header and table of contents (the versions of the
  server and of pg_dump, the EXTENSION entries), a plain `.sql.gz`'s header comments and its
  `CREATE EXTENSION` lines. pg_dump writes every `CREATE EXTENSION` before the first row, so the
  reading of a pg_dump file stops at its first `COPY`; a file of other origin is read to the end.

What the target offers (`ExtensionSupport`): `ServerPlatform.get_extension_support` for a server
that exists (pg_available_extensions; on Azure also the `azure.extensions` allow-list), and
`expected_extension_support(snapshot)` for one still to be made from a snapshot.

`check_fit` compares them: each missing or refused extension, a restore into an older major
version, and client tools too old to read the dump (or to talk to the server) is a problem that
names its fix. `preflight_restore` raises `IncompatibleBackup` listing them all.

Server snapshots travel in the manifests of the backups we take (`server_snapshot`), so the
newest one is always next to the backups it describes (`latest_server_snapshot`).
"""

from __future__ import annotations

import gzip
import io
import logging
import re
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

import zstandard

from dr.commands import PgTools
from dr.errors import BackupCorrupted, IncompatibleBackup
from dr.pgarchive import ArchiveFormatError, ArchiveStream
from dr.platforms.base import BackupInfo, BackupReader, BackupStore, ExtensionSupport, ServerPlatform, ServerSnapshot

log = logging.getLogger("dr.preflight")

READ_CHUNK = 256 * 1024


@dataclass(frozen=True)
class BackupNeeds:
    """What restoring a backup takes from the target server and the client tools.

    Attributes:
        extensions: extension name → version ("" where the dump does not say: plain SQL and
            archives name the extension only).
        server_major: the major version of the server it was dumped from.
        server_version: that server's full version.
        dumped_by: the major version of the pg_dump that wrote it.
        parameters: the source server's non-default parameters; None when not recorded.
        read_from: where this was learnt, for people.
    """

    extensions: dict[str, str] = field(default_factory=dict)
    server_major: int | None = None
    server_version: str | None = None
    dumped_by: int | None = None
    parameters: dict[str, str] | None = None
    read_from: str = "the backup's manifest"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BackupNeeds":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def describe(self) -> str:
        exts = ", ".join(f"{n} {v}".strip() for n, v in sorted(self.extensions.items())) or "none"
        src = f"PostgreSQL {self.server_version or self.server_major or '?'}"
        return f"extensions: {exts}; dumped from {src} by pg_dump {self.dumped_by or '?'} (read from {self.read_from})"


def major_of(version: str | None) -> int | None:
    """`15.18 (Debian 15.18-0+deb12u1)` → 15; `9.6.24` → 9; None when there is no number."""
    m = re.match(r"\s*(\d+)", version or "")
    return int(m.group(1)) if m else None


# --- what a backup needs -----------------------------------------------------------------


def needs_of_backup(store: BackupStore, info: BackupInfo) -> BackupNeeds:
    """What `info` needs: from its manifest, else read from the head of the backup as it streams.

    Raises:
        BackupCorrupted: the backup's head cannot be read as its format.
    """
    recorded = (info.manifest or {}).get("needs")
    if recorded:
        return BackupNeeds.from_json(recorded)
    from dr.backup import format_of

    fmt = format_of(info)
    if fmt not in ("custom", "custom-zstd", "plain-gzip"):
        return BackupNeeds(read_from=f"nothing: format {fmt!r} is not known")
    with store.reader(info.name) as reader:
        if fmt == "plain-gzip":
            return needs_of_plain_sql(_text_lines(reader))
        return _needs_of_archive(reader, fmt)


def _text_lines(reader: BackupReader) -> Iterator[str]:
    """The lines of a gzip-compressed SQL file, decompressed as they stream (members concatenated too)."""
    try:
        yield from io.TextIOWrapper(gzip.GzipFile(fileobj=reader, mode="rb"), encoding="utf-8", errors="replace")
    except (OSError, EOFError, zlib.error) as exc:
        raise BackupCorrupted(f"backup '{reader.info.name}' is not valid gzip: {exc}", backup=reader.info.name) from exc


_DUMPED_FROM = re.compile(r"^-- Dumped from database version (\S.*)$")
_DUMPED_BY = re.compile(r"^-- Dumped by pg_dump version (\S.*)$")
_CREATE_EXTENSION = re.compile(
    r"""^\s*CREATE\s+EXTENSION\s+(?:IF\s+NOT\s+EXISTS\s+)?(?:"((?:[^"]|"")+)"|([A-Za-z_][\w$-]*))"""
    r"""(?:[^;]*?\bVERSION\s+(?:'([^']*)'|"([^"]*)"|([\w.]+)))?""", re.IGNORECASE)


def needs_of_plain_sql(lines: Iterator[str]) -> BackupNeeds:
    """Read the extensions and versions a plain SQL dump names, stopping at pg_dump's first rows."""
    exts: dict[str, str] = {}
    server_version = dumped_by = None
    by_pg_dump = False
    for n, line in enumerate(lines):
        if n < 20 and line.startswith("-- PostgreSQL database dump"):
            by_pg_dump = True
        if m := _DUMPED_FROM.match(line.rstrip("\n")):
            server_version = m.group(1).strip()
        elif m := _DUMPED_BY.match(line.rstrip("\n")):
            dumped_by = m.group(1).strip()
        elif m := _CREATE_EXTENSION.match(line):
            name = m.group(1).replace('""', '"') if m.group(1) else m.group(2).lower()
            exts[name] = next((v for v in m.groups()[2:] if v), "")
        elif by_pg_dump and line.startswith(("COPY ", "INSERT INTO ")):
            break  # the data section: pg_dump wrote every CREATE EXTENSION before it
    how = "the dump's header and CREATE EXTENSION lines" + (", up to its first rows" if by_pg_dump else "")
    return BackupNeeds(extensions=exts, server_major=major_of(server_version), server_version=server_version,
                       dumped_by=major_of(dumped_by), parameters=None, read_from=how)


def _needs_of_archive(reader: BackupReader, fmt: str) -> BackupNeeds:
    """Read a custom archive's header and table of contents (its first bytes), nothing more."""

    def chunks() -> Iterator[bytes]:
        d = zstandard.ZstdDecompressor().decompressobj() if fmt == "custom-zstd" else None
        while chunk := reader.read(READ_CHUNK):
            if d is None:
                yield chunk
                continue
            out = d.decompress(chunk)
            while d.eof and d.unused_data:  # the next frame
                rest, d = d.unused_data, zstandard.ZstdDecompressor().decompressobj()
                out += d.decompress(rest)
            yield out

    try:
        head = ArchiveStream(chunks()).read_head()
    except (ArchiveFormatError, zstandard.ZstdError) as exc:
        raise BackupCorrupted(f"backup '{reader.info.name}' is not a valid pg_dump archive: {exc}",
                              backup=reader.info.name) from exc
    exts = {e.tag: "" for e in head.entries if e.desc == "EXTENSION" and e.tag}
    return BackupNeeds(extensions=exts, server_major=major_of(head.server_version), server_version=head.server_version,
                       dumped_by=major_of(head.dump_version), parameters=None,
                       read_from="the archive's header and table of contents")


# --- does it fit ------------------------------------------------------------------------------


@dataclass
class Fit:
    """The outcome of comparing a backup's needs with a target."""

    needs: BackupNeeds
    support: ExtensionSupport
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing_extensions: list[str] = field(default_factory=list)


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def _client_fix(major: int) -> str:
    """How to get PostgreSQL `major`'s client programs, naming an installation here if there is one."""
    from dr.pginstall import find_installations

    here = [i for i in find_installations() if i.version == major]
    fix = (f"install the PostgreSQL {major} client (Debian/Ubuntu: apt-get install postgresql-client-{major}, from "
           "apt.postgresql.org for versions the distribution lacks) and set local.pg_bin_dir to its bin directory")
    if here:
        fix += f" (installed here: local.pg_bin_dir = \"{here[0].bin_dir}\", {here[0].origin})"
    return fix


def check_fit(needs: BackupNeeds, support: ExtensionSupport, tools: PgTools, *, fmt: str, backup: str) -> Fit:
    """Every reason the backup cannot be restored into the target, each with its fix; and notes."""
    fit = Fit(needs, support)
    server = support.server
    where = f"{server} ({support.description})" if support.description else server
    names = sorted(needs.extensions)
    missing = support.missing(names)
    for e in missing:
        v = needs.extensions.get(e)
        fit.problems.append(f"extension {e}{' ' + v if v else ''}, used by backup {backup}, is not available on "
                            f"{where}: {support.install_fix}")
    for e in support.not_allowed(names):
        if e not in missing:
            fit.problems.append(f"extension {e}, used by backup {backup}, is not allow-listed on {server}: "
                                f"{support.allow_fix}")
    fit.missing_extensions = sorted(set(missing) | set(support.not_allowed(names)))
    if support.available is None and names:
        fit.notes.append(f"the extensions ({', '.join(names)}) cannot be checked before {server} exists; the restore "
                         "checks them again before it changes anything")
    for e in names:
        have, want = (support.available or {}).get(e), needs.extensions.get(e)
        if have and want and _version_key(want) > _version_key(have):
            fit.notes.append(f"extension {e} is {want} in the backup; {server} offers {have}, which CREATE EXTENSION "
                             "makes")
    if needs.server_major and support.version and needs.server_major > support.version:
        fit.problems.append(
            f"backup {backup} comes from PostgreSQL {needs.server_major} and {server} runs PostgreSQL "
            f"{support.version}: pg_dump's output loads into the same or a newer major version only; restore it into "
            f"a server of PostgreSQL {needs.server_major} or newer")
    program = "psql" if fmt == "plain-gzip" else "pg_restore"
    have_client = tools.major_version(program)
    if needs.dumped_by and have_client < needs.dumped_by:
        fit.problems.append(
            f"backup {backup} was written by pg_dump {needs.dumped_by}, which {program} {have_client} ({tools.bin_dir}) "
            f"cannot read: {_client_fix(needs.dumped_by)}")
    elif support.version and have_client < support.version:
        fit.problems.append(f"{program} {have_client} ({tools.bin_dir}) is older than {server} (PostgreSQL "
                            f"{support.version}): {_client_fix(support.version)}")
    return fit


def preflight_restore(servers: ServerPlatform, store: BackupStore, tools: PgTools, info: BackupInfo,
                      server: str) -> Fit:
    """Check that `info` can be restored into `server`, before anything is changed.

    Raises:
        IncompatibleBackup: naming each missing extension, version or client problem and its fix.
        BackupCorrupted: the backup's head cannot be read.
    """
    from dr.backup import format_of

    needs = needs_of_backup(store, info)
    fit = check_fit(needs, servers.get_extension_support(server), tools, fmt=format_of(info), backup=info.name)
    for note in fit.notes:
        log.info("preflight: %s", note)
    if fit.problems:
        raise IncompatibleBackup(
            f"backup {info.name} cannot be restored into {server}: " + "; ".join(fit.problems),
            problems=fit.problems, missing_extensions=fit.missing_extensions, server=server,
            world_state="nothing was changed")
    log.info("preflight of %s into %s: fits (%s)", info.name, server, needs.describe())
    return fit


# --- server snapshots ---------------------------------------------------------------------------


def latest_server_snapshot(store: BackupStore, server: str) -> tuple[ServerSnapshot, BackupInfo] | None:
    """The newest snapshot of `server` recorded with a complete backup, and that backup; None if there is none."""
    best: tuple[ServerSnapshot, BackupInfo] | None = None
    for info in store.list_backups():
        raw = (info.manifest or {}).get("server_snapshot") if info.complete else None
        if not raw or raw.get("server") != server:
            continue
        snap = ServerSnapshot.from_json(raw)
        if best is None or snap.taken_at > best[0].taken_at:
            best = (snap, info)
    return best


def describe_snapshot(snap: ServerSnapshot, backup: str, now: datetime | None = None) -> dict[str, str]:
    """Plan facts about a snapshot: its age and what recreating from it sets."""
    now = now or datetime.now(timezone.utc)
    age_h = snap.age_seconds(now) / 3600
    shape = [f"PostgreSQL {snap.version_full or snap.version}"]
    shape += [f"{k} {v}" for k, v in (("SKU", snap.sku), ("storage", f"{snap.storage_gb} GiB" if snap.storage_gb else None),
                                      ("high availability", snap.high_availability)) if v]
    if snap.network:
        shape.append("network " + ", ".join(f"{k}={v}" for k, v in sorted(snap.network.items())))
    params = ", ".join(f"{k} = {v}" for k, v in sorted(snap.parameters.items())) or "none (all at the defaults)"
    if "parameters_unknown" in snap.extra:
        params = f"NOT RECORDED ({snap.extra['parameters_unknown']}): the recreated server keeps the platform's defaults"
    exts = "; ".join(f"{db}: {', '.join(f'{n} {v}' for n, v in sorted(e.items()))}"
                     for db, e in sorted(snap.extensions.items())) or "none recorded"
    return {
        "server snapshot": f"taken {age_h:.1f} h ago ({snap.taken_at:%Y-%m-%d %H:%M} UTC) with backup {backup}",
        "recreate as": "; ".join(shape),
        "parameters to apply": params,
        "extensions in the snapshot": exts,
    }
