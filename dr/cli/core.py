"""The `dr` application, its shared options, and how a command body runs (errors, config, targets).

The commands live in the modules beside this one, one per area; `dr/cli/__init__.py` imports
them so that they register on `app` in the order `dr --help` lists them."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Optional

import typer

from dr import output
from dr.config import ENVIRONMENTS, DrConfig, find_config_path, load_config
from dr.errors import DrError

app = typer.Typer(help="Disaster recovery for PostgreSQL services: the runbook as tracked, retryable flows.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
local_app = typer.Typer(help="The embedded local platform (real PostgreSQL, store, app).", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
maint_app = typer.Typer(help="Maintenance page on/off.", no_args_is_help=True)
app.add_typer(local_app, name="local")
app.add_typer(config_app, name="config")
app.add_typer(maint_app, name="maintenance")
server_app = typer.Typer(help="The self-hosted Prefect server (SQLite under .dr-local/prefect).", no_args_is_help=True)
worker_app = typer.Typer(help="A process worker of the work pool `dr`.", no_args_is_help=True)
app.add_typer(server_app, name="server")
app.add_typer(worker_app, name="worker")

ConfigOpt = typer.Option(None, "--config", "-c", help="Configuration file (default $DR_CONFIG or ./dr.toml).")
ServiceOpt = typer.Option(None, "--service", "-s", help="Service short name (default: the only one configured).")
EnvOpt = typer.Option(None, "--env", "-e", help=f"Environment: {', '.join(ENVIRONMENTS)} (default: the only one).")


def _run(fn: Callable[[], Any]) -> Any:
    """Run a command body; a `DrError` becomes one clear line and its exit code."""
    from dr.commands import install_redaction

    install_redaction()
    if sys.stderr.isatty():
        from dr.progress import GLOBAL_HOOKS, terminal_bar

        if not GLOBAL_HOOKS:
            GLOBAL_HOOKS.append(terminal_bar())
    try:
        return fn()
    except DrError as exc:
        output.error(str(exc))
        raise typer.Exit(exc.exit_code)
    except KeyboardInterrupt:
        output.error("interrupted")
        raise typer.Exit(130)


def _pick(cfg: DrConfig, service: Optional[str], env: Optional[str]) -> tuple[str, str]:
    from dr.errors import ConfigError

    if service is None:
        if len(cfg.services) != 1:
            raise ConfigError(f"several services are configured ({', '.join(cfg.services)}); choose one with --service")
        service = next(iter(cfg.services))
    if env is None:
        envs = cfg.services[service].environments if service in cfg.services else {}
        if len(envs) != 1:
            raise ConfigError(f"choose an environment with --env ({', '.join(envs) or 'none configured'})")
        env = next(iter(envs))
    cfg.target(service, env)  # unknown names fail here, before anything is touched
    return service, env


def _ctx(config: Optional[str], service: Optional[str], env: Optional[str]) -> tuple[DrConfig, str, str, Optional[str]]:
    cfg = load_config(config)
    s, e = _pick(cfg, service, env)
    path = find_config_path(config)
    return cfg, s, e, (str(path.absolute()) if path else None)


def _prefect_defaults() -> None:
    """Without a Prefect server configured, keep Prefect's state beside the local platform's."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the first start of the temporary server migrates its database; 20 s is too short on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        home = os.path.abspath(os.path.join(".dr-local", "prefect"))
        os.makedirs(home, exist_ok=True)
        os.environ["PREFECT_HOME"] = home


def main() -> None:
    _prefect_defaults()
    logging.basicConfig(level=os.environ.get("DR_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    app(prog_name="dr")

