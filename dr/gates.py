"""The gates waiting for a person: every paused run, what it asks, since when, and how to answer it.

A gate is a Prefect pause with a form (flows/approval.py): the Paused state names its pause
key, its timeout and the run-input keyset under which the flow saved the form's schema and
description (the exact text the gate shows: what will be done). Everything here is read
from the Prefect API, so a gate of a CLI run, a deployment run or an alert's run is listed
alike, on whichever server the command uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from dr.errors import InvalidInput

#: which command answers which form (the form's class name is the schema's title)
ANSWERS = {
    "Approval": "approve",
    "RestoreTimeInput": "answer-time",
    "RecoveryChoice": "choose",
}


@dataclass
class Gate:
    """One paused run waiting for a person."""

    run_id: str
    run_name: str
    flow: str
    service: str
    environment: str
    incident: str
    gate: str
    form: str
    text: str
    paused_at: Optional[datetime]
    timeout_at: Optional[datetime]

    @property
    def confirm_environment(self) -> Optional[str]:
        """The environment name a production approval needs typed (the gate's text asks for it)."""
        m = re.search(r"Type `([a-z]+)` to approve", self.text)
        return m.group(1) if m else None

    def waited(self, now: Optional[datetime] = None) -> str:
        if not self.paused_at:
            return "?"
        return human_duration(((now or datetime.now(timezone.utc)) - self.paused_at).total_seconds())

    def times_out(self, now: Optional[datetime] = None) -> str:
        if not self.timeout_at:
            return "never"
        left = (self.timeout_at - (now or datetime.now(timezone.utc))).total_seconds()
        return (f"in {human_duration(left)} ({self.timeout_at:%Y-%m-%d %H:%M} UTC)" if left > 0
                else f"now (was due {self.timeout_at:%H:%M} UTC)")

    def commands(self, ref: Optional[str] = None) -> list[str]:
        """The commands that answer this gate (`ref` names the run; default its name)."""
        ref = ref or self.run_name
        verb = ANSWERS.get(self.form)
        if verb == "approve":
            confirm = f" --confirm-environment {self.confirm_environment}" if self.confirm_environment else ""
            return [f"dr approve {ref}{confirm}", f"dr reject {ref} --reason WHY"]
        if verb == "answer-time":
            return [f"dr answer-time {ref} --time 'YYYY-MM-DD HH:MM'"]
        if verb == "choose":
            return [f"dr choose {ref} revive", f"dr choose {ref} recreate"]
        return [f"the form in the Prefect UI (flow run {self.run_name})"]


def human_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{hours // 24} d {hours % 24} h"


def _gate_name(pause_key: str, text: str) -> str:
    m = re.match(r"\*\*(.+?)\*\*", text.strip())
    if m:
        return m.group(1)
    key = re.sub(r"-\d+$", "", pause_key or "")
    return {"recovery-choice": "revive or recreate"}.get(key, key.replace("-", " ") or "pause")


def _when(text: Optional[str]) -> Optional[datetime]:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def gate_of(api: Any, run: dict[str, Any]) -> Gate:
    """What a paused run asks for, read from its state and its saved form (`api`: `dr.prefect_api.Api`)."""
    state = run.get("state") or {}
    details = state.get("state_details") or {}
    keyset = details.get("run_input_keyset") or {}
    schema = api.run_input(run["id"], keyset.get("schema")) or {}
    description = api.run_input(run["id"], keyset.get("description"))
    if not isinstance(schema, dict):
        schema = {}
    text = description if isinstance(description, str) else schema.get("description") or ""
    params = run.get("parameters") or {}
    return Gate(
        run_id=str(run["id"]), run_name=run.get("name", "?"), flow=api.flow_name(run["flow_id"]),
        service=str(params.get("service", "?")), environment=str(params.get("environment", "?")),
        incident=str(params.get("incident") or ""),
        gate=_gate_name(details.get("pause_key") or "", text),
        form=schema.get("title") or "?",
        text=text,
        paused_at=_when(state.get("timestamp")),
        timeout_at=_when(details.get("pause_timeout")),
    )


def list_pending(api: Any) -> list[Gate]:
    """Every run in a Paused state, oldest pause first."""
    gates = [gate_of(api, run) for run in api.flow_runs(states=("PAUSED",))]
    far = datetime.max.replace(tzinfo=timezone.utc)
    return sorted(gates, key=lambda g: g.paused_at or far)


def find_run(api: Any, ref: str) -> dict[str, Any]:
    """A flow run by its id or its name (names are what the UI and `dr pending` show).

    Raises:
        InvalidInput: no such run, or the name is shared by several runs.
    """
    from uuid import UUID

    try:
        UUID(ref)
    except ValueError:
        runs = api.flow_runs(names=[ref], limit=5)
        if not runs:
            raise InvalidInput(f"no flow run is named {ref!r} on this Prefect server ({api.api_url}); `dr pending` "
                               "lists the runs waiting for an answer", world_state="nothing was changed")
        if len(runs) == 1:
            return runs[0]
        # names are random and may repeat over a long history: the one still running or paused is meant
        live = [r for r in runs if (r.get("state") or {}).get("type") in ("RUNNING", "PAUSED", "CANCELLING")]
        if len(live) == 1:
            return live[0]
        raise InvalidInput(f"several flow runs are named {ref!r}: use the id ({', '.join(r['id'] for r in runs)})",
                           world_state="nothing was changed")
    run = api.flow_run(ref)
    if run is None:
        raise InvalidInput(f"no flow run {ref} on this Prefect server ({api.api_url})", world_state="nothing was changed")
    return run


def pick_gate(api: Any, ref: Optional[str], forms: tuple[str, ...]) -> Gate:
    """The gate to answer: the named run's, or the only pending one of these forms.

    Raises:
        InvalidInput: the run is not waiting for this kind of answer, none is, or several are
            (the message lists them).
    """
    if ref:
        run = find_run(api, ref)
        state = run.get("state") or {}
        if state.get("type") != "PAUSED":
            raise InvalidInput(f"flow run {run.get('name')} ({run['id']}) is {state.get('name', 'without a state')}, "
                               "not waiting for an answer", world_state="nothing was changed")
        gate = gate_of(api, run)
        if gate.form not in forms:
            raise InvalidInput(f"flow run {gate.run_name} waits for something else ({gate.gate}): answer it with "
                               + " or ".join(f"`{c}`" for c in gate.commands()), world_state="nothing was changed")
        return gate
    gates = [g for g in list_pending(api) if g.form in forms]
    if len(gates) == 1:
        return gates[0]
    if not gates:
        raise InvalidInput("no run is waiting for this answer (`dr pending` lists what waits)",
                           world_state="nothing was changed")
    listing = "; ".join(f"{g.service} {g.environment} '{g.gate}' in run {g.run_name}" for g in gates)
    raise InvalidInput(f"{len(gates)} runs are waiting for this answer: name one ({listing})",
                       world_state="nothing was changed")
