"""Nightly backups: the backup, retention, and the restore test that catches a bad backup."""

from __future__ import annotations

from datetime import timedelta

import pytest

from dr.errors import BackupCorrupted, RestoreError
from dr.platforms.base import BackupInfo
from flows.nightly import nightly_backup, verify_backup
from tests.helpers import utc_now

pytestmark = pytest.mark.usefixtures("prefect_server")


def seed_old_nightlies(store, days: int) -> list[str]:
    names = []
    for d in range(10, 10 + days):
        when = utc_now() - timedelta(days=d)
        name = f"apply_dv_{when:%Y-%m-%d}.pgdump"
        with store.writer(name) as w:
            w.write(b"old")
            w.commit(BackupInfo(name=name, size=0, complete=True, kind="nightly", created_at=when, finished_at=when))
        names.append(name)
    return names


def test_nightly_backs_up_verifies_and_prunes(live_env):
    store = live_env.platform.store
    old = seed_old_nightlies(store, 30)
    r = nightly_backup(**live_env.kw(), verify="always")
    assert r["backup"] == f"apply_dv_{utc_now():%Y-%m-%d}.pgdump.zst"
    assert r["verified"]["verified"] is True
    info = store.get_backup(r["backup"])
    assert info.complete and info.kind == "nightly"
    kept = {b.name for b in store.list_backups()}
    assert r["backup"] in kept
    assert set(r["retention"]["deleted"]) == set(old) - kept and r["retention"]["deleted"]
    # the scratch database of the test restore is gone, the live one untouched
    dbs = {d[0] for d in live_env.query("SELECT datname FROM pg_database")}
    assert not [d for d in dbs if "verify" in d] and live_env.target.database in dbs


def test_verification_catches_a_corrupted_latest_backup(live_env):
    r = nightly_backup(**live_env.kw(), verify="never", prune=False)
    path = live_env.platform.store.root / r["backup"]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises((BackupCorrupted, RestoreError)):
        verify_backup(**live_env.kw())
    dbs = {d[0] for d in live_env.query("SELECT datname FROM pg_database")}
    assert not [d for d in dbs if "verify" in d or "_restore_" in d]
