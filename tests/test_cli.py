"""The operator's command line, run as a person runs it: `dr` subprocesses on a real local platform.

Every command here runs in a working directory of its own with no PREFECT_* setting (not the
session's test server, never a developer's): the first command that needs Prefect starts the
project's persistent local server there (`.dr-local/prefect`, UI and services on), and every run
is then read back from that server's API. Nothing of the product is patched.

- Bad input and refusals: exactly one `error:` line and exit code 2, asserted on the whole output
  (no traceback, no banner, no log line); the ones the CLI can check start no server at all, and
  a refusal by the flow itself is still recorded as a Failed run with its reason.
- A command's run is on the local server with its artifacts; `dr local status` shows its UI.
- `dr pending` lists a paused data-loss run with its gate and the command to answer it, `dr approve`
  without a run id answers it, `dr watch` follows the run to its next gate.
- A `dr restore` killed with SIGKILL (its whole process group) while it holds the recovery slot:
  the next restore of the environment frees the slot at once (the killed run is marked Crashed),
  instead of waiting `recovery_slot_wait_minutes` or the 120 s lease.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest

from dr import prefect_server
from flows.common import SLOT_LEASE_SECONDS
from tests.helpers import utc_now, wait_a_second

REPO = Path(__file__).resolve().parents[1]
SLOT = "dr-apply-development"


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DR_"))}
    env.update(DR_PAUSE_POLL_SECONDS="1", DR_APPROVER="Ada Lovelace", **extra)  # gates answered within 1 s
    return env


def dr(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`dr <args>` in `cwd`; stdout and stderr together, in order, as a person sees them."""
    return subprocess.run([sys.executable, "-m", "dr.cli", *args], cwd=cwd, env=cli_env(), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def dr_background(cwd: Path, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "wb") as fh:  # a file, not a pipe: a full pipe would stall it
        return subprocess.Popen([sys.executable, "-m", "dr.cli", *args], cwd=cwd, env=cli_env(),
                                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(30)


def assert_one_error_line(r: subprocess.CompletedProcess, *words: str) -> str:
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 2, r.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line:\n{r.stdout}"
    assert "Traceback" not in r.stdout and "prefect" not in r.stdout.lower().split("error: ", 1)[0]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


class Api:
    """The local server's REST API, read the way the UI reads it."""

    def __init__(self, api: str):
        self.api = api

    def post(self, path: str, body: dict) -> list:
        r = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        r.raise_for_status()
        return r.json()

    def runs(self, flow: str) -> list[dict]:
        return self.post("/flow_runs/filter", {"flows": {"name": {"any_": [flow]}}, "sort": "START_TIME_DESC",
                                                "limit": 50})

    def run(self, run_id: str) -> dict:
        return httpx.get(f"{self.api}/flow_runs/{run_id}", timeout=30).json()

    def artifacts(self, run_id: str) -> list[dict]:
        return self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})

    def logs(self, run_id: str) -> list[str]:
        return [x["message"] for x in self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}},
                                                                  "limit": 200})]

    def active_slots(self) -> int | None:
        r = httpx.get(f"{self.api}/v2/concurrency_limits/{SLOT}", timeout=30)
        return r.json()["active_slots"] if r.status_code == 200 else None

    def wait(self, what: str, cond, timeout: float = 240, proc: subprocess.Popen | None = None, log: Path | None = None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = cond()
            if got:
                return got
            if proc is not None and proc.poll() is not None:
                pytest.fail(f"the command ended ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        pytest.fail(f"not within {timeout} s: {what}" + (f"\n{log.read_text()[-3000:]}" if log else ""))


@pytest.fixture(scope="module")
def project(request, tmp_path_factory):
    """A project directory of its own and its local Prefect server, up with `dr local up`, stopped at the end.

    The server's first start (its database migrations) runs while the module's platform comes up.
    """
    cwd = tmp_path_factory.mktemp("cli-project")
    home = cwd / ".dr-local" / "prefect"
    # started by a process that exits, as `dr` does (not a child of pytest that nobody would reap)
    code = f"from pathlib import Path; from dr.prefect_server import ensure; ensure(Path({str(home)!r}))"
    starter = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), cwd=cwd, stdin=subprocess.DEVNULL)
    try:
        shared_env = request.getfixturevalue("shared_env")
    finally:
        assert starter.wait(600) == 0
    r = dr(cwd, "local", "up", "--config", shared_env.config_path, "--env", "development", timeout=600)
    assert r.returncode == 0, r.stdout
    srv = prefect_server.read_record(home)
    assert srv is not None and "starting the local Prefect server" not in r.stdout, r.stdout  # found it running
    assert f"prefect   UI {srv.url}" in r.stdout
    yield cwd, shared_env, srv, Api(srv.api)
    prefect_server.stop(home)


