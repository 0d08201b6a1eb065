"""The alert endpoint: an Azure Monitor alert starts a recovery run that waits for a person.

`POST /alerts` takes Azure Monitor's common alert schema (what an action group's webhook
sends once "common alert schema" is turned on) or a minimal generic JSON::

    {"alert_id": "...", "resource_id": "...", "rule": "...", "status": "firing" | "resolved"}

and, for a firing alert that a configured route matches, creates a run of the route's
scenario flow with ``wait_for_go_ahead=True``: the run pauses before it touches anything,
and on-call is told where to find it. Nothing is ever changed by an alert alone.

Each request goes through, in order:

1. a per-client-IP rate limit (429 with Retry-After);
2. the shared token, from the environment variable `alerts.token_env`, as
   ``Authorization: Bearer <token>`` or ``?token=<token>`` (action group webhooks can only
   put it in the URL). Without the variable the endpoint refuses everything (503);
   without the right token, 401;
3. the body size limit, on Content-Length and on the bytes actually read (413);
4. parsing (400) and routing (422: no route matches, nothing started);
5. "Resolved" is recorded and starts nothing; "Fired" launches once per alert id, by
   Prefect's idempotency key and by an in-memory record, so a repeat says "duplicate".

The token and the payload are never logged (the uvicorn access log is off in `serve`,
because the URL carries the token); the log says the alert id, rule, target and decision.
Behind a reverse proxy, the rate limit sees the proxy's address unless uvicorn is told
to trust its forwarded headers (`forwarded_allow_ips`).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dr.config import AlertRoute, DrConfig
from dr.errors import ConfigError, InvalidInput

log = logging.getLogger("dr.alerts")

COMMON_SCHEMA_ID = "azureMonitorCommonAlertSchema"
MAX_ALERT_ID_LENGTH = 1024
#: How many launched alert ids are remembered for the "duplicate" answer (the idempotency key covers the rest).
REMEMBERED_ALERTS = 10_000


class NoRouteForAlert(InvalidInput):
    """No configured route matches the alert, so no scenario can be chosen for it."""

    def __init__(self, message: str, *, alert_id: str):
        super().__init__(message)
        self.alert_id = alert_id


class _BodyTooLarge(Exception):
    pass


# --- the alert, parsed ------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """What the endpoint needs from an alert, whichever schema it came in."""

    alert_id: str
    rule: str | None
    targets: tuple[str, ...]
    firing: bool
    schema: str  # "azure-common" or "generic"
    severity: str | None = None
    signal_type: str | None = None
    fired_at: str | None = None

    @property
    def target(self) -> str:
        """The first target, for the log."""
        return self.targets[0] if self.targets else "-"


@dataclass(frozen=True)
class LaunchRequest:
    """A recovery run to create for a firing alert."""

    alert_id: str
    scenario: str
    service: str
    environment: str
    parameters: dict[str, Any] = field(default_factory=dict)


def _text(obj: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{where}{key} is missing or not a non-empty string")
    return value


def parse_alert(payload: Any) -> Alert:
    """Read an alert from a decoded JSON body (common alert schema or the generic form).

    Args:
        payload: the decoded JSON body.

    Returns:
        The alert.

    Raises:
        InvalidInput: the body is not one of the two accepted forms; the message names the field.
    """
    if not isinstance(payload, dict):
        raise InvalidInput("the body must be a JSON object")
    if "schemaId" in payload:
        if payload["schemaId"] != COMMON_SCHEMA_ID:
            raise InvalidInput(f"unsupported schemaId {str(payload['schemaId'])[:80]!r}: turn on "
                               f"'Enable the common alert schema' for this webhook in the action group")
        data = payload.get("data")
        essentials = data.get("essentials") if isinstance(data, dict) else None
        if not isinstance(essentials, dict):
            raise InvalidInput("data.essentials is missing: not a common alert schema payload")
        where = "data.essentials."
        alert_id = _text(essentials, "alertId", where)
        rule = _text(essentials, "alertRule", where)
        condition = _text(essentials, "monitorCondition", where)
        if condition not in ("Fired", "Resolved"):
            raise InvalidInput("data.essentials.monitorCondition must be 'Fired' or 'Resolved', "
                               f"not {condition[:40]!r}")
        targets = essentials.get("alertTargetIDs")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise InvalidInput("data.essentials.alertTargetIDs is missing or not a list of resource ids")
        alert = Alert(alert_id=alert_id, rule=rule, targets=tuple(targets), firing=condition == "Fired",
                      schema="azure-common", severity=_opt(essentials, "severity"),
                      signal_type=_opt(essentials, "signalType"), fired_at=_opt(essentials, "firedDateTime"))
    else:
        alert_id = _text(payload, "alert_id", "")
        status = _text(payload, "status", "")
        if status not in ("firing", "resolved"):
            raise InvalidInput(f"status must be 'firing' or 'resolved', not {status[:40]!r}")
        resource = _text(payload, "resource_id", "", required=False)
        rule = _text(payload, "rule", "", required=False)
        if not (resource or rule):
            raise InvalidInput("resource_id or rule is needed to route the alert; neither was given "
                               "(or send the Azure Monitor common alert schema)")
        alert = Alert(alert_id=alert_id, rule=rule, targets=(resource,) if resource else (),
                      firing=status == "firing", schema="generic")
    if len(alert.alert_id) > MAX_ALERT_ID_LENGTH:
        raise InvalidInput(f"the alert id is longer than {MAX_ALERT_ID_LENGTH} characters")
    return alert


def _opt(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def match_route(routes: list[AlertRoute], alert: Alert) -> AlertRoute | None:
    """The first route whose every given matcher matches the alert, or None.

    `match_resource` is a case-insensitive substring of any of the alert's targets;
    `match_rule` equals the alert rule's name.
    """
    for route in routes:
        if route.match_resource:
            needle = route.match_resource.lower()
            if not any(needle in t.lower() for t in alert.targets):
                continue
        if route.match_rule and route.match_rule != alert.rule:
            continue
        return route
    return None


def incident_for(alert_id: str) -> str:
    """The incident id a run started by this alert uses: stable, so a re-run resumes it."""
    return "alert-" + hashlib.sha256(alert_id.encode("utf-8")).hexdigest()[:12]


def launch_request(alert: Alert, route: AlertRoute) -> LaunchRequest:
    """The run to create for a firing alert on a route; it always waits for a person's go-ahead."""
    return LaunchRequest(
        alert_id=alert.alert_id,
        scenario=route.scenario,
        service=route.service,
        environment=route.environment,
        parameters={"service": route.service, "environment": route.environment, "wait_for_go_ahead": True,
                    "incident": incident_for(alert.alert_id)},
    )


