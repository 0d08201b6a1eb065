"""Recovery speed: our backup and restore against the plain PostgreSQL tools, on one database.

    python bench/recovery_speed.py --size 1gb [--reps 3] [--json out.json] [--scaling 0.25gb]

This is a benchmark, not a test. It builds a sample database of the given size on the
local platform (a real PostgreSQL 18 cluster, the embedded one, pinned with `postgres_version = 18`
so that runs stay comparable, with WAL archiving, as `dr local up` makes),
then runs, interleaved in every repetition so that a busy machine slows all alike:

- anchors: `pg_dump -Fc`; `pg_dump -Fp | gzip -1` (the nightly tooling); `pg_dump -Fp |
  zstd -1`; `pg_dump -Fc -Z0 > /dev/null` (the dump floor); `pg_restore -j <cores>` of the
  `pg_dump -Fc` file; `gunzip | psql` of the nightly file (today's restore); `pg_basebackup`
  (the physical floor). Diagnostics: our format made by the tools (`pg_dump -Fc -Z0 | zstd
  -1`), and `pg_restore -j <cores>` of the very archive our backup stored, decompressed into
  a local file.
- ours: `take_backup` into the local store and `restore_backup` from it into a new
  database (checksum, manifest check, ANALYZE, swap into a scratch name), each in a fresh
  Python process; then the same through the Prefect flows `backup-database` and
  `restore-database` in one long-lived process under a Prefect test server.

Every timed restore includes CREATE DATABASE. The four restores run in a rotating order.
Each measurement also records CPU seconds: the tools' or our worker's, plus the PostgreSQL
server's (all its processes, the WAL archiver's copies included). After the repetitions, our
archive is restored once more serially with every statement's duration logged, to show where
a restore's time goes and what parallel restore can gain at best (`restore_model`).
Before each measurement the WAL archiver is waited for, the server checkpointed, the page
cache written back (sync) and the WAL archive emptied, so no run pays for the previous
one's writes. The database fits in RAM: these are warm-cache, CPU-bound numbers (see
bench/README.md for what that means at 100 GB). `--before REV` adds take_backup and
restore_backup as of a git revision (before/after numbers for a change); `--from-json`
prints an earlier run's tables again without measuring.

Peak memory is sampled every 20 ms with psutil over our processes only: the Python
process doing the work plus its pg_dump / pg_restore / psql children (not the PostgreSQL
server, not the Prefect API server); the worker's own `getrusage` peak is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SERVICE, ENVIRONMENT = "apply", "development"
CONFIG = """
prefix = "b"
timezone = "Europe/London"

[local]
state_dir = "{state_dir}"
archive_timeout_seconds = 60

[services.apply.environments.development]
platform = "local"
# the PostgreSQL every published run measured (the embedded 18; pg_dump --statistics in the anchors
# needs 18), kept when the local platform's default became the distribution's full PostgreSQL
postgres_version = 18
"""
MB = 1024 * 1024
GB = 1024 * MB
OUR_CHILDREN = {"pg_dump", "pg_restore", "psql"}
PIPELINE_PROGRAMS = OUR_CHILDREN | {"gzip", "zstd", "pg_basebackup"}
#: targets from the brief
BACKUP_TIME_FACTOR = 1.10
RESTORE_TIME_FACTOR = 1.10
RESTORE_VS_PSQL = 1.5
MEMORY_LIMIT = 300 * MB
ORCHESTRATION_LIMIT = 0.05


# --- measuring ---------------------------------------------------------------------------


class PeakRss:
    """Samples the summed RSS of a process and its children named in `names` (psutil)."""

    def __init__(self, pid: int, names: set[str] | None = None, *, include_root: bool = True, interval: float = 0.02):
        import psutil

        self.root = psutil.Process(pid)
        self.names, self.include_root, self.interval = names, include_root, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        try:
            procs = self.root.children(recursive=True)
            if self.include_root:
                total += self.root.memory_info().rss
        except psutil.Error:
            return 0
        for p in procs:
            try:
                if self.names is None or p.name() in self.names:
                    total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Sample:
    seconds: float
    output_bytes: int | None = None
    peak_rss: int | None = None  # bytes, psutil, our processes
    rusage_self: int | None = None  # bytes, getrusage of the Python worker
    rusage_children: int | None = None  # bytes, largest child
    load: float | None = None  # 1-min load average when it started
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    key: str
    label: str
    group: str  # anchor-dump, anchor-restore, anchor-floor, ours-backup, ours-restore, flow-backup, flow-restore
    samples: list[Sample] = field(default_factory=list)

    def _vals(self, attr: str) -> list[float]:
        return [getattr(s, attr) for s in self.samples if getattr(s, attr) is not None]

    @property
    def min(self) -> float:
        return min(self._vals("seconds"))

    @property
    def median(self) -> float:
        return statistics.median(self._vals("seconds"))

    @property
    def output(self) -> int | None:
        v = self._vals("output_bytes")
        return int(statistics.median(v)) if v else None

    @property
    def peak(self) -> int | None:
        v = self._vals("peak_rss")
        return max(v) if v else None


def _children_cpu() -> float:
    """CPU seconds of this process's waited-for children (pipelines, workers and their children)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --- the environment ---------------------------------------------------------------------


