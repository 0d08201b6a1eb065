"""Every backup format round-trips through the store, and the zstd format is what it says it is.

`custom-zstd` (the default) is an uncompressed custom archive compressed with zstd on its way to
the store; `custom` (pg_dump's own gzip) and `plain-gzip` (the nightly tooling's `.sql.gz`) stay
restorable, because backups of those formats exist.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone

import pytest
import zstandard

from dr.backup import DEFAULT_FORMAT, FORMATS, backup_name, take_backup
from dr.commands import PgTools
from dr.errors import BackupCorrupted, RestoreError
from dr.platforms.local.sample import table_counts
from dr.restore import restore_backup

CHECKSUM = "SELECT md5(string_agg(id::text || personal_statement || status, ',' ORDER BY id)) FROM applications"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def backup(env, fmt: str, label: str) -> str:
    name = backup_name("apply", "dv", "adhoc", fmt, datetime.now(timezone.utc), label)
    take_backup(env.platform.servers, env.platform.store, PgTools.default(), server=env.target.server,
                database=env.target.database, name=name, kind="adhoc", fmt=fmt)
    return name


def restore_beside(env, name: str, jobs: int) -> str:
    """Restore `name` next to the live database (no swap); returns the new database's name."""
    r = restore_backup(env.platform.servers, env.platform.store, PgTools.default(), server=env.target.server,
                       database=env.target.database, backup=name, jobs=jobs, swap=False,
                       spool_dir=env.root)
    assert r.verified_manifest
    return r.database


def restore_databases(env) -> list[str]:
    return [d for (d,) in env.query("SELECT datname FROM pg_database") if "_restore_" in d]


@pytest.fixture(scope="module")
def formats_env(shared_env):
    yield shared_env
    for db in restore_databases(shared_env):
        shared_env.query(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


class TestRoundTrip:
    def test_the_default_format_is_zstd_compressed_custom(self):
        assert DEFAULT_FORMAT == "custom-zstd" and FORMATS[DEFAULT_FORMAT][0] == ".pgdump.zst"

    @pytest.mark.parametrize("jobs", [1, 2], ids=["streamed", "parallel"])
    @pytest.mark.parametrize("fmt", sorted(FORMATS))
    def test_a_backup_restores_to_the_same_rows(self, formats_env, fmt, jobs):
        env = formats_env
        name = backup(env, fmt, f"rt{jobs}")
        db = restore_beside(env, name, jobs)
        try:
            assert table_counts(env.conn(db)) == table_counts(env.conn())
            assert env.scalar(CHECKSUM, database=db) == env.scalar(CHECKSUM)
            # the planner knows the big table's size: the statistics travel with both custom formats from
            # PostgreSQL 18 (tests/test_real_databases.py), ANALYZE gives them before
            if fmt != "plain-gzip":
                assert env.scalar("SELECT reltuples FROM pg_class WHERE relname = 'applications'", database=db) > 0
        finally:
            env.query(f'DROP DATABASE "{db}" WITH (FORCE)')


class TestZstdFormat:
    def test_stores_one_zstd_frame_of_a_custom_archive_with_the_checksum_of_the_stored_bytes(self, formats_env):
        env = formats_env
        name = backup(env, "custom-zstd", "frame")
        info = env.platform.store.get_backup(name)
        stored = (env.platform.store.root / name).read_bytes()
        assert info.format == "custom-zstd" and name.endswith(".pgdump.zst")
        assert stored[:4] == ZSTD_MAGIC
        assert info.size == len(stored) and info.sha256 == hashlib.sha256(stored).hexdigest()
        archive = zstandard.ZstdDecompressor().decompressobj().decompress(stored)
        assert archive[:5] == b"PGDMP"  # pg_restore reads it as it is
        assert int(info.extra["archive_bytes"]) == len(archive)
        assert len(stored) < len(archive) / 2

    def test_a_foreign_pgdump_zst_without_metadata_is_restored_by_its_extension(self, formats_env):
        env = formats_env
        name = backup(env, "custom-zstd", "foreign")
        store = env.platform.store
        foreign = "apply_dv_2026-11-02.pgdump.zst"
        (store.root / foreign).write_bytes((store.root / name).read_bytes())
        info = store.get_backup(foreign)
        assert info.format == "unknown"  # nothing recorded: the name must do
        r = restore_backup(env.platform.servers, store, PgTools.default(), server=env.target.server,
                           database=env.target.database, backup=foreign, jobs=2, swap=False, spool_dir=env.root)
        try:
            assert table_counts(env.conn(r.database)) == table_counts(env.conn())
        finally:
            env.query(f'DROP DATABASE "{r.database}" WITH (FORCE)')
            store.delete_backup(foreign)


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_a_bit(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0x10
    return bytes(b)


class TestDamagedZstdBackup:
    @pytest.mark.parametrize("jobs", [1, 2], ids=["streamed", "parallel"])
    @pytest.mark.parametrize("damage", [truncate, flip_a_bit])
    def test_is_refused_before_anything_is_swapped(self, formats_env, damage, jobs):
        env = formats_env
        name = backup(env, "custom-zstd", f"dmg{jobs}-{damage.__name__}")  # unique within a second too
        path = env.platform.store.root / name
        path.write_bytes(damage(path.read_bytes()))
        live_before = table_counts(env.conn())

        with pytest.raises((BackupCorrupted, RestoreError)) as err:
            restore_beside(env, name, jobs)

        text = str(err.value)
        assert isinstance(err.value, BackupCorrupted) or "corrupt" in text or "truncated" in text, text
        assert "untouched" in text
        assert restore_databases(env) == []
        assert table_counts(env.conn()) == live_before
        assert not [p for p in os.listdir(env.root) if p.startswith("dr-spool-")], "the spool was left behind"
