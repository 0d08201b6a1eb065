"""Restore workflow: put a backup from the store into the live database, never half-applied."""

from __future__ import annotations

from prefect import flow

from dr.errors import DrError
from dr.runtime import Ref
from flows.common import recovery_lock, run_logger
from flows.plan import plan_restore, publish_plan
from tasks.backups import backup_database_task, find_backup
from tasks.database import database_exists_task, restore_backup_task, table_counts
from tasks.preflight import check_backup_fits

RESTORABLE_KINDS = ("nightly", "adhoc", "ptr", "drill", "unknown")


def check_restore_parameters(*, backup: str | None, database: str | None, jobs: int) -> None:
    """Refuse bad restore parameters before anything is touched (an empty shell variable is not "the newest")."""
    from dr.database import SAFE_NAME
    from dr.errors import InvalidInput

    if backup is not None and not backup.strip():
        raise InvalidInput("backup: an empty backup name; leave it out to restore the newest complete backup",
                           world_state="nothing was changed")
    if database is not None and not SAFE_NAME.fullmatch(database):
        raise InvalidInput(f"database: {database!r} is not a plain PostgreSQL name (lowercase letters, digits, '_', "
                           "at most 63)", world_state="nothing was changed")
    if jobs < 1:
        raise InvalidInput(f"jobs: must be 1 or more, not {jobs}", world_state="nothing was changed")


@flow(name="restore-database", log_prints=True)
def restore_database(
    service: str,
    environment: str,
    backup: str | None = None,
    server: str | None = None,
    database: str | None = None,
    jobs: int = 2,
    safety_backup: bool = True,
    plan_only: bool = False,
    config_path: str | None = None,
) -> dict:
    """Restore a backup into the environment's database: new database, verify, then atomic swap.

    The live database is untouched until the restored copy has passed its checksum and
    manifest checks; then it is renamed to `<db>_replaced_<time>` (kept until tidy-up)
    and the copy takes its name, in one transaction.

    Args:
        service: the service short name.
        environment: the environment.
        backup: the backup's name; default the newest complete backup by its recorded time.
        server: restore onto this server instead of the environment's own.
        database: the database name to restore as; default the environment's database.
        jobs: parallel restore jobs for custom-format backups.
        safety_backup: first back up the live database to the store (kind `pre-restore-safety`).
        plan_only: check everything (the backup's extensions and versions against the server, the client
            tools) and show the plan, changing nothing.
        config_path: the configuration file.
    """
    ref = Ref(service, environment, config_path)
    log = run_logger()
    check_restore_parameters(backup=backup, database=database, jobs=jobs)
    if plan_only:
        plan = plan_restore(ref, backup, server, database, kinds=None if backup else RESTORABLE_KINDS,
                            safety_backup=safety_backup)
        publish_plan(plan)
        return {"plan": plan.text(), "blockers": plan.blockers}
    with recovery_lock(ref):
        try:
            info = find_backup(ref, name=backup, kinds=None if backup else RESTORABLE_KINDS)
        except DrError as exc:
            raise exc.annotate(step="find the backup", world_state="nothing was changed")
        try:  # extensions, versions, client tools: refused before the safety backup, before anything changes
            check_backup_fits(ref, info.name, server=server)
        except DrError as exc:
            raise exc.annotate(step="check what the backup needs", world_state="nothing was changed")
        log.info("restoring backup %s (%s bytes, finished %s)", info.name, info.size, info.finished_at or info.created_at)
        safety = None
        target_db = database
        if safety_backup and database_exists_task(ref, database or ref.rt().target.database, server=server):
            safety = backup_database_task(ref, kind="pre-restore-safety", server=server, database=database).info.name
            log.info("safety backup of the live database: %s", safety)
        try:
            result = restore_backup_task(ref, backup=info.name, server=server, database=target_db, jobs=jobs,
                                         safety_backup=safety)
        except DrError as exc:
            raise exc.annotate(step="restore", world_state="unknown; check the server's databases",
                               resume_hint=f"dr restore --service {service} --env {environment} --backup {info.name}")
        # the manifest check already counted every row of the restored database (a full read of it)
        counts = result.rows if result.rows is not None else table_counts(ref, server=server, database=database)
    if result.skipped:
        log.warning("restore skipped: %s", result.skipped)
    return {"backup": info.name, "database": result.database, "replaced_database": result.replaced_database,
            "replaced_held_by": result.replaced_held_by, "safety_backup": safety,
            "verified_manifest": result.verified_manifest, "seconds": result.seconds,
            "already_done": result.already_done, "skipped": result.skipped, "rows": counts}
