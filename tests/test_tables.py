"""Table-level point-in-time recovery (#18): real servers, a real PTR server, no mocks.

One environment and one incident serve the scenario's assertions: at T+1 a DELETE without
WHERE empties `applications` (its ON DELETE CASCADE child `audit_events` goes with it), at
T+2 the app writes new candidates, applications and audit events, and a candidate whose
applications were wiped is deleted. The engine's finer behaviour (triggers, generated,
identity and partitioned columns, tables without a key, a killed backend, privileges) is
tested on two databases of one server standing for "at T" and "live".
"""

from __future__ import annotations

import csv
import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

from dr.commands import ConnInfo
from dr.errors import RestoreError
from dr.tables.apply import apply_tables
from dr.tables.carry import carry_out
from dr.tables.compare import TableRecoveryRefused, compare
from dr.tables.pack import find_packs, find_records, read_pack
from flows.data_loss import data_loss
from flows.reconcile import reconcile
from tests.faults.harness import db_state, freeze, live_state, thaw
from tests.helpers import make_env, utc_now, wait_a_second

pytestmark = pytest.mark.usefixtures("prefect_server")

INCIDENT = "inc-tables"
NEW_CANDIDATES = ["new1@example.org", "new2@example.org", "new3@example.org"]


def london(t) -> str:
    from zoneinfo import ZoneInfo

    return t.astimezone(ZoneInfo("Europe/London")).strftime("%Y-%m-%d %H:%M:%S")


def rows(env, query: str) -> list[tuple]:
    return env.query(query)


@pytest.fixture(scope="module")
def scenario(base_dir, prefect_server):
    """The incident, run twice: first narrowed so that a key breaks (refused), then as chosen."""
    env = make_env(base_dir, "tables-scenario")
    env.up()
    try:
        # before T: audit events go with their application; a trigger that would alter restored rows
        env.query("ALTER TABLE audit_events DROP CONSTRAINT audit_events_application_id_fkey, "
                  "ADD CONSTRAINT audit_events_application_id_fkey FOREIGN KEY (application_id) "
                  "REFERENCES applications(id) ON DELETE CASCADE")
        env.query("CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS "
                  "$$ BEGIN NEW.updated_at := now(); RETURN NEW; END $$")
        env.query("CREATE TRIGGER applications_touch BEFORE INSERT OR UPDATE ON applications "
                  "FOR EACH ROW EXECUTE FUNCTION touch()")
        wait_a_second()
        at_t = live_state(env)
        t = utc_now().replace(microsecond=0)
        wait_a_second()
        env.query("DELETE FROM applications")  # T+1: the damage (its audit events cascade)
        wait_a_second()
        for email in NEW_CANDIDATES:  # T+2: the app goes on
            env.query("INSERT INTO candidates (email, first_name, last_name, date_of_birth, profile) "
                      "VALUES (%s, 'New', 'Person', '2001-02-03', '{}')", (email,))
        env.query("UPDATE candidates SET last_name = 'Renamed' WHERE id = 1")
        env.query("INSERT INTO applications (candidate_id, course_id, status, personal_statement) "
                  "SELECT c.id, 1 + c.id % 5, 'draft', 'written after T ' || c.id FROM candidates c "
                  "WHERE c.email LIKE 'new%%' OR c.id = 2")
        env.query("INSERT INTO audit_events (application_id, action, changes) "
                  "SELECT id, 'create', '{}' FROM applications ORDER BY id LIMIT 2")
        env.query("DELETE FROM candidates WHERE id = 7")  # its applications were wiped: the restored ones need it
        before = live_state(env)
        post_t_applications = rows(env, "SELECT * FROM applications ORDER BY id")
        seq_before = dict(rows(env, "SELECT sequencename, last_value FROM pg_sequences"))
        errors = []
        try:
            data_loss(**env.kw(), restore_time=london(t), auto_approve=True, incident=INCIDENT,
                      tables=["applications", "-audit_events"], keep_ptr_server=True)
        except TableRecoveryRefused as exc:
            errors.append(exc)
        after_refusal = live_state(env)
        result = data_loss(**env.kw(), restore_time=london(t), auto_approve=True, incident=INCIDENT,
                           tables=["applications"])
        yield SimpleNamespace(env=env, t=t, at_t=at_t, before=before, after_refusal=after_refusal, errors=errors,
                              result=result, after=live_state(env), post_t_applications=post_t_applications,
                              seq_before=seq_before)
    finally:
        env.discard()


