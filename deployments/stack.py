"""The Prefect machinery a drill runs on: a self-hosted server, the `dr` work pool, a deployment, a worker.

Thin wrappers over Prefect's own commands and client, used by `dr server start`,
`dr worker start`, `dr deploy` and `dr drill --on-worker`:

1. `start_server` runs `prefect server start` (SQLite under `.dr-local/prefect`, analytics
   off, with its services: the triggers that crash runs without heartbeats and the
   repossessor that frees the leased recovery slot) and `wait_until_healthy` waits for it.
2. `ensure_work_pool` creates the process work pool `dr` when it is missing.
3. `deploy` runs `prefect deploy` on prefect.yaml in the project directory.
4. `start_worker` runs `prefect worker start --pool dr` with `DR_HOME` set, which the
   deployments' pull step (`set_working_directory: {{ $DR_HOME }}`) reads in each flow run.
5. `run_deployment_to_end` starts a deployment run and waits for its final state.

Everything started here is a process group of its own and is stopped with `stop`. The
project's persistent server, which every `dr` command records its runs on, is
dr/prefect_server.py (it starts `server_command` detached, with the UI).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dr.errors import DrError

POOL = "dr"
#: seconds between a flow run's heartbeats on workers started here (Prefect's minimum is 30)
HEARTBEAT_SECONDS = 60
#: the first start of a server migrates its SQLite database: over a minute on a busy 2-core machine
SERVER_START_TIMEOUT = 240.0
DEFAULT_PORT = 4200


class PrefectStackError(DrError):
    """The Prefect server, work pool, deployment or worker could not be brought up or did not answer."""


def project_dir() -> Path:
    """The project directory: `$DR_HOME`, else the checkout this package is installed from."""
    home = os.environ.get("DR_HOME")
    return Path(home).absolute() if home else Path(__file__).resolve().parents[1]


def prefect_home(project: Optional[Path] = None) -> Path:
    """Where a server started here keeps its SQLite database: `<project>/.dr-local/prefect`, or without a
    project the local Prefect server's home (`$PREFECT_HOME`, else `./.dr-local/prefect`)."""
    if project is None:
        from dr.prefect_server import default_home

        return default_home()
    return project / ".dr-local" / "prefect"


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_port(preferred: int = DEFAULT_PORT) -> int:
    """4200 (Prefect's usual port) when it is free, else any free port."""
    return preferred if port_free(preferred) else free_port()


def api_healthy(api_url: str, timeout: float = 5) -> bool:
    import httpx

    try:
        return httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def prefect_env(api_url: Optional[str] = None, **extra: str) -> dict[str, str]:
    """This process's environment for a Prefect child: analytics off, the given API (or none), extras."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_KEY")}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.update(extra)
    return env


def prefect_cmd(*args: str) -> list[str]:
    """`prefect <args>` with this interpreter (the worker's flow runs then use the same venv)."""
    return [sys.executable, "-m", "prefect", *args]


@dataclass
class Started:
    """A process this module started, in a process group of its own."""

    what: str
    proc: subprocess.Popen
    log: Path

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 20) -> None:
        """SIGTERM the process group, SIGKILL after `grace` seconds."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


def _spawn(what: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> Started:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Started(what, proc, log)


# --- 1. the server -----------------------------------------------------------------------------


@dataclass
class Server:
    url: str          # http://127.0.0.1:<port>
    process: Optional[Started] = None  # None: a server this module did not start

    @property
    def api(self) -> str:
        return f"{self.url}/api"


def server_command(host: str, port: int, *, ui: bool = True, scheduler: bool = True) -> list[str]:
    cmd = prefect_cmd("server", "start", "--host", host, "--port", str(port), "--analytics-off")
    if not ui:
        cmd.append("--no-ui")
    if not scheduler:
        cmd.append("--no-scheduler")
    return cmd


def server_env(home: Path, **extra: str) -> dict[str, str]:
    """A server's environment: its own PREFECT_HOME (SQLite there unless a database URL is set), analytics off."""
    home.mkdir(parents=True, exist_ok=True)
    env = prefect_env(None, PREFECT_HOME=str(home), PREFECT_SERVER_LOGGING_LEVEL="WARNING")
    env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env


