"""The runbook's two scenarios end to end on the local platform, with pauses and resume."""

from __future__ import annotations

import threading
import time
from zoneinfo import ZoneInfo

import httpx
import pytest

from dr.prefect_api import resume_with_input as resume_flow_run
from dr.errors import ApprovalRefused, InvalidInput, InvalidRestoreTime
from flows.backup import backup_database
from flows.data_loss import data_loss
from flows.server_loss import server_loss
from tests.helpers import make_env, utc_now, wait_a_second

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(autouse=True)
def fast_pauses(monkeypatch):
    monkeypatch.setenv("DR_PAUSE_POLL_SECONDS", "1")


def london(t) -> str:
    return t.astimezone(ZoneInfo("Europe/London")).strftime("%Y-%m-%d %H:%M:%S")


def corrupt(env) -> tuple[list, str]:
    """Marker rows, then the restore time T, then damage after T. Returns (expected rows, T in UK time)."""
    env.query("CREATE TABLE markers (id int PRIMARY KEY, note text)")
    env.query("INSERT INTO markers SELECT g, 'good ' || g FROM generate_series(1, 20) g")
    wait_a_second()
    t = utc_now().replace(microsecond=0)
    wait_a_second()
    env.query("INSERT INTO markers VALUES (21, 'after T')")
    env.query("DELETE FROM markers WHERE id <= 10")
    env.query("UPDATE applications SET personal_statement = 'CORRUPTED' WHERE status = 'draft'")
    return [(i, f"good {i}") for i in range(1, 21)], london(t)


def ptr_servers(env) -> list[str]:
    return [s.name for s in env.platform.servers.list_servers() if s.created_by_us]


def in_thread(fn, **kw):
    box: dict = {}

    def run():
        try:
            box["result"] = fn(**kw)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, box


