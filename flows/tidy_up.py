"""Tidy-up workflow: delete what recoveries left behind, and only that."""

from __future__ import annotations

from dataclasses import replace

from prefect import flow
from prefect.artifacts import create_table_artifact

from dr.runtime import Ref
from flows.common import run_logger
from tasks.tidy import delete_leftover, find_leftovers


@flow(name="tidy-up", log_prints=True)
def tidy_up(service: str, environment: str, older_than_hours: float = 0.0, dry_run: bool | None = None,
            incident: str | None = None, config_path: str | None = None) -> dict:
    """Delete PTR servers and replaced/half-restored databases that this tool created and tagged.

    Lists everything first. Only resources carrying this tool's tags or naming are ever
    considered; a replaced database is dropped only when a backup in the store holds exactly it (taken
    of that very database, with no write to it since, and its bytes verified).

    Args:
        service: the service short name.
        environment: the environment.
        older_than_hours: only delete what is at least this old.
        dry_run: list without deleting; default True for production, False elsewhere.
        incident: only the PTR servers of this incident.
        config_path: the configuration file.
    """
    ref = Ref(service, environment, config_path)
    rt = ref.rt()
    dry = rt.target.production if dry_run is None else dry_run
    log = run_logger()
    items = find_leftovers(ref, older_than_hours=older_than_hours, incident=incident)
    for it in items:
        log.info("%s %s %s: %s", "would delete" if dry and it.deletable else "delete" if it.deletable else "keep",
                 it.kind, it.name, it.reason)
    deleted = []
    if not dry:
        for i, it in enumerate(items):
            if it.deletable:
                why = delete_leftover(ref, it)
                if why is None:
                    deleted.append(it.name)
                else:  # a last check refused: say so, keep it
                    log.warning("kept %s %s: %s", it.kind, it.name, why)
                    items[i] = replace(it, deletable=False, reason=why)
    create_table_artifact(
        key=f"tidy-up-{service}-{environment}",
        table=[{"kind": i.kind, "name": i.name, "created": i.created_at.isoformat(),
                "action": ("deleted" if i.name in deleted else "would delete" if dry and i.deletable else "kept"),
                "reason": i.reason} for i in items],
        description=f"tidy-up of {service} {environment}" + (" (dry run)" if dry else ""),
    )
    return {"dry_run": dry, "deleted": deleted, "kept": [i.name for i in items if i.name not in deleted],
            "found": [i.__dict__ for i in items]}
