"""Runs on a real worker of a self-hosted Prefect server: the drill end to end, and a worker that dies.

The slow tests start `prefect server start` WITH its services (deployments/stack.py, as
`dr drill --on-worker` does): the triggers service runs the zombie automation and the
repossessor frees expired concurrency leases; neither runs on the session's ephemeral
server. Workers are started with `dr worker start`, deployments with `dr deploy`.

Killing a worker: SIGKILL to the worker and to its flow-run process (the runner starts it
in a session of its own), as when the machine or pod running them dies. Nothing of the
product is patched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from deployments import stack
from deployments.automations import ZOMBIE_MESSAGE
from dr.platforms.base import TAG_INCIDENT
from flows.ptr import ptr_server_name

REPO = Path(__file__).resolve().parents[1]
SLOT = "dr-apply-development"
SLACK_ENV = "DR_TEST_ONCALL_SLACK"
HEARTBEAT = 30  # Prefect's minimum: the zombie automation then fires 90 s after the last beat


# --- helpers ---------------------------------------------------------------------------------------


def dr_cli(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dr.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def cli_env(api: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=os.environ["PREFECT_HOME"], PREFECT_SERVER_ANALYTICS_ENABLED="false", DR_HOME=str(REPO),
               DR_LOG_LEVEL="WARNING", **extra)
    if api:
        env["PREFECT_API_URL"] = api
    return env


def add_notifications(config_path: str) -> None:
    """Point the environment's on-call Slack webhook at an environment variable (the URL is set per test)."""
    p = Path(config_path)
    p.write_text(p.read_text() + f'\n[notifications]\nslack_webhook_env = "{SLACK_ENV}"\n')


class Hook:
    """An incoming webhook standing in for Slack: records every JSON body posted to it."""

    def __init__(self) -> None:
        bodies: list[dict[str, Any]] = []
        self.bodies = bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    bodies.append(json.loads(raw))
                except ValueError:
                    bodies.append({"raw": raw.decode(errors="replace")})
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def texts(self) -> list[str]:
        return [b.get("text", "") for b in self.bodies]

    def close(self) -> None:
        self.httpd.shutdown()


def api_get(api: str, path: str) -> Any:
    r = httpx.get(f"{api}{path}", timeout=10)
    r.raise_for_status()
    return r.json()


def flow_run_state(api: str, run_id: str) -> dict[str, Any]:
    return api_get(api, f"/flow_runs/{run_id}")["state"] or {}


def active_slots(api: str, name: str = SLOT) -> int | None:
    r = httpx.get(f"{api}/v2/concurrency_limits/{name}", timeout=10)
    return r.json()["active_slots"] if r.status_code == 200 else None


def create_run(api: str, deployment: str, parameters: dict[str, Any]) -> str:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        return str(client.create_flow_run_from_deployment(dep.id, parameters=parameters).id)


