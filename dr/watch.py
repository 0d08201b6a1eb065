"""Follow a run live from the Prefect API: its timeline, its backup/restore progress, until it ends or pauses.

What the flows publish is what is shown: the `timeline-<incident>` markdown artifact (one row
per step, rewritten as each step starts and ends; flows/common.py `Timeline`) and the progress
artifacts of the backup and restore tasks (tasks/common.py `progress_artifact_hook`). A run
started anywhere (this terminal, another one, a worker, an alert) can be followed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

#: how often the API is asked (a person reads the lines; the server must not be hammered)
POLL_SECONDS = 1.0


def timeline_rows(markdown: str) -> list[tuple[str, str, str, str, str]]:
    """(step, started, ended, outcome, detail) of each row of a `Timeline.markdown()` table."""
    rows = []
    for line in markdown.splitlines():
        if not line.startswith("| ") or line.startswith("| step |") or line.startswith("|---"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")]
        if len(cells) >= 5:
            rows.append((cells[0], cells[1], cells[2], cells[3], " | ".join(cells[4:])))
    return rows


@dataclass
class Follower:
    """What has been shown of one run so far; `poll` shows what is new."""

    api: Any  # dr.prefect_api.Api
    run_id: str
    say: Callable[[str], None]
    bar: Optional[Callable[[str, float], None]] = None
    shown_rows: dict[tuple[str, str], str] = field(default_factory=dict)
    shown_progress: dict[str, float] = field(default_factory=dict)
    last_state: Optional[str] = None

    def poll(self) -> dict[str, Any]:
        """Show what changed; returns the run as read now."""
        run = self.api.flow_run(self.run_id) or {}
        latest: dict[str, dict[str, Any]] = {}
        for a in self.api.artifacts(self.run_id):  # most recently updated first: the current version of each key
            latest.setdefault(a.get("key") or a["id"], a)
        for key, a in latest.items():
            if a.get("type") == "markdown" and (a.get("key") or "").startswith("timeline-"):
                self._timeline(str(a.get("data") or ""))
        for key, a in sorted(latest.items(), key=lambda kv: kv[1].get("created") or ""):
            if a.get("type") == "progress":
                self._progress(a.get("description") or key, float(a.get("data") or 0))
        state = run.get("state") or {}
        name = state.get("name")
        if name != self.last_state:
            self.last_state = name
            self.say(f"state     {name}" + (f": {state['message']}" if state.get("message") else ""))
        return run

    def _timeline(self, markdown: str) -> None:
        for step, started, _ended, outcome, detail in timeline_rows(markdown):
            key = (step, started)
            if self.shown_rows.get(key) == outcome:
                continue
            self.shown_rows[key] = outcome
            when = started.split(" / ")[0]
            self.say(f"{when:<12}  {step}: {outcome}" + (f" ({detail})" if detail and outcome != "running" else ""))

    def _progress(self, label: str, pct: float) -> None:
        last = self.shown_progress.get(label)
        if pct <= 0 or pct == last or (last is not None and pct < 100 and pct - last < (1 if self.bar else 10)):
            return  # 0 %: a stream of unknown size (its bytes are in the run's logs)
        self.shown_progress[label] = pct
        if self.bar:
            self.bar(label, pct)
        else:
            self.say(f"progress  {label}: {pct:.0f}%")


#: states after which nothing more happens without a person (or ever)
STOP_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED", "PAUSED")


def follow(api: Any, run_id: str, *, say: Callable[[str], None], bar: Optional[Callable[[str, float], None]] = None,
           poll_seconds: float = POLL_SECONDS, timeout: Optional[float] = None) -> dict[str, Any]:
    """Show the run's timeline and progress until it is final or paused; returns the run as last read."""
    f = Follower(api, run_id, say, bar)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        run = f.poll()
        if (run.get("state") or {}).get("type") in STOP_STATES:
            return run
        if deadline is not None and time.monotonic() > deadline:
            return run
        time.sleep(poll_seconds)


def terminal_bar(stream: Any = None, width: int = 30) -> Callable[[str, float], None]:
    """`[######........]  45%  backup <name>` redrawn in place on a terminal."""
    import sys

    out = stream or sys.stderr

    def show(label: str, pct: float) -> None:
        filled = int(min(100.0, pct) / 100 * width)
        out.write("\r" + f"[{'#' * filled}{'.' * (width - filled)}] {pct:3.0f}%  {label}".ljust(100))
        if pct >= 100:
            out.write("\n")
        out.flush()

    return show
