"""`dr`: the command line. Each command parses, runs one flow, and prints the result."""

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


# --- config ------------------------------------------------------------------------------


@config_app.command("check")
def config_check(config: Optional[str] = ConfigOpt) -> None:
    """Validate the configuration and print every resolved value and where it came from."""

    def body() -> None:
        cfg = load_config(config)
        output.say(f"configuration: {cfg.source} (valid)")
        output.say(f"prefix {cfg.prefix}, timezone {cfg.timezone}, local state {cfg.local.state_dir.absolute()}")
        for t in cfg.targets():
            output.say(f"\n{t.service} / {t.environment} ({t.env_short}){'  PRODUCTION' if t.production else ''}")
            rows = []
            for k, v in t.model_dump(exclude={"checks", "retention"}).items():
                src = t.sources.get(k, "derived")
                rows.append((k, "" if v is None else v, src))
            rows.append(("checks", ", ".join(c.kind + (f":{getattr(c, 'table', '')}" if hasattr(c, "table") else "")
                                             for c in t.checks), t.sources.get("checks", "default")))
            rows.append(("retention", f"{t.retention.daily}d/{t.retention.weekly}w/{t.retention.monthly}m",
                         t.sources.get("retention", "default")))
            output.table(rows, ["setting", "value", "from"])
        n = cfg.notifications
        for name, var in (("slack webhook", n.slack_webhook_env), ("teams webhook", n.teams_webhook_env)):
            if var:
                output.say(f"{name}: from ${var} ({'set, redacted' if os.environ.get(var) else 'NOT SET'})")

    _run(body)


# --- local platform -----------------------------------------------------------------------


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


# --- building blocks ---------------------------------------------------------------------


@app.command("backup")
def backup_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
               kind: str = typer.Option("adhoc", help="adhoc, nightly, pre-restore-safety, ptr, drill"),
               fmt: str = typer.Option("custom-zstd", "--format", help="custom-zstd (.pgdump.zst, default), custom (.pgdump) or plain-gzip (.sql.gz)"),
               server: Optional[str] = typer.Option(None, help="Back up this server (e.g. a PTR server)."),
               database: Optional[str] = typer.Option(None, help="Back up this database."),
               label: Optional[str] = typer.Option(None, help="Extra tag, e.g. an incident id."),
               config: Optional[str] = ConfigOpt) -> None:
    """Back up a database into the store (streamed, checksummed, with a row-count manifest)."""

    def body() -> None:
        from flows.backup import backup_database

        _, s, e, path = _ctx(config, service, env)
        r = backup_database(s, e, kind=kind, backup_format=fmt, server=server, database=database, label=label,
                            config_path=path)
        output.kv({"backup": r["name"], "size": f"{r['size']} bytes", "rows": r["rows"], "sha256": r["sha256"],
                   "took": f"{r['seconds']:.1f} s"})

    _run(body)


@app.command("restore")
def restore_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                backup: Optional[str] = typer.Option(None, help="Backup name (default: newest complete)."),
                server: Optional[str] = typer.Option(None), database: Optional[str] = typer.Option(None),
                jobs: int = typer.Option(2, help="Parallel restore jobs (custom format)."),
                no_safety_backup: bool = typer.Option(False, help="Skip the backup of the live database taken first."),
                config: Optional[str] = ConfigOpt) -> None:
    """Restore a backup into the live database: new database, verify, atomic swap."""

    def body() -> None:
        from flows.restore import restore_database

        _, s, e, path = _ctx(config, service, env)
        r = restore_database(s, e, backup=backup, server=server, database=database, jobs=jobs,
                             safety_backup=not no_safety_backup, config_path=path)
        output.kv({"restored": r["backup"], "into": r["database"], "previous database kept as": r["replaced_database"],
                   "safety backup": r["safety_backup"], "manifest verified": r["verified_manifest"],
                   "took": f"{r['seconds']:.1f} s"})

    _run(body)


