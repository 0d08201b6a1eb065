"""The approval gate answered the way a person does it: in the Prefect UI, in a real browser.

A data-loss run on the local platform (restore time given, no auto-approve) pauses at
"restore into the live database"; Chromium opens the run's page (the link the flow posts),
clicks Resume, fills the generated `Approval` form, ticks approve and submits. The run
restores, pauses again at "disable maintenance" (answered in the UI too) and ends Completed,
with the typed approver in its recorded decisions.

Why a server of its own: the session's `prefect_test_harness` server is started as an
*ephemeral* server (`PREFECT__SERVER_EPHEMERAL=1`, `PREFECT_UI_ENABLED=0`), which never mounts
the UI. So this test starts `prefect server start --no-services` with the UI on, in a temp
PREFECT_HOME, and runs the flow in a subprocess pointed at it (PREFECT_API_URL in its
environment: no settings context or client singleton shared with the harness).

Needs Debian's `chromium` (/usr/bin/chromium, or DR_CHROMIUM) and the `playwright` Python
package, never `playwright install`. Skipped when either is missing, except with CI=true
where that is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import utc_now, wait_a_second
from tests.processes import (
    DATA_LOSS_RUNNER as RUNNER,
    GATE_MAINTENANCE,
    GATE_RESTORE,
    PrefectServer,
    env_without_prefect,
    stop_group,
)

pytestmark = pytest.mark.ui

CHROMIUM = os.environ.get("DR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT_COPY = Path("/tmp/ui-approval.png")
REPO = Path(__file__).resolve().parents[1]
UI_TIMEOUT_MS = 60_000  # the shared 2-core machine: first page load alone can take 10 s




def _missing_tools() -> str | None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"{CHROMIUM} not found (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright Python package is not installed (pip install playwright)"
    return None


@pytest.fixture
def ui_tools():
    """Skip without a browser locally; in CI (CI=true) a missing browser is a failure."""
    why = _missing_tools()
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"UI test cannot run: {why} (CI=true: the browser test is required)", pytrace=False)
        pytest.skip(f"UI test skipped: {why}")


class UiServer(PrefectServer):
    """A Prefect server with its UI (the v1 UI, whose CSS the test's selectors know)."""

    def __init__(self, root: Path):
        super().__init__(root, ui=True)
        self.start()

    def wait_ready(self, timeout: float = 240) -> None:  # type: ignore[override]
        def v1_ui() -> bool:
            settings = httpx.get(f"{self.url}/ui-settings", timeout=5).json()
            assert "v1" in settings["available_uis"], settings
            return True

        super().wait_ready(timeout, also=v1_ui)

    def flow_run(self, run_id: str) -> dict:
        r = httpx.get(f"{self.api}/flow_runs/{run_id}", timeout=10)
        r.raise_for_status()
        return r.json()


@pytest.fixture
def ui_server(ui_tools, tmp_path):
    """A Prefect server with the UI, started now (it boots while the local platform comes up)."""
    server = UiServer(tmp_path)
    yield server
    server.stop()


def _wait_for_gate(server: UiServer, flow: subprocess.Popen, pause_key: str, timeout: float = 240) -> str:
    """The data-loss run's id once it is paused at `pause_key` with its form's schema saved."""
    deadline = time.monotonic() + timeout
    seen = "no run yet"
    while time.monotonic() < deadline:
        if flow.poll() is not None:
            pytest.fail(f"the flow process ended ({flow.returncode}) before pausing at {pause_key}; last state: {seen}")
        runs = httpx.post(f"{server.api}/flow_runs/filter", timeout=10,
                          json={"flows": {"name": {"any_": ["data-loss"]}}}).json()
        if runs:
            run = runs[0]
            state = run["state"] or {}
            details = state.get("state_details") or {}
            seen = f"{state.get('type')} {details.get('pause_key')}"
            keyset = details.get("run_input_keyset") or {}
            paused_here = state.get("type") == "PAUSED" and details.get("pause_key") == pause_key
            # the form's schema is saved a moment after the pause; the UI's form needs it
            if paused_here and keyset.get("schema") and httpx.get(
                    f"{server.api}/flow_runs/{run['id']}/input/{keyset['schema']}", timeout=10).status_code == 200:
                return run["id"]
        time.sleep(0.5)
    pytest.fail(f"the run did not pause at {pause_key} within {timeout} s; last state: {seen}")


def _answer_in_ui(page, url: str, *, approver: str, reason: str, screenshot: Path) -> None:
    """Open the run's page, click Resume, fill the Approval form, approve and submit."""
    from playwright.sync_api import expect

    page.goto(url)
    page.get_by_role("button", name="Resume", exact=True).click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text("Resume Flow Run")).to_be_visible(timeout=UI_TIMEOUT_MS)

    def field(title: str):
        # the form is generated from the RunInput's JSON schema: one `.schema-form-property` per field,
        # labelled with the field's title ("Approver", "Reason (Optional)"); the <label for> ids do
        # not point at the inputs, so get_by_label does not work here
        label = page.locator(".schema-form-property__label", has_text=re.compile(rf"^{title}( \(Optional\))?$"))
        prop = dialog.locator(".schema-form-property").filter(has=label)
        expect(prop).to_have_count(1, timeout=UI_TIMEOUT_MS)
        return prop

    field("Approver").locator("textarea").fill(approver)
    field("Reason").locator("textarea").fill(reason)
    switch = field("Approve").get_by_role("switch")
    expect(switch).to_have_attribute("aria-checked", "false")
    switch.click()
    expect(switch).to_have_attribute("aria-checked", "true")
    page.screenshot(path=str(screenshot))
    with page.expect_response(lambda r: r.url.endswith("/resume") and r.request.method == "POST") as resp:
        dialog.get_by_role("button", name="Submit", exact=True).click()
    assert resp.value.ok, f"resume refused: {resp.value.status} {resp.value.text()}"
    sent = resp.value.request.post_data_json["run_input"]
    assert sent["approve"] is True and sent["approver"] == approver and sent["reason"] == reason, sent
    expect(dialog).to_be_hidden(timeout=UI_TIMEOUT_MS)