def wait_for(what: str, cond, timeout: float, *, every: float = 1.0, alive: subprocess.Popen | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        if alive is not None and alive.poll() is not None:
            pytest.fail(f"{what}: the process it depends on exited ({alive.returncode})")
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout:.0f} s (last: {last!r})")


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
                parents[int(p.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                pass
    out, frontier = [], {pid}
    while frontier:
        frontier = {c for c, pp in parents.items() if pp in frontier}
        out += sorted(frontier)
    return out


def children(pid: int) -> list[int]:
    out = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(x) for x in f.read_text().split()]
        except OSError:
            pass
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def freeze_first(program: str, under: int, timeout: float) -> int:
    """SIGSTOP the first `program` run (not `--version`) below `under` the moment it appears; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frontier = children(under)
        while frontier:
            for pid in frontier:
                argv = cmdline(pid)
                if comm(pid) == program and len(argv) > 2 and "--version" not in argv:
                    try:
                        os.kill(pid, signal.SIGSTOP)
                    except ProcessLookupError:  # already gone: not the one
                        continue
                    return pid
            frontier = [c for pid in frontier for c in children(pid)]
        time.sleep(0.002)
    pytest.fail(f"no {program} ran under process {under} within {timeout:.0f} s")


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def kill_worker_and_its_flow_runs(worker: subprocess.Popen) -> list[int]:
    """SIGKILL the worker and everything under it (its flow runs and their tools), as a dead machine would.

    The local platform's PostgreSQL servers are not under it (pg_ctl detaches them), nor is its app.
    """
    victims = [worker.pid] + descendants(worker.pid)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.wait(30)
    return victims


def start_worker(api: str, tmp: Path, name: str) -> subprocess.Popen:
    """`dr worker start` in a session of its own, heartbeats every 30 s, polling every 2 s."""
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "dr.cli", "worker", "start", "--name", name,
                             "--heartbeat-seconds", str(HEARTBEAT)], cwd=REPO,
                            env=cli_env(api, PREFECT_WORKER_QUERY_SECONDS="2"), stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(10)


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services_server(tmp_path_factory):
    """`prefect server start` with its services; repossessor every 5 s instead of 15 (a test speed-up only)."""
    home = tmp_path_factory.mktemp("prefect-server")
    server = stack.start_server(home, port=stack.free_port(), ui=False, scheduler=False,
                                env={"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5"})
    try:
        stack.wait_until_healthy(server)
        yield server
    finally:
        server.process.stop()


# --- fast: the CLI pieces --------------------------------------------------------------------------


class TestCommandsWithoutAServer:
    def test_drill_on_worker_refuses_a_prefect_api_url_where_nothing_answers(self, tmp_path):
        api = f"http://127.0.0.1:{stack.free_port()}/api"
        r = dr_cli("drill", "--on-worker", env=cli_env(api), timeout=120)
        assert r.returncode != 0
        assert f"PREFECT_API_URL is {api} but no Prefect server answers there" in r.stderr
        assert "Prefect server  starting" not in r.stdout  # it started nothing of its own

    def test_deploy_and_worker_need_a_server(self):
        for args in (["deploy"], ["worker", "start"]):
            r = dr_cli(*args, env=cli_env(None), timeout=120)
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            assert "PREFECT_API_URL is not set" in r.stderr and "dr server start" in r.stderr

    def test_the_drill_report_is_read_from_the_run_s_table_artifact(self):
        rows = [{"scenario": "data-loss", "result": "PASS", "RTO": "5 s", "RPO": "2 s",
                 "marker rows after recovery": "{'keep': 25}"}]
        out = stack.RunOutcome("id", "brave-fox", "COMPLETED", "Completed", "", [
            {"key": "report-drill-1-dl", "type": "markdown", "description": "post-incident report", "data": "# x"},
            {"key": "drill-apply-development", "type": "table",
             "description": "DR drill drill-20261126-101500; report dr-reports/drill-20261126-101500.md", "data": rows}])
        r = stack.DrillOnWorker("http://x/api", out, [])
        assert r.passed
        assert r.table() == ("drill-20261126-101500", rows, "dr-reports/drill-20261126-101500.md")

    def test_a_server_is_started_with_its_services_and_without_analytics(self, tmp_path):
        cmd = stack.server_command("127.0.0.1", 4321, ui=False, scheduler=False)
        assert cmd[1:] == ["-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", "4321",
                           "--analytics-off", "--no-ui", "--no-scheduler"]
        assert "--no-services" not in cmd
        env = stack.server_env(tmp_path / "home")
        assert env["PREFECT_HOME"] == str(tmp_path / "home") and "PREFECT_API_URL" not in env
        wenv = stack.worker_env("http://127.0.0.1:4321/api", REPO)
        assert wenv["DR_HOME"] == str(REPO) and wenv["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
        assert int(wenv["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) >= 30


# --- slow: the drill on a worker, and a worker that dies ----------------------------------------------


@pytest.mark.slow
def test_drill_on_worker_runs_a_deployment_run_and_prints_rto_rpo(services_server, live_env):
    """`dr drill --on-worker` with PREFECT_API_URL set: deploys, starts a worker, runs, prints, stops the worker."""
    api = services_server.api
    r = dr_cli("drill", "--on-worker", "--env", "development", "--scenario", "data-loss", "--config", live_env.config_path,
               env=cli_env(api))
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Prefect server  " + api in r.stdout and "worker          dr-drill-" in r.stdout
    assert "stopped         the prefect worker this command started" in r.stdout
    assert "on apply development: PASSED" in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("data-loss "))
    assert line.split()[1] == "PASS" and "{'keep': 25}" in line
    run_id = r.stdout.split("flow run        ", 1)[1].split("(", 1)[1].split(")", 1)[0]
    assert flow_run_state(api, run_id)["type"] == "COMPLETED"
    assert api_get(api, f"/flow_runs/{run_id}")["deployment_id"]  # a deployment run, not an in-process one
    # what the drill restored is in the live database, and the worker it started is gone
    assert live_env.scalar("SELECT count(*) FROM dr_drill_markers WHERE kind = 'keep'") == 25
    worker = r.stdout.split("worker          ", 1)[1].split()[0]
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and worker in " ".join(cmdline(int(p.name)))]


@pytest.mark.slow
def test_a_killed_worker_s_run_is_crashed_its_slot_freed_on_call_told_and_the_incident_resumes(
        services_server, live_env, tmp_path):
    api = services_server.api
    hook = Hook()
    add_notifications(live_env.config_path)
    workers: list[subprocess.Popen] = []
    try:
        # 1. deployments and automations, as an operator registers them (crash notice to the hook)
        r = dr_cli("deploy", "--name", "data-loss/apply-development", "--heartbeat-seconds", str(HEARTBEAT),
                   "--config", live_env.config_path, env=cli_env(api, **{SLACK_ENV: hook.url}))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "data-loss/apply-development" in r.stdout and "tell on-call about crashed" in r.stdout

        # 2. data to lose: rows before T, damage after it
        live_env.query("CREATE TABLE markers (id int PRIMARY KEY, note text)")
        live_env.query("INSERT INTO markers SELECT g, 'good ' || g FROM generate_series(1, 20) g")
        time.sleep(1.2)  # commit times either side of T differ by more than the 1 s resolution
        t = datetime.now(timezone.utc).replace(microsecond=0)
        time.sleep(1.2)
        live_env.query("INSERT INTO markers VALUES (21, 'after T'); DELETE FROM markers WHERE id <= 10")
        incident = "inc-worker-killed"
        params = {**live_env.kw(), "restore_time": t.astimezone(ZoneInfo("Europe/London")).strftime("%Y-%m-%d %H:%M:%S"),
                  "auto_approve": True, "incident": incident}

        # 3. a worker runs the scenario; it dies in the middle of the safety backup, holding the slot
        servers = live_env.platform.servers
        workers.append(start_worker(api, tmp_path, "worker-1"))
        run_id = create_run(api, "data-loss/apply-development", params)
        dump = freeze_first("pg_dump", under=workers[0].pid, timeout=420)  # the run stays mid-step
        assert flow_run_state(api, run_id)["type"] == "RUNNING" and active_slots(api) == 1
        killed = kill_worker_and_its_flow_runs(workers[0])
        killed_at = time.monotonic()
        assert dump in killed and len(killed) >= 3, "the flow run's process was not found under the worker"
        assert flow_run_state(api, run_id)["type"] == "RUNNING" and active_slots(api) == 1

        # 4. nobody is left to say so: the zombie automation marks it Crashed...
        state = wait_for("the run is marked Crashed", lambda: (s := flow_run_state(api, run_id))["type"] == "CRASHED"
                         and s, 400, every=2)
        assert ZOMBIE_MESSAGE in (state.get("message") or "")
        print(f"Crashed {time.monotonic() - killed_at:.0f} s after the kill")
        # ...the repossessor frees the recovery slot once its lease runs out...
        wait_for("the recovery slot is released", lambda: active_slots(api) == 0, 400, every=2)
        print(f"slot released {time.monotonic() - killed_at:.0f} s after the kill")
        # ...and on-call is told, by the server (the dead worker ran no hook)
        run_name = api_get(api, f"/flow_runs/{run_id}")["name"]
        wait_for("the crash notice reaches on-call",
                 lambda: [x for x in hook.texts() if "CRASHED" in x and run_name in x], 120, every=1)
        notice = next(x for x in hook.texts() if "CRASHED" in x)
        assert ZOMBIE_MESSAGE in notice and incident in notice

        # 5. the same incident, re-run on a new worker, resumes and completes
        workers.append(start_worker(api, tmp_path, "worker-2"))
        rerun_id = create_run(api, "data-loss/apply-development", params)
        final = wait_for("the re-run ends", lambda: (s := flow_run_state(api, rerun_id)).get("type") in (
            "COMPLETED", "FAILED", "CRASHED", "CANCELLED") and s, 600, every=2, alive=workers[1])
        assert final["type"] == "COMPLETED", (final, (tmp_path / "worker-2.log").read_text()[-3000:])
        assert live_env.query("SELECT id FROM markers ORDER BY id") == [(i,) for i in range(1, 21)]
        # exactly one PTR server was made for the incident (its name is deterministic; deleted at the end)
        assert [d.name for d in servers.list_dropped_servers()] == [ptr_server_name(live_env.target.server, t)]
        assert not [s.name for s in servers.list_servers() if s.tags.get(TAG_INCIDENT) == incident]
        assert active_slots(api) == 0
    finally:
        for w in workers:
            stop(w)
        hook.close()