# --- launching -----------------------------------------------------------------------------


def deployment_name(scenario: str, service: str, environment: str) -> str:
    """The Prefect deployment of a scenario for one service environment: `<flow name>/<service>-<environment>`."""
    return f"{scenario}/{service}-{environment}"


def _run_link(flow_run_id: Any) -> str | None:
    try:
        from prefect.settings import PREFECT_UI_URL

        base = PREFECT_UI_URL.value()
    except Exception:
        return None
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}" if base else None


def prefect_launcher(config: DrConfig) -> Callable[[LaunchRequest], str]:
    """The launcher that creates the run on the Prefect API and tells on-call where it is.

    Args:
        config: the configuration (for the notification channels).

    Returns:
        A launcher: creates a run of the request's deployment with the alert as idempotency
        key (Prefect hands back the existing run for a repeat) without waiting for it, sends
        the notification, and returns the flow run id.
    """
    from dr import notify

    def launch(req: LaunchRequest) -> str:
        from prefect.deployments import run_deployment
        from prefect.exceptions import ObjectNotFound

        name = deployment_name(req.scenario, req.service, req.environment)
        try:
            run = run_deployment(name=name, parameters=req.parameters, idempotency_key=f"alert-{req.alert_id}",
                                 timeout=0)
        except ObjectNotFound as exc:
            raise ConfigError(f"there is no Prefect deployment '{name}': deploy the {req.scenario} flow as "
                              f"'{req.service}-{req.environment}' so alerts can start it",
                              field="alerts.routes") from exc
        link = _run_link(run.id)
        try:
            notify.send(config, f"[{req.service} {req.environment}] alert: {req.scenario} run waiting for a go-ahead",
                        f"An alert started a {req.scenario} run (incident {req.parameters['incident']}, flow run "
                        f"{run.id}). It has changed nothing and waits for a person to look and resume it.", link)
        except Exception as exc:  # a notification never stops the run being created
            log.warning("could not notify on-call about flow run %s: %s", run.id, type(exc).__name__)
        return str(run.id)

    return launch


