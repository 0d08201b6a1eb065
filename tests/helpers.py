"""Builders for test data and environments, in one place."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg

from dr.commands import ConnInfo
from dr.config import DrConfig, Target, load_config
from dr.platforms import get_platform
from dr.platforms.base import Platform

CONFIG_TEMPLATE = """
prefix = "t"
timezone = "Europe/London"

[local]
state_dir = "{state_dir}"
archive_timeout_seconds = 30
fsync = false          # test speed only, as PostgreSQL's own suites do
wal_segment_mb = 1     # test disk only: each environment writes ~110 MB instead of ~250 MB

[services.apply.environments.development]
platform = "local"
checks = [
  {{ kind = "healthcheck" }},
  {{ kind = "row_count", table = "candidates", min = 1 }},
  {{ kind = "row_count", table = "applications", min = 1 }},
]

[services.apply.environments.production]
platform = "local"
checks = [ {{ kind = "row_count", table = "candidates", min = 1 }} ]
"""


@dataclass
class LocalEnv:
    root: Path
    config_path: str
    config: DrConfig
    target: Target
    platform: Platform

    @property
    def service(self) -> str:
        return self.target.service

    @property
    def environment(self) -> str:
        return self.target.environment

    def conn(self, database: str | None = None, server: str | None = None) -> ConnInfo:
        return self.platform.servers.connection(server or self.target.server, database or self.target.database)

    def up(self) -> None:
        from dr.platforms.local import lifecycle

        lifecycle.up(self.config, self.target)

    def down(self) -> None:
        from dr.platforms.local import lifecycle

        try:
            lifecycle.down(self.config, purge=False)
        except Exception:
            pass

    def discard(self) -> None:
        """Take the environment down and remove its files in the background (see `remove_later`)."""
        self.down()
        remove_later(self.root)

    def query(self, sql: str, params: Any = None, *, database: str | None = None, server: str | None = None) -> list[tuple]:
        with psycopg.connect(**self.conn(database, server).psycopg_kwargs(), autocommit=True) as c:
            cur = c.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def scalar(self, sql: str, params: Any = None, **kw: Any) -> Any:
        return self.query(sql, params, **kw)[0][0]

    def kw(self) -> dict[str, Any]:
        """Flow keyword arguments naming this environment."""
        return {"service": self.service, "environment": self.environment, "config_path": self.config_path}


#: removals of finished environments' files, running while the next tests run
_REMOVALS: list[subprocess.Popen] = []


def remove_later(path: Path) -> None:
    """Remove a finished environment's files (~110 MB, ~3,700 files) in a low-priority background
    `rm`, so the next test does not wait for it (at the session's end it took 30-70 s at once)."""
    _REMOVALS.append(subprocess.Popen(["nice", "-n", "19", "rm", "-rf", "--", str(path)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def wait_for_removals() -> None:
    while _REMOVALS:
        _REMOVALS.pop().wait()


def make_env(base: Path, name: str, environment: str = "development") -> LocalEnv:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower())[:40].strip("-")
    root = base / f"{slug}-{time.monotonic_ns() % 10**8}"
    root.mkdir(parents=True)
    root.chmod(0o755)
    cfg_path = root / "dr.toml"
    cfg_path.write_text(CONFIG_TEMPLATE.format(state_dir=root / "state"))
    cfg = load_config(cfg_path)
    target = cfg.target("apply", environment)
    return LocalEnv(root, str(cfg_path), cfg, target, get_platform(cfg, target))


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def wait_a_second() -> None:
    """Commit timestamps on either side of a restore target must differ by more than the 1 s resolution."""
    time.sleep(1.2)
