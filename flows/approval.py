"""Human gates: the flow pauses and the Prefect UI shows a form; `dr approve` / `dr reject` answer it.

Every decision is recorded (who, why, what exactly, when). For production, approving
needs the environment's name typed in; `auto_approve` is refused for production before
anything is touched. A gate nobody answers in time fails safe: nothing destructive is
done, the run ends Failed (not stuck Paused), people are told, and the message says how
to resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from dr.errors import ApprovalRefused, ApprovalTimedOut, InvalidInput, InvalidRestoreTime
from dr.runtime import Ref
from dr.timeparse import fmt_both, parse_restore_time
from flows.common import Timeline, run_logger
from tasks.notifications import flow_run_link, notify

MAX_ASKS = 5


class Approval(RunInput):
    """Approve or reject the step described in the run's logs and artifacts."""

    approve: bool = Field(False, description="Tick to approve; leave unticked to reject")
    approver: str = Field(..., min_length=2, max_length=80, description="Your name")
    reason: str = Field("", max_length=500, description="Why")
    confirm_environment: str = Field("", max_length=40, description="Production only: type the environment name")


class RestoreTimeInput(RunInput):
    """The time to restore to: a time BEFORE the data was lost or corrupted."""

    restore_time: str = Field(..., description="YYYY-MM-DD HH:MM[:SS], UK time unless you add an offset (Z, +01:00)")
    timezone_name: str = Field("Europe/London", description="Zone of a time typed without offset")
    approver: str = Field(..., min_length=2, max_length=80, description="Your name")


class RecoveryChoice(RunInput):
    """How to bring back a lost server."""

    choice: Literal["revive", "recreate"] = Field(
        "revive", description="revive: the dropped server with all its data; recreate: empty server + nightly backup")
    approver: str = Field(..., min_length=2, max_length=80, description="Your name")
    reason: str = Field("", max_length=500)


@dataclass(frozen=True)
class Decision:
    gate: str
    approved: bool
    approver: str
    reason: str
    what: str
    at: datetime
    auto: bool = False

    def line(self) -> str:
        verdict = "approved" if self.approved else "REJECTED"
        how = " automatically (drill)" if self.auto else ""
        return (f"{self.gate}: {verdict}{how} by {self.approver} at {self.at:%Y-%m-%d %H:%M:%S} UTC"
                f" — {self.what}" + (f" — reason: {self.reason}" if self.reason else ""))


def check_auto_approve(ref: Ref, auto_approve: bool) -> None:
    """Refuse `auto_approve` for production, before anything is touched."""
    if auto_approve and ref.rt().target.production:
        raise ApprovalRefused(f"auto_approve is refused for production ({ref.service} {ref.environment}): "
                              "a person must approve each destructive step")


