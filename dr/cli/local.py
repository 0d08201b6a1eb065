"""`dr local`: the embedded local platform, and the project's Prefect server beside it (dr/prefect_server.py)."""

from __future__ import annotations

from typing import Any, Optional

import typer

from dr import output
from dr.cli.core import ConfigOpt, EnvOpt, ServiceOpt, _ctx, _run, local_app
from dr.config import load_config


@local_app.command("up")
def local_up(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt, size: str = typer.Option(
        "small", help="Sample data size: small, or e.g. 100mb, 1gb."), config: Optional[str] = ConfigOpt) -> None:
    """Start (or create) the live server with sample data, WAL archiving, and the app; and the local Prefect server."""

    def body() -> None:
        from dr.platforms.local import lifecycle

        cfg, s, e, _ = _ctx(config, service, env)
        st = lifecycle.up(cfg, cfg.target(s, e), size)
        _print_status(st)
        _print_prefect(start=True)

    _run(body)


@local_app.command("status")
def local_status(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt, config: Optional[str] = ConfigOpt) -> None:
    """Show where the local servers, store and app run, and the Prefect UI's address."""

    def body() -> None:
        from dr.platforms.local import lifecycle

        cfg, s, e, _ = _ctx(config, service, env)
        _print_status(lifecycle.status(cfg, cfg.target(s, e)))
        _print_prefect(start=False)

    _run(body)


@local_app.command("down")
def local_down(purge: bool = typer.Option(False, "--purge", help="Also delete every server, backup and archive."),
               config: Optional[str] = ConfigOpt) -> None:
    """Stop every local server and app, and the local Prefect server (with --purge, delete the state directory)."""

    def body() -> None:
        from dr import prefect_server
        from dr.platforms.local import lifecycle

        cfg = load_config(config)
        stopped = prefect_server.stop()  # first: --purge may delete its home
        if stopped:
            output.say(f"stopped Prefect server {stopped.url} (pid {stopped.pid}); its runs stay in {stopped.home}")
        for line in lifecycle.down(cfg, purge):
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


def _print_prefect(*, start: bool) -> None:
    """Where this project's runs are recorded: the UI to open (started first with `start`)."""
    import os

    from dr import prefect_server

    api = os.environ.get("PREFECT_API_URL")
    if api:
        answers = prefect_server.healthy(api)
        output.say(f"prefect   {prefect_server.ui_url(api)} (PREFECT_API_URL{'' if answers else ', NOT answering'})")
        return
    srv = prefect_server.ensure(say=output.note) if start else prefect_server.running()
    if srv:
        output.say(f"prefect   UI {srv.url}  (pid {srv.pid}, state in {srv.home}; every dr command's runs are here)")
    else:
        output.say(f"prefect   not running (the first command that runs a flow starts it, or `dr local up`; "
                   f"state in {prefect_server.default_home()})")
