"""The runbook's building blocks, one flow each: backup, restore, PTR, maintenance, validate, tidy-up; and the store's listing and retention."""

from __future__ import annotations

from typing import Optional

import typer

from dr import output
from dr.cli.core import ConfigOpt, EnvOpt, ServiceOpt, _ctx, _run, app, maint_app, plan_run, use_prefect


@app.command("backup")
def backup_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
               kind: str = typer.Option("adhoc", help="adhoc, nightly, pre-restore-safety, ptr, drill"),
               fmt: str = typer.Option("custom-zstd", "--format", metavar="FORMAT", help="custom-zstd (.pgdump.zst, default), custom (.pgdump) or plain-gzip (.sql.gz)"),
               server: Optional[str] = typer.Option(None, help="Back up this server (e.g. a PTR server)."),
               database: Optional[str] = typer.Option(None, help="Back up this database."),
               label: Optional[str] = typer.Option(None, help="Extra tag, e.g. an incident id."),
               plan: bool = typer.Option(False, "--plan", help="Check everything and print the plan; change nothing."),
               config: Optional[str] = ConfigOpt) -> None:
    """Back up a database into the store (streamed, checksummed, with a row-count manifest)."""

    def body() -> None:
        _, s, e, path = _ctx(config, service, env)
        use_prefect()
        from contextlib import nullcontext

        from flows.backup import backup_database

        with plan_run() if plan else nullcontext():
            r = backup_database(s, e, kind=kind, backup_format=fmt, server=server, database=database, label=label,
                                plan_only=plan, config_path=path)
        if plan:
            output.say(r["plan"])
            if r["blockers"]:
                raise typer.Exit(4)
            return
        output.kv({"backup": r["name"], "size": f"{r['size']} bytes", "rows": r["rows"], "sha256": r["sha256"],
                   "took": f"{r['seconds']:.1f} s"})

    _run(body)


@app.command("restore")
def restore_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                backup: Optional[str] = typer.Option(None, help="Backup name (default: newest complete)."),
                server: Optional[str] = typer.Option(None, help="Restore onto this server instead of the environment's own."),
                database: Optional[str] = typer.Option(None, help="Restore as this database (default: the environment's)."),
                jobs: int = typer.Option(2, help="Parallel restore jobs (custom format)."),
                no_safety_backup: bool = typer.Option(False, "--no-safety-backup", help="Skip the backup of the live database taken first."),
                plan: bool = typer.Option(False, "--plan", help=(
                    "Check everything (the backup's extensions and versions against the server, the client tools) "
                    "and print the plan; change nothing.")),
                config: Optional[str] = ConfigOpt) -> None:
    """Restore a backup into the live database: new database, verify, atomic swap."""

    def body() -> None:
        _, s, e, path = _ctx(config, service, env)
        use_prefect()
        from contextlib import nullcontext

        from flows.restore import restore_database

        with plan_run() if plan else nullcontext():
            r = restore_database(s, e, backup=backup, server=server, database=database, jobs=jobs,
                                 safety_backup=not no_safety_backup, plan_only=plan, config_path=path)
        if plan:
            output.say(r["plan"])
            if r["blockers"]:
                raise typer.Exit(4)
            return
        if r["skipped"]:
            output.say(f"restore skipped: {r['skipped']}")
            return
        output.kv({"restored": r["backup"], "into": r["database"], "previous database kept as": r["replaced_database"],
                   "held by": r["replaced_held_by"], "safety backup": r["safety_backup"],
                   "manifest verified": r["verified_manifest"], "took": f"{r['seconds']:.1f} s"})

    _run(body)


@app.command("ptr")
def ptr_cmd(time: str = typer.Option(..., "--time", "-t", help="Restore time in UK time, e.g. '2026-07-01 14:30', or with an offset."),
            service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
            tz: Optional[str] = typer.Option(None, "--timezone", help="Zone of --time (default Europe/London)."),
            incident: Optional[str] = typer.Option(None, help="Incident id, to tag the new server with."), config: Optional[str] = ConfigOpt) -> None:
    """Point-in-time restore of the live server onto a NEW server."""

    def body() -> None:
        _, s, e, path = _ctx(config, service, env)
        use_prefect()
        from flows.ptr import point_in_time_restore

        r = point_in_time_restore(s, e, restore_time=time, timezone_name=tz, incident=incident, config_path=path)
        output.kv({"new server": r["server"], "at": f"{r['host']}:{r['port']}", "restored to": r["point_in_time_local"]})

    _run(body)


@maint_app.command("on")
def maintenance_on_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                       stop_app: bool = typer.Option(False, help="Also stop web and workers (counts recorded)."),
                       config: Optional[str] = ConfigOpt) -> None:
    """Show users the maintenance page."""

    def body() -> None:
        _, s, e, path = _ctx(config, service, env)
        use_prefect()
        from flows.maintenance import maintenance_on

        r = maintenance_on(s, e, stop_app=stop_app, config_path=path)
        output.kv({"maintenance": "already on" if r["already_on"] else "on", "users see": r["main_url"],
                   "temporary URL": r["temp_url"], "recorded replicas": r["recorded_replicas"]})

    _run(body)


@maint_app.command("off")
def maintenance_off_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                        config: Optional[str] = ConfigOpt) -> None:
    """Send users back to the app (replicas restored, healthcheck awaited)."""

    def body() -> None:
        _, s, e, path = _ctx(config, service, env)
        use_prefect()
        from flows.maintenance import maintenance_off

        r = maintenance_off(s, e, config_path=path)
        output.kv({"maintenance": "off" if r["was_on"] else "was not on", "app": r["main_url"],
                   "replicas": r["replicas"], "healthcheck": r["healthcheck"]})

    _run(body)


@app.command("validate")
def validate_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                 server: Optional[str] = typer.Option(None, help="Check the data on this server (e.g. a PTR server)."),
                 database: Optional[str] = typer.Option(None, help="Check this database."),
                 config: Optional[str] = ConfigOpt) -> None:
    """Run the environment's service checks."""

    def body() -> None:
        _, s, e, path = _ctx(config, service, env)
        use_prefect()
        from flows.validate import validate_service

        rows = validate_service(s, e, server=server, database=database, config_path=path)
        output.table([(r["name"], r["expected"], r["actual"], "PASS" if r["passed"] else "FAIL") for r in rows],
                     ["check", "expected", "actual", "result"])

    _run(body)


@app.command("tidy-up")
def tidy_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
             older_than_hours: float = typer.Option(0.0, metavar="HOURS", help="Only what is older than this many hours."), dry_run: Optional[bool] = typer.Option(
                 None, "--dry-run/--no-dry-run", help="Default: dry run in production."),
             incident: Optional[str] = typer.Option(None, help="Only what this incident created."), config: Optional[str] = ConfigOpt) -> None:
    """Delete PTR servers and replaced databases this tool created."""

    def body() -> None:
        _, s, e, path = _ctx(config, service, env)
        use_prefect()
        from flows.tidy_up import tidy_up

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



@app.command("retention")
def retention_cmd(service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                  dry_run: bool = typer.Option(True, "--dry-run/--no-dry-run", help="Show what would be deleted (default), or delete it."), config: Optional[str] = ConfigOpt) -> None:
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
