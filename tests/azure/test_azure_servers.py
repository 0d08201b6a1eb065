"""`AzureServers` driving the REAL management SDK against the fake ARM of `fake_arm.py`.

What is faked: only the HTTPS service on the other end (servers kept in a dict,
operations that finish after a few polls). The SDK's request building, serialisation,
retry policy, LRO polling, continuation tokens, TLS and bearer-token policy are real.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from azure_test_support import BLOCKED, PRIMARY, RESOURCE_GROUP, SUBSCRIPTION, FakeCredential
from fake_arm import _error

from dr.errors import (
    ConfigError,
    InvalidInput,
    InvalidRestoreTime,
    OperationTimedOut,
    PlatformError,
    ServerExists,
    ServerNotFound,
    TransientPlatformError,
)
from dr.platforms.base import TAG_CREATED_BY, TAG_CREATED_BY_VALUE, TAG_PURPOSE, TAG_RESTORE_TIME, TAG_SOURCE

OURS = {TAG_CREATED_BY: TAG_CREATED_BY_VALUE}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def parse_utc(text: str) -> datetime:
    """Parse what the SDK sent, insisting that it is UTC."""
    assert text.endswith("Z") or text.endswith("+00:00"), f"{text!r} is not marked as UTC"
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def op_polls(arm, since: int = 0) -> list:
    return [r for r in arm.requests[since:] if r.method == "GET" and "azureAsyncOperation" in r.path]


class TestReading:
    def test_get_server_maps_arm_fields(self, servers, arm):
        info = servers.get_server(PRIMARY)
        assert info.name == PRIMARY
        assert info.state == "Ready"
        assert info.version == 16
        assert info.host == f"{PRIMARY}.private.postgres.database.azure.com"
        assert info.port == 5432
        assert info.tags == {"environment": "production", "service": "apply"}
        assert info.created_at.tzinfo is not None and info.created_at < utcnow() - timedelta(days=29)
        assert not info.created_by_us
        # the real bearer-token policy sent the credential's token over TLS
        assert arm.requests[-1].headers["authorization"] == "Bearer test-token"

    def test_missing_server_is_server_not_found(self, servers):
        with pytest.raises(ServerNotFound) as err:
            servers.get_server("nope-pg")
        assert err.value.server == "nope-pg"
        assert servers.server_exists("nope-pg") is False
        assert servers.server_exists(PRIMARY) is True

    def test_states_are_passed_through(self, servers, arm):
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "stopped-pg", state="Stopped")
        assert servers.get_server("stopped-pg").state == "Stopped"

    def test_list_servers_of_the_resource_group(self, servers, arm):
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "other-pg")
        arm.add_server(SUBSCRIPTION, "another-rg", "elsewhere-pg")
        assert sorted(s.name for s in servers.list_servers()) == ["other-pg", PRIMARY]

    def test_restore_window(self, servers, arm):
        earliest = datetime(2026, 11, 19, 3, 0, 0, tzinfo=timezone.utc)
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "w-pg", earliest=earliest)
        before = utcnow()
        window = servers.get_restore_window("w-pg")
        assert window.earliest == earliest
        assert before - timedelta(minutes=5, seconds=2) <= window.latest <= utcnow() - timedelta(minutes=5) + \
            timedelta(seconds=1)

    def test_connection(self, servers, monkeypatch):
        monkeypatch.setenv("DR_AZURE_PG_PASSWORD", "s3cret-admin-pw")
        conn = servers.connection(PRIMARY, "apply_production")
        assert (conn.host, conn.port, conn.user, conn.dbname, conn.sslmode) == (
            f"{PRIMARY}.private.postgres.database.azure.com", 5432, "dradmin", "apply_production", "require")
        assert conn.password == "s3cret-admin-pw"
        assert "s3cret" not in repr(conn)

    def test_connection_without_password_names_the_variable(self, servers):
        with pytest.raises(ConfigError, match="DR_AZURE_PG_PASSWORD"):
            servers.connection(PRIMARY, "apply_production")


class TestPointInTimeRestore:
    def test_request_body(self, servers, arm):
        # a time given in another zone is sent in UTC
        when = (utcnow() - timedelta(hours=2)).astimezone(ZoneInfo("Asia/Kolkata")).replace(microsecond=0)
        info = servers.point_in_time_restore(PRIMARY, "apply-ptr-1", when, tags={TAG_PURPOSE: "ignored",
                                                                              "dr-incident": "INC42"})
        assert info.state == "Ready" and info.name == "apply-ptr-1"
        [put] = arm.server_calls("PUT", "apply-ptr-1")
        source = arm.server(PRIMARY)
        body = put.body
        assert body["location"] == "uksouth"
        props = body["properties"]
        assert props["createMode"] == "PointInTimeRestore"
        assert props["sourceServerResourceId"] == source["id"]
        assert parse_utc(props["pointInTimeUTC"]) == when
        assert props["network"] == {
            "delegatedSubnetResourceId": source["properties"]["network"]["delegatedSubnetResourceId"],
            "privateDnsZoneArmResourceId": source["properties"]["network"]["privateDnsZoneArmResourceId"],
        }
        assert set(props) == {"createMode", "sourceServerResourceId", "pointInTimeUTC", "network"}
        utc = when.astimezone(timezone.utc).isoformat()
        assert body["tags"] == {TAG_CREATED_BY: TAG_CREATED_BY_VALUE, TAG_PURPOSE: "point-in-time-restore",
                                TAG_SOURCE: PRIMARY, TAG_RESTORE_TIME: utc, "dr-incident": "INC42"}
        assert info.tags == body["tags"]
        # the operation was polled until it succeeded, and nothing is left recorded
        assert len(op_polls(arm)) == arm.polls_to_finish + 1
        assert servers.operations.record.read() == {}

    def test_naive_time_is_refused_before_any_call(self, servers, arm):
        with pytest.raises(InvalidRestoreTime, match="time zone"):
            servers.point_in_time_restore(PRIMARY, "apply-ptr-2", datetime(2026, 11, 25, 12, 0))
        assert arm.requests == []

    @pytest.mark.parametrize("when", [
        pytest.param(lambda: utcnow() - timedelta(days=8), id="before-earliest"),
        pytest.param(lambda: utcnow() - timedelta(minutes=1), id="after-latest"),
    ])
    def test_time_outside_the_window_is_refused_before_put(self, servers, arm, when):
        with pytest.raises(InvalidRestoreTime, match="outside the restore window"):
            servers.point_in_time_restore(PRIMARY, "apply-ptr-3", when())
        assert arm.calls("PUT") == []

    def test_existing_restore_of_same_source_and_time_is_reused(self, servers, arm):
        when = (utcnow() - timedelta(hours=3)).replace(microsecond=0)
        first = servers.point_in_time_restore(PRIMARY, "apply-ptr-4", when)
        again = servers.point_in_time_restore(PRIMARY, "apply-ptr-4", when)
        assert again == first
        assert len(arm.server_calls("PUT", "apply-ptr-4")) == 1

    def test_stopped_matching_restore_is_started_not_recreated(self, servers, arm):
        when = (utcnow() - timedelta(hours=3)).replace(microsecond=0)
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "apply-ptr-5", state="Stopped",
                       tags={**OURS, TAG_SOURCE: PRIMARY, TAG_RESTORE_TIME: when.isoformat()})
        info = servers.point_in_time_restore(PRIMARY, "apply-ptr-5", when)
        assert info.state == "Ready"
        assert arm.calls("PUT") == []
        assert len(arm.calls("POST", "/apply-ptr-5/start")) == 1

    def test_existing_other_server_is_server_exists(self, servers, arm):
        other = {**OURS, TAG_SOURCE: PRIMARY, TAG_RESTORE_TIME: "2026-01-01T00:00:00+00:00"}
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "apply-ptr-6", tags=other)
        with pytest.raises(ServerExists):
            servers.point_in_time_restore(PRIMARY, "apply-ptr-6", utcnow() - timedelta(hours=1))
        assert arm.calls("PUT") == []

    def test_conflict_from_arm_is_server_exists(self, servers, arm):
        arm.inject("PUT", "/flexibleServers/apply-ptr-7", 409,
                   body=_error("ServerAlreadyExists", "Specified server name 'apply-ptr-7' is already used."))
        with pytest.raises(ServerExists, match="ServerAlreadyExists"):
            servers.point_in_time_restore(PRIMARY, "apply-ptr-7", utcnow() - timedelta(hours=1))
        assert len(arm.server_calls("PUT", "apply-ptr-7")) == 1

    def test_conflict_with_our_own_accepted_request_is_taken_up(self, servers, arm):
        # the answer to the first PUT was lost, the SDK retried, and Azure says the server exists: it is ours
        when = (utcnow() - timedelta(hours=1)).replace(microsecond=0)
        ours = {**OURS, TAG_SOURCE: PRIMARY, TAG_RESTORE_TIME: when.isoformat()}
        arm.inject("PUT", "/flexibleServers/apply-ptr-12", 409,
                   body=_error("ServerAlreadyExists", "Specified server name 'apply-ptr-12' is already used."),
                   on_hit=lambda: arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "apply-ptr-12", tags=ours))
        info = servers.point_in_time_restore(PRIMARY, "apply-ptr-12", when)
        assert info.state == "Ready" and info.tags == ours
        assert len(arm.server_calls("PUT", "apply-ptr-12")) == 1

    def test_operation_that_never_finishes_times_out_and_stays_recorded(self, servers, arm):
        arm.never_finish.add("apply-ptr-8")
        start = time.monotonic()
        with pytest.raises(OperationTimedOut) as err:
            servers.point_in_time_restore(PRIMARY, "apply-ptr-8", utcnow() - timedelta(hours=1), timeout=1.0)
        elapsed = time.monotonic() - start
        assert 1.0 <= elapsed < 4.0
        assert "did not finish within 1 s" in str(err.value) and "re-attaches" in str(err.value)
        recorded = servers.operations.get(servers.resource_id("apply-ptr-8"))
        assert recorded["operation"] == "point-in-time-restore" and recorded["token"]
        assert len(op_polls(arm)) >= 3  # it really was polling

    def test_failed_operation_is_platform_error_and_forgotten(self, servers, arm):
        arm.fail_operations["apply-ptr-9"] = {"code": "InternalServerError", "message": "restore failed: disk full"}
        with pytest.raises(PlatformError) as err:
            servers.point_in_time_restore(PRIMARY, "apply-ptr-9", utcnow() - timedelta(hours=1))
        assert not isinstance(err.value, TransientPlatformError)
        assert "apply-ptr-9" in str(err.value)
        assert servers.operations.record.read() == {}

    def test_rerun_after_crash_reattaches_instead_of_a_second_put(self, make_servers, arm):
        when = (utcnow() - timedelta(hours=1)).replace(microsecond=0)
        # 1. a run whose poller never polls again (as if the process had died) times out
        crashed = make_servers(polling_interval=3600)
        with pytest.raises(OperationTimedOut):
            crashed.point_in_time_restore(PRIMARY, "apply-ptr-10", when, timeout=0.3)
        assert arm.server("apply-ptr-10")["properties"]["state"] == "Provisioning"
        state_file = crashed.operations.path
        token = json.loads(state_file.read_text())[crashed.resource_id("apply-ptr-10").lower()]["token"]
        assert token
        # 2. a fresh process re-attaches through the recorded continuation token
        mark = len(arm.requests)
        fresh = make_servers()
        info = fresh.point_in_time_restore(PRIMARY, "apply-ptr-10", when, timeout=10)
        assert info.state == "Ready"
        assert len(arm.server_calls("PUT", "apply-ptr-10")) == 1
        assert len(op_polls(arm, mark)) >= 1  # it polled the recorded operation, not the server
        assert json.loads(state_file.read_text()) == {}

    def test_recorded_operation_for_other_parameters_blocks_the_name(self, make_servers, arm):
        crashed = make_servers(polling_interval=3600)
        with pytest.raises(OperationTimedOut):
            crashed.point_in_time_restore(PRIMARY, "apply-ptr-11", utcnow() - timedelta(hours=1), timeout=0.2)
        with pytest.raises(ServerExists, match="another unfinished operation"):
            make_servers().point_in_time_restore(PRIMARY, "apply-ptr-11", utcnow() - timedelta(hours=2))
        assert len(arm.server_calls("PUT", "apply-ptr-11")) == 1


class TestRetries:
    def test_throttling_is_retried_after_retry_after(self, servers, arm):
        arm.inject("GET", f"/flexibleServers/{PRIMARY}", 429, headers={"Retry-After": "1"},
                   body=_error("TooManyRequests", "throttled"))
        start = time.monotonic()
        assert servers.get_server(PRIMARY).state == "Ready"
        assert time.monotonic() - start >= 0.9
        assert len(arm.server_calls("GET", PRIMARY)) == 2

    def test_validation_error_is_not_retried(self, servers, arm):
        with pytest.raises(PlatformError) as err:
            servers.geo_restore(PRIMARY, "apply-geo-bad", location="ukwest",
                                delegated_subnet_resource_id="/subscriptions/x/missing-subnet",
                                private_dns_zone_arm_resource_id="/subscriptions/x/dns")
        assert not isinstance(err.value, TransientPlatformError)
        assert "HTTP 400" in str(err.value) and "SubnetNotFound" in str(err.value)
        assert "is not delegated" in str(err.value)  # ARM's own message reaches the person
        assert len(arm.server_calls("PUT", "apply-geo-bad")) == 1

    def test_persistent_5xx_is_transient_after_the_configured_retries(self, make_servers, arm):
        servers = make_servers(retry_total=2)
        arm.inject("GET", f"/flexibleServers/{PRIMARY}", 503, times=10,
                   body=_error("ServiceUnavailable", "try later"))
        with pytest.raises(TransientPlatformError, match="HTTP 503"):
            servers.get_server(PRIMARY)
        assert len(arm.server_calls("GET", PRIMARY)) == 3


class TestCreateServer:
    def test_recreates_with_the_settings_of_like(self, servers, arm, monkeypatch, caplog):
        caplog.set_level(logging.DEBUG)
        monkeypatch.setenv("DR_AZURE_PG_PASSWORD", "Very-Secret-Pw-123")
        info = servers.create_server("apply-new-pg", like=PRIMARY, tags={"dr-incident": "INC7"})
        assert info.state == "Ready"
        [put] = arm.server_calls("PUT", "apply-new-pg")
        like = arm.server(PRIMARY)
        body, props = put.body, put.body["properties"]
        assert body["location"] == like["location"]
        assert body["sku"] == like["sku"]
        assert body["tags"] == {"environment": "production", "service": "apply", "dr-incident": "INC7"}
        assert props["createMode"] == "Create"
        assert props["version"] == "16"
        assert props["storage"] == like["properties"]["storage"]
        assert props["network"] == like["properties"]["network"]
        assert props["backup"] == {"backupRetentionDays": 7, "geoRedundantBackup": "Enabled"}  # no read-only fields
        assert props["highAvailability"]["mode"] == "ZoneRedundant" and "state" not in props["highAvailability"]
        assert props["administratorLogin"] == "dradmin"
        assert props["administratorLoginPassword"] == "Very-Secret-Pw-123"
        assert "Very-Secret-Pw-123" not in caplog.text

    def test_without_password_nothing_is_sent(self, servers, arm):
        with pytest.raises(ConfigError, match="DR_AZURE_PG_PASSWORD"):
            servers.create_server("apply-new-pg", like=PRIMARY)
        assert arm.calls("PUT") == []

    def test_existing_name_is_server_exists(self, servers, arm, monkeypatch):
        monkeypatch.setenv("DR_AZURE_PG_PASSWORD", "pw-pw-pw-pw")
        with pytest.raises(ServerExists):
            servers.create_server(PRIMARY)
        assert arm.calls("PUT") == []

    def test_a_dropped_server_is_recreated_from_its_recorded_settings(self, servers, arm, monkeypatch):
        monkeypatch.setenv("DR_AZURE_PG_PASSWORD", "pw-pw-pw-pw")
        before = arm.server(PRIMARY)
        servers.delete_server(PRIMARY, force=True)
        assert arm.server(PRIMARY) is None
        servers.create_server("apply-new-pg2", like=PRIMARY)  # the primary is gone: its settings come from the record
        [put] = arm.server_calls("PUT", "apply-new-pg2")
        assert put.body["sku"] == before["sku"]
        assert put.body["properties"]["network"] == before["properties"]["network"]
        assert put.body["properties"]["storage"] == before["properties"]["storage"]


class TestDelete:
    def test_deletes_a_server_this_tool_made_and_records_the_drop(self, servers, arm):
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "apply-ptr-old", tags=OURS)
        before = utcnow()
        servers.delete_server("apply-ptr-old")
        assert arm.server("apply-ptr-old") is None
        assert len(arm.server_calls("DELETE", "apply-ptr-old")) == 1
        [dropped] = servers.list_dropped_servers()
        assert dropped.name == "apply-ptr-old"
        assert dropped.resource_id == arm.server_id(SUBSCRIPTION, RESOURCE_GROUP, "apply-ptr-old")
        assert before.replace(microsecond=0) <= dropped.dropped_at <= utcnow()  # Azure's Date: whole seconds
        assert dropped.revivable_until == dropped.dropped_at + timedelta(days=5)

    def test_already_gone_is_success(self, servers, arm):
        servers.delete_server("never-was-pg")
        assert arm.calls("DELETE") == []

    def test_gone_between_get_and_delete_is_success(self, servers, arm):
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "racy-pg", tags=OURS)
        arm.inject("DELETE", "/flexibleServers/racy-pg", 404, body=_error("ResourceNotFound", "gone"))
        servers.delete_server("racy-pg")
        assert len(arm.server_calls("DELETE", "racy-pg")) == 1

    def test_refuses_a_server_it_did_not_make_unless_forced(self, servers, arm):
        with pytest.raises(PlatformError, match="not created by this tool"):
            servers.delete_server(PRIMARY)
        assert arm.calls("DELETE") == [] and arm.server(PRIMARY) is not None
        servers.delete_server(PRIMARY, force=True)
        assert arm.server(PRIMARY) is None


class TestBusyServers:
    """Azure refuses a delete, start or update while the server is in another operation (409 ServerIsBusy)."""

    def test_a_timed_out_restore_is_waited_for_then_deleted(self, servers, arm, caplog):
        caplog.set_level(logging.INFO, logger="dr.azure.servers")
        arm.never_finish.add("apply-ptr-slow")
        with pytest.raises(OperationTimedOut):
            servers.point_in_time_restore(PRIMARY, "apply-ptr-slow", utcnow() - timedelta(hours=1), timeout=0.3)
        assert arm.server("apply-ptr-slow")["properties"]["state"] == "Provisioning"
        arm.finish_after("apply-ptr-slow", polls=3)  # Azure finishes the restore a little later
        servers.delete_server("apply-ptr-slow", timeout=10)
        assert arm.server("apply-ptr-slow") is None
        assert len(arm.server_calls("DELETE", "apply-ptr-slow")) == 1  # sent once the restore had ended
        assert "waiting for the unfinished point-in-time-restore of apply-ptr-slow" in caplog.text
        assert servers.operations.record.read() == {}

    def test_a_delete_refused_as_busy_is_tried_again_saying_what_it_waits_for(self, servers, arm, caplog):
        caplog.set_level(logging.INFO, logger="dr.azure.servers")
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "apply-ptr-busy", tags=OURS)
        arm.busy_for("apply-ptr-busy", gets=3, state="Updating")  # an operation that is not ours
        servers.delete_server("apply-ptr-busy", timeout=10)
        assert arm.server("apply-ptr-busy") is None
        assert len(arm.server_calls("DELETE", "apply-ptr-busy")) >= 2  # the first was refused
        assert "apply-ptr-busy is busy with another operation (Updating)" in caplog.text
        assert "deletion of server 'apply-ptr-busy' waits for it" in caplog.text

    def test_a_server_that_stays_busy_is_left_alone_after_the_timeout(self, servers, arm):
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "apply-ptr-stuck", tags=OURS)
        arm.busy_for("apply-ptr-stuck", gets=10**6, state="Restarting")
        with pytest.raises(OperationTimedOut) as err:
            servers.delete_server("apply-ptr-stuck", timeout=1)
        assert "busy with another operation (Restarting)" in str(err.value)
        assert "nothing was sent" in str(err.value) and "run the same command again" in str(err.value)
        assert arm.server("apply-ptr-stuck") is not None and servers.list_dropped_servers() == []

    def test_a_stopping_restore_is_waited_for_then_started(self, servers, arm):
        when = (utcnow() - timedelta(hours=3)).replace(microsecond=0)
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "apply-ptr-stopping",
                       tags={**OURS, TAG_SOURCE: PRIMARY, TAG_RESTORE_TIME: when.isoformat()})
        arm.busy_for("apply-ptr-stopping", gets=2, state="Stopping", then="Stopped")
        info = servers.point_in_time_restore(PRIMARY, "apply-ptr-stopping", when, timeout=10)
        assert info.state == "Ready"
        assert len(arm.calls("POST", "/apply-ptr-stopping/start")) == 1 and arm.calls("PUT") == []


class TestRevive:
    def test_revives_a_server_dropped_by_this_tool(self, servers, arm):
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "apply-ptr-gone", tags={**OURS, "team": "apply"})
        old = arm.server("apply-ptr-gone")
        servers.delete_server("apply-ptr-gone")
        [dropped] = servers.list_dropped_servers()
        info = servers.revive_dropped_server("apply-ptr-gone", new_name="apply-ptr-back")
        assert info.state == "Ready" and info.name == "apply-ptr-back"
        [put] = arm.server_calls("PUT", "apply-ptr-back")
        props = put.body["properties"]
        assert props["createMode"] == "ReviveDropped"
        assert props["sourceServerResourceId"] == old["id"]
        assert parse_utc(props["pointInTimeUTC"]) == dropped.dropped_at
        assert props["network"]["delegatedSubnetResourceId"] == \
            old["properties"]["network"]["delegatedSubnetResourceId"]
        assert put.body["location"] == old["location"]
        assert put.body["tags"]["team"] == "apply"
        assert servers.list_dropped_servers() == []
        # what it was is still known: Azure revived it without its high availability
        assert "had ZoneRedundant; apply-ptr-back has none" in servers.follow_ups("apply-ptr-back",
                                                                                  like="apply-ptr-gone")[0]

    def test_revives_a_server_dropped_by_someone_else_by_resource_id(self, servers, arm):
        doc = arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "legacy-pg")
        arm.servers.pop(doc["id"].lower())
        arm.dropped[doc["id"].lower()] = doc
        dropped_at = (utcnow() - timedelta(days=2)).replace(microsecond=0)
        servers.revive_dropped_server("legacy-pg", new_name="legacy-pg-2", resource_id=doc["id"], dropped_at=dropped_at,
                                      location="uksouth")
        [put] = arm.server_calls("PUT", "legacy-pg-2")
        props = put.body["properties"]
        assert (props["createMode"], props["sourceServerResourceId"]) == ("ReviveDropped", doc["id"])
        assert parse_utc(props["pointInTimeUTC"]) == dropped_at
        # no record of its network: it lands in the VNet of the target's server
        assert props["network"]["delegatedSubnetResourceId"] == \
            arm.server(PRIMARY)["properties"]["network"]["delegatedSubnetResourceId"]

    def test_a_dropped_servers_name_is_held_while_azure_keeps_it(self, servers, arm, monkeypatch):
        monkeypatch.setenv("DR_AZURE_PG_PASSWORD", "pw-pw-pw-pw")
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "apply-gone-pg", tags=OURS)
        servers.delete_server("apply-gone-pg")
        free, why = servers.name_available("apply-gone-pg")
        assert not free and "Specified server name 'apply-gone-pg' is already used" in why
        with pytest.raises(ServerExists, match="is already used"):  # Azure's refusal, word for word
            servers.revive_dropped_server("apply-gone-pg")
        with pytest.raises(ServerExists, match="is already used"):
            servers.create_server("apply-gone-pg", like=PRIMARY)
        assert servers.name_available(PRIMARY)[0] is False  # a live server's name, too (names are global)
        arm.age_drop("apply-gone-pg", days=5.1)  # Azure no longer keeps it
        assert servers.name_available("apply-gone-pg") == (True, "Azure would give the name 'apply-gone-pg' "
                                                                   "to a new server")

    def test_beyond_five_days_is_refused_without_a_call(self, servers, arm):
        with pytest.raises(ServerNotFound, match="more than 5 days"):
            servers.revive_dropped_server("legacy-pg", resource_id=arm.server_id(SUBSCRIPTION, RESOURCE_GROUP, "x"),
                                          dropped_at=utcnow() - timedelta(days=6), location="uksouth")
        assert arm.calls("PUT") == []

    def test_unknown_dropped_server_is_server_not_found(self, servers):
        with pytest.raises(ServerNotFound, match="resource_id"):
            servers.revive_dropped_server("never-dropped-pg")


class TestGeoRestoreAndPreflight:
    def test_geo_restore_body(self, servers, arm):
        info = servers.geo_restore(PRIMARY, "apply-geo-1", location="ukwest",
                                   delegated_subnet_resource_id="/subscriptions/x/ukwest-vnet/subnets/pg",
                                   private_dns_zone_arm_resource_id="/subscriptions/x/privateDnsZones/z")
        assert info.state == "Ready"
        [put] = arm.server_calls("PUT", "apply-geo-1")
        props = put.body["properties"]
        assert put.body["location"] == "ukwest"
        assert props["createMode"] == "GeoRestore"
        assert props["sourceServerResourceId"] == arm.server(PRIMARY)["id"]
        assert parse_utc(props["pointInTimeUTC"]) <= utcnow()
        assert props["network"] == {"delegatedSubnetResourceId": "/subscriptions/x/ukwest-vnet/subnets/pg",
                                    "privateDnsZoneArmResourceId": "/subscriptions/x/privateDnsZones/z"}
        assert put.body["tags"][TAG_PURPOSE] == "geo-restore"
        assert TAG_RESTORE_TIME not in put.body["tags"]  # Azure takes the latest geo-backup: no time was chosen

    GEO = dict(location="ukwest", delegated_subnet_resource_id="/subscriptions/x/ukwest-vnet/subnets/pg",
               private_dns_zone_arm_resource_id="/subscriptions/x/privateDnsZones/z")

    def test_a_source_without_geo_redundant_backup_is_refused_before_anything(self, servers, arm):
        arm.server(PRIMARY)["properties"]["backup"]["geoRedundantBackup"] = "Disabled"
        with pytest.raises(InvalidInput, match=r"no geo-redundant backups \(backup.geoRedundantBackup is Disabled\)"):
            servers.geo_restore(PRIMARY, "apply-geo-2", **self.GEO)
        assert arm.calls("PUT") == []
        # ... as Azure itself would refuse it
        body = {"location": "ukwest", "properties": {"createMode": "GeoRestore", "pointInTimeUTC": "2026-01-01T00:00:00Z",
                "sourceServerResourceId": arm.server(PRIMARY)["id"],
                "network": {"delegatedSubnetResourceId": "s", "privateDnsZoneArmResourceId": "z"}}}
        from azure.core.exceptions import HttpResponseError

        with pytest.raises(HttpResponseError, match="GeoRestoreNotSupported"):
            servers.client.servers.begin_create_or_update(RESOURCE_GROUP, "apply-geo-2", body)

    @pytest.mark.parametrize("missing", ["delegated_subnet_resource_id", "private_dns_zone_arm_resource_id"])
    def test_a_vnet_source_needs_a_subnet_and_a_dns_zone_in_the_target_region(self, servers, arm, missing):
        with pytest.raises(InvalidInput, match=rf"uses private access.*needs .*geo_restore\.{missing}"):
            servers.geo_restore(PRIMARY, "apply-geo-3", **{**self.GEO, missing: None})
        assert arm.calls("PUT") == []

    def test_no_restore_time_can_be_chosen(self, servers, arm):
        with pytest.raises(InvalidInput, match="latest geo-replicated backup"):
            servers.geo_restore(PRIMARY, "apply-geo-4", point_in_time_utc=utcnow() - timedelta(hours=1), **self.GEO)
        assert arm.calls("PUT") == []

    def test_a_rerun_re_attaches_instead_of_server_exists(self, make_servers, arm):
        crashed = make_servers(polling_interval=3600)
        with pytest.raises(OperationTimedOut):
            crashed.geo_restore(PRIMARY, "apply-geo-5", timeout=0.3, **self.GEO)
        time.sleep(1.1)  # a later second: a time in the request would differ now
        info = make_servers().geo_restore(PRIMARY, "apply-geo-5", timeout=10, **self.GEO)
        assert info.state == "Ready" and len(arm.server_calls("PUT", "apply-geo-5")) == 1
        # and once made, the same request reuses it
        assert make_servers().geo_restore(PRIMARY, "apply-geo-5", **self.GEO).name == "apply-geo-5"
        assert len(arm.server_calls("PUT", "apply-geo-5")) == 1

    def test_preflight_of_a_vnet_server(self, servers, monkeypatch):
        monkeypatch.setenv("DR_AZURE_PG_PASSWORD", "pw-pw-pw-pw")
        checks = {name: (ok, detail) for name, ok, detail in servers.preflight(PRIMARY)}
        assert set(checks) == {"server", "delegated subnet", "private DNS zone", "private DNS zone link",
                               "restore point", "admin password", "permissions"}
        assert all(ok for ok, _ in checks.values()), checks
        assert checks["delegated subnet"][1].endswith("/subnets/postgres")

    def test_preflight_finds_a_dns_zone_not_linked_and_missing_permissions(self, servers, arm, monkeypatch):
        monkeypatch.setenv("DR_AZURE_PG_PASSWORD", "pw-pw-pw-pw")
        arm.dns_links = [{"name": "other", "properties": {"virtualNetwork": {"id": "/subscriptions/x/other-vnet"}}}]
        arm.permissions = [{"actions": ["Microsoft.DBforPostgreSQL/flexibleServers/read",
                                        "Microsoft.DBforPostgreSQL/flexibleServers/*"],
                            "notActions": ["Microsoft.DBforPostgreSQL/flexibleServers/delete"]}]
        checks = {name: (ok, detail) for name, ok, detail in servers.preflight(PRIMARY)}
        assert not checks["private DNS zone link"][0] and "links: other" in checks["private DNS zone link"][1]
        assert not checks["permissions"][0]
        assert checks["permissions"][1].startswith("missing on resource group") and \
            "flexibleServers/delete" in checks["permissions"][1] and "flexibleServers/write" not in checks["permissions"][1]
        arm.inject("GET", "Microsoft.Authorization/permissions", 403,
                   body={"error": {"code": "AuthorizationFailed", "message": "no"}})
        checks = {name: (ok, detail) for name, ok, detail in servers.preflight(PRIMARY)}
        assert checks["permissions"] == (False, "could not check (not allowed to read it)")

    def test_preflight_of_a_dropped_server_finds_leftover_diagnostic_settings(self, servers, arm, monkeypatch):
        monkeypatch.setenv("DR_AZURE_PG_PASSWORD", "pw-pw-pw-pw")
        servers.delete_server(PRIMARY, force=True)
        arm.diagnostic_settings[PRIMARY] = [{"name": "to-log-analytics"}]
        checks = {name: (ok, detail) for name, ok, detail in servers.preflight(PRIMARY)}
        assert not checks["server"][0] and checks["permissions"][0] and checks["private DNS zone link"][0]
        assert not checks["leftover diagnostic settings"][0]
        assert "to-log-analytics" in checks["leftover diagnostic settings"][1]
        assert not checks["server name"][0] and "comes back under a new name" in checks["server name"][1]

    def test_preflight_of_a_public_server_and_a_missing_one(self, servers, arm):
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "public-pg", vnet=False)
        checks = {name: ok for name, ok, _ in servers.preflight("public-pg")}
        assert checks["server"] and not checks["delegated subnet"] and not checks["private DNS zone"]
        assert not checks["admin password"]
        missing = {name: (ok, detail) for name, ok, detail in servers.preflight("missing-pg")}
        assert missing["server"] == (False, f"'missing-pg' not found in resource group '{RESOURCE_GROUP}'")
        assert missing["leftover diagnostic settings"] == (True, "none left behind")
        assert missing["server name"][0] and "keeps its name" in missing["server name"][1]


class TestWhatARestoredServerLacks:
    """Azure makes restored servers without firewall rules or high availability; the tool makes up for it."""

    RULES = {"office": {"startIpAddress": "203.0.113.10", "endIpAddress": "203.0.113.20"},
             "AllowAllAzureServicesAndResourcesWithinAzureIps": {"startIpAddress": "0.0.0.0", "endIpAddress": "0.0.0.0"}}

    def test_a_public_servers_firewall_rules_are_copied_to_its_restore(self, servers, arm):
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "public-pg", vnet=False)
        arm.firewall["public-pg"] = {k: dict(v) for k, v in self.RULES.items()}
        when = (utcnow() - timedelta(hours=2)).replace(microsecond=0)
        servers.point_in_time_restore("public-pg", "public-ptr", when)
        assert arm.firewall["public-ptr"] == self.RULES
        puts = {r.path.rsplit("/", 1)[-1]: r.body for r in arm.calls("PUT", "/public-ptr/firewallRules/")}
        assert puts == {name: {"properties": rule} for name, rule in self.RULES.items()}
        # the same request again finds them there and sends nothing
        servers.point_in_time_restore("public-pg", "public-ptr", when)
        assert len(arm.calls("PUT", "/public-ptr/firewallRules/")) == 2

    def test_a_dropped_public_servers_rules_are_recorded_and_given_to_its_revival(self, servers, arm):
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "public-gone", vnet=False, tags=OURS)
        arm.firewall["public-gone"] = {k: dict(v) for k, v in self.RULES.items()}
        servers.delete_server("public-gone")
        servers.revive_dropped_server("public-gone", new_name="public-back")
        assert arm.firewall["public-back"] == self.RULES

    def test_a_vnet_server_has_no_rules_to_copy(self, servers, arm):
        servers.point_in_time_restore(PRIMARY, "apply-ptr-fw", (utcnow() - timedelta(hours=2)).replace(microsecond=0))
        assert arm.calls("GET", "/firewallRules") == [] and arm.calls("PUT", "/firewallRules") == []

    def test_lost_high_availability_is_a_follow_up(self, servers, arm):
        servers.point_in_time_restore(PRIMARY, "apply-ptr-ha", (utcnow() - timedelta(hours=2)).replace(microsecond=0))
        [todo] = servers.follow_ups("apply-ptr-ha", like=PRIMARY)
        assert todo.startswith(f"high availability: {PRIMARY} had ZoneRedundant; apply-ptr-ha has none")
        assert "--high-availability ZoneRedundant" in todo
        assert servers.follow_ups(PRIMARY, like=PRIMARY) == []

    def test_revive_asks_for_the_time_azure_took_the_delete(self, servers, arm):
        arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "apply-ptr-clock", tags=OURS)
        arm.clock_skew = timedelta(seconds=-90)  # Azure's clock, as its answers carry it, is not ours
        before = utcnow()
        servers.delete_server("apply-ptr-clock")
        servers.revive_dropped_server("apply-ptr-clock", new_name="apply-ptr-clock2")
        sent = parse_utc(arm.server_calls("PUT", "apply-ptr-clock2")[0].body["properties"]["pointInTimeUTC"])
        assert before - timedelta(seconds=92) <= sent <= utcnow() - timedelta(seconds=88)

    def test_a_delete_answered_204_records_no_drop(self, servers, arm):
        doc = arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, "racy204-pg", tags=OURS)
        arm.inject("GET", "/flexibleServers/racy204-pg", 200, body=dict(doc),
                   on_hit=lambda: arm.servers.pop(doc["id"].lower()))  # gone right after it was read
        servers.delete_server("racy204-pg")
        assert len(arm.server_calls("DELETE", "racy204-pg")) == 1
        assert servers.list_dropped_servers() == [] and servers.operations.record.read() == {}


class TestServerParameters:
    """The configurations API: what a user set is read, and set again (with the restart Azure asks for)."""

    def config_puts(self, arm, server):
        return {r.path.rsplit("/", 1)[-1]: r.body for r in arm.calls("PUT", f"/{server}/configurations/")}

    def test_the_user_set_parameters_are_read_azures_own_are_not(self, servers, arm):
        arm.configs[PRIMARY] = {"azure.extensions": "CITEXT,PGCRYPTO", "work_mem": "8192"}
        assert servers.get_server_parameters(PRIMARY) == {"azure.extensions": "CITEXT,PGCRYPTO", "work_mem": "8192"}
        assert servers.configurations.allow_list(PRIMARY) == {"citext", "pgcrypto"}

    def test_parameters_are_put_and_a_static_one_restarts_the_server_once(self, servers, arm):
        change = servers.set_server_parameters(PRIMARY, {"azure.extensions": "CITEXT,PGCRYPTO", "work_mem": "8192",
                                                         "max_connections": "200"})
        assert change.applied == {"azure.extensions": "CITEXT,PGCRYPTO", "max_connections": "200", "work_mem": "8192"}
        assert change.restarted and change.unchanged == []
        assert self.config_puts(arm, PRIMARY) == {
            "azure.extensions": {"properties": {"value": "CITEXT,PGCRYPTO", "source": "user-override"}},
            "max_connections": {"properties": {"value": "200", "source": "user-override"}},
            "work_mem": {"properties": {"value": "8192", "source": "user-override"}}}
        assert len(arm.calls("POST", f"/{PRIMARY}/restart")) == 1 and arm.pending_restart[PRIMARY] == set()
        assert servers.get_server(PRIMARY).state == "Ready"
        # again: nothing to send, nothing to restart (the allow-list compares as a set, without case)
        again = servers.set_server_parameters(PRIMARY, {"azure.extensions": "pgcrypto,citext", "max_connections": "200"})
        assert again.applied == {} and not again.restarted and again.unchanged == ["azure.extensions", "max_connections"]
        assert len(arm.calls("PUT", "/configurations/")) == 3 and len(arm.calls("POST", "/restart")) == 1

    def test_a_dynamic_parameter_needs_no_restart(self, servers, arm):
        assert not servers.set_server_parameters(PRIMARY, {"work_mem": "16384"}).restarted
        assert arm.calls("POST", "/restart") == []

    def test_what_azure_refuses_is_said_and_unknown_parameters_are_refused_before_any_put(self, servers, arm):
        with pytest.raises(PlatformError, match="Invalid value given for parameter 'azure.extensions'"):
            servers.set_server_parameters(PRIMARY, {"azure.extensions": "CITEXT,NOT_AN_EXTENSION"})
        from dr.errors import InvalidInput

        with pytest.raises(InvalidInput, match=r"no parameter shared_buffer\b.*archive_command cannot be set"):
            servers.set_server_parameters(PRIMARY, {"shared_buffer": "1", "archive_command": "x", "work_mem": "8192"})
        assert [r.path for r in arm.calls("PUT", "/configurations/")] == [
            arm.server(PRIMARY)["id"] + "/configurations/azure.extensions"]

    def test_a_server_is_recreated_as_its_snapshot_says(self, servers, arm, monkeypatch):
        from dr.platforms.base import ServerSnapshot

        monkeypatch.setenv("DR_AZURE_PG_PASSWORD", "pw-pw-pw-pw")
        source = arm.server(PRIMARY)
        snapshot = ServerSnapshot(
            server=PRIMARY, platform="azure", taken_at=utcnow(), version=16, version_full="16.9",
            sku="Standard_D2ds_v5", storage_gb=128, high_availability="ZoneRedundant",
            network={k: source["properties"]["network"][k] for k in ("delegatedSubnetResourceId",
                                                                      "privateDnsZoneArmResourceId")},
            parameters={"azure.extensions": "CITEXT,PGCRYPTO", "max_connections": "300"},
            extra={"location": "uksouth", "tier": "GeneralPurpose", "geo_redundant_backup": "Enabled",
                   "backup_retention_days": "7", "availability_zone": "1"})
        info = servers.create_server_from_snapshot("apply-again-pg", snapshot, tags={"dr-incident": "INC9"})
        assert info.state == "Ready"
        [put] = arm.server_calls("PUT", "apply-again-pg")
        props = put.body["properties"]
        assert put.body["location"] == "uksouth" and put.body["sku"] == {"name": "Standard_D2ds_v5",
                                                                        "tier": "GeneralPurpose"}
        assert (props["createMode"], props["version"], props["storage"], props["highAvailability"]) == (
            "Create", "16", {"storageSizeGB": 128}, {"mode": "ZoneRedundant"})
        assert props["network"] == snapshot.network and props["availabilityZone"] == "1"
        assert props["backup"] == {"geoRedundantBackup": "Enabled", "backupRetentionDays": 7}
        assert servers.expected_extension_support(snapshot).not_allowed(["citext", "pgcrypto", "btree_gin"]) == \
            ["btree_gin"]
        # the parameters are a step of their own, through the configurations API, with the restart they need
        change = servers.set_server_parameters("apply-again-pg", snapshot.parameters)
        assert self.config_puts(arm, "apply-again-pg") == {
            "azure.extensions": {"properties": {"value": "CITEXT,PGCRYPTO", "source": "user-override"}},
            "max_connections": {"properties": {"value": "300", "source": "user-override"}}}
        assert change.restarted and len(arm.calls("POST", "/apply-again-pg/restart")) == 1


class TestFactory:
    def test_factory_uses_the_arm_url_override(self, arm, tls_cert, monkeypatch, tmp_path):
        from dr.config import parse_config
        from dr.platforms.azure import azure_servers

        monkeypatch.setenv("DR_AZURE_ARM_URL", arm.url)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls_cert[0])
        config = parse_config(f"""