class TestBadInputIsOneLine:
    """Each refusal: one `error:` line, exit 2; the CLI's own checks start nothing (not even a server)."""

    @pytest.mark.parametrize("args, words", [
        (["--env", "development", "--time", "2026-10-25 01:30"], ["happened twice in Europe/London", "+01:00", "nothing was changed"]),
        (["--env", "qa"], ["unknown environment 'qa'", "configured: development, production", "nothing was changed"]),
        (["--env", "development", "--time", "2099-01-01 10:00"], ["is in the future", "nothing was changed"]),
        (["--env", "production", "--auto-approve", "--time", "2026-07-01 14:30"],
         ["--auto-approve is refused for production", "nothing was changed"]),
    ], ids=["ambiguous-time", "unknown-environment", "future-time", "production-auto-approve"])
    def test_a_refused_scenario_prints_one_error_line(self, shared_env, tmp_path, args, words):
        r = dr(tmp_path, "data-loss", "--config", shared_env.config_path, *args, timeout=120)
        assert_one_error_line(r, *words)
        assert not (tmp_path / ".dr-local" / "prefect" / prefect_server.RECORD).exists(), "a server was started"

    def test_a_mistyped_option_is_one_line_too(self, shared_env, tmp_path):
        r = dr(tmp_path, "server-loss", "--config", shared_env.config_path, "--env", "development", "--recovery", "rebuild", timeout=120)
        assert_one_error_line(r, "--recovery", "'auto', 'revive', 'recreate'")

    def test_help_reads_naturally(self, tmp_path):
        r = dr(tmp_path, "restore", "--help", timeout=120)
        assert r.returncode == 0
        assert "--no-safety-backup" in r.stdout and "no-no-" not in r.stdout
        assert "<str>" not in r.stdout and "<bool>" not in r.stdout and "<int>" not in r.stdout
        assert "Example: dr data-loss --env production --time" in dr(tmp_path, "data-loss", "--help").stdout


class TestRunsOnTheLocalServer:
    def test_local_status_shows_the_ui_of_the_server_every_command_uses(self, project):
        cwd, env, srv, api = project
        r = dr(cwd, "local", "status", "--config", env.config_path, "--env", "development")
        assert r.returncode == 0, r.stdout
        assert f"prefect   UI {srv.url}" in r.stdout
        assert httpx.get(srv.url, timeout=30).status_code == 200  # the UI itself

    def test_a_plan_is_a_run_on_the_local_server_with_its_artifact(self, project):
        cwd, env, srv, api = project
        r = dr(cwd, "data-loss", "--plan", "--config", env.config_path, "--env", "development")
        assert r.returncode == 0, r.stdout
        assert r.stdout.startswith("# Plan: data loss for apply development"), r.stdout  # no banner before it
        run = api.runs("data-loss")[0]
        assert run["state"]["type"] == "COMPLETED" and run["parameters"]["plan_only"] is True
        assert [a for a in api.artifacts(run["id"]) if a["key"] == "plan-apply-development"
                and "## Blockers" in a["data"]]
        assert prefect_server.read_record(cwd / ".dr-local" / "prefect").pid == srv.pid  # the same server, not a new one

    def test_a_refusal_by_the_flow_is_one_line_and_a_failed_run_with_the_reason(self, project):
        cwd, env, srv, api = project
        before = utc_now() - timedelta(days=6)  # valid, but before this platform's restore window
        when = before.astimezone(ZoneInfo("Europe/London")).strftime("%Y-%m-%d %H:%M:%S")
        r = dr(cwd, "data-loss", "--time", when, "--auto-approve", "--config", env.config_path, "--env", "development")
        line = assert_one_error_line(r, "outside the restore window", "nothing was changed")
        run = api.runs("data-loss")[0]
        assert run["parameters"]["restore_time"] == when
        assert run["state"]["type"] == "FAILED" and "outside the restore window" in run["state"]["message"]
        assert line.split("error: ", 1)[1] in run["state"]["message"]


