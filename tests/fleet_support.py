"""Builders for the fleet tests: a dr.toml of several services, their local servers, the `dr` CLI, runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.helpers import LOCAL_HEADER

REPO = Path(__file__).resolve().parents[1]

FLEET_HEADER = LOCAL_HEADER + """
[fleet]
{fleet}
"""


def write_fleet_config(root: Path, services: dict[str, dict[str, str]], fleet: str = "", extra: str = "") -> Path:
    """A dr.toml with `services[service][environment]` = the environment's own TOML lines (may be empty)."""
    text = FLEET_HEADER.format(state_dir=root / "state", fleet=fleet) + extra
    for service, envs in services.items():
        for env, lines in envs.items():
            text += f"\n[services.{service}.environments.{env}]\nplatform = \"local\"\n"
            text += "checks = [ { kind = \"row_count\", table = \"items\", min = 1 } ]\n" + lines + "\n"
    path = root / "dr.toml"
    path.write_text(text)
    return path


def make_servers(config: Any, targets: list[Any], rows: int = 200, threads: int = 2) -> None:
    """Each target's live server with a small database (a table of `rows` rows), two at a time."""
    from dr.database import create_database, database_exists
    from dr.platforms.local import local_servers

    servers = local_servers(config)

    def one(t: Any) -> None:
        if not servers.server_exists(t.server):
            servers.create_server(t.server, tags={"dr-service": t.service, "dr-environment": t.environment})
        admin = servers.connection(t.server, "postgres")
        if not database_exists(admin, t.database):
            create_database(admin, t.database)
        import psycopg

        with psycopg.connect(**servers.connection(t.server, t.database).psycopg_kwargs(), autocommit=True) as c:
            c.execute("CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, note text NOT NULL)")
            c.execute("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, %s) g ON CONFLICT DO NOTHING",
                      (rows,))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, targets))


def prefect_api() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `dr`/`prefect` child pointed at the session's Prefect server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_API_URL=prefect_api(), DR_HOME=str(REPO), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DR_LOG_LEVEL="WARNING", **extra)
    return env


def dr(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`dr <args>` in a process of its own, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "dr.cli", *args], cwd=REPO, env=cli_env(**env), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def deployments_of(tag: str) -> dict[str, Any]:
    """`<flow>/<name>` -> deployment, for every deployment carrying `tag`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    with get_client(sync_client=True) as client:
        deps = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[tag])),
                                       limit=200)
        names = {f.id: f.name for f in client.read_flows(limit=200)}
    return {f"{names[d.flow_id]}/{d.name}": d for d in deps}


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one instant (an end at the same instant as a start does not overlap)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def wait_final(run_ids: list[Any], timeout: float) -> list[Any]:
    """The runs once every one of them has reached a final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(run_ids))))
            if len(runs) == len(run_ids) and all(r.state and r.state.is_final() for r in runs):
                return runs
            if time.monotonic() > deadline:
                states = sorted(f"{r.name}: {r.state.name if r.state else '?'}" for r in runs)
                raise AssertionError(f"runs not final within {timeout:.0f} s: {states}")
            time.sleep(1)
