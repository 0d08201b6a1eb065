"""Scenario 2 of the runbook: loss or corruption of data.

Stop the app → maintenance on → safety backup of the flawed database → point-in-time
restore to a NEW server → back that server up → (approval) restore into the live
server → validate → (approval) maintenance off → delete the PTR server → report.

With `tables`, the runbook's "update data into the source database from the new PTR
server": after the PTR server, only the chosen tables and their foreign-key closure are
compared and (approval) replaced with the PTR server's rows, in one transaction on the live
database; every other table keeps its writes after T, and the writes the replacement
discards are stored as a reconciliation pack beside the safety backup (dr/tables/). The PTR
server is backed up at the end, before it is deleted.

Re-running with the same incident id continues where it stopped: every step first
looks at the world (the safety backup, the PTR server, its backup, the live database's
restore marker) and does nothing twice.
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow

from dr.errors import DrError, InvalidInput
from dr.incident import IncidentRecord, check_incident_id, new_incident_id
from dr.platforms.base import TAG_INCIDENT, TAG_RESTORE_TIME, TAG_SOURCE
from dr.runtime import Ref
from dr.timeparse import check_in_window, fmt_both, parse_restore_time
from flows.approval import approve, ask_restore_time, check_auto_approve, check_approval_timeout
from flows.common import Timeline, recovery_lock, run_logger, validate_step
from flows.plan import plan_data_loss, publish_plan
from flows.ptr import ptr_server_name
from dr.tables.compare import raise_blockers
from tasks.backups import backup_database_task, find_incident_backup
from tasks.database import restore_backup_task, table_counts
from tasks.maintenance import disable_maintenance, enable_maintenance, scale_down_app, scale_up_app, wait_until_healthy
from tasks.notifications import flow_run_link, notify
from tasks.reports import publish_report
from tasks.servers import delete_server_task, get_restore_window_task, list_servers_task, point_in_time_restore_task
from tasks.tables import apply_tables_task, compare_tables_task, find_committed_apply, plan_table_recovery, publish_markdown


def _existing_ptr_server(ref: Ref, incident: str):
    """The PTR server this incident already made, if any."""
    rt = ref.rt()
    for srv in list_servers_task(ref):
        if srv.created_by_us and srv.tags.get(TAG_INCIDENT) == incident and srv.tags.get(TAG_SOURCE) == rt.target.server:
            return srv
    return None


def _maybe_backup(ref: Ref, kind: str, incident: str, **kw):
    """The incident's backup of this kind, taken now unless it already exists."""
    found = find_incident_backup(ref, kind, incident)
    if found is not None:
        return found, False
    return backup_database_task(ref, kind=kind, label=incident, **kw).info, True


