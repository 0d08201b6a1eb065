"""A parallel restore of a `custom-zstd` backup loads the rows while the backup streams in, frozen,
builds each table's indexes and constraints as soon as its rows are in, and ends with exactly the
database `pg_restore` would have made.

The loader (dr/loader.py) reads pg_dump's archive itself (dr/pgarchive.py) instead of handing a
spooled file to `pg_restore -j`, so these tests compare what it restores with the source, object by
object, on a database built to trip it: rows with newlines, tabs, backslashes and a lone `\\.`,
bytea, arrays, JSON, NULLs, partitions, a generated column, an expression index, a trigger that
must not fire, row-level security, a table whose owner revoked its own INSERT, a materialized view,
comments on post-data objects, sequences, foreign keys. An archive the loader cannot stream (large
objects) is restored from a local file as before; a damaged one never reaches the live database.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import threading
from datetime import datetime, timezone

import pytest
import zstandard

from dr.backup import backup_name, take_backup
from dr.commands import PgTools, passfile_env
from dr.errors import BackupCorrupted, RestoreError
from dr.loader import early_entries
from dr.pgarchive import SECTION_DATA, ArchiveStream
from dr.restore import restore_backup

DB = "edge"

EDGE_SCHEMA = r"""
CREATE SCHEMA app;
CREATE TABLE app.notes (
    id int PRIMARY KEY, body text, raw bytea, tags text[], doc jsonb, amount numeric(12, 2),
    at timestamptz, doubled int GENERATED ALWAYS AS (id * 2) STORED);
INSERT INTO app.notes (id, body, raw, tags, doc, amount, at) VALUES
    (1, E'two\nlines', '\x00ff0a5c'::bytea, ARRAY['a,b', 'c"d'], '{"k": "v\n"}', 12.5, '2025-03-30 01:30:00+00'),
    (2, E'tab\there and a backslash \\ here', NULL, '{}', 'null', -0.01, NULL),
    (3, E'\\.', '', ARRAY[NULL], '[1, 2]', 0, '2025-10-26 01:30:00+01'),
    (4, E'\\.\n\\.', E'\\x5c2e0a'::bytea, NULL, '{}', NULL, 'infinity'),
    (5, 'é ✓ 🚀 ünïcödé', '\x'::bytea, ARRAY['🚀'], '{"emoji": "🚀"}', 99999.99, '1990-01-01 00:00:00+00'),
    (6, '', NULL, NULL, NULL, NULL, NULL),
    (7, NULL, NULL, NULL, NULL, NULL, NULL);
INSERT INTO app.notes (id, body) SELECT g, 'note ' || g FROM generate_series(8, 2000) g;
CREATE INDEX notes_lower_body ON app.notes ((lower(body)));
COMMENT ON TABLE app.notes IS 'notes, with a comment';
CREATE FUNCTION app.shout() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.body := NEW.body || '!'; RETURN NEW; END $$;
CREATE TRIGGER notes_shout BEFORE INSERT ON app.notes FOR EACH ROW EXECUTE FUNCTION app.shout();
ALTER TABLE app.notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY nobody ON app.notes USING (false);

CREATE TABLE app.children (id int PRIMARY KEY, note_id int NOT NULL REFERENCES app.notes (id), n int);
INSERT INTO app.children SELECT g, 1 + g % 2000, g FROM generate_series(1, 3000) g;

CREATE TABLE app.empty (id int);

CREATE TABLE app.events (id bigserial, on_day date NOT NULL, what text) PARTITION BY RANGE (on_day);
CREATE TABLE app.events_2025 PARTITION OF app.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE app.events_2026 PARTITION OF app.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO app.events (on_day, what) SELECT date '2025-06-01' + g % 400, 'event ' || g FROM generate_series(1, 5000) g;
CREATE INDEX events_day ON app.events (on_day);

-- big enough to arrive in many pieces
CREATE TABLE app.big (id int PRIMARY KEY, pad text);
INSERT INTO app.big SELECT g, repeat(md5(g::text), 12) FROM generate_series(1, 30000) g;
CREATE INDEX big_pad ON app.big (pad);
COMMENT ON INDEX app.big_pad IS 'a comment on a post-data object';

-- the owner revoked its own INSERT: the rows must be in before the privileges are
CREATE TABLE app.readonly (id int);
INSERT INTO app.readonly VALUES (1), (2), (3);
REVOKE INSERT ON app.readonly FROM CURRENT_USER;

