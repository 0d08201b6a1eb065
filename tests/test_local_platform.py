"""The local platform: real servers, real WAL archiving and PTR, a real store and app."""

from __future__ import annotations

import hashlib
import os
import threading
from datetime import timedelta

import httpx
import pytest

from dr.backup import take_backup
from dr.commands import PgTools
from dr.errors import BackupCorrupted, BackupExists, InvalidRestoreTime, ServerExists
from dr.platforms.base import BackupInfo
from dr.platforms.local.sample import table_counts
from dr.restore import restore_backup
from tests.helpers import utc_now, wait_a_second


class TestLiveServer:
    def test_up_loads_sample_data_with_foreign_keys(self, shared_env):
        counts = table_counts(shared_env.conn())
        assert counts["public.candidates"] == 500
        assert counts["public.applications"] == 1500
        orphans = shared_env.scalar("SELECT count(*) FROM applications a LEFT JOIN candidates c ON c.id = a.candidate_id "
                                    "WHERE c.id IS NULL")
        assert orphans == 0
        fks = shared_env.scalar("SELECT count(*) FROM pg_constraint WHERE contype = 'f'")
        assert fks >= 4

    def test_wal_is_archived_continuously(self, shared_env):
        servers = shared_env.platform.servers
        archive = servers.servers_dir / shared_env.target.server / "archive"
        before = {p.name for p in archive.iterdir()}
        shared_env.query("SELECT pg_current_xact_id()")  # WAL to switch away from (else the switch is a no-op)
        seg = shared_env.scalar("SELECT pg_walfile_name(pg_switch_wal())")
        import time

        deadline = time.monotonic() + 30
        while seg not in {p.name for p in archive.iterdir()} and time.monotonic() < deadline:
            time.sleep(0.2)
        after = {p.name for p in archive.iterdir()}
        assert seg in after and len(after) > len(before)
        assert shared_env.scalar("SELECT failed_count FROM pg_stat_archiver") == 0
        # segments of the configured size (the test config's 1 MB; PostgreSQL's 16 MB by default)
        assert shared_env.scalar("SHOW wal_segment_size") == "1MB"
        assert (archive / seg).stat().st_size == 1024 * 1024

    def test_up_is_idempotent(self, shared_env):
        shared_env.up()
        assert table_counts(shared_env.conn())["public.candidates"] == 500

    def test_password_is_not_on_any_command_line(self, shared_env):
        password = shared_env.conn().password
        assert password
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmd = open(f"/proc/{pid}/cmdline", "rb").read()
                except OSError:
                    continue
                assert password.encode() not in cmd


class TestPointInTimeRestore:
    def test_restores_exactly_the_rows_committed_before_the_target(self, live_env):
        live_env.query("CREATE TABLE marks (id int PRIMARY KEY, note text)")
        live_env.query("INSERT INTO marks VALUES (1, 'before'), (2, 'before')")
        wait_a_second()
        t1 = utc_now()
        wait_a_second()
        live_env.query("INSERT INTO marks VALUES (3, 'after')")
        live_env.query("DELETE FROM marks WHERE id = 1")
        servers = live_env.platform.servers
        srv = servers.point_in_time_restore(live_env.target.server, "ptr-copy", t1)
        rows = live_env.query("SELECT id, note FROM marks ORDER BY id", server=srv.name)
        assert rows == [(1, "before"), (2, "before")]
        # the live server is untouched
        assert live_env.query("SELECT id FROM marks ORDER BY id") == [(2,), (3,)]
        assert srv.tags["dr-source-server"] == live_env.target.server

    def test_same_request_again_reuses_the_server(self, live_env):
        servers = live_env.platform.servers
        wait_a_second()
        t = utc_now().replace(microsecond=0)
        a = servers.point_in_time_restore(live_env.target.server, "ptr-again", t)
        b = servers.point_in_time_restore(live_env.target.server, "ptr-again", t)
        assert a.port == b.port and a.created_at == b.created_at
        with pytest.raises(ServerExists):
            servers.point_in_time_restore(live_env.target.server, "ptr-again", t - timedelta(seconds=1))

    def test_refuses_times_outside_the_window(self, live_env):
        servers = live_env.platform.servers
        window = servers.get_restore_window(live_env.target.server)
        with pytest.raises(InvalidRestoreTime, match="outside the restore window"):
            servers.point_in_time_restore(live_env.target.server, "ptr-early", window.earliest - timedelta(minutes=5))
        with pytest.raises(InvalidRestoreTime, match="outside the restore window"):
            servers.point_in_time_restore(live_env.target.server, "ptr-late", utc_now() + timedelta(hours=1))
        assert not servers.server_exists("ptr-early") and not servers.server_exists("ptr-late")


