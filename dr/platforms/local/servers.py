"""Local database servers: real PostgreSQL clusters run with `pg_ctl` under a state directory.

Layout of `<state_dir>/servers/<name>/` (owned by the PostgreSQL OS user when run as root):

- `data/`          PGDATA; `dr.conf` inside holds our settings (port, archiving, recovery)
- `archive/`       continuous WAL archive (`archive_command` copies every segment here)
- `basebackups/`   `pg_basebackup` copies, each with a `.json` record of when it ended
- `server.json`    name, port, version, the PostgreSQL installation (bin_dir), tags, created/stopped times
- `password`       the admin password, 0600, readable only by the tool's own user
- `postgres.log`   the server log

A point-in-time restore is a real recovery: a new server is made from the newest base
backup that ended before the target, replays the archived WAL with `restore_command`,
and is promoted at `recovery_target_time`. Deleting a server moves its directory to
`<state_dir>/dropped/` where it can be revived for `dropped_retention_days`.

Each server runs the programs of the installation it was created with (recorded in
`server.json`); new servers use this object's installation (an environment's
`postgres_version`, see dr/pginstall.py) or the one a snapshot's version asks for. Server
parameters are set with `ALTER SYSTEM` (`postgresql.auto.conf`), as a person would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg

from dr.commands import ConnInfo, PgTools, passfile_env
from dr.errors import (
    CommandError,
    ConfigError,
    ConnectionFailed,
    InvalidInput,
    InvalidRestoreTime,
    OperationTimedOut,
    PlatformError,
    RestoreError,
    ServerExists,
    ServerNotFound,
)
from dr.pginstall import PgInstallation, choose_installation, installation_at, known_installation
from dr.platforms.base import (
    TAG_CREATED_BY,
    TAG_CREATED_BY_VALUE,
    TAG_PURPOSE,
    TAG_RESTORE_TIME,
    TAG_SOURCE,
    DroppedServer,
    ExtensionSupport,
    ParameterChange,
    RestoreWindow,
    ServerInfo,
    ServerPlatform,
    ServerSnapshot,
)

log = logging.getLogger("dr.local.servers")

PG_OS_USER = "drpostgres"
ADMIN_USER = "dradmin"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _quote_conf(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _sh_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


class LocalServers(ServerPlatform):
    """`ServerPlatform` on this machine."""

    name = "local"

    def __init__(self, state_dir: Path, tools: PgTools | None = None, *, dropped_retention_days: int = 5,
                 archive_timeout_seconds: int = 60, fsync: bool = True, wal_segment_mb: int = 16):
        self.state_dir = Path(state_dir).absolute()
        self.tools = tools or PgTools.default()
        self.installation = known_installation(self.tools.bin_dir)
        self.dropped_retention = timedelta(days=dropped_retention_days)
        self.archive_timeout = archive_timeout_seconds
        self.fsync = fsync
        self.wal_segment_mb = wal_segment_mb
        self.servers_dir = self.state_dir / "servers"
        self.dropped_dir = self.state_dir / "dropped"
        self.os_user = self._ensure_os_user()

    # --- OS user and directories ------------------------------------------------------

    def _ensure_os_user(self) -> str | None:
        """PostgreSQL refuses to run as root: when we are root, run it as an unprivileged user."""
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                                   PG_OS_USER], capture_output=True, text=True)
            if made.returncode not in (0, 9):  # 9: it exists now (another process made it at the same time)
                raise PlatformError(f"could not create the OS user '{PG_OS_USER}' for PostgreSQL: {made.stderr.strip()}")
        # every parent of the state dir must be traversable by that user
        for parent in [self.state_dir, *self.state_dir.parents]:
            if parent.exists() and not (parent.stat().st_mode & 0o001):
                raise ConfigError(
                    f"the PostgreSQL OS user '{PG_OS_USER}' cannot enter {parent} (mode {oct(parent.stat().st_mode & 0o777)}); "
                    "choose a state directory outside it, or run as a non-root user",
                    field="local.state_dir",
                )
        return PG_OS_USER

    def _chown(self, path: Path, recursive: bool = False) -> None:
        if not self.os_user:
            return
        pw = pwd.getpwnam(self.os_user)
        paths = [path]
        if recursive:
            paths += [Path(r) / n for r, ds, fs in os.walk(path) for n in ds + fs]
        for p in paths:
            os.lchown(p, pw.pw_uid, pw.pw_gid)

    def _dir(self, name: str) -> Path:
        from dr.config import SERVER_NAME

        if not isinstance(name, str) or not re.fullmatch(SERVER_NAME, name):
            raise InvalidInput(f"server: {name!r} is not a server name (lowercase letters, digits and '-', 3-63)",
                               world_state="nothing was changed")
        return self.servers_dir / name

    def _meta(self, name: str) -> dict[str, Any]:
        path = self._dir(name) / "server.json"
        if not path.exists():
            raise ServerNotFound(f"server '{name}' does not exist on the local platform", server=name)
        return json.loads(path.read_text())

    def _write_meta(self, name: str, meta: dict[str, Any]) -> None:
        path = self._dir(name) / "server.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, path)

    def _password(self, name: str) -> str:
        return (self._dir(name) / "password").read_text().strip()

    def _write_password(self, name: str, password: str) -> None:
        path = self._dir(name) / "password"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")

    # --- pg_ctl -----------------------------------------------------------------------

    def _write_conf(self, name: str, port: int, *, archive: bool, recovery: dict[str, str] | None = None) -> None:
        d = self._dir(name)
        arch = d / "archive"
        lines = [
            "# written by dr-orchestrator; do not edit",
            "listen_addresses = '127.0.0.1'",
            f"port = {port}",
            "unix_socket_directories = ''",
            "wal_level = replica",
            "max_wal_senders = 5",
            "shared_buffers = '128MB'",
            "max_wal_size = '1GB'",
            f"fsync = {'on' if self.fsync else 'off'}",
            f"archive_timeout = {self.archive_timeout}",
        ]
        if archive:
            a = _sh_quote(str(arch))
            sync = f" && sync {a}/%f.part" if self.fsync else ""
            cmd = f"test ! -f {a}/%f && cp %p {a}/%f.part{sync} && mv {a}/%f.part {a}/%f"
            lines += ["archive_mode = on", f"archive_command = {_quote_conf(cmd)}"]
        else:
            lines += ["archive_mode = off"]
        for k, v in (recovery or {}).items():
            lines.append(f"{k} = {_quote_conf(v)}")
        conf = d / "data" / "dr.conf"
        conf.write_text("\n".join(lines) + "\n")
        self._chown(conf)
        main = d / "data" / "postgresql.conf"
        text = main.read_text()
        if "include_if_exists = 'dr.conf'" not in text:
            main.write_text(text + "\ninclude_if_exists = 'dr.conf'\n")

    def installation_of(self, name: str, meta: dict[str, Any] | None = None) -> PgInstallation:
        """The installation a server runs: the one it was created with (for a server recorded before
        installations were, the one of its major version)."""
        meta = meta or self._meta(name)
        recorded = meta.get("bin_dir")
        if recorded and (Path(recorded) / "postgres").exists():
            return installation_at(Path(recorded), meta.get("pg_source", "configured"))
        if meta.get("version") == self.installation.version:
            return self.installation
        return choose_installation(int(meta["version"]), field=f"the installation of server {name}")

    def _tools_of(self, name: str) -> PgTools:
        """The programs of the server's own installation (pg_ctl, pg_basebackup)."""
        inst = self.installation_of(name)
        return self.tools if inst.bin_dir == self.tools.bin_dir else PgTools.default(inst.bin_dir)

    def _pg_ctl(self, name: str, *args: str, timeout: float = 120) -> str:
        d = self._dir(name)
        return self._tools_of(name).run(
            "pg_ctl", ["-D", str(d / "data"), *args], user=self.os_user, timeout=timeout,
            env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"},
        )

    def _running(self, name: str) -> bool:
        try:
            self._pg_ctl(name, "status", timeout=30)
            return True
        except CommandError:
            return False

    def _log_tail(self, name: str, lines: int = 15) -> str:
        p = self._dir(name) / "postgres.log"
        if not p.exists():
            return ""
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:])

    def start_server(self, name: str, *, timeout: float = 120) -> ServerInfo:
        """Start a stopped server (idempotent)."""
        meta = self._meta(name)
        if not self._running(name):
            port = meta["port"]
            if not port_free(port):
                port = free_port()
                meta["port"] = port
                self._write_meta(name, meta)
                conf = (self._dir(name) / "data" / "dr.conf").read_text()
                conf = "\n".join(f"port = {port}" if ln.startswith("port = ") else ln for ln in conf.splitlines())
                (self._dir(name) / "data" / "dr.conf").write_text(conf + "\n")
            try:
                self._pg_ctl(name, "-l", str(self._dir(name) / "postgres.log"), "-w", "-t", str(int(timeout)),
                             "start", timeout=timeout + 10)
            except CommandError as exc:
                raise PlatformError(f"server '{name}' did not start: {self._log_tail(name, 5)}", server=name) from exc
            meta.pop("stopped_at", None)
            self._write_meta(name, meta)
        return self.get_server(name)

    def stop_server(self, name: str, *, mode: str = "fast") -> None:
        """Stop a server (idempotent). A clean stop archives the last WAL segment."""
        meta = self._meta(name)
        if self._running(name):
            self._pg_ctl(name, "-m", mode, "-w", "-t", "120", "stop", timeout=140)
            meta["stopped_at"] = utcnow().isoformat()
            self._write_meta(name, meta)

    # --- ServerPlatform ---------------------------------------------------------------

    def get_server(self, name: str) -> ServerInfo:
        meta = self._meta(name)
        state = "Ready" if self._running(name) else "Stopped"
        return ServerInfo(
            name=name, state=state, version=meta["version"], host="127.0.0.1", port=meta["port"],
            created_at=datetime.fromisoformat(meta["created_at"]), tags=dict(meta.get("tags", {})),
        )

    def list_servers(self) -> list[ServerInfo]:
        if not self.servers_dir.exists():
            return []
        return [self.get_server(p.name) for p in sorted(self.servers_dir.iterdir()) if (p / "server.json").exists()]

    def connection(self, name: str, database: str) -> ConnInfo:
        meta = self._meta(name)
        return ConnInfo(host="127.0.0.1", port=meta["port"], user=ADMIN_USER, dbname=database,
                        password=self._password(name), sslmode="disable")

    def create_server(self, name: str, *, like: str | None = None, tags: dict[str, str] | None = None,
                      timeout: float = 600, archive: bool = True, version: int | None = None) -> ServerInfo:
        """Create and start an empty server with continuous WAL archiving and a first base backup.

        Args:
            version: the PostgreSQL major version (default: this platform's installation's).

        Raises:
            ServerExists: the name is taken.
            ConfigError: no installation of `version` here, naming what to install.
        """
        inst = self.installation if version in (None, self.installation.version) else choose_installation(
            version, field=f"the PostgreSQL version of server {name}")
        tools = self.tools if inst.bin_dir == self.tools.bin_dir else PgTools.default(inst.bin_dir)
        d = self._dir(name)
        if (d / "server.json").exists():
            raise ServerExists(f"server '{name}' already exists", server=name)
        if d.exists():  # debris of a creation that died before server.json was written
            shutil.rmtree(d)
        d.mkdir(parents=True)
        (d / "archive").mkdir()
        (d / "basebackups").mkdir()
        password = secrets.token_urlsafe(24)
        self._write_password(name, password)
        self._chown(d)
        self._chown(d / "archive")
        pwfile = d / "initdb.pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        self._chown(pwfile)
        try:
            tools.run(
                "initdb",
                ["-D", str(d / "data"), "-U", ADMIN_USER, f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
                 "--auth-local=scram-sha-256", f"--wal-segsize={self.wal_segment_mb}", "--encoding=UTF8",
                 "--locale=C.UTF-8", "--data-checksums",
                 *([] if self.fsync else ["--no-sync"])],
                user=self.os_user, timeout=300, env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"},
            )
        finally:
            pwfile.unlink(missing_ok=True)
        port = free_port()
        meta = {
            "name": name, "port": port, "version": tools.major_version("postgres"), "bin_dir": str(inst.bin_dir),
            "pg_source": inst.source,
            "created_at": utcnow().isoformat(), "tags": dict(tags or {}), "archive": archive,
        }
        self._write_conf(name, port, archive=archive)
        self._write_meta(name, meta)
        self.start_server(name, timeout=timeout)
        if archive:
            self.take_base_backup(name)
        log.info("created server %s on port %s (%s)", name, port, inst.describe())
        return self.get_server(name)

    def delete_server(self, name: str, *, timeout: float = 600) -> None:
        """Drop a server: stop it and keep its files under `dropped/` for the revive window."""
        d = self._dir(name)
        if not (d / "server.json").exists():
            return
        self.stop_server(name)
        stamp = utcnow().strftime("%Y%m%dT%H%M%S%fZ")
        dest = self.dropped_dir / name / stamp
        dest.parent.mkdir(parents=True, exist_ok=True)
        meta = self._meta(name)
        meta["dropped_at"] = utcnow().isoformat()
        self._write_meta(name, meta)
        os.replace(d, dest)
        log.info("dropped server %s (revivable until %s)", name, utcnow() + self.dropped_retention)
        self.purge_expired_dropped()

    def list_dropped_servers(self) -> list[DroppedServer]:
        out: list[DroppedServer] = []
        if not self.dropped_dir.exists():
            return out
        now = utcnow()
        for sdir in sorted(self.dropped_dir.iterdir()):
            for drop in sorted(sdir.iterdir(), reverse=True):
                meta_p = drop / "server.json"
                if not meta_p.exists():
                    continue
                at = datetime.fromisoformat(json.loads(meta_p.read_text())["dropped_at"])
                if at + self.dropped_retention >= now:
                    out.append(DroppedServer(sdir.name, at, at + self.dropped_retention, str(drop)))
        return out

    def purge_expired_dropped(self) -> list[str]:
        """Remove dropped servers past their revive window; returns what was removed."""
        removed = []
        if not self.dropped_dir.exists():
            return removed
        now = utcnow()
        for sdir in self.dropped_dir.iterdir():
            for drop in sdir.iterdir():
                meta_p = drop / "server.json"
                if meta_p.exists():
                    at = datetime.fromisoformat(json.loads(meta_p.read_text())["dropped_at"])
                    if at + self.dropped_retention < now:
                        shutil.rmtree(drop)
                        removed.append(str(drop))
        return removed

    def revive_dropped_server(self, name: str, *, timeout: float = 600) -> ServerInfo:
        if self.server_exists(name):
            raise ServerExists(f"server '{name}' exists; only a dropped server can be revived", server=name)
        candidates = [d for d in self.list_dropped_servers() if d.name == name]
        if not candidates:
            raise ServerNotFound(f"no dropped server '{name}' within the {self.dropped_retention.days}-day revive window",
                                 server=name)
        newest = max(candidates, key=lambda d: d.dropped_at)
        self.servers_dir.mkdir(parents=True, exist_ok=True)
        os.replace(newest.resource_id, self._dir(name))
        meta = self._meta(name)
        meta.pop("dropped_at", None)
        meta.setdefault("tags", {})["dr-revived-at"] = utcnow().isoformat()
        self._write_meta(name, meta)
        return self.start_server(name, timeout=timeout)

    # --- base backups and point-in-time restore --------------------------------------

    def take_base_backup(self, name: str) -> dict[str, Any]:
        """Take a `pg_basebackup` of a running server into its `basebackups/` directory."""
        d = self._dir(name)
        started = utcnow()
        bid = started.strftime("%Y%m%dT%H%M%S%fZ")
        target = d / "basebackups" / bid
        conn = self.connection(name, "postgres")
        with passfile_env(conn) as env:
            self._tools_of(name).run("pg_basebackup", ["-D", str(target), "-Fp", "-X", "stream", "-c", "fast", "--no-password",
                                             *([] if self.fsync else ["--no-sync"])],
                           env=env, timeout=3600)
        record = {"id": bid, "started_at": started.isoformat(), "finished_at": utcnow().isoformat(),
                  "version": self._meta(name)["version"]}
        (d / "basebackups" / f"{bid}.json").write_text(json.dumps(record))
        return record

    def list_base_backups(self, name: str) -> list[dict[str, Any]]:
        bdir = self._dir(name) / "basebackups"
        if not bdir.exists():
            return []
        recs = [json.loads(p.read_text()) for p in bdir.glob("*.json")]
        return sorted(recs, key=lambda r: r["finished_at"])

    def _force_archive(self, name: str) -> datetime:
        """Write a commit after now and archive the current WAL segment; returns that time.

        Recovery to a time target stops at the first commit after the target, so one must
        exist in the archive for any target up to now.
        """
        conn = self.connection(name, "postgres")
        try:
            with psycopg.connect(**conn.psycopg_kwargs(), autocommit=True) as c:
                c.execute("SELECT pg_current_xact_id()")  # forces a commit record
                wal = c.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    last = c.execute("SELECT last_archived_wal, last_failed_wal FROM pg_stat_archiver").fetchone()
                    if last[0] and last[0] >= wal:
                        return utcnow()
                    time.sleep(0.2)
        except psycopg.OperationalError as exc:
            raise ConnectionFailed(f"cannot reach server '{name}': {exc}", server=name) from exc
        raise OperationTimedOut(f"WAL segment {wal} of '{name}' was not archived within 60 s; check {self._dir(name)/'postgres.log'}",
                                server=name)

    def get_restore_window(self, name: str) -> RestoreWindow:
        meta = self._meta(name)
        backups = self.list_base_backups(name)
        if not backups:
            raise PlatformError(f"server '{name}' has no base backup, so no point-in-time restore is possible yet",
                                server=name)
        earliest = datetime.fromisoformat(backups[0]["finished_at"]).replace(microsecond=0) + timedelta(seconds=1)
        latest = utcnow() if self._running(name) else datetime.fromisoformat(meta.get("stopped_at") or meta["created_at"])
        return RestoreWindow(earliest=earliest, latest=latest.replace(microsecond=0))

    def point_in_time_restore(self, source: str, new_name: str, point_in_time_utc: datetime, *,
                              tags: dict[str, str] | None = None, timeout: float = 1800) -> ServerInfo:
        if point_in_time_utc.tzinfo is None:
            raise InvalidRestoreTime("the restore time must carry a time zone (UTC)")
        target = point_in_time_utc.astimezone(timezone.utc)
        debris = self._dir(new_name)
        if debris.exists() and not (debris / "server.json").exists():
            # a restore killed before it recorded itself (server.json is written before pg_ctl start)
            shutil.rmtree(debris)
        if self.server_exists(new_name):
            existing = self.get_server(new_name)
            if existing.tags.get(TAG_SOURCE) == source and existing.tags.get(TAG_RESTORE_TIME) == target.isoformat():
                log.info("PTR server %s already exists at %s; reusing it", new_name, target.isoformat())
                return self.start_server(new_name) if existing.state != "Ready" else existing
            raise ServerExists(f"server '{new_name}' exists but is not a restore of '{source}' at {target.isoformat()}",
                               server=new_name)
        window = self.get_restore_window(source)
        if not (window.earliest <= target <= window.latest):
            raise InvalidRestoreTime(
                f"{target.isoformat()} is outside the restore window of '{source}': "
                f"{window.earliest.isoformat()} .. {window.latest.isoformat()}"
            )
        if self._running(source):
            self._force_archive(source)
        base = [b for b in self.list_base_backups(source) if datetime.fromisoformat(b["finished_at"]) < target][-1]
        src_dir, d = self._dir(source), self._dir(new_name)
        d.mkdir(parents=True)
        (d / "archive").mkdir()
        (d / "basebackups").mkdir()
        try:
            shutil.copytree(src_dir / "basebackups" / base["id"], d / "data", symlinks=True)
            (d / "data" / "postgresql.auto.conf").touch()
            for stale in ("postmaster.pid", "standby.signal", "backup_label.old"):
                (d / "data" / stale).unlink(missing_ok=True)
            os.chmod(d / "data", 0o700)
            shutil.copy2(src_dir / "password", d / "password")
            port = free_port()
            restore_cmd = f"cp {_sh_quote(str(src_dir / 'archive'))}/%f %p"
            self._write_conf(new_name, port, archive=False, recovery={
                "restore_command": restore_cmd,
                "recovery_target_time": target.strftime("%Y-%m-%d %H:%M:%S.%f+00"),
                "recovery_target_action": "promote",
                "recovery_target_timeline": "latest",
            })
            (d / "data" / "recovery.signal").touch()
            self._chown(d, recursive=True)
            os.chown(d / "password", os.geteuid(), os.getegid())  # the admin password stays the tool's own
            all_tags = {**(tags or {}), TAG_CREATED_BY: TAG_CREATED_BY_VALUE, TAG_PURPOSE: "point-in-time-restore",
                        TAG_SOURCE: source, TAG_RESTORE_TIME: target.isoformat()}
            self._write_meta(new_name, {
                "name": new_name, "port": port, "version": base["version"],
                "bin_dir": str(self.installation_of(source).bin_dir),
                "pg_source": self.installation_of(source).source, "created_at": utcnow().isoformat(),
                "tags": all_tags, "archive": False, "restoring": True,
            })
            self._pg_ctl(new_name, "-l", str(d / "postgres.log"), "-t", str(int(timeout)), "start", timeout=60)
            self._wait_promoted(new_name, timeout)
        except Exception as exc:
            # leave nothing half-made: the new server is ours and empty of anything but the copy
            log.error("point-in-time restore to %s failed; removing the half-made server", new_name)
            try:
                self._pg_ctl(new_name, "-m", "immediate", "stop", timeout=60)
            except Exception:
                pass
            tail = self._log_tail(new_name)
            shutil.rmtree(d, ignore_errors=True)
            if isinstance(exc, (OperationTimedOut, RestoreError)):
                raise
            raise RestoreError(f"point-in-time restore of '{source}' to '{new_name}' failed: {tail or exc}",
                               server=new_name) from exc
        # back to plain settings, with archiving, so the new server is a normal one
        meta = self._meta(new_name)
        meta.pop("restoring", None)
        self._write_meta(new_name, meta)
        log.info("point-in-time restore of %s at %s is server %s", source, target.isoformat(), new_name)
        return self.get_server(new_name)

    def _wait_promoted(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        conn = self.connection(name, "postgres")
        while time.monotonic() < deadline:
            if not self._running(name):
                time.sleep(0.5)
                if not self._running(name):
                    raise RestoreError(f"recovery of '{name}' stopped: {self._log_tail(name, 6)}", server=name)
            try:
                with psycopg.connect(**conn.psycopg_kwargs(), autocommit=True) as c:
                    if not c.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                        return
            except psycopg.OperationalError:
                pass
            time.sleep(0.3)
        raise OperationTimedOut(f"server '{name}' did not finish recovery within {timeout:.0f} s", server=name)

    # --- extensions, parameters, snapshots ----------------------------------------------

    def _install_fix(self, inst: PgInstallation) -> str:
        from dr.pginstall import find_installations

        fix = (f"PostgreSQL {inst.version} ({inst.origin}) does not carry it: run the environment on a PostgreSQL "
               f"with the full contrib set (Debian/Ubuntu: apt-get install postgresql-{inst.version}, from "
               "apt.postgresql.org if the distribution has no such version)")
        others = sorted({i.version: i for i in find_installations() if i.full_contrib and i.bin_dir != inst.bin_dir}
                        .values(), key=lambda i: i.version)
        if others:
            fix += ("; installed here with the full contrib set: "
                    + ", ".join(f"PostgreSQL {i.version} ({i.origin})" for i in others)
                    + f": set postgres_version = {others[-1].version if len(others) == 1 else '<one of them>'} "
                      "for the environment")
        return fix

    def get_extension_support(self, name: str) -> ExtensionSupport:
        base = super().get_extension_support(name)
        inst = self.installation_of(name)
        return ExtensionSupport(server=name, version=base.version, available=base.available,
                                description=inst.describe(), install_fix=self._install_fix(inst))

    def expected_extension_support(self, snapshot: ServerSnapshot) -> ExtensionSupport:
        """What a server of the snapshot's version will offer: its installation's control files."""
        inst = self.installation if snapshot.version == self.installation.version else choose_installation(
            snapshot.version, field=f"the PostgreSQL version of server {snapshot.server}")
        return ExtensionSupport(server=snapshot.server, version=inst.version, available=inst.extensions(),
                                description=inst.describe(), install_fix=self._install_fix(inst))

    def get_server_parameters(self, name: str) -> dict[str, str]:
        """The parameters set with `ALTER SYSTEM` (`postgresql.auto.conf`), less what the platform manages."""
        from dr.catalog import PLATFORM_MANAGED_PARAMETERS
        from dr.database import connect

        with connect(self.connection(name, "postgres")) as c:
            rows = c.execute("SELECT name, setting FROM pg_file_settings WHERE sourcefile LIKE '%/postgresql.auto.conf' "
                             "ORDER BY seqno").fetchall()
        return {n: _normal(n, v) for n, v in rows if n not in PLATFORM_MANAGED_PARAMETERS}

    def set_server_parameters(self, name: str, parameters: dict[str, str], *, timeout: float = 600) -> ParameterChange:
        """Set parameters with `ALTER SYSTEM`, reload, and restart the server if any needs it."""
        from psycopg import sql

        from dr.catalog import PLATFORM_MANAGED_PARAMETERS
        from dr.database import connect

        managed = sorted(set(parameters) & PLATFORM_MANAGED_PARAMETERS)
        if managed:
            raise PlatformError(f"the local platform sets {', '.join(managed)} itself; they cannot be carried over",
                                server=name)
        current = self.get_server_parameters(name)
        changed = {k: v for k, v in parameters.items() if current.get(k) != _normal(k, v)}
        if not changed:
            return ParameterChange(name, {}, sorted(parameters), restarted=False)
        with connect(self.connection(name, "postgres")) as c:
            # those that take effect only when the server starts (context postmaster): known before any change
            pending = [r[0] for r in c.execute("SELECT name FROM pg_settings WHERE context = 'postmaster' "
                                               "AND name = ANY(%s) ORDER BY 1", (list(changed),))]
            for k, v in changed.items():
                values = [x.strip().strip('"') for x in v.split(",") if x.strip()] if k in LIST_PARAMETERS else [v]
                stmt = sql.SQL("ALTER SYSTEM SET {} = {}").format(
                    sql.Identifier(k), sql.SQL(", ").join(sql.Literal(x) for x in values or [""]))
                try:
                    c.execute(stmt)
                except psycopg.Error as exc:
                    raise PlatformError(f"server '{name}' refused the parameter {k} = {v!r}: "
                                        f"{str(exc).strip().splitlines()[0]}", server=name) from exc
            if not pending:
                c.execute("SELECT pg_reload_conf()")
        restarted = False
        if pending:
            log.info("server %s restarts for %s", name, ", ".join(pending))
            self.stop_server(name)
            self.start_server(name, timeout=timeout)
            restarted = True
        with connect(self.connection(name, "postgres")) as c:  # pg_file_settings reads the files as they are now
            errors = c.execute("SELECT name, error FROM pg_file_settings WHERE error IS NOT NULL AND name = ANY(%s)",
                               (list(changed),)).fetchall()
        if errors:
            raise PlatformError(f"server '{name}' did not take the parameters: "
                                + "; ".join(f"{n}: {e}" for n, e in errors), server=name)
        log.info("server %s: set %s%s", name, ", ".join(f"{k} = {v}" for k, v in changed.items()),
                 " (restarted)" if restarted else "")
        return ParameterChange(name, changed, sorted(set(parameters) - set(changed)), restarted)

    def get_server_snapshot(self, name: str) -> ServerSnapshot:
        snap = super().get_server_snapshot(name)
        inst = self.installation_of(name)
        return dataclasses.replace(snap, network={"host": "127.0.0.1"},
                                   extra={"installation": inst.describe(), "bin_dir": str(inst.bin_dir)})

    def create_server_from_snapshot(self, name: str, snapshot: ServerSnapshot, *, tags: dict[str, str] | None = None,
                                    timeout: float = 600) -> ServerInfo:
        """An empty server of the snapshot's PostgreSQL version (the installation of that version here)."""
        return self.create_server(name, tags=tags, timeout=timeout, version=snapshot.version)


#: parameters whose value is a list of quoted names (`ALTER SYSTEM SET x = 'a', 'b'`, not `'a,b'`)
LIST_PARAMETERS = frozenset({"shared_preload_libraries", "session_preload_libraries", "local_preload_libraries",
                             "search_path", "temp_tablespaces"})


def _normal(name: str, value: str) -> str:
    """A parameter's value as compared: list parameters as `a, b`."""
    if name in LIST_PARAMETERS:
        return ", ".join(x.strip().strip('"') for x in value.split(",") if x.strip())
    return value