class TestTableRecoveryScenario:
    def test_applications_come_back_exactly_as_at_t_and_post_t_candidates_are_kept(self, scenario):
        s, env = scenario, scenario.env
        for table in ("public.applications", "public.audit_events"):  # row checksums equal T's
            assert s.after[f"table {table}"] == s.at_t[f"table {table}"]
        for table in ("public.courses", "public.providers"):  # untouched
            assert s.after[f"table {table}"] == s.before[f"table {table}"]
        # candidates keep every write made after T; the one the restored rows need is back
        assert sorted(r[0] for r in env.query("SELECT email FROM candidates WHERE email LIKE 'new%%'")) == NEW_CANDIDATES
        assert env.scalar("SELECT last_name FROM candidates WHERE id = 1") == "Renamed"
        assert env.scalar("SELECT count(*) FROM candidates WHERE id = 7") == 1
        assert env.scalar("SELECT count(*) FROM candidates") == 500 + len(NEW_CANDIDATES)
        # the trigger that would have rewritten updated_at did not fire, and is enabled again
        assert env.scalar("SELECT tgenabled::text FROM pg_trigger WHERE tgname = 'applications_touch'") == "O"
        # the app was validated against the recovered data and users are back
        assert not env.platform.app.get_status().maintenance
        assert s.result["ptr_backup"] and not env.platform.servers.server_exists(s.result["ptr_server"])

    def test_the_closure_pulls_in_cascade_children_with_the_reason(self, scenario):
        plan = data_loss(**scenario.env.kw(), plan_only=True, tables=["applications"])["plan"]
        assert "public.audit_events (dependent): references public.applications through " \
               "audit_events_application_id_fkey (ON DELETE CASCADE)" in plan
        assert "public.candidates (needed)" in plan and "public.courses (needed)" in plan
        assert "TABLE-LEVEL" in plan and "in ONE transaction" in plan and "back up the PTR server" not in plan.split(
            "APPROVAL: replace")[0]
        report = Path(scenario.result["report"]).read_text()
        assert "## What this changes" in report and "ON DELETE CASCADE" in report
        assert "Kept: the RPO gained" in report and "dr reconcile --service apply" in report

    def test_the_report_counts_equal_what_changed(self, scenario):
        ch = scenario.result["changes"]
        post_t = len(scenario.post_t_applications)
        assert ch["public.applications"] == {"back": 1500, "reverted": 0, "removed": post_t}
        assert ch["public.audit_events"] == {"back": 1500, "reverted": 0, "removed": 2}
        assert ch["public.candidates"]["back"] == 1  # candidate 7, needed by the restored applications
        assert ch["public.courses"]["back"] == 0 and ch["public.providers"]["back"] == 0
        kept = scenario.result["kept"]
        assert kept["public.candidates"] == {"live_rows": 500 + len(NEW_CANDIDATES) - 1, "rows_at_t": 500}
        # and the live database now has exactly those numbers
        env = scenario.env
        assert env.scalar("SELECT count(*) FROM applications") == 1500
        assert env.scalar("SELECT count(*) FROM audit_events") == 1500

    def test_a_narrowing_that_breaks_a_key_is_refused_naming_the_constraint_and_the_rows(self, scenario):
        [exc] = scenario.errors
        text = str(exc)
        assert "excluding public.audit_events breaks audit_events_application_id_fkey" in text
        first_two = [r[0] for r in scenario.post_t_applications[:2]]
        assert "ON DELETE CASCADE" in text and "would be deleted" in text and "public.audit_events(id) = " in text
        assert str(1501) in text  # the audit events written after T (ids 1501, 1502) that reference removed rows
        assert first_two[0] > 1500
        assert "the world is now" in text and "to resume" in text
        assert scenario.after_refusal == scenario.before  # nothing changed in the live database

    def test_sequences_never_go_backwards(self, scenario):
        env = scenario.env
        after = dict(env.query("SELECT sequencename, last_value FROM pg_sequences"))
        for seq, value in scenario.seq_before.items():
            assert after[seq] >= value, seq
        assert after["applications_id_seq"] == scenario.seq_before["applications_id_seq"] > 1500
        new_id = env.scalar("INSERT INTO applications (candidate_id, course_id, status, personal_statement) "
                            "VALUES (1, 1, 'draft', 'x') RETURNING id")
        assert new_id > max(r[0] for r in scenario.post_t_applications)  # never an id handed out after T
        env.query("DELETE FROM applications WHERE id = %s", (new_id,))

    def test_a_re_run_with_the_same_incident_does_nothing_twice(self, scenario):
        env = scenario.env
        store = env.platform.store
        backups_before = sorted(b.name for b in store.list_backups())
        state = live_state(env)
        r = data_loss(**env.kw(), restore_time=london(scenario.t), auto_approve=True, incident=INCIDENT,
                      tables=["applications"])
        assert sorted(b.name for b in store.list_backups()) == backups_before
        assert live_state(env) == state
        assert [s.name for s in env.platform.servers.list_servers() if s.created_by_us] == []
        steps = {e["step"]: e for e in r["timeline"]}
        assert steps["point-in-time restore to a new server"]["outcome"] == "skipped"
        assert steps["compare the tables with the PTR server"]["outcome"] == "skipped"
        assert len(find_records(store, INCIDENT)) == 1 and len(find_packs(store, INCIDENT)) == 1

    def test_the_pack_holds_exactly_the_discarded_writes_and_reconcile_brings_them_back(self, scenario):
        env = scenario.env
        pack = read_pack(env.platform.store, scenario.result["reconciliation_pack"])
        try:
            got = list(csv.reader(io.StringIO(pack.read_text("tables/public.applications/inserted_after_t.csv"))))
            assert got[0] == ["id", "candidate_id", "course_id", "status", "personal_statement", "score",
                              "submitted_at", "updated_at"]
            assert [int(r[0]) for r in got[1:]] == [r[0] for r in scenario.post_t_applications]
            assert [r[4] for r in got[1:]] == [r[4] for r in scenario.post_t_applications]
            assert {n for n in pack.zf.namelist() if n.endswith(".csv")} == {
                "tables/public.applications/inserted_after_t.csv", "tables/public.applications/deleted_after_t_keys.csv",
                "tables/public.audit_events/inserted_after_t.csv", "tables/public.audit_events/deleted_after_t_keys.csv"}
            assert "\\copy" in pack.read_text("apply.sql")
        finally:
            pack.close()
        plan = reconcile(**env.kw(), incident=INCIDENT)
        assert "applies" in plan["plan"] and not plan["applied"]
        done = reconcile(**env.kw(), incident=INCIDENT, apply=True, auto_approve=True)
        assert done["applied"] and done["rows"] == len(scenario.post_t_applications) + 2
        now = env.query("SELECT * FROM applications WHERE id > 1500 ORDER BY id")
        assert [r[:5] for r in now] == [r[:5] for r in scenario.post_t_applications]
        assert env.scalar("SELECT count(*) FROM applications") == 1500 + len(scenario.post_t_applications)
        again = reconcile(**env.kw(), incident=INCIDENT, apply=True, auto_approve=True)
        assert again["rows"] == 0 and "already there" in again["plan"]


