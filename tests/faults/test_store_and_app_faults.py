"""Fault 12 of the catalogue: the local app's maintenance switch failing half-way.

(Fault 3, the store's connection reset during an upload or a download, is in
tests/azure/test_azure_store_faults.py, beside the Azurite fixtures it needs.)

The local app (`LocalApp`) is a router process (the ingress: the main URL, or the
maintenance page while the flag in `apps/<key>/app.json` is on; the temporary URL always
to the app), a web process and a worker process. The faults are injected at the boundary,
on real processes: the OS refuses to signal one replica during a scale-down (`os.kill`
raises EPERM for that pid only), and the router is SIGKILLed with its port taken by
another socket, so that it cannot come back while maintenance is being switched on.

Each asserts: the error says what the app looks like now and how to finish; the same call
run again repairs it; the replica counts recorded before the scale-down are restored
exactly at the end; and, polling the main URL all along as a user would, nobody sees the
live app from the moment it is stopped until maintenance is switched off, while the
database is being replaced.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from dr.backup import backup_name, take_backup
from dr.commands import PgTools
from dr.errors import PlatformError
from dr.platforms.local.app import LocalApp
from dr.restore import restore_backup
from tests.faults.harness import (
    alive,
    assert_nothing_lost,
    assert_says_world_state,
    kill,
    live_state,
    snapshot,
)

NORMAL = {"web": 1, "worker": 1}


def record(app: LocalApp) -> dict[str, Any]:
    return json.loads(app.json.read_text())


@pytest.fixture
def app(shared_env: Any) -> Iterator[LocalApp]:
    """The shared environment's app, normal (maintenance off, web and worker running); left normal."""
    local: LocalApp = shared_env.platform.app
    st = local.get_status()
    assert not st.maintenance and st.replicas == NORMAL and st.recorded_replicas is None, st
    yield local
    local.disable_maintenance()
    local.scale_up()
    local.scale(NORMAL)


@contextmanager
def signals_refused(pid: int) -> Iterator[list[int]]:
    """The OS refuses to signal `pid` (EPERM), as for a process of another user; other pids are untouched."""
    real_kill, refused = os.kill, []

    def refusing_kill(target: int, sig: int) -> None:
        if target == pid:
            refused.append(sig)
            raise PermissionError(1, "Operation not permitted")
        real_kill(target, sig)

    os.kill = refusing_kill
    try:
        yield refused
    finally:
        os.kill = real_kill


@contextmanager
def router_down_and_port_taken(app: LocalApp) -> Iterator[int]:
    """SIGKILL the router and hold its main port, so that a new router cannot listen there."""
    rec = record(app)
    pid, port = rec["pids"]["router"], rec["main_port"]
    kill(pid)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    # another program takes the port (SO_REUSEADDR: past the TIME_WAIT of the router's last connections);
    # it answers nothing: every connection is reset at once
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen(16)
    squatter.settimeout(0.1)
    stop = threading.Event()

    def reset_all() -> None:
        while not stop.is_set():
            try:
                conn, _ = squatter.accept()
            except OSError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=reset_all, name="squatter", daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(5)
        squatter.close()


