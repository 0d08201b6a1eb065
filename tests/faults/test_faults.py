"""Faults injected at the boundary: killed tools, a stopped server, damaged backups, a full store.

Every test takes a snapshot of the world, injects one fault from outside (SIGKILL/SIGSTOP of
a real child process found in /proc, `pg_ctl stop`, bytes changed on disk, a tmpfs mounted as
the store), and asserts that nothing was lost or left unaccounted for (`assert_nothing_lost`)
and that the error says what the world looks like now.

Most classes share one local platform (`world_env`): a passing fault test leaves the world as
it found it, which is exactly what these tests assert. Each takes its own snapshot first.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest

from dr.errors import BackupCorrupted, BackupError, EnvironmentBusy, InvalidRestoreTime, RestoreError
from dr.platforms.base import TAG_INCIDENT
from flows.backup import backup_database
from flows.data_loss import data_loss
from flows.ptr import point_in_time_restore, ptr_server_name
from flows.restore import restore_database
from tests.faults.harness import (
    assert_nothing_lost,
    assert_says_world_state,
    descendants,
    freeze,
    in_thread,
    kill,
    live_state,
    snapshot,
    step_until,
    thaw,
    wait_for_child,
)
from tests.helpers import make_env, utc_now, wait_a_second

REPO = Path(__file__).resolve().parents[2]
MB = 1024 * 1024

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def world_env(base_dir, prefect_server):
    """One local platform for the faults that must leave it as they found it."""
    env = make_env(base_dir, "faults")
    env.up()
    # random bytes: a dump of several MB that takes long enough to be caught in the middle,
    # and does not compress below the 2 MB of the full-store fault
    env.query("CREATE TABLE blobs (id int PRIMARY KEY, data bytea NOT NULL)")
    env.query("INSERT INTO blobs SELECT g, decode(md5(random()::text) || md5(random()::text), 'hex') "
              "FROM generate_series(1, 200000) g")
    env.query("ANALYZE")
    yield env
    env.discard()


def restore_databases(env) -> list[str]:
    return [r[0] for r in env.query("SELECT datname FROM pg_database WHERE datname LIKE '%\\_restore\\_%'")]


def copy_in_progress(env) -> bool:
    """A COPY into a `_restore_` database is under way and has written rows (pg_restore is mid-data)."""
    try:
        return bool(env.scalar(
            "SELECT count(*) FROM pg_stat_progress_copy p JOIN pg_database d ON d.oid = p.datid "
            "WHERE d.datname LIKE '%\\_restore\\_%' AND p.tuples_processed > 0", database="postgres"))
    except psycopg.Error:
        return False


def kill_all(comm: str) -> list[int]:
    """SIGKILL every descendant of this process named `comm` (pg_restore -j forks workers)."""
    pids = [pid for pid, name in descendants().items() if name == comm]
    for pid in pids:
        kill(pid)
    return pids


def take_backup(env, **kw) -> str:
    return backup_database(**env.kw(), **kw)["name"]


def diverge(env, tag: str) -> None:
    """Change the live database, so that a restore that wrongly went through would show."""
    env.query("INSERT INTO providers (code, name, address) VALUES (%s, 'after the backup', '{}')", (tag,))


# --- 1. pg_dump killed mid-backup ------------------------------------------------------------


@pytest.fixture(scope="class")
def pg_dump_killed(world_env):
    """Start a backup, run pg_dump until it has staged a megabyte, then SIGKILL it."""
    env, store = world_env, world_env.platform.store
    obs: dict = {"before": snapshot(env), "listed": [b.name for b in store.list_backups()]}
    run = in_thread(backup_database, **env.kw(), kind="adhoc")
    pg_dump = wait_for_child("pg_dump", "--snapshot=", while_=run.thread.is_alive)

    def staged_a_chunk() -> bool:
        try:
            return any(p.stat().st_size >= MB for p in store.root.glob(".*.partial"))
        except FileNotFoundError:  # the staged file went away between listing and stat
            return False

    try:
        obs["caught_mid_dump"] = step_until(pg_dump, staged_a_chunk, progress="wchar")
        obs["listed_mid_dump"] = [b.name for b in store.list_backups()]
    finally:
        kill(pg_dump)
        run.join()
    obs.update(error=run.error, after=snapshot(env), listed_after=[b.name for b in store.list_backups()])
    return obs


class TestPgDumpKilledMidBackup:
    def test_nothing_is_committed_and_no_partial_file_is_visible(self, pg_dump_killed):
        obs = pg_dump_killed
        assert obs["caught_mid_dump"], "pg_dump ended before a megabyte was staged"
        # mid-backup bytes were staged, yet the store never listed anything new
        assert obs["listed_mid_dump"] == obs["listed"] == obs["listed_after"]
        assert isinstance(obs["error"], BackupError), repr(obs["error"])
        assert "nothing was stored" in str(obs["error"])
        assert_nothing_lost(obs["before"], obs["after"])

    def test_the_error_says_what_state_the_world_is_in(self, pg_dump_killed):
        assert_says_world_state(pg_dump_killed["error"])

    def test_the_error_says_why_the_backup_failed(self, pg_dump_killed):
        text = str(pg_dump_killed["error"])
        assert "signal 9" in text or "SIGKILL" in text or "killed" in text or "-9" in text, text


# --- 2. pg_restore killed mid-restore -----------------------------------------------------------


@pytest.fixture(scope="module")
def good_backup(world_env) -> str:
    """A sound backup of the shared environment, older than its live database."""
    name = take_backup(world_env)
    diverge(world_env, "AFTER-GOOD-BACKUP")
    return name


def rows_in_all_tables(env, database: str) -> int:
    tables = env.query("SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables", database=database)
    return sum(env.scalar(f"SELECT count(*) FROM {t}", database=database) for (t,) in tables)


def freeze_a_loader_mid_copy(env, timeout: float = 120) -> int | None:
    """The PostgreSQL backend of one of the parallel loader's connections, caught in a COPY into a
    `_restore_` database and FROZEN (SIGSTOP) there; None if no such COPY was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rows = env.query("SELECT pid FROM pg_stat_activity WHERE datname LIKE '%\\_restore\\_%' "
                             "AND state = 'active' AND query LIKE 'COPY %'", database="postgres")
        except psycopg.Error:
            rows = []
        if rows:
            pid = rows[0][0]
            freeze(pid)
            return pid
        time.sleep(0.001)
    return None