# --- the engine, on two databases of one server ------------------------------------------------------

ENGINE_SCHEMA = """
CREATE TABLE audit_log (id bigserial PRIMARY KEY, note text NOT NULL);
CREATE TABLE items (
    id bigint GENERATED ALWAYS AS IDENTITY,
    k int NOT NULL,
    qty int NOT NULL,
    price numeric(8,2) NOT NULL,
    total numeric GENERATED ALWAYS AS (qty * price) STORED,
    note text,
    PRIMARY KEY (id, k)
) PARTITION BY RANGE (k);
CREATE TABLE items_low PARTITION OF items FOR VALUES FROM (0) TO (50);
CREATE TABLE items_high PARTITION OF items FOR VALUES FROM (50) TO (100);
CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$
  BEGIN NEW.note := 'TRIGGERED'; INSERT INTO audit_log (note) VALUES (TG_OP || ' ' || NEW.id); RETURN NEW; END $$;
CREATE TRIGGER items_stamp BEFORE INSERT OR UPDATE ON items FOR EACH ROW EXECUTE FUNCTION stamp();
ALTER TABLE items DISABLE TRIGGER items_stamp;
INSERT INTO items (k, qty, price, note) SELECT g % 100, g % 7, (g % 13) + 0.5, 'item ' || g FROM generate_series(1, 200) g;
ALTER TABLE items ENABLE TRIGGER items_stamp;
CREATE TABLE notes (body text, at date, meta json);
INSERT INTO notes SELECT 'note ' || g, date '2026-01-01' + g, '{"n": 1}' FROM generate_series(1, 30) g;
-- json has no hash function: these two tables are compared by the md5 of each row's text
CREATE TABLE big (id int PRIMARY KEY, body text NOT NULL, meta json NOT NULL DEFAULT '{}');
INSERT INTO big SELECT g, repeat(md5(g::text), 16) FROM generate_series(1, 20000) g;
-- big enough to be replaced in bulk once wiped: keys to and from it, a unique constraint, a partial index,
-- comments and a CLUSTER mark that must all come back exactly
CREATE TABLE kinds (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO kinds SELECT g, 'kind ' || g FROM generate_series(1, 40) g;
CREATE TABLE wide (id bigint PRIMARY KEY, kind_id int NOT NULL REFERENCES kinds(id), code text NOT NULL,
                   body text, CONSTRAINT wide_code_key UNIQUE (code));
CREATE INDEX wide_kind_idx ON wide (kind_id) WHERE body <> '';
COMMENT ON INDEX wide_kind_idx IS 'kinds in use';
COMMENT ON CONSTRAINT wide_code_key ON wide IS 'one row per code';
ALTER TABLE wide CLUSTER ON wide_pkey;
INSERT INTO wide SELECT g, 1 + g % 40, 'c' || g, repeat('w', g % 30) FROM generate_series(1, 12000) g;
CREATE TABLE wide_notes (id int PRIMARY KEY, wide_id bigint REFERENCES wide(id) ON DELETE CASCADE, note text);
INSERT INTO wide_notes SELECT g, g * 7, 'note ' || g FROM generate_series(1, 300) g;
CREATE TABLE log_lines (at int NOT NULL, line text);  -- no key, no index: replaced whole, in bulk
INSERT INTO log_lines SELECT g, 'line ' || g FROM generate_series(1, 10000) g;
"""