CREATE MATERIALIZED VIEW app.notes_per_tag AS SELECT coalesce(tags[1], '-') AS tag, count(*) AS n FROM app.notes GROUP BY 1;
CREATE VIEW app.long_notes AS SELECT id FROM app.notes WHERE length(body) > 10;
CREATE SEQUENCE app.counter;
SELECT setval('app.counter', 42);
"""

TABLES = ("app.notes", "app.children", "app.empty", "app.events_2025", "app.events_2026", "app.big", "app.readonly",
          "app.notes_per_tag")


def fingerprint(env, db: str) -> dict[str, object]:
    """Every table's rows (order-independent), the sequence, and what the catalog says."""
    out: dict[str, object] = {}
    for table in TABLES:
        out[table] = env.scalar(f"SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') "
                                f"FROM {table} t", database=db)
    out["counter"] = env.scalar("SELECT last_value FROM app.counter", database=db)
    out["events_seq"] = env.scalar("SELECT last_value FROM app.events_id_seq", database=db)
    out["populated"] = env.scalar("SELECT ispopulated FROM pg_matviews WHERE matviewname = 'notes_per_tag'", database=db)
    return out


def schema_dump(env, db: str) -> str:
    """The restored schema as pg_dump sees it (the random \\restrict keys of pg_dump 18 left out)."""
    tools = PgTools.default()
    with passfile_env(env.conn(db)) as penv:
        text = subprocess.run([tools.path("pg_dump"), "--schema-only", "-d", db], env=penv, check=True,
                              capture_output=True, text=True).stdout
    return "\n".join(line for line in text.splitlines() if not re.match(r"\\(un)?restrict ", line))


