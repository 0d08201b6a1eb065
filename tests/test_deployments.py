"""Deployments: prefect.yaml registers every flow, a process worker runs one; the recovery lock."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from prefect import flow

from dr.runtime import Ref
from flows.common import recovery_lock
from tests.processes import stop_group

pytestmark = pytest.mark.usefixtures("prefect_server")
ROOT = Path(__file__).resolve().parents[1]
FLOW_MODULES = ["backup", "restore", "ptr", "maintenance", "validate", "tidy_up", "data_loss", "server_loss",
                "nightly", "drill"]


def spec() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def api_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), DR_HOME=str(ROOT), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=api_env(), capture_output=True,
                          text=True, timeout=timeout)


class TestPrefectYaml:
    def test_every_flow_has_a_deployment_whose_entrypoint_loads(self):
        from prefect import Flow

        deployed = set()
        for d in spec()["deployments"]:
            path, fn = d["entrypoint"].split(":")
            mod = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            obj = getattr(mod, fn)
            assert isinstance(obj, Flow), d["entrypoint"]
            assert d["work_pool"]["name"] == "dr"
            assert d["parameters"].get("service", "apply") == "apply"  # fleet-check is for the whole fleet
            deployed.add(obj.name)
        flows_found = {getattr(importlib.import_module(f"flows.{m}"), n).name
                       for m in FLOW_MODULES for n in dir(importlib.import_module(f"flows.{m}"))
                       if isinstance(getattr(importlib.import_module(f"flows.{m}"), n), Flow)}
        assert flows_found <= deployed, flows_found - deployed

    def test_schedules_keep_away_from_the_clock_change_hour(self):
        scheds = {d["entrypoint"]: d.get("schedules", []) for d in spec()["deployments"]}
        nightly = scheds["flows/nightly.py:nightly_backup"][0]
        drill = scheds["flows/drill.py:dr_drill"][0]
        verify = scheds["flows/nightly.py:verify_backup"][0]
        assert nightly == {"cron": "0 4 * * *", "timezone": "Europe/London"}
        assert drill["cron"] == "0 10 1-7 * 2" and drill["day_or"] is False and drill["timezone"] == "Europe/London"
        assert verify == {"cron": "0 6 * * 0", "timezone": "Europe/London", "day_or": False}
        for s in (nightly, drill, verify):
            hour = int(s["cron"].split()[1])
            assert hour not in (1, 2)


@pytest.fixture(scope="module")
def deployed():
    r = cli("work-pool", "create", "dr", "--type", "process", "--overwrite")
    assert r.returncode == 0, r.stderr
    r = cli("deploy", "--all", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


class TestRegisteredDeployments:
    def test_deploy_all_registers_every_deployment_with_its_schedule(self, deployed):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            deps = client.read_deployments()
            names = {(client.read_flow(d.flow_id).name, d.name) for d in deps}
            assert ("data-loss", "apply-development") in names and ("dr-drill", "apply-development") in names
            assert len([n for n in names if n[1] == "apply-development"]) == len(spec()["deployments"]) - 1
            assert ("fleet-check", "s189") in names
            nightly = client.read_deployment_by_name("nightly-backup/apply-development")
            crons = [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules]
            assert crons == [("0 4 * * *", "Europe/London")]
            dl = client.read_deployment_by_name("data-loss/apply-development")
            assert dl.concurrency_limit == 1 or (dl.global_concurrency_limit and dl.global_concurrency_limit.limit == 1)

    def test_a_deployment_run_executes_on_a_process_worker(self, deployed, live_env):
        from prefect.deployments import run_deployment

        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "dr",
                                   "--limit", "2"], cwd=ROOT, env=api_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            run = run_deployment("validate-service/apply-development",
                                 parameters={"config_path": live_env.config_path}, timeout=240)
            assert run.state.is_completed(), run.state
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                arts = client.read_artifacts()
            assert any(a.key == "validation-apply-development" for a in arts)
        finally:
            stop_group(worker)  # a worker slow to stop under load is killed: the run is what is tested here


#: what the holders below signal to each other (flow parameters must be plain values)
_INSIDE = {"development": threading.Event(), "production": threading.Event()}
_ARRIVED = {"development": 0, "production": 0}
_ARRIVALS = threading.Condition()


@flow
def _hold(service: str, environment: str, other: str, expected: int) -> tuple[float, float, bool]:
    """Hold the environment's recovery slot until a recovery of `other` is inside its own, and
    every recovery of this environment has come to ask for the slot."""
    with _ARRIVALS:
        _ARRIVED[environment] += 1
        _ARRIVALS.notify_all()
    with recovery_lock(Ref(service, environment)):
        start = time.monotonic()
        _INSIDE[environment].set()
        met = _INSIDE[other].wait(60)
        with _ARRIVALS:
            met = _ARRIVALS.wait_for(lambda: _ARRIVED[environment] >= expected, 60) and met
        time.sleep(1)  # a second recovery of this environment, asking now, would be let in by now if it could
        return start, time.monotonic(), met


def test_one_recovery_per_environment_at_a_time():
    """Two recoveries of development run one after the other; production's runs beside them.

    A development holder keeps its slot until production's holder is inside (production waiting
    for development's slot would show as a 60-s wait that never met it) and until the other
    development recovery is asking for the slot (so it would be inside at once if it were let in)."""
    results: dict[str, tuple[float, float, bool]] = {}

    def go(key: str, env: str, other: str, expected: int) -> None:
        results[key] = _hold("apply", env, other, expected)

    for e in _INSIDE.values():
        e.clear()
    _ARRIVED.update(development=0, production=0)
    threads = [threading.Thread(target=go, args=a) for a in
               (("dev-1", "development", "production", 2), ("dev-2", "development", "production", 2),
                ("prod", "production", "development", 1))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(180)
    a, b, p = results["dev-1"], results["dev-2"], results["prod"]
    first, second = sorted([a, b])
    assert second[0] >= first[1] - 0.05, "two recoveries of the same environment overlapped"
    assert p[2] and first[2], "production's recovery waited for development's slot: they should run side by side"
    assert p[0] < first[1] and p[1] > first[0], "production's recovery did not overlap development's first one"


def test_zombie_runs_automation_is_registered_once():
    from prefect.automations import Automation

    from deployments.automations import ZOMBIE_AUTOMATION, ensure_automations

    try:  # another module's `dr deploy` may have registered it on this session's server already
        Automation.read(name=ZOMBIE_AUTOMATION).delete()
    except ValueError:
        pass
    assert ensure_automations(heartbeat_seconds=60) == [ZOMBIE_AUTOMATION]
    assert ensure_automations(heartbeat_seconds=60) == []
    a = Automation.read(name=ZOMBIE_AUTOMATION)
    assert a.trigger.posture.value == "Proactive" and a.trigger.within.total_seconds() == 180
    assert a.trigger.after == {"prefect.flow-run.heartbeat"}
    assert a.actions[0].type == "change-flow-run-state" and a.actions[0].state.value == "CRASHED"


def test_crashed_runs_are_announced_to_the_configured_webhooks():
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from deployments.automations import CRASH_NOTICE_AUTOMATION, ensure_automations

    url = "https://hooks.example.invalid/services/T000/B000/not-a-real-secret"
    assert CRASH_NOTICE_AUTOMATION in ensure_automations(heartbeat_seconds=60, webhooks={"slack": url})
    assert ensure_automations(heartbeat_seconds=60, webhooks={"slack": url}) == []
    a = Automation.read(name=CRASH_NOTICE_AUTOMATION)
    assert a.trigger.expect == {"prefect.flow-run.Crashed"} and a.trigger.posture.value == "Reactive"
    assert [x.type for x in a.actions] == ["send-notification"]
    block = CustomWebhookNotificationBlock.load("dr-oncall-slack")
    assert url not in block.url  # the URL is kept as the block's secret
    request = block._build_request_args(body="the body", subject="the subject")
    assert request["url"] == url and request["json"] == {"text": "the subject\nthe body"}
    assert a.actions[0].block_document_id == block._block_document_id
