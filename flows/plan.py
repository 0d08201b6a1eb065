"""Plan before acting: every precondition of a scenario, checked without side effects."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from prefect.artifacts import create_markdown_artifact

from dr.errors import DrError
from dr.runtime import Ref
from dr.timeparse import check_in_window, fmt_both, parse_restore_time
from tasks.common import dr_task


@dataclass
class Plan:
    scenario: str
    service: str
    environment: str
    steps: list[str] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)
    blockers: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"# Plan: {self.scenario} for {self.service} {self.environment}", "", "## Facts", ""]
        lines += [f"- **{k}**: {v}" for k, v in self.facts.items()]
        lines += ["", "## Steps", ""] + [f"{i}. {s}" for i, s in enumerate(self.steps, 1)]
        lines += ["", "## Blockers", ""] + ([f"- ❌ {b}" for b in self.blockers] or ["- none"])
        return "\n".join(lines)

    def text(self) -> str:
        return self.markdown().replace("**", "")


def _tools_fact(ref: Ref, server_version: int | None, plan: Plan) -> None:
    rt = ref.rt()
    versions = {p: rt.tools.major_version(p) for p in ("pg_dump", "pg_restore", "psql")}
    plan.facts["client tools"] = f"{rt.tools.bin_dir} ({', '.join(f'{k} {v}' for k, v in versions.items())})"
    if server_version and min(versions.values()) < server_version:
        plan.blockers.append(f"client tools {min(versions.values())} are older than the server ({server_version}): "
                             f"install postgresql-client-{server_version}")


#: preflight checks whose failure stops a recovery (the others are facts: a public server has no subnet)
BLOCKING_PREFLIGHT = {"restore point", "admin password"}


def _preflight(ref: Ref, name: str, plan: Plan, *, blocking: set[str]) -> None:
    """The platform's own preflight checks of a server (Azure: subnet, DNS zone, restore point, password)."""
    rt = ref.rt()
    check = getattr(rt.servers, "preflight", None)
    if check is None:
        return
    for what, ok, detail in check(name):
        plan.facts[f"preflight: {what}"] = f"{'ok' if ok else 'FAILED'}: {detail}"
        if not ok and what in blocking:
            plan.blockers.append(f"preflight {what}: {detail}")
    if rt.target.platform == "azure" and not rt.tools.supports_ssl():
        plan.blockers.append(f"the client tools in {rt.tools.bin_dir} have no SSL support, which Azure requires: "
                             "set local.pg_bin_dir to a PostgreSQL client built with SSL (docs/azure.md)")


@dr_task(retries=1)
def plan_data_loss(ref: Ref, restore_time: str | None, zone: str | None) -> Plan:
    """Check everything the data-loss scenario needs, touching nothing."""
    rt = ref.rt()
    t = rt.target
    zone = zone or t.timezone
    plan = Plan("data loss", t.service, t.environment)
    plan.facts["live server / database"] = f"{t.server} / {t.database} ({t.platform})"
    plan.facts["production"] = "yes: every destructive step needs a typed approval" if t.production else "no"
    server_version = None
    try:
        srv = rt.servers.get_server(t.server)
        server_version = srv.version
        plan.facts["server state"] = f"{srv.state}, PostgreSQL {srv.version}"
        if srv.state != "Ready":
            plan.blockers.append(f"the live server {t.server} is {srv.state}; the data-loss scenario needs it running "
                                 "(for a lost server use server-loss)")
        window = rt.servers.get_restore_window(t.server)
        plan.facts["restore window"] = f"{fmt_both(window.earliest, zone)} to {fmt_both(window.latest, zone)}"
        if restore_time:
            try:
                when = parse_restore_time(restore_time, zone)
                check_in_window(when, window.earliest, window.latest, zone)
                plan.facts["restore to"] = fmt_both(when, zone)
                from flows.ptr import ptr_server_name

                plan.facts["new PTR server"] = ptr_server_name(t.server, when)
            except DrError as exc:
                plan.blockers.append(f"restore time: {exc}")
        else:
            plan.facts["restore to"] = "asked for during the run (a form in the Prefect UI)"
        _preflight(ref, t.server, plan, blocking=BLOCKING_PREFLIGHT)
    except DrError as exc:
        plan.blockers.append(f"live server: {exc}")
    try:
        _tools_fact(ref, server_version, plan)
    except DrError as exc:
        plan.blockers.append(str(exc))
    plan.facts["backup store"] = repr(rt.store)
    plan.steps = [
        "stop the app at once (web and worker to 0, counts recorded) and show the maintenance page",
        f"safety backup of the flawed {t.database} to the store (kind pre-restore-safety), kept for reconciliation",
        "take the restore time (UK time; refused if ambiguous, skipped, in the future or outside the window)",
        f"point-in-time restore of {t.server} onto a NEW server",
        "back up the PTR server's database to the store (kind ptr)",
        f"APPROVAL: restore that backup into {t.server}/{t.database} (row counts live vs PTR shown)",
        f"restore into a new database, verify checksum + manifest, swap atomically (old kept as {t.database}_replaced_…)",
        "restart the app (recorded replicas) behind the maintenance page",
        "validate on the temporary URL (healthcheck + data checks)",
        "APPROVAL: disable maintenance",
        "delete the PTR server" + (" (after approval)" if t.production else ""),
        "post-incident report",
    ]
    return plan