def start_server(home: Optional[Path] = None, *, port: Optional[int] = None, ui: bool = False,
                 scheduler: bool = True, env: Optional[dict[str, str]] = None) -> Server:
    """Start `prefect server start` in the background, with its services; `wait_until_healthy` next.

    Args:
        home: the server's PREFECT_HOME (default `.dr-local/prefect` in the project).
        port: the port (default 4200 when free, else a free one).
        ui: serve the UI too (slower to start; the drill does not need it).
        scheduler: run the scheduler service (a throwaway drill server turns it off so that the
            monthly schedule never starts a second drill while it runs).
        env: extra environment for the server (e.g. PREFECT_SERVER_SERVICES_* settings).
    """
    home = home or prefect_home()
    port = port or pick_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn("prefect server", server_command("127.0.0.1", port, ui=ui, scheduler=scheduler),
                  server_env(home, **(env or {})), home / "server.log", home)
    return Server(url, proc)


def wait_until_healthy(server: Server, timeout: float = SERVER_START_TIMEOUT) -> None:
    """Wait for the server's /api/health (its first start migrates the database)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process and server.process.proc.poll() is not None:
            raise PrefectStackError(f"the Prefect server exited with code {server.process.proc.returncode}:\n"
                                    f"{server.process.tail()}")
        if api_healthy(server.api, timeout=5):
            return
        time.sleep(0.5)
    raise PrefectStackError(f"the Prefect server at {server.url} did not answer within {timeout:.0f} s "
                            f"(log: {server.process.log if server.process else 'not started here'})")


# --- 2. the work pool ---------------------------------------------------------------------------


def ensure_work_pool(api_url: str, name: str = POOL) -> bool:
    """Create the process work pool when it is missing; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            return False
        return True


def online_workers(api_url: str, pool: str = POOL) -> list[str]:
    """Names of the pool's workers the server sees as online."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            workers = client.read_workers_for_work_pool(pool)
        except Exception:  # no such pool yet
            return []
    return [w.name for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"]


# --- 3. deployments -----------------------------------------------------------------------------


def deploy(api_url: str, names: Optional[list[str]] = None, *, project: Optional[Path] = None,
           timeout: float = 600) -> str:
    """`prefect deploy --all` (or `--name <flow>/<deployment>` each) on the project's prefect.yaml.

    Returns:
        Prefect's output.

    Raises:
        PrefectStackError: prefect deploy failed; its output is in the message.
    """
    project = project or project_dir()
    args = ["--no-prompt", "deploy"]
    if names:
        for n in names:
            args += ["--name", n]
    else:
        args.append("--all")
    r = subprocess.run(prefect_cmd(*args), cwd=project, env=prefect_env(api_url, DR_HOME=str(project)),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise PrefectStackError(f"prefect deploy failed (exit code {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return r.stdout


def list_deployments(api_url: str) -> list[str]:
    """Every deployment on the server, as `<flow>/<deployment>`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        return sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in client.read_deployments())


# --- 4. the worker ------------------------------------------------------------------------------


def worker_env(api_url: str, project: Optional[Path] = None, **extra: str) -> dict[str, str]:
    """A worker's environment: the API, DR_HOME for the pull step, flow-run heartbeats."""
    project = project or project_dir()
    env = prefect_env(api_url, DR_HOME=str(project))
    env.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS))
    env.update(extra)
    return env


