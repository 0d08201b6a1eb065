"""Table-level recovery's own command: `dr reconcile` (the `--tables` of `dr data-loss` is in scenarios.py)."""

from __future__ import annotations

from typing import Optional

import typer

from dr import output
from dr.cli.core import ConfigOpt, EnvOpt, ServiceOpt, _ctx, _run, app, use_prefect


@app.command("reconcile")
def reconcile_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                  incident: str = typer.Option(..., "--incident", metavar="ID", help="The incident whose table-level recovery discarded the writes."),
                  tables: Optional[str] = typer.Option(None, "--tables", metavar="TABLES", help="Only these tables of the pack (comma-separated)."),
                  apply: bool = typer.Option(False, "--apply", help="Apply the plan after approval (default: show it)."),
                  auto_approve: bool = typer.Option(False, "--auto-approve", help="Approve the gate yourself, now (refused for production)."),
                  config: Optional[str] = ConfigOpt) -> None:
    """Show (and with --apply, apply) the plan to re-apply the writes after T a table-level recovery discarded.

    Example: dr reconcile --env production --incident inc-20261205-1430-ab12 --tables applications --apply
    """

    def body() -> None:
        _, s, e, path = _ctx(config, service, env)
        use_prefect()
        from flows.reconcile import reconcile

        r = reconcile(s, e, incident=incident, tables=[x for x in tables.split(",") if x] if tables else None,
                      apply=apply, auto_approve=auto_approve, config_path=path)
        output.say(r.get("result") or r["plan"])
        if r.get("decision"):
            output.say(f"decision: {r['decision']}")

    _run(body)
