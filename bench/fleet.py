"""The fleet: nightly backups of many environments on one worker, Prefect's overhead, the board's cost.

    python bench/fleet.py [--size 10mb] [--slots 1,2,4] [--simulate 200] [--json out.json]

This is a benchmark, not a test. It builds a fleet of 12 environments (3 services x 4
environments) on the local platform, each a real PostgreSQL server with a sample database of
`--size`, registers it with `dr deploy` on a Prefect server of its own (with its services, as
in production) and starts one process worker. Then:

1. single backups: each environment's backup taken alone, in this process, without Prefect
   (`take_backup`: pg_dump | zstd into the store); their sum is the serial cost of the night;
2. the night at 1, 2 and 4 slots (`[fleet] max_parallel_backups`, the work queue `backups`):
   every nightly-backup deployment run created at once, as the 04:00 schedule does. Wall
   time = first run created to last run ended. Speed-up = sum of singles / wall time;
   parallel efficiency = speed-up / slots. Prefect's overhead per environment = (wall time at
   1 slot - sum of singles) / environments: starting a flow-run process, the engine, the run's
   tasks and hooks, the worker's polling. The worker's peak memory (its process and its flow-run
   processes, RSS summed, sampled every 100 ms) is recorded for each setting;
3. the board (`dr status`): built warm in this process (median of 3) and cold (`dr status --json`
   in a new process, imports included) for the 12 environments, then for `--simulate` environments
   whose Prefect runs and artifacts (2 nightly, 1 verify, a drill for non-production, a few paused
   recoveries) and store entries (3 backups each) are fabricated; they point at the 12 real servers.

Each round deletes the nightly backups it made, so the next round's can be written (nightly
backups are named by date). The machine is shared: under load every figure moves; the
ratios move less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SERVICES = ("alpha", "beta", "gamma")
ENVS = ("development", "test", "qa", "production")
SIM_ENVS = ("development", "test", "qa", "preproduction", "production")

CONFIG = """
prefix = "bf"
timezone = "Europe/London"

[local]
state_dir = "{state}"
wal_segment_mb = 1

[fleet]
name = "{name}"
work_pool = "bench-fleet"
max_parallel_backups = {slots}
"""


@dataclass
class Results:
    machine: str = ""
    size: str = ""
    environments: int = 12
    singles: list[float] = field(default_factory=list)
    nights: dict[int, dict[str, float]] = field(default_factory=dict)
    deploy: dict[str, float] = field(default_factory=dict)
    board: dict[str, dict[str, float]] = field(default_factory=dict)


def say(text: str) -> None:
    print(text, flush=True)


def write_config(root: Path, name: str, slots: int, envs: list[tuple[str, str, str]], drills: bool = False) -> Path:
    """envs: (service, environment, extra lines); without `drills` no drill is scheduled (the bench runs none)."""
    text = CONFIG.format(state=root / "state", name=name, slots=slots)
    for s, e, extra in envs:
        text += f'\n[services.{s}.environments.{e}]\nplatform = "local"\n{extra}'
        if not drills and e != "production":
            text += "drill = false\n"
    path = root / f"{name}.toml"
    path.write_text(text)
    return path


class MemorySampler:
    """Peak RSS of a process and its descendants, sampled every 100 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.1):
            try:
                p = psutil.Process(self.pid)
                procs = [p, *p.children(recursive=True)]
                total = 0
                for q in procs:
                    try:
                        total += q.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(2)


def run_env(api: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false", DR_HOME=str(ROOT), **extra)
    return env


def make_fleet(cfg: Any, size: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from dr.database import create_database, database_exists
    from dr.platforms.local import local_servers
    from dr.platforms.local.sample import load_sample, scale_for_size

    servers = local_servers(cfg)

    def one(t: Any) -> None:
        if not servers.server_exists(t.server):
            servers.create_server(t.server)
        admin = servers.connection(t.server, "postgres")
        if not database_exists(admin, t.database):
            create_database(admin, t.database)
        load_sample(servers.connection(t.server, t.database), scale_for_size(size))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, cfg.targets()))


