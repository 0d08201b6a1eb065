"""How long the operator's commands take to answer: wall time and CPU of `dr <command>`, no work to speak of.

    python bench/cli_latency.py [--reps 5] [--project DIR] [--json out.json]

This is a benchmark, not a test. In a project directory of its own (a temp dir unless
`--project`), with no PREFECT_* setting, it brings up what an on-call engineer has running
during an incident: the local platform with sample data and one backup (`dr local up`,
`dr backup`), and the project's persistent Prefect server (started by `dr local up`: its
start-up is NOT in the numbers). Then it times each command, interleaved in every
repetition so that a busy machine slows all alike:

- `dr backup --plan`, `dr data-loss --plan`: a flow run on the local server that checks
  everything and changes nothing (imports Prefect; the run, its task runs and artifact);
- `dr approve`: answering the only pending gate of a paused data-loss run (no run id), over
  Prefect's REST API; each repetition pauses a fresh run at its gates, outside the timing;
- `dr backups`: the store's listing, no Prefect at all;
- `dr status`: the fleet board (#17, built at the same time): timed when the command exists
  on this branch, else its row says so (re-run after the merge);
- `dr --help` and a refused input (`dr data-loss --time` of an ambiguous UK time), for
  reference: the floor of any command, and the cost of a refusal; `import prefect`, the floor of
  any command that runs a flow;
- before: `dr data-loss --plan` on Prefect's temporary server, as every command ran before the
  local server (the fallback path, forced in a second project directory whose server cannot
  start); `--no-before` skips it.

Wall time is what a person waits; CPU seconds (user + sys of the `dr` process and its
children, not the Prefect server's) say how much of it is ours when the machine is shared.
Each row is the median of `--reps` runs, with min and max. The goal: at most 2 s each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
GOAL_SECONDS = 2.0


@dataclass
class Row:
    command: str
    what: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    note: str = ""

    def cells(self) -> list[str]:
        if not self.wall:
            return [f"`{self.command}`", self.what, "—", "—", "—", self.note]
        med = statistics.median(self.wall)
        verdict = "PASS" if med <= GOAL_SECONDS else "over"
        return [f"`{self.command}`", self.what, f"{med:.2f} s", f"{min(self.wall):.2f}-{max(self.wall):.2f} s",
                f"{statistics.median(self.cpu):.2f} s", verdict + (f" ({self.note})" if self.note else "")]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DR_"))}
    e.update(DR_PAUSE_POLL_SECONDS="1", DR_APPROVER="bench")
    return e


def dr(project: Path, *args: str, check: bool = True, timeout: float = 900) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run `dr <args>` in the project; (result, wall seconds, CPU seconds of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dr.cli", *args], cwd=project, env=env(), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if check and r.returncode != 0:
        raise SystemExit(f"dr {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r, wall, cpu


def timed(cmd: list[str], cwd: Path, extra: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env={**env(), **(extra or {})}, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=900)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def api_url(project: Path) -> str:
    rec = json.loads((project / ".dr-local" / "prefect" / "server.json").read_text())
    return rec["url"] + "/api"


def wait_paused(api: str, key_part: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the data-loss run ended ({proc.returncode}) before pausing at {key_part}")
        runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}},
                          timeout=30).json()
        if any(key_part in (r["state"]["state_details"].get("pause_key") or "") for r in runs):
            return
        time.sleep(0.5)
    raise SystemExit(f"no run paused at {key_part} within {timeout:.0f} s")


def has_command(project: Path, name: str) -> bool:
    r, _, _ = dr(project, name, "--help", check=False)
    return r.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--project", type=Path, help="project directory (default: a new temp dir, removed at the end)")
    ap.add_argument("--json", type=Path, help="write the measurements here too")
    ap.add_argument("--no-before", action="store_true", help="skip the temporary-server row (10-20 s a run)")
    args = ap.parse_args()

    tmp = None
    project = args.project
    if project is None:
        tmp = tempfile.TemporaryDirectory(prefix="dr-cli-bench-")
        project = Path(tmp.name)
        os.chmod(project, 0o755)  # PostgreSQL runs as an unprivileged user when this runs as root
    project.mkdir(parents=True, exist_ok=True)
    from dr.config import BUILTIN_CONFIG

    # the built-in demo configuration, its state kept in this project wherever a command runs
    (project / "dr.toml").write_text(BUILTIN_CONFIG + f'\n[local]\nstate_dir = "{project / ".dr-local"}"\n')
    try:
        print(f"project {project}: bringing up the local platform and the local Prefect server (not timed)")
        dr(project, "local", "up")
        dr(project, "backup")
        dr(project, "backups")  # warm the page cache for the first timed run alike
        api = api_url(project)

        rows = {
            "backup": Row("dr backup --plan", "flow run, no change"),
            "plan": Row("dr data-loss --plan", "flow run, no change"),
            "approve": Row("dr approve", "answers the only pending gate (REST)"),
            "backups": Row("dr backups", "store listing, no Prefect"),
            "status": Row("dr status", "fleet board (#17)"),
            "help": Row("dr --help", "reference: the floor"),
            "refused": Row("dr data-loss --time '2026-10-25 01:30'", "reference: a refusal, one error line"),
            "prefect": Row("python -c 'import prefect.main'", "reference: Prefect's import, the floor of a flow run"),
            "before": Row("dr data-loss --plan", "before: on Prefect's temporary server"),
        }
        before = project / "before"
        if not args.no_before:
            # the local server cannot start here (its lock file is a directory): the command falls back to
            # Prefect's temporary server, exactly as every command ran before this server existed
            (before / ".dr-local" / "prefect" / "server.lock").mkdir(parents=True, exist_ok=True)
            (before / "dr.toml").write_text((project / "dr.toml").read_text())
        status = has_command(project, "status")
        if not status:
            rows["status"].note = "TODO: `dr status` is not on this branch (fleet, #17); re-run after merging it"

        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}")
            for key, cmd in (("backup", ["backup", "--plan"]), ("plan", ["data-loss", "--plan"]),
                             ("backups", ["backups"]), ("help", ["--help"])):
                _, wall, cpu = dr(project, *cmd)
                rows[key].wall.append(wall)
                rows[key].cpu.append(cpu)
            r, wall, cpu = dr(project, "data-loss", "--time", "2026-10-25 01:30", check=False)
            assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr
            rows["refused"].wall.append(wall)
            rows["refused"].cpu.append(cpu)
            _, wall, cpu = timed([sys.executable, "-c", "import prefect.main"], project)
            rows["prefect"].wall.append(wall)
            rows["prefect"].cpu.append(cpu)
            if not args.no_before:
                _, wall, cpu = timed([sys.executable, "-m", "dr.cli", "data-loss", "--plan"], before)
                rows["before"].wall.append(wall)
                rows["before"].cpu.append(cpu)
            if status:
                _, wall, cpu = dr(project, "status")
                rows["status"].wall.append(wall)
                rows["status"].cpu.append(cpu)
            # a data-loss run paused at its gates (set up outside the timing); one approve per gate
            when = (datetime.now(timezone.utc) - timedelta(seconds=5)).astimezone(ZoneInfo("Europe/London"))
            with open(project / "data-loss.log", "ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", "dr.cli", "data-loss", "--time",
                                         when.strftime("%Y-%m-%d %H:%M:%S")], cwd=project, env=env(),
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            try:
                for gate in ("restore-into-the-live-database", "disable-maintenance"):
                    wait_paused(api, gate, proc)
                    _, wall, cpu = dr(project, "approve")
                    rows["approve"].wall.append(wall)
                    rows["approve"].cpu.append(cpu)
                proc.wait(600)
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(60)

        headers = ["command", "what it does", "median", "min-max", "CPU (median)", f"≤ {GOAL_SECONDS:.0f} s"]
        table = [headers, ["---"] * len(headers)] + [r.cells() for r in rows.values()]
        load = os.getloadavg()
        print(f"\n{platform.node()}: {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, "
              f"{args.reps} repetitions\n")
        for line in table:
            print("| " + " | ".join(line) + " |")
        if args.json:
            args.json.write_text(json.dumps({"load": load, "reps": args.reps,
                                             "rows": [asdict(r) for r in rows.values()]}, indent=2))
    finally:
        subprocess.run([sys.executable, "-m", "dr.cli", "local", "down"], cwd=project, env=env(),
                       capture_output=True, timeout=300)
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