@pytest.fixture(scope="class", params=["streamed", "parallel-rows", "parallel-indexes"])
def pg_restore_killed(request, world_env, good_backup):
    """Restore, and kill it in the middle:

    - streamed (`jobs` 1): SIGKILL pg_restore in the middle of a COPY;
    - parallel-rows (`jobs` 2): one of the loader's connections terminated in the middle of its COPY;
    - parallel-indexes (`jobs` 2): SIGKILL the first `pg_restore` that builds an index or constraint
      as soon as its table's rows are in (with every other pg_restore then running).
    """
    env = world_env
    obs: dict = {"before": snapshot(env), "how": request.param}
    jobs = 1 if request.param == "streamed" else 2
    run = in_thread(restore_database, **env.kw(), backup=good_backup, safety_backup=False, jobs=jobs)
    if request.param == "parallel-rows":
        backend = freeze_a_loader_mid_copy(env)
        try:
            obs["caught_mid_copy"] = backend is not None
            obs["restore_dbs_mid_copy"] = restore_databases(env)
        finally:
            if backend is not None:
                env.query("SELECT pg_terminate_backend(%s)", (backend,), database="postgres")
                thaw(backend)
            run.join()
    else:
        which = "--exit-on-error" if request.param == "streamed" else "early-"
        pg_restore = wait_for_child("pg_restore", which, while_=run.thread.is_alive)
        try:
            if request.param == "streamed":
                obs["caught_mid_copy"] = step_until(pg_restore, lambda: copy_in_progress(env), progress="rchar")
            else:  # a table's rows are in (committed), its index not yet
                obs["caught_mid_copy"] = rows_in_all_tables(env, restore_databases(env)[0]) > 0
            obs["restore_dbs_mid_copy"] = restore_databases(env)
        finally:
            kill_all("pg_restore")  # with its -j workers
            run.join()
    obs.update(error=run.error, after=snapshot(env), restore_dbs_after=restore_databases(env))
    return obs


class TestPgRestoreKilledMidRestore:
    def test_live_database_unchanged_and_no_restore_database_left(self, pg_restore_killed):
        obs = pg_restore_killed
        assert obs["caught_mid_copy"], "pg_restore ended before any COPY"
        assert obs["restore_dbs_mid_copy"], "no _restore_ database while pg_restore ran"
        assert isinstance(obs["error"], RestoreError), repr(obs["error"])
        assert_says_world_state(obs["error"])
        assert "untouched" in str(obs["error"])
        assert obs["restore_dbs_after"] == []
        assert_nothing_lost(obs["before"], obs["after"])

    def test_the_error_says_why_the_restore_failed(self, pg_restore_killed):
        text = str(pg_restore_killed["error"])
        if pg_restore_killed["how"] == "parallel-rows":
            # libpq reports the terminated backend as the server's FATAL or, mid-send, as a closed connection
            assert "loading the rows of public." in text and ("terminat" in text or "closed the connection" in text), text
        else:
            assert "signal 9" in text or "SIGKILL" in text or "killed" in text or "-9" in text, text


