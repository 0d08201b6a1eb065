"""The building-block flows on the local platform, with the real Prefect engine."""

from __future__ import annotations

import gzip
import subprocess
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import httpx
import pytest

from dr.commands import PgTools, passfile_env
from dr.errors import BackupCorrupted, BackupExists, InvalidRestoreTime, RestoreError, ValidationFailed
from dr.platforms.base import BackupInfo
from dr.platforms.local.sample import table_counts
from flows.backup import backup_database
from flows.maintenance import maintenance_off, maintenance_on
from flows.ptr import point_in_time_restore
from flows.restore import restore_database
from flows.tidy_up import tidy_up
from flows.validate import validate_service
from tests.helpers import utc_now, wait_a_second

pytestmark = pytest.mark.usefixtures("prefect_server")

CHECKSUM = "SELECT md5(string_agg(id::text || personal_statement, ',' ORDER BY id)) FROM applications"


def put_raw_backup(env, name: str, data: bytes) -> None:
    """Put a file into the store the way other tooling would (no metadata sidecar)."""
    (env.platform.store.root / name).write_bytes(data)


def plain_dump_gz(env) -> bytes:
    """What the existing nightly tooling writes: pg_dump -E utf8 --clean --if-exists --no-owner, gzip -1."""
    tools = PgTools.default()
    with passfile_env(env.conn()) as penv:
        out = subprocess.run([tools.path("pg_dump"), "-E", "utf8", "--clean", "--if-exists", "--no-owner",
                              "--compress=1", "--no-password"], env=penv, capture_output=True, check=True)
    return out.stdout


class TestBackupFlow:
    def test_backup_is_stored_with_checksum_and_manifest(self, live_env):
        r = backup_database(**live_env.kw(), kind="adhoc")
        info = live_env.platform.store.get_backup(r["name"])
        assert info.complete and info.sha256 == r["sha256"] and info.kind == "adhoc"
        assert info.manifest["rows"] == table_counts(live_env.conn())
        assert r["name"].startswith("apply_dv_adhoc_") and r["name"].endswith(".pgdump.zst")

    def test_nightly_name_follows_the_convention_and_is_never_overwritten(self, live_env):
        r = backup_database(**live_env.kw(), kind="nightly", backup_format="plain-gzip")
        assert r["name"] == f"apply_dv_{utc_now():%Y-%m-%d}.sql.gz"
        before = (live_env.platform.store.root / r["name"]).read_bytes()
        with pytest.raises(BackupExists):
            backup_database(**live_env.kw(), kind="nightly", backup_format="plain-gzip")
        assert (live_env.platform.store.root / r["name"]).read_bytes() == before


