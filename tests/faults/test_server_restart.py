"""Fault 11: the Prefect server restarted while a data-loss run is paused for approval.

A Prefect server of this test's own (`prefect server start --no-services`, its own
PREFECT_HOME and SQLite database, a fixed port) orchestrates a data-loss run on the local
platform, run in a subprocess pointed at it. When the run pauses at "restore into the live
database", the server is stopped (SIGTERM, as a restart does), the world is snapshotted, and
the server is started again on the same database and port. Then the gates are answered as
`dr approve` does (`dr.prefect_api.resume_with_input`) and the outcome is checked against the
world: the restored rows, or nothing destructive done and an error that says how to resume.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.faults.harness import assert_nothing_lost, live_state, snapshot
from tests.helpers import make_env, utc_now, wait_a_second
from tests.processes import (
    DATA_LOSS_RUNNER as RUNNER,
    GATE_MAINTENANCE,
    GATE_RESTORE,
    PrefectServer,
    env_without_prefect,
    stop_group,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SLOT = "dr-apply-development"
#: what the run logs when the restarted server refuses to renew the recovery slot's lease
LEASE_LOST = "no longer knows this run's lease on dr-apply-development"


RESUME = """
import json, sys, uuid
from dr.prefect_api import resume_with_input
resume_with_input(uuid.UUID(sys.argv[1]), json.loads(sys.argv[2]), wait_seconds=60)
"""


class Server(PrefectServer):
    """`prefect server start --no-services` on a fixed port and its own database; restartable."""

    def start(self, timeout: float = 240) -> None:  # type: ignore[override]
        super().start()
        self.wait_ready(timeout)

    def data_loss_run(self) -> dict | None:
        runs = httpx.post(f"{self.api}/flow_runs/filter", timeout=10,
                          json={"flows": {"name": {"any_": ["data-loss"]}}}).json()
        return runs[0] if runs else None


def _wait_for_gate(server: Server, flow: subprocess.Popen, pause_key: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    seen = "no run yet"
    while time.monotonic() < deadline:
        if flow.poll() is not None:
            pytest.fail(f"the flow process ended ({flow.returncode}) before pausing at {pause_key}; last state: {seen}")
        run = server.data_loss_run()
        if run:
            state = run["state"] or {}
            details = state.get("state_details") or {}
            seen = f"{state.get('type')} {details.get('pause_key')}"
            keyset = details.get("run_input_keyset") or {}
            if state.get("type") == "PAUSED" and details.get("pause_key") == pause_key and keyset.get("schema") and \
                    httpx.get(f"{server.api}/flow_runs/{run['id']}/input/{keyset['schema']}", timeout=10).status_code == 200:
                return run["id"]
        time.sleep(0.5)
    pytest.fail(f"the run did not pause at {pause_key} within {timeout} s; last state: {seen}")


def _approve(server: Server, run_id: str, approver: str = "Ada Lovelace") -> None:
    answer = {"approve": True, "approver": approver, "reason": "checked after the server restart"}
    done = subprocess.run([sys.executable, "-c", RESUME, run_id, json.dumps(answer)], cwd=REPO,
                          env=env_without_prefect(PREFECT_HOME=str(server.root / "client-home"), PREFECT_API_URL=server.api),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"the approval was refused:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def restarted_during_approval(base_dir, tmp_path_factory):
    """Pause a data-loss run at its restore gate, restart the Prefect server under it, then approve."""
    root = tmp_path_factory.mktemp("server-restart")
    server = Server(root)
    server.start()
    env = make_env(base_dir, "server-restart")
    env.up()
    obs: dict = {"env": env, "server": server}
    flow = None
    try:
        env.query("CREATE TABLE markers (id int PRIMARY KEY, note text)")
        env.query("INSERT INTO markers SELECT g, 'good ' || g FROM generate_series(1, 20) g")
        obs["expected"] = live_state(env)
        wait_a_second()
        t = utc_now().replace(microsecond=0)
        wait_a_second()
        env.query("INSERT INTO markers VALUES (21, 'after T'); DELETE FROM markers WHERE id <= 10")
        obs["damaged"] = live_state(env)
        obs["before"] = snapshot(env)

        out = root / "flow-result.json"
        flow_log = obs["flow_log"] = root / "flow.log"
        kw = {**env.kw(), "restore_time": t.strftime("%Y-%m-%d %H:%M:%SZ"), "incident": "inc-server-restart",
              "approval_timeout_minutes": 15}
        with open(flow_log, "wb") as fh:
            flow = subprocess.Popen(
                [sys.executable, "-c", RUNNER, json.dumps(kw), str(out)], cwd=REPO, stdin=subprocess.DEVNULL,
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                env=env_without_prefect(PREFECT_HOME=str(root / "flow-home"), PREFECT_API_URL=server.api,
                         DR_PAUSE_POLL_SECONDS="1"))
        run_id = obs["run_id"] = _wait_for_gate(server, flow, GATE_RESTORE)

        # the fault: the server goes away under the paused run, and comes back on the same database
        server.stop()
        obs["at_restart"] = snapshot(env)
        time.sleep(5)  # several of the run's 1 s polls meet no server
        server.start()
        obs["state_after_restart"] = httpx.get(f"{server.api}/flow_runs/{run_id}", timeout=10).json()["state"]
        # an approval waits for minutes or hours: let the run renew its recovery slot's lease (every 90 s)
        # against the restarted server, which has forgotten it
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and flow.poll() is None and LEASE_LOST not in flow_log.read_text():
            time.sleep(1)
        obs["lease_lost_seen"] = LEASE_LOST in flow_log.read_text()
        obs["flow_alive_after_restart"] = flow.poll() is None

        if obs["flow_alive_after_restart"]:
            _approve(server, run_id)
            _wait_for_gate(server, flow, GATE_MAINTENANCE)
            _approve(server, run_id)
        flow.wait(300)
        obs["result"] = json.loads(out.read_text()) if out.exists() else None
        obs["final_state"] = httpx.get(f"{server.api}/flow_runs/{run_id}", timeout=10).json()["state"]
        obs["slot_after"] = httpx.get(f"{server.api}/v2/concurrency_limits/{SLOT}", timeout=10).json()
        obs["after"] = snapshot(env)
        obs["live"] = live_state(env)
        obs["app"] = env.platform.app.get_status()
        yield obs
    finally:
        if flow is not None:
            stop_group(flow)
        server.stop()
        env.discard()


class TestPrefectServerRestartedDuringApproval:
    def test_the_paused_run_survives_the_restart_and_completes_with_the_restored_rows(self, restarted_during_approval):
        obs = restarted_during_approval
        log_tail = obs["flow_log"].read_text(errors="replace")[-4000:]
        assert obs["flow_alive_after_restart"], f"the run ended with the server:\n{log_tail}"
        assert obs["result"] and obs["result"]["ok"], f"{obs['result']}\n{log_tail}"
        assert obs["final_state"]["type"] == "COMPLETED", obs["final_state"]
        assert obs["live"] == obs["expected"], "the live database does not hold the rows from before the damage"
        decisions = obs["result"]["result"]["decisions"]
        assert any(d.startswith("restore into the live database: approved by Ada Lovelace") for d in decisions), \
            decisions
        assert not obs["app"].maintenance

    def test_the_restart_did_hit_the_runs_recovery_slot_and_the_slot_is_free_afterwards(self, restarted_during_approval):
        obs = restarted_during_approval
        assert obs["lease_lost_seen"], "the run never renewed its lease against the restarted server: no fault injected"
        # the restarted server still counted the slot it forgot the lease of; the run gave it back at the end,
        # so the next recovery of the environment can start
        assert obs["slot_after"]["active_slots"] == 0, obs["slot_after"]

    def test_nothing_destructive_happened_while_the_server_was_away(self, restarted_during_approval):
        obs = restarted_during_approval
        # at the restart the live database was still the damaged one: the swap waits for the approval
        assert obs["at_restart"].live == obs["damaged"]
        assert_nothing_lost(obs["before"], obs["at_restart"], new_backup_kinds={"pre-restore-safety", "ptr"},
                            servers_may_appear=True)