def test_approval_in_the_prefect_ui_lets_a_paused_data_loss_run_complete(ui_server, live_env, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    # rows before the restore time T, damage after it
    live_env.query("CREATE TABLE markers (id int PRIMARY KEY, note text)")
    live_env.query("INSERT INTO markers SELECT g, 'good ' || g FROM generate_series(1, 20) g")
    wait_a_second()
    restore_utc = utc_now().replace(microsecond=0)
    wait_a_second()
    live_env.query("DELETE FROM markers WHERE id <= 10")

    ui_server.wait_ready()
    timings["server + platform ready"] = time.monotonic() - t0

    out = tmp_path / "flow-result.json"
    flow_log = tmp_path / "flow.log"
    kw = {**live_env.kw(), "restore_time": restore_utc.strftime("%Y-%m-%d %H:%M:%SZ"), "incident": "inc-ui",
          "approval_timeout_minutes": 10}
    env = env_without_prefect(
        PREFECT_HOME=str(tmp_path / "client-home"), PREFECT_API_URL=ui_server.api, PREFECT_UI_URL=ui_server.url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false", DR_PAUSE_POLL_SECONDS="1")
    with open(flow_log, "wb") as log:
        flow = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(kw), str(out)], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    approver, shots = "Grace Hopper", []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.set_default_timeout(UI_TIMEOUT_MS)
                for gate, reason in [(GATE_RESTORE, "row counts checked in the UI"), (GATE_MAINTENANCE, "app checked")]:
                    t = time.monotonic()
                    run_id = _wait_for_gate(ui_server, flow, gate)
                    timings[f"flow reached {gate}"] = time.monotonic() - t
                    t = time.monotonic()
                    shots.append(tmp_path / f"approval-form-{gate}.png")
                    # the link the flow itself posts (tasks.notifications.flow_run_link)
                    try:
                        _answer_in_ui(page, f"{ui_server.url}/runs/flow-run/{run_id}", approver=approver,
                                      reason=reason, screenshot=shots[-1])
                    except Exception:
                        page.screenshot(path=str(tmp_path / f"failed-at-{gate}.png"))
                        raise
                    timings[f"answered {gate} in the UI"] = time.monotonic() - t
                    if gate == GATE_RESTORE:
                        shutil.copyfile(shots[-1], SCREENSHOT_COPY)
                t = time.monotonic()
                flow.wait(300)
                timings["flow finished after the last answer"] = time.monotonic() - t
                page.reload()
                expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
            finally:
                browser.close()
    finally:
        stop_group(flow)
    log_tail = flow_log.read_text(errors="replace")[-4000:]

    assert out.exists(), f"the flow process wrote no result:\n{log_tail}"
    res = json.loads(out.read_text())
    assert res["ok"], f"{res.get('error')}\n{log_tail}"
    state = ui_server.flow_run(run_id)["state"]
    assert state["type"] == "COMPLETED", state
    decisions = res["result"]["decisions"]
    assert any(d.startswith("restore into the live database: approved by Grace Hopper")
               and "row counts checked in the UI" in d for d in decisions), decisions
    assert any(d.startswith("disable maintenance: approved by Grace Hopper") for d in decisions), decisions
    # the approval let the restore happen: the rows before T are back
    assert live_env.query("SELECT id FROM markers ORDER BY id") == [(i,) for i in range(1, 21)]
    assert all(p.stat().st_size > 10_000 for p in shots)
    timings["total"] = time.monotonic() - t0
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
