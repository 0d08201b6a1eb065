"""Staleness alerts: each problem on the board is notified once, and once more when it clears.

A problem is a board finding with a stable key (`backup-stale:apply-production`,
`leftover:apply-production:<server>`, `recovery-waiting:<flow run id>`...). What was already
notified is not kept in a database of ours: each check publishes the open problems as the
table artifact `dr-fleet-alerts-<fleet>` and the next check reads the latest one back, so the
state lives in Prefect and survives workers and restarts.

A notice counts as sent when every configured channel (the log, Slack, Teams) accepted it;
otherwise the problem is not recorded as notified and the next check sends it again (a
repeat on a working channel is better than silence on a broken one). The same holds for the
"cleared" notice. New problems go out as one message per environment; when more than `BATCH`
environments have new ones (a worker down for a night: every nightly backup late) as one
message listing them all; likewise for cleared ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from dr.config import DrConfig
from dr.fleet import fleet_name
from dr.fleet.board import Board

BATCH = 5


def state_key(config: DrConfig) -> str:
    """The artifact that holds a fleet's open problems."""
    return f"dr-fleet-alerts-{fleet_name(config)}"


@dataclass(frozen=True)
class Problem:
    key: str
    level: str
    service: str
    environment: str
    text: str
    since: str

    def as_row(self) -> dict[str, str]:
        return dict(self.__dict__)


@dataclass
class AlertOutcome:
    """What one check notified."""

    opened: list[Problem] = field(default_factory=list)
    cleared: list[Problem] = field(default_factory=list)
    still_open: list[Problem] = field(default_factory=list)
    #: problems whose notice some channel refused: sent again by the next check
    unsent: list[Problem] = field(default_factory=list)
    messages: int = 0

    def summary(self) -> dict[str, Any]:
        return {"opened": [p.key for p in self.opened], "cleared": [p.key for p in self.cleared],
                "still_open": [p.key for p in self.still_open], "unsent": [p.key for p in self.unsent],
                "messages": self.messages}


def problems(board: Board) -> dict[str, Problem]:
    """The board's findings that are notified, by their stable key."""
    out: dict[str, Problem] = {}
    now = board.built_at.isoformat()
    for r in board.rows:
        for f in r.findings:
            if f.alert and f.alert not in out:
                out[f.alert] = Problem(f.alert, f.level, r.service, r.environment, f.text, now)
    return out


def read_state(config: DrConfig) -> dict[str, Problem]:
    """The problems the previous check left open (the latest `dr-fleet-alerts-<fleet>` artifact)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(
            key=ArtifactCollectionFilterKey(any_=[state_key(config)])), limit=1)
    if not found:
        return {}
    data = found[0].data
    rows = json.loads(data) if isinstance(data, str) else (data or [])
    return {r["key"]: Problem(**{k: r.get(k, "") for k in Problem.__dataclass_fields__}) for r in rows}


def write_state(config: DrConfig, open_problems: list[Problem], outcome: AlertOutcome) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        key=state_key(config), table=[p.as_row() for p in open_problems],
        description=(f"open DR problems of fleet {fleet_name(config)} ({len(open_problems)}), read back by the next "
                     f"fleet-check; this check: {len(outcome.opened)} new, {len(outcome.cleared)} cleared"))


def _channels(config: DrConfig) -> set[str]:
    from dr.notify import webhook_urls

    return {"log", *webhook_urls(config)}


def check(config: DrConfig, board: Board, previous: dict[str, Problem],
          send: Callable[[DrConfig, str, str, str | None], list[str]] | None = None,
          link: str | None = None) -> tuple[AlertOutcome, list[Problem]]:
    """Notify what is new and what cleared since `previous`; returns the outcome and the problems now open.

    Args:
        config: the configuration (its `[notifications]` channels).
        board: the board just built.
        previous: the problems the last check left open.
        send: the notifier (default `dr.notify.send`); returns the channels that accepted.
        link: where people see the board (the fleet-check run).
    """
    from dr.notify import send as default_send

    send = send or default_send
    want = _channels(config)
    now = problems(board)
    out = AlertOutcome()
    new = [p for k, p in now.items() if k not in previous]
    gone = [p for k, p in previous.items() if k not in now]
    out.still_open = [previous[k] for k in now if k in previous]

    def deliver(batch: list[Problem], opened: bool) -> list[Problem]:
        """Send notices for `batch`, one message per environment; returns the problems some channel refused."""
        verb = "PROBLEM" if opened else "CLEARED"
        per_env: dict[tuple[str, str], list[Problem]] = {}
        for p in batch:
            per_env.setdefault((p.service, p.environment), []).append(p)
        messages: list[tuple[str, str, list[Problem]]] = []
        if len(per_env) > BATCH:
            messages.append((f"[dr] DR {verb}: {len(batch)} problems {'new' if opened else 'cleared'} in "
                             f"{len(per_env)} environments",
                             "\n".join(f"- {p.service} {p.environment}: {p.text}" for p in batch), batch))
        else:
            for (service, env), ps in per_env.items():
                lines = [p.text if opened else f"no longer: {p.text}" for p in ps]
                messages.append((f"[dr] DR {verb}: {service} {env}", "\n".join(lines), ps))
        refused: list[Problem] = []
        for title, text, ps in messages:
            accepted = set(send(config, title, text, link))
            out.messages += 1
            if not want <= accepted:
                refused += ps
        return refused

    refused_new = deliver(new, True) if new else []
    refused_gone = deliver(gone, False) if gone else []
    out.opened = [p for p in new if p not in refused_new]
    out.cleared = [p for p in gone if p not in refused_gone]
    out.unsent = refused_new + refused_gone
    # open now: what persists (first seen time kept), what was notified now, and cleared
    # problems whose notice failed (still "open" as far as people know: cleared again next time)
    return out, [*out.still_open, *out.opened, *refused_gone]