def single_backups(cfg: Any) -> list[float]:
    from dr.backup import backup_name, take_backup
    from dr.commands import PgTools
    from dr.platforms import get_platform

    out = []
    for t in cfg.targets():
        p = get_platform(cfg, t)
        name = backup_name(t.service, t.env_short, "adhoc", "custom-zstd", datetime.now(timezone.utc), "bench")
        started = time.monotonic()
        take_backup(p.servers, p.store, PgTools.default(), server=t.server, database=t.database, name=name,
                    kind="adhoc", fmt="custom-zstd")
        out.append(time.monotonic() - started)
        p.store.delete_backup(name)
    return out


def delete_nightlies(cfg: Any) -> None:
    from dr.platforms import get_platform

    for t in cfg.targets():
        store = get_platform(cfg, t).store
        for b in store.list_backups():
            if b.kind == "nightly":
                store.delete_backup(b.name)


def night(api: str, cfg: Any, worker_pid: int, timeout: float = 1800) -> dict[str, float]:
    """Every nightly run at once, as the schedule does: wall time, overheads, the worker's peak memory."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags, FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dr.fleet import fleet_tag
    from dr.platforms import get_platform

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows(limit=200)}
        deps = [d for d in client.read_deployments(deployment_filter=DeploymentFilter(
            tags=DeploymentFilterTags(all_=[fleet_tag(cfg)])), limit=200) if flows[d.flow_id] == "nightly-backup"]
        with MemorySampler(worker_pid) as mem:
            created = time.time()
            ids = [client.create_flow_run_from_deployment(d.id, parameters={"verify": "never"}).id for d in deps]
            deadline = time.monotonic() + timeout
            while True:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
                if all(r.state and r.state.is_final() for r in runs):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"the night did not end within {timeout:.0f} s")
                time.sleep(0.5)
    bad = [f"{r.name}: {r.state.name} {r.state.message}" for r in runs if not r.state.is_completed()]
    if bad:
        raise SystemExit("nightly runs failed: " + "; ".join(bad))
    backups = {}
    for t in cfg.targets():
        for b in get_platform(cfg, t).store.list_backups():
            if b.kind == "nightly" and b.finished_at:
                backups[(t.service, t.environment)] = (b.finished_at - b.created_at).total_seconds()
    wall = max(r.end_time.timestamp() for r in runs) - created
    run_over = [(r.end_time - r.start_time).total_seconds() - backups[(r.parameters["service"],
                                                                        r.parameters["environment"])] for r in runs]
    start_lag = [r.start_time.timestamp() - created for r in runs]
    return {"wall": wall, "backup_sum_in_runs": sum(backups.values()),
            "run_overhead_median": statistics.median(run_over), "first_start": min(start_lag),
            "worker_peak_mb": mem.peak / 2**20}


# --- the board at 200 ---------------------------------------------------------------------------------


def simulate(root: Path, api: str, real: Any, n: int) -> Path:
    """A configuration of `n` environments on the real servers, with fabricated store entries and Prefect runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Completed, Paused, Running

    from dr.config import load_config
    from dr.platforms import get_platform
    from dr.platforms.base import BackupInfo

    servers = [t for t in real.targets()]
    envs = []
    for i in range(n):
        s, e = f"s{i // len(SIM_ENVS):02d}", SIM_ENVS[i % len(SIM_ENVS)]
        live = servers[i % len(servers)]
        envs.append((s, e, f'server = "{live.server}"\ndatabase = "{live.database}"\n'))
    path = write_config(root, "sim", 4, envs, drills=True)
    cfg = load_config(path)
    now = datetime.now(timezone.utc)
    for t in cfg.targets():
        store = get_platform(cfg, t).store
        for d in range(3):
            when = now - timedelta(days=d, hours=1)
            name = f"{t.service}_{t.env_short}_{when:%Y-%m-%d}.pgdump.zst"
            if not store.backup_exists(name):
                with store.writer(name) as w:
                    w.write(b"x")
                    w.commit(BackupInfo(name=name, size=0, complete=True, kind="nightly", created_at=when,
                                        finished_at=when))

    async def fabricate() -> int:
        from prefect import flow

        made = 0
        flows = {name: flow(name=name)(lambda: None) for name in ("nightly-backup", "verify-backup", "dr-drill",
                                                                  "data-loss")}
        gate = asyncio.Semaphore(3)  # a SQLite server answers 503 when it is pushed harder

        async def retried(call: Any) -> Any:
            """A busy SQLite server answers 503: wait and ask again."""
            for attempt in range(6):
                try:
                    return await call()
                except Exception as exc:  # noqa: BLE001
                    if "503" not in str(exc) or attempt == 5:
                        raise
                    await asyncio.sleep(2 * (attempt + 1))

        async def one(client: Any, fname: str, t: Any, final: Any, artifact: ArtifactCreate | None = None) -> None:
            nonlocal made
            async with gate:
                run = await retried(lambda: client.create_flow_run(
                    flows[fname], parameters={"service": t.service, "environment": t.environment},
                    tags=[t.service, t.environment], state=Running()))
                await retried(lambda: client.set_flow_run_state(run.id, final, force=True))
                if artifact is not None:
                    artifact.flow_run_id = run.id
                    await retried(lambda: client.create_artifact(artifact))
                made += 1

        async with get_client() as client:
            jobs = []
            for i, t in enumerate(cfg.targets()):
                jobs += [one(client, "nightly-backup", t, Completed()), one(client, "nightly-backup", t, Completed())]
                jobs.append(one(client, "verify-backup", t, Completed(), ArtifactCreate(
                    key=f"verify-{t.service}-{t.environment}", type="markdown", data="verified",
                    description=f"{t.service}_{t.env_short}.pgdump.zst")))
                if not t.production:
                    rows = [{"scenario": "data-loss", "result": "PASS", "RTO": "40 s", "RPO": "2 s"},
                            {"scenario": "server-loss", "result": "PASS", "RTO": "30 s", "RPO": "60 s"}]
                    jobs.append(one(client, "dr-drill", t, Completed(), ArtifactCreate(
                        key=f"drill-{t.service}-{t.environment}", type="table", data=json.dumps(rows),
                        description="DR drill")))
                if i % 40 == 0:
                    jobs.append(one(client, "data-loss", t, Paused(pause_key="restore-into-the-live-database-1")))
            await asyncio.gather(*jobs)
        return made

    with temporary_settings({PREFECT_API_URL: api}):
        started = time.monotonic()
        made = asyncio.run(fabricate())
    say(f"simulated {n} environments: {made} runs in {time.monotonic() - started:.0f} s")
    return path


