"""Tasks of table-level recovery: plan, compare (and store the pack), apply, find a committed apply, reconcile."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import logging

from dr.runtime import Ref
from tasks.common import dr_task


log = logging.getLogger("dr.tables")


@dataclass(frozen=True)
class CommittedApply:
    """An earlier attempt of this incident whose transaction the live server says committed."""

    record: str
    txid: int
    tables: list[str]
    restore_time_utc: str | None
    pack: str | None
    summary: str


@dr_task(retries=1)
def plan_table_recovery(ref: Ref, plan, tables: list[str]):
    """Add the table-level path to a data-loss plan: the closure with reasons, privileges, the steps."""
    from dr.database import connect
    from dr.errors import DrError
    from dr.tables.catalog import read_catalog
    from dr.tables.closure import missing_privileges, parse_choice, work_out_closure

    rt = ref.rt()
    t = rt.target
    chosen, excluded = parse_choice(tables)
    plan.facts["recovery"] = (f"TABLE-LEVEL: only {', '.join(chosen)} and the tables tied to them by foreign keys; "
                              "every other table keeps its writes after T")
    closure = None
    try:
        with connect(rt.servers.connection(t.server, t.database)) as c:
            cat = read_catalog(c)
        closure = work_out_closure(cat, chosen, excluded)
        for i, line in enumerate(closure.lines(), 1):
            plan.facts[f"closure {i}"] = line
        lacking = missing_privileges(cat, closure)
        if lacking:
            plan.blockers.append(f"{cat.user} lacks privileges table-level recovery needs: " + "; ".join(lacking))
        no_key = [x for x in closure.replaced if not cat.tables[x].primary_key]
        if no_key:
            plan.facts["without a primary key"] = (f"{', '.join(no_key)}: replaced whole (no per-row report, "
                                                   "no re-apply script)")
    except DrError as exc:
        plan.blockers.append(f"tables: {exc}")
    names = ", ".join(closure.order) if closure else ", ".join(chosen)
    plan.steps = [
        "stop the app at once (web and worker to 0, counts recorded) and show the maintenance page",
        f"safety backup of the flawed {t.database} to the store (kind pre-restore-safety), kept for reconciliation",
        "take the restore time (UK time; refused if ambiguous, skipped, in the future or outside the window)",
        f"point-in-time restore of {t.server} onto a NEW server",
        f"compare {names} on the PTR server with the live database by primary key (rows that come back, are "
        "reverted, are removed, with sample keys); check the columns match and that no narrowing breaks a key",
        "store the reconciliation pack of the writes after T that the recovery discards (CSV per table + apply.sql) "
        "beside the safety backup",
        "APPROVAL: replace those rows (the report shown; tables outside the closure keep their writes after T)",
        f"in ONE transaction on {t.server}/{t.database}: lock the tables, prove them unchanged since the comparison "
        "(or compare again), stream the rows at T from the PTR server and replace the rows (a table where most rows "
        "change and that the role owns: reloaded in bulk, its indexes rebuilt and keys re-validated), check every "
        "constraint, verify every table equals T, sequences only forward; any failure rolls back",
        "restart the app (recorded replicas) behind the maintenance page",
        "validate on the temporary URL (healthcheck + data checks)",
        "APPROVAL: disable maintenance",
        "back up the PTR server to the store (kind ptr), then delete it" + (" (after approval)" if t.production else ""),
        "post-incident report (what changed, the pack, the RPO gained)",
    ]
    return plan


def _record_name(ref: Ref, incident: str, txid: int) -> str:
    rt = ref.rt()
    return f"{rt.target.service}_{rt.target.env_short}_table-recovery_{incident}_{txid}.json"


@dr_task(retries=2)
def find_committed_apply(ref: Ref, incident: str) -> CommittedApply | None:
    """The incident's table recovery that the live server says committed, if any."""
    from dr.errors import RestoreError
    from dr.tables.apply import database_oid, txid_status
    from dr.tables.pack import find_records

    rt = ref.rt()
    live = rt.servers.connection(rt.target.server, rt.target.database)
    records = find_records(rt.store, incident)
    if not records:
        return None
    oid = database_oid(live)
    for info in reversed(records):
        rec = info.manifest or {}
        if rec.get("database_oid") != oid:
            continue  # another database (swapped or recreated since): its transactions are not this one's
        status = txid_status(live, int(rec["txid"]))
        if status == "committed":
            return CommittedApply(info.name, int(rec["txid"]), rec.get("tables", []), rec.get("restore_time_utc"),
                                  rec.get("pack"), rec.get("summary", ""))
        if status == "in progress":
            raise RestoreError(f"transaction {rec['txid']} of an earlier attempt of incident {incident} is still "
                               f"running on {rt.target.server}: wait for it, or end its session (pg_stat_activity, "
                               "application_name 'dr-orchestrator table recovery …')",
                               world_state="the live database is being changed by that earlier attempt")
    return None