def worker_command(pool: str = POOL, *, name: Optional[str] = None, limit: Optional[int] = None) -> list[str]:
    cmd = prefect_cmd("worker", "start", "--pool", pool, "--type", "process")
    if name:
        cmd += ["--name", name]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def start_worker(api_url: str, *, pool: str = POOL, name: Optional[str] = None, log: Optional[Path] = None,
                 project: Optional[Path] = None, env: Optional[dict[str, str]] = None) -> Started:
    """Start `prefect worker start --pool dr` in the background (picks up runs within seconds)."""
    project = project or project_dir()
    log = log or prefect_home(project) / "worker.log"
    wenv = worker_env(api_url, project, PREFECT_WORKER_QUERY_SECONDS="2", **(env or {}))
    return _spawn("prefect worker", worker_command(pool, name=name), wenv, log, project)


def wait_for_worker(api_url: str, worker: Started, *, pool: str = POOL, name: Optional[str] = None,
                    timeout: float = 120) -> None:
    """Wait until the server sees the worker online (it then polls the pool)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise PrefectStackError(f"the worker exited with code {worker.proc.returncode}:\n{worker.tail()}")
        found = online_workers(api_url, pool)
        if (name in found) if name else found:
            return
        time.sleep(1)
    raise PrefectStackError(f"the worker did not come online within {timeout:.0f} s:\n{worker.tail()}")


# --- 5. a deployment run ------------------------------------------------------------------------


@dataclass
class RunOutcome:
    id: str
    name: str
    state_type: str            # COMPLETED, FAILED, CRASHED, CANCELLED, ...
    state_name: str
    message: str
    artifacts: list[dict[str, Any]]


def run_deployment_to_end(api_url: str, deployment: str, parameters: dict[str, Any], *, timeout: float = 3600,
                          watch: Optional[Any] = None, on_created: Optional[Any] = None) -> RunOutcome:
    """Create a run of `deployment` (`<flow>/<deployment>`), wait for its final state, read its artifacts.

    Args:
        api_url: the Prefect API.
        deployment: `<flow name>/<deployment name>`.
        parameters: the run's parameters.
        timeout: how long to wait for a final state.
        watch: called with each new state name while waiting (e.g. to print progress).
        on_created: called with (run id, run name) once the run exists.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        run = client.create_flow_run_from_deployment(dep.id, parameters=parameters)
        if on_created:
            on_created(str(run.id), run.name)
        deadline = time.monotonic() + timeout
        last = None
        while True:
            run = client.read_flow_run(run.id)
            state = run.state
            if state and state.name != last:
                last = state.name
                if watch:
                    watch(state.name)
            if state and state.is_final():
                break
            if time.monotonic() > deadline:
                raise PrefectStackError(f"flow run {run.name} ({run.id}) is still {last} after {timeout:.0f} s; "
                                        "it goes on without this command")
            time.sleep(2)
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    artifacts = []
    for a in arts:
        data = a.data
        if isinstance(data, str) and a.type == "table":
            try:
                data = json.loads(data)
            except ValueError:
                pass
        artifacts.append({"key": a.key, "type": a.type, "description": a.description, "data": data})
    return RunOutcome(str(run.id), run.name, state.type.value, state.name, state.message or "", artifacts)


def cancel_leftover_runs(api_url: str, deployment: str) -> list[str]:
    """Cancel the deployment's runs that are due but not started (left by an interrupted earlier command).

    Scheduled runs still in the future (the monthly schedule) and runs that are Running or
    Paused (another terminal's drill may be live) are left alone. Returns the cancelled runs' names.
    """
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelled

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[
                StateType.SCHEDULED, StateType.PENDING]))))
        now = datetime.now(timezone.utc)
        runs = [r for r in runs if r.state.type == StateType.PENDING or (r.expected_start_time or now) <= now]
        for run in runs:
            client.set_flow_run_state(run.id, Cancelled(message="left by an interrupted `dr drill --on-worker`"),
                                      force=True)
    return [r.name for r in runs]


# --- the drill, end to end ------------------------------------------------------------------------

DRILL_DEPLOYMENT = "dr-drill/apply-development"


