"""The project's one persistent Prefect server: where every `dr` command records its runs, with the UI on.

Without `PREFECT_API_URL`, a `dr` command that runs a flow (or answers one) uses the server
recorded in `<PREFECT_HOME>/server.json` (PREFECT_HOME defaults to `.dr-local/prefect` in
the working directory, beside the local platform's state), and starts it when it is not
running. The server runs `prefect server start` with its services (the repossessor frees
an expired recovery-slot lease, the triggers run the automations) and its UI, detached in a
process group of its own, so it outlives the command that started it; `dr local down` stops
it. Why persistent: Prefect's temporary server costs 10-15 s per command, keeps the runs in a
database no UI shows, runs no services (a dead run's recovery slot is never freed) and is
left behind as an orphan when its command is killed.

The port is never assumed (other Prefect servers may run on the machine): the one recorded
last time when it is free, else one the OS picks. `PREFECT_API_URL`, when set, always wins.

1. `resolve` decides which server a command uses (`PREFECT_API_URL`, the recorded one, a new
   one, or, only when no server can be started, Prefect's temporary server, said in one line).
2. `ensure` starts the server unless it answers (one starter at a time: a lock file).
3. `running` reads the record and checks that the process is that server and it answers.
4. `stop` ends the server's process group and removes the record.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from dr.errors import DrError

RECORD = "server.json"
PORT = "server.port"   # the last port, kept after a stop: the UI's address stays the same
LOCK = "server.lock"
LOG = "server.log"
#: the first start migrates the SQLite database: a minute or more on a busy 2-core machine
START_TIMEOUT_SECONDS = 240.0


class LocalServerError(DrError):
    """The project's Prefect server could not be started or stopped."""


@dataclass
class LocalServer:
    """A running (or recorded) server: its address and the process group it runs in."""

    home: str
    url: str
    pid: int
    port: int
    started_at: str

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def run_url(self, flow_run_id: object) -> str:
        """The UI page of one flow run."""
        return f"{self.url}/runs/flow-run/{flow_run_id}"


def default_home() -> Path:
    """Where the server keeps its SQLite database and record: `$PREFECT_HOME`, else `./.dr-local/prefect`."""
    return Path(os.environ.get("PREFECT_HOME") or Path(".dr-local") / "prefect").expanduser().absolute()


def ui_url(api_url: str) -> str:
    """`http://host:port/api` -> `http://host:port` (where Prefect serves its UI)."""
    return api_url.rstrip("/").removesuffix("/api")


def read_record(home: Path) -> Optional[LocalServer]:
    try:
        data = json.loads((home / RECORD).read_text())
        return LocalServer(**{k: data[k] for k in ("home", "url", "pid", "port", "started_at")})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_our_server(pid: int) -> bool:
    """The process `pid` exists and is a `prefect server start` (not another process that reused the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): the pid exists, the health check decides
    return b"prefect" in b" ".join(cmdline) and b"server" in cmdline and b"start" in cmdline


def healthy(api_url: str, timeout: float = 3.0) -> bool:
    """The server answers `GET /api/health` (stdlib only: this runs on fast paths)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def running(home: Optional[Path] = None, *, timeout: float = 3.0) -> Optional[LocalServer]:
    """The recorded server when its process lives and it answers; else None."""
    home = home or default_home()
    rec = read_record(home)
    if rec is None or not _is_our_server(rec.pid):
        return None
    # a server under load can take a while to answer: retry until `timeout` while the process lives
    deadline = time.monotonic() + timeout
    while True:
        if healthy(rec.api, timeout=max(0.5, deadline - time.monotonic())):
            return rec
        if time.monotonic() >= deadline or not _is_our_server(rec.pid):
            return None
        time.sleep(0.2)


class _Lock:
    """An exclusive lock on `<home>/server.lock` (one command starts or stops the server at a time)."""

    def __init__(self, home: Path):
        home.mkdir(parents=True, exist_ok=True)
        self.path = home / LOCK
        self.fh = None

    def __enter__(self) -> "_Lock":
        import fcntl

        self.fh = open(self.path, "a")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        if self.fh:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()


def _port_for(home: Path) -> int:
    """The port recorded last time when it is free (the UI's address stays the same), else a free one."""
    from deployments.stack import free_port, port_free

    try:
        last = int((home / PORT).read_text())
    except (OSError, ValueError):
        last = 0
    if last and port_free(last):
        return last
    return free_port()