# --- 3. damaged backups -------------------------------------------------------------------------


def truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def flip_a_bit(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)[0]
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte ^ 0x10]))


class TestDamagedBackup:
    @pytest.mark.parametrize("damage, fmt, jobs", [
        (truncate, "custom", 2),
        (flip_a_bit, "custom", 1),
        (truncate, "plain-gzip", 1),
        (truncate, "custom-zstd", 2),
        (flip_a_bit, "custom-zstd", 1),
    ], ids=["truncated-custom-spooled", "bit-flipped-custom-streamed", "truncated-sql-gz",
            "truncated-custom-zstd-spooled", "bit-flipped-custom-zstd-streamed"])
    def test_restore_is_refused_and_the_live_database_is_unchanged(self, world_env, damage, fmt, jobs):
        env = world_env
        name = take_backup(env, backup_format=fmt)
        diverge(env, f"AFTER-{fmt}-{damage.__name__}")
        damage(env.platform.store.root / name)
        before = snapshot(env)  # the damaged backup is part of the world now: it must stay as it is

        with pytest.raises((BackupCorrupted, RestoreError)) as err:
            restore_database(**env.kw(), backup=name, safety_backup=False, jobs=jobs)

        assert isinstance(err.value, BackupCorrupted) or "corrupt" in str(err.value) or "truncated" in str(err.value)
        assert "untouched" in str(err.value)
        assert restore_databases(env) == []
        assert_nothing_lost(before, snapshot(env))

    def test_an_unreadable_sidecar_is_reported_by_name(self, world_env):
        env = world_env
        name = take_backup(env)
        diverge(env, "AFTER-SIDECAR")
        sidecar = env.platform.store.root / (name + ".meta.json")
        good = sidecar.read_bytes()
        sidecar.write_bytes(good[: len(good) // 2])
        try:
            before = snapshot(env)
            with pytest.raises(BackupError) as err:
                restore_database(**env.kw(), safety_backup=False)  # the newest backup: the damaged one
            assert name in str(err.value)
            assert_says_world_state(err.value)
            assert_nothing_lost(before, snapshot(env))
        finally:
            sidecar.write_bytes(good)


# --- 4. the target server stopped during a restore -------------------------------------------------


@pytest.fixture(scope="class")
def server_stopped_mid_restore(world_env, good_backup):
    """Stop the live server (pg_ctl stop, from this thread) while pg_restore is writing into it."""
    env, servers = world_env, world_env.platform.servers
    before = snapshot(env)
    run = in_thread(restore_database, **env.kw(), backup=good_backup, safety_backup=False, jobs=1)
    pg_restore = wait_for_child("pg_restore", "--exit-on-error", while_=run.thread.is_alive)
    try:
        assert step_until(pg_restore, lambda: copy_in_progress(env), progress="rchar"), "pg_restore ended before a COPY"
        left = restore_databases(env)
        servers.stop_server(env.target.server)  # fast shutdown: ends pg_restore's session mid-COPY
    finally:
        thaw(pg_restore)
        run.join()
        servers.start_server(env.target.server)
    return before, snapshot(env), run.error, left


class TestServerStoppedMidRestore:
    def test_clean_error_and_the_live_database_unchanged_after_restart(self, world_env, server_stopped_mid_restore):
        before, after, error, _ = server_stopped_mid_restore
        assert isinstance(error, RestoreError), repr(error)
        assert "untouched" in str(error)
        assert after.live == before.live
        assert after.backups == before.backups
        assert after.servers == before.servers

    def test_nothing_is_left_behind_unreported(self, world_env, server_stopped_mid_restore):
        before, after, error, left = server_stopped_mid_restore
        world = str(error).partition("the world is now:")[2]
        reported = [db for db in left if db in world]  # said to be left behind, not merely named as the target
        assert_nothing_lost(before, after, restore_leftovers=reported)


# --- 7. the store's disk is full ---------------------------------------------------------------


@pytest.fixture
def full_store(world_env):
    """Mount a small tmpfs as the store directory (the backups already there are kept aside meanwhile)."""
    root = world_env.platform.store.root
    aside = root.with_name(root.name + ".aside")
    os.rename(root, aside)
    root.mkdir()
    mounted = []

    def mount(options: str) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(root)], capture_output=True, text=True,
                           check=False)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(options)
        return root

    try:
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=True)
        root.rmdir()  # the mount point, empty again
        os.rename(aside, root)


