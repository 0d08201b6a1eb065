"""The two runbook scenarios and the drill.

What the command line can check is checked here, before any flow run starts and without
importing Prefect: the names (service, environment, incident id), the restore time (format,
UK clock changes, not in the future) and the choices (`--recovery`, production never with
`--auto-approve`). What needs the world (the restore window, the server's state) is checked
by the flow itself, whose run is then recorded as Failed with the reason.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Optional

import typer

from dr import output
from dr.cli.core import ConfigOpt, EnvOpt, ServiceOpt, _ctx, _run, app, plan_run, use_prefect
from dr.config import DrConfig

PlanOpt = typer.Option(False, "--plan", help="Check everything and print the plan; change nothing.")
AutoApproveOpt = typer.Option(False, "--auto-approve", help="Approve every gate yourself, now (refused for production).")
IncidentOpt = typer.Option(None, "--incident", metavar="ID", help="Incident id (generated if omitted); the same id resumes.")


class Recovery(str, Enum):
    auto = "auto"
    revive = "revive"
    recreate = "recreate"
    geo_restore = "geo-restore"


def _print_scenario(r: dict) -> None:
    if "plan" in r:
        output.say(r["plan"])
        if r["blockers"]:
            raise typer.Exit(4)
        return
    output.kv({k: v for k, v in r.items() if k not in ("timeline", "decisions")})
    for d in r.get("decisions", []):
        output.say(f"decision: {d}")


def check_scenario_input(cfg: DrConfig, service: str, env: str, *, auto_approve: bool, incident: Optional[str],
                         time: Optional[str] = None, tz: Optional[str] = None, needs_time: bool = True) -> None:
    """Refuse what is wrong with a scenario's input before any run starts (nothing is touched).

    Raises:
        InvalidInput: production with --auto-approve, a bad incident id, or an automatic run without a time.
        InvalidRestoreTime: the time is malformed, ambiguous or skipped at a UK clock change, or in the future.
    """
    from datetime import datetime, timezone

    from dr.errors import DrError, InvalidInput, InvalidRestoreTime
    from dr.incident import check_incident_id
    from dr.timeparse import fmt_both, parse_restore_time

    nothing = "nothing was changed"
    t = cfg.target(service, env)
    if auto_approve and t.production:
        raise InvalidInput(f"--auto-approve is refused for production ({service} {env}): a person must approve each "
                           "destructive step (`dr approve`)", world_state=nothing)
    try:
        if incident is not None:
            check_incident_id(incident)
        if time is not None:
            zone = tz or t.timezone
            when = parse_restore_time(time, zone)
            if when > datetime.now(timezone.utc):
                raise InvalidRestoreTime(f"the restore time {fmt_both(when, zone)} is in the future: give a time "
                                         "BEFORE the data was lost")
    except DrError as exc:
        raise exc.annotate(world_state=nothing)
    if needs_time and auto_approve and time is None and incident is None:
        raise InvalidInput("--auto-approve needs --time (an automatic run has nobody to ask for it)", world_state=nothing)


@app.command("data-loss")
def data_loss_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                  time: Optional[str] = typer.Option(None, "--time", "-t", metavar="TIME", help=(
                      "A time BEFORE the damage, 'YYYY-MM-DD HH:MM[:SS]' in UK time (BST handled), or with an offset "
                      "('…Z', '…+01:00'); asked for with a form once the app is stopped, if omitted.")),
                  tz: Optional[str] = typer.Option(None, "--timezone", metavar="ZONE", help=(
                      "Zone of a --time typed without offset (default: the configuration's, Europe/London).")),
                  incident: Optional[str] = IncidentOpt, plan: bool = PlanOpt, auto_approve: bool = AutoApproveOpt,
                  keep_ptr_server: bool = typer.Option(False, "--keep-ptr-server", help=(
                      "Keep the point-in-time-restore server at the end (default: deleted once the service is back).")),
                  config: Optional[str] = ConfigOpt,
                  tables: Optional[str] = typer.Option(None, "--tables", metavar="TABLES", help=(
                      "Recover only these tables (a,b) and their foreign-key closure; every other table keeps its "
                      "writes after the restore time. '-name' leaves one out of the closure."))) -> None:
    """Scenario 2: recover lost or corrupted data with a point-in-time restore.

    Example: dr data-loss --env production --time '2026-07-01 14:30' [--tables applications]
    """

    def body() -> None:
        cfg, s, e, path = _ctx(config, service, env)
        check_scenario_input(cfg, s, e, auto_approve=auto_approve, incident=incident, time=time, tz=tz)
        use_prefect()
        from contextlib import nullcontext

        from flows.data_loss import data_loss

        with plan_run() if plan else nullcontext():
            r = data_loss(s, e, restore_time=time, timezone_name=tz, incident=incident, plan_only=plan,
                          auto_approve=auto_approve, keep_ptr_server=keep_ptr_server, config_path=path,
                          tables=tables.split(",") if tables else None)
        _print_scenario(r)

    _run(body)


@app.command("server-loss")
def server_loss_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                    recovery: Recovery = typer.Option(Recovery.auto, "--recovery", help=(
                        "auto: revive the dropped server if possible, else ask; revive; recreate an empty server and "
                        "restore the nightly backup; geo-restore into the paired region (Azure).")),
                    backup: Optional[str] = typer.Option(None, "--backup", metavar="NAME", help=(
                        "Backup to restore after a recreate (default: the newest complete nightly).")),
                    incident: Optional[str] = IncidentOpt, plan: bool = PlanOpt, auto_approve: bool = AutoApproveOpt,
                    without_snapshot: bool = typer.Option(False, "--without-snapshot", help=(
                        "Recreate with the platform's defaults when no server snapshot is stored (default: refuse).")),
                    config: Optional[str] = ConfigOpt) -> None:
    """Scenario 1: bring back a lost database server.

    Example: dr server-loss --env production --plan
    """

    def body() -> None:
        cfg, s, e, path = _ctx(config, service, env)
        check_scenario_input(cfg, s, e, auto_approve=auto_approve, incident=incident, needs_time=False)
        use_prefect()
        from contextlib import nullcontext

        from flows.server_loss import server_loss

        with plan_run() if plan else nullcontext():
            r = server_loss(s, e, recovery=recovery.value, backup=backup, incident=incident, plan_only=plan,
                            auto_approve=auto_approve, without_snapshot=without_snapshot, config_path=path)
        _print_scenario(r)

    _run(body)


DRILL_HEADERS = ["scenario", "result", "RTO", "RPO", "marker rows after recovery"]


class DrillScenario(str, Enum):
    both = "both"
    data_loss = "data-loss"
    server_loss = "server-loss"


@app.command("drill")
def drill_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
              scenario: DrillScenario = typer.Option(DrillScenario.both, "--scenario", help="Which scenario to rehearse."),
              on_worker: bool = typer.Option(False, "--on-worker", help=(
                  "Run it as the schedule does: a deployment run on a process worker (of PREFECT_API_URL's server, "
                  "or the local one).")),
              config: Optional[str] = ConfigOpt) -> None:
    """Rehearse the runbook on a non-production environment and print RTO/RPO (the monthly drill).

    Example: dr drill --env development
    """

    def body() -> None:
        from dr.errors import InvalidInput

        cfg, s, e, path = _ctx(config, service, env)
        if cfg.target(s, e).production:
            raise InvalidInput(f"drills damage data on purpose and are refused for production ({s} {e})",
                               world_state="nothing was changed")
        if on_worker:
            return _drill_on_worker(s, e, scenario.value, path)
        use_prefect()
        from flows.drill import dr_drill

        r = dr_drill(s, e, scenario=scenario.value, config_path=path)
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