def ensure(home: Optional[Path] = None, *, say: Callable[[str], None] = lambda _: None,
           timeout: float = START_TIMEOUT_SECONDS) -> LocalServer:
    """The project's server, started (detached, with UI and services) unless it already answers.

    Args:
        home: the server's PREFECT_HOME (default `default_home()`).
        say: prints one line for a person when a server is being started.
        timeout: how long to wait for a new server's first answer.

    Raises:
        LocalServerError: the server exited or did not answer in time (its log is named).
    """
    from deployments.stack import server_command, server_env

    home = home or default_home()
    found = running(home)
    if found:
        return found
    with _Lock(home):
        found = running(home)  # another command may have started it while this one waited
        if found:
            return found
        last_error = ""
        for _attempt in range(2):  # a port taken between choosing and binding: once more on another
            port = _port_for(home)
            url = f"http://127.0.0.1:{port}"
            log = home / LOG
            with open(log, "ab") as fh:  # a file, not a pipe: the server outlives this command
                import subprocess

                proc = subprocess.Popen(server_command("127.0.0.1", port, ui=True), env=server_env(home),
                                        cwd=home, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            rec = LocalServer(str(home), url, proc.pid, port, datetime.now(timezone.utc).isoformat(timespec="seconds"))
            # recorded before the wait: a command stopped now leaves a server `dr local down` knows about
            (home / RECORD).write_text(json.dumps(asdict(rec), indent=2) + "\n")
            (home / PORT).write_text(f"{port}\n")
            say(f"starting the local Prefect server: UI {url} (state in {home}; the first start prepares its "
                "database, up to a minute; `dr local down` stops it)")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    last_error = f"it exited with code {proc.returncode}"
                    break
                if healthy(rec.api, timeout=2):
                    return rec
                time.sleep(0.3)
            else:
                _stop_pid(proc.pid)
                (home / RECORD).unlink(missing_ok=True)
                raise LocalServerError(f"the local Prefect server did not answer within {timeout:.0f} s (log: {log})")
            (home / RECORD).unlink(missing_ok=True)
        raise LocalServerError(f"the local Prefect server could not start: {last_error} (log: {home / LOG})")


def _stop_pid(pid: int, grace: float = 20.0) -> None:
    """SIGTERM the server's process group (uvicorn and its children), SIGKILL after `grace` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it when it is our child (the command that started it is stopping it)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop(home: Optional[Path] = None) -> Optional[LocalServer]:
    """Stop the recorded server (if its process still runs) and forget it; the server that was stopped."""
    home = home or default_home()
    with _Lock(home):
        rec = read_record(home)
        if rec is None:
            return None
        alive = _is_our_server(rec.pid)
        if alive:
            _stop_pid(rec.pid)
        (home / RECORD).unlink(missing_ok=True)
        return rec if alive else None


@dataclass
class Resolved:
    """Which Prefect server a command uses, and why."""

    api_url: Optional[str]   # None: Prefect's temporary server
    how: str                 # "PREFECT_API_URL", "local", or "temporary"
    server: Optional[LocalServer] = None


def resolve(*, say: Callable[[str], None], start: bool = True) -> Resolved:
    """Point this process at the server its runs belong on, before Prefect is imported.

    `PREFECT_API_URL` wins. Else the project's server, started unless `start` is False. Only
    when it cannot be started does the command fall back to Prefect's temporary server, and
    `say` tells the person so in one line (the run then shows in no UI).
    """
    api = os.environ.get("PREFECT_API_URL")
    if api:
        if not healthy(api, timeout=10):
            from dr.errors import ConfigError

            raise ConfigError(f"PREFECT_API_URL is {api} but no Prefect server answers there: start it, or unset "
                              "PREFECT_API_URL to use the local Prefect server", world_state="nothing was changed")
        return Resolved(api, "PREFECT_API_URL")
    home = default_home()
    try:
        srv = ensure(home, say=say) if start else running(home)
    except (LocalServerError, OSError) as exc:
        srv = None
        say(f"note: {exc}; this run uses Prefect's temporary server instead and will not show in any UI")
    if srv is None:
        return Resolved(None, "temporary")
    os.environ["PREFECT_API_URL"] = srv.api
    # plain http on 127.0.0.1: no certificate to verify, and Prefect's clients would each load the CA
    # bundle for nothing (~0.15 s of CPU apiece, three per flow run)
    os.environ.setdefault("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "true")
    return Resolved(srv.api, "local", srv)