@app.command("ptr")
def ptr_cmd(time: str = typer.Option(..., "--time", "-t", help="Restore time in UK time, e.g. '2026-07-01 14:30', or with an offset."),
            service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
            tz: Optional[str] = typer.Option(None, "--timezone", help="Zone of --time (default Europe/London)."),
            incident: Optional[str] = typer.Option(None), config: Optional[str] = ConfigOpt) -> None:
    """Point-in-time restore of the live server onto a NEW server."""

    def body() -> None:
        from flows.ptr import point_in_time_restore

        _, s, e, path = _ctx(config, service, env)
        r = point_in_time_restore(s, e, restore_time=time, timezone_name=tz, incident=incident, config_path=path)
        output.kv({"new server": r["server"], "at": f"{r['host']}:{r['port']}", "restored to": r["point_in_time_local"]})

    _run(body)


@maint_app.command("on")
def maintenance_on_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                       stop_app: bool = typer.Option(False, help="Also stop web and workers (counts recorded)."),
                       config: Optional[str] = ConfigOpt) -> None:
    """Show users the maintenance page."""

    def body() -> None:
        from flows.maintenance import maintenance_on

        _, s, e, path = _ctx(config, service, env)
        r = maintenance_on(s, e, stop_app=stop_app, config_path=path)
        output.kv({"maintenance": "already on" if r["already_on"] else "on", "users see": r["main_url"],
                   "temporary URL": r["temp_url"], "recorded replicas": r["recorded_replicas"]})

    _run(body)


@maint_app.command("off")
def maintenance_off_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                        config: Optional[str] = ConfigOpt) -> None:
    """Send users back to the app (replicas restored, healthcheck awaited)."""

    def body() -> None:
        from flows.maintenance import maintenance_off

        _, s, e, path = _ctx(config, service, env)
        r = maintenance_off(s, e, config_path=path)
        output.kv({"maintenance": "off" if r["was_on"] else "was not on", "app": r["main_url"],
                   "replicas": r["replicas"], "healthcheck": r["healthcheck"]})

    _run(body)


@app.command("validate")
def validate_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                 server: Optional[str] = typer.Option(None), database: Optional[str] = typer.Option(None),
                 config: Optional[str] = ConfigOpt) -> None:
    """Run the environment's service checks."""

    def body() -> None:
        from flows.validate import validate_service

        _, s, e, path = _ctx(config, service, env)
        rows = validate_service(s, e, server=server, database=database, config_path=path)
        output.table([(r["name"], r["expected"], r["actual"], "PASS" if r["passed"] else "FAIL") for r in rows],
                     ["check", "expected", "actual", "result"])

    _run(body)


@app.command("tidy-up")
def tidy_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
             older_than_hours: float = typer.Option(0.0), dry_run: Optional[bool] = typer.Option(
                 None, "--dry-run/--no-dry-run", help="Default: dry run in production."),
             incident: Optional[str] = typer.Option(None), config: Optional[str] = ConfigOpt) -> None:
    """Delete PTR servers and replaced databases this tool created."""

    def body() -> None:
        from flows.tidy_up import tidy_up

        _, s, e, path = _ctx(config, service, env)
        r = tidy_up(s, e, older_than_hours=older_than_hours, dry_run=dry_run, incident=incident, config_path=path)
        output.table([(f["kind"], f["name"], "deleted" if f["name"] in r["deleted"] else
                       ("would delete" if r["dry_run"] and f["deletable"] else "kept"), f["reason"]) for f in r["found"]],
                     ["kind", "name", "action", "reason"])

    _run(body)


