"""The small interfaces the tasks call, and the records they exchange.

Method names follow the Azure SDK verb table: `get_` raises when missing, `list_`
returns a list (never None), `delete_` succeeds if already gone, `<noun>_exists`
returns a bool. Long operations take a `timeout` and raise `OperationTimedOut`.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterator

from dr.commands import ConnInfo

#: Tag keys this tool puts on what it creates; tidy-up deletes only what carries them.
TAG_CREATED_BY = "dr-created-by"
TAG_CREATED_BY_VALUE = "dr-orchestrator"
TAG_PURPOSE = "dr-purpose"
TAG_SOURCE = "dr-source-server"
TAG_RESTORE_TIME = "dr-restore-time-utc"
TAG_INCIDENT = "dr-incident"


@dataclass(frozen=True)
class ServerInfo:
    """One database server as the platform sees it."""

    name: str
    state: str  # "Ready", "Stopped", "Starting", "Dropped", ...
    version: int  # PostgreSQL major version
    host: str
    port: int
    created_at: datetime
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def created_by_us(self) -> bool:
        return self.tags.get(TAG_CREATED_BY) == TAG_CREATED_BY_VALUE


@dataclass(frozen=True)
class DroppedServer:
    """A deleted server that can still be revived."""

    name: str
    dropped_at: datetime
    revivable_until: datetime
    resource_id: str


@dataclass(frozen=True)
class RestoreWindow:
    """The times a point-in-time restore of a server may target (UTC, inclusive)."""

    earliest: datetime
    latest: datetime


class ServerPlatform(abc.ABC):
    """Database servers: get, create, delete, point-in-time restore, revive."""

    name: str = "abstract"

    @abc.abstractmethod
    def get_server(self, name: str) -> ServerInfo:
        """The server; raises `ServerNotFound`."""

    @abc.abstractmethod
    def list_servers(self) -> list[ServerInfo]:
        """Every server the platform can see."""

    def server_exists(self, name: str) -> bool:
        from dr.errors import ServerNotFound

        try:
            self.get_server(name)
        except ServerNotFound:
            return False
        return True

    @abc.abstractmethod
    def create_server(self, name: str, *, like: str | None = None, tags: dict[str, str] | None = None,
                      timeout: float = 1800) -> ServerInfo:
        """Create an empty server (with the settings of server `like` where recorded)."""

    @abc.abstractmethod
    def delete_server(self, name: str, *, timeout: float = 1800) -> None:
        """Delete (drop) a server; succeeds if it is already gone."""

    @abc.abstractmethod
    def list_dropped_servers(self) -> list[DroppedServer]:
        """Dropped servers still within the revive window."""

    @abc.abstractmethod
    def revive_dropped_server(self, name: str, *, timeout: float = 1800) -> ServerInfo:
        """Bring back a dropped server with all its data."""

    @abc.abstractmethod
    def get_restore_window(self, name: str) -> RestoreWindow:
        """The point-in-time restore window of a server."""

    @abc.abstractmethod
    def point_in_time_restore(self, source: str, new_name: str, point_in_time_utc: datetime, *,
                              tags: dict[str, str] | None = None, timeout: float = 3600) -> ServerInfo:
        """Restore `source` as it was at the given UTC time onto a NEW server `new_name`."""

    #: whether `geo_restore` is available (a platform with regions and geo-redundant backups)
    supports_geo_restore: bool = False

    def geo_restore(self, source: str, new_name: str, *, location: str, point_in_time_utc: datetime | None = None,
                    delegated_subnet_resource_id: str | None = None, private_dns_zone_arm_resource_id: str | None = None,
                    tags: dict[str, str] | None = None, timeout: float = 3600) -> ServerInfo:
        """Restore `source` from its geo-redundant backup onto a NEW server in another region."""
        from dr.errors import PlatformError

        raise PlatformError(f"the {self.name} platform has no regions: geo-restore needs Azure with "
                            "geo-redundant backups")

    @abc.abstractmethod
    def connection(self, name: str, database: str) -> ConnInfo:
        """Connection settings (with the admin password) for a database on a server."""


@dataclass(frozen=True)
class BackupInfo:
    """One backup in a store, with the metadata recorded when it was taken."""

    name: str
    size: int
    complete: bool
    created_at: datetime
    sha256: str | None = None
    kind: str = "unknown"  # nightly, adhoc, pre-restore-safety, ptr, unknown (not made by us)
    format: str = "unknown"  # plain-gzip, custom, ...
    source_server: str | None = None
    database: str | None = None
    server_version: int | None = None
    finished_at: datetime | None = None
    manifest: dict[str, Any] | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def made_by_us(self) -> bool:
        return self.sha256 is not None

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("created_at", "finished_at"):
            if d[k] is not None:
                d[k] = d[k].isoformat()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BackupInfo":
        d = dict(d)
        for k in ("created_at", "finished_at"):
            if d.get(k):
                d[k] = datetime.fromisoformat(d[k])
        return cls(**d)


class BackupWriter(abc.ABC):
    """A staged upload: nothing is visible in the store until `commit`."""

    bytes_written: int = 0

    @abc.abstractmethod
    def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def commit(self, info: BackupInfo) -> BackupInfo:
        """Make the backup visible and complete; `info.sha256`/`size` are filled in."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard everything staged."""