@dataclass
class DrillOnWorker:
    """What `drill_on_worker` ran and what came back."""

    api_url: str
    outcome: RunOutcome
    started: list[str]

    @property
    def passed(self) -> bool:
        return self.outcome.state_type == "COMPLETED"

    def table(self) -> tuple[Optional[str], list[dict[str, Any]], Optional[str]]:
        """(drill id, one row per scenario, report path) from the run's table artifact."""
        import re

        for a in self.outcome.artifacts:
            if a["type"] == "table" and (a["key"] or "").startswith("drill-"):
                m = re.match(r"DR drill (\S+?)(?:; report (.+))?$", a["description"] or "")
                rows = a["data"] if isinstance(a["data"], list) else []
                return (m.group(1) if m else None), rows, (m.group(2) if m else None)
        return None, [], None


def drill_on_worker(parameters: dict[str, Any], *, say: Any = print, deployment: str = DRILL_DEPLOYMENT,
                    timeout: float = 3600, heartbeat_seconds: int = HEARTBEAT_SECONDS) -> DrillOnWorker:
    """Run the drill the way the schedule does: server, work pool, deployment, worker, deployment run.

    With PREFECT_API_URL set, that server is used; without it, the project's local Prefect
    server (dr/prefect_server.py, started if needed and left running, so that the run stays in
    its UI). Only what is missing is started: a worker when none of the pool's is online, which
    is stopped before this function returns.

    Args:
        parameters: the drill's parameters (service, environment, scenario, config_path).
        say: prints a line of progress for a person.
        deployment: the drill deployment, `<flow>/<deployment>`.
        timeout: how long to wait for the drill run to end.
        heartbeat_seconds: heartbeat interval of a worker started here (the zombie automation's beat).
    """
    from deployments.automations import ensure_automations
    from dr import prefect_server

    project = project_dir()
    started: list[Started] = []
    api = os.environ.get("PREFECT_API_URL")
    own = False
    try:
        # 1. the server: the configured one, or the project's own (left running: the run stays in its UI)
        if api:
            if not api_healthy(api):
                raise PrefectStackError(f"PREFECT_API_URL is {api} but no Prefect server answers there "
                                        "(start it, or unset PREFECT_API_URL to use the local Prefect server)")
            say(f"Prefect server  {api} (PREFECT_API_URL)")
        else:
            server = prefect_server.ensure(say=say)
            api, own = server.api, True
            say(f"Prefect server  {server.url} (the local one, state in {server.home}; it keeps running with "
                "the run in its UI: `dr local down` stops it)")
        # 2. the work pool, the drill deployment from prefect.yaml, the automations
        ensure_work_pool(api)
        deploy(api, [deployment], project=project)
        ensure_automations(heartbeat_seconds, api_url=api)
        say(f"deployment      {deployment} on work pool {POOL} (from {project / 'prefect.yaml'})")
        if own:  # the local server: runs an interrupted earlier drill left due would run first
            for name in cancel_leftover_runs(api, deployment):
                say(f"cancelled       {name}, left by an interrupted earlier drill")
        # 3. a worker, unless one is online
        online = online_workers(api)
        if online:
            say(f"worker          {', '.join(online)} (already online)")
        else:
            name = f"dr-drill-{os.getpid()}"
            worker = start_worker(api, name=name, project=project,
                                  env={"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_seconds)})
            started.append(worker)
            wait_for_worker(api, worker, name=name)
            say(f"worker          {name} (process worker, log {worker.log})")
        # 4. the run
        outcome = run_deployment_to_end(
            api, deployment, parameters, timeout=timeout,
            on_created=lambda rid, rname: say(f"flow run        {rname} ({rid})"),
            watch=lambda state: say(f"                {state}"))
        return DrillOnWorker(api, outcome, [s.what for s in started])
    finally:
        for s in reversed(started):
            s.stop()
            say(f"stopped         the {s.what} this command started")