@flow(name="data-loss", log_prints=True)
def data_loss(
    service: str,
    environment: str,
    restore_time: str | None = None,
    timezone_name: str | None = None,
    incident: str | None = None,
    auto_approve: bool = False,
    plan_only: bool = False,
    keep_ptr_server: bool = False,
    approval_timeout_minutes: int | None = None,
    wait_for_go_ahead: bool = False,
    config_path: str | None = None,
    tables: list[str] | None = None,
) -> dict:
    """Recover from lost or corrupted data with a point-in-time restore, the runbook's scenario 2.

    Changes the world: stops the app, shows the maintenance page, creates a safety backup,
    a PTR server and its backup, swaps the restored database into the live server (the
    flawed one is kept as `<db>_replaced_<time>`), and deletes the PTR server at the end.
    Pauses for a person before the live database is replaced and before users return.

    Args:
        service: the service short name, e.g. `apply`.
        environment: the environment, e.g. `production`.
        restore_time: a time BEFORE the damage, `YYYY-MM-DD HH:MM[:SS]` in UK time (or with an
            offset). Leave empty to be asked with a form once the app is safely stopped.
        timezone_name: zone of `restore_time` when typed without offset (default Europe/London).
        incident: the incident id; re-run with the same id to resume. Generated when empty.
        auto_approve: approve every gate (non-production drills only; refused for production).
        plan_only: check everything and show the plan, changing nothing.
        keep_ptr_server: do not delete the PTR server at the end.
        approval_timeout_minutes: how long each gate waits for a person (default from config).
        wait_for_go_ahead: pause for a person before anything is changed (runs started by an alert).
        config_path: the configuration file.
        tables: recover only these tables (and the tables their foreign keys tie to them) from the PTR
            server, keeping every other table's writes after T; e.g. `["applications"]`. A name starting
            with `-` leaves a table of the closure out (refused if that would break a key). Empty: the
            whole database, as the runbook does.
    """
    check_approval_timeout(approval_timeout_minutes)
    ref = Ref(service, environment, config_path)
    rt = ref.rt()
    t = rt.target
    zone = timezone_name or t.timezone
    log = run_logger()

    # bad input stops here, before anything is touched
    check_auto_approve(ref, auto_approve)
    incident = check_incident_id(incident) if incident else new_incident_id()
    try:
        given_time = parse_restore_time(restore_time, zone) if restore_time else None
    except DrError as exc:
        raise exc.annotate(step="check the restore time", world_state="nothing was changed")
    if auto_approve and given_time is None and _existing_ptr_server(ref, incident) is None:
        raise InvalidInput("an automatic run needs restore_time (there is nobody to ask)")
    plan = plan_data_loss(ref, restore_time, zone)
    if tables:
        plan = plan_table_recovery(ref, plan, tables)
    publish_plan(plan)
    if plan_only:
        return {"incident": incident, "plan": plan.text(), "blockers": plan.blockers}
    if plan.blockers:
        raise InvalidInput("cannot start: " + "; ".join(plan.blockers), world_state="nothing was changed")

    timeout = approval_timeout_minutes or t.approval_timeout_minutes
    resume = (f"dr data-loss --service {service} --env {environment} --incident {incident}"
              + (f" --tables {','.join(tables)}" if tables else ""))
    record = IncidentRecord(incident, "data loss", service, environment, zone, datetime.now(timezone.utc))
    timeline = Timeline(f"Incident {incident}: data loss, {service} {environment}", f"timeline-{incident}", zone)
    state = "nothing changed yet"

    def fail(exc: BaseException) -> None:
        record.outcome = f"FAILED: {exc}"
        record.ended = datetime.now(timezone.utc)
        publish_report(ref, incident, record.to_markdown(timeline.markdown()))
        notify(ref, f"incident {incident} FAILED", str(exc), flow_run_link())

    with recovery_lock(ref):
        try:
            if wait_for_go_ahead:
                d = approve(ref, timeline, gate="start the recovery", auto_approve=False, timeout_minutes=timeout,
                            resume=resume, what=f"data-loss recovery of {t.server}/{t.database}: the app will be "
                                                f"stopped at once. Plan:\n{plan.text()}")
                record.decisions.append(d.line())
            with timeline.step("start the incident"):
                notify(ref, f"incident {incident} started: data loss",
                       f"recovering {t.server}/{t.database}; app being stopped", flow_run_link())

            with timeline.step("stop the app and enable maintenance") as ev:
                recorded = scale_down_app(ref)
                status = enable_maintenance(ref)
                ev.detail = f"replicas recorded {recorded}; temporary URL {status.temp_url}"
                state = "app stopped, maintenance page on"

            with timeline.step("safety backup of the flawed database") as ev:
                safety, made = _maybe_backup(ref, "pre-restore-safety", incident)
                record.backups_created.append(safety.name)
                ev.detail = f"{safety.name} ({'taken' if made else 'already taken: reused'})"
                state += f"; safety backup {safety.name} in the store"

            with timeline.step("restore time") as ev:
                existing = _existing_ptr_server(ref, incident)
                window = get_restore_window_task(ref)
                done = find_committed_apply(ref, incident) if tables else None

                def in_window(when: datetime) -> None:
                    check_in_window(when, window.earliest, window.latest, zone)

                if done and not existing and done.restore_time_utc:
                    when = datetime.fromisoformat(done.restore_time_utc)
                elif existing:
                    when = datetime.fromisoformat(existing.tags[TAG_RESTORE_TIME])
                    if given_time and given_time != when:
                        raise InvalidInput(f"incident {incident} already restored to {fmt_both(when, zone)}; "
                                           "to use another time, start a new incident")
                elif given_time:
                    in_window(given_time)
                    when = given_time
                else:
                    when, _, who = ask_restore_time(ref, timeline, timeout_minutes=timeout, resume=resume, check=in_window)
                    record.decisions.append(f"restore time {fmt_both(when, zone)} given by {who}")
                record.restore_target = when
                ev.detail = fmt_both(when, zone)

            with timeline.step("point-in-time restore to a new server") as ev:
                if done and not existing:  # the table recovery committed and its PTR server was deleted after it
                    ptr = None
                    ev.outcome, ev.detail = "skipped", f"not needed: the tables were replaced in transaction {done.txid}"
                else:
                    ptr = point_in_time_restore_task(
                        ref, source=t.server, new_name=ptr_server_name(t.server, when), point_in_time_utc=when,
                        tags={TAG_INCIDENT: incident, "dr-service": service, "dr-environment": environment})
                    record.servers_created.append(ptr.name)
                    ev.detail = f"{ptr.name} at {ptr.host}:{ptr.port}"
                    state += f"; PTR server {ptr.name} holds the data as at {when:%H:%M:%S} UTC"

            res = ptr_backup = changes = kept = None
            if tables:
                timeline.record("back up the PTR server to the store", "skipped",
                                "table-level recovery reads the PTR server directly; it is backed up before deletion")
                with timeline.step("compare the tables with the PTR server") as ev:
                    if done:
                        report, pack = None, done.pack
                        ev.outcome, ev.detail = "skipped", f"already replaced in transaction {done.txid}"
                        record.facts.update({"tables recovered": ", ".join(done.tables), "reconciliation pack": pack,
                                             "applied in transaction": done.txid})
                        record.reconcile_command = (f"dr reconcile --service {service} --env {environment} "
                                                    f"--incident {incident}")
                    else:
                        report, pack = compare_tables_task(ref, ptr_server=ptr.name, tables=tables, incident=incident,
                                                           restore_time=fmt_both(when, zone), safety_backup=safety.name)
                        publish_markdown(f"tables-{incident}", report.markdown(), f"what this changes, {incident}")
                        ev.detail = (f"{len(report.tables)} tables in the closure, {report.seconds:.1f} s; "
                                     + ("; ".join(report.blockers) if report.blockers else f"pack {pack}"))
                        if report.blockers:
                            raise_blockers(report, world_state=state)
                        record.backups_created.append(pack)
                        state += f"; reconciliation pack {pack} in the store"
                if report is not None:
                    decision = approve(
                        ref, timeline, gate="replace the rows of the chosen tables", auto_approve=auto_approve,
                        timeout_minutes=timeout, resume=resume,
                        what=(f"in {t.server}/{t.database}, replace the rows of {', '.join(r.table for r in report.tables)} "
                              f"with the PTR server's rows as at {fmt_both(when, zone)}, in one transaction; the writes "
                              f"after T it discards are in the reconciliation pack {pack}\n{report.gate_text()}"))
                    record.decisions.append(decision.line())
                    with timeline.step("replace the rows of the closure tables") as ev:
                        applied = apply_tables_task(ref, ptr_server=ptr.name, tables=tables, incident=incident,
                                                    approved=report.digests(), pack=pack,
                                                    restore_time_utc=when.isoformat())
                        ev.detail = (f"transaction {applied.txid} committed in {applied.seconds:.1f} s: "
                                     f"{applied.summary()}; {applied.verified}"
                                     + (f"; sequences moved forward: {', '.join(applied.sequences_moved)}"
                                        if applied.sequences_moved else ""))
                    _record_tables(record, report, pack, applied.txid, service, environment, incident)
                    changes = {x.table: dict(x.counts) for x in report.tables}
                    kept = {k.table: {"live_rows": k.live_rows, "rows_at_t": k.t_rows} for k in report.kept}
                state = (f"the live tables {', '.join(tables)} (and their closure) hold the rows as at {when:%H:%M:%S} "
                         "UTC; maintenance page on" + (f"; PTR server {ptr.name} still exists" if ptr else ""))
            else:
                with timeline.step("back up the PTR server to the store") as ev:
                    ptr_backup, made = _maybe_backup(ref, "ptr", incident, server=ptr.name, database=t.database)
                    record.backups_created.append(ptr_backup.name)
                    ev.detail = f"{ptr_backup.name} ({'taken' if made else 'reused'})"
                    state += f"; its backup {ptr_backup.name} is in the store"

                live_counts = table_counts(ref)
                ptr_counts = (ptr_backup.manifest or {}).get("rows", {})
                diff = ", ".join(f"{k.split('.')[-1]}: live {live_counts.get(k, 0)} → {v}" for k, v in sorted(ptr_counts.items())
                                 if live_counts.get(k) != v) or "no row-count differences"
                decision = approve(
                    ref, timeline, gate="restore into the live database", auto_approve=auto_approve, timeout_minutes=timeout,
                    resume=resume,
                    what=(f"replace {t.server}/{t.database} with backup {ptr_backup.name} (data as at {fmt_both(when, zone)}); "
                          f"the current database is kept as {t.database}_replaced_…; {diff}"))
                record.decisions.append(decision.line())

                with timeline.step("restore into the live server") as ev:
                    res = restore_backup_task(ref, backup=ptr_backup.name, jobs=2, incident=incident,
                                              safety_backup=safety.name)
                    if res.skipped:
                        ev.outcome, ev.detail = "skipped", res.skipped
                        record.facts["restore skipped"] = res.skipped
                    else:
                        ev.detail = f"swapped in; flawed database kept as {res.replaced_database} ({res.replaced_held_by})"
                    if res.replaced_database:
                        record.left_to_tidy.append(f"database {res.replaced_database} on {t.server} (after "
                                                   f"reconciliation; {res.replaced_held_by})")
                    state = (f"the live database holds the restored data (as at {when:%H:%M:%S} UTC); maintenance page on; "
                             f"PTR server {ptr.name} still exists")
            with timeline.step("restart the app behind the maintenance page") as ev:
                replicas = scale_up_app(ref)  # users still see the maintenance page; the temporary URL reaches the app
                ev.detail = f"replicas {replicas}; check it at {status.temp_url}"

            record.validated = validate_step(ref, timeline)

            decision = approve(ref, timeline, gate="disable maintenance", auto_approve=auto_approve,
                               timeout_minutes=timeout, resume=resume,
                               what=f"service validated; send users back to {status.main_url}")
            record.decisions.append(decision.line())
            with timeline.step("disable maintenance") as ev:
                disable_maintenance(ref)
                health = wait_until_healthy(ref)
                ev.detail = f"{status.main_url} answers {health[0]}"
                state = "service restored and serving users; PTR server still exists"

            with timeline.step("tidy up: delete the PTR server") as ev:
                if tables and ptr and not keep_ptr_server:  # its rows at T are held in the store before it goes
                    ptr_backup, made = _maybe_backup(ref, "ptr", incident, server=ptr.name, database=t.database)
                    record.backups_created.append(ptr_backup.name)
                if ptr is None:
                    ev.outcome, ev.detail = "skipped", "already deleted"
                elif keep_ptr_server:
                    ev.outcome, ev.detail = "skipped", "kept on request"
                    record.left_to_tidy.append(f"PTR server {ptr.name}")
                else:
                    if t.production:
                        d = approve(ref, timeline, gate="delete the PTR server", auto_approve=False,
                                    timeout_minutes=timeout, resume=resume, what=f"delete server {ptr.name}")
                        record.decisions.append(d.line())
                    delete_server_task(ref, ptr.name)
                    record.servers_deleted.append(ptr.name)
                    ev.detail = f"deleted {ptr.name}" + (f" (its data held in {ptr_backup.name})" if tables else "")
        except (DrError, Exception) as exc:
            if isinstance(exc, DrError):
                exc.annotate(world_state=state, resume_hint=resume)
            log.error("incident %s: %s", incident, exc)
            fail(exc)
            raise

    record.outcome = "recovered"
    record.ended = datetime.now(timezone.utc)
    record.facts["flawed data kept in"] = safety.name
    report_path = publish_report(ref, incident, record.to_markdown(timeline.markdown()))
    notify(ref, f"incident {incident} recovered",
           f"RTO {record.rto_seconds:.0f} s; restored to {fmt_both(when, zone)}; report {report_path}", flow_run_link())
    return {
        "incident": incident, "restore_target_utc": when.isoformat(), "ptr_server": ptr.name if ptr else None,
        "safety_backup": safety.name, "ptr_backup": ptr_backup.name if ptr_backup else None,
        "replaced_database": res.replaced_database if res else None,
        "rto_seconds": record.rto_seconds, "rpo_seconds": record.rpo_seconds, "report": report_path,
        "timeline": timeline.as_dict(), "decisions": record.decisions,
        **({"tables": record.facts.get("tables recovered"), "reconciliation_pack": record.facts.get("reconciliation pack"),
            "changes": changes, "kept": kept, "apply_txid": record.facts.get("applied in transaction")}
           if tables else {}),
    }


def _record_tables(record: IncidentRecord, report, pack: str | None, txid: int, service: str, environment: str,
                   incident: str) -> None:
    """What a table-level recovery changed, for the post-incident report."""
    record.facts["tables recovered"] = ", ".join(t.table for t in report.tables if t.role != "needed")
    record.facts["what changed"] = "; ".join(
        f"{t.table}: " + (t.note if t.whole_table else f"{t.counts['back']} came back, {t.counts['reverted']} reverted, "
                          f"{t.counts['removed']} removed") for t in report.tables)
    record.facts["reconciliation pack"] = pack
    record.facts["applied in transaction"] = txid
    record.facts["rows kept (RPO gained)"] = (f"every write after T in {len(report.kept)} tables not replaced "
                                              f"(net {report.rows_kept()} rows); RPO 0 for them")
    record.sections.append(report.markdown())
    record.reconcile_command = f"dr reconcile --service {service} --env {environment} --incident {incident}"