def board_times(api: str, path: Path) -> dict[str, float]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dr.config import load_config
    from dr.fleet.board import build_board

    cfg = load_config(path)
    with temporary_settings({PREFECT_API_URL: api}):
        warm = []
        for _ in range(4):
            b = build_board(cfg)
            warm.append(b.seconds)
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "dr.cli", "status", "--json", "--config", str(path)], cwd=ROOT,
                       env=run_env(api), capture_output=True, text=True, timeout=600)
    cold = time.monotonic() - started
    if r.returncode != 0:
        raise SystemExit(f"dr status failed: {r.stderr[-2000:]}")
    doc = json.loads(r.stdout)
    return {"environments": len(doc["environments"]), "warm": statistics.median(warm[1:]), "cold": cold,
            "in_command": doc["seconds"], "requests": float(sum(b.requests.values())), **doc["summary"]}


# --- the run ---------------------------------------------------------------------------------------------


def table(res: Results) -> str:
    s = sum(res.singles)
    lines = [f"Fleet of {res.environments} environments ({res.size} each), one process worker, {res.machine}.", "",
             "| measure | value |", "|---|---|",
             f"| single backups, sum (each alone, no Prefect) | {s:.1f} s (median {statistics.median(res.singles):.2f} s) |"]
    for k, n in sorted(res.nights.items()):
        speed = s / n["wall"]
        lines.append(f"| night at {k} slot{'s' if k > 1 else ''}: wall time / speed-up / parallel efficiency | "
                     f"{n['wall']:.1f} s / {speed:.2f}x / {speed / k:.0%} |")
    if 1 in res.nights:
        one = res.nights[1]
        lines.append(f"| Prefect overhead per environment (1 slot: (wall - sum of singles) / environments) | "
                     f"{(one['wall'] - s) / res.environments:.1f} s |")
        lines.append(f"| of which inside the run (run time - its backup, median) | {one['run_overhead_median']:.1f} s |")
    lines.append("| worker peak memory (worker + flow-run processes, RSS) | " + ", ".join(
        f"{n['worker_peak_mb']:.0f} MB at {k}" for k, n in sorted(res.nights.items())) + " |")
    if res.deploy:
        lines.append(f"| dr deploy, {res.deploy['deployments']:.0f} deployments: first / unchanged | "
                     f"{res.deploy['first']:.1f} s / {res.deploy['again']:.1f} s |")
    for label, b in res.board.items():
        lines.append(f"| board of {b['environments']:.0f} environments{label}: warm build / `dr status --json` "
                     f"(new process) | {b['warm']:.2f} s / {b['cold']:.1f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="10mb", help="sample database size per environment (small, 10mb, 100mb...)")
    ap.add_argument("--slots", default="1,2,4", help="max_parallel_backups settings to measure")
    ap.add_argument("--simulate", type=int, default=200, help="environments of the simulated board (0: none)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the servers and the Prefect server's files")
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from deployments import stack
    from dr.config import load_config
    from dr.fleet.register import register
    from dr.fleet.spec import build
    from dr.platforms.local import lifecycle

    root = Path(tempfile.mkdtemp(prefix="dr-bench-fleet-", dir="/tmp"))
    root.chmod(0o755)
    res = Results(machine=f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start", size=args.size)
    started: list[Any] = []
    cfg = None
    try:
        server = stack.start_server(root / "prefect", port=stack.free_port(), scheduler=False)
        started.append(server.process)
        say(f"Prefect server {server.url} (state in {root / 'prefect'})")
        path = write_config(root, "bench", 1, [(s, e, "") for s in SERVICES for e in ENVS])
        cfg = load_config(path)
        t0 = time.monotonic()
        make_fleet(cfg, args.size)
        say(f"12 servers with {args.size} each in {time.monotonic() - t0:.0f} s")
        stack.wait_until_healthy(server)
        api = server.api
        os.environ["PREFECT_API_URL"] = api  # this process's client (dr deploy's register) talks to it

        spec = build(cfg, config_path=str(path))
        first = register(spec)
        again = register(spec)
        res.deploy = {"deployments": len(spec.deployments), "first": first.seconds, "again": again.seconds}
        say(f"dr deploy: {len(spec.deployments)} deployments in {first.seconds:.1f} s, unchanged {again.seconds:.1f} s")

        worker = stack.start_worker(api, pool="bench-fleet", name="bench-worker", log=root / "worker.log", project=ROOT)
        started.append(worker)
        stack.wait_for_worker(api, worker, pool="bench-fleet", name="bench-worker")

        res.singles = single_backups(cfg)
        say(f"single backups: sum {sum(res.singles):.1f} s")
        for k in [int(x) for x in args.slots.split(",")]:
            path.write_text(path.read_text().replace(f"max_parallel_backups = {spec.pool.queues['backups']}",
                                                     f"max_parallel_backups = {k}"))
            cfg = load_config(path)
            spec = build(cfg, config_path=str(path))
            register(spec)
            delete_nightlies(cfg)
            res.nights[k] = night(api, cfg, worker.proc.pid)
            say(f"night at {k} slot(s): {res.nights[k]['wall']:.1f} s, worker peak {res.nights[k]['worker_peak_mb']:.0f} MB")
        delete_nightlies(cfg)

        res.board[""] = board_times(api, path)
        say(f"board of 12: warm {res.board['']['warm']:.2f} s, cold {res.board['']['cold']:.1f} s")
        if args.simulate:
            sim = simulate(root, api, cfg, args.simulate)
            res.board[" (simulated)"] = board_times(api, sim)
            b = res.board[" (simulated)"]
            say(f"board of {b['environments']:.0f}: warm {b['warm']:.2f} s, cold {b['cold']:.1f} s")
        res.machine += f", {os.getloadavg()[0]:.1f} at the end"
        out = table(res)
        print("\n" + out)
        if args.json:
            Path(args.json).write_text(json.dumps(res.__dict__, indent=2, default=str))
    finally:
        for p in reversed(started):
            p.stop()
        if cfg is not None:
            lifecycle.down(cfg)
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
