"""Fixtures: a fake Kubernetes API seeded with one app, and the real client pointed at it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator

import pytest

from dr.config import parse_config
from dr.platforms.kubernetes import KubernetesApp, kubernetes_app
from kube_fake import FakeKube

NS = "bat-qa"
WEB, WORKER, MAINT = "apply-qa", "apply-qa-worker", "apply-maintenance"
HOST = "apply-qa.test.teacherservices.cloud"
TEMP_HOST = "apply-temp.test.teacherservices.cloud"

CONFIG = f"""
[services.apply.environments.test]
app = "kubernetes"
namespace = "{NS}"
web_deployment = "{WEB}"
worker_deployment = "{WORKER}"
"""


def backend(name: str, port: int) -> dict[str, Any]:
    return {"service": {"name": name, "port": {"number": port}}}


#: the main ingress: two paths on the main host (one to another service), and an alias host
MAIN_INGRESS_SPEC: dict[str, Any] = {
    "ingressClassName": "nginx",
    "rules": [
        {"host": HOST, "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": backend(WEB, 80)},
            {"path": "/api", "pathType": "Prefix", "backend": backend("apply-qa-api", 8080)},
        ]}},
        {"host": "apply-qa-alias.test.teacherservices.cloud", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": backend(WEB, 80)},
        ]}},
    ],
}
MAIN_INGRESS_ANNOTATIONS = {"nginx.ingress.kubernetes.io/proxy-body-size": "10m",
                            "cert-manager.io/cluster-issuer": "letsencrypt"}


def seed(fake: FakeKube) -> None:
    fake.add_deployment(NS, WEB, 3)
    fake.add_deployment(NS, WORKER, 2)
    fake.add_deployment(NS, MAINT, 0)
    fake.add_service(NS, WEB, 80, {"app": WEB})
    fake.add_ingress(NS, WEB, MAIN_INGRESS_SPEC, MAIN_INGRESS_ANNOTATIONS)


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    server = FakeKube(settle_delay=0.2).start()
    seed(server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kubeconfig(fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = fake.write_kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return path


@pytest.fixture
def config_text() -> str:
    return CONFIG


@pytest.fixture
def app(kubeconfig: Path, config_text: str) -> KubernetesApp:
    config = parse_config(config_text)
    return kubernetes_app(config, config.target("apply", "test"), poll_interval=0.02, wait_timeout=5)


def original_ingress_spec() -> dict[str, Any]:
    return copy.deepcopy(MAIN_INGRESS_SPEC)
