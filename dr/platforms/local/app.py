"""`AppControl` for the local stand-in app: processes for replicas, a flag for maintenance.

`apps/<key>/app.json` is the single record of the app: ports, the desired replica
counts, the counts recorded before a scale-down (so they are restored exactly), and
the maintenance flag. Every change is written there first and then applied, so a
crash between the two is repaired by running the same command again. The router reads
the flag on every request: once it is written, users see the maintenance page (or, with
the router down, no answer at all), never the app.

A failure half-way says what the app looks like now (maintenance, what users see, which
processes run, the recorded counts) and which command finishes the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from dr.commands import child_env
from dr.errors import DrError, InvalidInput, OperationTimedOut, PlatformError
from dr.platforms.base import AppControl, AppStatus
from dr.platforms.local.servers import free_port

ROLES = ("web", "worker")
#: the processes of the local app (see its docstring)
WEBAPP = Path(__file__).with_name("webapp.py")
#: the commands that finish a half-done switch (each step is skipped when already done)
RESUME_ON = ("run the same command again once the cause is fixed (`dr maintenance on --stop-app`, or the "
             "scenario with the same --incident): it keeps the replica counts recorded first")
RESUME_OFF = "run `dr maintenance off` again once the cause is fixed: it restores the recorded replica counts"


class LocalApp(AppControl):
    """The local app of one service environment."""

    def __init__(self, state_dir: Path, key: str, *, server: str, database: str):
        self.state_dir = Path(state_dir).absolute()
        self.key = key
        self.dir = self.state_dir / "apps" / key
        self.json = self.dir / "app.json"
        self.server, self.database = server, database

    # --- record ---------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        if not self.json.exists():
            raise PlatformError(f"the local app '{self.key}' is not set up; run: dr local up")
        return json.loads(self.json.read_text())

    def _save(self, app: dict[str, Any]) -> None:
        tmp = self.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(app, indent=2))
        os.replace(tmp, self.json)

    # --- processes -------------------------------------------------------------------

    def _alive(self, pid: int | None, role: str) -> bool:
        if not pid:
            return False
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        ours = any(a == b"dr.platforms.local.webapp" or a.endswith(b"/webapp.py") for a in cmd)
        return ours and role.encode() in cmd and self.key.encode() in cmd

    def _spawn(self, role: str) -> int:
        log = open(self.dir / f"{role}.log", "ab")
        proc = subprocess.Popen(
            # run as a script (-P: its directory is not put on sys.path), so it does not import the
            # whole dr package first: the three processes start in a third of the time
            [sys.executable, "-P", str(WEBAPP), role, "--state-dir", str(self.state_dir), "--key", self.key],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, env=child_env(),
        )
        return proc.pid

    def _gone(self, pid: int, role: str) -> bool:
        """Whether a process we signalled has ended: no longer there, a zombie, or another program's.

        Not `not _alive`: while a process exits, its command line reads empty before it is done.
        """
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True
        if stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X"):
            return True
        return bool(cmd) and not self._alive(pid, role)

    def _kill(self, pid: int | None, role: str) -> None:
        if not self._alive(pid, role):
            return
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while not self._gone(pid, role) and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.02)
        if not self._gone(pid, role):
            os.kill(pid, signal.SIGKILL)

    def _wait_http(self, port: int, role: str, pid: int | None, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=2)
                return
            except httpx.HTTPError:
                if not self._alive(pid, role):  # it died (e.g. its port is taken): no point waiting
                    raise PlatformError(f"the {role} of the local app '{self.key}' exited instead of answering on "
                                        f"port {port}; see {self.dir}/{role}.log") from None
                time.sleep(0.05)
        raise OperationTimedOut(f"the {role} of the local app '{self.key}' did not answer on port {port} within "
                                f"{timeout:.0f} s; see {self.dir}/{role}.log")

    def _world(self) -> str:
        """What the app looks like now: the maintenance flag, what users see, the processes, the recorded counts."""
        try:
            app = self._load()
        except (OSError, ValueError, DrError) as exc:
            return f"unknown: the app's record {self.json} cannot be read ({exc})"
        pids = app.get("pids") or {}
        up = {role: self._alive(pids.get(role), role) for role in ("router", *ROLES)}
        if not up["router"]:
            users = "users get no answer (the router is not running)"
        elif app.get("maintenance"):
            users = "users see the maintenance page"
        elif up["web"]:
            users = "users reach the app"
        else:
            users = "users get an error page (no web replica is running)"
        running = ", ".join(f"{role} {'running' if up[role] else 'stopped'}" for role in ROLES)
        before = app.get("replicas_before")
        recorded = (f"the replica counts from before the scale-down are recorded: {before}" if before is not None
                    else "no replica counts recorded")
        return f"maintenance {'on' if app.get('maintenance') else 'off'}; {users}; {running}; {recorded}"

    @contextlib.contextmanager
    def _step(self, doing: str, resume: str) -> Iterator[None]:
        """A failure inside says what it was doing, what the app looks like now, and how to finish."""
        try:
            yield
        except InvalidInput:
            raise
        except DrError as exc:
            exc.annotate(step=doing, world_state=self._world(), resume_hint=resume)
            raise
        except OSError as exc:
            raise PlatformError(f"local app '{self.key}': {exc}").annotate(
                step=doing, world_state=self._world(), resume_hint=resume) from exc

    def _apply(self, app: dict[str, Any]) -> None:
        """Make the running processes match the record."""
        pids = app.setdefault("pids", {})
        router_started = False
        if not self._alive(pids.get("router"), "router"):
            pids["router"] = self._spawn("router")
            router_started = True
        for role in ROLES:
            want = app["replicas"][role]
            running = self._alive(pids.get(role), role)
            if want and not running:
                pids[role] = self._spawn(role)
            elif not want and running:
                self._kill(pids.get(role), role)
                pids[role] = None
        self._save(app)
        if router_started:
            self._wait_http(app["main_port"], "router", pids["router"])
        if app["replicas"]["web"]:
            self._wait_http(app["web_port"], "web", pids.get("web"))

    # --- lifecycle used by `dr local up/down` ------------------------------------------

    def up(self) -> AppStatus:
        """Create the app record if needed and start its processes (idempotent)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.json.exists():
            self._save({
                "server": self.server, "database": self.database,
                "main_port": free_port(), "temp_port": free_port(), "web_port": free_port(),
                "replicas": {"web": 1, "worker": 1}, "replicas_before": None, "maintenance": False, "pids": {},
            })
        self._apply(self._load())
        return self.get_status()

    def down(self) -> None:
        """Stop every process of the app; the record stays."""
        if not self.json.exists():
            return
        app = self._load()
        pids = app.get("pids", {})
        for role in ("router", *ROLES):  # all at once, then wait for each
            if self._alive(pids.get(role), role):
                os.kill(pids[role], signal.SIGTERM)
        for role in ("router", *ROLES):
            self._kill(pids.get(role), role)
        app["pids"] = {}
        self._save(app)

    # --- AppControl -----------------------------------------------------------------

    def get_status(self) -> AppStatus:
        app = self._load()
        pids = app.get("pids", {})
        running = {r: (1 if self._alive(pids.get(r), r) else 0) for r in ROLES}
        return AppStatus(
            maintenance=bool(app["maintenance"]), replicas=running, recorded_replicas=app.get("replicas_before"),
            main_url=f"http://127.0.0.1:{app['main_port']}",
            temp_url=f"http://127.0.0.1:{app['temp_port']}" if app["maintenance"] else None,
        )

    def scale(self, replicas: dict[str, int]) -> None:
        for role, n in replicas.items():
            if role not in ROLES or n not in (0, 1):
                raise InvalidInput(f"the local app runs 0 or 1 replica of web and worker; got {role}={n}")
        app = self._load()
        app["replicas"].update(replicas)
        self._save(app)
        self._apply(app)

    def scale_down(self) -> dict[str, int]:
        with self._step("scale down", RESUME_ON):
            app = self._load()
            if app.get("replicas_before") is None:
                app["replicas_before"] = dict(app["replicas"])
                self._save(app)  # recorded before anything is stopped
            self.scale({r: 0 for r in ROLES})
            return dict(app["replicas_before"])

    def scale_up(self) -> dict[str, int]:
        with self._step("scale up", RESUME_OFF):
            app = self._load()
            before = app.get("replicas_before")
            if before is None:
                self._apply(app)
                return dict(app["replicas"])
            self.scale(before)
            app = self._load()
            app["replicas_before"] = None  # forgotten only once the recorded counts run
            self._save(app)
            return dict(before)

    def enable_maintenance(self) -> AppStatus:
        with self._step("enable maintenance", RESUME_ON):
            app = self._load()
            if not app["maintenance"]:
                app["maintenance"] = True
                self._save(app)  # from here on the router shows the maintenance page
            self._apply(app)
            return self.get_status()

    def disable_maintenance(self) -> AppStatus:
        with self._step("disable maintenance", RESUME_OFF):
            app = self._load()
            if app["maintenance"]:
                app["maintenance"] = False
                self._save(app)
            self._apply(app)
            return self.get_status()