class TestRestoreFlow:
    def test_round_trip_swaps_in_and_keeps_the_old_database(self, live_env):
        want = live_env.scalar(CHECKSUM)
        b = backup_database(**live_env.kw())
        live_env.query("DELETE FROM audit_events; DELETE FROM applications WHERE id % 2 = 0")
        r = restore_database(**live_env.kw(), backup=b["name"])
        assert live_env.scalar(CHECKSUM) == want
        assert r["verified_manifest"] and r["replaced_database"].startswith("apply_development_replaced_")
        # the damaged database is kept, and a safety backup of it was taken first
        assert live_env.scalar("SELECT count(*) FROM applications", database=r["replaced_database"]) == 750
        safety = live_env.platform.store.get_backup(r["safety_backup"])
        assert safety.kind == "pre-restore-safety" and safety.manifest["rows"]["public.applications"] == 750

    def test_two_restores_in_the_same_second_keep_both_old_databases(self, live_env, monkeypatch):
        """The kept database's name has 1-s resolution: a second restore must not collide with the first's."""
        import dr.restore

        monkeypatch.setattr(dr.restore, "replaced_name", lambda db, when: f"{db}_replaced_20261127040645")
        want = live_env.scalar(CHECKSUM)
        b = backup_database(**live_env.kw())
        live_env.query("DELETE FROM audit_events")
        first = restore_database(**live_env.kw(), backup=b["name"], safety_backup=False)["replaced_database"]
        b2 = backup_database(**live_env.kw())
        live_env.query("DELETE FROM audit_events WHERE id % 2 = 0")
        second = restore_database(**live_env.kw(), backup=b2["name"], safety_backup=False)["replaced_database"]
        assert (first, second) == ("apply_development_replaced_20261127040645",
                                   "apply_development_replaced_20261127040645_2")
        # the live database holds the backup and takes connections; each kept one holds what it held
        assert live_env.scalar(CHECKSUM) == want
        assert live_env.scalar("SELECT count(*) FROM audit_events", database=first) == 0
        assert live_env.scalar("SELECT count(*) FROM audit_events WHERE id % 2 = 0", database=second) == 0
        assert live_env.scalar("SELECT count(*) FROM audit_events WHERE id % 2 = 1", database=second) > 0
        # tidy-up knows both for its own
        found = {(i["kind"], i["name"]) for i in tidy_up(**live_env.kw(), dry_run=True)["found"]}
        assert {("replaced-database", first), ("replaced-database", second)} <= found

    def test_asking_again_for_a_backup_restores_it_again(self, live_env):
        """A person's second request for the same backup is done, not mistaken for a resumed incident."""
        b = backup_database(**live_env.kw())
        want = live_env.scalar(CHECKSUM)
        first = restore_database(**live_env.kw(), backup=b["name"], safety_backup=False)
        live_env.query("UPDATE applications SET personal_statement = 'edited' WHERE id % 3 = 0")  # users write on
        changed = live_env.scalar(CHECKSUM)
        again = restore_database(**live_env.kw(), backup=b["name"], safety_backup=False)
        assert first["skipped"] is None and again["skipped"] is None and not again["already_done"]
        assert live_env.scalar(CHECKSUM) == want != changed
        assert live_env.scalar(CHECKSUM, database=again["replaced_database"]) == changed

    def test_only_the_same_incident_resumes_a_finished_swap(self, live_env):
        """The "already holds this backup" check belongs to the incident (or run) that swapped it in."""
        from dr.restore import restore_backup

        b = backup_database(**live_env.kw())
        p, target = live_env.platform, live_env.target
        kw = dict(server=target.server, database=target.database, backup=b["name"])
        done = restore_backup(p.servers, p.store, PgTools.default(), **kw, resume_key="incident INC-1")
        resumed = restore_backup(p.servers, p.store, PgTools.default(), **kw, resume_key="incident INC-1")
        assert done.skipped is None and resumed.already_done and resumed.replaced_database is None
        assert "already holds backup" in resumed.skipped and "incident INC-1" in resumed.skipped
        other = restore_backup(p.servers, p.store, PgTools.default(), **kw, resume_key="incident INC-2")
        assert other.skipped is None and other.replaced_database is not None

    def test_restores_a_sql_gz_made_by_the_existing_tooling(self, live_env):
        want = table_counts(live_env.conn())
        put_raw_backup(live_env, "apply_dv_2026-11-01.sql.gz", plain_dump_gz(live_env))
        live_env.query("TRUNCATE audit_events")
        r = restore_database(**live_env.kw(), backup="apply_dv_2026-11-01.sql.gz", safety_backup=False)
        assert table_counts(live_env.conn()) == want
        assert not r["verified_manifest"]  # no manifest in foreign backups: the restore itself is the check

    def test_corrupted_backup_aborts_with_the_live_database_unchanged(self, live_env):
        b = backup_database(**live_env.kw())
        path = live_env.platform.store.root / b["name"]
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        path.write_bytes(bytes(raw))
        live_env.query("INSERT INTO providers (code, name, address) VALUES ('NEW1', 'New', '{}')")
        before = live_env.scalar("SELECT md5(string_agg(code, ',' ORDER BY id)) FROM providers")
        with pytest.raises((BackupCorrupted, RestoreError)) as err:
            restore_database(**live_env.kw(), backup=b["name"], safety_backup=False)
        assert "untouched" in str(err.value)
        assert live_env.scalar("SELECT md5(string_agg(code, ',' ORDER BY id)) FROM providers") == before
        assert not [d for d in live_env.query("SELECT datname FROM pg_database") if "_restore_" in d[0]]

    def test_a_restore_that_fails_midway_leaves_the_live_database_unchanged(self, live_env):
        good = gzip.decompress(plain_dump_gz(live_env))
        broken = good + b"\nINSERT INTO no_such_table VALUES (1);\n"
        put_raw_backup(live_env, "apply_dv_broken.sql.gz", gzip.compress(broken, 1))
        live_env.query("DELETE FROM audit_events WHERE id <= 10")
        before = table_counts(live_env.conn())
        with pytest.raises(RestoreError, match="no_such_table"):
            restore_database(**live_env.kw(), backup="apply_dv_broken.sql.gz", safety_backup=False)
        assert table_counts(live_env.conn()) == before
        assert not [d for d in live_env.query("SELECT datname FROM pg_database") if "_restore_" in d[0]]

    def test_latest_is_chosen_by_recorded_time_not_by_name(self, live_env):
        store = live_env.platform.store
        day = datetime(2026, 11, 20, tzinfo=timezone.utc)

        def fake(name, hour):
            with store.writer(name) as w:
                w.write(b"not restored")
                w.commit(BackupInfo(name=name, size=0, complete=True, kind="adhoc", created_at=day.replace(hour=hour),
                                    finished_at=day.replace(hour=hour)))
        fake("zzz_adhoc_early.pgdump", 1)
        fake("aaa_adhoc_late.pgdump", 23)
        real = backup_database(**live_env.kw())  # today: newer than both
        from dr.restore import latest_complete_backup

        assert latest_complete_backup(store).name == real["name"]
        store.delete_backup(real["name"])
        assert latest_complete_backup(store).name == "aaa_adhoc_late.pgdump"