@dr_task(retries=1)
def compare_tables_task(ref: Ref, *, ptr_server: str, tables: list[str], incident: str, restore_time: str,
                        safety_backup: str | None):
    """Compare the closure tables on the PTR server with the live database; store the reconciliation pack.

    Returns:
        (ChangeReport, the pack's name or None when refused).
    """
    from dr.tables.carry import carried_name, carry_out, write_carried
    from dr.tables.compare import compare
    from dr.tables.pack import find_packs, pack_name, write_pack

    rt = ref.rt()
    t = rt.target
    live = rt.servers.connection(t.server, t.database)
    ptr = rt.servers.connection(ptr_server, t.database)
    stored: dict[str, str] = {}

    def store_pack(w, report) -> None:
        # the comparison itself, so that the apply need not make it again (dr.tables.carry)
        carried = carry_out(w, report)
        try:
            write_carried(rt.store, carried_name(t.service, t.env_short, incident, datetime.now(timezone.utc)), carried,
                          incident=incident, server=t.server, database=t.database)
        finally:
            carried.close()
        for info in find_packs(rt.store, incident):  # a re-run with the same comparison reuses its pack
            if (info.manifest or {}).get("digests") == report.digests():
                stored["name"] = info.name
                return
        info = write_pack(rt.store, pack_name(t.service, t.env_short, incident, datetime.now(timezone.utc)), w, report,
                          incident=incident, service=t.service, environment=t.environment, server=t.server,
                          safety_backup=safety_backup)
        stored["name"] = info.name

    report = compare(live, ptr, tables, restore_time=restore_time,
                     application_name=f"dr-orchestrator table compare {incident}", on_compared=store_pack)
    return report, stored.get("name")


@dr_task(retries=0)
def apply_tables_task(ref: Ref, *, ptr_server: str, tables: list[str], incident: str, approved: dict[str, str],
                      pack: str | None, restore_time_utc: str):
    """Replace the closure tables' rows in ONE transaction (recorded in the store first); never retried."""
    from dr.tables.apply import apply_tables
    from dr.tables.carry import find_carried, find_carried_all, read_carried
    from dr.tables.pack import write_record

    rt = ref.rt()
    t = rt.target
    live = rt.servers.connection(t.server, t.database)
    ptr = rt.servers.connection(ptr_server, t.database)

    def record(txid: int, oid: int) -> None:
        write_record(rt.store, _record_name(ref, incident, txid), {
            "incident": incident, "server": t.server, "database": t.database, "database_oid": oid, "txid": txid,
            "tables": list(tables), "ptr_server": ptr_server, "restore_time_utc": restore_time_utc, "pack": pack,
            "approved": approved, "started_at": datetime.now(timezone.utc).isoformat()}, incident=incident)

    kept = find_carried(rt.store, incident, approved)  # the approved comparison, as the compare kept it
    carried = read_carried(rt.store, kept.name) if kept else None
    try:
        result = apply_tables(live, ptr, tables, approved=approved, record=record,
                              application_name=f"dr-orchestrator table recovery {incident}", carried=carried)
    finally:
        if carried is not None:
            carried.close()
    for info in find_carried_all(rt.store, incident):  # applied: the kept comparisons served their purpose
        try:
            rt.store.delete_backup(info.name)
        except Exception as exc:  # noqa: BLE001 - a leftover is harmless (small, never used again)
            log.warning("could not delete the kept comparison %s: %s", info.name, exc)
    return result


@dr_task(retries=1)
def reconcile_task(ref: Ref, *, incident: str, tables: list[str] | None, apply: bool, approved: str | None = None,
                   pack: str | None = None):
    """Plan (or apply) re-applying the discarded writes of an incident's reconciliation pack."""
    from dr.errors import BackupNotFound
    from dr.tables.pack import find_packs, find_records, read_pack
    from dr.tables.reconcile import reconcile_tables

    rt = ref.rt()
    t = rt.target
    if pack is None:
        committed = find_committed_apply.fn(ref, incident)
        if committed is None:
            known = find_records(rt.store, incident)
            raise BackupNotFound(
                f"incident {incident} has no committed table-level recovery on {t.server}/{t.database}"
                + (f" ({len(known)} attempt(s) recorded, none committed)" if known else "")
                + ": nothing was discarded, so there is nothing to reconcile")
        pack = committed.pack
        if not pack:
            packs = find_packs(rt.store, incident)
            if not packs:
                raise BackupNotFound(f"incident {incident} has no reconciliation pack in the store")
            pack = packs[0].name
    p = read_pack(rt.store, pack)
    try:
        return reconcile_tables(rt.servers.connection(t.server, t.database), p, tables, apply=apply, approved=approved,
                                application_name=f"dr-orchestrator reconcile {incident}")
    finally:
        p.close()


@dr_task(retries=1)
def publish_markdown(key: str, markdown: str, description: str) -> None:
    """Publish a markdown artifact (the "what this changes" report, the reconciliation plan)."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=key, markdown=markdown, description=description)