@app.command("backups")
def backups_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt, config: Optional[str] = ConfigOpt) -> None:
    """List the backup store, newest first, with age against the RPO objective."""

    def body() -> None:
        from datetime import datetime, timezone

        from dr.runtime import runtime

        cfg, s, e, path = _ctx(config, service, env)
        rt = runtime(s, e, path)
        now = datetime.now(timezone.utc)
        rows = []
        for b in rt.store.list_backups():
            at = b.finished_at or b.created_at
            age_h = (now - at).total_seconds() / 3600
            rows.append((b.name, b.kind, b.format, b.size, f"{age_h:.1f} h", "yes" if b.complete else "NO",
                         "over RPO" if age_h * 60 > rt.target.rpo_minutes else ""))
        output.table(rows, ["name", "kind", "format", "bytes", "age", "complete", ""])

    _run(body)


# --- scenarios ----------------------------------------------------------------------------


def _print_scenario(r: dict) -> None:
    if "plan" in r:
        output.say(r["plan"])
        if r["blockers"]:
            raise typer.Exit(4)
        return
    output.kv({k: v for k, v in r.items() if k not in ("timeline", "decisions")})
    for d in r.get("decisions", []):
        output.say(f"decision: {d}")


@app.command("data-loss")
def data_loss_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                  time: Optional[str] = typer.Option(None, "--time", "-t", help="Restore time (UK time) before the damage; asked for if omitted."),
                  tz: Optional[str] = typer.Option(None, "--timezone"),
                  incident: Optional[str] = typer.Option(None, help="Incident id; the same id resumes."),
                  plan: bool = typer.Option(False, "--plan", help="Check everything and print the plan; change nothing."),
                  auto_approve: bool = typer.Option(False, help="Approve every gate (non-production only)."),
                  keep_ptr_server: bool = typer.Option(False), config: Optional[str] = ConfigOpt) -> None:
    """Scenario 2: recover lost or corrupted data with a point-in-time restore."""

    def body() -> None:
        from flows.data_loss import data_loss

        _, s, e, path = _ctx(config, service, env)
        _print_scenario(data_loss(s, e, restore_time=time, timezone_name=tz, incident=incident, plan_only=plan,
                                  auto_approve=auto_approve, keep_ptr_server=keep_ptr_server, config_path=path))

    _run(body)


@app.command("server-loss")
def server_loss_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                    recovery: str = typer.Option("auto", help="auto, revive or recreate"),
                    backup: Optional[str] = typer.Option(None, help="Backup to restore after a recreate."),
                    incident: Optional[str] = typer.Option(None, help="Incident id; the same id resumes."),
                    plan: bool = typer.Option(False, "--plan", help="Check everything and print the plan; change nothing."),
                    auto_approve: bool = typer.Option(False, help="Approve every gate (non-production only)."),
                    config: Optional[str] = ConfigOpt) -> None:
    """Scenario 1: bring back a lost database server."""

    def body() -> None:
        from flows.server_loss import server_loss

        _, s, e, path = _ctx(config, service, env)
        _print_scenario(server_loss(s, e, recovery=recovery, backup=backup, incident=incident, plan_only=plan,
                                    auto_approve=auto_approve, config_path=path))

    _run(body)


def _resume(flow_run_id: str, run_input: dict) -> None:
    from uuid import UUID

    from dr.errors import InvalidInput
    from dr.prefect_api import resume_with_input

    try:
        rid = UUID(flow_run_id)
    except ValueError:
        raise InvalidInput(f"{flow_run_id!r} is not a flow run id (a UUID shown in the Prefect UI and the logs)")
    try:
        resume_with_input(rid, run_input)
    except Exception as exc:  # NotPausedError, FlowPauseTimeout, validation errors from the server
        raise InvalidInput(f"could not answer flow run {flow_run_id}: {exc}") from exc


@app.command("approve")
def approve_cmd(flow_run_id: str, approver: str = typer.Option(..., help="Your name."),
                reason: str = typer.Option(""), confirm_environment: str = typer.Option(
                    "", help="Production: type the environment name.")) -> None:
    """Approve the gate a paused flow run is waiting at."""
    _run(lambda: (_resume(flow_run_id, {"approve": True, "approver": approver, "reason": reason,
                                        "confirm_environment": confirm_environment}), output.say("approved"))[1])


