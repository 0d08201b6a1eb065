"""The alert endpoint: a firing alert starts exactly one waiting run; anything doubtful starts nothing."""

from __future__ import annotations

import hashlib
import json
import logging

import warnings

import pytest

with warnings.catch_warnings():  # starlette nags about httpx vs httpx2; httpx is what is installed
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from dr.alerts import LaunchRequest, SlidingWindowLimiter, create_app, deployment_name, incident_for
from dr.config import parse_config

TOKEN = "s3cr3t-alert-token-for-tests"
SERVER_ID = ("/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/s189d01-apply-dv-rg/providers/"
             "Microsoft.DBforPostgreSQL/flexibleServers/s189-apply-dv-pg")

CONFIG = """
prefix = "s189"
[services.apply.environments.development]
platform = "local"

[alerts]
token_env = "DR_TEST_ALERT_TOKEN"
max_body_bytes = {max_body}
rate_limit_per_minute = {rate}

[[alerts.routes]]
match_rule = "apply-dv-server-unavailable"
match_resource = "flexibleservers/s189-apply-dv-pg"
service = "apply"
environment = "development"
scenario = "server-loss"

[[alerts.routes]]
match_resource = "FLEXIBLESERVERS/S189-APPLY-DV-PG"
service = "apply"
environment = "development"
scenario = "data-loss"
"""


def config(max_body: int = 64 * 1024, rate: int = 100):
    return parse_config(CONFIG.format(max_body=max_body, rate=rate), "test-alerts.toml")


def common_alert(alert_id: str = "/subscriptions/x/providers/Microsoft.AlertsManagement/alerts/aaaa-1111",
                 condition: str = "Fired", rule: str = "apply-dv-data-anomaly",
                 targets: list[str] | None = None) -> dict:
    """A payload as an action group webhook sends it with the common alert schema on."""
    return {
        "schemaId": "azureMonitorCommonAlertSchema",
        "data": {
            "essentials": {
                "alertId": alert_id,
                "alertRule": rule,
                "severity": "Sev1",
                "signalType": "Metric",
                "monitorCondition": condition,
                "monitoringService": "Platform",
                "alertTargetIDs": [SERVER_ID.lower()] if targets is None else targets,
                "configurationItems": ["s189-apply-dv-pg"],
                "originAlertId": "origin-1",
                "firedDateTime": "2026-11-26T02:58:24.3713213Z",
                "description": "",
                "essentialsVersion": "1.0",
                "alertContextVersion": "1.0",
            },
            "alertContext": {"properties": None, "conditionType": "SingleResourceMultipleMetricCriteria",
                             "condition": {"windowSize": "PT5M", "allOf": [{"metricName": "PAYLOAD-MARKER"}]}},
            "customProperties": None,
        },
    }


class Recorder:
    """A launcher that records what it was asked to start."""

    def __init__(self):
        self.calls: list[LaunchRequest] = []

    def __call__(self, req: LaunchRequest) -> str:
        self.calls.append(req)
        return f"run-{len(self.calls)}"


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("DR_TEST_ALERT_TOKEN", TOKEN)
    return TOKEN


@pytest.fixture
def launcher():
    return Recorder()


@pytest.fixture
def client(token, launcher):
    return TestClient(create_app(config(), launcher))


def post(client: TestClient, payload, *, token: str | None = TOKEN, via: str = "header", **kw):
    headers = dict(kw.pop("headers", {}))
    params = {}
    if token is not None and via == "header":
        headers["Authorization"] = f"Bearer {token}"
    elif token is not None:
        params["token"] = token
    if "content" not in kw:
        kw["content"] = json.dumps(payload).encode()
        headers.setdefault("Content-Type", "application/json")
    return client.post("/alerts", headers=headers, params=params, **kw)


