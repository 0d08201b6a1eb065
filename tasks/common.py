"""Defaults every task shares: retries with backoff and jitter, for transient errors only."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from prefect import task
from prefect.tasks import exponential_backoff

from dr.errors import retry_on_transient

F = TypeVar("F", bound=Callable[..., Any])


def dr_task(fn: F | None = None, *, retries: int = 3, name: str | None = None, **kw: Any) -> Any:
    """`@task` with our retry policy: transient errors only, exponential backoff with jitter.

    Results are not persisted: tasks return small records, and resuming an incident reads
    the world (servers, backups, databases) rather than cached results.
    """

    def wrap(f: F) -> Any:
        return task(
            f,
            name=name or f.__name__.replace("_", "-"),
            retries=retries,
            retry_delay_seconds=exponential_backoff(backoff_factor=2),
            retry_jitter_factor=0.5,
            retry_condition_fn=retry_on_transient,
            persist_result=False,
            **kw,
        )

    return wrap(fn) if fn is not None else wrap


def progress_artifact_hook(description: str):
    """A progress hook that shows a Prefect progress artifact on the run (a restore never looks hung)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    state: dict[str, Any] = {}

    def hook(done: int, total: int | None, rate: float) -> None:
        pct = min(100.0, 100.0 * done / total) if total else 0.0
        if "id" not in state:
            state["id"] = create_progress_artifact(progress=pct, description=description)
        else:
            update_progress_artifact(artifact_id=state["id"], progress=pct)

    return hook
