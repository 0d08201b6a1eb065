"""The embedded local platform: real PostgreSQL servers, a directory store, a small app."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from dr.commands import PgTools
from dr.config import DrConfig, Target
from dr.pginstall import environment_installation
from dr.platforms.local.app import LocalApp
from dr.platforms.local.servers import LocalServers
from dr.platforms.local.store import LocalBackupStore


@lru_cache(maxsize=8)
def _servers(state_dir: Path, bin_dir: Path, dropped_days: int, archive_timeout: int, fsync: bool,
             wal_segment_mb: int) -> LocalServers:
    return LocalServers(state_dir, PgTools.default(bin_dir), dropped_retention_days=dropped_days,
                        archive_timeout_seconds=archive_timeout, fsync=fsync, wal_segment_mb=wal_segment_mb)


def local_servers(config: DrConfig, target: Target | None = None) -> LocalServers:
    """The local servers; new ones run the environment's PostgreSQL (`postgres_version`, else the default).

    Raises:
        ConfigError: the environment asks for a PostgreSQL version that is not installed.
    """
    loc = config.local
    inst = environment_installation(config, target)
    return _servers(loc.state_dir.absolute(), inst.bin_dir, loc.dropped_retention_days, loc.archive_timeout_seconds,
                    loc.fsync, loc.wal_segment_mb)


def local_store(config: DrConfig, target: Target) -> LocalBackupStore:
    return LocalBackupStore(config.local.state_dir.absolute() / "store" / target.storage_account / target.container)


def local_app(config: DrConfig, target: Target) -> LocalApp:
    return LocalApp(config.local.state_dir.absolute(), target.key, server=target.server, database=target.database)
