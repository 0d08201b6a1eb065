"""For teams: the Prefect server itself on PostgreSQL (one of the local platform's servers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from urllib.parse import quote

import httpx
import pytest

from dr.database import create_database
from dr.platforms.local.servers import free_port


def test_prefect_server_runs_on_postgresql_and_records_a_flow_run(fresh_env, tmp_path):
    servers = fresh_env.platform.servers
    servers.create_server("prefect-db-pg", archive=False)
    conn = servers.connection("prefect-db-pg", "prefect")
    create_database(servers.connection("prefect-db-pg", "postgres"), "prefect")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
        # the password reaches the server through its environment, never argv
        PREFECT_API_DATABASE_CONNECTION_URL=(f"postgresql+asyncpg://{conn.user}:{quote(conn.password, safe='')}"
                                             f"@{conn.host}:{conn.port}/prefect"),
    )
    srv = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                            str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the Prefect server on PostgreSQL did not start within 180 s")
        assert conn.password.encode() not in open(f"/proc/{srv.pid}/cmdline", "rb").read()
        code = ("from prefect import flow\n"
                "@flow(name='pg-backed-check')\n"
                "def f():\n    return 42\n"
                "print(f())\n")
        run_env = {**env, "PREFECT_API_URL": api}
        run_env.pop("PREFECT_API_DATABASE_CONNECTION_URL")
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0 and out.stdout.strip().endswith("42"), out.stderr[-2000:]
        # the run is recorded in PostgreSQL, not in a SQLite file
        rows = fresh_env.query("SELECT f.name, s.type FROM flow_run r JOIN flow f ON f.id = r.flow_id "
                               "JOIN flow_run_state s ON s.id = r.state_id", database="prefect", server="prefect-db-pg")
        assert ("pg-backed-check", "COMPLETED") in rows
    finally:
        os.killpg(srv.pid, signal.SIGTERM)
        srv.wait(30)