class TestPointInTimeRestoreFlow:
    def test_uk_local_time_gives_exactly_the_rows_before_it(self, live_env):
        live_env.query("CREATE TABLE marks (id int PRIMARY KEY)")
        live_env.query("INSERT INTO marks SELECT generate_series(1, 5)")
        wait_a_second()
        t = utc_now().replace(microsecond=0)
        wait_a_second()
        live_env.query("INSERT INTO marks VALUES (6); DELETE FROM marks WHERE id = 1")
        local = t.astimezone(ZoneInfo("Europe/London")).strftime("%Y-%m-%d %H:%M:%S")
        r = point_in_time_restore(**live_env.kw(), restore_time=local, incident="inc42")
        assert r["point_in_time_utc"] == t.isoformat()
        assert live_env.query("SELECT array_agg(id ORDER BY id) FROM marks", server=r["server"])[0][0] == [1, 2, 3, 4, 5]
        srv = live_env.platform.servers.get_server(r["server"])
        assert srv.tags["dr-incident"] == "inc42" and srv.created_by_us

    @pytest.mark.parametrize("text, words", [
        ("2026-10-25 01:30", "happened twice"),
        ("2026-03-29 01:30", "does not exist"),
        ("2099-01-01 10:00", "in the future"),
        ("2020-01-01 10:00", "outside the restore window"),
    ])
    def test_bad_times_fail_before_anything_is_created(self, live_env, text, words):
        servers = live_env.platform.servers
        before = [s.name for s in servers.list_servers()]
        with pytest.raises(InvalidRestoreTime, match=words):
            point_in_time_restore(**live_env.kw(), restore_time=text)
        assert [s.name for s in servers.list_servers()] == before


class TestMaintenanceFlows:
    def test_on_with_stop_records_replicas_and_off_restores_them(self, live_env):
        app = live_env.platform.app
        app.scale({"worker": 0})
        r = maintenance_on(**live_env.kw(), stop_app=True)
        assert r["recorded_replicas"] == {"web": 1, "worker": 0}
        st = app.get_status()
        assert st.maintenance and st.replicas == {"web": 0, "worker": 0}
        assert httpx.get(st.main_url + "/").status_code == 503
        again = maintenance_on(**live_env.kw(), stop_app=True)
        assert again["already_on"] and again["recorded_replicas"] == {"web": 1, "worker": 0}
        off = maintenance_off(**live_env.kw())
        assert off["replicas"] == {"web": 1, "worker": 0} and off["healthcheck"] == 200
        st = app.get_status()
        assert not st.maintenance and st.replicas == {"web": 1, "worker": 0}
        assert httpx.get(st.main_url + "/healthcheck").status_code == 200
        assert maintenance_off(**live_env.kw())["was_on"] is False


class TestValidateFlow:
    def test_passes_on_a_healthy_service(self, live_env):
        rows = validate_service(**live_env.kw())
        assert {r["name"] for r in rows} == {"healthcheck", "rows in candidates", "rows in applications"}
        assert all(r["passed"] for r in rows)

    def test_fails_when_a_table_is_emptied(self, live_env):
        live_env.query("TRUNCATE applications, audit_events")
        with pytest.raises(ValidationFailed) as err:
            validate_service(**live_env.kw())
        assert "rows in applications" in err.value.failed and "healthcheck" in err.value.failed
        assert "rows in candidates" not in err.value.failed


