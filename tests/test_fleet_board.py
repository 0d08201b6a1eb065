"""The DR readiness board (`dr status`, `dr-readiness`) and the fleet check's alerts, on real servers and runs.

One small fleet for the module, service `board` on the local platform:

- production: a real nightly backup with its restore test (green), and a PTR server a
  point-in-time restore left behind (listed; amber once older than a day);
- development: a real nightly backup, drills scheduled but none run (overdue: amber), and a
  data-loss run paused at its first gate, waiting for a person (listed with its link);
- qa (RPO 60 min, no drills): only a nightly backup 3 h old, fabricated in the store (red).

Ages past a threshold (a day for leftovers, the approval timeout) are shown by building the
board for a later `now`; everything else is the state of the servers, store and runs as they are.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from dr.config import load_config
from dr.fleet.board import AMBER, GREEN, RED, build_board, ui_base
from dr.platforms.base import TAG_INCIDENT, BackupInfo
from tests.fleet_support import REPO, cli_env, dr, make_servers, write_fleet_config
from tests.helpers import remove_later
from tests.processes import DATA_LOSS_RUNNER, stop_group

pytestmark = pytest.mark.usefixtures("prefect_server")

SLACK_ENV = "DR_TEST_FLEET_SLACK"
SERVICES = {"board": {"production": "", "development": "", "qa": "rpo_minutes = 60\ndrill = false\n"}}
GATE = "start-the-recovery-1"


def findings(row, level=None):
    return [f for f in row.findings if level is None or f.level == level]


def wait_paused(run_file: Path, proc: subprocess.Popen, timeout: float = 240) -> str:
    """The id of the paused data-loss run of service `board`, once it waits at its first gate."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState, \
        FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            for run in client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["data-loss"])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                        any_=[StateType.PAUSED])))):
                if (run.parameters or {}).get("service") == "board":
                    return str(run.id)
            if proc.poll() is not None:
                raise AssertionError(f"the data-loss run ended instead of pausing: {run_file.read_text()}")
            time.sleep(0.5)
    raise AssertionError("the data-loss run did not pause")


@pytest.fixture(scope="module")
def fleet(base_dir):
    from dr.platforms import get_platform
    from flows.nightly import nightly_backup
    from flows.ptr import ptr_server_name

    root = base_dir / f"board-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    root.chmod(0o755)
    path = write_fleet_config(root, SERVICES, 'name = "board"\nwork_pool = "fleetboard"\n',
                              extra=f'\n[notifications]\nslack_webhook_env = "{SLACK_ENV}"\n')
    cfg = load_config(path)
    prod, dev, qa = (cfg.target("board", e) for e in ("production", "development", "qa"))
    make_servers(cfg, [prod, dev, qa])
    kw = {"service": "board", "config_path": str(path)}
    nightly_backup(environment="production", verify="always", **kw)
    nightly_backup(environment="development", verify="never", **kw)
    # qa: only a nightly backup from three hours ago (another tool's name format: no clash with today's)
    old = datetime.now(timezone.utc) - timedelta(hours=3)
    name = f"board_qa_{old:%Y-%m-%d}.sql.gz"
    with get_platform(cfg, qa).store.writer(name) as w:
        w.write(b"old backup")
        w.commit(BackupInfo(name=name, size=0, complete=True, kind="nightly", created_at=old, finished_at=old))
    # production: the PTR server an incident left behind
    servers = get_platform(cfg, prod).servers
    when = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=1)
    while when < servers.get_restore_window(prod.server).earliest:
        time.sleep(0.5)
        when = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=1)
    ptr = servers.point_in_time_restore(prod.server, ptr_server_name(prod.server, when), when,
                                        tags={TAG_INCIDENT: "inc-board-1"})
    # development: a data-loss recovery waiting for a person before it changes anything
    out = root / "data-loss.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", DATA_LOSS_RUNNER, json.dumps({**kw, "environment": "development",
                                                               "wait_for_go_ahead": True, "incident": "inc-board-2"}),
         str(out)], cwd=REPO, env=cli_env(DR_PAUSE_POLL_SECONDS="1"), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        run_id = wait_paused(out, proc)
        yield {"path": path, "config": cfg, "ptr": ptr.name, "paused": run_id, "qa_backup": name}
    finally:
        try:
            from dr.prefect_api import resume_with_input

            if proc.poll() is None:
                resume_with_input(__import__("uuid").UUID(run_id), {"approve": False, "approver": "board test",
                                                                     "reason": "test over"})
                proc.wait(120)
        finally:
            stop_group(proc)
            from dr.platforms.local import lifecycle

            lifecycle.down(cfg)
            remove_later(root)


@pytest.fixture(scope="module")
def board(fleet):
    return build_board(fleet["config"])


