"""The fleet: `dr deploy` (every flow of every configured environment) and `dr status` (the readiness board)."""

from __future__ import annotations

from typing import Optional

import typer

from dr import output
from dr.cli.core import ConfigOpt, _run, app, use_prefect
from dr.config import find_config_path, load_config


@app.command("deploy")
def deploy_cmd(name: Optional[list[str]] = typer.Option(None, "--name", "-n", help=(
                   "Only this deployment, `<flow>/<service>-<environment>` (repeatable; nothing is pruned then).")),
               write: Optional[str] = typer.Option(None, "--write", metavar="PATH", help=(
                   "Write the deployments as a prefect.yaml for `prefect deploy --all` instead of registering them.")),
               prune: bool = typer.Option(True, "--prune/--no-prune", help=(
                   "Delete deployments an earlier `dr deploy` registered that the configuration no longer names.")),
               heartbeat_seconds: int = typer.Option(60, help="The workers' PREFECT_FLOWS_HEARTBEAT_FREQUENCY."),
               config: Optional[str] = ConfigOpt) -> None:
    """Register every runbook flow for every configured service environment, the work pool and the automations.

    One deployment per flow and environment, `<flow>/<service>-<environment>`, with schedules
    from dr.toml ([fleet] and each environment's backup_offset_minutes and drill), the
    fleet's parallel-backup limit on the work queue `backups`, and a run form that offers
    only its own service and environment. Unchanged deployments are left alone; those an
    earlier `dr deploy` registered and the configuration no longer names are pruned.
    """

    def body() -> None:
        from dr.errors import ConfigError
        from dr.fleet import spec as fleet_spec

        cfg = load_config(config)
        path = find_config_path(config)
        workers_path = str(path.absolute()) if path else None
        if write:
            from pathlib import Path

            spec = fleet_spec.build(cfg, config_path=None if cfg.fleet.work_pool_type == "kubernetes" else workers_path,
                                    resolve_image=False)
            Path(write).write_text(fleet_spec.to_yaml(spec, path=write, source=str(path or "the built-in configuration")))
            output.say(f"wrote {len(spec.deployments)} deployments to {write} (register them with "
                       f"`prefect deploy --all --prefect-file {write}`)")
            return

        from dr.cli.operations import _api_url_or_fail

        # deployments belong on a server that lasts, and one a worker will poll: PREFECT_API_URL's, or the
        # project's local server when it runs (dr local up); never one started for this command alone
        api = _api_url_or_fail()
        from deployments.automations import ensure_automations
        from dr.fleet.register import register
        from dr.notify import webhook_urls

        spec = fleet_spec.build(cfg, config_path=None if cfg.fleet.work_pool_type == "kubernetes" else workers_path)
        if name:
            known = {d.full_name for d in spec.deployments}
            unknown = [n for n in name if n not in known]
            if unknown:
                raise ConfigError(f"no deployment {', '.join(unknown)} in this configuration; names are "
                                  "<flow>/<service>-<environment>, e.g. data-loss/apply-production", field="--name")
            spec = fleet_spec.FleetSpec(spec.fleet, spec.tag, spec.pool,
                                        tuple(d for d in spec.deployments if d.full_name in name))
        report = register(spec, prune=prune and not name)
        for line in report.lines():
            output.say(line)
        if len(spec.deployments) <= 20:
            output.say("deployments: " + ", ".join(d.full_name for d in spec.deployments))
        made = ensure_automations(heartbeat_seconds, webhooks=webhook_urls(cfg), api_url=api)
        output.say("automations created: " + ", ".join(made) if made else "automations already registered")

    _run(body)


@app.command("status")
def status_cmd(service: Optional[str] = typer.Option(None, "--service", "-s", help="Only this service."),
               as_json: bool = typer.Option(False, "--json", help="Machine-readable: every environment with its status."),
               config: Optional[str] = ConfigOpt) -> None:
    """The DR readiness board: per environment, backup age vs RPO, verified restore, drill, open recoveries, leftovers.

    Green: protected. Amber: something to do soon (a drill overdue, no recent verified restore,
    leftovers to tidy, a recovery in progress). Red: not protected now (no fresh backup, a failed
    backup, verify or drill, the live server down, a recovery stuck past its approval timeout).
    """

    def body() -> None:
        use_prefect()  # PREFECT_API_URL's server, else the project's: where the runs and artifacts are
        from dr.fleet.board import Board, build_board

        board = build_board(load_config(config), service=service)
        if as_json:
            output.as_json(board.to_json())
            return
        output.say(board.summary() + f" (built in {board.seconds:.2f} s)")
        output.say()
        output.table(board.table_rows(), Board.HEADERS)
        links = [(r, x) for r in board.rows for x in r.recoveries]
        if links:
            output.say()
            for r, x in links:
                output.say(f"{r.service} {r.environment}: {x['flow']} {x['run']} {x['state']}, {x['waiting_for']}: "
                           f"{x['link']}")

    _run(body)
