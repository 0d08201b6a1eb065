"""Tasks inside a database server: restore a backup, count rows, drop what tidy-up removes."""

from __future__ import annotations

from dr import database as db
from dr.restore import RestoreResult, restore_backup
from dr.runtime import Ref
from tasks.common import dr_task, progress_artifact_hook


@dr_task(retries=1)
def restore_backup_task(ref: Ref, *, backup: str, server: str | None = None, database: str | None = None,
                        jobs: int = 1, swap: bool = True, incident: str | None = None,
                        safety_backup: str | None = None) -> RestoreResult:
    """Restore a backup into a new database, verify it, and swap it in.

    Skipped only when the live database already holds the backup, swapped in by this incident
    (or, without one, by this flow run: a retry of this task); see `dr.restore.restore_backup`.
    """
    import contextlib
    import os
    import re
    import socket

    from prefect.runtime import flow_run

    rt = ref.rt()
    resume_key = f"incident {incident}" if incident else (f"flow run {flow_run.id}" if flow_run.id else None)
    # hold the backup so retention cannot delete it while it is being read (from any machine)
    holder = re.sub(r"[^A-Za-z0-9_-]", "-", f"restore-{socket.gethostname()[:30]}-{os.getpid()}")
    held = rt.store.hold(backup, holder=holder) if rt.store.supports_holds else contextlib.nullcontext()
    with held:
        return restore_backup(rt.servers, rt.store, rt.tools, server=server or rt.target.server,
                              database=database or rt.target.database, backup=backup, jobs=jobs, swap=swap,
                              spool_dir=rt.config.local.state_dir.absolute() if rt.target.platform == "local" else None,
                              progress_hooks=[progress_artifact_hook(f"restore {backup}")],
                              resume_key=resume_key, safety_backup=safety_backup)


@dr_task
def table_counts(ref: Ref, server: str | None = None, database: str | None = None) -> dict[str, int]:
    """Exact row counts of every table."""
    rt = ref.rt()
    conn = rt.servers.connection(server or rt.target.server, database or rt.target.database)
    return db.manifest_of(conn)["rows"]


@dr_task
def database_exists_task(ref: Ref, database: str, server: str | None = None) -> bool:
    """Whether a database exists on the server."""
    rt = ref.rt()
    return db.database_exists(rt.servers.connection(server or rt.target.server, "postgres"), database)


@dr_task
def list_databases_task(ref: Ref, server: str | None = None) -> list[str]:
    """The user databases on a server."""
    rt = ref.rt()
    return db.list_databases(rt.servers.connection(server or rt.target.server, "postgres"))


@dr_task
def drop_database_task(ref: Ref, database: str, server: str | None = None) -> None:
    """Drop a database (idempotent)."""
    rt = ref.rt()
    db.drop_database(rt.servers.connection(server or rt.target.server, "postgres"), database)
