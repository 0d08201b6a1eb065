"""Small JSON records the azure backend keeps on the machine that runs it.

- `azure-operations.json`: the continuation token of every long-running operation that
  creates or deletes a server, written as soon as Azure accepted it, keyed by the
  server's resource id. A re-run after a crash or a timeout re-attaches to the recorded
  operation instead of starting a second restore.
- `azure-dropped.json`: every server this tool deleted, with its resource id, the time
  of the drop and its settings, so it can be revived (Azure keeps dropped flexible
  servers for 5 days) or re-created with the same settings; a revived one stays, marked
  `revived_as`, so what it was is still known (e.g. its high availability).

The directory is `$DR_AZURE_STATE_DIR`, or `~/.dr`. Writes are atomic (temporary file,
fsync, rename) and serialised by an exclusive `flock` on a lock file, so two processes
never lose each other's records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

STATE_DIR_ENV = "DR_AZURE_STATE_DIR"
OPERATIONS_FILE = "azure-operations.json"
DROPPED_FILE = "azure-dropped.json"


def default_state_dir() -> Path:
    """`$DR_AZURE_STATE_DIR` when set, else `~/.dr`."""
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".dr"


class JsonRecord:
    """One JSON document on disk, read and updated under an exclusive lock.

    Args:
        path: the JSON file; created (with its directory, mode 0700) on the first write.
        empty: a factory for the document when the file does not exist yet.
    """

    def __init__(self, path: Path, empty: Callable[[], Any]):
        self.path = Path(path)
        self.empty = empty

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read(self) -> Any:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return self.empty()

    def read(self) -> Any:
        """The current document (the empty one when the file does not exist)."""
        with self._locked():
            return self._read()

    def update(self, change: Callable[[Any], Any]) -> Any:
        """Apply `change` to the document and write the result atomically; returns it."""
        with self._locked():
            doc = change(self._read())
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=2, sort_keys=True, default=str)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            return doc


class OperationLog:
    """Continuation tokens of running server operations, keyed by resource id."""

    def __init__(self, state_dir: Path):
        self.record = JsonRecord(Path(state_dir) / OPERATIONS_FILE, dict)

    @property
    def path(self) -> Path:
        return self.record.path

    def get(self, resource_id: str) -> dict[str, Any] | None:
        return self.record.read().get(resource_id.lower())

    def put(self, resource_id: str, entry: dict[str, Any]) -> None:
        def change(doc: dict[str, Any]) -> dict[str, Any]:
            doc[resource_id.lower()] = entry
            return doc

        self.record.update(change)

    def remove(self, resource_id: str) -> None:
        def change(doc: dict[str, Any]) -> dict[str, Any]:
            doc.pop(resource_id.lower(), None)
            return doc

        self.record.update(change)


class DroppedLog:
    """Servers this tool deleted: what is needed to revive or re-create them."""

    def __init__(self, state_dir: Path):
        self.record = JsonRecord(Path(state_dir) / DROPPED_FILE, list)

    @property
    def path(self) -> Path:
        return self.record.path

    def entries(self) -> list[dict[str, Any]]:
        return list(self.record.read())

    def add(self, entry: dict[str, Any]) -> None:
        self.record.update(lambda doc: [*doc, entry])

    def remove(self, resource_id: str, dropped_at: str) -> None:
        self.record.update(lambda doc: [e for e in doc if not (
            e.get("resource_id", "").lower() == resource_id.lower() and e.get("dropped_at") == dropped_at)])

    def mark_revived(self, resource_id: str, dropped_at: str, as_name: str) -> None:
        """Note that a drop was revived (as `as_name`): no longer revivable, its settings still known."""
        def change(doc: list[dict[str, Any]]) -> list[dict[str, Any]]:
            for e in doc:
                if e.get("resource_id", "").lower() == resource_id.lower() and e.get("dropped_at") == dropped_at:
                    e["revived_as"] = as_name
            return doc

        self.record.update(change)