def _key(text: str) -> str:
    """Pause keys may hold lowercase letters, digits and dashes only."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _poll() -> int:
    return int(os.environ.get("DR_PAUSE_POLL_SECONDS", "10"))


def _timeout_error(ref: Ref, gate: str, minutes: int, resume: str) -> ApprovalTimedOut:
    notify(ref, "approval timed out", f"nobody answered '{gate}' within {minutes} min; nothing destructive was done")
    return ApprovalTimedOut(f"nobody answered the approval '{gate}' within {minutes} minutes",
                            world_state="nothing destructive was done at this gate", resume_hint=resume)


def approve(ref: Ref, timeline: Timeline, *, gate: str, what: str, auto_approve: bool, timeout_minutes: int,
            resume: str) -> Decision:
    """Ask a person to approve `what`; returns the decision or raises `ApprovalRefused`.

    Args:
        gate: short name of the gate, shown in the timeline.
        what: exactly what is approved (targets, backup, times), shown and recorded.
        auto_approve: approve without asking (refused for production by `check_auto_approve`).
        timeout_minutes: how long to wait for a person.
        resume: the command that continues the incident, for the timeout message.
    """
    log = run_logger()
    production = ref.rt().target.production
    if auto_approve:
        d = Decision(gate, True, "auto-approve", "non-production drill", what, datetime.now(timezone.utc), auto=True)
        timeline.record(f"approval: {gate}", "approved (auto)", what)
        return d
    link = flow_run_link()
    notify(ref, f"approval needed: {gate}", what + ("\nType the environment name to approve." if production else ""), link)
    for attempt in range(1, MAX_ASKS + 1):
        log.warning("APPROVAL NEEDED (%s): %s — answer in the Prefect UI or with `dr approve%s` / `dr reject --reason …` "
                    "(`dr pending` lists what waits)", gate, what,
                    f" --confirm-environment {ref.environment}" if production else "")
        try:
            form = Approval.with_initial_data(
                description=f"**{gate}**\n\n{what}" + (f"\n\nType `{ref.environment}` to approve." if production else ""))
            answer = pause_flow_run(wait_for_input=form, timeout=timeout_minutes * 60, poll_interval=_poll(),
                                    key=_key(f"{gate}-{attempt}"))
        except FlowPauseTimeout as exc:
            timeline.record(f"approval: {gate}", "TIMED OUT", what)
            raise _timeout_error(ref, gate, timeout_minutes, resume) from exc
        if answer.approve and production and answer.confirm_environment.strip() != ref.environment:
            log.warning("approval of %s needs the environment name typed exactly (%r); asking again", gate, ref.environment)
            timeline.record(f"approval: {gate}", "not accepted", f"{answer.approver} did not type '{ref.environment}'")
            continue
        d = Decision(gate, answer.approve, answer.approver, answer.reason, what, datetime.now(timezone.utc))
        timeline.record(f"approval: {gate}", "approved" if d.approved else "REJECTED", d.line())
        if not d.approved:
            notify(ref, f"rejected: {gate}", d.line())
            raise ApprovalRefused(f"{answer.approver} rejected '{gate}'" + (f": {answer.reason}" if answer.reason else ""),
                                  world_state="nothing destructive was done at this gate", resume_hint=resume)
        return d
    raise ApprovalRefused(f"'{gate}' was not approved with the environment name typed after {MAX_ASKS} answers",
                          world_state="nothing destructive was done at this gate", resume_hint=resume)


def ask_restore_time(ref: Ref, timeline: Timeline, *, timeout_minutes: int, resume: str,
                     check=None) -> tuple[datetime, str, str]:
    """Ask for the restore time with a form; re-ask (do not fail) while it is unclear or outside the window.

    Returns:
        (UTC time, the text as typed, who typed it).
    """
    log = run_logger()
    notify(ref, "restore time needed", "enter the time BEFORE the data was lost (UK time)", flow_run_link())
    for attempt in range(1, MAX_ASKS + 1):
        try:
            answer = pause_flow_run(wait_for_input=RestoreTimeInput, timeout=timeout_minutes * 60,
                                    poll_interval=_poll(), key=f"restore-time-{attempt}")
        except FlowPauseTimeout as exc:
            timeline.record("input: restore time", "TIMED OUT")
            raise _timeout_error(ref, "restore time", timeout_minutes, resume) from exc
        try:
            when = parse_restore_time(answer.restore_time, answer.timezone_name)
            if check:
                check(when)
        except (InvalidRestoreTime, InvalidInput) as exc:
            log.warning("restore time %r refused (%s); asking again", answer.restore_time, exc)
            timeline.record("input: restore time", "refused, asked again", f"{answer.restore_time!r}: {exc}")
            continue
        timeline.record("input: restore time", "given",
                        f"{answer.restore_time!r} ({answer.timezone_name}) = {fmt_both(when, answer.timezone_name)} by {answer.approver}")
        return when, answer.restore_time, answer.approver
    raise InvalidRestoreTime(f"no usable restore time after {MAX_ASKS} answers", resume_hint=resume)


def ask_recovery_choice(ref: Ref, timeline: Timeline, *, what: str, timeout_minutes: int, resume: str) -> str:
    """Ask whether to revive the dropped server or recreate it from the nightly backup."""
    notify(ref, "choice needed: revive or recreate", what, flow_run_link())
    try:
        answer = pause_flow_run(wait_for_input=RecoveryChoice, timeout=timeout_minutes * 60, poll_interval=_poll(),
                                key="recovery-choice")
    except FlowPauseTimeout as exc:
        timeline.record("choice: revive or recreate", "TIMED OUT")
        raise _timeout_error(ref, "revive or recreate", timeout_minutes, resume) from exc
    timeline.record("choice: revive or recreate", answer.choice, f"by {answer.approver}: {answer.reason}")
    return answer.choice


def check_approval_timeout(minutes: int | None) -> None:
    """Refuse a gate timeout that would time out (or fall back to the default) unasked, before anything."""
    if minutes is not None and minutes < 1:
        raise InvalidInput(f"approval_timeout_minutes must be 1 or more, not {minutes}",
                           world_state="nothing was changed")