class TestRows:
    def test_a_fresh_backup_with_a_verified_restore_is_green(self, fleet, board):
        row = board.row("board", "production")
        assert row.status == GREEN, row.reason
        assert row.reason.startswith("protected: backup ") and "(RPO 26.0 h)" in row.reason
        assert row.backup["name"].startswith("board_pd_") and row.backup["age_seconds"] < 600
        assert row.verify["result"] == "PASS" and row.verify["backup"] == row.backup["name"]
        assert row.drill is None and not row.drill_scheduled and row.server == {"name": "t-board-pd-pg",
                                                                                 "state": "Ready"}
        # the PTR server is listed with its age, but a young one is an incident's, not a leftover yet
        assert [x["name"] for x in row.leftovers] == [fleet["ptr"]] and row.leftovers[0]["kind"] == "PTR server"

    def test_a_stale_backup_is_red_with_its_age(self, fleet, board):
        row = board.row("board", "qa")
        assert row.status == RED
        [stale] = [f for f in findings(row, RED) if f.alert == "backup-stale:board-qa"]
        assert stale.text == f"last complete backup {fleet['qa_backup']} is 3.0 h old, over the RPO of 60 min"
        assert "is 3.0 h old" in row.reason and row.backup["rpo_seconds"] == 3600

    def test_an_overdue_drill_is_amber(self, board):
        row = board.row("board", "development")
        assert row.status == AMBER and not findings(row, RED)
        [drill] = [f for f in findings(row, AMBER) if f.alert == "drill-overdue:board-development"]
        assert drill.text == "drill overdue: none in the last 42 days"
        assert row.drill_scheduled and not [f for f in board.row("board", "qa").findings if "drill" in f.text]

    def test_a_paused_incident_is_listed_with_what_it_waits_for_and_its_link(self, fleet, board):
        row = board.row("board", "development")
        [rec] = row.recoveries
        assert rec["id"] == fleet["paused"] and rec["flow"] == "data-loss" and rec["state"] == "Paused"
        assert rec["waiting_for"] == "waiting for approval: start the recovery"
        assert rec["link"] == f"{ui_base()}/runs/flow-run/{fleet['paused']}" and ui_base().startswith("http")
        assert any(f.level == AMBER and f.text.startswith("recovery in progress: data-loss run") for f in row.findings)
        # once it has waited longer than its approval timeout (8 h), the row is red and fleet-check alerts
        later = build_board(fleet["config"], now=datetime.now(timezone.utc) + timedelta(hours=9))
        [late] = [f for f in later.row("board", "development").findings if f.alert == f"recovery-waiting:{fleet['paused']}"]
        assert late.level == RED and "(approval timeout 8.0 h)" in late.text and rec["link"] in late.text

    def test_a_ptr_server_left_behind_for_a_day_is_amber(self, fleet):
        later = build_board(fleet["config"], now=datetime.now(timezone.utc) + timedelta(hours=25))
        row = later.row("board", "production")
        assert row.status == AMBER  # the backup is 25 h old, within its 26 h RPO: the leftover is the only reason
        [left] = row.findings
        assert left.alert == f"leftover:board-production:{fleet['ptr']}"
        assert left.text == f"PTR server {fleet['ptr']} left for 25.0 h (over 24 h): run tidy-up"

    def test_the_board_reads_each_kind_of_fact_once_for_the_whole_fleet(self, board):
        assert board.requests["server listings"] == 1 and board.requests["stores"] == 3
        assert {k: v for k, v in board.requests.items() if k.startswith("prefect:")} == {
            "prefect: nightly runs": 1, "prefect: verify runs": 1, "prefect: drill runs": 1, "prefect: open runs": 1,
            "prefect: artifacts": 1, "prefect: flow names": 1}


class TestStatusCommand:
    def test_json_lists_every_environment_with_its_status(self, fleet):
        r = dr("status", "--json", "--config", str(fleet["path"]))
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert {(e["environment"], e["status"]) for e in doc["environments"]} == {
            ("production", "green"), ("development", "amber"), ("qa", "red")}
        assert doc["summary"] == {"green": 1, "amber": 1, "red": 1}

    def test_the_table_says_why_and_links_the_paused_recovery(self, fleet):
        r = dr("status", "--service", "board", "--config", str(fleet["path"]))
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].startswith("DR readiness at ") and "3 environments, 1 green, 1 amber, 1 red" in lines[0]
        qa = next(x for x in lines if x.startswith("board    qa "))
        assert " RED " in qa and "is 3.0 h old, over the RPO of 60 min" in qa
        assert ("board development: data-loss" in r.stdout and f"/runs/flow-run/{fleet['paused']}" in r.stdout)
        r = dr("status", "--service", "nope", "--config", str(fleet["path"]))
        assert r.returncode == 2 and "unknown service 'nope'" in r.stderr