@app.command("reject")
def reject_cmd(flow_run_id: str, approver: str = typer.Option(..., help="Your name."),
               reason: str = typer.Option(..., help="Why.")) -> None:
    """Reject the gate a paused flow run is waiting at (nothing destructive happens)."""
    _run(lambda: (_resume(flow_run_id, {"approve": False, "approver": approver, "reason": reason}),
                  output.say("rejected"))[1])


@app.command("answer-time")
def answer_time_cmd(flow_run_id: str, time: str = typer.Option(..., "--time", "-t"),
                    approver: str = typer.Option(...), tz: str = typer.Option("Europe/London", "--timezone")) -> None:
    """Give the restore time a paused data-loss run is asking for."""
    _run(lambda: (_resume(flow_run_id, {"restore_time": time, "timezone_name": tz, "approver": approver}),
                  output.say("sent"))[1])


DRILL_HEADERS = ["scenario", "result", "RTO", "RPO", "marker rows after recovery"]


@app.command("drill")
def drill_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
              scenario: str = typer.Option("both", help="data-loss, server-loss or both"),
              on_worker: bool = typer.Option(False, "--on-worker", help=(
                  "Run it as the schedule does: a deployment run on a process worker of a self-hosted Prefect "
                  "server (PREFECT_API_URL's, or one started and stopped here).")),
              config: Optional[str] = ConfigOpt) -> None:
    """Rehearse the runbook on a non-production environment and print RTO/RPO (the monthly drill)."""

    def body() -> None:
        _, s, e, path = _ctx(config, service, env)
        if on_worker:
            return _drill_on_worker(s, e, scenario, path)
        from flows.drill import dr_drill

        r = dr_drill(s, e, scenario=scenario, config_path=path)
        output.say(f"\nDR drill {r['drill']} on {s} {e}: {'PASSED' if r['passed'] else 'FAILED'}")
        output.table([(x["scenario"], "PASS" if x["ok"] else "FAIL", f"{x['rto_seconds']:.0f} s",
                       f"{x['rpo_seconds']:.0f} s", x["markers"]) for x in r["results"]], DRILL_HEADERS)
        output.say(f"report: {r['report']}")

    _run(body)


def _drill_on_worker(service: str, env: str, scenario: str, config_path: Optional[str]) -> None:
    from deployments.stack import PrefectStackError, drill_on_worker, project_dir
    from dr.errors import ValidationFailed

    r = drill_on_worker({"service": service, "environment": env, "scenario": scenario, "config_path": config_path},
                        say=output.say)
    drill, rows, report = r.table()
    verdict = "PASSED" if r.passed else "FAILED"
    output.say(f"\nDR drill {drill or r.outcome.name} on {service} {env}: {verdict} "
               f"(flow run {r.outcome.name}, {r.outcome.state_name}, on a worker)")
    if rows:
        output.table([(x.get("scenario"), x.get("result"), x.get("RTO"), x.get("RPO"),
                       x.get("marker rows after recovery", "")) for x in rows], DRILL_HEADERS)
    if report:
        output.say(f"report: {report if os.path.isabs(report) else project_dir() / report}")
    if r.outcome.state_type == "FAILED":
        raise ValidationFailed(r.outcome.message or "the drill failed")
    if not r.passed:
        raise PrefectStackError(f"the drill's flow run {r.outcome.name} ended {r.outcome.state_name}: "
                                f"{r.outcome.message}")


def _api_url_or_fail() -> str:
    from dr.errors import ConfigError

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise ConfigError("PREFECT_API_URL is not set: start a server with `dr server start` and export the "
                          "PREFECT_API_URL it prints")
    return api


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

        p = port or stack.pick_port()
        home = stack.prefect_home()
        output.say(f"Prefect server on http://{host}:{p} (state in {home}); for the other commands:\n"
                   f"  export PREFECT_API_URL=http://{'127.0.0.1' if host == '0.0.0.0' else host}:{p}/api")
        cmd = stack.server_command(host, p, ui=ui)
        os.execvpe(cmd[0], cmd, stack.server_env(home))

    _run(body)


