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
    #: the blockers that stop even a scenario that otherwise goes ahead despite its blockers: the
    #: backup cannot be restored into the target (extensions, versions, client tools), or no snapshot
    refusals: list[str] = field(default_factory=list)

    def refuse(self, reason: str) -> None:
        self.blockers.append(reason)
        self.refusals.append(reason)

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


def _fit(ref: Ref, plan: Plan, needs, support, *, fmt: str, backup: str) -> None:
    """What the backup needs against what the target offers: facts, and a refusal per problem."""
    from dr.pginstall import client_tools
    from dr.preflight import check_fit

    rt = ref.rt()
    # the client tools that will serve the target (a server still to be made: those of its version)
    tools = client_tools(rt.config, rt.target, server_version=support.version)
    plan.facts["backup needs"] = needs.describe()
    offers = support.description or f"PostgreSQL {support.version}"
    if support.available is not None:
        offers += f"; {len(support.available)} extensions available"
    if support.allow_list is not None:
        offers += f"; allow-listed: {', '.join(sorted(support.allow_list)) or 'none'}"
    plan.facts["target offers"] = offers
    fit = check_fit(needs, support, tools, fmt=fmt, backup=backup)
    for note in fit.notes:
        plan.facts.setdefault("note", note)
    for problem in fit.problems:
        plan.refuse(problem)
    if not fit.problems:
        plan.facts["fits"] = f"yes: every extension ({', '.join(sorted(needs.extensions)) or 'none'}) and version checked"


def _backup_fit(ref: Ref, plan: Plan, info, support) -> None:
    from dr.backup import format_of
    from dr.preflight import needs_of_backup

    rt = ref.rt()
    _fit(ref, plan, needs_of_backup(rt.store, info), support, fmt=format_of(info), backup=info.name)


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


def _live_database_fit(ref: Ref, plan: Plan, version: int) -> None:
    """The PTR server's backup is restored into the live server: can the live server take its extensions?"""
    from dr.catalog import database_extensions, server_version_text
    from dr.preflight import BackupNeeds

    rt = ref.rt()
    t = rt.target
    needs = BackupNeeds(extensions=database_extensions(rt.servers.connection(t.server, t.database)), server_major=version,
                        server_version=server_version_text(rt.servers.connection(t.server, "postgres")),
                        dumped_by=rt.tools.major_version("pg_dump"),
                        read_from=f"the live database {t.database}, which the PTR server's backup will hold too")
    _fit(ref, plan, needs, rt.servers.get_extension_support(t.server), fmt="custom-zstd",
         backup="the PTR server's backup")


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
        if srv.state == "Ready":
            _live_database_fit(ref, plan, srv.version)
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
def plan_server_loss(ref: Ref, backup: str | None, without_snapshot: bool = False, recovery: str = "auto") -> Plan:
    """Check everything the server-loss scenario needs, touching nothing."""
    from dr.preflight import describe_snapshot, latest_server_snapshot
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
    snapshot = None
    try:
        found = latest_server_snapshot(rt.store, t.server)
        if found:
            snapshot = found[0]
            plan.facts.update(describe_snapshot(found[0], found[1].name))
        elif exists:
            plan.facts["server snapshot"] = "none in the store (the next backup of the server records one)"
        elif without_snapshot:
            plan.facts["server snapshot"] = ("none: recreating WITHOUT one, as asked: the platform's defaults "
                                             "(version, size, no parameters)")
        else:
            reason = (f"no snapshot of server {t.server} in the store, so a recreate cannot know its version, size, "
                      "network and parameters (every backup dr takes of the server records one); recreate it by hand "
                      "with its settings, or choose to recreate it with the platform's defaults (--without-snapshot)")
            if dropped and recovery != "recreate":
                plan.facts["server snapshot"] = f"none: a recreate would be refused ({reason})"
            else:
                plan.refuse(reason)
    except DrError as exc:
        plan.blockers.append(f"server snapshots: {exc}")
    try:
        info = rt.store.get_backup(backup) if backup else latest_complete_backup(rt.store, kinds=("nightly",))
        at = info.finished_at or info.created_at
        age_h = (datetime.now(timezone.utc) - at).total_seconds() / 3600
        plan.facts["backup to restore"] = (f"{info.name}, {info.size} bytes, {age_h:.1f} h old, "
                                           f"checksum {'recorded' if info.sha256 else 'NOT recorded (foreign backup)'}")
        if age_h * 60 > t.rpo_minutes:
            plan.blockers.append(f"the newest complete backup is {age_h:.1f} h old, over the RPO objective "
                                 f"of {t.rpo_minutes / 60:.1f} h")
        if not dropped or exists or recovery == "recreate":  # restored into the server as it is, or as the snapshot makes it
            support = (rt.servers.get_extension_support(t.server) if exists and srv.state == "Ready"
                       else rt.servers.expected_extension_support(snapshot) if snapshot is not None else None)
            if support is not None:
                try:
                    _backup_fit(ref, plan, info, support)
                except DrError as exc:  # the backup cannot even be read: it cannot be restored either
                    plan.refuse(f"backup {info.name}: {exc}")
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
        ("REVIVE the dropped server (all data kept)" if dropped else
         "RECREATE the server from its snapshot (version, size, network)" if snapshot else
         "RECREATE the server (same name, the platform's defaults)")
        + (" — or recreate, if the operator chooses" if dropped else ""),
        "(recreate only) apply the snapshot's parameters and wait for any restart they need",
        "(recreate only) restore the newest complete nightly backup: new database, checksum + manifest verified",
        "validate (healthcheck + data checks)",
        "APPROVAL: disable maintenance",
        "post-incident report",
    ]
    return plan