class TestFiringAlert:
    def test_starts_one_waiting_run_of_the_routed_scenario(self, client, launcher):
        r = post(client, common_alert())
        assert r.status_code == 202, r.text
        assert len(launcher.calls) == 1
        req = launcher.calls[0]
        assert (req.scenario, req.service, req.environment) == ("data-loss", "apply", "development")
        alert_id = "/subscriptions/x/providers/Microsoft.AlertsManagement/alerts/aaaa-1111"
        assert req.alert_id == alert_id
        incident = "alert-" + hashlib.sha256(alert_id.encode()).hexdigest()[:12]
        assert req.parameters == {"service": "apply", "environment": "development",
                                  "wait_for_go_ahead": True, "incident": incident}
        body = r.json()
        assert body["status"] == "started" and body["flow_run_id"] == "run-1" and body["incident"] == incident

    def test_the_same_alert_again_is_a_duplicate_and_starts_nothing(self, client, launcher):
        first = post(client, common_alert())
        again = post(client, common_alert())
        assert first.status_code == 202
        assert again.status_code == 200
        assert again.json()["status"] == "duplicate"
        assert again.json()["flow_run_id"] == first.json()["flow_run_id"]
        assert len(launcher.calls) == 1

    def test_another_alert_starts_another_run(self, client, launcher):
        post(client, common_alert(alert_id="a-1"))
        post(client, common_alert(alert_id="a-2"))
        assert [c.alert_id for c in launcher.calls] == ["a-1", "a-2"]
        assert launcher.calls[0].parameters["incident"] != launcher.calls[1].parameters["incident"]

    def test_first_matching_route_wins_and_needs_every_matcher(self, client, launcher):
        post(client, common_alert(alert_id="down-1", rule="apply-dv-server-unavailable"))
        # the rule alone, on another resource, does not match the first route
        post(client, common_alert(alert_id="down-2", rule="apply-dv-server-unavailable",
                                  targets=["/subscriptions/x/other-pg", SERVER_ID]))
        assert [c.scenario for c in launcher.calls] == ["server-loss", "server-loss"]
        r = post(client, common_alert(alert_id="down-3", rule="apply-dv-server-unavailable",
                                      targets=["/subscriptions/x/flexibleServers/s189-find-dv-pg"]))
        assert r.status_code == 422
        assert len(launcher.calls) == 2

    def test_token_in_the_query_string_as_action_groups_send_it(self, client, launcher):
        r = post(client, common_alert(), via="query")
        assert r.status_code == 202
        assert len(launcher.calls) == 1

    def test_generic_json(self, client, launcher):
        r = post(client, {"alert_id": "g-1", "resource_id": SERVER_ID, "rule": "custom", "status": "firing"})
        assert r.status_code == 202
        assert launcher.calls[0].scenario == "data-loss"
        assert launcher.calls[0].parameters["wait_for_go_ahead"] is True

    def test_launcher_failure_is_a_503_and_a_retry_can_start_it(self, token):
        calls = []

        def flaky(req: LaunchRequest) -> str:
            calls.append(req)
            if len(calls) == 1:
                raise ConnectionError("Prefect API unreachable")
            return "run-ok"

        client = TestClient(create_app(config(), flaky))
        first = post(client, common_alert())
        assert first.status_code == 503 and "unreachable" in first.json()["error"]
        retry = post(client, common_alert())
        assert retry.status_code == 202 and retry.json()["flow_run_id"] == "run-ok"

    def test_log_has_the_decision_but_not_the_token_or_payload(self, client, caplog):
        with caplog.at_level(logging.DEBUG, logger="dr.alerts"):
            post(client, common_alert(alert_id="log-1"))
            post(client, common_alert(alert_id="log-2"), via="query")
        assert "log-1" in caplog.text and "data-loss" in caplog.text and "apply-dv-data-anomaly" in caplog.text
        assert TOKEN not in caplog.text
        assert "PAYLOAD-MARKER" not in caplog.text