@worker_app.command("start")
def worker_start_cmd(pool: str = typer.Option("dr", help="The work pool (created as a process pool if missing)."),
                     name: Optional[str] = typer.Option(None, help="The worker's name."),
                     limit: Optional[int] = typer.Option(None, help="Most flow runs at once."),
                     heartbeat_seconds: int = typer.Option(60, help=(
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


@app.command("deploy")
def deploy_cmd(name: Optional[list[str]] = typer.Option(None, "--name", "-n", help=(
                   "Only this deployment, `<flow>/<deployment>` (repeatable; default: every one in prefect.yaml).")),
               heartbeat_seconds: int = typer.Option(60, help="The workers' PREFECT_FLOWS_HEARTBEAT_FREQUENCY."),
               config: Optional[str] = ConfigOpt) -> None:
    """Register the deployments of prefect.yaml, the work pool `dr` and the automations (`prefect deploy`)."""

    def body() -> None:
        from deployments import stack
        from deployments.automations import ensure_automations
        from dr.notify import webhook_urls

        api = _api_url_or_fail()
        if not stack.api_healthy(api):
            raise stack.PrefectStackError(f"no Prefect server answers at {api}")
        cfg = load_config(config)
        if stack.ensure_work_pool(api):
            output.say(f"work pool {stack.POOL} created (process)")
        stack.deploy(api, name or None)
        output.say("deployments on the server: " + ", ".join(stack.list_deployments(api)))
        made = ensure_automations(heartbeat_seconds, webhooks=webhook_urls(cfg), api_url=api)
        output.say("automations created: " + ", ".join(made) if made else "automations already registered")

    _run(body)


@app.command("alerts")
def alerts_cmd(host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8787),
               config: Optional[str] = ConfigOpt) -> None:
    """Serve the alert endpoint (Azure Monitor common alert schema → a scenario run that waits for a person)."""

    def body() -> None:
        from dr.alerts import serve

        serve(load_config(config), host, port)

    _run(body)


@app.command("retention")
def retention_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                  dry_run: bool = typer.Option(True, "--dry-run/--no-dry-run"), config: Optional[str] = ConfigOpt) -> None:
    """Show (or apply) what the retention policy keeps and deletes among nightly backups."""

    def body() -> None:
        from datetime import datetime, timezone

        from dr.retention import apply_retention
        from dr.runtime import runtime

        _, s, e, path = _ctx(config, service, env)
        rt = runtime(s, e, path)
        rep = apply_retention(rt.store, rt.target.retention, datetime.now(timezone.utc), dry_run=dry_run)
        rows = ([(b.name, "keep", why) for b, why in rep.kept] + [(b.name, "delete" if not dry_run else "would delete", why)
                for b, why in rep.deleted] + [(b.name, "left alone", why) for b, why in rep.skipped]
                + [(b.name, "FAILED", why) for b, why in rep.failed])
        output.table(rows, ["backup", "action", "why"])
        output.say(rep.summary())

    _run(body)


@app.command("automations")
def automations_cmd(heartbeat_seconds: int = typer.Option(60, help="The workers' PREFECT_FLOWS_HEARTBEAT_FREQUENCY."),
                    config: Optional[str] = ConfigOpt) -> None:
    """Register the Prefect automations (runs whose worker died are marked Crashed; on-call is told)."""

    def body() -> None:
        from deployments.automations import ensure_automations
        from dr.notify import webhook_urls

        made = ensure_automations(heartbeat_seconds, webhooks=webhook_urls(load_config(config)))
        output.say("created: " + ", ".join(made) if made else "automations already registered")

    _run(body)


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


if __name__ == "__main__":
    main()
    sys.exit(0)