class Bench:
    """One local platform with one sample database, and the means to measure on it."""

    def __init__(self, workdir: Path, size: str, cores: int, log: Callable[[str], None]):
        from dr.config import load_config
        from dr.pginstall import client_tools
        from dr.platforms import get_platform

        self.size, self.cores, self.log = size, cores, log
        self.root = workdir / f"bench-{size}"
        fresh = not (self.root / "dr.toml").exists()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.files = self.root / "files"
        self.files.mkdir(exist_ok=True)
        self.config_path = self.root / "dr.toml"
        if fresh:
            self.config_path.write_text(CONFIG.format(state_dir=self.root / "state"))
        self.config = load_config(self.config_path)
        self.target = self.config.target(SERVICE, ENVIRONMENT)
        self.platform = get_platform(self.config, self.target)
        self.servers, self.store = self.platform.servers, self.platform.store
        self.tools = client_tools(self.config, self.target)
        self.server, self.database = self.target.server, self.target.database

    # -- setup

    def up(self) -> dict[str, Any]:
        """Create the server and load the sample (or reuse them); returns the data checks."""
        from dr.database import create_database, database_exists
        from dr.platforms.local.sample import (
            BYTES_PER_SCALE,
            load_sample,
            scale_for_size,
        )

        if self.servers.server_exists(self.server):
            self.servers.start_server(self.server)
        else:
            self.servers.create_server(self.server)
        admin = self.admin
        if not database_exists(admin, self.database):
            create_database(admin, self.database)
        scale = scale_for_size(self.size)
        t = time.monotonic()
        rows = load_sample(self.conn, scale)
        load_s = time.monotonic() - t
        self.cleanup_databases()
        db_bytes = self.database_bytes()
        asked = _parse_size(self.size)
        return {"asked_bytes": asked, "database_bytes": db_bytes, "scale": scale, "bytes_per_scale": BYTES_PER_SCALE,
                "measured_bytes_per_scale": round(db_bytes / scale), "size_error": db_bytes / asked - 1,
                "load_seconds": load_s, "rows": rows}

    @property
    def admin(self):
        return self.servers.connection(self.server, "postgres")

    @property
    def conn(self):
        return self.servers.connection(self.server, self.database)

    def sql(self, query: str, database: str | None = None) -> list[tuple]:
        import psycopg

        c = self.servers.connection(self.server, database or "postgres")
        with psycopg.connect(**c.psycopg_kwargs(), autocommit=True) as con:
            cur = con.execute(query)
            return cur.fetchall() if cur.description else []

    def database_bytes(self) -> int:
        return self.sql(f"SELECT pg_database_size('{self.database}')")[0][0]

    def cleanup_databases(self) -> None:
        """Drop every database but the sample (scratch restores, replaced copies)."""
        from dr.database import drop_database

        for (name,) in self.sql("SELECT datname FROM pg_database WHERE NOT datistemplate AND datname <> 'postgres'"):
            if name != self.database:
                drop_database(self.admin, name)

    def settle(self) -> None:
        """The same starting point for every measurement: the archiver caught up, no dirty buffers or
        pages waiting for the disk, an empty WAL archive (a restore leaves ~1.3 GB of WAL per GB)."""
        deadline = time.monotonic() + 600
        while self.sql("SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'")[0][0]:
            if time.monotonic() > deadline:
                raise RuntimeError("the WAL archiver did not catch up within 10 minutes")
            time.sleep(0.5)
        self.sql("CHECKPOINT")
        os.sync()
        archive = self.servers.servers_dir / self.server / "archive"
        for p in archive.iterdir():
            if not p.name.endswith(".part"):
                p.unlink(missing_ok=True)
        for b in self.root.glob("basebackup-*"):
            shutil.rmtree(b, ignore_errors=True)

    # -- running external programs

    def pipeline(self, *argvs: list[str], stdout: Path | None = None, stdin: Path | None = None,
                 env_extra: dict[str, str] | None = None) -> Sample:
        """Run `a | b | ...` (argument lists, no shell) with the sample's passfile env; time it."""
        from dr.commands import passfile_env

        with passfile_env(self.conn) as env:
            env.update(env_extra or {})
            load = os.getloadavg()[0]
            out = open(stdout, "wb") if stdout else subprocess.DEVNULL
            inp = open(stdin, "rb") if stdin else subprocess.DEVNULL
            procs: list[subprocess.Popen] = []
            cpu0, srv0 = _children_cpu(), self.server_cpu()
            t = time.perf_counter()
            with PeakRss(os.getpid(), PIPELINE_PROGRAMS, include_root=False) as rss:
                prev = inp
                for i, argv in enumerate(argvs):
                    last = i == len(argvs) - 1
                    p = subprocess.Popen(argv, stdin=prev, stdout=out if last else subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env)
                    if prev not in (subprocess.DEVNULL, inp) and prev is not None:
                        prev.close()
                    prev = p.stdout
                    procs.append(p)
                errs = [p.communicate()[1] for p in reversed(procs)]
            secs = time.perf_counter() - t
            cpu = {"cpu_client": _children_cpu() - cpu0, "cpu_server": self.server_cpu() - srv0}
            for f in (out, inp):
                if hasattr(f, "close"):
                    f.close()
        for p, err in zip(reversed(procs), errs):
            if p.returncode != 0:
                raise RuntimeError(f"{p.args[0]} exited {p.returncode}: {err.decode(errors='replace')[-2000:]}")
        return Sample(secs, stdout.stat().st_size if stdout and stdout.exists() else None, rss.peak, load=load,
                      extra=cpu)

    def pg(self, program: str) -> str:
        return self.tools.path(program)

    def server_cpu(self) -> float:
        """CPU seconds the PostgreSQL server has used so far: the postmaster and every process under it,
        live or already reaped (backends, WAL writer, checkpointer, the archiver and its copies)."""
        import psutil

        pid = int((self.servers.servers_dir / self.server / "data" / "postmaster.pid").read_text().split()[0])
        total = 0.0
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return total

    def create_db(self, name: str) -> None:
        from dr.database import create_database

        create_database(self.admin, name)

    # -- workers for our code

    def worker(self, job: dict[str, Any]) -> Sample:
        """Run one job of ours in a fresh Python process; its time is measured inside it."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", json.dumps(job)]
        load = os.getloadavg()[0]
        cpu0, srv0 = _children_cpu(), self.server_cpu()
        with open(self.root / "worker.log", "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, cwd=str(ROOT))
            with PeakRss(proc.pid, OUR_CHILDREN) as rss:
                out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"worker {job['op']} failed ({proc.returncode}); see {self.root / 'worker.log'}")
        cpu = {"cpu_client": _children_cpu() - cpu0, "cpu_server": self.server_cpu() - srv0}
        res = json.loads(out.decode().strip().splitlines()[-1])
        return Sample(res["seconds"], res.get("output_bytes"), rss.peak, res["maxrss_self"], res["maxrss_children"],
                      load=load, extra={**cpu, **res.get("extra", {})})


def _parse_size(size: str) -> int:
    import re

    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(mb|gb)", size.strip().lower())
    if not m:
        raise SystemExit(f"size {size!r}: use a size such as 250mb or 1gb")
    return int(float(m.group(1)) * (GB if m.group(2) == "gb" else MB))


# --- the worker (our code, in its own process) -------------------------------------------


def _rusage() -> dict[str, int]:
    return {"maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "maxrss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def _cpu_now() -> float:
    """CPU seconds of this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _module_at(name: str, rev: str | None) -> Any:
    """`dr.<name>` as in the work tree, or as of git revision `rev` (for before/after numbers)."""
    import importlib
    import types

    if not rev:
        return importlib.import_module(f"dr.{name}")
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:dr/{name}.py"], capture_output=True, check=True).stdout
    mod = types.ModuleType(f"dr_{name}_at_rev")
    mod.__file__ = f"{rev}:dr/{name}.py"
    sys.modules[mod.__name__] = mod
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod


