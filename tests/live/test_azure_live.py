"""Against a REAL Azure subscription: backup → point-in-time restore → restore → tidy-up.

Skipped unless `DR_AZURE_LIVE=1`; see docs/azure.md ("Against a real subscription") for the
variables. It acts on a throwaway server only: it creates a table `dr_live_markers` in
`DR_LIVE_DATABASE`, restores that database in place (the previous copy is kept as
`<db>_replaced_<time>` until tidy-up), makes one PTR server and deletes it again.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

REQUIRED = ("DR_LIVE_SUBSCRIPTION_ID", "DR_LIVE_RESOURCE_GROUP", "DR_LIVE_SERVER", "DR_LIVE_DATABASE",
            "DR_LIVE_STORAGE_ACCOUNT", "DR_LIVE_CONTAINER", "DR_LIVE_PG_BIN_DIR", "DR_AZURE_PG_PASSWORD")

pytestmark = [
    pytest.mark.skipif(os.environ.get("DR_AZURE_LIVE") != "1", reason="live Azure tests run only with DR_AZURE_LIVE=1"),
    pytest.mark.usefixtures("prefect_server"),
    pytest.mark.timeout(3 * 3600),
]

CONFIG = """
prefix = "live"
timezone = "Europe/London"

[local]
state_dir = "{state_dir}"
pg_bin_dir = "{pg_bin_dir}"

[services.live.environments.development]
platform = "azure"
subscription_id = "{DR_LIVE_SUBSCRIPTION_ID}"
resource_group = "{DR_LIVE_RESOURCE_GROUP}"
server = "{DR_LIVE_SERVER}"
database = "{DR_LIVE_DATABASE}"
storage_account = "{DR_LIVE_STORAGE_ACCOUNT}"
container = "{DR_LIVE_CONTAINER}"
admin_user = "{admin_user}"
"""


@pytest.fixture
def live(tmp_path: Path):
    missing = [v for v in REQUIRED if not os.environ.get(v)]
    if missing:
        pytest.fail(f"DR_AZURE_LIVE=1 but these are not set: {', '.join(missing)}", pytrace=False)
    from dr.config import load_config
    from dr.platforms import get_platform

    cfg_path = tmp_path / "dr.toml"
    cfg_path.write_text(CONFIG.format(state_dir=tmp_path / "state", pg_bin_dir=os.environ["DR_LIVE_PG_BIN_DIR"],
                                      admin_user=os.environ.get("DR_LIVE_ADMIN_USER", "dradmin"),
                                      **{k: os.environ[k] for k in REQUIRED}))
    os.environ.setdefault("DR_AZURE_STATE_DIR", str(tmp_path / "azure-state"))
    cfg = load_config(cfg_path)
    target = cfg.target("live", "development")
    return cfg_path, target, get_platform(cfg, target)


def query(platform, server: str, database: str, sql: str):
    with psycopg.connect(**platform.servers.connection(server, database).psycopg_kwargs(), autocommit=True) as c:
        cur = c.execute(sql)
        return cur.fetchall() if cur.description else []


def test_backup_ptr_restore_tidy_up_on_a_real_server(live):
    from flows.backup import backup_database
    from flows.ptr import point_in_time_restore
    from flows.restore import restore_database
    from flows.tidy_up import tidy_up

    cfg_path, target, platform = live
    kw = {"service": "live", "environment": "development", "config_path": str(cfg_path)}
    incident = f"live-{uuid.uuid4().hex[:8]}"
    db, server = target.database, target.server
    query(platform, server, db, "DROP TABLE IF EXISTS dr_live_markers")
    query(platform, server, db, "CREATE TABLE dr_live_markers (id int PRIMARY KEY)")
    query(platform, server, db, "INSERT INTO dr_live_markers SELECT generate_series(1, 10)")
    time.sleep(2)
    t = datetime.now(timezone.utc).replace(microsecond=0)
    time.sleep(2)
    query(platform, server, db, "INSERT INTO dr_live_markers VALUES (11)")  # the "damage", after T

    backup = backup_database(**kw, kind="adhoc", label=incident)
    assert platform.store.get_backup(backup["name"]).complete

    # Azure restores to no later than ~5 minutes ago
    wait = (t + timedelta(minutes=6) - datetime.now(timezone.utc)).total_seconds()
    if wait > 0:
        time.sleep(wait)
    ptr_server = None
    try:
        ptr = point_in_time_restore(**kw, restore_time=t.strftime("%Y-%m-%dT%H:%M:%SZ"), incident=incident)
        ptr_server = ptr["server"]
        assert query(platform, ptr_server, db, "SELECT max(id) FROM dr_live_markers") == [(10,)]
        ptr_backup = backup_database(**kw, kind="ptr", server=ptr_server, label=incident)
        restored = restore_database(**kw, backup=ptr_backup["name"])
        assert query(platform, server, db, "SELECT count(*), max(id) FROM dr_live_markers") == [(10, 10)]
        assert query(platform, server, restored["replaced_database"], "SELECT max(id) FROM dr_live_markers") == [(11,)]
        tidy = tidy_up(**kw, incident=incident, dry_run=False)
        assert ptr_server in tidy["deleted"]
        assert not platform.servers.server_exists(ptr_server)
    finally:
        if ptr_server and platform.servers.server_exists(ptr_server):
            platform.servers.delete_server(ptr_server)
        query(platform, server, db, "DROP TABLE IF EXISTS dr_live_markers")
