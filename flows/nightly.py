"""Nightly backups: the backup that scenario 1 depends on, retention, and a weekly restore test."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal
from zoneinfo import ZoneInfo

from prefect import flow

from dr.errors import DrError, VerificationFailed
from dr.fleet.runs import refresh_readiness, tag_this_run
from dr.runtime import Ref
from flows.common import run_logger
from tasks.backups import backup_database_task, find_backup
from tasks.common import dr_task
from tasks.database import drop_database_task, restore_backup_task
from tasks.notifications import flow_run_link, notify


@dr_task(retries=1)
def apply_retention_task(ref: Ref, dry_run: bool) -> dict:
    """Prune nightly backups by the environment's retention policy (never the only or newest one)."""
    from dr.retention import apply_retention

    rt = ref.rt()
    report = apply_retention(rt.store, rt.target.retention, datetime.now(timezone.utc), dry_run=dry_run)
    return {"summary": report.summary(), "kept": [b.name for b, _ in report.kept],
            "deleted": [b.name for b, _ in report.deleted], "skipped": [f"{b.name}: {why}" for b, why in report.skipped],
            "failed": [f"{b.name}: {why}" for b, why in report.failed]}


@flow(name="nightly-backup", log_prints=True, on_completion=[refresh_readiness], on_failure=[refresh_readiness])
def nightly_backup(
    service: str,
    environment: str,
    backup_format: Literal["custom-zstd", "custom", "plain-gzip"] = "custom-zstd",
    prune: bool = True,
    verify: Literal["auto", "always", "never"] = "auto",
    config_path: str | None = None,
) -> dict:
    """Take the nightly backup, prune old ones by the retention policy, and (weekly) test-restore it.

    Args:
        service: the service short name.
        environment: the environment.
        backup_format: `custom-zstd` (`.pgdump.zst`, parallel restore; the fastest), `custom`
            (`.pgdump`, gzip inside the archive) or `plain-gzip` (`.sql.gz`, like the existing tooling).
        prune: apply the retention policy after a successful backup.
        verify: restore the new backup into a scratch database and check it against its manifest:
            `auto` on Sundays (UK time), `always`, or `never`.
        config_path: the configuration file.
    """
    ref = Ref(service, environment, config_path)
    log = run_logger()
    tag_this_run(service, environment)
    try:
        result = backup_database_task(ref, kind="nightly", fmt=backup_format)
    except DrError as exc:
        notify(ref, "NIGHTLY BACKUP FAILED", f"{exc}; scenario 1 would restore an older backup", flow_run_link())
        raise
    info = result.info
    log.info("nightly backup %s: %s bytes in %.0f s", info.name, info.size, result.seconds)
    out: dict = {"backup": info.name, "size": info.size, "seconds": result.seconds}
    sunday = datetime.now(ZoneInfo(ref.rt().target.timezone)).weekday() == 6
    if verify == "always" or (verify == "auto" and sunday):
        out["verified"] = verify_backup(service, environment, backup=info.name, config_path=config_path)
    if prune:
        out["retention"] = apply_retention_task(ref, dry_run=False)
    return out


@flow(name="verify-backup", log_prints=True, on_completion=[refresh_readiness], on_failure=[refresh_readiness])
def verify_backup(service: str, environment: str, backup: str | None = None, config_path: str | None = None) -> dict:
    """Prove a backup restores: restore it into a scratch database, check checksum and manifest, drop it.

    Never touches the live database.

    Args:
        service: the service short name.
        environment: the environment.
        backup: the backup to test; default the newest complete nightly backup.
        config_path: the configuration file.
    """
    ref = Ref(service, environment, config_path)
    tag_this_run(service, environment)
    info = find_backup(ref, name=backup, kinds=None if backup else ("nightly",))
    scratch = None
    try:
        r = restore_backup_task(ref, backup=info.name, database=f"{ref.rt().target.database[:40]}_verify", swap=False)
        scratch = r.database
        if not r.verified_manifest:
            raise VerificationFailed(f"backup {info.name} restored but has no manifest to check it against")
    except DrError as exc:
        notify(ref, "BACKUP DOES NOT RESTORE", f"{info.name}: {exc}", flow_run_link())
        _verify_artifact(ref, info.name, f"**FAILED**: {exc}")
        raise
    finally:
        if scratch:
            drop_database_task(ref, scratch)
    run_logger().info("backup %s restores and matches its manifest", info.name)
    _verify_artifact(ref, info.name, f"**PASSED**: restored in {r.seconds:.0f} s, checksum and manifest match")
    return {"backup": info.name, "verified": True, "seconds": r.seconds}


def _verify_artifact(ref: Ref, backup: str, result: str) -> None:
    """The verify's result for people and the board (`verify-<service>-<environment>`; its description is the backup)."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=f"verify-{ref.service}-{ref.environment}", description=backup,
                             markdown=f"# Restore test of {backup}\n\n{ref.service} {ref.environment}: {result}")


def latest_backup_age_hours(ref: Ref) -> float:
    info = find_backup(ref, kinds=("nightly",))
    return (datetime.now(timezone.utc) - (info.finished_at or info.created_at)).total_seconds() / 3600