def _worker(job: dict[str, Any]) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    from dr.config import load_config
    from dr.pginstall import client_tools
    from dr.platforms import get_platform

    cfg = load_config(job["config"])
    target = cfg.target(SERVICE, ENVIRONMENT)
    plat = get_platform(cfg, target)
    tools = client_tools(cfg, target)
    if job["op"] == "backup":
        take_backup = _module_at("backup", job.get("rev")).take_backup
        kw = {"fmt": job["fmt"]} if job.get("fmt") else {}
        c = _cpu_now()
        t = time.perf_counter()
        res = take_backup(plat.servers, plat.store, tools, server=target.server, database=target.database,
                          name=job["name"], kind="adhoc", **kw)
        secs = time.perf_counter() - t
        out = {"seconds": secs, "output_bytes": res.info.size,
               "extra": {"format": res.info.format, "cpu_client": _cpu_now() - c}}
    elif job["op"] == "restore":
        restore_backup = _module_at("restore", job.get("rev")).restore_backup
        c = _cpu_now()
        t = time.perf_counter()
        res = restore_backup(plat.servers, plat.store, tools, server=target.server, database=job["database"],
                             backup=job["name"], jobs=job["jobs"], swap=True,
                             spool_dir=cfg.local.state_dir.absolute())
        secs = time.perf_counter() - t
        out = {"seconds": secs, "extra": {"verified_manifest": res.verified_manifest, "cpu_client": _cpu_now() - c}}
    else:
        raise SystemExit(f"unknown job {job['op']}")
    print(json.dumps({**out, **_rusage()}), flush=True)


def _flow_server() -> None:
    """Serve flow runs over stdin/stdout: one Prefect test server for all repetitions."""
    home = tempfile.mkdtemp(prefix="dr-bench-prefect-")
    os.environ["PREFECT_HOME"] = home
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.pop("PREFECT_API_URL", None)
    from prefect.testing.utilities import prefect_test_harness

    from flows.backup import backup_database
    from flows.restore import restore_database

    try:
        with prefect_test_harness(server_startup_timeout=120):
            print(json.dumps({"ready": True}), flush=True)
            for line in sys.stdin:
                job = json.loads(line)
                t, called_at = time.perf_counter(), time.time()
                if job["op"] == "backup":
                    state = backup_database(SERVICE, ENVIRONMENT, kind="adhoc", label=job["label"],
                                            config_path=job["config"], return_state=True)
                else:
                    state = restore_database(SERVICE, ENVIRONMENT, backup=job["name"], database=job["database"],
                                             jobs=job["jobs"], safety_backup=False, config_path=job["config"],
                                             return_state=True)
                returned = time.perf_counter() - t
                res = state.result()
                # when the run became Completed (the work is done and recorded as done); the call
                # itself returns up to 1 s later: Prefect 3.9's flow engine then joins its heartbeat
                # thread, which sleeps in 1-s steps
                extra = {"inner_seconds": res["seconds"], "completed_seconds": state.timestamp.timestamp() - called_at}
                if job["op"] == "backup":
                    out = {"output_bytes": res["size"], "extra": {"name": res["name"], **extra}}
                else:
                    out = {"extra": extra}
                out["seconds"] = returned
                print(json.dumps({**out, **_rusage()}), flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)


class FlowWorker:
    """The long-lived flow process, driven one job at a time."""

    def __init__(self, bench: Bench):
        self.bench = bench
        self.logf = open(bench.root / "flows.log", "ab")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_flows"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.logf, cwd=str(ROOT))
        ready = self._line()
        if not ready.get("ready"):
            raise RuntimeError(f"the flow worker did not start; see {bench.root / 'flows.log'}")

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the flow worker died; see {self.bench.root / 'flows.log'}")
            line = line.strip()
            if line.startswith(b"{"):
                return json.loads(line)

    def run(self, job: dict[str, Any]) -> Sample:
        assert self.proc.stdin is not None
        load = os.getloadavg()[0]
        with PeakRss(self.proc.pid, OUR_CHILDREN) as rss:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
            res = self._line()
        return Sample(res["seconds"], res.get("output_bytes"), rss.peak, res["maxrss_self"], res["maxrss_children"],
                      load=load, extra=res.get("extra", {}))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.logf.close()


# --- one size ------------------------------------------------------------------------------