class TestPendingApprovals:
    def test_pending_lists_the_gate_and_approve_without_an_id_answers_it(self, project, tmp_path):
        cwd, env, srv, api = project
        env.query("CREATE TABLE IF NOT EXISTS cli_markers (id int PRIMARY KEY)")
        env.query("INSERT INTO cli_markers SELECT g FROM generate_series(1, 5) g ON CONFLICT DO NOTHING")
        wait_a_second()
        t = utc_now().replace(microsecond=0)
        wait_a_second()
        env.query("DELETE FROM cli_markers WHERE id > 2")  # the damage
        log = tmp_path / "data-loss.log"
        when = t.astimezone(ZoneInfo("Europe/London")).strftime("%Y-%m-%d %H:%M:%S")
        proc = dr_background(cwd, log, "data-loss", "--time", when, "--config", env.config_path, "--env", "development")
        try:
            def paused_at(gate: str):
                runs = [x for x in api.runs("data-loss") if x["state"]["type"] == "PAUSED"]
                return runs[0] if runs and gate in (runs[0]["state"]["state_details"]["pause_key"] or "") else None

            run = api.wait("the run pauses at its first gate", lambda: paused_at("restore-into-the-live-database"),
                           proc=proc, log=log)
            r = dr(cwd, "pending")
            assert r.returncode == 0, r.stdout
            out = r.stdout
            assert f"apply development: restore into the live database  (data-loss run {run['name']}" in out
            assert f"replace {env.target.server}/{env.target.database} with backup" in out  # what the gate will do
            assert "waiting " in out and "times out in 7 h" in out  # the default 8 h timeout
            assert f"answer: dr approve {run['name']}   or   dr reject {run['name']} --reason WHY" in out

            r = dr(cwd, "approve")
            assert r.returncode == 0, r.stdout
            assert r.stdout.startswith(f"approved 'restore into the live database' of apply development as Ada Lovelace "
                                       f"(run {run['name']})")

            r = dr(cwd, "watch", run["name"])  # follows the run until its next gate
            assert r.returncode == 0, r.stdout
            assert "restore into the live server: done" in r.stdout and "state     Paused" in r.stdout
            assert f"waiting for a person: disable maintenance; answer: dr approve {run['name']}" in r.stdout

            assert dr(cwd, "approve").returncode == 0
            proc.wait(240)
            out = log.read_text()
            assert proc.returncode == 0, out
            assert "decision: restore into the live database: approved by Ada Lovelace" in out
            assert "Traceback" not in out
            assert env.query("SELECT id FROM cli_markers ORDER BY id") == [(1,), (2,), (3,), (4,), (5,)]
        finally:
            if proc.poll() is None:
                kill_group(proc, signal.SIGTERM)

    def test_approve_with_nothing_pending_is_one_line(self, project):
        cwd, env, srv, api = project
        assert_one_error_line(dr(cwd, "approve"), "no run is waiting for this answer")


class TestKilledRestore:
    def test_the_next_restore_frees_the_slot_of_a_killed_restore_at_once(self, project, tmp_path):
        cwd, env, srv, api = project
        r = dr(cwd, "backup", "--config", env.config_path, "--env", "development")
        assert r.returncode == 0, r.stdout
        backup = next(x.split()[1] for x in r.stdout.splitlines() if x.startswith("backup "))
        # the restore's safety backup waits on this lock, holding the recovery slot, until it is killed
        locker = psycopg.connect(**env.conn().psycopg_kwargs())
        locker.execute("LOCK TABLE candidates IN ACCESS EXCLUSIVE MODE")
        log = tmp_path / "killed.log"
        proc = dr_background(cwd, log, "restore", "--backup", backup, "--config", env.config_path, "--env", "development")
        try:
            def holding():
                runs = [x for x in api.runs("restore-database") if x["state"]["type"] == "RUNNING"]
                return runs[0] if runs and runs[0]["labels"].get("dr.pid") and api.active_slots() == 1 else None

            killed = api.wait("the restore holds the slot", holding, proc=proc, log=log)
            assert killed["labels"]["dr.pid"] == str(proc.pid)
            kill_group(proc)  # the laptop closed: no finally, no atexit, the run stays Running on the server
        finally:
            if proc.poll() is None:
                kill_group(proc)
            locker.close()
        assert api.run(killed["id"])["state"]["type"] == "RUNNING" and api.active_slots() == 1

        r = dr(cwd, "restore", "--backup", backup, "--config", env.config_path, "--env", "development")
        assert r.returncode == 0, r.stdout
        assert any(x.startswith("restored ") and x.endswith(backup) for x in r.stdout.splitlines()), r.stdout
        assert f"warning: freed the recovery slot {SLOT} at once: it was held by run '{killed['name']}'" in r.stdout
        dead = api.run(killed["id"])["state"]
        assert dead["type"] == "CRASHED" and f"its process {proc.pid} on " in dead["message"], dead
        rerun = api.runs("restore-database")[0]
        assert rerun["state"]["type"] == "COMPLETED"
        logs = api.logs(rerun["id"])
        assert any(m.startswith(f"freed the recovery slot {SLOT} at once") for m in logs)
        assert api.active_slots() == 0
        # it did not wait for the killed run's lease to expire (nor for recovery_slot_wait_minutes)
        waited = next(float(m.split("(waited ")[1].split(" s)")[0]) for m in logs if m.startswith("holding the recovery"))
        assert waited < SLOT_LEASE_SECONDS, logs


def test_local_down_stops_the_server(project):
    cwd, env, srv, api = project
    r = dr(cwd, "local", "down", "--config", env.config_path)
    assert r.returncode == 0, r.stdout
    assert f"stopped Prefect server {srv.url} (pid {srv.pid})" in r.stdout
    assert not prefect_server.healthy(srv.api, timeout=2)
    with pytest.raises(ProcessLookupError):
        os.killpg(srv.pid, 0)
    assert prefect_server.read_record(cwd / ".dr-local" / "prefect") is None
