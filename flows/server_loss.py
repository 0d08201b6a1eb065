"""Scenario 1 of the runbook: loss of the database server.

Maintenance on → revive the dropped server, or recreate it from its latest snapshot (version,
size, network), apply the snapshot's parameters (waiting for any restart they need) and restore
the newest complete nightly backup, or (Azure, region outage) geo-restore it into the paired
region → validate → (approval) maintenance off → report. A backup the recreated server could not
take (a missing or refused extension, an older version) is refused before anything changes.

Re-running with the same incident id continues: a revived or recreated server is
recognised, and a database already restored from the chosen backup is not restored again.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Literal

from prefect import flow

from dr.errors import DrError, IncompatibleBackup, InvalidInput, PlatformError, ServerExists
from dr.incident import IncidentRecord, check_incident_id, new_incident_id
from dr.platforms.base import TAG_INCIDENT
from dr.runtime import Ref
from flows.approval import approve, ask_recovery_choice, check_auto_approve, check_approval_timeout
from flows.common import Timeline, recovery_lock, run_logger, validate_step
from flows.plan import plan_server_loss, publish_plan
from tasks.backups import find_backup
from tasks.database import database_exists_task, restore_backup_task
from tasks.maintenance import disable_maintenance, enable_maintenance, scale_up_app, wait_until_healthy
from tasks.notifications import flow_run_link, notify
from tasks.preflight import apply_server_parameters, latest_server_snapshot_task, recreate_server_from_snapshot
from tasks.reports import publish_report
from tasks.servers import (
    follow_ups_task,
    geo_restore_refusals_task,
    geo_restore_task,
    geo_server_name,
    get_server_task,
    list_dropped_servers_task,
    recovery_server_name,
    recovery_server_name_task,
    recreate_server_task,
    revive_server_task,
)

NIGHTLY_KINDS = ("nightly",)


@flow(name="server-loss", log_prints=True)
def server_loss(
    service: str,
    environment: str,
    recovery: Literal["auto", "revive", "recreate", "geo-restore"] = "auto",
    backup: str | None = None,
    incident: str | None = None,
    auto_approve: bool = False,
    plan_only: bool = False,
    approval_timeout_minutes: int | None = None,
    wait_for_go_ahead: bool = False,
    without_snapshot: bool = False,
    config_path: str | None = None,
) -> dict:
    """Bring back a lost database server, the runbook's scenario 1.

    Changes the world: shows the maintenance page, then revives the dropped server (all
    data kept) or recreates it empty and restores the newest complete nightly backup into
    it; users return only after validation and a person's approval.

    Args:
        service: the service short name.
        environment: the environment.
        recovery: `auto` asks (or, with auto_approve, revives when possible); `revive` or `recreate` to decide
            now; `geo-restore` (Azure, region outage) restores the geo-redundant backup onto a new server in the
            configured paired region, and pauses for the app to be pointed at it.
        backup: the backup to restore after a recreate; default the newest complete nightly backup.
        incident: the incident id; re-run with the same id to resume. Generated when empty.
        auto_approve: approve every gate (non-production drills only; refused for production).
        plan_only: check everything and show the plan, changing nothing.
        approval_timeout_minutes: how long each gate waits for a person (default from config).
        wait_for_go_ahead: pause for a person before anything is changed (runs started by an alert).
        without_snapshot: recreate with the platform's defaults when the store holds no snapshot of the
            server (otherwise refused: a recreate never guesses the server's version, size and parameters).
        config_path: the configuration file.
    """
    check_approval_timeout(approval_timeout_minutes)
    ref = Ref(service, environment, config_path)
    t = ref.rt().target
    log = run_logger()
    check_auto_approve(ref, auto_approve)
    incident = check_incident_id(incident) if incident else new_incident_id()
    if recovery == "geo-restore":
        if not ref.rt().servers.supports_geo_restore:
            raise InvalidInput(f"geo-restore is not possible on the {t.platform} platform: it restores Azure's "
                               "geo-redundant backup into another region")
        if t.geo_restore is None:
            raise InvalidInput(f"geo-restore needs the paired region: set geo_restore = {{ location = \"...\" }} "
                               f"(and the subnet and DNS zone there) for services.{service}.environments.{environment}")
        refusals = geo_restore_refusals_task(ref)
        if refusals:
            raise InvalidInput(f"geo-restore of {t.server} to {t.geo_restore.location} is not possible: "
                               + "; ".join(refusals))
    plan = plan_server_loss(ref, backup, without_snapshot, recovery)
    publish_plan(plan)
    if plan_only:
        return {"incident": incident, "plan": plan.text(), "blockers": plan.blockers}
    if plan.refusals and recovery != "geo-restore":
        raise IncompatibleBackup("cannot start: " + "; ".join(plan.refusals), problems=plan.refusals,
                                 world_state="nothing was changed")
    # the server as it was: chosen once, before anything changes (what the plan showed)
    snapshot = latest_server_snapshot_task(ref) if recovery != "geo-restore" else None

    # nothing lost: refuse before touching anything (a server this incident brought back is a resume);
    # a geo-restore leaves the server alone (in a region outage Azure may even call it Ready)
    srv = get_server_task(ref) if recovery != "geo-restore" else None
    if srv is not None and srv.state == "Ready" and srv.tags.get(TAG_INCIDENT) != incident:
        revived = srv.tags.get("dr-revived-at")
        recent = revived and datetime.now(timezone.utc) - datetime.fromisoformat(revived) < timedelta(hours=24)
        if not recent and database_exists_task(ref, t.database):
            raise InvalidInput(f"server {t.server} is up and holds {t.database}: nothing is lost. "
                               "For lost or corrupted data use the data-loss scenario")

    timeout = approval_timeout_minutes or t.approval_timeout_minutes
    resume = f"dr server-loss --service {service} --env {environment} --incident {incident}"
    record = IncidentRecord(incident, "server loss", service, environment, t.timezone, datetime.now(timezone.utc))
    timeline = Timeline(f"Incident {incident}: server loss, {service} {environment}", f"timeline-{incident}", t.timezone)
    state = "nothing changed yet"
    how = "none"
    restored_backup = None

    with recovery_lock(ref):
        try:
            if wait_for_go_ahead:
                d = approve(ref, timeline, gate="start the recovery", auto_approve=False, timeout_minutes=timeout,
                            resume=resume, what=f"server-loss recovery of {t.server}. Plan:\n{plan.text()}")
                record.decisions.append(d.line())
            with timeline.step("start the incident"):
                notify(ref, f"incident {incident} started: server loss", f"server {t.server} lost", flow_run_link())

            with timeline.step("enable maintenance") as ev:
                status = enable_maintenance(ref)
                ev.detail = f"temporary URL {status.temp_url}"
                state = "maintenance page on"

            with timeline.step("bring the server back") as ev:
                srv = get_server_task(ref) if recovery != "geo-restore" else None
                if recovery == "geo-restore":
                    assert t.geo_restore is not None
                    geo_name = geo_server_name(t.server, t.geo_restore.server)
                    srv = get_server_task(ref, geo_name)
                    if srv is not None and srv.tags.get(TAG_INCIDENT) != incident:
                        raise ServerExists(f"server {geo_name} exists and is not this incident's geo-restore",
                                           server=geo_name)
                    made = srv is None
                    if made or srv.state != "Ready":  # a re-run re-attaches to the running operation
                        srv = geo_restore_task(ref, tags={TAG_INCIDENT: incident})
                    if made:
                        record.servers_created.append(srv.name)
                    how = "geo-restored"
                    ev.detail = f"{t.server} geo-restored as {srv.name} in {t.geo_restore.location} ({srv.host})"
                elif srv is not None or (srv := get_server_task(ref, recovery_server_name(t.server, incident))):
                    how = "revived" if any(k.startswith("dr-revived") for k in srv.tags) else "recreated"
                    ev.detail = f"{t.server} already back as {srv.name} ({how}); continuing"
                else:
                    # Azure keeps a dropped server's name while it can be revived: then it comes back as another
                    name, held = recovery_server_name_task(ref, incident)
                    if held:
                        log.warning("%s: %s; as Microsoft advises, it comes back as %s, and the app is pointed at it "
                                    "before users return", t.server, held, name)
                    dropped = [d for d in list_dropped_servers_task(ref) if d.name == t.server]
                    choice = recovery
                    if choice == "revive" and not dropped:
                        raise InvalidInput(f"server {t.server} cannot be revived: no dropped copy within the window")
                    if choice == "auto":
                        if dropped and not auto_approve:
                            choice = ask_recovery_choice(
                                ref, timeline, timeout_minutes=timeout, resume=resume,
                                what=(f"{t.server} was dropped {dropped[0].dropped_at:%Y-%m-%d %H:%M} UTC and can be "
                                      "revived with all its data, or recreated and restored from the nightly backup"))
                        else:
                            choice = "revive" if dropped else "recreate"
                    if choice == "revive":
                        srv = revive_server_task(ref, name)
                        how = "revived"
                    elif snapshot is not None:
                        srv = recreate_server_from_snapshot(ref, snapshot[0], tags={TAG_INCIDENT: incident}, name=name)
                        how = "recreated"
                        record.servers_created.append(srv.name)
                    elif without_snapshot:
                        srv = recreate_server_task(ref, name, tags={TAG_INCIDENT: incident})
                        how = "recreated"
                        record.servers_created.append(srv.name)
                    else:
                        raise PlatformError(f"no snapshot of server {t.server} in the store: a recreate would have to "
                                            "guess its version, size and parameters; recreate it by hand, or run "
                                            "again with without_snapshot (--without-snapshot)", server=t.server)
                    ev.detail = f"{how} {srv.name}" + (f" from the snapshot taken with {snapshot[1]}"
                                                       if how == "recreated" and snapshot else "")
                record.facts["server"] = f"{how}: {t.server}" if srv.name == t.server else \
                    f"{how}: {srv.name} in place of {t.server}"
                for i, todo in enumerate(follow_ups_task(ref, srv.name), 1):
                    record.facts[f"to do {i}"] = todo
                state = f"server {srv.name} {how}; maintenance page on"

            if how == "recreated":
                with timeline.step("apply the server's parameters") as ev:
                    if snapshot is not None and snapshot[0].parameters:
                        change = apply_server_parameters(ref, snapshot[0].parameters, server=srv.name)
                        ev.detail = (f"from the snapshot taken with {snapshot[1]}: "
                                     + (", ".join(f"{k} = {v}" for k, v in change.applied.items()) or "none changed")
                                     + (f"; already set: {', '.join(change.unchanged)}" if change.unchanged else "")
                                     + ("; the server was restarted for them" if change.restarted else ""))
                        state = f"server {srv.name} recreated with its parameters; maintenance page on"
                    else:
                        ev.outcome = "skipped"
                        ev.detail = ("no snapshot: the platform's defaults, as asked" if snapshot is None else
                                     snapshot[0].extra.get("parameters_unknown", "the snapshot records no "
                                                            "non-default parameters"))
                with timeline.step("restore the newest nightly backup") as ev:
                    info = find_backup(ref, name=backup, kinds=None if backup else NIGHTLY_KINDS)
                    restored_backup = info.name
                    record.last_backup = info.finished_at or info.created_at
                    res = restore_backup_task(ref, backup=info.name, server=srv.name, jobs=2, incident=incident)
                    if res.skipped:
                        ev.outcome, ev.detail = "skipped", res.skipped
                        record.facts["restore skipped"] = res.skipped
                    else:
                        ev.detail = f"{info.name} restored and verified"
                    state = f"server {srv.name} recreated and holds backup {info.name}; maintenance page on"
            elif how == "geo-restored":
                record.facts["data loss"] = ("what was not yet geo-replicated: Azure copies backups to the paired "
                                             "region with a lag of up to about an hour")
            else:
                record.facts["data loss"] = "none: the revived server keeps all committed data"
            moved = srv.name != t.server  # geo-restored, or brought back under a new name
            if moved:
                validate_step(ref, timeline, server=srv.name, healthcheck=False, step=f"check the data on {srv.name}")
                state = f"{srv.name} {how} and checked; the app still points at {t.server}; maintenance on"
                d = approve(ref, timeline, gate=f"switch the app to the {how} server", auto_approve=auto_approve,
                            timeout_minutes=timeout, resume=resume,
                            what=(f"point the app's database host at {srv.host} (server {srv.name}), e.g. its "
                                  f"DATABASE_URL secret, and set server = \"{srv.name}\" for {service} {environment} "
                                  "in dr.toml; approve once done"))
                record.decisions.append(d.line())

            # a server under another name is the service's server now, whatever dr.toml still says
            record.validated = validate_step(ref, timeline, server=srv.name if moved else None)

            d = approve(ref, timeline, gate="disable maintenance", auto_approve=auto_approve, timeout_minutes=timeout,
                        resume=resume, what=f"service validated on the {how} server; send users back")
            record.decisions.append(d.line())
            with timeline.step("disable maintenance") as ev:
                scale_up_app(ref)
                disable_maintenance(ref)
                wait_until_healthy(ref)
                state = "service restored and serving users"
        except Exception as exc:
            if isinstance(exc, DrError):
                exc.annotate(world_state=state, resume_hint=resume)
            log.error("incident %s: %s", incident, exc)
            record.outcome = f"FAILED: {exc}"
            record.ended = datetime.now(timezone.utc)
            publish_report(ref, incident, record.to_markdown(timeline.markdown()))
            notify(ref, f"incident {incident} FAILED", str(exc), flow_run_link())
            raise

    record.outcome = "recovered"
    record.ended = datetime.now(timezone.utc)
    if how == "revived":
        record.last_backup = None
    report_path = publish_report(ref, incident, record.to_markdown(timeline.markdown()))
    notify(ref, f"incident {incident} recovered", f"server {how}; RTO {record.rto_seconds:.0f} s", flow_run_link())
    return {"incident": incident, "recovery": how, "backup": restored_backup, "rto_seconds": record.rto_seconds,
            "rpo_seconds": record.rpo_seconds, "report": report_path, "timeline": timeline.as_dict(),
            "decisions": record.decisions}
