"""Proof at fleet scale: 3 services x 4 environments, each its own small PostgreSQL server, one process worker.

`dr deploy` registers the whole fleet; every environment's nightly backup (with its restore
test) runs as a deployment run on one worker within `[fleet] max_parallel_backups = 2`,
asserted from the runs' own start and end times; one environment's server is stopped before
the night, which turns only its row red and gives one alert; starting it again and re-running
its backup clears the alert and the board is all green.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pytest

from dr.config import load_config
from dr.fleet.register import remove_fleet
from dr.fleet.spec import CATALOGUE
from tests.fleet_support import (
    REPO,
    deployments_of,
    dr,
    make_servers,
    max_overlap,
    prefect_api,
    wait_final,
    write_fleet_config,
)
from tests.helpers import remove_later

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

SLACK_ENV = "DR_TEST_FLEET12_SLACK"
ENVS = ("development", "test", "qa", "production")
# no drills here (each would be a minute of PTR and restores): the rows can then be green
SERVICES = {s: {e: "" if e == "production" else "drill = false\n" for e in ENVS} for s in ("alpha", "beta", "gamma")}
LIMIT = 2
BROKEN = ("beta", "qa")


def create_runs(names: list[str], parameters: dict) -> dict[str, str]:
    """One run of each deployment now, as the schedule would; `<deployment>` -> run id."""
    from prefect.client.orchestration import get_client

    deps = deployments_of("dr-fleet:t12")
    with get_client(sync_client=True) as client:
        return {n: str(client.create_flow_run_from_deployment(deps[n].id, parameters=parameters).id) for n in names}


def test_a_fleet_of_twelve_is_deployed_backed_up_within_the_limit_and_watched(base_dir, monkeypatch):
    from deployments import stack
    from dr.platforms.local import lifecycle, local_servers
    from flows.fleet_check import fleet_check
    from tests.test_worker import Hook

    root = base_dir / f"fleet12-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    root.chmod(0o755)
    path = write_fleet_config(root, SERVICES, f'name = "t12"\nwork_pool = "fleet12"\nmax_parallel_backups = {LIMIT}\n',
                              extra=f'\n[notifications]\nslack_webhook_env = "{SLACK_ENV}"\n')
    cfg = load_config(path)
    targets = cfg.targets()
    hook = Hook()
    worker = None
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        make_servers(cfg, targets, rows=100)
        timings["12 servers"] = time.monotonic() - t0

        # 1. the whole fleet from one file
        t0 = time.monotonic()
        r = dr("deploy", "--config", str(path))
        timings["dr deploy"] = time.monotonic() - t0
        assert r.returncode == 0, r.stdout + r.stderr
        deps = deployments_of("dr-fleet:t12")
        assert len(deps) == 12 * len(CATALOGUE) - 3 + 1, sorted(deps)
        assert {n for n in deps if n.startswith("nightly-backup/")} == {f"nightly-backup/{t.service}-{t.environment}"
                                                                         for t in targets}

        # 2. a night: one environment's server is down; every nightly backup is started at once
        local_servers(cfg).stop_server(cfg.target(*BROKEN).server)
        worker = stack.start_worker(prefect_api(), pool="fleet12", name="fleet12-worker", log=root / "worker.log",
                                    project=REPO)
        stack.wait_for_worker(prefect_api(), worker, pool="fleet12", name="fleet12-worker")
        t0 = time.monotonic()
        ids = create_runs(sorted(n for n in deps if n.startswith("nightly-backup/")), {"verify": "always"})
        runs = wait_final(list(ids.values()), timeout=900)
        timings["12 nightly runs"] = time.monotonic() - t0
        by_id = {str(x.id): x for x in runs}
        states = {n: by_id[i].state.type.value for n, i in ids.items()}
        broken = f"nightly-backup/{BROKEN[0]}-{BROKEN[1]}"
        assert states.pop(broken) == "FAILED", (worker.tail(), states)
        assert set(states.values()) == {"COMPLETED"}, (worker.tail(), states)
        # the limit, from the runs' own start and end times: never more than 2 at once
        spans = [(x.start_time, x.end_time) for x in runs]
        assert all(s and e for s, e in spans)
        assert max_overlap(spans) <= LIMIT, sorted(spans)

        # 3. the board: only the broken environment is red, and says why
        r = dr("status", "--json", "--config", str(path))
        assert r.returncode == 0, r.stderr
        rows = {(e["service"], e["environment"]): e for e in json.loads(r.stdout)["environments"]}
        assert len(rows) == 12
        bad = rows.pop(BROKEN)
        assert bad["status"] == "red"
        assert "live server t-beta-qa-pg is Stopped" in bad["reason"] and "nightly backup FAILED at " in bad["reason"]
        assert {k: e["status"] for k, e in rows.items()} == {k: "green" for k in rows}, \
            {k: e["reason"] for k, e in rows.items() if e["status"] != "green"}

        # 4. one alert for the broken environment, not repeated
        monkeypatch.setenv(SLACK_ENV, hook.url)
        fleet_check(config_path=str(path))
        assert len(hook.texts()) == 1 and hook.texts()[0].startswith("[dr] DR PROBLEM: beta qa\n"), hook.texts()
        assert "is Stopped" in hook.texts()[0] and "nightly backup FAILED" in hook.texts()[0]
        fleet_check(config_path=str(path))
        assert len(hook.texts()) == 1

        # 5. fixed: the server is started, its backup re-run; the alert clears once and all is green
        local_servers(cfg).start_server(cfg.target(*BROKEN).server)
        [again] = wait_final(list(create_runs([broken], {"verify": "always"}).values()), timeout=300)
        assert again.state.is_completed(), worker.tail()
        fleet_check(config_path=str(path))
        assert len(hook.texts()) == 2 and hook.texts()[1].startswith("[dr] DR CLEARED: beta qa\n"), hook.texts()
        r = dr("status", "--json", "--config", str(path))
        doc = json.loads(r.stdout)
        assert doc["summary"] == {"green": 12, "amber": 0, "red": 0}, [e["reason"] for e in doc["environments"]]
        print(f"fleet of 12 at {datetime.now(timezone.utc):%H:%M}: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    finally:
        hook.close()
        if worker is not None:
            worker.stop()
        remove_fleet("dr-fleet:t12")
        lifecycle.down(cfg)
        remove_later(root)
