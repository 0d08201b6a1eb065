"""The small interfaces the tasks call, and the records they exchange.

Method names follow the Azure SDK verb table: `get_` raises when missing, `list_`
returns a list (never None), `delete_` succeeds if already gone, `<noun>_exists`
returns a bool. Long operations take a `timeout` and raise `OperationTimedOut`.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator

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


#: extensions every PostgreSQL has and no allow-list governs
ALWAYS_ALLOWED_EXTENSIONS = frozenset({"plpgsql"})


@dataclass(frozen=True)
class ExtensionSupport:
    """Which extensions a server can create: the packages installed, and the platform's allow-list if it has one.

    Attributes:
        server: the server's name.
        version: its PostgreSQL major version (None when not known).
        available: extension name → default version, as `pg_available_extensions` lists them;
            None when not known yet (a server still to be created on a platform that cannot say).
        allow_list: the names `CREATE EXTENSION` accepts (Azure: the `azure.extensions`
            parameter, lowercase); None when the platform has no allow-list (local).
        description: what the server runs, for people (e.g. "PostgreSQL 15.18, the distribution's").
        install_fix: what to do about an extension that is not installed, for people.
        allow_fix: what to do about an extension that is not allow-listed, for people.
    """

    server: str
    version: int | None
    available: dict[str, str] | None
    allow_list: frozenset[str] | None = None
    description: str = ""
    install_fix: str = "install the PostgreSQL package that carries it (the full contrib set)"
    allow_fix: str = "add it to the server's extension allow-list"

    def missing(self, names: Iterable[str]) -> list[str]:
        """The extensions among `names` that are not installed (empty when not known)."""
        if self.available is None:
            return []
        return sorted(n for n in set(names) if n not in self.available)

    def not_allowed(self, names: Iterable[str]) -> list[str]:
        """The extensions among `names` the allow-list refuses (empty without an allow-list)."""
        if self.allow_list is None:
            return []
        allowed = {a.strip().lower() for a in self.allow_list}
        return sorted(n for n in set(names) if n.lower() not in allowed and n not in ALWAYS_ALLOWED_EXTENSIONS)


@dataclass(frozen=True)
class ServerSnapshot:
    """What a server was, recorded with each nightly backup so a lost server is recreated as it was.

    Attributes:
        server: the server's name.
        platform: the platform that took it (`local`, `azure`).
        taken_at: when (UTC).
        version: PostgreSQL major version.
        version_full: the full version string, when known.
        sku: compute tier and size (Azure: e.g. `Standard_D2ds_v5`, `GeneralPurpose`); None on local.
        storage_gb: storage size in GiB; None on local.
        high_availability: the high-availability mode (`Disabled`, `ZoneRedundant`, ...); None on local.
        network: network settings (Azure: delegated subnet, private DNS zone, public access).
        parameters: the server parameters that differ from the platform's defaults, by name, as
            the platform sets them (Azure: `azure.extensions` among them).
        extensions: database → extension → version, for every user database.
        extra: platform specifics (local: which PostgreSQL installation).
    """

    server: str
    platform: str
    taken_at: datetime
    version: int
    version_full: str | None = None
    sku: str | None = None
    storage_gb: int | None = None
    high_availability: str | None = None
    network: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, dict[str, str]] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    def age_seconds(self, now: datetime) -> float:
        return (now - self.taken_at).total_seconds()

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["taken_at"] = self.taken_at.isoformat()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ServerSnapshot":
        d = dict(d)
        d["taken_at"] = datetime.fromisoformat(d["taken_at"])
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class ParameterChange:
    """What `set_server_parameters` did."""

    server: str
    #: parameters set to a new value (name → value)
    applied: dict[str, str]
    #: parameters that already had the wanted value
    unchanged: list[str]
    #: whether the server was restarted for them (some parameters take effect only at start)
    restarted: bool


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

    # --- what a server offers and how it is configured (restores of real databases need both) ---

    def get_extension_support(self, name: str) -> ExtensionSupport:
        """The extensions the server can create. Default: `pg_available_extensions`, no allow-list.

        Platforms with an allow-list (Azure: `azure.extensions`, read through the
        configurations API) override this and fill in `allow_list`.
        """
        from dr.catalog import available_extensions

        info = self.get_server(name)
        return ExtensionSupport(server=name, version=info.version,
                                available=available_extensions(self.connection(name, "postgres")),
                                description=f"PostgreSQL {info.version} on the {self.name} platform")

    def expected_extension_support(self, snapshot: ServerSnapshot) -> ExtensionSupport:
        """The extensions a server made by `create_server_from_snapshot(snapshot)` will offer.

        Default: not known before the server exists (`available` None), allow-list as the
        snapshot's parameters will set it where the platform has one. The restore checks again
        once the server exists.
        """
        return ExtensionSupport(server=snapshot.server, version=snapshot.version, available=None)

    def get_server_parameters(self, name: str) -> dict[str, str]:
        """The server parameters that differ from the platform's defaults (name → value), as the
        platform sets them (local: `ALTER SYSTEM`; Azure: the configurations API's user overrides),
        without what the platform manages itself (port, archiving, recovery, TLS files).

        Raises:
            PlatformError: the platform cannot read them (the default).
        """
        from dr.errors import PlatformError

        raise PlatformError(f"the {self.name} platform cannot read server parameters", server=name)

    def set_server_parameters(self, name: str, parameters: dict[str, str], *,
                              timeout: float = 1800) -> ParameterChange:
        """Set server parameters; restart the server if any needs it, and wait until it is Ready.

        Idempotent: parameters that already have the value are left alone, and no restart
        happens for them.

        Raises:
            PlatformError: the platform cannot set parameters, or refused one (naming it).
            OperationTimedOut: the change or the restart did not finish within `timeout`.
        """
        from dr.errors import PlatformError

        raise PlatformError(f"the {self.name} platform cannot set server parameters", server=name)

    def get_server_snapshot(self, name: str) -> ServerSnapshot:
        """A snapshot of the server: version, size, network, non-default parameters, extensions.

        Default: what SQL can see (no SKU, storage or network); parameters as
        `get_server_parameters` gives them, or, where the platform cannot read them, none, with
        `extra["parameters_unknown"]` saying why (shown in plans: never taken for "no parameters").
        """
        from dr.catalog import database_extensions, server_version_text
        from dr.database import list_databases
        from dr.errors import PlatformError

        info = self.get_server(name)
        admin = self.connection(name, "postgres")
        extra: dict[str, str] = {}
        try:
            parameters = self.get_server_parameters(name)
        except PlatformError as exc:
            parameters, extra["parameters_unknown"] = {}, exc.message
        return ServerSnapshot(
            server=name, platform=self.name, taken_at=datetime.now(timezone.utc), version=info.version,
            version_full=server_version_text(admin), parameters=parameters,
            extensions={db: database_extensions(self.connection(name, db)) for db in list_databases(admin)},
            extra=extra,
        )

    def create_server_from_snapshot(self, name: str, snapshot: ServerSnapshot, *, tags: dict[str, str] | None = None,
                                    timeout: float = 1800) -> ServerInfo:
        """Create an empty server as the snapshot describes it (version, size, network).

        Parameters are not set here: `set_server_parameters(name, snapshot.parameters)` does
        that (and any restart they need) as a step of its own. Default: `create_server` like
        the server of the same name.

        Raises:
            ServerExists: a server of that name exists.
            PlatformError: the platform cannot make a server of the snapshot's version.
        """
        return self.create_server(name, like=name, tags=tags, timeout=timeout)


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

    def dead_holds(self) -> list[str]:
        """The holds whose restore provably ended (its process is gone); tidy-up removes them at once.

        Default: none can be proved (a hold taken elsewhere goes stale instead).
        """
        return []

    def release_dead_hold(self, marker: str) -> None:
        """Remove a hold that `dead_holds` lists (idempotent); any other is left alone."""

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