def verify_digest(info: BackupInfo, bytes_read: int, sha256_hex: str) -> None:
    """Raise `BackupCorrupted` unless what was read matches the size and sha256 recorded at backup time.

    Backups not made by us carry no checksum: the format's own checks (gzip CRC, pg_restore) are all there is.
    """
    from dr.errors import BackupCorrupted

    if info.sha256 is None:
        return
    if bytes_read != info.size or sha256_hex != info.sha256:
        raise BackupCorrupted(
            f"backup '{info.name}' is corrupted: read {bytes_read} bytes with sha256 {sha256_hex[:16]}…, "
            f"expected {info.size} bytes with {info.sha256[:16]}…",
            backup=info.name,
        )


class BackupReader(abc.ABC):
    """A streamed download; `verify()` after reading to the end checks the checksum."""

    info: BackupInfo
    bytes_read: int = 0

    @abc.abstractmethod
    def read(self, n: int = -1) -> bytes: ...

    @abc.abstractmethod
    def verify(self) -> None:
        """Raise `BackupCorrupted` if the bytes read do not match the recorded size/sha256."""

    def close(self) -> None:  # pragma: no cover - default no-op
        pass


class BackupStore(abc.ABC):
    """Where backups live: a local directory or an Azure Blob Storage container."""

    @abc.abstractmethod
    def list_backups(self) -> list[BackupInfo]:
        """Every backup, complete or not, newest first."""

    @abc.abstractmethod
    def get_backup(self, name: str) -> BackupInfo:
        """The backup's metadata; raises `BackupNotFound`."""

    def backup_exists(self, name: str) -> bool:
        from dr.errors import BackupNotFound

        try:
            self.get_backup(name)
        except BackupNotFound:
            return False
        return True

    @abc.abstractmethod
    def open_writer(self, name: str) -> BackupWriter:
        """Start a staged upload; raises `BackupExists` if the name is taken."""

    @abc.abstractmethod
    def open_reader(self, name: str) -> BackupReader:
        """Open a backup for streaming; raises `BackupNotFound`."""

    @abc.abstractmethod
    def delete_backup(self, name: str) -> None:
        """Delete a backup; succeeds if already gone."""

    #: whether the store keeps holds (`hold`, `held`); retention deletes only from stores that do
    supports_holds: bool = False

    def hold(self, name: str, holder: str) -> contextlib.AbstractContextManager[None]:
        """Hold a backup for the duration of a `with` block, so retention will not delete it.

        Args:
            name: the backup's name.
            holder: who holds it (an incident id or flow run id); one hold per holder and backup.

        Returns:
            A context manager; the hold is released when the block ends, however it ends.

        Raises:
            BackupError: the store keeps no holds, or the holder already holds the backup.
            BackupNotFound: there is no such backup.
            InvalidInput: the holder's name is not 1-64 letters, digits, '_' and '-'.
        """
        from dr.platforms.holds import not_supported

        raise not_supported(self, name)

    def held(self, name: str) -> bool:
        """Whether a live (not stale) hold is on the backup (see `dr.platforms.holds`).

        Raises:
            BackupError: the store keeps no holds (so retention refuses to delete from it).
        """
        from dr.platforms.holds import not_supported

        raise not_supported(self, name)

    @contextlib.contextmanager
    def writer(self, name: str) -> Iterator[BackupWriter]:
        """Context manager: aborts the upload unless `commit` was called."""
        w = self.open_writer(name)
        committed = False
        try:
            yield w
            committed = getattr(w, "committed", False)
        finally:
            if not committed and not getattr(w, "committed", False):
                w.abort()

    @contextlib.contextmanager
    def reader(self, name: str) -> Iterator[BackupReader]:
        r = self.open_reader(name)
        try:
            yield r
        finally:
            r.close()


@dataclass(frozen=True)
class AppStatus:
    """What the app looks like from outside."""

    maintenance: bool
    replicas: dict[str, int]
    recorded_replicas: dict[str, int] | None
    main_url: str
    temp_url: str | None


class AppControl(abc.ABC):
    """The web app in front of the database: replicas, maintenance page, healthcheck."""

    @abc.abstractmethod
    def get_status(self) -> AppStatus: ...

    @abc.abstractmethod
    def scale_down(self) -> dict[str, int]:
        """Record the current replica counts (durably), then scale web and worker to 0.

        Idempotent: when already scaled down, the first recording is kept. Returns the recorded counts.
        """

    @abc.abstractmethod
    def scale_up(self) -> dict[str, int]:
        """Restore exactly the recorded replica counts and wait for readiness; returns them."""

    @abc.abstractmethod
    def enable_maintenance(self) -> AppStatus:
        """Send users to the maintenance page; the temporary URL still reaches the app."""

    @abc.abstractmethod
    def disable_maintenance(self) -> AppStatus:
        """Send users back to the app; the temporary URL goes away."""

    def healthcheck(self, url: str | None = None, timeout: float = 10.0) -> tuple[int, str]:
        """GET the healthcheck (on the temporary URL while in maintenance); returns (status, body)."""
        import httpx

        status = self.get_status()
        base = url or (status.temp_url if status.maintenance and status.temp_url else status.main_url)
        target = base if base.endswith("/healthcheck") else base.rstrip("/") + "/healthcheck"
        try:
            r = httpx.get(target, timeout=timeout)
        except httpx.HTTPError as exc:
            return 0, f"{type(exc).__name__}: {exc}"
        return r.status_code, r.text[:500]


@dataclass
class Platform:
    """The three backends that serve one service environment."""

    servers: ServerPlatform
    store: BackupStore
    app: AppControl