@dr_task(retries=1)
def plan_restore(ref: Ref, backup: str | None, server: str | None = None, database: str | None = None,
                 kinds: tuple[str, ...] | None = None, safety_backup: bool = True) -> Plan:
    """Check everything a restore of a backup into a database needs, touching nothing."""
    from dr.database import database_exists
    from dr.restore import latest_complete_backup

    rt = ref.rt()
    t = rt.target
    server, database = server or t.server, database or t.database
    plan = Plan("restore", t.service, t.environment)
    plan.facts["target server / database"] = f"{server} / {database} ({t.platform})"
    live = False
    try:
        srv = rt.servers.get_server(server)
        plan.facts["server state"] = f"{srv.state}, PostgreSQL {srv.version}"
        if srv.state != "Ready":
            plan.blockers.append(f"server {server} is {srv.state}; a restore needs it running")
        else:
            live = database_exists(rt.servers.connection(server, "postgres"), database)
    except DrError as exc:
        plan.blockers.append(f"target server: {exc}")
        srv = None
    try:
        info = rt.store.get_backup(backup) if backup else latest_complete_backup(rt.store, kinds=kinds)
        at = info.finished_at or info.created_at
        age_h = (datetime.now(timezone.utc) - at).total_seconds() / 3600
        plan.facts["backup"] = (f"{info.name} ({info.format if info.format != 'unknown' else 'by its name'}), "
                                f"{info.size} bytes, {age_h:.1f} h old, checksum "
                                f"{'recorded' if info.sha256 else 'NOT recorded (made by other tooling)'}")
        if not info.complete:
            plan.blockers.append(f"backup {info.name} is incomplete")
        if srv is not None and srv.state == "Ready":
            _backup_fit(ref, plan, info, rt.servers.get_extension_support(server))
    except DrError as exc:
        plan.blockers.append(f"backup: {exc}")
    try:
        _tools_fact(ref, srv.version if srv else None, plan)
    except DrError as exc:
        plan.blockers.append(str(exc))
    plan.steps = (
        ([f"safety backup of the live {database} to the store (kind pre-restore-safety)"] if live and safety_backup
         else [])
        + [f"restore into a NEW database on {server}; the live {database} is untouched meanwhile",
           "verify the checksum recorded at backup time and the row-count manifest",
           f"swap atomically: the restored copy becomes {database}"
           + (f", the previous one is kept as {database}_replaced_…" if live else "")]
    )
    return plan


def publish_plan(plan: Plan) -> None:
    try:
        create_markdown_artifact(key=f"plan-{plan.service}-{plan.environment}", markdown=plan.markdown(),
                                 description=f"plan of {plan.scenario}")
    except Exception:
        pass