@pytest.fixture(scope="module")
def engine(scenario):
    """Two databases on the scenario's live server: `then` (the rows at T) and `now` (live)."""
    env = scenario.env
    admin = env.conn("postgres")
    with psycopg.connect(**admin.psycopg_kwargs(), autocommit=True) as c:
        for name in ("t_then", "t_now"):
            c.execute(f"CREATE DATABASE {name}")
    then, now = env.conn("t_then"), env.conn("t_now")
    for conn in (then, now):
        with psycopg.connect(**conn.psycopg_kwargs(), autocommit=True) as c:
            c.execute(ENGINE_SCHEMA)
    return SimpleNamespace(env=env, then=then, now=now)


def run_sql(conn: ConnInfo, statement: str, params=None):
    with psycopg.connect(**conn.psycopg_kwargs(), autocommit=True) as c:
        cur = c.execute(statement, params)
        return cur.fetchall() if cur.description else None


def no_record(txid: int, oid: int) -> None:
    pass


#: what a bulk replacement drops and puts back, and trigger states: must be identical before and after
SCHEMA_STATE = """
SELECT 'index ' || c.relname, pg_get_indexdef(i.indexrelid) || ' valid=' || i.indisvalid || ' clustered='
       || i.indisclustered || ' comment=' || coalesce(obj_description(i.indexrelid, 'pg_class'), '-')
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relnamespace = 'public'::regnamespace
UNION ALL
SELECT 'constraint ' || conrelid::regclass || '.' || conname, pg_get_constraintdef(oid) || ' validated='
       || convalidated || ' comment=' || coalesce(obj_description(oid, 'pg_constraint'), '-')
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'trigger ' || tgrelid::regclass || '.' || tgname, tgenabled::text FROM pg_trigger
WHERE NOT tgisinternal AND tgrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'public'::regnamespace)
UNION ALL  -- a foreign key's own triggers are named after their OIDs, which a re-added key changes
SELECT 'key triggers ' || co.conrelid::regclass || '.' || co.conname,
       string_agg(t.tgrelid::regclass || ' ' || t.tgfoid::regproc || ' ' || t.tgtype || ' ' || t.tgenabled::text, ', '
                  ORDER BY 1)
FROM pg_trigger t JOIN pg_constraint co ON co.oid = t.tgconstraint
WHERE t.tgisinternal AND co.connamespace = 'public'::regnamespace GROUP BY co.conrelid, co.conname
"""


def schema_state(conn: ConnInfo) -> dict[str, str]:
    return dict(run_sql(conn, SCHEMA_STATE))