class TestAlerts:
    """Last in the module: it breaks and fixes production's backup and brings qa's up to date."""

    def test_each_problem_is_notified_once_and_once_more_when_it_clears(self, fleet, monkeypatch):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

        from dr.errors import DrError
        from dr.platforms import get_platform
        from flows.fleet_check import fleet_check
        from flows.nightly import nightly_backup, verify_backup
        from tests.test_worker import Hook

        hook = Hook()
        monkeypatch.setenv(SLACK_ENV, hook.url)
        path, cfg = str(fleet["path"]), fleet["config"]

        def check() -> list[str]:
            seen = len(hook.bodies)
            fleet_check(config_path=path)
            return hook.texts()[seen:]

        try:
            # 1. the first check tells about qa's stale backup and development's overdue drill, one message each
            first = check()
            assert len(first) == 2, first
            assert any(t.startswith("[dr] DR PROBLEM: board qa") and "3.0 h old" in t for t in first)
            assert any(t.startswith("[dr] DR PROBLEM: board development") and "drill overdue" in t for t in first)
            # 2. an hour later nothing new: nothing is said again
            assert check() == []

            # 3. production's newest backup is damaged: the weekly verify fails, the row turns red, one alert
            prod = cfg.target("board", "production")
            store = get_platform(cfg, prod).store
            newest = build_board(cfg).row("board", "production").backup["name"]
            data = store.root / newest
            raw = bytearray(data.read_bytes())
            raw[len(raw) // 2] ^= 0x20
            data.write_bytes(bytes(raw))
            with pytest.raises(DrError):
                verify_backup(service="board", environment="production", config_path=path)
            row = build_board(cfg).row("board", "production")
            assert row.status == RED and row.verify["result"] == "FAIL"
            assert any(f.alert == "verify-failed:board-production" and f.text.startswith("last verify FAILED at ")
                       for f in row.findings)
            broken = check()
            assert len(broken) == 1 and broken[0].startswith("[dr] DR PROBLEM: board production")
            assert "last verify FAILED" in broken[0]
            assert check() == []

            # 4. fixed: the backup restores again, and qa gets tonight's backup; each clears once
            raw[len(raw) // 2] ^= 0x20
            data.write_bytes(bytes(raw))
            verify_backup(service="board", environment="production", config_path=path)
            nightly_backup(service="board", environment="qa", verify="never", config_path=path)
            with get_client(sync_client=True) as client:  # the nightly's hook refreshed the readiness board
                [art] = client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(
                    key=ArtifactCollectionFilterKey(any_=["dr-readiness"])))
            assert "| board | qa | AMBER |" in art.data and "| board | production | GREEN |" in art.data
            cleared = check()
            assert sorted(t.splitlines()[0] for t in cleared) == ["[dr] DR CLEARED: board production",
                                                                  "[dr] DR CLEARED: board qa"], cleared
            assert "no longer: last verify FAILED" in next(t for t in cleared if "production" in t)
            assert check() == []
        finally:
            hook.close()


class TestAlertDelivery:
    def test_a_notice_a_channel_refused_is_sent_again_at_the_next_check(self, fleet, board, monkeypatch):
        """A Slack webhook down for one check: the problem is not recorded as told, and is told next time."""
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from dr.fleet.alerts import check

        answers, bodies = [500, 200, 200], []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                bodies.append(json.loads(self.rfile.read(int(self.headers.get("content-length") or 0))))
                self.send_response(answers.pop(0) if answers else 200)
                self.end_headers()

            def log_message(self, *a) -> None:
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        monkeypatch.setenv(SLACK_ENV, f"http://127.0.0.1:{httpd.server_address[1]}/hook")
        try:
            only_qa = type(board)(board.built_at, board.seconds, [board.row("board", "qa")])
            outcome, open_now = check(fleet["config"], only_qa, {})
            assert [p.key for p in outcome.unsent] == ["backup-stale:board-qa"] and not outcome.opened
            assert "backup-stale:board-qa" not in {p.key for p in open_now}  # not recorded as told
            outcome, open_now = check(fleet["config"], only_qa, {p.key: p for p in open_now})
            assert [p.key for p in outcome.opened] == ["backup-stale:board-qa"] and not outcome.unsent
            outcome, _ = check(fleet["config"], only_qa, {p.key: p for p in open_now})
            assert not outcome.opened and outcome.messages == 0
            assert len(bodies) == 2 and all(b["text"].startswith("[dr] DR PROBLEM: board qa") for b in bodies)
        finally:
            httpd.shutdown()