class TestTidyUp:
    @pytest.fixture(autouse=True)
    def _own_temporary_directory(self, tmp_path, monkeypatch):
        """Tidy-up also removes passfile directories of dead processes from the temporary directory: in the
        shared /tmp those may be another test session's (CI runs several at once), so each test has its own."""
        import tempfile

        own = tmp_path / "tmp"
        own.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(own))

    def test_deletes_only_what_it_created(self, live_env):
        servers = live_env.platform.servers
        # ours: a PTR server and a replaced database with its safety backup
        wait_a_second()
        ptr = point_in_time_restore(**live_env.kw(), restore_time=utc_now().strftime("%Y-%m-%d %H:%M:%SZ"))
        b = backup_database(**live_env.kw())
        r = restore_database(**live_env.kw(), backup=b["name"])
        # not ours: a server without our tags, a database that merely looks like ours
        servers.create_server("someone-elses-pg", archive=False)
        live_env.query("CREATE DATABASE apply_development_replaced_20200101000000")
        dry = tidy_up(**live_env.kw(), dry_run=True)
        assert dry["deleted"] == [] and servers.server_exists(ptr["server"])
        res = tidy_up(**live_env.kw(), dry_run=False)
        assert sorted(res["deleted"]) == sorted([ptr["server"], r["replaced_database"]])
        assert not servers.server_exists(ptr["server"])
        assert servers.server_exists("someone-elses-pg")
        dbs = {d[0] for d in live_env.query("SELECT datname FROM pg_database")}
        assert "apply_development_replaced_20200101000000" in dbs and r["replaced_database"] not in dbs
        assert live_env.platform.store.backup_exists(r["safety_backup"])

    def test_a_replaced_database_is_dropped_only_when_a_backup_holds_exactly_it(self, live_env):
        """Tidy-up links a replaced database to its backup by identity and "no write since", not by a time window."""
        from dr.restore import restore_backup

        p, target = live_env.platform, live_env.target
        b = backup_database(**live_env.kw())

        def kept(name: str) -> str:
            found = {i["name"]: i for i in tidy_up(**live_env.kw(), dry_run=False)["found"]}
            assert name in found and name in {d[0] for d in live_env.query("SELECT datname FROM pg_database")}
            return found[name]["reason"]

        # 1. restored without a safety backup: the older backup of the same database misses a later write
        live_env.query("UPDATE candidates SET email = email || '.later' WHERE id = 2")
        no_safety = restore_database(**live_env.kw(), backup=b["name"], safety_backup=False)["replaced_database"]
        assert f"written to (or its statistics were reset) after backup {b['name']}" in kept(no_safety)
        # 2. a safety backup taken, then writes before the swap: the backup does not hold what was replaced
        safety = backup_database(**live_env.kw(), kind="pre-restore-safety")["name"]
        live_env.query("UPDATE candidates SET email = email || '.late' WHERE id = 1")
        late = restore_backup(p.servers, p.store, PgTools.default(), server=target.server, database=target.database,
                              backup=b["name"], safety_backup=safety)
        assert late.replaced_held_by.startswith(f"not held by backup {safety}: it was written to")
        assert "written to" in kept(late.replaced_database)
        # 3. held at the swap, but written to afterwards
        r = restore_database(**live_env.kw(), backup=b["name"])
        assert r["replaced_held_by"].startswith(f"held by backup {r['safety_backup']}")
        live_env.query("INSERT INTO audit_events (action, changes) VALUES ('after the swap', '{}')", database=r["replaced_database"])
        assert "written to" in kept(r["replaced_database"])
        # 4. a backup of exactly that database, taken by hand as tidy-up asks, lets it go; its bytes are checked first
        by_hand = backup_database(**live_env.kw(), database=late.replaced_database, kind="pre-restore-safety")["name"]
        (p.store.root / by_hand).write_bytes(b"not the backup any more")
        assert "does not verify" in kept(late.replaced_database)
        for name in (no_safety, r["replaced_database"]):
            backup_database(**live_env.kw(), database=name, kind="pre-restore-safety")
        res = tidy_up(**live_env.kw(), dry_run=False)
        assert {no_safety, r["replaced_database"]} <= set(res["deleted"])
        assert late.replaced_database not in res["deleted"]
        left = {d[0] for d in live_env.query("SELECT datname FROM pg_database")}
        assert no_safety not in left and r["replaced_database"] not in left and late.replaced_database in left

    def test_production_defaults_to_a_dry_run(self, base_dir):
        from tests.helpers import make_env

        env = make_env(base_dir, "tidy-prod", environment="production")
        try:
            env.up()
            wait_a_second()
            ptr = point_in_time_restore(**env.kw(), restore_time=utc_now().strftime("%Y-%m-%d %H:%M:%SZ"))
            res = tidy_up(**env.kw())
            assert res["dry_run"] is True and res["deleted"] == []
            assert env.platform.servers.server_exists(ptr["server"])
        finally:
            env.discard()
