"""`dr local up | status | down`: the local DR playground for one service environment."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

from dr.config import DrConfig, Target
from dr.database import create_database, database_exists
from dr.platforms.local import local_app, local_servers, local_store
from dr.platforms.local.sample import load_sample, scale_for_size, table_counts
from dr.platforms.local.servers import LocalServers


@dataclass
class LocalStatus:
    #: the PostgreSQL the environment's server runs (or will run): installation, version, extensions
    postgres: dict[str, Any]
    server: dict[str, Any] | None
    database: str
    tables: dict[str, int]
    app: dict[str, Any] | None
    store: str
    backups: int
    base_backups: int
    wal_segments: int
    dropped: list[str]


def up(config: DrConfig, target: Target, size: str = "small") -> LocalStatus:
    """Start (or create) the live server with sample data, archiving and a base backup, and the app."""
    servers = local_servers(config, target)
    scale = scale_for_size(size)
    if servers.server_exists(target.server):
        servers.start_server(target.server)
    else:
        servers.create_server(target.server, tags={"dr-service": target.service, "dr-environment": target.environment})
    admin = servers.connection(target.server, "postgres")
    if not database_exists(admin, target.database):
        create_database(admin, target.database)
    conn = servers.connection(target.server, target.database)
    fresh = not table_counts(conn)
    load_sample(conn, scale)
    if fresh:
        servers.take_base_backup(target.server)  # so the loaded data is inside the PTR window
    local_app(config, target).up()
    return status(config, target)


def postgres_status(servers: LocalServers, server: str | None) -> dict[str, Any]:
    """Which PostgreSQL a server runs (or a new server would run), and the extensions it offers."""
    inst = servers.installation_of(server) if server and servers.server_exists(server) else servers.installation
    return {"version": inst.version, "version_full": inst.version_full, "source": inst.source, "origin": inst.origin,
            "bin_dir": str(inst.bin_dir), "extensions": sorted(inst.extensions()),
            "missing_contrib": inst.missing_contrib(), "describe": inst.describe()}


def status(config: DrConfig, target: Target) -> LocalStatus:
    servers = local_servers(config, target)
    store = local_store(config, target)
    app = local_app(config, target)
    srv: dict[str, Any] | None = None
    tables: dict[str, int] = {}
    bases = wal = 0
    exists = servers.server_exists(target.server)
    if exists:
        info = servers.get_server(target.server)
        srv = {"name": info.name, "state": info.state, "version": info.version, "host": info.host, "port": info.port}
        bases = len(servers.list_base_backups(target.server))
        wal = len([p for p in (servers.servers_dir / target.server / "archive").iterdir() if not p.name.endswith(".part")])
        if info.state == "Ready":
            try:
                tables = table_counts(servers.connection(target.server, target.database))
            except Exception:
                tables = {}
    app_status: dict[str, Any] | None = None
    if app.json.exists():
        st = app.get_status()
        app_status = {"main_url": st.main_url, "temp_url": st.temp_url, "maintenance": st.maintenance,
                      "replicas": st.replicas}
    return LocalStatus(
        postgres=postgres_status(servers, target.server if exists else None), server=srv, database=target.database, tables=tables, app=app_status, store=str(store.root),
        backups=len(store.list_backups()), base_backups=bases, wal_segments=wal,
        dropped=[f"{d.name} (until {d.revivable_until:%Y-%m-%d %H:%M} UTC)" for d in servers.list_dropped_servers()],
    )


def down(config: DrConfig, purge: bool = False) -> list[str]:
    """Stop every local app and server; with `purge`, delete the whole state directory."""
    servers = local_servers(config)
    stopped = []
    apps_dir = config.local.state_dir.absolute() / "apps"
    if apps_dir.exists():
        from dr.platforms.local.app import LocalApp

        for d in apps_dir.iterdir():
            if (d / "app.json").exists():
                LocalApp(config.local.state_dir, d.name, server="", database="").down()
                stopped.append(f"app {d.name}")
    for s in servers.list_servers():
        if s.state == "Ready":
            servers.stop_server(s.name)
            stopped.append(f"server {s.name}")
    if purge and config.local.state_dir.exists():
        shutil.rmtree(config.local.state_dir)
        stopped.append(f"purged {config.local.state_dir}")
    return stopped