@pytest.fixture(scope="module")
def edge(shared_env):
    env = shared_env
    env.query(f'CREATE DATABASE "{DB}"')
    env.query(EDGE_SCHEMA, database=DB)
    yield env
    for (db,) in env.query("SELECT datname FROM pg_database WHERE datname LIKE 'edge%'"):
        env.query(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def backup_of(env, db: str, label: str) -> str:
    name = backup_name("apply", "dv", "adhoc", "custom-zstd", datetime.now(timezone.utc), label)
    take_backup(env.platform.servers, env.platform.store, PgTools.default(), server=env.target.server,
                database=db, name=name, kind="adhoc")
    return name


def restore_beside(env, name: str, db: str = DB, jobs: int = 2) -> str:
    r = restore_backup(env.platform.servers, env.platform.store, PgTools.default(), server=env.target.server,
                       database=db, backup=name, jobs=jobs, swap=False, spool_dir=env.root)
    assert r.verified_manifest
    return r.database


class TestStreamedParallelRestore:
    def test_restores_what_the_source_holds_object_by_object(self, edge, caplog):
        env = edge
        name = backup_of(env, DB, "edge")
        with caplog.at_level(logging.INFO, logger="dr.loader"):
            db = restore_beside(env, name)
        assert "restored in phases" in caplog.text  # the loader did it, not a spooled pg_restore
        assert fingerprint(env, db) == fingerprint(env, DB)
        assert schema_dump(env, db) == schema_dump(env, DB)
        # the trigger did not fire on the rows, the revoked INSERT did not stop them, RLS did not hide them
        assert env.scalar("SELECT body FROM app.notes WHERE id = 1", database=db) == "two\nlines"
        assert env.scalar("SELECT count(*) FROM app.readonly", database=db) == 3
        acl = "SELECT relacl::text FROM pg_class WHERE oid = 'app.readonly'::regclass"
        assert env.scalar(acl, database=db) == env.scalar(acl, database=DB) is not None
        # the planner knows the table's size: statistics from the backup on 18 (tests/test_real_databases.py), ANALYZE before
        assert env.scalar("SELECT reltuples FROM pg_class WHERE oid = 'app.big'::regclass", database=db) == 30000

    def test_rows_are_loaded_frozen_so_reading_them_writes_nothing(self, edge):
        """Rows loaded frozen (`COPY ... FREEZE`) need no hint bits set on their first read, which on
        a server with data checksums writes each page read to the WAL again after a checkpoint."""
        env = edge
        name = backup_of(env, DB, "frozen")
        db = restore_beside(env, name, jobs=2)
        assert env.scalar("SHOW data_checksums", database=db) == "on"

        def wal_of_first_read(table: str) -> int:
            env.query("CHECKPOINT", database=db)
            before = env.scalar("SELECT pg_current_wal_insert_lsn()", database=db)
            assert env.scalar(f"SELECT count(*) FROM {table}", database=db) == 30000
            return env.scalar(f"SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '{before}')", database=db)

        # every row of every loaded table is frozen (HEAP_XMIN_FROZEN = XMIN_COMMITTED | XMIN_INVALID)
        env.query("CREATE EXTENSION pageinspect", database=db)
        for table in ("app.big", "app.notes", "app.children", "app.events_2025"):
            frozen, rows = env.query(
                f"SELECT count(*) FILTER (WHERE t_infomask & 768 = 768), (SELECT count(*) FROM {table}) "
                f"FROM generate_series(0, pg_relation_size('{table}') / 8192 - 1) p, "
                f"heap_page_items(get_raw_page('{table}', p::int)) WHERE lp_flags = 1", database=db)[0]
            assert frozen == rows > 0, (table, frozen, rows)
        pages = env.scalar("SELECT pg_relation_size('app.big') / 8192", database=db)
        # the same rows loaded the usual way: their first read writes (nearly) every page again
        env.query("CREATE TABLE app.big_unfrozen AS SELECT * FROM app.big", database=db)
        assert wal_of_first_read("app.big_unfrozen") > pages * 8192 * 0.9
        assert wal_of_first_read("app.big") < 8192 * 4
        env.query("DROP TABLE app.big_unfrozen", database=db)

    def test_an_archive_with_large_objects_is_restored_from_a_local_file(self, edge, caplog):
        env = edge
        env.query('CREATE DATABASE "edge_lo"')
        oid = env.scalar("SELECT lo_from_bytea(0, '\\x00010203'::bytea)", database="edge_lo")
        env.query("CREATE TABLE docs (id int, blob oid)", database="edge_lo")
        env.query("INSERT INTO docs VALUES (1, %s)", (oid,), database="edge_lo")
        name = backup_of(env, "edge_lo", "lo")
        with caplog.at_level(logging.INFO):
            db = restore_beside(env, name, db="edge_lo")
        assert "cannot be loaded as it streams" in caplog.text and "BLOB" in caplog.text
        assert env.scalar("SELECT lo_get(blob) FROM docs", database=db) == b"\x00\x01\x02\x03"


class TestArchiveReading:
    @pytest.mark.parametrize("to", ["pipe", "file"])
    def test_reads_the_table_of_contents_pg_restore_lists_and_every_row_block(self, edge, tmp_path, to):
        env = edge
        tools = PgTools.default()
        path = tmp_path / "edge.pgdump"
        with passfile_env(env.conn(DB)) as penv:
            # to a pipe, as our backups are made (the TOC carries no data offsets), or to a file as
            # standard output (pg_dump then leaves a copy of the TOC after the data)
            with open(path, "wb") as fh:
                dump = subprocess.Popen([tools.path("pg_dump"), "-Fc", "-Z0", "-d", DB], env=penv,
                                        stdout=subprocess.PIPE if to == "pipe" else fh)
                if to == "pipe":
                    fh.write(dump.stdout.read())
                assert dump.wait() == 0
            listed = subprocess.run([tools.path("pg_restore"), "-l", str(path)], check=True, capture_output=True,
                                    text=True).stdout
        ids = [int(m.group(1)) for m in re.finditer(r"^(\d+);", listed, re.M)]
        data = path.read_bytes()
        stream = ArchiveStream(data[i:i + 4096] for i in range(0, len(data), 4096))  # small pieces: every boundary case
        head = stream.read_head()
        assert head.unsupported() is None
        unlisted = {e.desc for e in head.entries if e.dump_id not in ids}  # pg_restore -l leaves out the special ones
        assert set(ids) <= {e.dump_id for e in head.entries} and unlisted <= {"ENCODING", "STDSTRINGS", "SEARCHPATH", "DATABASE"}
        rows = {}
        for dump_id, pieces in stream.blocks():
            rows[dump_id] = b"".join(pieces)
        tables = head.table_data()
        assert set(rows) == set(tables) and all(tables[i].section == SECTION_DATA for i in rows)
        notes = next(i for i, e in tables.items() if e.tag == "notes")
        body, end = rows[notes].split(b"\\.\n")  # pg_dump ends the rows as COPY text does
        assert body.count(b"\n") == 2000 and b"two\\nlines" in body and end.strip() == b""
        before, after = head.phases()
        assert {e.desc for e in before} >= {"TABLE", "SCHEMA", "FUNCTION", "MATERIALIZED VIEW"}
        assert {e.desc for e in after} >= {"INDEX", "FK CONSTRAINT", "TRIGGER", "ACL", "MATERIALIZED VIEW DATA",
                                           "SEQUENCE SET"}
        assert not {e.desc for e in before} & {"INDEX", "ACL", "TABLE DATA", "MATERIALIZED VIEW DATA"}
        assert len(before) + len(after) + len(tables) == len(head.entries)
        # built as soon as their tables' rows are in: the indexes and constraints of tables with rows, a
        # foreign key once both its tables are; not those of a partitioned table or a materialized view
        plan = early_entries(head, after)
        by_id = {e.dump_id: e for e in head.entries}
        data_of = {e.tag: i for i, e in tables.items()}
        early = {by_id[i].tag: {tables[t].tag for t in reads} for i, (reads, _) in plan.items()}
        assert early == {"notes notes_pkey": {"notes"}, "notes_lower_body": {"notes"},
                         "children children_pkey": {"children"}, "children children_note_id_fkey": {"children", "notes"},
                         "big big_pkey": {"big"}, "big_pad": {"big"}}, early
        fk = next(i for i in plan if by_id[i].tag == "children children_note_id_fkey")
        assert {by_id[i].tag for i in plan[fk][1]} == {"notes notes_pkey"} and data_of["notes"] in plan[fk][0]
        assert {by_id[i].desc for i in plan} == {"INDEX", "CONSTRAINT", "FK CONSTRAINT"}
        left = {e.tag for e in after if e.desc in ("INDEX", "CONSTRAINT", "INDEX ATTACH") and e.dump_id not in plan}
        # a partition's index hangs on its partitioned table's, which waits for every partition's rows
        assert left == {"events_day", "events_2025_on_day_idx", "events_2026_on_day_idx"}, left

    def test_an_archive_compressed_by_pg_dump_is_not_streamed(self, edge, tmp_path):
        env = edge
        tools = PgTools.default()
        with passfile_env(env.conn(DB)) as penv:
            data = subprocess.run([tools.path("pg_dump"), "-Fc", "-Z1", "-d", DB], env=penv, check=True,
                                  capture_output=True).stdout
        assert "compressed" in ArchiveStream([data]).read_head().unsupported()


def loader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("dr-loader")]


