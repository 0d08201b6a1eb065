"""The hourly fleet check: the DR readiness board, and a notice per problem when it appears and when it clears."""

from __future__ import annotations

from prefect import flow

from flows.common import run_logger
from tasks.fleet import build_board_task, notify_changes, publish_board, read_open_problems
from tasks.notifications import flow_run_link


@flow(name="fleet-check", log_prints=True)
def fleet_check(config_path: str | None = None) -> dict:
    """Build the board of every configured environment, publish it, and tell people what changed.

    Changes nothing in the fleet. Notifies through `[notifications]` (the log, Slack, Teams)
    each problem once: a backup older than its RPO or missing, a failed nightly backup, a
    live server down, a failed verify or drill, an overdue drill, a PTR server or replaced
    database left too long, a recovery paused past its approval timeout; and once more when it
    clears. What was notified is kept in the artifact `dr-fleet-alerts-<fleet>`.

    Args:
        config_path: the configuration file (default $DR_CONFIG or ./dr.toml).
    """
    board = build_board_task(config_path)
    summary = publish_board(board)
    # the problems the last check left open, so nothing is said twice
    previous = read_open_problems(config_path)
    changes = notify_changes(config_path, board, previous, flow_run_link())
    run_logger().info("%s; %d new problem(s), %d cleared", summary, len(changes["opened"]), len(changes["cleared"]))
    return {"summary": summary, "counts": board.counts(), **changes}
