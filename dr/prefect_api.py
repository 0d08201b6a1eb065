"""Small helpers over Prefect's API that Prefect has no command for.

Two ways in:

- `resume_with_input`: Prefect's own client (`resume_flow_run`), for code that already runs
  inside Prefect (flows, tests with Prefect's settings context).
- `Api`: a few calls of Prefect's REST API (the same ones its UI makes) over httpx, for the
  commands a person runs during an incident (`dr pending`, `dr approve`, `dr watch`). Importing
  Prefect's client costs ~1.2 s of CPU here (its settings, schemas and plugins); these commands
  need four endpoints and must answer in about a second. Authentication follows Prefect's
  client: `PREFECT_API_AUTH_STRING` (basic) first, else `PREFECT_API_KEY` (bearer).
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional
from uuid import UUID

from dr.errors import DrError

#: flow-run state types a person may be waiting on
LIVE_STATES = ("RUNNING", "PAUSED", "CANCELLING")


class PrefectApiError(DrError):
    """The Prefect server refused or failed a request."""


class ResumeRefused(PrefectApiError):
    """The server did not take an answer: the run no longer waits, or the answer does not fit its form."""

    exit_code = 2


def resume_with_input(flow_run_id: UUID, run_input: dict[str, Any], *, wait_seconds: float = 15.0) -> None:
    """Resume a paused run with form input (what the UI's form does).

    Right after a run pauses, Prefect saves the form's schema a moment later; a resume in
    that moment is refused with "schema not found", so retry briefly.
    """
    from prefect.flow_runs import resume_flow_run

    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            resume_flow_run(flow_run_id, run_input=run_input)
            return
        except RuntimeError as exc:
            if "schema not found" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


class Api:
    """Prefect's REST API at `api_url` (`http://host:port/api`), the few calls the incident commands need."""

    def __init__(self, api_url: str, *, timeout: float = 30.0):
        import base64

        import httpx

        headers = {}
        auth = os.environ.get("PREFECT_API_AUTH_STRING")
        key = os.environ.get("PREFECT_API_KEY")
        if auth:
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        elif key:
            headers["Authorization"] = f"Bearer {key}"
        self.api_url = api_url.rstrip("/")
        self.http = httpx.Client(base_url=self.api_url, headers=headers, timeout=timeout)

    def __enter__(self) -> "Api":
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise PrefectApiError(f"the Prefect server at {self.api_url} did not answer ({type(exc).__name__}: {exc})",
                                  world_state="nothing was changed") from exc
        if r.status_code == 404:
            return None
        if r.status_code >= 400:
            raise PrefectApiError(f"the Prefect server refused {method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    # --- reads ---------------------------------------------------------------------------

    def flow_runs(self, *, states: Optional[tuple[str, ...]] = None, names: Optional[list[str]] = None,
                  limit: int = 200) -> list[dict[str, Any]]:
        flt: dict[str, Any] = {}
        if states:
            flt["state"] = {"type": {"any_": list(states)}}
        if names:
            flt["name"] = {"any_": names}
        return self._call("POST", "/flow_runs/filter", json={"flow_runs": flt, "limit": limit,
                                                             "sort": "START_TIME_DESC"}) or []

    def flow_run(self, run_id: str) -> Optional[dict[str, Any]]:
        return self._call("GET", f"/flow_runs/{run_id}")

    def flow_name(self, flow_id: str, _cache: dict[str, str] = {}) -> str:  # noqa: B006 (a per-process cache)
        if flow_id not in _cache:
            _cache[flow_id] = (self._call("GET", f"/flows/{flow_id}") or {}).get("name", "?")
        return _cache[flow_id]

    def run_input(self, run_id: str, key: Optional[str]) -> Any:
        """A run input (a form's schema, description or answer) as stored, decoded from JSON when it is JSON."""
        import json

        if not key:
            return None
        value = self._call("GET", f"/flow_runs/{run_id}/input/{key}")
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        """The run's artifacts (every version of keyed ones), most recently updated first."""
        return self._call("POST", "/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [run_id]}}, "sort": "UPDATED_DESC", "limit": 200}) or []

    # --- the one write -------------------------------------------------------------------

    def resume(self, run_id: str, run_input: dict[str, Any], *, wait_seconds: float = 15.0) -> None:
        """Answer a paused run's form, as the UI does; the server validates the input against the form.

        Raises:
            PrefectApiError: the run is not paused, or the server rejected the input (its reason).
        """
        deadline = time.monotonic() + wait_seconds
        while True:
            r = self._call("POST", f"/flow_runs/{run_id}/resume", json={"run_input": run_input}) or {}
            status = r.get("status")
            if status == "ACCEPT":
                return
            reason = ((r.get("details") or {}).get("reason") or status or "no answer")
            # the schema is saved a moment after the pause: a resume in that moment is refused once
            if "schema not found" in reason.lower() and time.monotonic() < deadline:
                time.sleep(0.3)
                continue
            raise ResumeRefused(f"the Prefect server did not resume flow run {run_id}: {reason}",
                                  world_state="nothing was changed; the run still waits")