class TestDropAndRevive:
    def test_revive_returns_the_same_data(self, live_env):
        servers = live_env.platform.servers
        live_env.query("CREATE TABLE keepme AS SELECT g AS id FROM generate_series(1, 77) g")
        before = table_counts(live_env.conn())
        servers.delete_server(live_env.target.server)
        assert not servers.server_exists(live_env.target.server)
        servers.delete_server(live_env.target.server)  # already gone: fine
        dropped = servers.list_dropped_servers()
        assert [d.name for d in dropped] == [live_env.target.server]
        servers.revive_dropped_server(live_env.target.server)
        assert table_counts(live_env.conn()) == before
        assert live_env.scalar("SELECT count(*) FROM keepme") == 77


class TestBackupStore:
    def _put(self, store, name: str, data: bytes) -> BackupInfo:
        with store.writer(name) as w:
            w.write(data)
            return w.commit(BackupInfo(name=name, size=0, complete=True, created_at=utc_now(), kind="adhoc"))

    def test_round_trip_with_checksum(self, fresh_env):
        store = fresh_env.platform.store
        data = os.urandom(300_000)
        info = self._put(store, "a.pgdump", data)
        assert info.sha256 == hashlib.sha256(data).hexdigest() and info.size == len(data)
        with store.reader("a.pgdump") as r:
            got = r.read()
            r.verify()
        assert got == data

    def test_refuses_to_overwrite(self, fresh_env):
        store = fresh_env.platform.store
        self._put(store, "b.pgdump", b"original")
        with pytest.raises(BackupExists):
            self._put(store, "b.pgdump", b"replacement")
        with store.reader("b.pgdump") as r:
            assert r.read() == b"original"

    def test_detects_a_corrupted_file(self, fresh_env):
        store = fresh_env.platform.store
        self._put(store, "c.pgdump", b"x" * 10_000)
        path = store.root / "c.pgdump"
        raw = bytearray(path.read_bytes())
        raw[5000] ^= 0x01  # one bit flipped on disk
        path.write_bytes(bytes(raw))
        with pytest.raises(BackupCorrupted, match="corrupted"):
            with store.reader("c.pgdump") as r:
                r.read()
                r.verify()

    def test_failed_upload_leaves_nothing(self, fresh_env):
        store = fresh_env.platform.store
        with pytest.raises(RuntimeError):
            with store.writer("d.pgdump") as w:
                w.write(b"partial")
                raise RuntimeError("producer died")
        assert store.list_backups() == []
        assert [p.name for p in store.root.iterdir()] == []

    def test_a_big_upload_goes_to_disk_while_it_is_written(self, fresh_env, monkeypatch):
        """The commit's fsync must not be left a whole backup to write (measured: ~0.6 s per 270 MB)."""
        import dr.platforms.local.store as local_store

        store = fresh_env.platform.store
        monkeypatch.setattr(local_store, "FLUSH_EVERY", 100_000)
        flushed_sizes: list[int] = []
        first_flush = threading.Event()
        real_fdatasync = os.fdatasync

        def recording_fdatasync(fd: int) -> None:
            flushed_sizes.append(os.fstat(fd).st_size)
            first_flush.set()
            real_fdatasync(fd)

        monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
        data = os.urandom(1_000_000)
        with store.writer("big.pgdump") as w:
            for i in range(0, len(data), 50_000):
                w.write(data[i:i + 50_000])
                if i + 50_000 == 100_000:
                    # the flush runs in a thread: let it start before writing on, so what it saw is known
                    assert first_flush.wait(30), "no flush was started once 100 kB were written"
            before_commit = list(flushed_sizes)
            info = w.commit(BackupInfo(name="big.pgdump", size=0, complete=True, created_at=utc_now(), kind="adhoc"))
        # the first flush saw the first 100 kB on disk; more followed while the rest was written (how many
        # depends on how fast each flush is: one runs at a time, so a slow one can see the whole file)
        assert before_commit[0] == 100_000, before_commit
        assert all(100_000 <= n <= len(data) for n in before_commit), before_commit
        with store.reader("big.pgdump") as r:
            assert r.read() == data
            r.verify()
        assert info.size == len(data)

    def test_a_disk_error_met_by_a_background_flush_fails_the_upload(self, fresh_env, monkeypatch):
        """Linux reports a writeback error to one fsync only: the writer must keep it, not commit."""
        import errno

        import dr.platforms.local.store as local_store
        from dr.errors import BackupError

        store = fresh_env.platform.store
        monkeypatch.setattr(local_store, "FLUSH_EVERY", 100_000)

        def full_disk(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fdatasync", full_disk)
        with pytest.raises(BackupError, match="is full"):
            with store.writer("e.pgdump") as w:
                for _ in range(10):
                    w.write(os.urandom(50_000))
                w.commit(BackupInfo(name="e.pgdump", size=0, complete=True, created_at=utc_now(), kind="adhoc"))
        assert store.list_backups() == []
        assert [p.name for p in store.root.iterdir()] == []


class TestRoundTrip:
    @pytest.mark.parametrize("fmt", ["custom", "plain-gzip"])
    def test_dump_store_restore_into_new_database(self, shared_env, fmt):
        p, t = shared_env.platform, shared_env.target
        tools = PgTools.default()
        name = f"roundtrip-{fmt}-{utc_now():%H%M%S%f}"
        res = take_backup(p.servers, p.store, tools, server=t.server, database=t.database, name=name,
                          kind="adhoc", fmt=fmt)
        assert res.info.manifest["rows"] == table_counts(shared_env.conn())
        r = restore_backup(p.servers, p.store, tools, server=t.server, database="roundtrip_copy_" + fmt.replace("-", "_"),
                           backup=name, jobs=2, swap=True)
        assert r.verified_manifest
        assert table_counts(shared_env.conn(r.database)) == table_counts(shared_env.conn())
        checksum = "SELECT md5(string_agg(personal_statement, '' ORDER BY id)) FROM applications"
        assert shared_env.scalar(checksum, database=r.database) == shared_env.scalar(checksum)


class TestSwap:
    def test_a_swap_that_cannot_finish_leaves_the_live_database_open_and_unchanged(self, shared_env):
        """A session on the new database blocks its rename (PostgreSQL waits 5 s for it, then refuses): the live
        database must come back as it was."""
        import psycopg

        from dr.database import swap_databases
        from dr.errors import RestoreError

        for db, rows in (("swap_live", 3), ("swap_new", 5)):
            shared_env.query(f"DROP DATABASE IF EXISTS {db}")
            shared_env.query(f"CREATE DATABASE {db}")
            shared_env.query(f"CREATE TABLE t AS SELECT generate_series(1, {rows}) AS id", database=db)
        admin = shared_env.conn("postgres")
        with psycopg.connect(**shared_env.conn("swap_new").psycopg_kwargs()):
            with pytest.raises(RestoreError, match="kept reconnecting") as err:
                swap_databases(admin, "swap_live", "swap_new", "swap_live_replaced_x", attempts=1)
        assert "swap_live is unchanged" in err.value.world_state
        assert shared_env.scalar("SELECT count(*) FROM t", database="swap_live") == 3  # it takes connections again
        assert shared_env.scalar("SELECT count(*) FROM t", database="swap_new") == 5
        assert shared_env.query("SELECT datname FROM pg_database WHERE datname LIKE 'swap_live_replaced%'") == []


class TestApp:
    def test_healthcheck_and_maintenance_switch(self, shared_env):
        app = shared_env.platform.app
        st = app.get_status()
        assert httpx.get(st.main_url + "/healthcheck").status_code == 200
        st = app.enable_maintenance()
        main = httpx.get(st.main_url + "/")
        assert main.status_code == 503 and "maintenance" in main.text
        assert httpx.get(st.temp_url + "/healthcheck").status_code == 200
        st = app.disable_maintenance()
        assert st.temp_url is None
        assert httpx.get(st.main_url + "/healthcheck").status_code == 200

    def test_healthcheck_fails_when_the_data_is_gone(self, live_env):
        app = live_env.platform.app
        live_env.query("TRUNCATE applications, audit_events")
        status, body = app.healthcheck()
        assert status == 503 and "empty" in body

    def test_scale_down_records_and_scale_up_restores(self, live_env):
        app = live_env.platform.app
        assert app.get_status().replicas == {"web": 1, "worker": 1}
        app.scale({"worker": 0})
        recorded = app.scale_down()
        assert recorded == {"web": 1, "worker": 0}
        assert app.get_status().replicas == {"web": 0, "worker": 0}
        assert app.scale_down() == {"web": 1, "worker": 0}  # second call keeps the first recording
        assert app.scale_up() == {"web": 1, "worker": 0}
        st = app.get_status()
        assert st.replicas == {"web": 1, "worker": 0} and st.recorded_replicas is None


class TestProgress:
    def test_bar_shows_percent_rate_and_eta(self):
        import io

        from dr.progress import Progress, terminal_bar

        out = io.StringIO()
        p = Progress("restore x", total=1000, interval=0, hooks=[terminal_bar(out)])
        p.add(250)
        p.add(250)
        text = out.getvalue().split("\r")[-1]
        assert "50%" in text and "of ~1000 B" in text and "ETA" in text and "/s" in text
