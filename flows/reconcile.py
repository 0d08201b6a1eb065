"""Put back the writes made after T that a table-level recovery discarded (its reconciliation pack).

Shows the plan: for each table of the pack, how many of the rows inserted and updated after T
would go back, and why the others would not (key taken, changed since, missing parent...). With
`apply`, asks a person to approve exactly that plan, then applies it in one transaction, with the
same checks as the recovery; running it again does nothing twice (rows already back are "already
there").
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow

from dr.incident import check_incident_id
from dr.runtime import Ref
from dr.tables.compare import TableRecoveryRefused
from flows.approval import approve, check_approval_timeout, check_auto_approve
from flows.common import Timeline, recovery_lock
from tasks.tables import publish_markdown, reconcile_task


@flow(name="reconcile", log_prints=True)
def reconcile(
    service: str,
    environment: str,
    incident: str,
    tables: list[str] | None = None,
    apply: bool = False,
    auto_approve: bool = False,
    approval_timeout_minutes: int | None = None,
    config_path: str | None = None,
) -> dict:
    """Re-apply the writes after T that table-level recovery of an incident discarded, where they do not conflict.

    Changes the world only with `apply`, after approval: inserts and updates rows of the live
    database in one transaction (user triggers of those tables disabled for it). Assumes the
    incident's table-level recovery committed (its reconciliation pack is in the store).

    Args:
        service: the service short name, e.g. `apply`.
        environment: the environment, e.g. `production`.
        incident: the incident whose recovery discarded the writes.
        tables: only these tables of the pack (default: all of them).
        apply: apply the plan after approval (default: show the plan only).
        auto_approve: approve without asking (non-production only).
        approval_timeout_minutes: how long the gate waits for a person (default from config).
        config_path: the configuration file.
    """
    check_approval_timeout(approval_timeout_minutes)
    ref = Ref(service, environment, config_path)
    t = ref.rt().target
    check_auto_approve(ref, auto_approve)
    incident = check_incident_id(incident)
    timeline = Timeline(f"Reconciliation of incident {incident}, {service} {environment}", f"reconcile-{incident}",
                        t.timezone)
    resume = (f"dr reconcile --service {service} --env {environment} --incident {incident}"
              + (f" --tables {','.join(tables)}" if tables else "") + " --apply")
    with timeline.step("plan the reconciliation") as ev:
        plan = reconcile_task(ref, incident=incident, tables=tables, apply=False)
        publish_markdown(f"reconcile-{incident}", "```\n" + plan.text() + "\n```", f"reconciliation plan {incident}")
        ev.detail = f"{plan.rows_applied()} rows would go back; pack {plan.pack}"
    out = {"incident": incident, "pack": plan.pack, "plan": plan.text(), "applied": False, "rows": 0,
           "timeline": timeline.as_dict()}
    if not apply:
        return out
    if plan.refused:
        raise TableRecoveryRefused("reconciliation refused: " + " | ".join(plan.refused),
                                   world_state="nothing was changed")
    if plan.rows_applied() == 0:
        timeline.record("re-apply discarded writes", "skipped", "nothing to do (already there or conflicting)")
        return out
    with recovery_lock(ref):
        decision = approve(ref, timeline, gate="re-apply discarded writes", auto_approve=auto_approve,
                           timeout_minutes=approval_timeout_minutes or t.approval_timeout_minutes, resume=resume,
                           what=plan.text())
        with timeline.step("re-apply discarded writes") as ev:
            done = reconcile_task(ref, incident=incident, tables=tables, apply=True, approved=plan.digest(),
                                  pack=plan.pack)
            ev.detail = f"{done.rows_applied()} rows re-applied in {done.seconds:.1f} s"
    out.update(applied=True, rows=done.rows_applied(), result=done.text(), decision=decision.line(),
               ended=datetime.now(timezone.utc).isoformat(), timeline=timeline.as_dict())
    return out
