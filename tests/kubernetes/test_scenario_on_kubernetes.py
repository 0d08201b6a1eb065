"""The data-loss scenario with the app on Kubernetes (fake API, real client) and real local databases."""

from __future__ import annotations

import time
from zoneinfo import ZoneInfo

import pytest

from conftest import MAINT, NS, WEB, WORKER
from dr.config import load_config
from dr.platforms import get_platform
from dr.platforms.local import lifecycle
from dr.runtime import clear_cache

pytestmark = pytest.mark.usefixtures("prefect_server")

CONFIG = """
prefix = "t"
[local]
state_dir = "{state}"
fsync = false
wal_segment_mb = 1
[services.apply.environments.test]
platform = "local"
app = "kubernetes"
namespace = "{ns}"
web_deployment = "{web}"
worker_deployment = "{worker}"
{health}
checks = [ {{ kind = "healthcheck" }}, {{ kind = "row_count", table = "candidates", min = 1 }} ]
"""


def test_data_loss_scenario_switches_the_cluster_and_restores_it(fake, kubeconfig, base_dir, monkeypatch):
    from flows.data_loss import data_loss

    root = base_dir / f"k8s-scenario-{time.monotonic_ns() % 10**8}"
    root.mkdir()
    root.chmod(0o755)
    cfg_path = root / "dr.toml"

    def write(health: str) -> None:
        cfg_path.write_text(CONFIG.format(state=root / "state", ns=NS, web=WEB, worker=WORKER, health=health))
        clear_cache()

    write("")
    cfg = load_config(cfg_path)
    target = cfg.target("apply", "test")
    lifecycle.up(cfg, target)  # real PostgreSQL, and the local app answering the healthcheck behind the cluster
    local_app_url = lifecycle.status(cfg, target).app["main_url"]
    write(f'healthcheck_url = "{local_app_url}/healthcheck"')
    cfg = load_config(cfg_path)
    platform = get_platform(cfg, target)
    try:
        conn = platform.servers.connection(target.server, target.database)
        import psycopg

        with psycopg.connect(**conn.psycopg_kwargs(), autocommit=True) as c:
            c.execute("CREATE TABLE markers AS SELECT g AS id FROM generate_series(1, 12) g")
            time.sleep(1.2)
            t = c.execute("SELECT date_trunc('second', now())").fetchone()[0]
            time.sleep(1.2)
            c.execute("DELETE FROM markers WHERE id > 2")
        local = t.astimezone(ZoneInfo("Europe/London")).strftime("%Y-%m-%d %H:%M:%S")
        before = fake.get("ingresses", NS, WEB)["spec"]
        r = data_loss(service="apply", environment="test", restore_time=local, auto_approve=True,
                      incident="inc-k8s", config_path=str(cfg_path))
        with psycopg.connect(**conn.psycopg_kwargs(), autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM markers").fetchone()[0] == 12
        # the cluster is back exactly as it was: replicas, ingress backends, no temp ingress
        assert fake.get("deployments", NS, WEB)["spec"]["replicas"] == 3
        assert fake.get("deployments", NS, WORKER)["spec"]["replicas"] == 2
        assert fake.get("deployments", NS, MAINT)["spec"]["replicas"] == 0
        assert fake.get("ingresses", NS, WEB)["spec"] == before
        assert not fake.exists("ingresses", NS, f"{WEB}-temp")
        # and during the incident it was switched: stopped, maintenance backends, temp ingress
        patched = [m for m in fake.mutations() if m.method in ("PATCH", "POST", "DELETE")]
        assert any("ingresses" in m.path and m.method == "POST" for m in patched)
        assert any(s["step"] == "stop the app and enable maintenance" and s["outcome"] == "done" for s in r["timeline"])
    finally:
        lifecycle.down(cfg)
        clear_cache()
