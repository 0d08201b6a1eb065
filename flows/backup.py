"""Backup workflow: save a copy of a database to the backup store."""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from dr.database import SAFE_NAME
from dr.errors import DrError, InvalidInput
from dr.runtime import Ref
from flows.common import run_logger
from tasks.backups import backup_database_task
from tasks.common import dr_task


@dr_task(retries=1)
def plan_backup(ref: Ref, *, kind: str, fmt: str, server: str | None, database: str | None,
                label: str | None):
    """Check what a backup needs (the server, the database, the tools, the store), touching nothing."""
    from datetime import datetime, timezone

    from dr.backup import backup_name
    from dr.database import connect
    from dr.progress import human_bytes
    from flows.plan import Plan, _tools_fact

    rt = ref.rt()
    t = rt.target
    server, database = server or t.server, database or t.database
    plan = Plan("backup", t.service, t.environment)
    plan.facts["source"] = f"{server} / {database} ({t.platform})"
    version = None
    try:
        srv = rt.servers.get_server(server)
        version = srv.version
        plan.facts["server state"] = f"{srv.state}, PostgreSQL {srv.version}"
        if srv.state != "Ready":
            plan.blockers.append(f"the server {server} is {srv.state}; a backup needs it running")
        else:
            with connect(rt.servers.connection(server, database)) as c:
                size = c.execute("SELECT pg_database_size(current_database())").fetchone()[0]
            plan.facts["database size"] = f"{human_bytes(size)} on disk (the backup is compressed, smaller)"
    except DrError as exc:
        plan.blockers.append(f"{server}/{database}: {exc}")
    try:
        _tools_fact(ref, version, plan)
    except DrError as exc:
        plan.blockers.append(str(exc))
    plan.facts["backup store"] = repr(rt.store)
    plan.facts["new backup"] = backup_name(t.service, t.env_short, kind, fmt, datetime.now(timezone.utc), label)
    plan.steps = [
        f"stream pg_dump of {database} ({fmt}) into the store, checksummed as it goes (no local copy)",
        "record the row count of every table (the manifest a restore is verified against)",
        "commit the backup under a new name (a backup is never overwritten)",
    ]
    return plan


@flow(name="backup-database", log_prints=True)
def backup_database(
    service: str,
    environment: str,
    kind: Literal["adhoc", "nightly", "pre-restore-safety", "ptr", "drill"] = "adhoc",
    backup_format: Literal["custom-zstd", "custom", "plain-gzip"] = "custom-zstd",
    server: str | None = None,
    database: str | None = None,
    label: str | None = None,
    plan_only: bool = False,
    config_path: str | None = None,
) -> dict:
    """Stream a backup of the database into the backup store, with checksum and row-count manifest.

    Reads the database only; writes one new backup (never overwrites one).

    Args:
        service: the service short name, e.g. `apply`.
        environment: the environment, e.g. `production`.
        kind: why the backup is taken; it is part of the name and metadata.
        backup_format: `custom-zstd` (`.pgdump.zst`, restores in parallel; the fastest), `custom`
            (`.pgdump`, gzip inside the archive) or `plain-gzip` (`.sql.gz`, like the nightly tooling).
        server: back up this server instead of the environment's own (e.g. a PTR server).
        database: back up this database instead of the environment's own.
        label: an extra tag in the name and metadata, e.g. the incident id.
        plan_only: check everything and show the plan (published as an artifact), changing nothing.
        config_path: the configuration file; default `$DR_CONFIG` or `./dr.toml`.
    """
    if database is not None and not SAFE_NAME.fullmatch(database):
        raise InvalidInput(f"database: {database!r} is not a plain PostgreSQL name (lowercase letters, digits, '_', "
                           "at most 63)", world_state="nothing was changed")
    ref = Ref(service, environment, config_path)
    if plan_only:
        from flows.plan import publish_plan

        plan = plan_backup(ref, kind=kind, fmt=backup_format, server=server, database=database, label=label)
        publish_plan(plan)
        return {"plan": plan.text(), "blockers": plan.blockers}
    try:
        result = backup_database_task(ref, kind=kind, fmt=backup_format, server=server, database=database, label=label)
    except DrError as exc:
        raise exc.annotate(step="backup", world_state="the database was only read; no backup was added to the store",
                           resume_hint=f"dr backup --service {service} --env {environment} --kind {kind}")
    info = result.info
    rows = sum((info.manifest or {}).get("rows", {}).values())
    run_logger().info("backup %s stored: %s bytes, %s rows, sha256 %s", info.name, info.size, rows, info.sha256)
    create_markdown_artifact(
        key=f"backup-{service}-{environment}",
        markdown=(f"# Backup {info.name}\n\n| | |\n|---|---|\n| source | {info.source_server} / {info.database} |\n"
                  f"| kind | {info.kind} |\n| format | {info.format} |\n| size | {info.size} bytes |\n"
                  f"| rows | {rows} in {len((info.manifest or {}).get('rows', {}))} tables |\n"
                  f"| sha256 | `{info.sha256}` |\n| took | {result.seconds:.1f} s |\n"),
        description=f"backup of {service} {environment}",
    )
    return {"name": info.name, "size": info.size, "sha256": info.sha256, "rows": rows, "seconds": result.seconds,
            "server": info.source_server, "database": info.database, "kind": info.kind}
