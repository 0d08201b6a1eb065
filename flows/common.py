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


#: the flows that hold an environment's recovery slot (see `recovery_lock`)
RECOVERY_FLOWS = ("data-loss", "server-loss", "restore-database", "reconcile")
#: how often a waiting recovery says who holds the slot
SLOT_REPORT_SECONDS = 30.0
#: the slot's lease: a run that dies without releasing it holds it this long (on a server whose services run)
SLOT_LEASE_SECONDS = 120


def _check_names(ref: Ref) -> None:
    """Refuse a service or environment that no configuration can hold, before it names anything."""
    import re

    from dr.config import ENVIRONMENTS, SERVICE_NAME
    from dr.errors import ConfigError

    if not isinstance(ref.service, str) or not re.fullmatch(SERVICE_NAME, ref.service):
        raise ConfigError(f"unknown service {ref.service!r}: a service name is 2-20 lowercase letters or digits, "
                          "starting with a letter", field="service")
    if ref.environment not in ENVIRONMENTS:
        raise ConfigError(f"unknown environment {ref.environment!r}; accepted: {', '.join(ENVIRONMENTS)}",
                          field="environment")


def recovery_slot_name(ref: Ref) -> str:
    """`dr-<service>-<environment>`: the Prefect global concurrency limit of one environment."""
    return f"dr-{ref.service}-{ref.environment}"


def _this_flow_run_id() -> Any:
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        return ctx.flow_run.id if ctx and ctx.flow_run else None
    except Exception:
        return None