@dr_task(retries=1)
def plan_server_loss(ref: Ref, backup: str | None) -> Plan:
    """Check everything the server-loss scenario needs, touching nothing."""
    from dr.restore import latest_complete_backup

    rt = ref.rt()
    t = rt.target
    plan = Plan("server loss", t.service, t.environment)
    plan.facts["server / database"] = f"{t.server} / {t.database} ({t.platform})"
    server_version = None
    exists = rt.servers.server_exists(t.server)
    if exists:
        srv = rt.servers.get_server(t.server)
        server_version = srv.version
        plan.facts["server state"] = f"{srv.state}, PostgreSQL {srv.version}"
    else:
        plan.facts["server state"] = "missing"
    dropped = [d for d in rt.servers.list_dropped_servers() if d.name == t.server]
    plan.facts["revivable"] = (f"yes, dropped {dropped[0].dropped_at:%Y-%m-%d %H:%M} UTC, until "
                               f"{dropped[0].revivable_until:%Y-%m-%d %H:%M} UTC" if dropped else "no")
    if rt.servers.supports_geo_restore and t.geo_restore:
        from tasks.servers import geo_server_name

        refusals = rt.servers.geo_restore_refusals(t.server, location=t.geo_restore.location,
                                                   delegated_subnet_resource_id=t.geo_restore.delegated_subnet_resource_id,
                                                   private_dns_zone_arm_resource_id=t.geo_restore.private_dns_zone_arm_resource_id
                                                   ) if exists or dropped else []
        plan.facts["geo-restore (region outage)"] = ("NOT possible: " + "; ".join(refusals) if refusals else
                                                     f"available: recovery=geo-restore makes "
                                                     f"{geo_server_name(t.server, t.geo_restore.server)} in "
                                                     f"{t.geo_restore.location}")
    elif rt.servers.supports_geo_restore:
        plan.facts["geo-restore (region outage)"] = "not configured (geo_restore = { location = ... })"
    try:
        info = rt.store.get_backup(backup) if backup else latest_complete_backup(rt.store, kinds=("nightly",))
        at = info.finished_at or info.created_at
        age_h = (datetime.now(timezone.utc) - at).total_seconds() / 3600
        plan.facts["backup to restore"] = (f"{info.name}, {info.size} bytes, {age_h:.1f} h old, "
                                           f"checksum {'recorded' if info.sha256 else 'NOT recorded (foreign backup)'}")
        if age_h * 60 > t.rpo_minutes:
            plan.blockers.append(f"the newest complete backup is {age_h:.1f} h old, over the RPO objective "
                                 f"of {t.rpo_minutes / 60:.1f} h")
    except DrError as exc:
        if not dropped:
            plan.blockers.append(f"no way back: not revivable, and {exc}")
        plan.facts["backup to restore"] = f"none ({exc})"
    try:
        _tools_fact(ref, server_version, plan)
        _preflight(ref, t.server, plan, blocking={"admin password"} if not exists else set())
    except DrError as exc:
        plan.blockers.append(str(exc))
    plan.steps = [
        "show the maintenance page",
        ("REVIVE the dropped server (all data kept)" if dropped else "RECREATE the server (same name and settings)")
        + (" — or recreate, if the operator chooses" if dropped else ""),
        "(recreate only) restore the newest complete nightly backup: new database, checksum + manifest verified",
        "validate (healthcheck + data checks)",
        "APPROVAL: disable maintenance",
        "post-incident report",
    ]
    return plan


def publish_plan(plan: Plan) -> None:
    try:
        create_markdown_artifact(key=f"plan-{plan.service}-{plan.environment}", markdown=plan.markdown(),
                                 description=f"plan of {plan.scenario}")
    except Exception:
        pass