def wait_paused(flow_name: str, timeout: float = 240):
    """The id of the newest paused run of a flow, once it is paused."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            if runs:
                return runs[0].id
            time.sleep(0.5)
    raise AssertionError(f"no paused {flow_name} run within {timeout} s")


class TestDataLoss:
    def test_end_to_end_restores_exactly_the_rows_before_t(self, live_env):
        expected, t_local = corrupt(live_env)
        r = data_loss(**live_env.kw(), restore_time=t_local, auto_approve=True, incident="inc-e2e")
        assert live_env.query("SELECT id, note FROM markers ORDER BY id") == expected
        assert live_env.scalar("SELECT count(*) FROM applications WHERE personal_statement = 'CORRUPTED'") == 0
        # the flawed state is kept for reconciliation
        safety = live_env.platform.store.get_backup(r["safety_backup"])
        assert safety.kind == "pre-restore-safety" and safety.manifest["rows"]["public.markers"] == 11
        assert live_env.scalar("SELECT count(*) FROM markers", database=r["replaced_database"]) == 11
        # the PTR server is gone, the app is back
        assert not live_env.platform.servers.server_exists(r["ptr_server"])
        st = live_env.platform.app.get_status()
        assert not st.maintenance and st.replicas == {"web": 1, "worker": 1}
        assert httpx.get(st.main_url + "/healthcheck").status_code == 200
        # report with RTO/RPO
        report = open(r["report"]).read()
        assert "RTO (start → validated)" in report and "RPO (data lost)" in report and "inc-e2e" in report
        assert r["rto_seconds"] > 0 and r["rpo_seconds"] > 0
        assert "Schedule the incident retro" in report

    def test_reject_at_the_gate_leaves_the_live_database_untouched_then_resume_finishes(self, live_env):
        expected, t_local = corrupt(live_env)
        damaged = live_env.query("SELECT id, note FROM markers ORDER BY id")
        th, box = in_thread(data_loss, **live_env.kw(), restore_time=t_local, incident="inc-resume")
        run_id = wait_paused("data-loss")
        resume_flow_run(run_id, run_input={"approve": False, "approver": "Ada", "reason": "wrong time"})
        th.join(120)
        assert isinstance(box.get("error"), ApprovalRefused)
        assert "to resume: dr data-loss" in str(box["error"])
        assert live_env.query("SELECT id, note FROM markers ORDER BY id") == damaged
        assert len(ptr_servers(live_env)) == 1
        # re-run the same incident: nothing is made twice, and it completes
        r = data_loss(**live_env.kw(), incident="inc-resume", auto_approve=True)
        assert live_env.query("SELECT id, note FROM markers ORDER BY id") == expected
        backups = live_env.platform.store.list_backups()
        assert len([b for b in backups if b.kind == "pre-restore-safety"]) == 1
        assert len([b for b in backups if b.kind == "ptr"]) == 1
        assert ptr_servers(live_env) == []
        assert r["restore_target_utc"]

    def test_restore_time_is_asked_for_and_re_asked_on_bad_input(self, live_env):
        expected, t_local = corrupt(live_env)
        th, box = in_thread(data_loss, **live_env.kw(), incident="inc-ask", keep_ptr_server=True)
        run_id = wait_paused("data-loss")
        resume_flow_run(run_id, run_input={"restore_time": "2026-10-25 01:30", "timezone_name": "Europe/London",
                                           "approver": "Ada"})  # ambiguous: asked again
        time.sleep(2)
        run_id = wait_paused("data-loss")
        resume_flow_run(run_id, run_input={"restore_time": t_local, "timezone_name": "Europe/London", "approver": "Ada"})
        time.sleep(2)
        run_id = wait_paused("data-loss")  # the approval before the restore
        resume_flow_run(run_id, run_input={"approve": True, "approver": "Ada", "reason": "checked counts"})
        time.sleep(2)
        run_id = wait_paused("data-loss")  # disable maintenance
        resume_flow_run(run_id, run_input={"approve": True, "approver": "Ada"})
        th.join(180)
        assert "error" not in box, box.get("error")
        assert live_env.query("SELECT id, note FROM markers ORDER BY id") == expected
        assert any("Ada" in d and "approved" in d for d in box["result"]["decisions"])
        assert len(ptr_servers(live_env)) == 1  # kept on request

    @pytest.mark.parametrize("kw, error, words", [
        ({"restore_time": "2026-03-29 01:30"}, InvalidRestoreTime, "does not exist"),
        ({"restore_time": "2026-10-25 01:30"}, InvalidRestoreTime, "happened twice"),
        ({"restore_time": "2099-01-01 12:00"}, InvalidInput, "in the future"),
        ({"restore_time": "2026-11-01 12:00", "incident": "x; rm -rf /"}, InvalidInput, "incident id"),
    ])
    def test_bad_input_fails_before_any_side_effect(self, live_env, kw, error, words):
        app_before = live_env.platform.app.get_status()
        with pytest.raises(error, match=words):
            data_loss(**live_env.kw(), auto_approve=True, **kw)
        assert live_env.platform.store.list_backups() == []
        assert ptr_servers(live_env) == []
        assert live_env.platform.app.get_status() == app_before

    def test_unknown_environment_is_refused(self, live_env):
        from dr.errors import ConfigError

        with pytest.raises(ConfigError, match="unknown environment 'qa'"):
            data_loss(service="apply", environment="qa", restore_time="2026-11-01 12:00", config_path=live_env.config_path)


class TestProductionGuards:
    def test_auto_approve_is_refused_for_production(self, base_dir):
        env = make_env(base_dir, "prod-auto", environment="production")
        with pytest.raises(ApprovalRefused, match="refused for production"):
            data_loss(**env.kw(), restore_time="2026-11-01 12:00", auto_approve=True)
        with pytest.raises(ApprovalRefused, match="refused for production"):
            server_loss(**env.kw(), auto_approve=True)
        assert not env.platform.servers.list_servers()

    def test_production_approval_needs_the_typed_environment_name(self, base_dir):
        env = make_env(base_dir, "prod-typed", environment="production")
        try:
            env.up()
            _, t_local = corrupt(env)
            damaged = env.query("SELECT count(*) FROM markers")
            th, box = in_thread(data_loss, **env.kw(), restore_time=t_local, incident="inc-prod")
            run_id = wait_paused("data-loss")
            resume_flow_run(run_id, run_input={"approve": True, "approver": "Bob", "confirm_environment": "prod"})
            time.sleep(2)
            run_id = wait_paused("data-loss")  # asked again: the name was not typed exactly
            resume_flow_run(run_id, run_input={"approve": False, "approver": "Bob", "reason": "stop"})
            th.join(120)
            assert isinstance(box.get("error"), ApprovalRefused)
            assert env.query("SELECT count(*) FROM markers") == damaged
        finally:
            env.discard()


class TestServerLoss:
    def test_revive_brings_back_every_row(self, live_env):
        live_env.query("CREATE TABLE markers AS SELECT g AS id FROM generate_series(1, 33) g")
        live_env.platform.servers.delete_server(live_env.target.server)
        r = server_loss(**live_env.kw(), auto_approve=True, incident="inc-revive")
        assert r["recovery"] == "revived"
        assert live_env.scalar("SELECT count(*) FROM markers") == 33
        assert live_env.platform.app.healthcheck()[0] == 200

    def test_recreate_restores_the_newest_nightly_backup(self, live_env):
        live_env.query("CREATE TABLE markers AS SELECT g AS id FROM generate_series(1, 44) g")
        nightly = backup_database(**live_env.kw(), kind="nightly", backup_format="plain-gzip")
        live_env.query("INSERT INTO markers VALUES (45)")  # after the backup: lost with the server
        live_env.platform.servers.delete_server(live_env.target.server)
        r = server_loss(**live_env.kw(), recovery="recreate", auto_approve=True, incident="inc-recreate")
        assert r["recovery"] == "recreated" and r["backup"] == nightly["name"]
        assert live_env.scalar("SELECT count(*) FROM markers") == 44
        assert live_env.platform.app.healthcheck()[0] == 200
        assert r["rpo_seconds"] is not None and r["rto_seconds"] > 0

    def test_refuses_when_nothing_is_lost(self, live_env):
        with pytest.raises(InvalidInput, match="nothing is lost"):
            server_loss(**live_env.kw(), auto_approve=True)
        assert live_env.platform.app.get_status().maintenance is False

    def test_plan_changes_nothing(self, live_env):
        live_env.platform.servers.delete_server(live_env.target.server)
        r = server_loss(**live_env.kw(), plan_only=True)
        assert "revivable" in r["plan"] and "REVIVE" in r["plan"]
        assert not live_env.platform.servers.server_exists(live_env.target.server)
        assert not live_env.platform.app.get_status().maintenance