class TestNothingStarted:
    def test_wrong_token(self, client, launcher):
        r = post(client, common_alert(), token="not-the-token")
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert launcher.calls == []

    def test_wrong_token_in_query(self, client, launcher):
        assert post(client, common_alert(), token="nope", via="query").status_code == 401
        assert launcher.calls == []

    def test_missing_token(self, client, launcher):
        assert post(client, common_alert(), token=None).status_code == 401
        assert post(client, common_alert(), token=None, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert launcher.calls == []

    def test_no_token_configured_refuses_everything(self, monkeypatch, launcher):
        monkeypatch.delenv("DR_TEST_ALERT_TOKEN", raising=False)
        client = TestClient(create_app(config(), launcher))
        r = post(client, common_alert())
        assert r.status_code == 503
        assert "DR_TEST_ALERT_TOKEN" in r.json()["error"]
        # not even an empty token gets in
        monkeypatch.setenv("DR_TEST_ALERT_TOKEN", "")
        assert post(client, common_alert(), token="").status_code == 503
        assert launcher.calls == []

    def test_malformed_json(self, client, launcher):
        r = post(client, None, content=b'{"schemaId": "azureMonitorCommonAlertSchema", "data": {')
        assert r.status_code == 400
        assert "not valid JSON" in r.json()["error"]
        assert launcher.calls == []

    @pytest.mark.parametrize("mutate, words", [
        (lambda p: p["data"].pop("essentials"), "data.essentials is missing"),
        (lambda p: p["data"]["essentials"].pop("alertId"), "alertId"),
        (lambda p: p["data"]["essentials"].pop("alertTargetIDs"), "alertTargetIDs"),
        (lambda p: p["data"]["essentials"].update(monitorCondition="Maybe"), "'Fired' or 'Resolved'"),
        (lambda p: p.update(schemaId="Microsoft.Insights/activityLogs"), "common alert schema"),
    ])
    def test_missing_or_wrong_essentials(self, client, launcher, mutate, words):
        payload = common_alert()
        mutate(payload)
        r = post(client, payload)
        assert r.status_code == 400
        assert words in r.json()["error"]
        assert launcher.calls == []

    @pytest.mark.parametrize("payload", [[1, 2], {"alert_id": "g"}, {"alert_id": "g", "status": "firing"},
                                         {"alert_id": "g", "status": "on", "rule": "r"}])
    def test_bad_generic_json(self, client, launcher, payload):
        assert post(client, payload).status_code == 400
        assert launcher.calls == []

    def test_unknown_resource(self, client, launcher):
        r = post(client, common_alert(targets=["/subscriptions/x/flexibleServers/s189-find-pd-pg"]))
        assert r.status_code == 422
        assert "no route" in r.json()["error"]
        assert launcher.calls == []

    def test_resolved_is_recorded_only(self, client, launcher):
        r = post(client, common_alert(condition="Resolved"))
        assert r.status_code == 200
        assert r.json()["status"] == "recorded" and r.json()["action"] == "none"
        assert post(client, {"alert_id": "g-2", "resource_id": SERVER_ID, "status": "resolved"}).status_code == 200
        assert launcher.calls == []

    def test_body_too_large_by_content_length(self, token, launcher):
        client = TestClient(create_app(config(max_body=1024), launcher))
        payload = common_alert()
        payload["data"]["alertContext"]["padding"] = "x" * 2000
        r = post(client, payload)
        assert r.status_code == 413
        assert launcher.calls == []

    def test_too_large_content_length_is_refused_before_reading(self, token, launcher):
        import asyncio

        app = create_app(config(max_body=1024), launcher)
        reads, sent = [], []

        async def receive():
            reads.append(1)
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/alerts", "raw_path": b"/alerts", "root_path": "",
                 "query_string": f"token={TOKEN}".encode(), "client": ("10.0.0.1", 1), "server": ("x", 80),
                 "headers": [(b"content-length", b"1000000000"), (b"content-type", b"application/json")]}
        asyncio.run(app(scope, receive, send))
        assert sent[0]["status"] == 413
        assert reads == []  # refused on the header alone
        assert launcher.calls == []

    def test_body_too_large_without_content_length(self, token, launcher):
        client = TestClient(create_app(config(max_body=1024), launcher))
        raw = json.dumps({**common_alert(), "padding": "x" * 2000}).encode()

        def chunks():  # streamed: no Content-Length, so only the bytes read can tell
            for i in range(0, len(raw), 256):
                yield raw[i:i + 256]

        r = post(client, None, content=chunks())
        assert r.status_code == 413
        assert launcher.calls == []
        # the same streaming of a small body is fine
        small = json.dumps(common_alert()).encode()
        assert post(client, None, content=iter([small[:100], small[100:]])).status_code == 202

    def test_rate_limit(self, token, launcher):
        client = TestClient(create_app(config(rate=3), launcher))
        codes = [post(client, common_alert(alert_id=f"r-{i}")).status_code for i in range(4)]
        assert codes == [202, 202, 202, 429]
        last = post(client, common_alert(alert_id="r-9"))
        assert last.status_code == 429
        assert 1 <= int(last.headers["Retry-After"]) <= 60
        assert len(launcher.calls) == 3
        # another client is not limited by this one's requests
        other = TestClient(client.app, client=("10.0.0.7", 40000))
        assert post(other, common_alert(alert_id="r-other")).status_code == 202

    def test_wrong_method(self, client):
        assert client.get("/alerts").status_code == 405