class TestDamage:
    def put(self, env, name: str, archive: bytes) -> str:
        """Store `archive` (zstd-compressed) as a complete backup with a matching checksum and manifest."""
        good = env.platform.store.get_backup(name)
        bad = name.replace(".pgdump.zst", "-tampered.pgdump.zst")
        blob = zstandard.ZstdCompressor().compress(archive)
        with env.platform.store.writer(bad) as w:
            w.write(blob)
            w.commit(dataclasses.replace(good, name=bad))  # the store computes size and checksum
        return bad

    def test_rows_the_table_refuses_fail_the_restore_and_leave_nothing_behind(self, edge):
        env = edge
        name = backup_of(env, DB, "bad-rows")
        archive = zstandard.ZstdDecompressor().decompressobj().decompress(
            (env.platform.store.root / name).read_bytes())
        # same length, so the archive's framing stays valid: an int column gets letters
        assert archive.count(b"\n1\t1\t1\n") == 0
        target = b"1\t2\t1\n"  # app.children row (id 1, note 2, n 1)
        assert archive.count(target) == 1
        tampered = archive.replace(target, b"1\tx\t1\n")
        bad = self.put(env, name, tampered)
        before = set(env.query("SELECT datname FROM pg_database"))
        with pytest.raises(RestoreError) as caught:
            restore_beside(env, bad)
        assert "app.children" in caught.value.message or "children" in caught.value.message
        assert set(env.query("SELECT datname FROM pg_database")) == before
        assert loader_threads() == []  # every connection closed; none left waiting in its COPY

    def test_a_truncated_stream_is_corrupted_and_leaves_nothing_behind(self, edge):
        env = edge
        name = backup_of(env, DB, "cut")
        archive = zstandard.ZstdDecompressor().decompressobj().decompress(
            (env.platform.store.root / name).read_bytes())
        bad = self.put(env, name, archive[: len(archive) * 2 // 3])
        before = set(env.query("SELECT datname FROM pg_database"))
        with pytest.raises(BackupCorrupted, match="not a valid pg_dump archive|ends"):
            restore_beside(env, bad)
        assert set(env.query("SELECT datname FROM pg_database")) == before
        assert loader_threads() == []