class _Launches:
    """Launches each alert id once; remembers the run ids of the last `REMEMBERED_ALERTS` alerts."""

    def __init__(self, launcher: Callable[[LaunchRequest], str]):
        self._launcher = launcher
        self._runs: collections.OrderedDict[str, str] = collections.OrderedDict()
        # held across the launch so a repeat arriving meanwhile waits and then sees the run; alerts are rare
        self._lock = threading.Lock()

    def launch(self, req: LaunchRequest) -> tuple[str, bool]:
        """Returns (flow run id, whether the alert had already been launched)."""
        with self._lock:
            if req.alert_id in self._runs:
                self._runs.move_to_end(req.alert_id)
                return self._runs[req.alert_id], True
            run_id = self._launcher(req)
            self._runs[req.alert_id] = run_id
            while len(self._runs) > REMEMBERED_ALERTS:
                self._runs.popitem(last=False)
            return run_id, False


# --- rate limit and token ------------------------------------------------------------------


class SlidingWindowLimiter:
    """At most `limit` requests per `window` seconds per key (the client IP), in memory."""

    def __init__(self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self._hits: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> float | None:
        """Count a request; returns None when allowed, else the seconds until one would be."""
        now = self.clock()
        with self._lock:
            if len(self._hits) > 10_000:  # forget idle clients
                self._hits = {k: q for k, q in self._hits.items() if q and q[-1] > now - self.window}
            hits = self._hits.setdefault(key, collections.deque())
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                return max(hits[0] + self.window - now, 0.0)
            hits.append(now)
            return None


def _token_ok(request: Request, expected: str) -> bool:
    want = expected.encode("utf-8")
    given: list[str] = []
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        given.append(value.strip())
    if "token" in request.query_params:
        given.append(request.query_params["token"])
    # compare every candidate, so the time taken does not say which one was tried
    return any([hmac.compare_digest(g.encode("utf-8"), want) for g in given])


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _BodyTooLarge
        except ValueError:
            raise InvalidInput("the Content-Length header is not a number") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# --- the app -------------------------------------------------------------------------------


def create_app(config: DrConfig, launcher: Callable[[LaunchRequest], str] | None = None) -> Starlette:
    """Build the alert endpoint.

    Args:
        config: the configuration; `config.alerts` gives the token variable, limits and routes.
        launcher: creates the recovery run for a firing alert and returns its flow run id;
            default `prefect_launcher(config)`. It is called at most once per alert id.

    Returns:
        The Starlette app, serving `POST /alerts`.
    """
    settings = config.alerts
    limiter = SlidingWindowLimiter(settings.rate_limit_per_minute)
    launches = _Launches(launcher or prefect_launcher(config))

    async def receive_alert(request: Request) -> JSONResponse:
        client = request.client.host if request.client else "unknown"
        # 1. rate limit, before anything else (it also slows down token guessing)
        retry_after = limiter.hit(client)
        if retry_after is not None:
            log.warning("alert refused: more than %d requests a minute from %s", settings.rate_limit_per_minute, client)
            return _error(429, f"too many requests: at most {settings.rate_limit_per_minute} a minute",
                          {"Retry-After": str(max(1, math.ceil(retry_after)))})
        # 2. the token; never run open
        expected = os.environ.get(settings.token_env)
        if not expected:
            log.error("alert refused: the environment variable %s holding the alert token is not set",
                      settings.token_env)
            return _error(503, f"the alert endpoint has no token configured: set the environment variable "
                               f"{settings.token_env}; every alert is refused until then")
        if not _token_ok(request, expected):
            log.warning("alert refused: missing or wrong token from %s", client)
            return _error(401, "missing or wrong token: send 'Authorization: Bearer <token>' or '?token=<token>'",
                          {"WWW-Authenticate": "Bearer"})
        # 3. the body, within its limit
        try:
            body = await _read_body(request, settings.max_body_bytes)
        except _BodyTooLarge:
            log.warning("alert refused: body larger than %d bytes from %s", settings.max_body_bytes, client)
            return _error(413, f"the body is larger than {settings.max_body_bytes} bytes")
        except InvalidInput as exc:
            return _error(400, exc.message)
        # 4. what the alert is, and where it goes
        try:
            payload = json.loads(body)
        except ValueError as exc:
            log.warning("alert refused: body is not JSON (from %s)", client)
            return _error(400, f"the body is not valid JSON: {exc}")
        try:
            alert = parse_alert(payload)
        except InvalidInput as exc:
            log.warning("alert refused: %s (from %s)", exc.message, client)
            return _error(400, exc.message)
        route = match_route(settings.routes, alert)
        where = f"{route.scenario} for {route.service} {route.environment}" if route else "no route"
        if not alert.firing:
            log.info("alert %s (rule %s, target %s) resolved: recorded, nothing started (%s)",
                     alert.alert_id, alert.rule, alert.target, where)
            return JSONResponse({"status": "recorded", "action": "none", "alert_id": alert.alert_id})
        if route is None:
            error = NoRouteForAlert(
                f"no route in alerts.routes matches rule {alert.rule!r} with targets {list(alert.targets[:3])}"
                f"{' (and more)' if len(alert.targets) > 3 else ''}: "
                "nothing was started; add a route to the configuration", alert_id=alert.alert_id)
            log.warning("alert %s (rule %s, target %s) fired: %s", alert.alert_id, alert.rule, alert.target,
                        error.message)
            return _error(422, error.message)
        # 5. start the run (once per alert id)
        req = launch_request(alert, route)
        try:
            run_id, duplicate = await run_in_threadpool(launches.launch, req)
        except Exception as exc:
            log.error("alert %s (rule %s, target %s) fired: could not start %s: %s", alert.alert_id, alert.rule,
                      alert.target, where, exc)
            return _error(503, f"could not start the {route.scenario} run: {exc}")
        log.info("alert %s (rule %s, target %s) fired: %s run %s for %s, waiting for a go-ahead", alert.alert_id,
                 alert.rule, alert.target, "already started" if duplicate else "started", run_id, where)
        return JSONResponse(
            {"status": "duplicate" if duplicate else "started", "flow_run_id": run_id, "alert_id": alert.alert_id,
             "scenario": req.scenario, "service": req.service, "environment": req.environment,
             "incident": req.parameters["incident"], "wait_for_go_ahead": True},
            status_code=200 if duplicate else 202,
        )

    return Starlette(routes=[Route("/alerts", receive_alert, methods=["POST"])])


def serve(config: DrConfig, host: str = "127.0.0.1", port: int = 8787) -> None:
    """Run the alert endpoint with uvicorn until interrupted.

    Args:
        config: the configuration.
        host: the address to listen on; put TLS in front of it (a reverse proxy or ingress).
        port: the port to listen on.
    """
    import uvicorn

    if not os.environ.get(config.alerts.token_env):
        log.error("the environment variable %s is not set: the endpoint will refuse every alert",
                  config.alerts.token_env)
    # no access log: the request line carries the token when it is sent as ?token=
    uvicorn.run(create_app(config), host=host, port=port, access_log=False, server_header=False, log_level="info")
