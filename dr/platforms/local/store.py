"""Backups in a local directory, laid out like the Azure container they stand in for.

Each backup is a file `<name>` and a sidecar `<name>.meta.json`. An upload is staged in
a hidden temporary file, fsynced, then linked into place with `os.link`, which fails if
the name exists, so nothing is ever overwritten, even by two writers racing. The
sidecar says `"complete": true` only once the data is in place; a crash in between
leaves a backup listed as incomplete, never as complete. A file without a sidecar was
put there by other tooling (e.g. an existing nightly `.sql.gz`) and is listed as such.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from dr.errors import BackupCorrupted, BackupError, BackupExists, BackupNotFound, InvalidInput
from dr.platforms import holds
from dr.platforms.base import BackupInfo, BackupReader, BackupStore, BackupWriter, verify_digest

META_SUFFIX = ".meta.json"
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$"
#: bytes written between two flushes to disk in the background while a backup is written, so
#: that the commit's fsync has little left (as PostgreSQL's own `backend_flush_after`): without
#: them the kernel keeps a whole backup dirty in memory and the commit waits for all of it
FLUSH_EVERY = 64 * 1024 * 1024


def check_backup_name(name: str) -> str:
    """Refuse names that could escape the store or confuse a shell."""
    import re

    if not isinstance(name, str) or not re.fullmatch(NAME_RE, name) or ".." in name or name.endswith(META_SUFFIX):
        raise InvalidInput(f"invalid backup name {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")  # pid: see tasks/tidy.py
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _LocalWriter(BackupWriter):
    def __init__(self, store: "LocalBackupStore", name: str):
        self.store, self.name = store, name
        self.tmp = store.root / f".{name}.{os.getpid()}-{uuid.uuid4().hex}.partial"
        self.fh = open(self.tmp, "xb")
        self.hash = hashlib.sha256()
        self.bytes_written = 0
        self.committed = False
        self._flushed_at = 0
        self._flusher: threading.Thread | None = None
        self._flush_error: OSError | None = None

    def _flush_in_background(self) -> None:
        """Start writing what is written so far to disk, unless a flush is still running."""
        if self._flusher is not None and self._flusher.is_alive():
            return
        self.fh.flush()
        self._flushed_at = self.bytes_written
        fd = self.fh.fileno()

        def flush() -> None:
            try:
                os.fdatasync(fd)
            except OSError as exc:  # reported once per file: kept to fail the write or the commit
                self._flush_error = exc

        self._flusher = threading.Thread(target=flush, name="dr-store-flush", daemon=True)
        self._flusher.start()

    def _wait_for_flush(self) -> None:
        """Wait for a background flush; raise what it met (the kernel reports a write error once)."""
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None
        if self._flush_error is not None:
            raise self._flush_error

    def write(self, data: bytes) -> None:
        try:
            if self._flush_error is not None:
                self._wait_for_flush()
            self.fh.write(data)
            self.hash.update(data)
            self.bytes_written += len(data)
            if self.bytes_written - self._flushed_at >= FLUSH_EVERY:
                self._flush_in_background()
        except OSError as exc:
            self.abort()
            if exc.errno == errno.ENOSPC:
                raise BackupError(f"the backup store {self.store.root} is full; '{self.name}' was not saved",
                                  backup=self.name) from exc
            raise

    def commit(self, info: BackupInfo) -> BackupInfo:
        final = self.store.root / self.name
        meta = self.store.root / (self.name + META_SUFFIX)
        linked = False
        try:
            self._wait_for_flush()
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            done = replace(info, name=self.name, size=self.bytes_written, sha256=self.hash.hexdigest(), complete=False)
            try:
                os.link(self.tmp, final)  # atomic, and refuses an existing name
            except FileExistsError as exc:
                raise BackupExists(f"backup '{self.name}' appeared while this one was being written; kept both apart",
                                   backup=self.name) from exc
            linked = True
            _write_json_atomic(meta, done.to_json())
            done = replace(done, complete=True)
            _write_json_atomic(meta, done.to_json())
            _fsync_dir(self.store.root)
        except OSError as exc:
            self.abort()
            if linked:  # the data is in place but not recorded: take it back, or it would pass for a foreign backup
                meta.unlink(missing_ok=True)
                final.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise BackupError(f"the backup store {self.store.root} is full; '{self.name}' was not saved",
                                  backup=self.name) from exc
            raise
        finally:
            self.tmp.unlink(missing_ok=True)
        self.committed = True
        return done

    def abort(self) -> None:
        if self._flusher is not None:
            self._flusher.join()  # before the file (and its descriptor number) goes
        if not self.fh.closed:
            self.fh.close()
        self.tmp.unlink(missing_ok=True)


class _LocalReader(BackupReader):
    def __init__(self, path: Path, info: BackupInfo):
        self.info = info
        self.fh = open(path, "rb")
        self.hash = hashlib.sha256()
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.hash.update(data)
        self.bytes_read += len(data)
        return data

    def verify(self) -> None:
        if self.fh.read(1):
            raise BackupCorrupted(f"backup '{self.info.name}' was not read to the end", backup=self.info.name)
        verify_digest(self.info, self.bytes_read, self.hash.hexdigest())

    def close(self) -> None:
        self.fh.close()


class LocalBackupStore(BackupStore):
    """`BackupStore` in a directory (`<state_dir>/store/<account>/<container>`)."""

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalBackupStore({self.root})"

    def _info(self, name: str) -> BackupInfo:
        path = self.root / name
        meta = self.root / (name + META_SUFFIX)
        if meta.exists():
            try:
                return BackupInfo.from_json(json.loads(meta.read_text()))
            except (ValueError, TypeError) as exc:
                raise BackupCorrupted(f"the metadata of backup '{name}' ({meta}) is unreadable: {exc}; "
                                      "the backup file itself was not touched", backup=name) from exc
        if path.exists():
            st = path.stat()
            fmt = "plain-gzip" if name.endswith(".sql.gz") else "unknown"
            return BackupInfo(name=name, size=st.st_size, complete=True, kind="unknown", format=fmt,
                              created_at=datetime.fromtimestamp(st.st_mtime, timezone.utc))
        raise BackupNotFound(f"no backup named '{name}' in {self.root}", backup=name)

    def list_backups(self) -> list[BackupInfo]:
        names = {p.name.removesuffix(META_SUFFIX) for p in self.root.iterdir() if not p.name.startswith(".")}
        infos = [self._info(n) for n in names]
        return sorted(infos, key=lambda i: i.finished_at or i.created_at, reverse=True)

    def get_backup(self, name: str) -> BackupInfo:
        check_backup_name(name)
        return self._info(name)

    def open_writer(self, name: str) -> BackupWriter:
        check_backup_name(name)
        if (self.root / name).exists() or (self.root / (name + META_SUFFIX)).exists():
            raise BackupExists(f"backup '{name}' already exists in {self.root}; backups are never overwritten",
                               backup=name)
        return _LocalWriter(self, name)

    def open_reader(self, name: str) -> BackupReader:
        info = self.get_backup(name)
        if not info.complete:
            raise BackupNotFound(f"backup '{name}' is incomplete (its upload never finished)", backup=name)
        if not (self.root / name).exists():
            raise BackupNotFound(f"backup '{name}' has metadata but no data file", backup=name)
        return _LocalReader(self.root / name, info)

    def delete_backup(self, name: str) -> None:
        check_backup_name(name)
        (self.root / (name + META_SUFFIX)).unlink(missing_ok=True)
        (self.root / name).unlink(missing_ok=True)

    # --- holds (dr/platforms/holds.py): a hidden marker file beside the backup per holder ---

    supports_holds = True

    def hold(self, name: str, holder: str) -> contextlib.AbstractContextManager[None]:
        """Hold a backup for a `with` block so retention will not delete it (see `BackupStore.hold`)."""
        path = self.root / holds.marker_name(name, holder)

        def create() -> None:
            if path.exists() and holds.is_stale(timedelta(seconds=time.time() - path.stat().st_mtime)):
                holds.log.warning("replacing the stale hold of %s on backup %s", holder, name)
                path.unlink(missing_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError as exc:
                raise holds.already_held(name, holder, str(path)) from exc
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(holds.marker_body(holder))
            except BaseException:
                path.unlink(missing_ok=True)
                raise

        return holds.holding(self, name, holder, create=create, remove=lambda: path.unlink(missing_ok=True))

    def dead_holds(self) -> list[str]:
        """The holds whose restore process provably ended (a restore killed with -9 leaves its hold behind)."""
        out = []
        for path in sorted(self.root.glob(".*.hold-*")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being written, or not ours to judge
            if isinstance(record, dict) and holds.holder_gone(record):
                out.append(path.name)
        return out

    def release_dead_hold(self, marker: str) -> None:
        """Remove a hold that `dead_holds` lists (idempotent)."""
        if marker in self.dead_holds():
            (self.root / marker).unlink(missing_ok=True)

    def held(self, name: str) -> bool:
        """Whether a live (not stale) hold is on the backup."""
        live = False
        for path in sorted(self.root.glob(holds.marker_name(name) + "*")):
            try:
                age = timedelta(seconds=time.time() - path.stat().st_mtime)
            except FileNotFoundError:
                continue  # released while we looked
            if holds.is_stale(age):
                holds.log.warning("ignoring the stale hold %s on backup %s (%.0f h old; remove it once no restore "
                                  "runs)", path.name, name, age.total_seconds() / 3600)
            else:
                live = True
        return live