def run_size(workdir: Path, size: str, reps: int, cores: int, *, flows: bool, before: str | None,
             log: Callable[[str], None]) -> dict[str, Any]:
    import zstandard

    from dr.backup import DEFAULT_FORMAT, FORMATS

    b = Bench(workdir, size, cores, log)
    log(f"[{size}] setting up (loading the sample the first time takes a few minutes per GB)")
    data = b.up()
    log(f"[{size}] database {data['database_bytes'] / MB:.0f} MB (asked {data['asked_bytes'] / MB:.0f} MB, "
        f"{data['size_error']:+.1%}); loaded in {data['load_seconds']:.0f} s")
    dump, restore = b.pg("pg_dump"), b.pg("pg_restore")
    f = b.files
    results: dict[str, Result] = {}

    def add(key: str, label: str, group: str, sample: Sample) -> None:
        results.setdefault(key, Result(key, label, group)).samples.append(sample)
        log(f"[{size}] rep {rep + 1}/{reps} {label:<44} {sample.seconds:8.2f} s"
            + (f"  {sample.output_bytes / MB:8.1f} MB" if sample.output_bytes else "")
            + (f"  rss {sample.peak_rss / MB:6.0f} MB" if sample.peak_rss else "") + f"  load {sample.load:.1f}")

    # data shape: how the plain dump compresses (once)
    b.settle()
    plain = b.pipeline([dump, "-Fp", b.database], stdout=f / "plain.sql")
    shape = {"plain_dump_bytes": plain.output_bytes}
    for name, argv in (("gzip1", ["gzip", "-1"]), ("gzip6", ["gzip", "-6"]), ("zstd1", ["zstd", "-1", "-q"])):
        s = b.pipeline(argv, stdin=f / "plain.sql", stdout=f / "plain.sql.cmp")
        shape[f"ratio_{name}"] = plain.output_bytes / s.output_bytes
    (f / "plain.sql").unlink()
    (f / "plain.sql.cmp").unlink()
    data.update(shape)
    log(f"[{size}] plain dump {plain.output_bytes / MB:.0f} MB; compresses {shape['ratio_gzip1']:.2f}:1 with gzip -1, "
        f"{shape['ratio_gzip6']:.2f}:1 with gzip -6, {shape['ratio_zstd1']:.2f}:1 with zstd -1")

    flow = FlowWorker(b) if flows else None
    try:
        for rep in range(reps):
            # dumps
            b.settle()
            add("dump_custom", "anchor pg_dump -Fc (gzip:6) > file", "anchor-dump",
                b.pipeline([dump, "-Fc", b.database], stdout=f / "anchor.pgdump"))
            b.settle()
            add("dump_plain_gzip1", "anchor pg_dump -Fp | gzip -1 (nightly)", "anchor-dump",
                b.pipeline([dump, "-Fp", b.database], ["gzip", "-1"], stdout=f / "anchor.sql.gz"))
            b.settle()
            add("dump_plain_zstd1", "anchor pg_dump -Fp | zstd -1", "anchor-dump",
                b.pipeline([dump, "-Fp", b.database], ["zstd", "-1", "-q"], stdout=f / "anchor.sql.zst"))
            b.settle()
            add("dump_custom_zstd", "diag   pg_dump -Fc -Z0 | zstd -1 (our format by tools)", "diag",
                b.pipeline([dump, "-Fc", "-Z0", "--statistics", b.database], ["zstd", "-1", "-q"],
                           stdout=f / "anchor.pgdump.zst"))
            b.settle()
            add("dump_floor", "floor  pg_dump -Fc -Z0 > /dev/null", "anchor-floor",
                b.pipeline([dump, "-Fc", "-Z0", b.database]))
            b.settle()
            name = f"bench_{rep}_{time.time_ns()}{FORMATS[DEFAULT_FORMAT][0]}"
            add("ours_backup", "ours   take_backup -> store", "ours-backup",
                b.worker({"op": "backup", "config": str(b.config_path), "name": name}))
            # the archive our backup stored, decompressed into a local file: pg_restore of exactly what we restore
            with open(b.store.root / name, "rb") as src, open(f / "ours.pgdump", "wb") as dst:
                zstandard.ZstdDecompressor().copy_stream(src, dst)
            os.sync()

            # restores (each into a new database, CREATE DATABASE included), in a rotating order
            def anchor_restore(rep: int = rep) -> None:
                db = f"anchor_restore_{rep}"
                t = time.perf_counter()
                b.create_db(db)
                s = b.pipeline([restore, "--no-owner", "--exit-on-error", f"--jobs={cores}", "-d", db,
                                str(f / "anchor.pgdump")])
                s.seconds = time.perf_counter() - t
                add("restore_pg_restore", f"anchor pg_restore -j{cores} (pg_dump -Fc file)", "anchor-restore", s)

            def same_archive_restore(rep: int = rep) -> None:
                db = f"diag_restore_{rep}"
                t = time.perf_counter()
                b.create_db(db)
                s = b.pipeline([restore, "--no-owner", "--exit-on-error", f"--jobs={cores}", "--statistics", "-d", db,
                                str(f / "ours.pgdump")])
                s.seconds = time.perf_counter() - t
                add("restore_same_archive", f"diag   pg_restore -j{cores} (our archive, unzstd'd file)", "diag", s)

            def psql_restore(rep: int = rep) -> None:
                db = f"anchor_psql_{rep}"
                t = time.perf_counter()
                b.create_db(db)
                s = b.pipeline(["gzip", "-dc", str(f / "anchor.sql.gz")],
                               [b.pg("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db])
                s.seconds = time.perf_counter() - t
                add("restore_gunzip_psql", "anchor gunzip | psql (nightly restore)", "anchor-restore", s)

            def our_restore(rep: int = rep, name: str = name) -> None:
                add("ours_restore", "ours   restore_backup (checksum, manifest, stats, swap)", "ours-restore",
                    b.worker({"op": "restore", "config": str(b.config_path), "name": name,
                              "database": f"ours_restore_{rep}", "jobs": cores}))

            trio = [anchor_restore, psql_restore, our_restore, same_archive_restore]
            for fn in trio[rep % 4:] + trio[:rep % 4]:
                b.settle()
                fn()
                b.cleanup_databases()
            b.store.delete_backup(name)

            if before:  # the same two calls with dr/backup.py and dr/restore.py as of git revision `before`
                b.settle()
                name = f"bench_rev_{rep}_{time.time_ns()}.pgdump"
                add("rev_backup", f"before take_backup ({before})", "diag",
                    b.worker({"op": "backup", "config": str(b.config_path), "name": name, "rev": before}))
                b.settle()
                add("rev_restore", f"before restore_backup ({before})", "diag",
                    b.worker({"op": "restore", "config": str(b.config_path), "name": name, "rev": before,
                              "database": f"rev_restore_{rep}", "jobs": cores}))
                b.cleanup_databases()
                b.store.delete_backup(name)

            if flow:
                b.settle()
                s = flow.run({"op": "backup", "config": str(b.config_path), "label": f"bench{rep}"})
                add("flow_backup", "flow   backup-database", "flow-backup", s)
                b.settle()
                add("flow_restore", "flow   restore-database", "flow-restore",
                    flow.run({"op": "restore", "config": str(b.config_path), "name": s.extra["name"],
                              "database": f"flow_restore_{rep}", "jobs": cores}))
                b.cleanup_databases()
                b.store.delete_backup(s.extra["name"])

            # the physical floor: the whole cluster, uncompressed
            b.settle()
            bb = b.root / f"basebackup-{rep}"
            add("basebackup", "floor  pg_basebackup -Fp -X stream (cluster)", "anchor-floor",
                b.pipeline([b.pg("pg_basebackup"), "-D", str(bb), "-Fp", "-X", "stream", "-c", "fast", "--no-password"]))
            shutil.rmtree(bb, ignore_errors=True)

        # where a restore's time goes: our archive restored serially, every statement's duration logged
        b.settle()
        profile = profile_restore(b, f / "ours.pgdump")
        log(f"[{size}] serial restore profile: {profile['serial_seconds']:.1f} s of statements; critical path "
            f"{profile['critical_seconds']:.1f} s ({profile['critical_table']})")
    finally:
        if flow:
            flow.close()
        for p in f.iterdir():
            p.unlink()
        b.cleanup_databases()
    return {"size": size, "data": data, "results": results, "profile": profile}


# --- where a restore's time goes ----------------------------------------------------------


def _statement_durations(log_text: str) -> list[tuple[float, str]]:
    """(seconds, statement) of every `duration: ... statement: ...` entry of a server log."""
    import re

    out: list[list[Any]] = []
    cur: list[Any] | None = None
    for line in log_text.splitlines():
        m = re.search(r"LOG:  duration: ([\d.]+) ms  statement: (.*)", line)
        if m:
            cur = [float(m[1]) / 1000, m[2]]
            out.append(cur)
        elif cur is not None and line.startswith("\t"):
            cur[1] += " " + line.strip()
        else:
            cur = None
    return [(d, st) for d, st in out]


def restore_model(statements: list[tuple[float, str]]) -> dict[str, Any]:
    """What parallel restore can gain, from the statements of a serial restore.

    A parallel restore cannot go faster than the longest chain of steps that must run one after the
    other: the schema (restored first, by one connection), then for some table its COPY, every
    constraint that locks it (primary key, unique, foreign keys from or to it: ALTER TABLE takes a
    lock that excludes the others and CREATE INDEX on that table) and its longest index build. That
    lower bound holds for any number of cores; with N cores the work itself also needs total/N.
    """
    import re

    pre, tables = 0.0, {}
    seen_copy = False

    def t(name: str) -> dict[str, float]:
        return tables.setdefault(name.strip('"'), {"copy": 0.0, "constraints": 0.0, "index_max": 0.0, "index_sum": 0.0})

    for secs, st in statements:
        if m := re.match(r"COPY (\S+) ", st):
            seen_copy = True
            t(m[1])["copy"] += secs
        elif m := re.match(r"CREATE (?:UNIQUE )?INDEX \S+ ON (?:ONLY )?(\S+)", st):
            x = t(m[1])
            x["index_max"] = max(x["index_max"], secs)
            x["index_sum"] += secs
        elif m := re.match(r"ALTER TABLE (?:ONLY )?(\S+)\s+ADD CONSTRAINT", st):
            t(m[1])["constraints"] += secs
            if r := re.search(r"REFERENCES (\S+?)\(", st):
                t(r[1])["constraints"] += secs
        elif not seen_copy:
            pre += secs
    serial = sum(secs for secs, _ in statements)
    chains = {name: x["copy"] + x["constraints"] + x["index_max"] for name, x in tables.items()}
    crit_table = max(chains, key=chains.get) if chains else ""
    critical = pre + (chains[crit_table] if chains else 0.0)
    return {"serial_seconds": serial, "pre_data_seconds": pre, "critical_seconds": critical, "critical_table": crit_table,
            "tables": {k: {**v, "chain": chains[k]} for k, v in tables.items()},
            "bound_by_cores": {str(n): max(critical, serial / n) for n in (1, 2, 4, 8, 16)},
            # if one table's rows were loaded through every connection (its COPY sharing the n cores); dr/loader.py
            # does not: it loads each table frozen, by one connection (see bench/README.md)
            "bound_by_cores_split": {str(n): max(pre + max((x["copy"] / n + x["constraints"] + x["index_max"]
                                                              for x in tables.values()), default=0.0), serial / n)
                                     for n in (1, 2, 4, 8, 16)}}


def profile_restore(b: Bench, archive: Path) -> dict[str, Any]:
    """Restore `archive` serially (pg_restore -f - | psql, one connection) with every statement's duration in
    the server log, and model what parallel restore can gain (`restore_model`)."""
    log_path = b.servers.servers_dir / b.server / "postgres.log"
    start = log_path.stat().st_size
    db = "profile_serial"
    b.create_db(db)
    s = b.pipeline([b.pg("pg_restore"), "--no-owner", "--statistics", "-f", "-", str(archive)],
                   [b.pg("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db],
                   env_extra={"PGOPTIONS": "-c log_min_duration_statement=0"})
    b.cleanup_databases()
    with open(log_path, "rb") as fh:
        fh.seek(start)
        text = fh.read().decode("utf-8", "replace")
    model = restore_model(_statement_durations(text))
    model["wall_seconds"] = s.seconds
    return model


def profile_text(run: dict[str, Any]) -> str:
    p = run.get("profile")
    if not p:
        return ""
    r = run["results"]
    psql = r["restore_gunzip_psql"].median
    lines = [f"where a restore's time goes: our archive restored serially (one connection) took {p['wall_seconds']:.1f} s, "
             f"{p['serial_seconds']:.1f} s of it in statements; schema {p['pre_data_seconds']:.1f} s",
             f"{'table':<28} {'COPY s':>7} {'constraints s':>13} {'indexes s (longest)':>20} {'chain s':>8}"]
    for name, x in sorted(p["tables"].items(), key=lambda kv: -kv[1]["chain"]):
        lines.append(f"{name:<28} {x['copy']:7.2f} {x['constraints']:13.2f} {x['index_sum']:10.2f} ({x['index_max']:5.2f})"
                     f"    {x['chain']:8.2f}")
    lines.append(f"critical path (schema + the {p['critical_table']} chain): {p['critical_seconds']:.1f} s = "
                 f"{p['critical_seconds'] / p['serial_seconds']:.0%} of the serial statements; so no number of "
                 f"pg_restore jobs (one connection per table) can make a restore more than "
                 f"{p['serial_seconds'] / p['critical_seconds']:.2f}x faster than one connection")
    lines.append("best case by cores, pg_restore -j (statements only, idle cores): "
                 + ", ".join(f"{n}: {v:.1f} s ({p['serial_seconds'] / v:.2f}x)" for n, v in p["bound_by_cores"].items())
                 + f"; measured gunzip | psql {psql:.1f} s")
    if "bound_by_cores_split" in p:
        lines.append("best case by cores if a table's rows were split across the connections (not frozen, "
                     "so not what dr/loader.py does): "
                     + ", ".join(f"{n}: {v:.1f} s ({p['serial_seconds'] / v:.2f}x)"
                                 for n, v in p["bound_by_cores_split"].items()))
    cpu = {k: statistics.median(sm.extra.get("cpu_client", 0) + sm.extra.get("cpu_server", 0) for sm in r[k].samples)
           for k in ("restore_gunzip_psql", "restore_pg_restore", "ours_restore") if k in r
           and all("cpu_server" in sm.extra for sm in r[k].samples)}
    if cpu:
        lines.append("CPU seconds per restore (server processes incl. WAL writer and archiver, plus our/the tools' "
                     "processes): " + ", ".join(f"{r[k].label.split(' ', 1)[1].strip()} {v:.1f}" for k, v in cpu.items())
                     + f"; on {run['cores']} fully free cores a restore cannot take less than CPU / {run['cores']}")
    return "\n".join(lines)


# --- judging and reporting -----------------------------------------------------------------


def judge(run: dict[str, Any]) -> list[dict[str, Any]]:
    r: dict[str, Result] = run["results"]
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str, **nums: Any) -> None:
        checks.append({"target": name, "pass": bool(ok), "detail": detail, **nums})

    anchors = [r[k] for k in ("dump_custom", "dump_plain_gzip1", "dump_plain_zstd1") if k in r]
    fastest = min(anchors, key=lambda x: x.median)
    ours_b = r["ours_backup"]
    ratio = ours_b.median / fastest.median
    check("backup time", ratio <= BACKUP_TIME_FACTOR,
          f"take_backup {ours_b.median:.2f} s = {ratio:.2f} x the fastest compressed anchor "
          f"({fastest.label.split(' ', 1)[1].strip()}: {fastest.median:.2f} s); target <= {BACKUP_TIME_FACTOR:.2f} x",
          ratio=ratio)
    gz = r["dump_plain_gzip1"].output
    check("backup size", ours_b.output <= gz,
          f"{ours_b.output / MB:.1f} MB vs gzip -1 {gz / MB:.1f} MB ({ours_b.output / gz - 1:+.1%}); target: not larger",
          ratio=ours_b.output / gz)
    ours_r, pgr, psql = r["ours_restore"], r["restore_pg_restore"], r["restore_gunzip_psql"]
    ratio = ours_r.median / pgr.median
    check("restore time", ratio <= RESTORE_TIME_FACTOR,
          f"restore_backup {ours_r.median:.2f} s = {ratio:.2f} x pg_restore -j from a local file ({pgr.median:.2f} s); "
          f"target <= {RESTORE_TIME_FACTOR:.2f} x", ratio=ratio)
    speedup = psql.median / ours_r.median
    check("restore vs nightly", speedup >= RESTORE_VS_PSQL,
          f"gunzip | psql {psql.median:.2f} s / ours {ours_r.median:.2f} s = {speedup:.2f} x faster; "
          f"target >= {RESTORE_VS_PSQL:.1f} x", ratio=speedup)
    peak = max(ours_b.peak or 0, ours_r.peak or 0)
    check("memory (function calls)", peak < MEMORY_LIMIT,
          f"peak {peak / MB:.0f} MB (Python worker + pg_dump/pg_restore); limit {MEMORY_LIMIT / MB:.0f} MB", peak=peak)
    if "flow_restore" in r:
        fpeak = max(r["flow_backup"].peak or 0, r["flow_restore"].peak or 0)
        check("memory (Prefect flows)", fpeak < MEMORY_LIMIT,
              f"peak {fpeak / MB:.0f} MB (flow process with Prefect + pg_dump/pg_restore); "
              f"limit {MEMORY_LIMIT / MB:.0f} MB", peak=fpeak)
        # measured inside each flow run (from the call to the run's Completed state, minus the
        # restore_backup it called), because flow runs and plain calls are separate runs whose
        # difference is mostly the machine's noise. The call returns 0-1 s after Completed (Prefect
        # 3.9 joins its heartbeat thread, which sleeps in 1-s steps): shown, not counted, since the
        # restore is live and the run recorded Completed before that (JSON from older runs has only
        # the return time)
        def done(sm: Sample) -> float:
            return sm.extra.get("completed_seconds", sm.seconds)

        fr = r["flow_restore"]
        shares = [(done(sm) - sm.extra["inner_seconds"]) / sm.extra["inner_seconds"] for sm in fr.samples]
        over = statistics.median(shares)
        extra_s = statistics.median(done(sm) - sm.extra["inner_seconds"] for sm in fr.samples)
        tail = statistics.median(sm.seconds - done(sm) for sm in fr.samples)
        check("orchestration overhead (restore)", over < ORCHESTRATION_LIMIT,
              f"restore-database flow spends {extra_s:.2f} s around its restore_backup until the run is Completed: "
              f"{over:+.1%} (runs {min(shares):+.1%}..{max(shares):+.1%}); the call returns {tail:.2f} s later "
              f"(Prefect's heartbeat-thread join); flow call {fr.median:.2f} s vs separate plain calls "
              f"{ours_r.median:.2f} s: {fr.median / ours_r.median - 1:+.1%}; target < {ORCHESTRATION_LIMIT:.0%}",
              ratio=over, seconds=extra_s, return_tail=tail)
        fb = r["flow_backup"]
        over_b = statistics.median((done(sm) - sm.extra["inner_seconds"]) / sm.extra["inner_seconds"]
                                   for sm in fb.samples)
        extra_b = statistics.median(done(sm) - sm.extra["inner_seconds"] for sm in fb.samples)
        checks.append({"target": "orchestration overhead (backup, info)", "pass": None,
                       "detail": f"backup-database flow spends {extra_b:.2f} s around its take_backup until the run "
                                 f"is Completed: {over_b:+.1%}",
                       "ratio": over_b, "seconds": extra_b})
    return checks


def table(run: dict[str, Any]) -> str:
    r: dict[str, Result] = run["results"]
    d = run["data"]
    db = d["database_bytes"]
    loads = [sm.load for x in r.values() for sm in x.samples if sm.load is not None]
    lines = [
        f"size {run['size']}: pg_database_size {db / MB:.0f} MB (asked {d['asked_bytes'] / MB:.0f} MB, "
        f"{d['size_error']:+.1%}); plain dump {d['plain_dump_bytes'] / MB:.0f} MB, compresses "
        f"{d['ratio_gzip1']:.2f}:1 gzip -1, {d['ratio_gzip6']:.2f}:1 gzip -6, {d['ratio_zstd1']:.2f}:1 zstd -1",
        f"{run['cores']} cores, {run['reps']} reps, 1-min load average at the starts {min(loads):.1f}..{max(loads):.1f} "
        f"(median {statistics.median(loads):.1f}; other work on the machine)",
        "MB/s = database MB / median s; peak MB = our processes (anchors: the pipeline's processes)",
        "",
        f"{'operation':<52} {'min s':>7} {'median s':>8} {'MB/s':>6} {'out MB':>7} {'peak MB':>7} {'cpu s':>6}  vs anchor",
    ]
    anchors_d = [r[k] for k in ("dump_custom", "dump_plain_gzip1", "dump_plain_zstd1")]
    fastest = min(anchors_d, key=lambda x: x.median)
    ref = {"ours-backup": fastest, "flow-backup": r["ours_backup"], "ours-restore": r["restore_pg_restore"],
           "flow-restore": r["ours_restore"]}
    diag_ref = {"rev_backup": r["ours_backup"], "rev_restore": r["ours_restore"], "dump_custom_z1": r["ours_backup"],
                "dump_custom_zstd": r["ours_backup"], "restore_same_archive": r["ours_restore"]}
    for key in ("dump_custom", "dump_plain_gzip1", "dump_plain_zstd1", "dump_custom_z1", "dump_custom_zstd", "dump_floor",
                "ours_backup", "rev_backup", "flow_backup", "restore_pg_restore", "restore_gunzip_psql",
                "restore_same_archive", "ours_restore", "rev_restore",
                "flow_restore", "basebackup"):
        if key not in r:
            continue
        x = r[key]
        vs = ""
        if x.group in ref:
            a = ref[x.group]
            vs = f"{x.median / a.median:.2f}x {a.key}"
        elif key in diag_ref:
            a = diag_ref[key]
            vs = f"{x.median / a.median:.2f}x {a.key}"
        if x.group.startswith("flow"):
            steps = statistics.median(sm.extra.get("completed_seconds", sm.seconds) - sm.extra["inner_seconds"]
                                      for sm in x.samples)
            vs += f"; Prefect and flow steps {steps:.2f} s to Completed"
        if key == "ours_restore":
            vs += f"; speed-up {r['restore_gunzip_psql'].median / x.median:.2f}x vs gunzip|psql"
        cpus = [sm.extra["cpu_client"] + sm.extra["cpu_server"] for sm in x.samples if "cpu_server" in sm.extra]
        cpu = statistics.median(cpus) if cpus else float("nan")
        lines.append(f"{x.label:<52} {x.min:7.2f} {x.median:8.2f} {db / MB / x.median:6.0f} "
                     f"{(x.output / MB) if x.output else float('nan'):7.1f} "
                     f"{(x.peak / MB) if x.peak else float('nan'):7.0f} {cpu:6.1f}  {vs}")
    lines.append("")
    for c in run["checks"]:
        mark = "INFO" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        lines.append(f"{mark:<4}  {c['target']:<36} {c['detail']}")
    if prof := profile_text(run):
        lines += ["", prof]
    return "\n".join(lines)


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line seconds = a + b * GB."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - b * mx, b


def scaling(runs: list[dict[str, Any]], project_gb: float = 100.0) -> tuple[str, dict[str, Any]]:
    keys = ("dump_plain_gzip1", "dump_plain_zstd1", "ours_backup", "restore_pg_restore", "restore_gunzip_psql",
            "ours_restore", "basebackup")
    sizes = [run["data"]["database_bytes"] / GB for run in runs]
    out: dict[str, Any] = {}
    lines = [f"{'operation':<52} " + " ".join(f"{s:6.2f}GB" for s in sizes)
             + f"   fit: s = a + b*GB   {project_gb:.0f} GB"]
    for k in keys:
        if not all(k in run["results"] for run in runs):
            continue
        pts = [(s, run["results"][k].median) for s, run in zip(sizes, runs)]
        a, b = fit(pts)
        proj = a + b * project_gb
        out[k] = {"points": pts, "a": a, "b": b, "projected_seconds": proj}
        label = runs[0]["results"][k].label
        lines.append(f"{label:<52} " + " ".join(f"{y:7.1f}s" for _, y in pts)
                     + f"   a={a:5.1f} b={b:6.1f}   {proj / 60:6.1f} min")
    return "\n".join(lines), out


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1gb", help="database size, e.g. 250mb, 1gb")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (min and median are reported)")
    ap.add_argument("--scaling", default="", help="extra sizes for the scaling fit, comma-separated, e.g. 0.25gb")
    ap.add_argument("--scaling-reps", type=int, default=2, help="repetitions at the extra sizes")
    ap.add_argument("--no-flows", action="store_true", help="skip the Prefect flow runs")
    ap.add_argument("--before", metavar="REV", help="also time take_backup/restore_backup as of this git revision "
                    "(before/after numbers for a change to dr/backup.py or dr/restore.py)")
    ap.add_argument("--json", type=Path, help="write every sample and the verdicts here")
    ap.add_argument("--workdir", type=Path, help="keep the servers here (reused on the next run); default a temp dir")
    ap.add_argument("--keep", action="store_true", help="leave the servers running and the workdir in place")
    ap.add_argument("--from-json", type=Path, metavar="FILE", help="measure nothing: print the tables and verdicts "
                    "of an earlier --json file again")
    args = ap.parse_args(argv)
    if args.from_json:
        return _report(_load_runs(args.from_json), None)

    if args.before:  # pin it: a commit made during the run must not change what "before" means
        args.before = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.before],
                                     capture_output=True, text=True, check=True).stdout.strip()
    cores = os.cpu_count() or 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dr-bench-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # the PostgreSQL OS user must enter it when we run as root

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    sizes = [(args.size, args.reps)] + [(s, args.scaling_reps) for s in args.scaling.split(",") if s.strip()]
    runs: list[dict[str, Any]] = []
    try:
        for size, reps in sizes:
            run = run_size(workdir, size, reps, cores, flows=not args.no_flows, before=args.before, log=log)
            run.update(cores=cores, reps=reps)
            run["checks"] = judge(run)
            runs.append(run)
            print(f"\n{table(run)}\n", flush=True)
    finally:
        if not args.keep:
            _down(workdir)
    return _report(runs, args.json, printed=True)


def _load_runs(path: Path) -> list[dict[str, Any]]:
    runs = []
    for r in json.loads(path.read_text())["runs"]:
        results = {}
        for k, v in r["results"].items():
            res = Result(k, v["label"], v["group"])
            res.samples = [Sample(**sm) for sm in v["samples"]]
            results[k] = res
        run = {"size": r["size"], "cores": r["cores"], "reps": r["reps"], "data": r["data"], "results": results,
               "profile": r.get("profile")}
        run["checks"] = judge(run)
        runs.append(run)
    return runs


def _report(runs: list[dict[str, Any]], json_path: Path | None, printed: bool = False) -> int:
    """Print the tables (unless already printed), the scaling fit, and write the JSON."""
    if not printed:
        for run in runs:
            print(f"\n{table(run)}\n")
    report: dict[str, Any] = {
        "machine": {"cores": runs[0]["cores"], "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_end": os.getloadavg()},
        "runs": [{"size": r["size"], "cores": r["cores"], "reps": r["reps"], "data": r["data"], "checks": r["checks"],
                  "profile": r.get("profile"),
                  "results": {k: {"label": v.label, "group": v.group, "min": v.min, "median": v.median,
                                  "output_bytes": v.output, "peak_rss": v.peak,
                                  "samples": [asdict(s) for s in v.samples]} for k, v in r["results"].items()}}
                 for r in runs],
    }
    if len(runs) > 1:
        text, fits = scaling(sorted(runs, key=lambda r: r["data"]["database_bytes"]))
        report["scaling"] = fits
        print(f"scaling (median seconds; least-squares line; projection assumes the same CPU-bound regime)\n{text}\n")
    if json_path:
        json_path.write_text(json.dumps(report, indent=2, default=str))
    main_checks = runs[0]["checks"]
    return 0 if all(c["pass"] is not False for c in main_checks) else 1


def _down(workdir: Path) -> None:
    from dr.config import load_config
    from dr.platforms.local import lifecycle

    for cfg in workdir.glob("bench-*/dr.toml"):
        try:
            lifecycle.down(load_config(cfg), purge=False)
        except Exception as exc:  # leave the directory for a look
            print(f"could not stop the servers of {cfg.parent}: {exc}", file=sys.stderr)
            return
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        _worker(json.loads(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_flows":
        _flow_server()
    else:
        sys.exit(main())