class Users:
    """A user loading `url` every 50 ms; each answer is filed under the phase it was asked and answered in."""

    def __init__(self, url: str):
        self.url, self.phase = url, "before"
        self.seen: dict[str, list[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="users", daemon=True)

    @staticmethod
    def what(r: httpx.Response) -> str:
        if r.headers.get("x-dr-maintenance") == "on":
            return "maintenance page"
        if r.status_code == 502 and "no app replica is running" in r.text:
            return "no replica"
        return f"the app ({r.status_code})"  # the live app, even when it shows its own error page

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                phase = self.phase
                try:
                    saw = self.what(client.get(self.url))
                except httpx.HTTPError:
                    saw = "no answer"
                # an answer that straddles a phase change belongs to neither: on a loaded machine the request
                # can leave after the next phase's action (CI once filed the app, seen after maintenance off,
                # under the phase before it)
                if self.phase == phase:
                    self.seen.setdefault(phase, []).append(saw)
                time.sleep(0.05)

    def __enter__(self) -> "Users":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def saw(self, phase: str) -> set[str]:
        return set(self.seen.get(phase, []))


def healthcheck(url: str) -> tuple[int, dict]:
    r = httpx.get(url.rstrip("/") + "/healthcheck", timeout=10)
    return r.status_code, (r.json() if r.headers.get("content-type", "").startswith("application/json") else {})


class TestScaleDownFailingHalfway:
    def test_the_error_says_so_and_the_same_command_repairs_it(self, app):
        worker = record(app)["pids"]["worker"]
        with signals_refused(worker) as refused, pytest.raises(PlatformError) as err:
            app.scale_down()
        assert refused == [signal.SIGTERM]
        # half-way: counts recorded first, web stopped, the worker still running
        st = app.get_status()
        assert st.recorded_replicas == NORMAL and st.replicas == {"web": 0, "worker": 1} and not st.maintenance
        text = str(err.value)
        assert_says_world_state(err.value)
        assert "failed during scale down" in text and "Operation not permitted" in text, text
        assert "maintenance off" in text and "web stopped, worker running" in text, text
        assert f"recorded: {NORMAL}" in text and "to resume: run the same command again" in text, text
        # the same command: finishes the job, keeps the first recording (not the half-stopped counts)
        assert app.scale_down() == NORMAL
        st = app.get_status()
        assert st.replicas == {"web": 0, "worker": 0} and st.recorded_replicas == NORMAL
        assert not alive(worker)
        # and the way back restores exactly the recorded counts
        app.enable_maintenance()
        assert app.scale_up() == NORMAL
        st = app.disable_maintenance()
        assert st.replicas == NORMAL and st.recorded_replicas is None and not st.maintenance
        assert healthcheck(st.main_url)[0] == 200


class TestMaintenanceSwitchFailingHalfway:
    def test_the_error_says_so_and_the_same_command_repairs_it(self, app):
        with router_down_and_port_taken(app) as port:
            with pytest.raises(PlatformError) as err:
                app.enable_maintenance()
            # half-way: maintenance recorded on, the router down; users get no answer, never the app
            assert record(app)["maintenance"] is True
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        text = str(err.value)
        assert_says_world_state(err.value)
        assert "failed during enable maintenance" in text and "router" in text and "router.log" in text, text
        assert "maintenance on; users get no answer (the router is not running)" in text, text
        assert "to resume: run the same command again" in text, text
        # the same command, its port free again: the router is back, with the maintenance page
        st = app.enable_maintenance()
        assert st.maintenance and st.temp_url
        r = httpx.get(st.main_url, timeout=10)
        assert r.status_code == 503 and r.headers["x-dr-maintenance"] == "on"
        assert healthcheck(st.temp_url)[0] == 200  # the temporary URL reaches the app
        st = app.disable_maintenance()
        assert not st.maintenance and healthcheck(st.main_url)[0] == 200


class TestUsersNeverSeeTheAppWhileTheDatabaseIsReplaced:
    def test_both_faults_then_the_restore_behind_the_maintenance_page(self, shared_env, app):
        env, tools = shared_env, PgTools.default()
        # the counts to restore: web only (the worker was stopped by someone before the incident)
        app.scale({"worker": 0})
        wanted = {"web": 1, "worker": 0}
        # a backup of the live database, then a change to it that the restore must undo
        name = backup_name("apply", "dv", "adhoc", "custom-zstd", datetime.now(timezone.utc), "app-fault")
        held = live_state(env)
        take_backup(env.platform.servers, env.platform.store, tools, server=env.target.server,
                    database=env.target.database, name=name, kind="adhoc")
        env.query("INSERT INTO providers (code, name, address) VALUES ('APPFLT', 'after the backup', '{}')")
        world = snapshot(env)
        web = record(app)["pids"]["web"]

        with Users(app.get_status().main_url + "/healthcheck") as users:
            time.sleep(0.3)
            # 1. stop the app: the OS refuses to stop web; the same command repairs it
            users.phase = "stop the app, failing"
            with signals_refused(web), pytest.raises(PlatformError) as stop_err:
                app.scale_down()
            time.sleep(0.3)
            assert "web running" in str(stop_err.value) and f"recorded: {wanted}" in str(stop_err.value)
            users.phase = "stop the app, again"
            assert app.scale_down() == wanted
            # 2. maintenance on: the router is killed and cannot come back; the same command repairs it
            users.phase = "stopped"
            time.sleep(0.3)
            users.phase = "maintenance on, failing"
            with router_down_and_port_taken(app):
                with pytest.raises(PlatformError) as maint_err:
                    app.enable_maintenance()
                time.sleep(0.3)
            assert_says_world_state(maint_err.value)
            users.phase = "maintenance on, again"
            app.enable_maintenance()
            # 3. replace the database
            users.phase = "replace the database"
            time.sleep(0.3)
            result = restore_backup(env.platform.servers, env.platform.store, tools, server=env.target.server,
                                    database=env.target.database, backup=name)
            time.sleep(0.3)
            # 4. restart the app behind the maintenance page: exactly the recorded counts
            users.phase = "restart behind the maintenance page"
            assert app.scale_up() == wanted
            st = app.get_status()
            assert st.replicas == wanted and st.recorded_replicas is None and st.maintenance
            status, body = healthcheck(st.temp_url)  # the person validating sees the restored data
            assert status == 200 and body["status"] == "ok"
            time.sleep(0.3)
            # 5. users back (the phase changes first: a request sent during the switch may see the app)
            users.phase = "maintenance off"
            app.disable_maintenance()
            deadline = time.monotonic() + 10
            while sum(s.startswith("the app") for s in users.seen.get("maintenance off", [])) < 2:
                assert time.monotonic() < deadline, users.seen.get("maintenance off")
                time.sleep(0.1)

        # what users saw: the app only before it was stopped and after maintenance was off
        assert all(len(users.seen.get(phase, [])) >= 2 for phase in (
            "stop the app, failing", "stopped", "maintenance on, failing", "replace the database",
            "restart behind the maintenance page", "maintenance off")), users.seen
        assert "the app (200)" in users.saw("stop the app, failing")  # web could not be stopped: still serving
        # stopped: the router says there is no replica (or, on a loaded machine, does not answer in time): never the app
        assert "no replica" in users.saw("stopped") and users.saw("stopped") <= {"no replica", "no answer"}
        assert users.saw("maintenance on, failing") <= {"no replica", "no answer"}
        assert "no answer" in users.saw("maintenance on, failing")
        assert users.saw("maintenance on, again") <= {"no answer", "maintenance page"}
        assert users.saw("replace the database") == {"maintenance page"}
        assert users.saw("restart behind the maintenance page") == {"maintenance page"}
        assert users.saw("maintenance off") >= {"the app (200)"}
        # the restored data is live, the old database kept aside, nothing else changed; web only, as before
        assert result.replaced_database
        assert_nothing_lost(world, snapshot(env), allowed_states=[held], replaced_databases=1)
        assert live_state(env) == held
        assert app.get_status().replicas == wanted
