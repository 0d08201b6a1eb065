"""The two runbook scenarios, the answers to their gates, and the drill."""

from __future__ import annotations

import os
from typing import Optional

import typer

from dr import output
from dr.cli.core import ConfigOpt, EnvOpt, ServiceOpt, _ctx, _run, app


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
                    without_snapshot: bool = typer.Option(False, help="Recreate with the platform's defaults when no server snapshot is stored."),
                    config: Optional[str] = ConfigOpt) -> None:
    """Scenario 1: bring back a lost database server."""

    def body() -> None:
        from flows.server_loss import server_loss

        _, s, e, path = _ctx(config, service, env)
        _print_scenario(server_loss(s, e, recovery=recovery, backup=backup, incident=incident, plan_only=plan,
                                    auto_approve=auto_approve, without_snapshot=without_snapshot, config_path=path))

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