class TestStoreDiskFull:
    def test_a_full_store_stores_nothing_and_says_so(self, world_env, full_store):
        env = world_env
        root = full_store("size=2m")
        before = snapshot(env)
        live_before = live_state(env)
        assert env.scalar("SELECT pg_database_size(current_database())") > 2 * MB

        with pytest.raises(BackupError) as err:
            backup_database(**env.kw(), kind="adhoc")

        assert "full" in str(err.value) and "not saved" in str(err.value)
        assert list(root.iterdir()) == []
        assert shutil.disk_usage(root).used == 0
        assert live_state(env) == live_before
        assert_nothing_lost(before, snapshot(env))

    def test_a_store_full_at_the_commit_leaves_no_backup_listed(self, world_env, full_store):
        env = world_env
        # three inodes: the directory, the staged upload and the link to its final name; the sidecar
        # is the first thing that does not fit (tmpfs counts hard links against nr_inodes)
        root = full_store("size=64m,nr_inodes=3")
        before = snapshot(env)

        with pytest.raises(BackupError) as err:
            backup_database(**env.kw(), kind="adhoc")

        assert "not saved" in str(err.value)
        assert env.platform.store.list_backups() == []
        assert_nothing_lost(before, snapshot(env))
        assert list(root.iterdir()) == []


# --- 6b. a PTR worker killed while it copies the base backup ----------------------------------------


def worker_env() -> dict[str, str]:
    """The environment of a separate worker process that talks to this session's Prefect server."""
    import prefect.settings

    return {**os.environ, "PREFECT_API_URL": str(prefect.settings.PREFECT_API_URL.value())}


class TestPointInTimeRestoreWorkerKilled:
    def test_a_rerun_after_a_kill_during_the_copy_makes_the_server(self, world_env, tmp_path):
        env, servers = world_env, world_env.platform.servers
        wait_a_second()
        when = utc_now().replace(microsecond=0)
        new_dir = servers.servers_dir / ptr_server_name(env.target.server, when)
        kw = dict(env.kw(), restore_time=when.strftime("%Y-%m-%d %H:%M:%SZ"), incident="inc-ptr-kill")
        before = snapshot(env)
        code = (f"import sys; sys.path.insert(0, {str(REPO)!r})\nfrom flows.ptr import point_in_time_restore\n"
                f"point_in_time_restore(**{kw!r})\n")
        with open(tmp_path / "worker.log", "wb") as log_fh:
            worker = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL,
                                      stderr=log_fh, env=worker_env())
            try:
                deadline = time.monotonic() + 180
                while worker.poll() is None and not new_dir.exists() and time.monotonic() < deadline:
                    time.sleep(0.001)
                worker.send_signal(signal.SIGSTOP)
                landed = new_dir.exists() and not (new_dir / "server.json").exists()
            finally:
                worker.kill()
                worker.wait()
        if not landed:
            pytest.skip("the kill did not land inside the copy of the base backup this time")
        try:
            r = point_in_time_restore(**kw)
            assert r["server"] == new_dir.name
            assert [s.name for s in servers.list_servers() if s.tags.get(TAG_INCIDENT) == "inc-ptr-kill"] == [r["server"]]
            assert_nothing_lost(before, snapshot(env), servers_may_appear=True)
        finally:
            servers.delete_server(new_dir.name)
            shutil.rmtree(new_dir, ignore_errors=True)


# --- 5. point-in-time restore refused, or failing in recovery ---------------------------------------