def slot_holders(ref: Ref, *, exclude: Any = None) -> tuple[int | None, list[str]]:
    """The slot's taken count and the recovery runs of this environment that may hold it.

    Prefect (3.9) keeps a global limit's lease holders in the server's lease storage and does
    not expose them for named limits, so the holders are inferred: the Running, Paused or
    Cancelling runs of the recovery flows whose parameters name this service and environment.
    A run whose worker was killed stays Running until something marks it Crashed.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    active: int | None = None
    lines: list[str] = []
    try:
        with get_client(sync_client=True) as client:
            active = client.read_global_concurrency_limit_by_name(recovery_slot_name(ref)).active_slots
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=list(RECOVERY_FLOWS))),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]))),
                limit=200,
            )
            flow_names: dict[Any, str] = {}
            for run in runs:
                params = run.parameters or {}
                if run.id == exclude or params.get("service") != ref.service or params.get("environment") != ref.environment:
                    continue
                if run.flow_id not in flow_names:
                    flow_names[run.flow_id] = client.read_flow(run.flow_id).name
                since = run.state.timestamp if run.state else None
                lines.append(
                    f"{flow_names[run.flow_id]} run '{run.name}' ({run.id}), "
                    f"{run.state.name if run.state else 'unknown state'}"
                    + (f" since {since:%Y-%m-%d %H:%M:%S} UTC" if since else "")
                    + (f", incident {params['incident']}" if params.get("incident") else "")
                )
    except Exception as exc:  # the report is a courtesy: never let it hide the wait itself
        lines.append(f"(could not ask Prefect who holds it: {type(exc).__name__}: {exc})")
    return active, lines


#: how often a waiting recovery looks for a provably dead holder of the slot
DEAD_HOLDER_CHECK_SECONDS = 2.0
#: final runs older than this cannot hold a live lease (it would have expired): not looked at
DEAD_HOLDER_LOOKBACK_SECONDS = 10 * SLOT_LEASE_SECONDS
_FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def _record_holder(client: Any, me: Any, name: str, lease_id: Any) -> None:
    """Label this run with the lease it holds and the process holding it (see dr/holders.py)."""
    from dr.holders import LABEL_LEASE, LABEL_SLOT, this_process

    if me is None:
        return
    try:
        client.update_flow_run_labels(me, {LABEL_SLOT: name, LABEL_LEASE: str(lease_id), **this_process()})
    except Exception as exc:  # without the labels a dead holder is only freed when its lease expires
        logging.getLogger("dr.flows").warning("could not record this run as the holder of %s (%s)", name,
                                              type(exc).__name__)


def free_dead_holders(client: Any, ref: Ref, *, exclude: Any = None) -> list[str]:
    """Free the recovery slot of `ref` from holders that are provably dead; what was freed, for the log.

    A holder is a recovery run of the environment labelled with its slot lease. It is dead when
    its flow run is in a final state, or when it ran on this host and its process is gone (then
    the run is also marked Crashed, as Prefect's zombie automation would). Its lease is released
    by id, so only that holder's slot is given back; a lease already expired is not counted twice.
    """
    from datetime import datetime, timedelta, timezone

    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState, \
        FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    from dr.holders import LABEL_LEASE, LABEL_SLOT, process_gone

    name = recovery_slot_name(ref)
    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=list(RECOVERY_FLOWS))),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[
            StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING, StateType.COMPLETED, StateType.FAILED,
            StateType.CRASHED, StateType.CANCELLED]))),
        limit=200)
    horizon = datetime.now(timezone.utc) - timedelta(seconds=DEAD_HOLDER_LOOKBACK_SECONDS)
    freed = []
    for run in runs:
        labels = dict(run.labels or {})
        lease = labels.get(LABEL_LEASE)
        if run.id == exclude or labels.get(LABEL_SLOT) != name or not lease or run.state is None:
            continue
        state = run.state.type.value
        if state in _FINAL:
            if run.end_time and run.end_time < horizon:
                continue
            why = f"its run ended {run.state.name}"
        else:
            why = process_gone(labels)
            if why is None:
                continue
        # the server answers 204 whether or not the lease still existed: the slot count tells
        before = client.read_global_concurrency_limit_by_name(name).active_slots
        try:
            client.release_concurrency_slots_with_lease(lease)
        finally:
            if state not in _FINAL:
                client.set_flow_run_state(run.id, Crashed(message=f"{why}; its recovery slot {name} was freed by "
                                                                  f"the next recovery of {ref.service} {ref.environment}"),
                                          force=True)
        if client.read_global_concurrency_limit_by_name(name).active_slots >= before:
            continue  # that lease was already gone (released, or expired and repossessed)
        freed.append(f"run '{run.name}' ({run.id}): {why}")
    return freed


class _SlotLease:
    """This run's lease on the recovery slot: taken, kept alive by a thread, given back at the end.

    Prefect's own `concurrency()` would cancel the run when a renewal is refused (`strict`) or
    leave the slot counted as taken for ever after a Prefect server restart (the default lease
    storage is the server's memory, so a restarted server forgets every lease while its database
    still counts the slots). A recovery must never be cancelled half-way for that, so here a
    lost lease is taken again when the slot is free, and otherwise the slot the server still
    counts is given back by name at the end, unless another live recovery of the environment
    may hold it.
    """

    def __init__(self, ref: Ref, name: str, holder: Any, me: Any):
        import threading

        self.ref, self.name, self.holder, self.me = ref, name, holder, me
        self.lease_id: Any = None
        self.lost = False
        self.taken_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_take(self, client: Any) -> bool:
        """Take the slot if it is free now (one request; False when another holds it)."""
        import time
        from uuid import UUID

        import httpx

        try:
            r = client.increment_concurrency_slots_with_lease(
                names=[self.name], slots=1, mode="concurrency", lease_duration=SLOT_LEASE_SECONDS, holder=self.holder)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:
                return False
            raise
        body = r.json()
        if not body.get("limits"):
            raise RuntimeError(f"the concurrency limit {self.name} does not exist")
        self.lease_id, self.lost, self.taken_at = UUID(body["lease_id"]), False, time.monotonic()
        return True

    def start_renewing(self) -> None:
        import contextvars
        import threading

        ctx = contextvars.copy_context()  # the run's Prefect settings (API URL) and run context
        self._thread = threading.Thread(target=ctx.run, args=(self._renew_loop,), daemon=True,
                                        name=f"renew-{self.name}")
        self._thread.start()

    def _renew_loop(self) -> None:
        import httpx
        from prefect.client.orchestration import get_client

        log = logging.getLogger("dr.flows")
        interval, unreachable = SLOT_LEASE_SECONDS * 0.75, False
        with get_client(sync_client=True) as client:
            while not self._stop.wait(5.0 if (unreachable or self.lost) else interval):
                try:
                    if self.lost:
                        if self.try_take(client):
                            _record_holder(client, self.me, self.name, self.lease_id)
                            log.warning("took the recovery slot %s again with a new lease", self.name)
                        continue
                    client.renew_concurrency_lease(self.lease_id, SLOT_LEASE_SECONDS)
                    if unreachable:
                        log.warning("the Prefect server answers again; the recovery slot %s is still held", self.name)
                    unreachable = False
                except httpx.HTTPStatusError as exc:
                    unreachable = False
                    if exc.response.status_code in (404, 410) and not self.lost:
                        self.lost = True
                        log.warning("the Prefect server no longer knows this run's lease on %s (it restarted, or "
                                    "could not be reached for %d s); the recovery goes on, and the slot is given "
                                    "back when it ends", self.name, SLOT_LEASE_SECONDS)
                except Exception as exc:  # the server is away: keep the run going, try again soon
                    if not unreachable:
                        log.warning("could not renew the lease on %s (%s); retrying every 5 s", self.name,
                                    type(exc).__name__)
                    unreachable = True

    def release(self) -> None:
        import time

        from prefect.client.orchestration import get_client

        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        log = run_logger()
        try:
            with get_client(sync_client=True) as client:
                if not self.lost:
                    client.release_concurrency_slots_with_lease(self.lease_id)
                    return
                # the server forgot the lease: give back the slot it still counts, unless a live
                # recovery of this environment may be holding it now
                active, holders = slot_holders(self.ref, exclude=self.me)
                if holders:
                    log.warning("not freeing %s: its lease was lost and it may now be held by %s", self.name,
                                "; ".join(holders))
                elif active:
                    client.release_concurrency_slots(names=[self.name], slots=1,
                                                     occupancy_seconds=time.monotonic() - self.taken_at)
                    log.info("gave back the recovery slot %s, which the Prefect server still counted after "
                             "forgetting this run's lease", self.name)
        except Exception as exc:
            log.warning("could not give back the recovery slot %s (%s); if no recovery is running, free it with "
                        "`prefect gcl update %s --active-slots 0`", self.name, exc, self.name)


@contextlib.contextmanager
def recovery_lock(ref: Ref, *, wait_seconds: float | None = None) -> Iterator[None]:
    """Hold the one slot of `dr-<service>-<env>`: one recovery per environment at a time.

    A second recovery of the same environment waits, saying every 30 s which runs may hold
    the slot; other environments run in parallel. The holder labels its run with its lease and
    process (dr/holders.py), so a waiting recovery frees the slot at once, and logs it, when the
    holder is provably dead: its run is final, or its process on this host is gone (a killed
    `dr` command). Otherwise the slot is leased (120 s, renewed while the run lives), so a
    crashed run elsewhere frees it once its lease expires on a Prefect server whose services
    run; on a server without them (the temporary server, `--no-services`) it stays taken, and
    the wait ends with `EnvironmentBusy`, which says how to free it. A Prefect server restart
    during the run (an approval can wait hours) never stops the run.

    Args:
        ref: the service environment.
        wait_seconds: how long to wait for the slot; default the environment's
            `recovery_slot_wait_minutes`.

    Raises:
        EnvironmentBusy: the slot stayed taken for the whole wait; nothing was changed.
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder

    from dr.errors import EnvironmentBusy

    _check_names(ref)
    name = recovery_slot_name(ref)
    if wait_seconds is None:
        try:
            wait_seconds = ref.rt().target.recovery_slot_wait_minutes * 60
        except DrError:  # well-formed but not configured: the flow refuses it before it touches anything
            from dr.config import DEFAULT_RECOVERY_SLOT_WAIT_MINUTES

            wait_seconds = DEFAULT_RECOVERY_SLOT_WAIT_MINUTES * 60
    _ensure_limit(name)
    me = _this_flow_run_id()
    lease = _SlotLease(ref, name, ConcurrencyLeaseHolder(type="flow_run", id=me) if me else None, me)
    log = run_logger()
    log.info("waiting for the recovery slot %s (up to %.0f s)", name, wait_seconds)
    started = time.monotonic()
    deadline, next_report = started + wait_seconds, started + SLOT_REPORT_SECONDS
    next_dead_check = started
    with get_client(sync_client=True) as client:
        while not lease.try_take(client):
            now = time.monotonic()
            if now >= next_dead_check:
                next_dead_check = now + DEAD_HOLDER_CHECK_SECONDS
                try:
                    freed = free_dead_holders(client, ref, exclude=me)
                except Exception as exc:  # the check is a shortcut: the lease still expires without it
                    freed = []
                    log.warning("could not check whether the holder of %s is dead (%s: %s)", name,
                                type(exc).__name__, exc)
                if freed:
                    log.warning("freed the recovery slot %s at once: it was held by %s", name, "; ".join(freed))
                    continue
            if now >= deadline or now >= next_report:
                active, holders = slot_holders(ref, exclude=me)
                who = "; ".join(holders) if holders else (
                    f"no recovery run of {ref.service} {ref.environment} is Running or Paused, so a run that died "
                    "still holds it")
                if now >= deadline:
                    raise EnvironmentBusy(
                        f"the recovery slot {name} stayed taken for {now - started:.0f} s: another recovery of "
                        f"{ref.service} {ref.environment} is running, or a run that crashed still holds it "
                        f"(a dead run's slot is freed when its {SLOT_LEASE_SECONDS} s lease expires, only on a "
                        f"Prefect server whose services run). Held by: {who}",
                        slot=name, holders=holders, world_state="nothing was changed by this run",
                        resume_hint=(f"check that no recovery of {ref.service} {ref.environment} is really running "
                                     f"(prefect flow-run ls --state Running --state Paused), then free the slot with "
                                     f"`prefect gcl update {name} --active-slots 0` and run the same command again"),
                    ).annotate(step="take the recovery slot")
                log.warning("still waiting for the recovery slot %s after %.0f s (%s of 1 taken): held by %s",
                            name, now - started, active, who)
                next_report = now + SLOT_REPORT_SECONDS
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.05)))
        _record_holder(client, me, name, lease.lease_id)
    log.info("holding the recovery slot %s (waited %.1f s)", name, time.monotonic() - started)
    lease.start_renewing()
    try:
        yield
    finally:
        lease.release()


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
        run_logger().info("step: %s", name, extra={"dr_show": True})  # also on the CLI's terminal
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


def validate_step(ref: Ref, timeline: "Timeline", *, server: str | None = None, healthcheck: bool = True,
                  step: str = "validate") -> datetime:
    """The runbook's "validate app" step: run the checks, fail the flow if a required one fails.

    Args:
        ref: the service environment.
        timeline: where the step is recorded.
        server: check the data on this server instead of the environment's own.
        healthcheck: also call the app's healthcheck (False: the data checks only).
        step: the step's name in the timeline.

    Returns:
        When the service was validated (the end of the RTO clock).
    """
    from dr.errors import ValidationFailed
    from tasks.validation import run_service_checks

    with timeline.step(step) as ev:
        results = run_service_checks(ref, server=server, healthcheck=healthcheck)
        failed = [r.name for r in results if r.required and not r.passed]
        ev.detail = ", ".join(f"{r.name} {'PASS' if r.passed else 'FAIL'}" for r in results)
        if failed:
            where = f" on {server}" if server else ""
            raise ValidationFailed(f"required checks failed{where}: {', '.join(failed)}", failed=failed)
    return datetime.now(timezone.utc)
