"""Running the Prefect side: server, worker, deployments, automations, and the alert endpoint."""

from __future__ import annotations

import os
from typing import Optional

import typer

from dr import output
from dr.cli.core import ConfigOpt, _run, app, server_app, use_prefect, worker_app
from dr.config import load_config


def _api_url_or_fail() -> str:
    """PREFECT_API_URL, else the local Prefect server when it runs (`dr local up`); never a temporary server."""
    from dr import prefect_server
    from dr.errors import ConfigError

    api = os.environ.get("PREFECT_API_URL")
    if api:
        return api
    srv = prefect_server.running()
    if srv:
        os.environ["PREFECT_API_URL"] = srv.api
        return srv.api
    raise ConfigError("PREFECT_API_URL is not set and the local Prefect server is not running: start it with "
                      "`dr local up` (or run one with `dr server start` and export the PREFECT_API_URL it prints)")


@server_app.command("start")
def server_start_cmd(host: str = typer.Option("127.0.0.1", help="Address to listen on."),
                     port: Optional[int] = typer.Option(None, help="Port (default 4200, or a free one if taken)."),
                     ui: bool = typer.Option(True, "--ui/--no-ui", help="Serve the Prefect UI.")) -> None:
    """Run a self-hosted Prefect server in the foreground (`prefect server start`, analytics off).

    SQLite under .dr-local/prefect unless PREFECT_API_DATABASE_CONNECTION_URL names a
    PostgreSQL database; set PREFECT_SERVER_API_AUTH_STRING for basic auth.
    """

    def body() -> None:
        from deployments import stack
        from dr import prefect_server
        from dr.errors import ConfigError

        home = stack.prefect_home()
        running = prefect_server.running(home)
        if running:  # two servers on one SQLite database would corrupt each other's view
            raise ConfigError(f"the local Prefect server already runs on this state ({running.url}, {home}); "
                              "stop it with `dr local down` first, or use it")
        p = port or stack.pick_port()
        output.say(f"Prefect server on http://{host}:{p} (state in {home}); for the other commands:\n"
                   f"  export PREFECT_API_URL=http://{'127.0.0.1' if host == '0.0.0.0' else host}:{p}/api")
        cmd = stack.server_command(host, p, ui=ui)
        os.execvpe(cmd[0], cmd, stack.server_env(home))

    _run(body)


@worker_app.command("start")
def worker_start_cmd(pool: str = typer.Option("dr", help="The work pool (created as a process pool if missing)."),
                     name: Optional[str] = typer.Option(None, help="The worker's name."),
                     limit: Optional[int] = typer.Option(None, help="Most flow runs at once."),
                     heartbeat_seconds: int = typer.Option(60, metavar="SECONDS", help=(
                         "PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the flow runs (at least 30); "
                         "`dr automations` must be given the same value."))) -> None:
    """Run a process worker in the foreground (`prefect worker start --pool dr`), DR_HOME set for the flow runs."""

    def body() -> None:
        from deployments import stack

        api = _api_url_or_fail()
        cmd = stack.worker_command(pool, name=name, limit=limit)
        env = stack.worker_env(api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(heartbeat_seconds))
        output.say(f"worker for pool {pool} at {api}; flow runs start in {env['DR_HOME']}")
        os.chdir(env["DR_HOME"])
        os.execvpe(cmd[0], cmd, env)

    _run(body)


@app.command("alerts")
def alerts_cmd(host: str = typer.Option("127.0.0.1", help="Address to listen on."),
               port: int = typer.Option(8787, help="Port to listen on."),
               config: Optional[str] = ConfigOpt) -> None:
    """Serve the alert endpoint (Azure Monitor common alert schema → a scenario run that waits for a person)."""

    def body() -> None:
        cfg = load_config(config)
        use_prefect()  # the runs an alert starts are on this server
        from dr.alerts import serve

        serve(cfg, host, port)

    _run(body)



@app.command("automations")
def automations_cmd(heartbeat_seconds: int = typer.Option(60, metavar="SECONDS", help="The workers' PREFECT_FLOWS_HEARTBEAT_FREQUENCY."),
                    config: Optional[str] = ConfigOpt) -> None:
    """Register the Prefect automations (runs whose worker died are marked Crashed; on-call is told)."""

    def body() -> None:
        cfg = load_config(config)
        use_prefect()
        from deployments.automations import ensure_automations
        from dr.notify import webhook_urls

        made = ensure_automations(heartbeat_seconds, webhooks=webhook_urls(cfg))
        output.say("created: " + ", ".join(made) if made else "automations already registered")

    _run(body)
