"""Processes the tests start themselves: a Prefect server of their own, and stopping what they started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx
import pytest

#: a data-loss run in a process of its own: `python -c RUNNER '<kwargs json>' <result file>`
DATA_LOSS_RUNNER = """
import json, sys
from flows.data_loss import data_loss
kw, out = json.loads(sys.argv[1]), sys.argv[2]
try:
    res = {"ok": True, "result": data_loss(**kw)}
except BaseException as exc:
    res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
with open(out, "w") as f:
    json.dump(res, f, default=str)
"""

#: the pause keys of the data-loss gates (flows.approval._key(f"{gate}-{attempt}"))
GATE_RESTORE = "restore-into-the-live-database-1"
GATE_MAINTENANCE = "disable-maintenance-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_without_prefect(**extra: str) -> dict[str, str]:
    """This process's environment minus every PREFECT_ setting (the session's test server), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.update(extra)
    return env


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process started with `start_new_session=True`, with its session (uvicorn's and workers' children)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


class PrefectServer:
    """`prefect server start --no-services` on a fixed port with its own SQLite home; restartable.

    Args:
        root: where its home, database and logs go.
        ui: serve the UI too (its static files are built into `root`, not into site-packages).
        extra_env: more settings for the server process.
    """

    def __init__(self, root: Path, *, ui: bool = False, extra_env: dict[str, str] | None = None):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api"
        self.ui = ui
        self.extra_env = dict(extra_env or {})
        self.starts = 0
        self.proc: subprocess.Popen | None = None
        self.log = root / "prefect-server.log"

    def start(self) -> "PrefectServer":
        """Start the process (it boots while the caller goes on: see `wait_ready`)."""
        self.starts += 1
        self.log = self.root / f"prefect-server-{self.starts}.log"
        env = env_without_prefect(PREFECT_HOME=str(self.root / "server-home"), PREFECT_API_URL=self.api,
                                  PREFECT_SERVER_LOGGING_LEVEL="WARNING",
                                  PREFECT_SERVER_UI_ENABLED="true" if self.ui else "false", **self.extra_env)
        if self.ui:
            env.update(PREFECT_SERVER_UI_STATIC_DIRECTORY=str(self.root / "ui-static"),
                       PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false")
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                 "--no-services"], env=env, cwd=self.root, stdin=subprocess.DEVNULL, stdout=fh,
                stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 240, also: Callable[[], bool] = lambda: True) -> None:
        """Until the API answers its health check (and `also()` holds); fails the test with the log if not."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prefect server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.api}/health", timeout=5).status_code == 200 and also():
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        pytest.fail(f"prefect server not up within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