class TestPointInTimeRestoreFailures:
    def test_a_time_outside_the_window_is_refused_before_anything_is_made(self, world_env):
        env = world_env
        before = snapshot(env)
        with pytest.raises(InvalidRestoreTime, match="outside the restore window") as err:
            point_in_time_restore(**env.kw(), restore_time="2020-01-01 10:00")
        assert "the restore window is" in str(err.value)  # says what would be accepted
        assert_nothing_lost(before, snapshot(env))

    def test_the_refusal_says_nothing_was_changed(self, world_env):
        with pytest.raises(InvalidRestoreTime) as err:
            point_in_time_restore(**world_env.kw(), restore_time="2020-01-01 10:00")
        assert_says_world_state(err.value)

    def test_a_recovery_that_cannot_reach_the_target_leaves_no_half_made_server(self, world_env):
        env, servers = world_env, world_env.platform.servers
        # WAL written after the newest base backup, archived, then lost from the archive
        env.query("CREATE TABLE IF NOT EXISTS ptr_gap (id int)")
        for i in range(3):
            env.query("INSERT INTO ptr_gap VALUES (%s)", (i,))
            last = env.scalar("SELECT pg_walfile_name(pg_switch_wal())")
        deadline = time.monotonic() + 60
        while (env.scalar("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") < last
               and time.monotonic() < deadline):
            time.sleep(0.2)
        wait_a_second()
        when = utc_now().replace(microsecond=0)
        archive = servers.servers_dir / env.target.server / "archive"
        for f in archive.iterdir():
            f.unlink()
        before = snapshot(env)
        new_name = ptr_server_name(env.target.server, when)

        with pytest.raises(RestoreError) as err:
            point_in_time_restore(**env.kw(), restore_time=when.strftime("%Y-%m-%d %H:%M:%SZ"))

        assert "recovery" in str(err.value)  # the cause, from the PTR server's log
        assert_says_world_state(err.value)
        assert f"{env.target.server} is unchanged" in str(err.value)
        assert [s.name for s in servers.list_servers()] == sorted(before.servers)
        assert not (servers.servers_dir / new_name).exists()
        assert not [pid for pid in _pids_mentioning(str(servers.servers_dir / new_name))]
        assert_nothing_lost(before, snapshot(env))


