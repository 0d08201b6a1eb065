"""The kubernetes app backend against the fake API server, through the real client.

Every test asserts the state stored in the fake (and the requests it accepted), not
what the backend says about itself.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.config import incluster_config

from conftest import HOST, MAINT, NS, TEMP_HOST, WEB, WORKER, backend, original_ingress_spec
from dr.config import parse_config
from dr.errors import ConfigError, OperationTimedOut, PlatformError, TransientPlatformError
from dr.platforms.base import TAG_CREATED_BY, TAG_CREATED_BY_VALUE
from dr.platforms.kubernetes import BACKENDS_ANNOTATION, REPLICAS_ANNOTATION, KubernetesApp, kubernetes_app
from dr.platforms.kubernetes.client import load_api_client
from kube_fake import FakeKube

SCALE = r"/deployments/[^/]+/scale$"


def replicas(fake: FakeKube, name: str) -> int:
    return fake.get("deployments", NS, name)["spec"]["replicas"]


def recorded(fake: FakeKube, name: str) -> int | None:
    raw = fake.get("deployments", NS, name)["metadata"].get("annotations", {}).get(REPLICAS_ANNOTATION)
    return None if raw is None else json.loads(raw)["replicas"]


def patches(fake: FakeKube, since: int = 0) -> list[tuple[str, Any]]:
    """(path tail, body) of every accepted mutating request."""
    return [(f"{r.method} {r.path.split('/namespaces/' + NS + '/')[-1]}", r.body) for r in fake.mutations(since)]


def all_backends(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [p["backend"] for rule in spec["rules"] for p in rule["http"]["paths"]]


class TestScaleDown:
    def test_records_counts_on_each_deployment_before_scaling_to_zero(self, app: KubernetesApp, fake: FakeKube):
        assert app.scale_down() == {"web": 3, "worker": 2}

        assert (replicas(fake, WEB), replicas(fake, WORKER)) == (0, 0)
        assert (recorded(fake, WEB), recorded(fake, WORKER)) == (3, 2)
        assert fake.pods(NS, {"app": WEB}) == [] and fake.pods(NS, {"app": WORKER}) == []
        sent = patches(fake)
        assert [p for p, _ in sent] == [
            f"PATCH deployments/{WEB}", f"PATCH deployments/{WORKER}",
            f"PATCH deployments/{WEB}/scale", f"PATCH deployments/{WORKER}/scale",
        ]
        assert json.loads(sent[0][1]["metadata"]["annotations"][REPLICAS_ANNOTATION])["replicas"] == 3
        assert json.loads(sent[1][1]["metadata"]["annotations"][REPLICAS_ANNOTATION])["replicas"] == 2
        assert sent[2][1] == sent[3][1] == {"spec": {"replicas": 0}}

    def test_waits_until_the_pods_are_gone(self, app: KubernetesApp, fake: FakeKube):
        fake.settle_delay = 0.5
        app.scale_down()
        assert fake.pods(NS, {"app": WEB}) == []
        pod_lists = [r for r in fake.requests if r.path.endswith("/pods")]
        assert len(pod_lists) > 2  # it looked more than once

    def test_second_scale_down_keeps_the_first_recording_and_changes_nothing(self, app: KubernetesApp,
                                                                              fake: FakeKube):
        app.scale_down()
        mark = len(fake.requests)
        assert app.scale_down() == {"web": 3, "worker": 2}
        assert fake.mutations(mark) == []
        assert (recorded(fake, WEB), recorded(fake, WORKER)) == (3, 2)

    def test_times_out_when_pods_stay(self, app: KubernetesApp, fake: FakeKube):
        fake.pods_stuck = True
        with pytest.raises(OperationTimedOut) as info:
            app.scale_down(timeout=0.5)
        assert "apply-qa" in str(info.value) and info.value.resume_hint
        assert (recorded(fake, WEB), recorded(fake, WORKER)) == (3, 2)

    def test_crash_after_recording_is_repaired_by_running_again(self, app: KubernetesApp, fake: FakeKube):
        fake.fail_next("PATCH", f"/deployments/{WORKER}/scale$", 503, reason="ServiceUnavailable")
        with pytest.raises(TransientPlatformError):
            app.scale_down()
        assert (replicas(fake, WEB), replicas(fake, WORKER)) == (0, 2)
        assert (recorded(fake, WEB), recorded(fake, WORKER)) == (3, 2)

        assert app.scale_down() == {"web": 3, "worker": 2}
        assert (replicas(fake, WEB), replicas(fake, WORKER)) == (0, 0)
        assert (recorded(fake, WEB), recorded(fake, WORKER)) == (3, 2)

    def test_a_scale_by_someone_else_since_our_read_is_not_recorded_wrongly(self, app: KubernetesApp,
                                                                            fake: FakeKube):
        # someone scales web to 5 between our read and our annotation patch: the patch names the
        # resourceVersion it read, so the fake (like the API server) refuses it with 409
        fake.after_next("GET", f"/deployments/{WEB}$", lambda: fake.scale(NS, WEB, 5))
        with pytest.raises(TransientPlatformError, match="409"):
            app.scale_down()
        assert replicas(fake, WEB) == 5 and recorded(fake, WEB) is None

        assert app.scale_down() == {"web": 5, "worker": 2}  # the retry reads again
        assert recorded(fake, WEB) == 5 and replicas(fake, WEB) == 0

    def test_app_without_worker(self, kubeconfig: Path, fake: FakeKube):
        config = parse_config(f'[services.apply.environments.test]\napp = "kubernetes"\nnamespace = "{NS}"\n'
                              f'web_deployment = "{WEB}"\n')
        app = kubernetes_app(config, config.target("apply", "test"), poll_interval=0.02, wait_timeout=5)
        assert app.scale_down() == {"web": 3}
        assert replicas(fake, WORKER) == 2 and recorded(fake, WORKER) is None
        assert app.scale_up() == {"web": 3}


class TestScaleUp:
    def test_restores_exactly_the_recorded_counts_and_drops_the_record(self, app: KubernetesApp, fake: FakeKube):
        app.scale_down()
        mark = len(fake.requests)
        assert app.scale_up() == {"web": 3, "worker": 2}

        sent = patches(fake, mark)
        assert sent[:2] == [(f"PATCH deployments/{WEB}/scale", {"spec": {"replicas": 3}}),
                            (f"PATCH deployments/{WORKER}/scale", {"spec": {"replicas": 2}})]
        assert (replicas(fake, WEB), replicas(fake, WORKER)) == (3, 2)
        assert (recorded(fake, WEB), recorded(fake, WORKER)) == (None, None)
        web = fake.get("deployments", NS, WEB)
        assert web["status"]["readyReplicas"] == 3
        assert len(fake.pods(NS, {"app": WEB})) == 3 and len(fake.pods(NS, {"app": WORKER})) == 2
        status = app.get_status()
        assert status.replicas == {"web": 3, "worker": 2} and status.recorded_replicas is None

    def test_waits_for_readiness_before_dropping_the_record(self, app: KubernetesApp, fake: FakeKube):
        app.scale_down()
        fake.never_ready = True
        with pytest.raises(OperationTimedOut) as info:
            app.scale_up(timeout=0.5)
        assert "0/3 ready" in str(info.value)
        assert replicas(fake, WEB) == 3 and recorded(fake, WEB) == 3  # record kept for the rerun

        fake.never_ready = False
        assert app.scale_up() == {"web": 3, "worker": 2}
        assert recorded(fake, WEB) is None and fake.get("deployments", NS, WEB)["status"]["readyReplicas"] == 3

    def test_second_scale_up_changes_nothing(self, app: KubernetesApp, fake: FakeKube):
        app.scale_down()
        app.scale_up()
        mark = len(fake.requests)
        assert app.scale_up() == {"web": 3, "worker": 2}
        assert fake.mutations(mark) == []

    def test_status_shows_the_record_while_scaled_down(self, app: KubernetesApp, fake: FakeKube):
        app.scale_down()
        status = app.get_status()
        assert status.replicas == {"web": 0, "worker": 0}
        assert status.recorded_replicas == {"web": 3, "worker": 2}


class TestMaintenance:
    def test_enable_points_users_at_the_maintenance_page_and_opens_the_temp_host(self, app: KubernetesApp,
                                                                                 fake: FakeKube):
        status = app.enable_maintenance()

        main = fake.get("ingresses", NS, WEB)
        assert all(b == backend(MAINT, 80) for b in all_backends(main["spec"]))
        assert [r["host"] for r in main["spec"]["rules"]] == [r["host"] for r in original_ingress_spec()["rules"]]
        record = json.loads(main["metadata"]["annotations"][BACKENDS_ANNOTATION])
        assert [e["backend"] for e in record["backends"]] == all_backends(original_ingress_spec())
        # the maintenance page runs behind a service created for it
        assert replicas(fake, MAINT) == 1
        assert fake.get("deployments", NS, MAINT)["status"]["readyReplicas"] == 1
        svc = fake.get("services", NS, MAINT)
        assert svc["spec"]["selector"] == {"app": MAINT} and svc["spec"]["ports"][0]["targetPort"] == 8080
        # the temp host reaches the app's original backends
        temp = fake.get("ingresses", NS, f"{WEB}-temp")
        assert temp["metadata"]["labels"][TAG_CREATED_BY] == TAG_CREATED_BY_VALUE
        assert temp["spec"]["ingressClassName"] == "nginx"
        assert temp["spec"]["rules"] == [{"host": TEMP_HOST, "http": {"paths": original_ingress_spec()["rules"][0]
                                                                      ["http"]["paths"]}}]
        annotations = temp["metadata"]["annotations"]
        assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "10m"
        assert BACKENDS_ANNOTATION not in annotations and "cert-manager.io/cluster-issuer" not in annotations

        assert status.maintenance is True
        assert status.main_url == f"https://{HOST}" and status.temp_url == f"https://{TEMP_HOST}"

    def test_disable_restores_the_original_backends_exactly(self, app: KubernetesApp, fake: FakeKube):
        before = fake.get("ingresses", NS, WEB)
        app.enable_maintenance()
        status = app.disable_maintenance()

        main = fake.get("ingresses", NS, WEB)
        assert main["spec"] == before["spec"] == original_ingress_spec()
        assert main["metadata"]["annotations"] == before["metadata"]["annotations"]
        assert not fake.exists("ingresses", NS, f"{WEB}-temp")
        assert replicas(fake, MAINT) == 0
        assert status.maintenance is False and status.temp_url is None

    def test_enable_twice_sends_no_change_the_second_time(self, app: KubernetesApp, fake: FakeKube):
        app.enable_maintenance()
        state = (fake.get("ingresses", NS, WEB), fake.get("ingresses", NS, f"{WEB}-temp"))
        mark = len(fake.requests)
        assert app.enable_maintenance().maintenance is True
        assert fake.mutations(mark) == []
        assert (fake.get("ingresses", NS, WEB), fake.get("ingresses", NS, f"{WEB}-temp")) == state

    def test_disable_twice_sends_no_change_the_second_time(self, app: KubernetesApp, fake: FakeKube):
        app.enable_maintenance()
        app.disable_maintenance()
        mark = len(fake.requests)
        assert app.disable_maintenance().maintenance is False
        assert fake.mutations(mark) == []

    def test_disable_when_never_enabled_changes_nothing(self, app: KubernetesApp, fake: FakeKube):
        app.disable_maintenance()
        assert fake.mutations() == []

    def test_uses_an_existing_maintenance_service_and_its_port(self, app: KubernetesApp, fake: FakeKube):
        fake.add_service(NS, MAINT, 8081, {"app": MAINT})
        app.enable_maintenance()
        assert all(b == backend(MAINT, 8081) for b in all_backends(fake.get("ingresses", NS, WEB)["spec"]))
        assert not any(r.method == "POST" and r.path.endswith("/services") for r in fake.requests)

    def test_a_backend_repointed_by_hand_during_maintenance_is_repointed_again(self, app: KubernetesApp,
                                                                               fake: FakeKube):
        app.enable_maintenance()
        main = fake.get("ingresses", NS, WEB)
        main["spec"]["rules"][0]["http"]["paths"][0]["backend"] = backend(WEB, 80)  # a deploy put it back
        fake.add_ingress(NS, WEB, main["spec"], main["metadata"]["annotations"])

        app.enable_maintenance()
        main = fake.get("ingresses", NS, WEB)
        assert all(b == backend(MAINT, 80) for b in all_backends(main["spec"]))
        app.disable_maintenance()
        assert fake.get("ingresses", NS, WEB)["spec"] == original_ingress_spec()


class TestMaintenanceCrashRecovery:
    def test_enable_again_after_the_temp_ingress_failed(self, app: KubernetesApp, fake: FakeKube):
        fake.fail_next("POST", r"/ingresses$", 500)
        with pytest.raises(TransientPlatformError):
            app.enable_maintenance()
        main = fake.get("ingresses", NS, WEB)
        assert BACKENDS_ANNOTATION in main["metadata"]["annotations"]  # half-enabled: users on the page
        assert not fake.exists("ingresses", NS, f"{WEB}-temp")

        status = app.enable_maintenance()
        assert fake.get("ingresses", NS, WEB) == main  # the record was not rewritten
        temp = fake.get("ingresses", NS, f"{WEB}-temp")
        assert temp["spec"]["rules"][0]["host"] == TEMP_HOST
        assert all_backends(temp["spec"]) == all_backends(original_ingress_spec())[:2]
        assert status.maintenance and status.temp_url == f"https://{TEMP_HOST}"

        app.disable_maintenance()
        assert fake.get("ingresses", NS, WEB)["spec"] == original_ingress_spec()
        assert not fake.exists("ingresses", NS, f"{WEB}-temp")

    def test_disable_after_a_half_enable(self, app: KubernetesApp, fake: FakeKube):
        fake.fail_next("POST", r"/ingresses$", 500)
        with pytest.raises(TransientPlatformError):
            app.enable_maintenance()

        status = app.disable_maintenance()
        main = fake.get("ingresses", NS, WEB)
        assert main["spec"] == original_ingress_spec() and BACKENDS_ANNOTATION not in main["metadata"]["annotations"]
        assert not fake.exists("ingresses", NS, f"{WEB}-temp")
        assert replicas(fake, MAINT) == 0
        assert status.maintenance is False

    def test_disable_again_after_the_temp_delete_failed(self, app: KubernetesApp, fake: FakeKube):
        app.enable_maintenance()
        fake.fail_next("DELETE", rf"/ingresses/{WEB}-temp$", 503)
        with pytest.raises(TransientPlatformError):
            app.disable_maintenance()
        assert fake.get("ingresses", NS, WEB)["spec"] == original_ingress_spec()
        assert fake.exists("ingresses", NS, f"{WEB}-temp")

        app.disable_maintenance()
        assert not fake.exists("ingresses", NS, f"{WEB}-temp") and replicas(fake, MAINT) == 0

    def test_ingress_patch_failure_leaves_the_ingress_untouched(self, app: KubernetesApp, fake: FakeKube):
        fake.fail_next("PATCH", rf"/ingresses/{WEB}$", 500)
        with pytest.raises(TransientPlatformError):
            app.enable_maintenance()
        main = fake.get("ingresses", NS, WEB)
        assert main["spec"] == original_ingress_spec() and BACKENDS_ANNOTATION not in main["metadata"]["annotations"]
        assert app.get_status().maintenance is False


class TestMaintenanceRefusals:
    def test_missing_maintenance_deployment(self, app: KubernetesApp, fake: FakeKube):
        del fake.objects[("deployments", NS, MAINT)]
        with pytest.raises(PlatformError, match=f"'{MAINT}' does not exist in namespace '{NS}'"):
            app.enable_maintenance()
        assert fake.mutations() == []

    def test_ingress_pointing_at_the_page_without_a_record(self, app: KubernetesApp, fake: FakeKube):
        spec = original_ingress_spec()
        spec["rules"][0]["http"]["paths"][0]["backend"] = backend(MAINT, 80)
        fake.add_ingress(NS, WEB, spec)
        mark = len(fake.requests)
        with pytest.raises(PlatformError, match="original backends are unknown"):
            app.enable_maintenance()
        with pytest.raises(PlatformError, match="original backends are unknown"):
            app.disable_maintenance()
        assert not [r for r in fake.mutations(mark) if "ingresses" in r.path]
        assert fake.get("ingresses", NS, WEB)["spec"] == spec

    def test_temp_ingress_not_created_by_us_is_left_alone(self, app: KubernetesApp, fake: FakeKube):
        fake.add_ingress(NS, f"{WEB}-temp", {"rules": [{"host": "other.example.org", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": backend("other", 80)}]}}]})
        with pytest.raises(PlatformError, match="not created by this tool"):
            app.enable_maintenance()
        assert fake.get("ingresses", NS, f"{WEB}-temp")["spec"]["rules"][0]["host"] == "other.example.org"


class TestErrors:
    def test_forbidden_scale_names_the_verb_and_resource(self, app: KubernetesApp, fake: FakeKube):
        fake.deny("patch", "deployments/scale")
        with pytest.raises(PlatformError) as info:
            app.scale_down()
        message = str(info.value)
        assert "verb 'patch' on resource 'deployments/scale' in API group apps" in message
        assert f"namespace '{NS}'" in message and "docs/kubernetes.md" in message
        assert not info.value.transient
        assert recorded(fake, WEB) == 3 and replicas(fake, WEB) == 3  # recorded, nothing scaled

    def test_the_role_in_the_docs_is_enough(self, app: KubernetesApp, fake: FakeKube):
        text = (Path(__file__).parents[2] / "docs" / "kubernetes.md").read_text()
        role = next(d for d in yaml.safe_load_all(re.search(r"```yaml\n(.*?)```", text, re.S)[1]) if d["kind"] == "Role")
        fake.allowed = {(verb, resource) for rule in role["rules"] for resource in rule["resources"]
                        for verb in rule["verbs"]}
        app.scale_down()
        app.enable_maintenance()
        app.disable_maintenance()
        app.scale_up()
        assert not [r for r in fake.requests if r.status == 403]
        fake.allowed.discard(("delete", "ingresses"))
        app.enable_maintenance()
        with pytest.raises(PlatformError, match="lacks verb 'delete' on resource 'ingresses'"):
            app.disable_maintenance()

    def test_forbidden_create_of_the_temp_ingress(self, app: KubernetesApp, fake: FakeKube):
        fake.deny("create", "ingresses")
        with pytest.raises(PlatformError, match="verb 'create' on resource 'ingresses' in API group "
                                                "networking.k8s.io"):
            app.enable_maintenance()

    def test_not_found_names_the_object_and_namespace(self, app: KubernetesApp, fake: FakeKube):
        del fake.objects[("deployments", NS, WORKER)]
        with pytest.raises(PlatformError, match=f"deployment '{WORKER}' in namespace '{NS}' not found"):
            app.scale_down()
        del fake.objects[("ingresses", NS, WEB)]
        with pytest.raises(PlatformError, match=f"ingress '{WEB}' in namespace '{NS}' not found"):
            app.get_status()

    @pytest.mark.parametrize("code", [429, 500, 503])
    def test_throttling_and_server_errors_are_transient(self, app: KubernetesApp, fake: FakeKube, code: int):
        fake.fail_next("GET", f"/deployments/{WEB}$", code)
        with pytest.raises(TransientPlatformError) as info:
            app.scale_down()
        assert info.value.transient and str(code) in str(info.value)

    def test_unreachable_api_is_transient(self, app: KubernetesApp, fake: FakeKube):
        fake.stop()
        with pytest.raises(TransientPlatformError, match="could not reach the Kubernetes API"):
            app.get_status()

    def test_rejected_credentials(self, fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  config_text: str):
        path = fake.write_kubeconfig(tmp_path / "kubeconfig")
        cfg = json.loads(path.read_text())
        cfg["users"][0]["user"]["token"] = "expired"
        path.write_text(json.dumps(cfg))
        monkeypatch.setenv("KUBECONFIG", str(path))
        config = parse_config(config_text)
        app = kubernetes_app(config, config.target("apply", "test"))
        with pytest.raises(PlatformError, match="did not accept our credentials") as info:
            app.get_status()
        assert not info.value.transient

    def test_missing_kubeconfig_is_a_config_error(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  config_text: str):
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nowhere"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        config = parse_config(config_text)
        app = kubernetes_app(config, config.target("apply", "test"))
        with pytest.raises(ConfigError, match="cannot load Kubernetes credentials"):
            app.get_status()


class TestConnection:
    def test_named_context_is_used(self, fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        path = fake.write_kubeconfig(tmp_path / "kubeconfig", context="aks-test")
        cfg = json.loads(path.read_text())
        cfg["clusters"].append({"name": "prod", "cluster": {"server": "http://127.0.0.1:9"}})
        cfg["contexts"].append({"name": "aks-prod", "context": {"cluster": "prod", "user": "dr"}})
        cfg["current-context"] = "aks-prod"
        path.write_text(json.dumps(cfg))
        monkeypatch.setenv("KUBECONFIG", str(path))
        app = KubernetesApp(namespace=NS, web_deployment=WEB, service="apply", production=False,
                            context="aks-test")
        assert app.get_status().replicas == {"web": 3}

    def test_in_cluster_credentials_in_a_pod(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        token, ca = tmp_path / "token", tmp_path / "ca.crt"
        token.write_text("pod-token")
        ca.write_text("not really a certificate")
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
        monkeypatch.delenv("KUBECONFIG", raising=False)
        configuration = load_api_client().configuration
        assert configuration.host == "https://10.0.0.1:443"
        assert configuration.api_key["BearerToken"] == "bearer pod-token"

    def test_temp_host_conventions(self):
        test = KubernetesApp(namespace=NS, web_deployment=WEB, service="apply", production=False)
        prod = KubernetesApp(namespace=NS, web_deployment=WEB, service="apply", production=True)
        assert test.temp_host_for("apply-qa.test.teacherservices.cloud") == "apply-temp.test.teacherservices.cloud"
        assert test.temp_host_for("apply-review-1.teacherservices.cloud") == "apply-temp.test.teacherservices.cloud"
        assert prod.temp_host_for("apply-production.teacherservices.cloud") == "apply-temp.teacherservices.cloud"
        with pytest.raises(PlatformError, match="set temp_host"):
            prod.temp_host_for("localhost")
        assert KubernetesApp(namespace=NS, web_deployment=WEB, service="apply", production=True,
                             temp_host="x.example.org").temp_host_for("a.b.c") == "x.example.org"

    def test_healthcheck_uses_the_configured_url(self, kubeconfig: Path, fake: FakeKube):
        class Health(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = b"ok" if self.path == "/healthcheck" else b"wrong path"
                self.send_response(200 if self.path == "/healthcheck" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = HTTPServer(("127.0.0.1", 0), Health)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            config = parse_config(f'[services.apply.environments.test]\napp = "kubernetes"\nnamespace = "{NS}"\n'
                                  f'web_deployment = "{WEB}"\nhealthcheck_url = "{url}"\n')
            app = kubernetes_app(config, config.target("apply", "test"))
            assert app.healthcheck() == (200, "ok")
        finally:
            server.shutdown()
            server.server_close()
