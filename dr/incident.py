"""The incident record a scenario keeps as it goes, and the post-incident report made from it."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

from dr.errors import InvalidInput

INCIDENT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{2,39}$")


def new_incident_id(now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return f"inc-{now:%Y%m%d-%H%M}-{secrets.token_hex(2)}"


def check_incident_id(incident: str) -> str:
    if not isinstance(incident, str) or not INCIDENT_ID.fullmatch(incident):
        raise InvalidInput(f"incident id {incident!r} must be 3-40 lowercase letters, digits and '-' "
                           "(it names backups and servers)")
    return incident


@dataclass
class IncidentRecord:
    incident: str
    scenario: str
    service: str
    environment: str
    zone: str
    started: datetime
    validated: datetime | None = None
    ended: datetime | None = None
    outcome: str = "in progress"
    restore_target: datetime | None = None
    last_backup: datetime | None = None
    backups_created: list[str] = field(default_factory=list)
    servers_created: list[str] = field(default_factory=list)
    servers_deleted: list[str] = field(default_factory=list)
    left_to_tidy: list[str] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    #: extra markdown sections (e.g. table-level recovery's "what this changes"), after the summary
    sections: list[str] = field(default_factory=list)
    #: the command that re-applies discarded writes, when a reconciliation pack was stored
    reconcile_command: str | None = None

    @property
    def rto_seconds(self) -> float | None:
        """Start of the recovery → service validated."""
        return (self.validated - self.started).total_seconds() if self.validated else None

    @property
    def rpo_seconds(self) -> float | None:
        """Data lost: incident start − restore target (PTR), or − the backup restored (server loss)."""
        ref = self.restore_target or self.last_backup
        damage = self.facts.get("damage_at") or self.started
        return (damage - ref).total_seconds() if ref else None

    def _t(self, t: datetime | None) -> str:
        if t is None:
            return "—"
        return f"{t:%Y-%m-%d %H:%M:%S} UTC ({t.astimezone(ZoneInfo(self.zone)):%H:%M:%S %Z})"

    def to_markdown(self, timeline_md: str) -> str:
        def dur(s: float | None) -> str:
            return "—" if s is None else f"{s / 60:.1f} min ({s:.0f} s)"

        lines = [
            f"# Post-incident report: {self.incident}",
            "",
            f"**{self.scenario}** on **{self.service} {self.environment}** — outcome: **{self.outcome}**",
            "",
            "| | |",
            "|---|---|",
            f"| started | {self._t(self.started)} |",
            f"| service validated | {self._t(self.validated)} |",
            f"| ended | {self._t(self.ended)} |",
            f"| RTO (start → validated) | {dur(self.rto_seconds)} |",
            f"| restored to | {self._t(self.restore_target or self.last_backup)} |",
            f"| RPO (data lost) | {dur(self.rpo_seconds)} |",
        ]
        for k, v in self.facts.items():
            if k != "damage_at":
                lines.append(f"| {k} | {v} |")
        for section in self.sections:
            lines += ["", section]
        lines += ["", "## What was created", ""]
        lines += [f"- backup `{b}`" for b in self.backups_created] or ["- no backups"]
        lines += [f"- server `{s}`" for s in self.servers_created]
        if self.servers_deleted:
            lines += ["", "## Deleted during tidy-up", ""] + [f"- server `{s}`" for s in self.servers_deleted]
        lines += ["", "## Left to tidy up", ""]
        lines += [f"- {x}" for x in self.left_to_tidy] or ["- nothing"]
        lines += ["", "## Decisions", ""] + ([f"- {d}" for d in self.decisions] or ["- none"])
        lines += ["", "## Timeline", "", timeline_md.split("\n", 2)[-1] if timeline_md else ""]
        lines += [
            "", "## Post-incident review", "",
            f"- [ ] Schedule the incident retro with all stakeholders (incident {self.incident}, "
            f"{self.service} {self.environment}, started {self._t(self.started)})",
            f"- [ ] Fill in the incident report (RTO {dur(self.rto_seconds)}, RPO {dur(self.rpo_seconds)}; "
            "this report holds the timeline and decisions)",
            "- [ ] Raise improvement actions for anything that slowed the recovery",
        ]
        if self.left_to_tidy:
            lines.append(f"- [ ] Tidy up: `dr tidy-up --service {self.service} --env {self.environment} "
                         f"--incident {self.incident} --no-dry-run`")
        if self.backups_created:
            safety = [b for b in self.backups_created if "pre-restore-safety" in b]
            if self.reconcile_command:
                lines.append(f"- [ ] Reconcile the writes made after the restore point that the recovery discarded: "
                             f"`{self.reconcile_command}` (the pack lists them; the flawed data is also in `{safety[0]}`)"
                             if safety else f"- [ ] Reconcile: `{self.reconcile_command}`")
            elif safety:
                lines.append(f"- [ ] Reconcile data entered after the restore point from `{safety[0]}`")
        return "\n".join(lines) + "\n"
