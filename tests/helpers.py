"""Builders for test data and environments, in one place."""

from __future__ import annotations

import re
import shutil
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

#: what every test configuration starts with: the local platform, tuned for test speed and disk
LOCAL_HEADER = """
prefix = "t"
timezone = "Europe/London"

[local]
state_dir = "{state_dir}"
archive_timeout_seconds = 30
fsync = false          # test speed only, as PostgreSQL's own suites do
wal_segment_mb = 1     # test disk only: each environment writes ~110 MB instead of ~250 MB
"""

CONFIG_TEMPLATE = LOCAL_HEADER + """
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
        """`dr local up`: the live server with sample data, WAL archiving and base backups, and the app.

        A development environment starts from a copy of the session's template (`clone_template`) when
        there is one: the same files `up` would make, without initdb, the sample load and two base
        backups for every test.
        """
        from dr.platforms.local import lifecycle

        clone_template(self)
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


#: the servers/ directory of a development environment brought up once per session, then stopped
_TEMPLATE: dict[Path, Path] = {}


def clone_template(env: LocalEnv) -> bool:
    """Give a new development environment a copy of the session's template server; False when it cannot.

    The template is one environment brought up by `lifecycle.up` (initdb, the sample data, a base
    backup before and after loading it) and stopped cleanly, made once per base directory. A clone
    gets its own copy of the data directory, hard links to the template's base backups and archived
    WAL (both are only ever read, or replaced whole by `mv`), and its archive_command pointed at
    its own archive; `lifecycle.up` then starts it (on a free port: the template's may be taken by
    another clone), finds the sample loaded, and starts an app of its own. What differs from a
    server made from scratch: the password, the creation time and the base backups' times are the
    template's (so its restore window opens when the template was made).
    """
    servers = env.root / "state" / "servers"
    if env.environment != "development" or servers.exists():
        return False
    base = env.root.parent
    if base not in _TEMPLATE:
        template = make_env(base, "template")
        from dr.platforms.local import lifecycle

        lifecycle.up(template.config, template.target)
        template.down()  # a clean stop: nothing half-written, the last WAL archived
        _TEMPLATE[base] = template.root / "state" / "servers"
    source = _TEMPLATE[base]
    servers.mkdir(parents=True)
    for sdir in source.iterdir():
        dest = servers / sdir.name
        dest.mkdir()
        shutil.copystat(sdir, dest)
        shutil.chown(dest, sdir.stat().st_uid, sdir.stat().st_gid)
        for part in sdir.iterdir():
            if part.name in ("archive", "basebackups"):
                subprocess.run(["cp", "-al", str(part), str(dest)], check=True)
            elif part.is_dir():
                subprocess.run(["cp", "-a", str(part), str(dest)], check=True)
            else:
                shutil.copy2(part, dest / part.name)
                shutil.chown(dest / part.name, part.stat().st_uid, part.stat().st_gid)
        conf = dest / "data" / "dr.conf"
        conf.write_text(conf.read_text().replace(str(sdir), str(dest)))
        (dest / "data" / "postmaster.opts").unlink(missing_ok=True)
    return True


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
