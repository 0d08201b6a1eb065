"""What every flow shares: the per-environment recovery lock and the step timeline."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator
from zoneinfo import ZoneInfo

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from dr.errors import DrError
from dr.runtime import Ref


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("dr.flows")


def _ensure_limit(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass


@contextlib.contextmanager
def recovery_lock(ref: Ref, *, wait_seconds: float | None = None) -> Iterator[None]:
    """Hold the one slot of `dr-<service>-<env>`: one recovery per environment at a time.

    A second recovery of the same environment waits (up to `wait_seconds`, forever if None);
    other environments run in parallel. The slot is leased, so a crashed run frees it.
    """
    from prefect.concurrency.sync import concurrency

    name = f"dr-{ref.service}-{ref.environment}"
    _ensure_limit(name)
    run_logger().info("waiting for the recovery slot %s", name)
    with concurrency(name, occupy=1, timeout_seconds=wait_seconds, strict=True, lease_duration=120):
        run_logger().info("holding the recovery slot %s", name)
        yield


@dataclass
class Event:
    step: str
    started: datetime
    ended: datetime | None = None
    outcome: str = "running"
    detail: str = ""


@dataclass
class Timeline:
    """Every step's start, end and outcome, in UTC and UK time, published as a markdown artifact."""

    title: str
    key: str
    zone: str = "Europe/London"
    events: list[Event] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def _fmt(self, t: datetime | None) -> str:
        if t is None:
            return ""
        return f"{t:%H:%M:%S} UTC / {t.astimezone(ZoneInfo(self.zone)):%H:%M:%S %Z}"

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Event]:
        ev = Event(name, datetime.now(timezone.utc))
        self.events.append(ev)
        run_logger().info("step: %s", name)
        try:
            yield ev
        except BaseException as exc:
            ev.ended, ev.outcome = datetime.now(timezone.utc), "FAILED"
            ev.detail = ev.detail or (str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
            if isinstance(exc, DrError):
                exc.annotate(step=name)
            self.publish()
            raise
        ev.ended = datetime.now(timezone.utc)
        if ev.outcome == "running":
            ev.outcome = "done"
        self.publish()

    def record(self, name: str, outcome: str, detail: str = "") -> None:
        now = datetime.now(timezone.utc)
        self.events.append(Event(name, now, now, outcome, detail))
        self.publish()

    def markdown(self) -> str:
        lines = [f"# {self.title}", "", "| step | started | ended | outcome | detail |", "|---|---|---|---|---|"]
        for e in self.events:
            detail = e.detail.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {e.step} | {self._fmt(e.started)} | {self._fmt(e.ended)} | {e.outcome} | {detail} |")
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines)

    def publish(self) -> None:
        try:
            create_markdown_artifact(key=self.key, markdown=self.markdown(), description=self.title)
        except Exception:  # outside a run (plain function call): the log has it
            pass

    def as_dict(self) -> list[dict[str, Any]]:
        return [{"step": e.step, "started": e.started.isoformat(), "ended": e.ended.isoformat() if e.ended else None,
                 "outcome": e.outcome, "detail": e.detail} for e in self.events]


def validate_step(ref: Ref, timeline: "Timeline") -> datetime:
    """The runbook's "validate app" step: run the checks, fail the flow if a required one fails.

    Returns:
        When the service was validated (the end of the RTO clock).
    """
    from dr.errors import ValidationFailed
    from tasks.validation import run_service_checks

    with timeline.step("validate") as ev:
        results = run_service_checks(ref)
        failed = [r.name for r in results if r.required and not r.passed]
        ev.detail = ", ".join(f"{r.name} {'PASS' if r.passed else 'FAIL'}" for r in results)
        if failed:
            raise ValidationFailed(f"required checks failed: {', '.join(failed)}", failed=failed)
    return datetime.now(timezone.utc)
