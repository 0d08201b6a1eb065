"""Tasks of the fleet check: build the board, publish it, notify what changed."""

from __future__ import annotations

from typing import Any

from tasks.common import dr_task


@dr_task(retries=2)
def build_board_task(config_path: str | None, service: str | None = None) -> Any:
    """Build the DR readiness board from the stores, the servers and Prefect."""
    from dr.config import load_config
    from dr.fleet.board import build_board

    return build_board(load_config(config_path), service=service)


@dr_task(retries=2)
def publish_board(board: Any) -> str:
    """Publish the board as the markdown artifact `dr-readiness`; returns its summary."""
    from prefect.artifacts import create_markdown_artifact

    from dr.fleet import READINESS_KEY

    create_markdown_artifact(key=READINESS_KEY, markdown=board.markdown(), description=board.summary())
    return board.summary()


@dr_task(retries=2)
def read_open_problems(config_path: str | None) -> dict:
    """The problems the previous check left open (from its artifact)."""
    from dr.config import load_config
    from dr.fleet.alerts import read_state

    return read_state(load_config(config_path))


@dr_task(retries=0)
def notify_changes(config_path: str | None, board: Any, previous: dict, link: str | None) -> dict:
    """Notify new and cleared problems once each, and record what is open for the next check."""
    from dr.config import load_config
    from dr.fleet.alerts import check, write_state

    config = load_config(config_path)
    outcome, still_open = check(config, board, previous, link=link)
    write_state(config, still_open, outcome)
    return outcome.summary()