def keep(box: dict):
    """An `on_compared` that keeps the comparison for the apply, as the data-loss flow's compare task does."""
    def on_compared(w, report) -> None:
        box["carried"] = carry_out(w, report)
    return on_compared


class TestReplacementEngine:
    def test_counts_triggers_generated_identity_and_partitioned_columns(self, engine):
        then, now = engine.then, engine.now
        run_sql(now, "ALTER TABLE items DISABLE TRIGGER items_stamp")  # the damage is written without it
        run_sql(now, "UPDATE items SET qty = qty + 100 WHERE id <= 5")  # reverted
        run_sql(now, "UPDATE items SET k = k + 50 WHERE id BETWEEN 6 AND 8 AND k < 50")  # moved partition: reverted
        run_sql(now, "DELETE FROM items WHERE id BETWEEN 20 AND 29")  # come back
        run_sql(now, "INSERT INTO items (k, qty, price) SELECT 1, 1, 1 FROM generate_series(1, 4)")  # removed
        run_sql(now, "ALTER TABLE items ENABLE TRIGGER items_stamp")
        run_sql(then, "SELECT setval('items_id_seq', 900)")  # the PTR server ahead: live moves forward
        moved = run_sql(now, "SELECT count(*) FROM items WHERE id BETWEEN 6 AND 8 AND k >= 50")[0][0]
        assert moved == 3
        report = compare(now, then, ["items"])
        [items] = report.tables
        # the partition key is part of the primary key, so a row moved to another partition is a new key:
        # its post-T version is removed and its version at T comes back (into its own partition)
        assert items.counts == {"back": 10 + moved, "reverted": 5, "removed": 4 + moved}
        assert items.samples["back"][:2] == ["(6, 6)", "(7, 7)"] and items.samples["reverted"][0] == "(1, 1)"
        assert "audit_log" in " ".join(k.table for k in report.kept)
        log_before = run_sql(now, "SELECT count(*) FROM audit_log")[0][0]
        result = apply_tables(now, then, ["items"], approved=report.digests(), record=no_record)
        assert db_state(now.psycopg_kwargs())["table public.items"] == db_state(then.psycopg_kwargs())["table public.items"]
        assert run_sql(now, "SELECT count(*) FROM audit_log")[0][0] == log_before  # the trigger did not fire
        assert run_sql(now, "SELECT count(*) FROM items WHERE note = 'TRIGGERED'")[0][0] == 0
        assert {r[0] for r in run_sql(now, "SELECT tgenabled::text FROM pg_trigger WHERE tgname = 'items_stamp'")} == {"O"}
        assert run_sql(now, "SELECT count(*) FROM items_high WHERE id BETWEEN 6 AND 8")[0][0] == \
            run_sql(then, "SELECT count(*) FROM items_high WHERE id BETWEEN 6 AND 8")[0][0]  # back in its partition
        assert result.sequences_moved and run_sql(now, "SELECT last_value FROM items_id_seq")[0][0] == 900
        assert result.applied["public.items"] == {"deleted": 4 + moved, "updated": 5, "inserted": 10 + moved}

    def test_a_table_without_a_primary_key_is_replaced_whole_and_its_diff_refused(self, engine):
        then, now = engine.then, engine.now
        run_sql(now, "DELETE FROM notes WHERE at < '2026-01-10'; INSERT INTO notes VALUES ('later', '2027-01-01')")
        report = compare(now, then, ["notes"])
        [notes] = report.tables
        assert notes.whole_table and "no primary key" in notes.note and notes.counts == {"back": 0, "reverted": 0,
                                                                                          "removed": 0}
        apply_tables(now, then, ["notes"], approved=report.digests(), record=no_record)
        assert db_state(now.psycopg_kwargs())["table public.notes"] == db_state(then.psycopg_kwargs())["table public.notes"]

    def test_the_live_data_changed_since_approval_is_refused(self, engine):
        then, now = engine.then, engine.now
        run_sql(now, "UPDATE big SET body = 'damaged' WHERE id <= 3")
        box: dict = {}
        report = compare(now, then, ["big"], on_compared=keep(box))
        run_sql(now, "UPDATE big SET body = 'damaged again' WHERE id = 4")
        before = db_state(now.psycopg_kwargs())
        with pytest.raises(TableRecoveryRefused, match="changed since the report was approved"):
            apply_tables(now, then, ["big"], approved=report.digests(), record=no_record)
        assert db_state(now.psycopg_kwargs()) == before
        # the kept comparison is not used: the proof fails, every row is compared again, and it is refused the same
        with pytest.raises(TableRecoveryRefused, match="changed since the report was approved"):
            apply_tables(now, then, ["big"], approved=report.digests(), record=no_record, carried=box["carried"])
        assert db_state(now.psycopg_kwargs()) == before

    def test_terminating_the_backend_mid_copy_leaves_the_live_tables_unchanged(self, engine):
        then, now = engine.then, engine.now
        run_sql(now, "DELETE FROM big WHERE id > 100")
        report = compare(now, then, ["big"])
        assert report.tables[0].method == "bulk"  # 19,900 of 20,000 rows come back: TRUNCATE + COPY
        before, schema = db_state(now.psycopg_kwargs()), schema_state(now)
        app = "dr-orchestrator test kill"
        big_oid = run_sql(now, "SELECT 'big'::regclass::oid")[0][0]
        box: dict = {}

        def run() -> None:
            try:
                apply_tables(now, then, ["big"], approved=report.digests(), record=no_record, application_name=app)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                box["error"] = exc

        th = threading.Thread(target=run, daemon=True)
        th.start()
        admin = engine.env.conn("postgres")

        def backend() -> int | None:
            r = run_sql(admin, "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = 't_now'",
                        (app,))
            return r[0][0] if r else None

        deadline = time.monotonic() + 60
        live = None
        while live is None and time.monotonic() < deadline:
            live = backend()
        assert live, "the recovery never opened its session on the live side"

        # One admin session, opened before the freeze: a new session's start-up may wait on a lock the frozen
        # backend holds, and nothing would thaw it. A look that still hangs (2 s) thaws it (guard).
        looker = psycopg.connect(**admin.psycopg_kwargs(), autocommit=True)

        def rows_arrived_in_the_live_table() -> bool:
            guard = threading.Timer(2.0, thaw, (live,))
            guard.start()
            try:
                r = looker.execute("SELECT tuples_processed FROM pg_stat_progress_copy WHERE pid = %s AND relid = %s",
                                   (live, big_oid)).fetchone()
            finally:
                guard.cancel()
            return r is not None and 0 < r[0] < 20_000

        # The live session is let go 2 ms at a time. A backend's socket output is not counted in /proc/<pid>/io,
        # so it is stepped in time, not bytes; frozen, it reads nothing, so the copy cannot end between looks.
        freeze(live)
        try:
            while not rows_arrived_in_the_live_table():
                assert time.monotonic() < deadline and th.is_alive(), "the copy ended first"
                thaw(live)
                time.sleep(0.002)
                freeze(live)
                time.sleep(0.001)
            looker.execute("SELECT pg_terminate_backend(%s)", (live,))  # mid-copy into the live table
        finally:
            thaw(live)
            looker.close()
        th.join(60)
        assert isinstance(box.get("error"), RestoreError) and "was not committed" in str(box["error"])
        assert db_state(now.psycopg_kwargs()) == before
        assert schema_state(now) == schema  # its dropped primary key is back with the rollback
        apply_tables(now, then, ["big"], approved=report.digests(), record=no_record)  # the re-run completes
        assert db_state(now.psycopg_kwargs())["table public.big"] == db_state(then.psycopg_kwargs())["table public.big"]

    def test_a_missing_privilege_is_refused_naming_it(self, engine):
        now = engine.now
        run_sql(now, "CREATE ROLE dr_limited LOGIN PASSWORD 'limited-pw-1'")
        run_sql(now, "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO dr_limited")
        limited = ConnInfo(now.host, now.port, "dr_limited", now.dbname, "limited-pw-1", now.sslmode)
        then = ConnInfo(engine.then.host, engine.then.port, "dr_limited", engine.then.dbname, "limited-pw-1",
                        now.sslmode)
        run_sql(engine.then, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO dr_limited")
        report = compare(limited, then, ["items"])
        [blocker] = report.blockers
        assert "ownership of public.items" in blocker and "GRANT dradmin TO dr_limited" in blocker
        assert "items_stamp" in blocker and "SELECT on sequence public.items_id_seq" in blocker
        with pytest.raises(TableRecoveryRefused, match="ownership of public.items"):
            apply_tables(limited, then, ["items"], approved={}, record=no_record)


class TestKeptComparison:
    """The apply acts on the kept comparison only when the live table provably did not change since."""

    def test_a_write_or_a_rewrite_since_the_comparison_makes_the_apply_compare_every_row_again(self, engine):
        then, now = engine.then, engine.now
        for tamper, why in (("UPDATE wide SET body = body WHERE id = 11", "row(s) written since the comparison"),
                            ("VACUUM FULL wide", "re-created or rewritten")):
            run_sql(now, "UPDATE wide SET body = 'damaged' WHERE id <= 10")
            box: dict = {}
            report = compare(now, then, ["wide"], on_compared=keep(box))
            run_sql(now, tamper)  # the rows are the same, but nothing proves it short of comparing them
            result = apply_tables(now, then, ["wide"], approved=report.digests(), record=no_record,
                                  carried=box["carried"])
            assert result.compared.startswith("compared again") and why in result.compared
            assert db_state(now.psycopg_kwargs())["table public.wide"] == db_state(then.psycopg_kwargs())["table public.wide"]
        # untouched since: the kept comparison is used, and only the changed keys travel
        run_sql(now, "UPDATE wide SET body = 'damaged' WHERE id <= 10")
        box = {}
        report = compare(now, then, ["wide"], on_compared=keep(box))
        result = apply_tables(now, then, ["wide"], approved=report.digests(), record=no_record, carried=box["carried"])
        assert result.compared.startswith("kept comparison")
        assert result.applied["public.wide"] == {"deleted": 0, "updated": 10, "inserted": 0}
        assert db_state(now.psycopg_kwargs())["table public.wide"] == db_state(then.psycopg_kwargs())["table public.wide"]

    def test_a_row_deleted_since_the_comparison_is_refused_though_no_row_was_written(self, engine):
        then, now = engine.then, engine.now
        run_sql(now, "UPDATE wide SET body = 'damaged' WHERE id <= 10")
        box: dict = {}
        report = compare(now, then, ["wide"], on_compared=keep(box))
        run_sql(now, "DELETE FROM wide WHERE id = 20")  # no new row version: only the count shows it
        before = db_state(now.psycopg_kwargs())
        with pytest.raises(TableRecoveryRefused, match="changed since the report was approved"):
            apply_tables(now, then, ["wide"], approved=report.digests(), record=no_record, carried=box["carried"])
        assert db_state(now.psycopg_kwargs()) == before
        report = compare(now, then, ["wide"])
        apply_tables(now, then, ["wide"], approved=report.digests(), record=no_record)
        assert db_state(now.psycopg_kwargs())["table public.wide"] == db_state(then.psycopg_kwargs())["table public.wide"]


class TestBulkReplacement:
    def test_a_wiped_table_is_reloaded_in_bulk_with_its_indexes_and_keys_exactly_as_before(self, engine):
        then, now = engine.then, engine.now
        schema = schema_state(now)
        run_sql(now, "DELETE FROM wide")  # its notes cascade
        run_sql(now, "INSERT INTO wide VALUES (50001, 3, 'late', 'written after T')")
        box: dict = {}
        report = compare(now, then, ["wide"], on_compared=keep(box))
        by = {t.table: t for t in report.tables}
        assert by["public.wide"].method == "bulk" and "TRUNCATE + COPY FREEZE" in by["public.wide"].method_note
        assert by["public.wide"].counts == {"back": 12000, "reverted": 0, "removed": 1}
        assert by["public.wide_notes"].method == "rows" and by["public.wide_notes"].counts["back"] == 300
        assert "replaced in bulk" in report.markdown() and "replaced in bulk" in report.gate_text()
        result = apply_tables(now, then, ["wide"], approved=report.digests(), record=no_record, carried=box["carried"])
        assert result.compared.startswith("kept comparison")
        assert result.applied["public.wide"] == {"emptied": 1, "reloaded in bulk": 12000}
        assert result.applied["public.wide_notes"] == {"deleted": 0, "inserted": 300}
        assert sorted(result.validated) == ["wide_kind_id_fkey", "wide_notes_wide_id_fkey"]
        assert result.verified_by["public.wide"] == "every row: count and sum of row hashes"
        state_now, state_then = db_state(now.psycopg_kwargs()), db_state(then.psycopg_kwargs())
        for t in ("public.wide", "public.wide_notes", "public.kinds"):
            assert state_now[f"table {t}"] == state_then[f"table {t}"], t
        # every index, constraint (validated), comment and CLUSTER mark as before; and they work
        assert schema_state(now) == schema
        with pytest.raises(psycopg.errors.UniqueViolation):
            run_sql(now, "INSERT INTO wide VALUES (50002, 1, 'c5', '')")
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            run_sql(now, "INSERT INTO wide VALUES (50002, 99, 'new', '')")

    def test_a_table_without_a_key_or_index_is_replaced_whole_in_bulk(self, engine):
        then, now = engine.then, engine.now
        run_sql(now, "DELETE FROM log_lines WHERE at % 3 = 0; INSERT INTO log_lines VALUES (0, 'after T')")
        report = compare(now, then, ["log_lines"])
        [lines] = report.tables
        assert lines.whole_table and lines.method == "bulk"
        result = apply_tables(now, then, ["log_lines"], approved=report.digests(), record=no_record)
        assert result.applied["public.log_lines"] == {"emptied": 6668, "reloaded in bulk": 10000}
        assert db_state(now.psycopg_kwargs())["table public.log_lines"] == \
            db_state(then.psycopg_kwargs())["table public.log_lines"]

    def test_a_failure_after_the_keys_were_dropped_rolls_back_to_exactly_the_old_state(self, engine):
        then, now = engine.then, engine.now
        run_sql(now, "DELETE FROM wide")
        box: dict = {}
        report = compare(now, then, ["wide"], on_compared=keep(box))
        run_sql(now, "DELETE FROM kinds WHERE id = 5")  # after the approval; rows of wide at T need it
        before, schema = db_state(now.psycopg_kwargs()), schema_state(now)
        with pytest.raises(TableRecoveryRefused, match="wide_kind_id_fkey"):  # the bulk check of the re-added key
            apply_tables(now, then, ["wide"], approved=report.digests(), record=no_record, carried=box["carried"])
        assert db_state(now.psycopg_kwargs()) == before and schema_state(now) == schema
        run_sql(now, "INSERT INTO kinds VALUES (5, 'kind 5')")
        result = apply_tables(now, then, ["wide"], approved=report.digests(), record=no_record, carried=box["carried"])
        assert result.compared.startswith("kept comparison")
        assert db_state(now.psycopg_kwargs())["table public.wide"] == db_state(then.psycopg_kwargs())["table public.wide"]

    def test_rows_loaded_in_bulk_that_differ_from_the_compared_ones_fail_the_verification(self, engine):
        then, now = engine.then, engine.now
        run_sql(now, "DELETE FROM wide")
        box: dict = {}
        report = compare(now, then, ["wide"], on_compared=keep(box))
        run_sql(then, "UPDATE wide SET body = 'changed on the PTR server' WHERE id = 7")  # after the comparison
        before, schema = db_state(now.psycopg_kwargs()), schema_state(now)
        with pytest.raises(RestoreError, match="did not verify: public.wide: 12000 rows"):
            apply_tables(now, then, ["wide"], approved=report.digests(), record=no_record, carried=box["carried"])
        assert db_state(now.psycopg_kwargs()) == before and schema_state(now) == schema
        run_sql(then, "UPDATE wide SET body = repeat('w', 7) WHERE id = 7")
        apply_tables(now, then, ["wide"], approved=report.digests(), record=no_record, carried=box["carried"])
        assert db_state(now.psycopg_kwargs())["table public.wide"] == db_state(then.psycopg_kwargs())["table public.wide"]

    def test_a_role_that_does_not_own_the_table_replaces_it_row_by_row_naming_what_bulk_needs(self, engine):
        then, now = engine.then, engine.now
        run_sql(now, "CREATE ROLE dr_notowner LOGIN PASSWORD 'notowner-pw-1'")
        for conn in (now, then):
            run_sql(conn, "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO dr_notowner")
        role = {c: ConnInfo(c.host, c.port, "dr_notowner", c.dbname, "notowner-pw-1", c.sslmode) for c in (now, then)}
        schema = schema_state(now)
        run_sql(now, "DELETE FROM wide")
        report = compare(role[now], role[then], ["wide"])
        [wide] = [t for t in report.tables if t.table == "public.wide"]
        assert not report.blockers and wide.method == "rows"
        assert "dr_notowner does not own it (owner dradmin; GRANT dradmin TO dr_notowner)" in wide.method_note
        apply_tables(role[now], role[then], ["wide"], approved=report.digests(), record=no_record)
        state_now, state_then = db_state(now.psycopg_kwargs()), db_state(then.psycopg_kwargs())
        assert state_now["table public.wide"] == state_then["table public.wide"]
        assert state_now["table public.wide_notes"] == state_then["table public.wide_notes"]
        assert schema_state(now) == schema
