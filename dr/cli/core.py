"""The `dr` application, its shared options, and how a command body runs (errors, config, targets).

The commands live in the modules beside this one, one per area; `dr/cli/__init__.py` imports
them so that they register on `app` in the order `dr --help` lists them.

What every command shares:

- **One line for bad input.** A `DrError` prints `error: <what; what is left unchanged>` and
  nothing else (no traceback, no Prefect banner or engine log), and exits with its code (see
  `EXIT_CODES`). A usage error of the command line itself is one such line too. `--verbose`
  (or `DR_LOG_LEVEL=DEBUG`) shows the logs. An unexpected exception (a bug) still prints its
  traceback, and where the run's logs are.
- **One Prefect server.** A command that runs or answers a flow calls `use_prefect()` first:
  `PREFECT_API_URL`, else the project's persistent server (dr/prefect_server.py).
- **Fast paths.** Command modules import only typer and the small `dr.output`/`dr.config`
  at load time; a command's body imports what it runs, so `dr backups` or a refused input
  never imports Prefect or the Azure SDKs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, Callable, Optional

import typer

from dr import output
from dr.config import ENVIRONMENTS, DrConfig, find_config_path, load_config
from dr.errors import DrError

#: what `dr`'s exit code means (also in `dr --help`)
EXIT_CODES = {
    0: "done",
    1: "the operation failed (the error line says what state the world is in and how to resume), or a bug",
    2: "bad input or a refusal: nothing was started or changed",
    3: "a person rejected an approval, or nobody answered it in time: nothing destructive was done",
    4: "cannot start now: the plan has blockers, or another recovery holds the environment",
    130: "interrupted (Ctrl-C, SIGTERM, SIGHUP)",
}

app = typer.Typer(help="Disaster recovery for PostgreSQL services: the runbook as tracked, retryable flows.\n\n"
                       "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + ".",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=True)
local_app = typer.Typer(help="The embedded local platform (real PostgreSQL, store, app) and the local Prefect server.",
                        no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
maint_app = typer.Typer(help="Maintenance page on/off.", no_args_is_help=True)
app.add_typer(local_app, name="local")
app.add_typer(config_app, name="config")
app.add_typer(maint_app, name="maintenance")
server_app = typer.Typer(help="Run a Prefect server in the foreground (the local one runs detached: `dr local up`).",
                         no_args_is_help=True)
worker_app = typer.Typer(help="A process worker of the work pool `dr`.", no_args_is_help=True)
app.add_typer(server_app, name="server")
app.add_typer(worker_app, name="worker")

ConfigOpt = typer.Option(None, "--config", "-c", metavar="FILE", help="Configuration file (default $DR_CONFIG or ./dr.toml).")
ServiceOpt = typer.Option(None, "--service", "-s", metavar="NAME", help="Service short name (default: the only one configured).")
EnvOpt = typer.Option(None, "--env", "-e", metavar="ENV", help=f"Environment: {', '.join(ENVIRONMENTS)} (default: the only one).")


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v", help=(
        "Show the logs (Prefect's and ours) and full errors; same as DR_LOG_LEVEL=DEBUG."))) -> None:
    """Disaster recovery for PostgreSQL services: the runbook as tracked, retryable flows."""
    if verbose:
        _configure_logging(verbose=True)


# --- logging: one handler on the root logger, quiet unless asked -------------------------------


class CliLogFilter(logging.Filter):
    """What reaches the terminal: everything with --verbose; otherwise our warnings for a person and
    the steps of a run, never an engine's failure report (the command's one error line says it)
    nor Prefect's internal chatter (its log and event queues draining at exit).

    It also remembers the last flow run it saw a record of, for "where are the logs".
    """

    verbose = False
    last_flow_run: Optional[tuple[str, str]] = None

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "flow_run_id", None)
        if rid:
            CliLogFilter.last_flow_run = (str(rid), str(getattr(record, "flow_run_name", "") or ""))
        if CliLogFilter.verbose:
            return True
        if getattr(record, "dr_show", False):
            return True
        # ours and the runs' own logs; Prefect's internals (client, services) only with --verbose
        ours = record.name.split(".", 1)[0] in ("dr", "flows", "tasks", "deployments") or \
            record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))
        return ours and record.levelno == logging.WARNING and not record.exc_info


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if CliLogFilter.verbose:
            return super().format(record)
        msg = record.getMessage()
        return f"warning: {msg}" if record.levelno >= logging.WARNING else f"  {msg}"


_HANDLER: Optional[logging.Handler] = None


def _configure_logging(*, verbose: bool) -> None:
    """Our one root handler (Prefect keeps a user's root handler: it then adds no console of its own)."""
    global _HANDLER
    CliLogFilter.verbose = verbose
    root = logging.getLogger()
    if _HANDLER is None:
        _HANDLER = logging.StreamHandler(sys.stderr)
        _HANDLER.addFilter(CliLogFilter())
        _HANDLER.setFormatter(_CliFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(_HANDLER)
    root.setLevel(logging.INFO)  # other libraries' debug chatter (graphviz, httpcore...) stays out even then
    for ours in ("dr", "flows", "tasks", "deployments"):
        logging.getLogger(ours).setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "httpcore", "asyncio", "urllib3", "azure", "kubernetes"):  # every request: no
        logging.getLogger(noisy).setLevel(logging.WARNING)


def use_prefect(*, start: bool = True) -> Any:
    """Point this command at its Prefect server before Prefect is imported (see dr/prefect_server.py).

    Args:
        start: start the project's server when it is not running (False: only use a running one).

    Returns:
        The `dr.prefect_server.Resolved` choice.
    """
    from dr.prefect_server import resolve

    return resolve(say=output.note, start=start)


def plan_run() -> Any:
    """Settings for a flow run that only plans: no heartbeats (it lasts seconds, and Prefect joins the
    heartbeat thread at the end of every run: up to 1 s more for the person waiting)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _run(fn: Callable[[], Any]) -> Any:
    """Run a command body: a `DrError` becomes one clear line and its exit code; a bug keeps its traceback."""
    from dr.commands import install_redaction

    install_redaction()
    if sys.stderr.isatty():
        from dr.progress import GLOBAL_HOOKS, terminal_bar

        if not GLOBAL_HOOKS:
            GLOBAL_HOOKS.append(terminal_bar())
    try:
        return fn()
    except DrError as exc:
        if CliLogFilter.verbose:  # the details behind the one line
            import traceback

            traceback.print_exc()
        output.error(str(exc))
        raise typer.Exit(exc.exit_code)
    except (KeyboardInterrupt, _Stopped) as exc:
        output.error(f"interrupted ({exc or 'Ctrl-C'}); if a run was in progress, its timeline says where it "
                     "stopped and re-running the same command resumes it")
        raise typer.Exit(130)
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception:
        import traceback

        traceback.print_exc()
        output.error(_where_the_logs_are())
        raise typer.Exit(1)


def _where_the_logs_are() -> str:
    from dr.prefect_server import ui_url

    api = os.environ.get("PREFECT_API_URL")
    run = CliLogFilter.last_flow_run
    if run and api:
        return f"unexpected error (a bug; please report it with the traceback above); the run's logs: " \
               f"{ui_url(api)}/runs/flow-run/{run[0]} (flow run {run[1]})"
    if run:
        return ("unexpected error (a bug; please report it with the traceback above); the run's logs were on "
                "Prefect's temporary server and went with it: run the command again with --verbose")
    return "unexpected error (a bug; please report it with the traceback above); run again with --verbose for the logs"


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
    try:
        s, e = _pick(cfg, service, env)
    except DrError as exc:
        raise exc.annotate(world_state="nothing was changed")
    path = find_config_path(config)
    return cfg, s, e, (str(path.absolute()) if path else None)


def _prefect_defaults() -> None:
    """Prefect's state beside the local platform's, analytics off, the temporary server patient if used."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")  # Prefect's client analytics: off, and 0.4 s less per command
    # the first start of the temporary server migrates its database; 20 s is too short on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        home = os.path.abspath(os.path.join(".dr-local", "prefect"))
        os.makedirs(home, exist_ok=True)
        os.environ["PREFECT_HOME"] = home


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwind exactly like Ctrl-C (a run ends Crashed, a held slot is given back), so
    that what the command started is stopped with it."""


def _on_signal(signum: int, _frame: Any) -> None:
    # unwinding runs every `finally` (a recovery slot is given back) and atexit (Prefect stops a
    # temporary server it started), where the default action would leave that server an orphan
    raise _Stopped(signal.Signals(signum).name)


def _plain_help(cmd: Any) -> None:
    """Help without Typer's type markers (`<str>`, `<bool>`): a flag shows nothing, a value its NAME."""
    for p in cmd.params:
        if getattr(p, "param_type_name", "") == "argument":
            p.display_type_rich = lambda ctx: None  # the NAME says it; no `<str>` beside it
        if getattr(p, "metavar", None) is not None:
            continue
        if getattr(p, "param_type_name", "") == "option" and (getattr(p, "is_flag", False) or getattr(p, "count", False)):
            p.metavar = ""
            continue
        desc = getattr(p, "type_descriptor", None)
        choices = getattr(desc, "choices", None) if desc is not None else None
        p.metavar = ("|".join(str(getattr(c, "value", c)) for c in choices) if choices
                     else (p.name or "value").upper())
    original = cmd.get_help_option

    def help_option(ctx: Any, _original: Any = original) -> Any:
        opt = _original(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt

    cmd.get_help_option = help_option
    for sub in getattr(cmd, "commands", {}).values():
        _plain_help(sub)


def _click_exceptions() -> Any:
    """Click's exceptions as this Typer raises them (Typer 0.29 vendors click as `typer._click`)."""
    try:
        from typer._click import exceptions
    except ImportError:  # a Typer that uses click itself
        from click import exceptions  # type: ignore[no-redef]
    return exceptions


def main() -> None:
    click = _click_exceptions()
    _prefect_defaults()
    _configure_logging(verbose=os.environ.get("DR_LOG_LEVEL", "").upper() == "DEBUG")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    cmd = typer.main.get_command(app)
    _plain_help(cmd)
    try:
        code = cmd.main(prog_name="dr", standalone_mode=False)
    except click.NoArgsIsHelpError as exc:  # `dr` or `dr local` alone: the help, as before
        try:
            from typer import rich_utils

            rich_utils.rich_format_error(exc)
        except ImportError:
            exc.show()
        code = exc.exit_code
    except click.UsageError as exc:  # a mistyped option or value: one line, like every refusal
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        output.error(exc.format_message() + hint)
        code = 2
    except click.ClickException as exc:
        output.error(exc.format_message())
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt, _Stopped):
        output.error("interrupted")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
