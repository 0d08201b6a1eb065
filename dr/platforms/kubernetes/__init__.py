"""The `kubernetes` app backend: the web app on AKS, through the official `kubernetes` client.

`kubernetes_app(config, target)` builds the `AppControl` of one service environment from
its `namespace`, `web_deployment` and `worker_deployment`, with names that follow the
conventions in docs/kubernetes.md. Importing this package needs the `kubernetes` package;
`get_platform` turns its absence into a `MissingDependency`.
"""

from __future__ import annotations

from typing import Any

from dr.config import DrConfig, Target
from dr.errors import ConfigError
from dr.platforms.kubernetes.app import BACKENDS_ANNOTATION, REPLICAS_ANNOTATION, KubernetesApp
from dr.platforms.kubernetes.client import load_api_client

__all__ = ["BACKENDS_ANNOTATION", "REPLICAS_ANNOTATION", "KubernetesApp", "kubernetes_app", "load_api_client"]


def kubernetes_app(config: DrConfig, target: Target, **options: Any) -> KubernetesApp:
    """The app of a service environment whose `app` is `kubernetes`.

    `ingress`, `temp_host` and `kube_context` are read from the target when it has them
    (overrides of the conventions); the cluster is contacted on first use, not here.

    Args:
        config: the whole configuration (unused today; kept for the factory signature).
        target: the resolved service environment.
        **options: passed to `KubernetesApp` (`wait_timeout`, `poll_interval`, `api_client`, ...).

    Raises:
        ConfigError: the target lacks `namespace` or `web_deployment`.
    """
    if not (target.namespace and target.web_deployment):
        raise ConfigError("app 'kubernetes' needs namespace and web_deployment",
                          field=f"services.{target.service}.environments.{target.environment}", source=config.source)
    settings: dict[str, Any] = {
        "ingress": getattr(target, "ingress", None),
        "temp_host": getattr(target, "temp_host", None),
        "context": getattr(target, "kube_context", None),
        **options,
    }
    return KubernetesApp(
        namespace=target.namespace, web_deployment=target.web_deployment, worker_deployment=target.worker_deployment,
        service=target.service, production=target.production, healthcheck_url=target.healthcheck_url, **settings,
    )
