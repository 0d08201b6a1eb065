"""`dr local`: the embedded local platform."""

from __future__ import annotations

from typing import Any, Optional

import typer

from dr import output
from dr.cli.core import ConfigOpt, EnvOpt, ServiceOpt, _ctx, _run, local_app
from dr.config import load_config


@local_app.command("up")
def local_up(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt, size: str = typer.Option(
        "small", help="Sample data size: small, or e.g. 100mb, 1gb."), config: Optional[str] = ConfigOpt) -> None:
    """Start (or create) the live server with sample data, WAL archiving, and the app."""

    def body() -> None:
        from dr.platforms.local import lifecycle

        cfg, s, e, _ = _ctx(config, service, env)
        st = lifecycle.up(cfg, cfg.target(s, e), size)
        _print_status(st)

    _run(body)


@local_app.command("status")
def local_status(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt, config: Optional[str] = ConfigOpt) -> None:
    """Show where the local servers, store and app run."""

    def body() -> None:
        from dr.platforms.local import lifecycle

        cfg, s, e, _ = _ctx(config, service, env)
        _print_status(lifecycle.status(cfg, cfg.target(s, e)))

    _run(body)


@local_app.command("down")
def local_down(purge: bool = typer.Option(False, help="Also delete every server, backup and archive."),
               config: Optional[str] = ConfigOpt) -> None:
    """Stop every local server and app (with --purge, delete the state directory)."""

    def body() -> None:
        from dr.platforms.local import lifecycle

        for line in lifecycle.down(load_config(config), purge):
            output.say(f"stopped {line}" if not line.startswith("purged") else line)

    _run(body)


def _print_status(st: Any) -> None:
    pg = st.postgres
    output.say(f"postgres  {pg['describe']}")
    output.say(f"          {len(pg['extensions'])} extensions available: {', '.join(pg['extensions'])}")
    if pg["missing_contrib"]:
        output.say(f"          WARNING: no {', '.join(pg['missing_contrib'])} (contrib modules this build lacks): a database "
                   "using them cannot be restored here; install the distribution's PostgreSQL (apt-get install "
                   "postgresql) and set postgres_version to its version for the environment")
    srv = st.server
    output.say(f"server    {srv['name']} {srv['state']} PostgreSQL {srv['version']} at {srv['host']}:{srv['port']}"
               if srv else "server    (none)")
    output.say(f"database  {st.database}: " + (", ".join(f"{k.split('.')[-1]}={v}" for k, v in st.tables.items()) or "(unreachable)"))
    output.say(f"archive   {st.wal_segments} WAL segments, {st.base_backups} base backup(s)")
    output.say(f"store     {st.store} ({st.backups} backups)")
    if st.app:
        output.say(f"app       {st.app['main_url']}  maintenance={'on' if st.app['maintenance'] else 'off'}  "
                   f"replicas={st.app['replicas']}" + (f"  temp={st.app['temp_url']}" if st.app['temp_url'] else ""))
    if st.dropped:
        output.say(f"dropped   {', '.join(st.dropped)}")
