"""Talking to the Kubernetes API: credentials in, `PlatformError`s out.

`load_api_client` builds one `kubernetes.client.ApiClient` from a kubeconfig (the file
`$KUBECONFIG` names, else `~/.kube/config`) or, inside a pod, from the pod's service
account. `Kube.call` runs one API call and turns every failure into the tool's error
tree: 404 names the object and namespace, 401/403 name the RBAC verb and resource the
identity lacks, 409 conflicts, 429, 5xx and network failures are transient.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException, OpenApiException
from kubernetes.config.config_exception import ConfigException

from dr.errors import ConfigError, PlatformError, TransientPlatformError

log = logging.getLogger(__name__)

#: RFC 7386 JSON merge patch: maps merge, `null` deletes a key, lists are replaced whole.
MERGE_PATCH = "application/merge-patch+json"

RBAC_DOC = "docs/kubernetes.md"

T = TypeVar("T")

_SINGULAR = {"deployments": "deployment", "ingresses": "ingress", "services": "service", "pods": "pod"}


class KubeNotFound(PlatformError, LookupError):
    """The Kubernetes object does not exist (HTTP 404)."""


class KubeAlreadyExists(PlatformError):
    """An object with this name already exists (HTTP 409 AlreadyExists on create)."""


@dataclass(frozen=True)
class Op:
    """One API call as RBAC sees it: verb, resource (with subresource), API group, object."""

    verb: str
    resource: str
    group: str
    namespace: str
    name: str | None = None

    @property
    def kind(self) -> str:
        plural = self.resource.split("/")[0]
        return _SINGULAR.get(plural, plural)

    def describe(self) -> str:
        what = f"{self.kind} '{self.name}'" if self.name else self.resource.split("/")[0]
        return f"{what} in namespace '{self.namespace}'"

    def rbac(self) -> str:
        group = self.group or '"" (core)'
        return f"verb '{self.verb}' on resource '{self.resource}' in API group {group}"


def load_api_client(context: str | None = None) -> k8s.ApiClient:
    """An API client for one cluster.

    Args:
        context: the kubeconfig context to use; `None` uses the current context, or the
            pod's service account when running in a pod without `$KUBECONFIG`.

    Raises:
        ConfigError: no usable kubeconfig or in-cluster credentials.
    """
    configuration = k8s.Configuration()
    kubeconfig = os.environ.get("KUBECONFIG")
    in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    try:
        if in_pod and not kubeconfig and not context:
            k8s_config.load_incluster_config(client_configuration=configuration)
            source = "in-cluster service account"
        else:
            # read $KUBECONFIG now: the library reads it once, at import
            path = kubeconfig or os.path.expanduser("~/.kube/config")
            k8s_config.load_kube_config(config_file=path, context=context, client_configuration=configuration)
            source = f"kubeconfig {path}" + (f" context '{context}'" if context else "")
    except (ConfigException, OSError) as exc:
        where = "the pod's service account" if in_pod and not kubeconfig and not context else \
            f"kubeconfig {kubeconfig or '~/.kube/config'}" + (f" (context '{context}')" if context else "")
        raise ConfigError(f"cannot load Kubernetes credentials from {where}: {exc}; for AKS run "
                          "'az aks get-credentials' then 'kubelogin convert-kubeconfig -l azurecli', "
                          "or set KUBECONFIG") from exc
    log.debug("kubernetes API %s from %s", configuration.host, source)
    return k8s.ApiClient(configuration)


def _status_message(exc: ApiException) -> str:
    """The `message` of the Kubernetes Status object in an error response, else the reason."""
    try:
        body = json.loads(exc.body or "")
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except (TypeError, ValueError):
        pass
    return str(exc.reason or "").strip() or f"HTTP {exc.status}"


def _status_reason(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "")
        return str(body.get("reason") or "") if isinstance(body, dict) else ""
    except (TypeError, ValueError):
        return ""


def api_error(exc: ApiException, op: Op, cluster: str) -> PlatformError:
    """The tool's error for a failed API call."""
    status = exc.status or 0
    detail = _status_message(exc)
    doing = f"{op.verb} {op.describe()}"
    if status == 404:
        return KubeNotFound(f"{op.describe()} not found on {cluster} (while trying to {op.verb} it): {detail}")
    if status == 401:
        return PlatformError(f"the Kubernetes API at {cluster} did not accept our credentials (401) while trying to "
                             f"{doing}; refresh them (az login / kubelogin) and check the kubeconfig user: {detail}")
    if status == 403:
        return PlatformError(f"forbidden: the Kubernetes identity in use lacks {op.rbac()} in namespace "
                             f"'{op.namespace}' (needed to {doing}); grant the Role in {RBAC_DOC}: {detail}")
    if status == 409 and _status_reason(exc) == "AlreadyExists":
        return KubeAlreadyExists(f"{op.describe()} already exists: {detail}")
    if status == 409:
        return TransientPlatformError(f"{op.describe()} changed while we were updating it (409 Conflict); "
                                      f"retrying reads it again: {detail}")
    if status == 429 or status >= 500 or status == 0:
        return TransientPlatformError(f"the Kubernetes API at {cluster} failed to {doing} "
                                      f"({status or 'no response'}), worth a retry: {detail}")
    return PlatformError(f"the Kubernetes API at {cluster} refused to {doing} ({status}): {detail}")


class Kube:
    """The handful of typed API groups the app backend uses, behind one error mapping."""

    def __init__(self, api_client: k8s.ApiClient, *, request_timeout: float = 30.0):
        self.api_client = api_client
        self.apps = k8s.AppsV1Api(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.networking = k8s.NetworkingV1Api(api_client)
        self.request_timeout = request_timeout

    @property
    def cluster(self) -> str:
        return str(self.api_client.configuration.host)

    def to_dict(self, obj: Any) -> Any:
        """An API model as the JSON the API server speaks (camelCase keys, no nulls)."""
        return self.api_client.sanitize_for_serialization(obj)

    def call(self, op: Op, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one API call; every failure comes out as a `PlatformError`.

        Raises:
            KubeNotFound: 404.
            KubeAlreadyExists: 409 AlreadyExists on create.
            TransientPlatformError: 409 Conflict, 429, 5xx, or the API could not be reached.
            PlatformError: anything else, with the RBAC verb for 401/403.
        """
        try:
            return fn(*args, _request_timeout=self.request_timeout, **kwargs)
        except ApiException as exc:
            raise api_error(exc, op, self.cluster) from exc
        except ConfigException as exc:  # an exec plugin (kubelogin) failed to refresh the token
            raise PlatformError(f"could not get a token for the Kubernetes API at {self.cluster} to {op.verb} "
                                f"{op.describe()}: {exc}; log in again (az login) and check kubelogin") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransientPlatformError(f"could not reach the Kubernetes API at {self.cluster} to {op.verb} "
                                         f"{op.describe()}: {exc}") from exc
        except OpenApiException as exc:
            raise PlatformError(f"unexpected answer from the Kubernetes API at {self.cluster} to {op.verb} "
                                f"{op.describe()}: {exc}") from exc