def _pids_mentioning(text: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text.encode() in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                pass
    return out


# --- 7b. the restore killed in the middle of its swap ------------------------------------------------

#: a swap in a process of its own; the connection (with its password) comes on stdin, never on argv
SWAP_RUNNER = """
import json, sys
from dr.commands import ConnInfo
from dr.database import swap_databases
swap_databases(ConnInfo(**json.loads(sys.stdin.readline())), "kill_live", "kill_new", "kill_live_replaced_x", attempts=1)
"""


class TestSwapKilled:
    def test_a_restore_killed_in_its_swap_leaves_the_live_database_as_it_was_and_accepting_connections(self, world_env):
        import dataclasses
        import json

        env = world_env
        for db, rows in (("kill_live", 3), ("kill_new", 5)):
            env.query(f"DROP DATABASE IF EXISTS {db}", database="postgres")
            env.query(f"CREATE DATABASE {db}", database="postgres")
            env.query(f"CREATE TABLE t AS SELECT generate_series(1, {rows}) AS id", database=db)
        waiting = ("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                   "AND query LIKE 'ALTER DATABASE \"kill_new\" RENAME TO \"kill_live\"%%'")
        # a session on the new database holds its rename: the swap stays inside its transaction (PostgreSQL
        # waits 5 s for that session), the live database already renamed away in it
        with psycopg.connect(**env.conn("kill_new").psycopg_kwargs()):
            proc = subprocess.Popen([sys.executable, "-c", SWAP_RUNNER], cwd=REPO, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                proc.stdin.write(json.dumps(dataclasses.asdict(env.conn("postgres"))) + "\n")
                proc.stdin.close()
                deadline = time.monotonic() + 60
                while not env.scalar(waiting, database="postgres"):
                    assert proc.poll() is None, f"the swap ended ({proc.returncode}): {proc.stderr.read()[-2000:]}"
                    assert time.monotonic() < deadline, "the swap never reached its second rename"
                    time.sleep(0.01)
                kill(proc.pid)  # kill -9 in the middle of the swap's transaction
            finally:
                proc.kill()
                proc.wait(30)
        # the server rolled the transaction back: the live database is as it was, and takes connections
        assert env.scalar("SELECT count(*) FROM t", database="kill_live") == 3
        assert env.scalar("SELECT count(*) FROM t", database="kill_new") == 5
        assert env.query("SELECT datname FROM pg_database WHERE datname LIKE 'kill_live_replaced%' "
                         "OR (datname LIKE 'kill_%' AND NOT datallowconn)", database="postgres") == []
        for db in ("kill_live", "kill_new"):
            env.query(f"DROP DATABASE {db}", database="postgres")


class TestRestoreKilledBeforeItsSwap:
    def test_tidy_up_drops_a_restored_database_that_was_never_swapped_in(self, world_env):
        """Killed between the restore's verification (the database marked 'dr: restored from ...') and its swap:
        the `_restore_` database is a copy of a backup; tidy-up lists it and drops it."""
        from tasks.tidy import delete_leftover, find_leftovers

        env = world_env
        name = f"{env.target.database}_restore_20200101000000"
        env.query(f"CREATE DATABASE {name}", database="postgres")
        env.query(f"COMMENT ON DATABASE {name} IS 'dr: restored from some_backup.pgdump.zst sha256=abc'",
                  database="postgres")
        found = [item for item in find_leftovers(_ref(env)) if item.name == name]
        assert [(f.kind, f.deletable) for f in found] == [("restore-database", True)]
        delete_leftover(_ref(env), found[0])
        assert not env.query("SELECT 1 FROM pg_database WHERE datname = %s", (name,), database="postgres")


def _ref(env):
    from dr.runtime import Ref

    return Ref(env.service, env.environment, env.config_path)


class TestHoldOfAKilledRestore:
    def test_tidy_up_finds_the_hold_of_a_dead_restore_process_and_keeps_a_live_one(self, tmp_path):
        import json

        from dr.platforms.base import BackupInfo
        from dr.platforms.local.store import LocalBackupStore

        store = LocalBackupStore(tmp_path / "store")
        writer = store.open_writer("b1.pgdump")
        writer.write(b"x")
        writer.commit(BackupInfo(name="b1.pgdump", size=0, complete=False, created_at=utc_now(), kind="adhoc",
                                 format="custom"))
        # a restore process that took a hold and was killed with -9 (the hold file is what it leaves)
        dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with store.hold("b1.pgdump", holder="restore-dead"):
            left = store.root / ".b1.pgdump.hold-restore-dead"
            record = json.loads(left.read_text())
            marker = left.read_bytes()
        (store.root / ".b1.pgdump.hold-restore-dead").write_bytes(marker.replace(
            f'"pid": {record["pid"]}'.encode(), f'"pid": {dead.pid}'.encode()))
        dead.kill()
        dead.wait()
        with store.hold("b1.pgdump", holder="restore-live"):  # this process: alive
            assert store.dead_holds() == [".b1.pgdump.hold-restore-dead"]
            store.release_dead_hold(".b1.pgdump.hold-restore-live")  # refused: its holder runs
            store.release_dead_hold(".b1.pgdump.hold-restore-dead")
            assert sorted(p.name for p in store.root.glob(".*hold*")) == [".b1.pgdump.hold-restore-live"]
        assert store.dead_holds() == [] and store.get_backup("b1.pgdump").complete


class TestLeftBehindByKilledProcesses:
    def test_tidy_up_removes_what_dead_processes_left_and_keeps_what_a_running_one_uses(self, fresh_env, tmp_path,
                                                                                         monkeypatch):
        """kill -9 leaves a backup's staging files, a restore's spool directory and a tool's passfile (named
        with their process's pid): tidy-up removes those of processes that no longer run, and only those."""
        import tempfile

        from flows.tidy_up import tidy_up

        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the tools' passfiles go
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        store, state = fresh_env.platform.store.root, fresh_env.config.local.state_dir.absolute()
        state.mkdir(parents=True, exist_ok=True)
        gone = [store / f".b.pgdump.zst.{dead.pid}-{'0' * 32}.partial",
                store / f".b.pgdump.zst.meta.json.{dead.pid}-{'1' * 32}.tmp",
                state / f"dr-spool-{dead.pid}-a1b2", tmp_path / f"dr-pass-{dead.pid}-c3d4"]
        kept = [store / f".c.pgdump.zst.{os.getpid()}-{'2' * 32}.partial", tmp_path / f"dr-pass-{os.getpid()}-e5f6",
                store / "unrelated.txt"]
        for path in gone + kept:
            if path.name.startswith("dr-"):
                path.mkdir()
                (path / "pgpass").write_text("secret")
            else:
                path.write_text("x")
        result = tidy_up(**fresh_env.kw())
        assert [p for p in gone if p.exists()] == [] and all(p.exists() for p in kept)
        assert sorted(f["kind"] for f in result["found"]) == [
            "passfile-directory", "spool-directory", "staging-file", "staging-file"]


# --- 8. two restores at once for the same environment ---------------------------------------------


class TestConcurrentRestores:
    def test_they_run_in_turn_and_nothing_is_lost(self, world_env):
        env = world_env
        env.query("CREATE TABLE turn (id int PRIMARY KEY)")
        env.query("INSERT INTO turn VALUES (1)")
        one, state_one = take_backup(env), live_state(env)
        env.query("INSERT INTO turn VALUES (2)")
        two, state_two = take_backup(env), live_state(env)
        env.query("INSERT INTO turn VALUES (3)")
        before = snapshot(env)

        runs = {name: in_thread(restore_database, **env.kw(), backup=name, jobs=1) for name in (one, two)}
        for run in runs.values():
            run.join(600)
        errors = {n: r.error for n, r in runs.items() if r.error}
        assert not errors, errors
        after = snapshot(env)

        # the later restore wins; each replaced exactly what the one before it left
        results = sorted((r.result for r in runs.values()), key=lambda r: r["replaced_database"])
        first, last = results
        assert first["replaced_database"] != last["replaced_database"]
        turns = {n: sorted(x[0] for x in env.query("SELECT id FROM turn", database=n))
                 for n in (first["replaced_database"], last["replaced_database"], env.target.database)}
        first_rows = [1] if first["backup"] == one else [1, 2]
        last_rows = [1] if last["backup"] == one else [1, 2]
        assert turns == {first["replaced_database"]: [1, 2, 3], last["replaced_database"]: first_rows,
                         env.target.database: last_rows}, "the restores interleaved"
        # each safety backup saw the database the restore before it had left
        safety = {r["safety_backup"]: env.platform.store.get_backup(r["safety_backup"]) for r in results}
        assert [safety[r["safety_backup"]].manifest["rows"]["public.turn"] for r in results] == [3, len(first_rows)]
        assert_nothing_lost(before, after, allowed_states=[state_one if last["backup"] == one else state_two],
                            new_backup_kinds={"pre-restore-safety"}, replaced_databases=2)
        assert after.live != before.live


class TestEnvironmentHeldByADeadRun:
    """Fault 10b: the recovery slot is taken and no run will free it (a run died holding it)."""

    def test_a_restore_gives_up_with_the_command_to_free_it_and_changes_nothing(self, world_env, tmp_path):
        env = world_env
        backup = take_backup(env)
        config = with_slot_wait(env.config_path, minutes=0.05, copy_to=tmp_path / "dr.toml")  # 3 s
        before = snapshot(env)
        take_recovery_slot()
        try:
            run = in_thread(restore_database, service="apply", environment="development", config_path=config,
                            backup=backup).join(120)
        finally:
            free_recovery_slot()
        after = snapshot(env)
        assert isinstance(run.error, EnvironmentBusy), run.error
        assert run.error.slot == RECOVERY_SLOT
        assert "prefect gcl update dr-apply-development --active-slots 0" in str(run.error)
        assert "no recovery run of apply development is Running or Paused" in str(run.error)
        assert_says_world_state(run.error)
        assert_nothing_lost(before, after)
        assert after.backups == before.backups, "a safety backup was taken although the restore never started"


# --- 6. the worker killed mid-scenario ----------------------------------------------------------


def _london(t) -> str:
    return t.astimezone(ZoneInfo("Europe/London")).strftime("%Y-%m-%d %H:%M:%S")


RECOVERY_SLOT = "dr-apply-development"
#: how long a re-run may wait for the slot of the run that was killed (its lease is 120 s)
SLOT_WAIT_SECONDS = 150


def with_slot_wait(config_path: str, *, minutes: float, copy_to: Path | None = None) -> str:
    """Set the development environment's `recovery_slot_wait_minutes` (in place, or in a copy)."""
    section = "[services.apply.environments.development]\n"
    text = Path(config_path).read_text()
    assert section in text
    out = copy_to or Path(config_path)
    out.write_text(text.replace(section, f"{section}recovery_slot_wait_minutes = {minutes}\n"))
    return str(out)


def take_recovery_slot(name: str = RECOVERY_SLOT) -> None:
    """What a run that died holding the slot leaves behind: the slot taken, and no live run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=1))


def free_recovery_slot(name: str = RECOVERY_SLOT) -> None:
    """What an operator does for a slot held by a dead run: `prefect gcl update <name> --active-slots 0`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
        except ObjectNotFound:
            pass


@pytest.fixture(scope="class")
def worker_killed_mid_scenario(base_dir, prefect_server, tmp_path_factory):
    """Run data-loss in a separate process, SIGKILL it once its PTR server exists, then re-run it here."""
    env = make_env(base_dir, "killed-worker")
    # the re-run gives up on the killed run's slot after 6 s (default an hour) and says how to free it
    with_slot_wait(env.config_path, minutes=0.1)
    env.up()
    obs: dict = {"env": env}
    try:
        servers, store = env.platform.servers, env.platform.store
        env.query("CREATE TABLE markers (id int PRIMARY KEY, note text)")
        env.query("INSERT INTO markers SELECT g, 'good ' || g FROM generate_series(1, 20) g")
        obs["expected"] = live_state(env)
        wait_a_second()
        t = utc_now().replace(microsecond=0)
        wait_a_second()
        env.query("INSERT INTO markers VALUES (21, 'after T'); DELETE FROM markers WHERE id <= 10")
        obs["app_before"] = env.platform.app.get_status()
        obs["before"] = snapshot(env)
        incident = obs["incident"] = "inc-killed-worker"
        obs["ptr_name"] = ptr_server_name(env.target.server, t)
        kw = dict(env.kw(), restore_time=_london(t), auto_approve=True, incident=incident)

        # the worker: another Python process running the scenario against the same Prefect server
        private_tmp = tmp_path_factory.mktemp("worker-tmp")
        worker_log = private_tmp.parent / "worker.log"
        code = f"import sys; sys.path.insert(0, {str(REPO)!r})\nfrom flows.data_loss import data_loss\ndata_loss(**{kw!r})\n"
        env_vars = {**worker_env(), "TMPDIR": str(private_tmp)}
        with open(worker_log, "wb") as log_fh:  # a file, not a pipe: a full pipe would stall the worker
            worker = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=log_fh,
                                      env=env_vars)
            try:
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and worker.poll() is None:
                    if any(s.tags.get(TAG_INCIDENT) == incident for s in servers.list_servers()):
                        break
                    time.sleep(0.1)
                assert worker.poll() is None, f"the worker ended by itself: {worker_log.read_text()[-2000:]}"
                worker.send_signal(signal.SIGKILL)
            finally:
                worker.kill()
                worker.wait()
        obs["backups_at_kill"] = sorted(b.kind for b in store.list_backups())
        obs["servers_at_kill"] = [s.name for s in servers.list_servers() if s.tags.get(TAG_INCIDENT) == incident]
        obs["passfiles_left"] = list(private_tmp.glob("dr-pass-*"))

        # the re-run, here; if the killed run's slot holds it, free the slot as an operator would
        started = time.monotonic()
        rerun = in_thread(data_loss, **kw)
        rerun.thread.join(SLOT_WAIT_SECONDS)
        obs["held_silently"] = rerun.thread.is_alive()
        if obs["held_silently"]:
            free_recovery_slot()
        rerun.join(600)
        obs["slot_error"] = None
        if rerun.error is not None and RECOVERY_SLOT in str(rerun.error):
            # the re-run said the slot is taken (and how to free it): do what it says, and re-run
            obs["slot_error"] = rerun.error
            free_recovery_slot()
            rerun = in_thread(data_loss, **kw).join(600)
        obs["seconds"] = time.monotonic() - started
        obs["result"], obs["error"] = rerun.result, rerun.error
        obs["after"] = snapshot(env)
        obs["dropped"] = [d.name for d in servers.list_dropped_servers()]
        obs["backups"] = sorted(b.kind for b in store.list_backups())
        obs["app_after"] = env.platform.app.get_status()
        obs["live"] = live_state(env)
        yield obs
    finally:
        free_recovery_slot()  # the slot is shared by the whole session: never leave it taken
        env.discard()


@pytest.mark.slow
class TestWorkerKilledMidScenario:
    def test_the_kill_landed_after_the_safety_backup_and_the_ptr_server(self, worker_killed_mid_scenario):
        obs = worker_killed_mid_scenario
        assert obs["backups_at_kill"] == ["pre-restore-safety"]
        assert obs["servers_at_kill"] == [obs["ptr_name"]]
        assert obs["passfiles_left"] == [], "the killed worker left a passfile (with the password) behind"

    def test_a_rerun_with_the_same_incident_finishes_without_making_anything_twice(self, worker_killed_mid_scenario):
        obs = worker_killed_mid_scenario
        print(f"the re-run took {obs['seconds']:.0f} s; held by the killed run's slot: {obs['held_silently']}")
        assert obs["error"] is None, obs["error"]
        assert obs["result"]["ptr_server"] == obs["ptr_name"]
        assert obs["live"] == obs["expected"]
        # exactly one PTR server was ever made for the incident (its name is deterministic), deleted at the end
        assert obs["dropped"] == [obs["ptr_name"]]
        assert not [s for s, tags in obs["after"].servers.items() if tags.get(TAG_INCIDENT) == obs["incident"]]
        assert obs["backups"] == ["pre-restore-safety", "ptr"]
        assert_nothing_lost(obs["before"], obs["after"], allowed_states=[obs["expected"]],
                            new_backup_kinds={"pre-restore-safety", "ptr"}, replaced_databases=1)
        assert not obs["app_after"].maintenance and obs["app_after"].replicas == obs["app_before"].replicas

    def test_the_rerun_is_not_held_silently_by_the_killed_runs_slot(self, worker_killed_mid_scenario):
        obs = worker_killed_mid_scenario
        assert not obs["held_silently"], "the re-run waited for the killed run's slot with no end"
        # the killed run ran on this host and its process is gone: the re-run frees its slot at once
        # (flows/common.py free_dead_holders) instead of stopping with EnvironmentBusy
        assert obs["slot_error"] is None, f"the re-run did not free the dead run's slot: {obs['slot_error']!r}"