class TestSlidingWindow:
    def test_window_slides(self):
        now = [1000.0]
        limiter = SlidingWindowLimiter(2, window=60, clock=lambda: now[0])
        assert limiter.hit("a") is None
        now[0] += 30
        assert limiter.hit("a") is None
        assert limiter.hit("a") == pytest.approx(30)  # the first hit leaves the window in 30 s
        now[0] += 30.5
        assert limiter.hit("a") is None  # the first hit has left the window
        assert limiter.hit("a") == pytest.approx(29.5)
        assert limiter.hit("b") is None


def test_incident_id_is_stable_and_valid():
    from dr.incident import check_incident_id

    assert incident_for("x") == incident_for("x") != incident_for("y")
    assert check_incident_id(incident_for("/subscriptions/x/alerts/" + "a" * 500))
    assert deployment_name("data-loss", "apply", "development") == "data-loss/apply-development"


class TestWithPrefect:
    """The real launcher against a real Prefect server: one run per alert, even across restarts."""

    def test_same_alert_twice_makes_one_scheduled_run(self, prefect_server, token):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        with get_client(sync_client=True) as c:
            flow_id = c.create_flow_from_name("data-loss")
            deployment_id = c.create_deployment(flow_id=flow_id, name="apply-development")

        alert = common_alert(alert_id="/subscriptions/x/providers/Microsoft.AlertsManagement/alerts/real-1")
        client = TestClient(create_app(config()))  # the default, Prefect launcher
        first = post(client, alert)
        again = post(client, alert)
        assert first.status_code == 202, first.text
        assert again.status_code == 200 and again.json()["status"] == "duplicate"

        # a restarted endpoint has forgotten the alert: Prefect's idempotency key still holds
        restarted = TestClient(create_app(config()))
        third = post(restarted, alert)
        assert third.status_code == 202
        assert third.json()["flow_run_id"] == first.json()["flow_run_id"]

        with get_client(sync_client=True) as c:
            runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        assert len(runs) == 1
        run = runs[0]
        assert str(run.id) == first.json()["flow_run_id"]
        assert run.state is not None and run.state.is_scheduled()
        assert run.parameters["wait_for_go_ahead"] is True
        assert run.parameters["incident"] == first.json()["incident"]
        assert (run.parameters["service"], run.parameters["environment"]) == ("apply", "development")

    def test_missing_deployment_is_a_clear_503(self, prefect_server, token):
        client = TestClient(create_app(config()))
        r = post(client, common_alert(alert_id="no-deployment-1", rule="apply-dv-server-unavailable"))
        assert r.status_code == 503
        assert "no Prefect deployment 'server-loss/apply-development'" in r.json()["error"]