[services.apply.environments.production]
platform = "azure"
subscription_id = "{SUBSCRIPTION}"
resource_group = "{RESOURCE_GROUP}"
admin_user = "pgadmin"
""")
        target = config.target("apply", "production")
        servers = azure_servers(config, target, credential=FakeCredential())
        assert servers.default_template == PRIMARY == target.server
        assert servers.admin_user == "pgadmin"
        assert servers.get_server(target.server).state == "Ready"
        assert servers.state_dir == tmp_path / "dr-state"

    def test_get_platform_builds_azure_backends(self, monkeypatch, azurite):
        import dr.platforms.azure as az
        from dr.config import parse_config
        from dr.platforms import get_platform
        from dr.platforms.azure import AzureBackupStore, AzureServers

        monkeypatch.setenv("DR_AZURE_STORAGE_CONNECTION_STRING", azurite)
        monkeypatch.setattr(az, "_credential", FakeCredential())  # never DefaultAzureCredential in tests
        config = parse_config(f"""
[services.apply.environments.production]
platform = "azure"
subscription_id = "{SUBSCRIPTION}"
resource_group = "{RESOURCE_GROUP}"
""")
        platform = get_platform(config, config.target("apply", "production"))
        assert isinstance(platform.servers, AzureServers) and isinstance(platform.store, AzureBackupStore)
        assert platform.store.container.container_name == "database-backup"

    def test_real_azure_endpoint_is_unreachable_in_tests(self, tmp_path):
        from dr.platforms.azure.servers import AzureServers, build_management_client

        client = build_management_client(FakeCredential(), SUBSCRIPTION, retry_total=0)  # the real ARM URL
        servers = AzureServers(client, SUBSCRIPTION, RESOURCE_GROUP, state_dir=tmp_path)
        with pytest.raises(TransientPlatformError, match="could not reach Azure"):
            servers.get_server(PRIMARY)
        assert "management.azure.com" in BLOCKED
