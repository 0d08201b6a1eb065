"""`AppControl` for an app on Kubernetes (AKS): replicas, maintenance page, temporary URL.

The cluster is the only record. Every change carries, on the object it changes and in
the same patch or one sent before it, what is needed to undo it:

- `dr.recovery/replicas-before` on each deployment: its replica count before a
  scale-down, as JSON `{"replicas": 3, "recordedAt": "..."}`. Written before scaling,
  kept by a second scale-down, removed only once the count is restored and ready.
- `dr.recovery/original-backends` on the main ingress: the backends its rules had before
  they were pointed at the maintenance service. Written in the same patch as the
  repoint, removed in the same patch as the restore.

So a crash between two changes is repaired by running the same command again, and a
command that finds its work done sends no change at all.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable

from kubernetes import client as k8s

from dr.errors import OperationTimedOut, PlatformError
from dr.platforms.base import TAG_CREATED_BY, TAG_CREATED_BY_VALUE, TAG_PURPOSE, AppControl, AppStatus
from dr.platforms.kubernetes.client import MERGE_PATCH, Kube, KubeAlreadyExists, KubeNotFound, Op, load_api_client

log = logging.getLogger(__name__)

REPLICAS_ANNOTATION = "dr.recovery/replicas-before"
BACKENDS_ANNOTATION = "dr.recovery/original-backends"
TEMP_FOR_ANNOTATION = "dr.recovery/temp-for"

#: Annotations of the main ingress not copied to the temporary one: ours, tool bookkeeping,
#: and those that would make a controller fight over the main host's DNS name or certificate.
_NOT_COPIED = ("dr.recovery/", "kubectl.kubernetes.io/", "meta.helm.sh/", "cert-manager.io/",
               "external-dns.alpha.kubernetes.io/")

_GROUPS = {"deployments": "apps", "ingresses": "networking.k8s.io"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _spec_replicas(dep: k8s.V1Deployment) -> int:
    """The desired replica count (the API defaults an unset count to 1)."""
    n = dep.spec.replicas if dep.spec else None
    return 1 if n is None else int(n)


def _recorded_replicas(dep: k8s.V1Deployment) -> int | None:
    """The count recorded on a deployment by a scale-down, or None."""
    raw = (dep.metadata.annotations or {}).get(REPLICAS_ANNOTATION)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        n = value["replicas"] if isinstance(value, dict) else value
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(n)
    except (ValueError, KeyError, TypeError) as exc:
        raise PlatformError(
            f"deployment '{dep.metadata.name}' carries an unreadable {REPLICAS_ANNOTATION} annotation {raw!r}; "
            f"set it by hand to the count to restore, as {{\"replicas\": N}}") from exc
    return n


def _rollout(dep: k8s.V1Deployment) -> tuple[bool, str]:
    """Whether every desired replica is updated and ready, as `kubectl rollout status` judges it."""
    want = _spec_replicas(dep)
    st = dep.status or k8s.V1DeploymentStatus()
    ready, updated, total = st.ready_replicas or 0, st.updated_replicas or 0, st.replicas or 0
    observed = (st.observed_generation or 0) >= (dep.metadata.generation or 0)
    done = observed and ready == want and updated == want and total == want
    return done, f"{dep.metadata.name}: {ready}/{want} ready"


def label_selector(dep: k8s.V1Deployment) -> str:
    """The deployment's pod selector as a `labelSelector` query string."""
    sel = dep.spec.selector if dep.spec else None
    parts = [f"{k}={v}" for k, v in sorted(((sel.match_labels if sel else None) or {}).items())]
    for e in (sel.match_expressions if sel else None) or []:
        values = ",".join(e.values or [])
        parts.append({"In": f"{e.key} in ({values})", "NotIn": f"{e.key} notin ({values})",
                      "Exists": e.key, "DoesNotExist": f"!{e.key}"}[e.operator])
    if not parts:
        raise PlatformError(f"deployment '{dep.metadata.name}' has an empty pod selector; refusing to treat every "
                            "pod in the namespace as its own")
    return ",".join(parts)


# --- ingress backends ---------------------------------------------------------------------


def _path_key(host: str | None, path: dict[str, Any]) -> str:
    return f"{host or ''}|{path.get('path') or ''}|{path.get('pathType') or ''}"


def _routing(spec: dict[str, Any]) -> dict[str, Any]:
    """The part of an ingress spec that says where traffic goes."""
    return {k: copy.deepcopy(spec[k]) for k in ("rules", "defaultBackend") if spec.get(k) is not None}


def _backends(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(key, backend) for every rule path, and ("default", backend) for the default backend."""
    out = [(_path_key(rule.get("host"), path), path.get("backend") or {})
           for rule in spec.get("rules") or [] for path in (rule.get("http") or {}).get("paths") or []]
    if spec.get("defaultBackend") is not None:
        out.append(("default", spec["defaultBackend"]))
    return out


def _rebackend(spec: dict[str, Any], choose: Callable[[str, dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """The routing of `spec` with each backend replaced by `choose(key, backend)`."""
    routing = _routing(spec)
    for rule in routing.get("rules") or []:
        for path in (rule.get("http") or {}).get("paths") or []:
            path["backend"] = copy.deepcopy(choose(_path_key(rule.get("host"), path), path.get("backend") or {}))
    if "defaultBackend" in routing:
        routing["defaultBackend"] = copy.deepcopy(choose("default", routing["defaultBackend"]))
    return routing


def _service_of(backend: dict[str, Any]) -> str | None:
    return (backend.get("service") or {}).get("name")


def _points_at(spec: dict[str, Any], service: str) -> bool:
    return any(_service_of(b) == service for _, b in _backends(spec))


def _main_host(ingress: dict[str, Any]) -> str:
    for rule in ingress.get("spec", {}).get("rules") or []:
        if rule.get("host"):
            return str(rule["host"])
    raise PlatformError(f"ingress '{ingress['metadata']['name']}' has no rule with a host; cannot tell the app's URL")


class KubernetesApp(AppControl):
    """The app of one service environment, as deployments and ingresses in one namespace.

    Args:
        namespace: the namespace holding everything below.
        web_deployment: the web deployment; also the main ingress's name unless `ingress` is given.
        service: the service name (`apply`): names the maintenance deployment and service
            `<service>-maintenance` and the temporary host `<service>-temp.[test.]<domain>`.
        production: production temp hosts live under `<domain>`, others under `test.<domain>`.
        worker_deployment: the worker deployment, if the app has one.
        ingress: the main ingress, when not named after the web deployment.
        temp_host: the temporary host, when the convention does not fit.
        healthcheck_url: where `healthcheck` looks, when the app's URLs are not reachable from here.
        context: the kubeconfig context; `None` for the current one (or in-cluster credentials).
        api_client: a ready `kubernetes.client.ApiClient`; built from `context` on first use when `None`.
        wait_timeout: default seconds to wait for pods to stop or become ready.
        poll_interval: seconds between two looks while waiting.
        request_timeout: seconds for one API request.
    """

    def __init__(self, *, namespace: str, web_deployment: str, service: str, production: bool,
                 worker_deployment: str | None = None, ingress: str | None = None, temp_host: str | None = None,
                 healthcheck_url: str | None = None, context: str | None = None,
                 api_client: k8s.ApiClient | None = None, wait_timeout: float = 600.0, poll_interval: float = 2.0,
                 request_timeout: float = 30.0):
        self.namespace = namespace
        self.web = web_deployment
        self.worker = worker_deployment
        self.service = service
        self.production = production
        self.ingress = ingress or web_deployment
        self.maintenance = f"{service}-maintenance"
        self.temp_ingress = f"{web_deployment}-temp"
        self.temp_host = temp_host
        self.healthcheck_url = healthcheck_url
        self.context = context
        self.wait_timeout = wait_timeout
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self._api_client = api_client
        self._kube: Kube | None = None

    # --- API plumbing ----------------------------------------------------------------------

    @property
    def kube(self) -> Kube:
        if self._kube is None:
            self._kube = Kube(self._api_client or load_api_client(self.context), request_timeout=self.request_timeout)
        return self._kube

    @property
    def deployments(self) -> dict[str, str]:
        """Deployment name by role."""
        return {"web": self.web, **({"worker": self.worker} if self.worker else {})}

    def _op(self, verb: str, resource: str, name: str | None = None) -> Op:
        return Op(verb, resource, _GROUPS.get(resource.split("/")[0], ""), self.namespace, name)

    def _read_deployment(self, name: str) -> k8s.V1Deployment:
        return self.kube.call(self._op("get", "deployments", name), self.kube.apps.read_namespaced_deployment,
                              name, self.namespace)

    def _patch_deployment(self, name: str, body: dict[str, Any]) -> k8s.V1Deployment:
        return self.kube.call(self._op("patch", "deployments", name), self.kube.apps.patch_namespaced_deployment,
                              name, self.namespace, body, _content_type=MERGE_PATCH)

    def _scale(self, name: str, replicas: int) -> None:
        log.info("scaling deployment %s/%s to %d", self.namespace, name, replicas)
        self.kube.call(self._op("patch", "deployments/scale", name), self.kube.apps.patch_namespaced_deployment_scale,
                       name, self.namespace, {"spec": {"replicas": replicas}}, _content_type=MERGE_PATCH)

    def _count_pods(self, selector: str) -> int:
        pods = self.kube.call(self._op("list", "pods"), self.kube.core.list_namespaced_pod, self.namespace,
                              label_selector=selector)
        return len(pods.items or [])

    def _read_ingress(self, name: str) -> dict[str, Any]:
        ing = self.kube.call(self._op("get", "ingresses", name), self.kube.networking.read_namespaced_ingress,
                             name, self.namespace)
        return self.kube.to_dict(ing)

    def _patch_ingress(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        ing = self.kube.call(self._op("patch", "ingresses", name), self.kube.networking.patch_namespaced_ingress,
                             name, self.namespace, body, _content_type=MERGE_PATCH)
        return self.kube.to_dict(ing)

    def _wait(self, check: Callable[[], tuple[bool, str]], timeout: float | None, *, what: str,
              world_state: str, resume_hint: str) -> None:
        """Poll `check` until it says done; raise `OperationTimedOut` after `timeout` seconds."""
        limit = self.wait_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            done, detail = check()
            if done:
                return
            if time.monotonic() >= deadline:
                raise OperationTimedOut(f"{what} did not happen within {limit:.0f} s ({detail})",
                                        world_state=world_state, resume_hint=resume_hint)
            time.sleep(self.poll_interval)

    def _wait_ready(self, names: list[str], timeout: float | None, *, what: str, world_state: str,
                    resume_hint: str) -> None:
        def check() -> tuple[bool, str]:
            states = [_rollout(self._read_deployment(n)) for n in names]
            return all(done for done, _ in states), "; ".join(d for _, d in states)

        self._wait(check, timeout, what=what, world_state=world_state, resume_hint=resume_hint)

    # --- names -----------------------------------------------------------------------------

    def temp_host_for(self, main_host: str) -> str:
        """The temporary host: `<service>-temp.<domain>` in production, `<service>-temp.test.<domain>` elsewhere.

        `<domain>` is the main host minus its first label (and minus a leading `test.`, so a
        test host `apply-qa.test.example.org` gives `apply-temp.test.example.org`).
        """
        if self.temp_host:
            return self.temp_host
        labels = main_host.split(".")[1:]
        if labels[:1] == ["test"]:
            labels = labels[1:]
        if len(labels) < 2:
            raise PlatformError(f"cannot derive the temporary host from the main host '{main_host}'; "
                                "set temp_host for this environment")
        return f"{self.service}-temp.{'' if self.production else 'test.'}{'.'.join(labels)}"

    # --- status ----------------------------------------------------------------------------

    def get_status(self) -> AppStatus:
        """Ready replicas, recorded counts, and whether the main ingress points at the maintenance page."""
        ing = self._read_ingress(self.ingress)
        host = _main_host(ing)
        maintenance = (BACKENDS_ANNOTATION in (ing["metadata"].get("annotations") or {})
                       or _points_at(ing.get("spec", {}), self.maintenance))
        replicas: dict[str, int] = {}
        recorded: dict[str, int] = {}
        for role, name in self.deployments.items():
            dep = self._read_deployment(name)
            replicas[role] = (dep.status.ready_replicas if dep.status else None) or 0
            count = _recorded_replicas(dep)
            if count is not None:
                recorded[role] = count
        return AppStatus(
            maintenance=maintenance, replicas=replicas, recorded_replicas=recorded or None,
            main_url=f"https://{host}", temp_url=f"https://{self.temp_host_for(host)}" if maintenance else None,
        )

    def healthcheck(self, url: str | None = None, timeout: float = 10.0) -> tuple[int, str]:
        """GET the healthcheck: `url`, else the configured `healthcheck_url`, else the app's URL."""
        return super().healthcheck(url or self.healthcheck_url, timeout)

    # --- replicas --------------------------------------------------------------------------

    def scale_down(self, *, timeout: float | None = None) -> dict[str, int]:
        """Record each deployment's replica count on it, scale web and worker to 0, wait for their pods to go.

        Idempotent: a count already recorded is kept, so a second scale-down does not record 0.

        Args:
            timeout: seconds to wait for the pods to go; the instance's `wait_timeout` when None.

        Returns:
            The recorded counts by role (`web`, `worker`).

        Raises:
            OperationTimedOut: pods were still there after `timeout`.
            PlatformError: the API refused a call (TransientPlatformError when a retry may help).
        """
        deps = {role: self._read_deployment(name) for role, name in self.deployments.items()}
        recorded: dict[str, int] = {}
        # 1. record every count before anything stops; the first recording wins
        for role, dep in deps.items():
            count = _recorded_replicas(dep)
            if count is None:
                count = _spec_replicas(dep)
                log.info("recording %s/%s replicas=%d", self.namespace, dep.metadata.name, count)
                deps[role] = self._patch_deployment(dep.metadata.name, {"metadata": {
                    # resourceVersion: a scale by someone else since our read fails the patch instead of being lost
                    "resourceVersion": dep.metadata.resource_version,
                    "annotations": {REPLICAS_ANNOTATION: json.dumps({"replicas": count, "recordedAt": _now()})},
                }})
            elif _spec_replicas(dep) not in (0, count):
                log.warning("deployment %s/%s runs %d replicas but keeps the count %d recorded by an earlier "
                            "scale-down; that count will be restored", self.namespace, dep.metadata.name,
                            _spec_replicas(dep), count)
            recorded[role] = count
        # 2. scale to 0
        for dep in deps.values():
            if _spec_replicas(dep) != 0:
                self._scale(dep.metadata.name, 0)
        # 3. wait until no pod is left to hold a database connection
        selectors = {dep.metadata.name: label_selector(dep) for dep in deps.values()}

        def pods_gone() -> tuple[bool, str]:
            left = {name: self._count_pods(sel) for name, sel in selectors.items()}
            return not any(left.values()), ", ".join(f"{n}: {c} pod(s) left" for n, c in left.items() if c)

        self._wait(pods_gone, timeout, what=f"pods of {', '.join(selectors)} in namespace '{self.namespace}' stopping",
                   world_state=f"replicas set to 0; counts recorded on the deployments ({recorded})",
                   resume_hint="run the scale-down again; it keeps the recorded counts")
        return recorded

    def scale_up(self, *, timeout: float | None = None) -> dict[str, int]:
        """Restore exactly the recorded replica counts, wait for readiness, then drop the record.

        A deployment without a recorded count keeps its current count.

        Args:
            timeout: seconds to wait for readiness; the instance's `wait_timeout` when None.

        Returns:
            The restored (or current) counts by role.

        Raises:
            OperationTimedOut: replicas not ready after `timeout`; the record is kept.
            PlatformError: the API refused a call (TransientPlatformError when a retry may help).
        """
        deps = {role: self._read_deployment(name) for role, name in self.deployments.items()}
        counts: dict[str, int] = {}
        # 1. restore exactly the recorded counts
        for role, dep in deps.items():
            count = _recorded_replicas(dep)
            counts[role] = _spec_replicas(dep) if count is None else count
            if count is not None and _spec_replicas(dep) != count:
                self._scale(dep.metadata.name, count)
        # 2. wait until every replica is ready
        self._wait_ready([d.metadata.name for d in deps.values()], timeout,
                         what=f"replicas of {', '.join(self.deployments.values())} becoming ready",
                         world_state=f"replicas set to {counts}; the recorded counts are kept on the deployments",
                         resume_hint="run the scale-up again once the pods can start (see kubectl describe pod)")
        # 3. forget the record only now, so a scale-up that timed out can simply be run again
        for dep in deps.values():
            if REPLICAS_ANNOTATION in (dep.metadata.annotations or {}):
                self._patch_deployment(dep.metadata.name, {"metadata": {"annotations": {REPLICAS_ANNOTATION: None}}})
        return counts

    # --- maintenance -----------------------------------------------------------------------

    def enable_maintenance(self, *, timeout: float | None = None) -> AppStatus:
        """Send users to the maintenance page; the temporary host still reaches the app.

        Each step is skipped when already done, so running it again after any failure
        finishes the job.

        Args:
            timeout: seconds to wait for the maintenance page to be ready.

        Raises:
            PlatformError: the maintenance deployment is missing, the main ingress already points at
                it without a record of its original backends, or the API refused a call.
            OperationTimedOut: the maintenance page did not become ready; users still reach the app.
        """
        # 1. the maintenance page runs, with a service in front of it
        port = self._start_maintenance_page(timeout)
        maintenance_backend = {"service": {"name": self.maintenance, "port": {"number": port}}}
        # 2. the main ingress sends users there; its original backends are recorded in the same patch
        ing = self._read_ingress(self.ingress)
        spec = ing.get("spec", {})
        record = self._backends_record(ing)
        if record is None:
            if _points_at(spec, self.maintenance):
                raise PlatformError(
                    f"ingress '{self.ingress}' in namespace '{self.namespace}' already points at '{self.maintenance}' "
                    f"but carries no {BACKENDS_ANNOTATION} annotation, so its original backends are unknown; "
                    "point it back at the app by hand (or re-deploy it), then run this again")
            record = {"backends": [{"key": k, "backend": b} for k, b in _backends(spec)]}
            log.info("pointing ingress %s/%s at %s", self.namespace, self.ingress, self.maintenance)
            ing = self._patch_ingress(self.ingress, {
                "metadata": {"resourceVersion": ing["metadata"].get("resourceVersion"),
                             "annotations": {BACKENDS_ANNOTATION: json.dumps(record, sort_keys=True)}},
                "spec": _rebackend(spec, lambda _k, _b: maintenance_backend),
            })
        else:
            routing = _rebackend(spec, lambda _k, _b: maintenance_backend)
            if routing != _routing(spec):  # repointed back by hand or by a deploy; the record still holds
                log.info("re-pointing ingress %s/%s at %s", self.namespace, self.ingress, self.maintenance)
                ing = self._patch_ingress(self.ingress, {
                    "metadata": {"resourceVersion": ing["metadata"].get("resourceVersion")}, "spec": routing})
        # 3. the temporary ingress sends the temporary host to the app's original backends
        self._ensure_temp_ingress(ing, record)
        return self.get_status()

    def disable_maintenance(self) -> AppStatus:
        """Send users back to the app; the temporary host goes away and the maintenance page stops.

        Each step is skipped when already done, so running it again after any failure
        (or after an enable that stopped half-way) finishes the job.

        Raises:
            PlatformError: the main ingress points at the maintenance page with no record of its
                original backends, the temporary ingress is not ours, or the API refused a call.
        """
        # 1. the main ingress gets its recorded backends back; the record goes in the same patch
        ing = self._read_ingress(self.ingress)
        spec = ing.get("spec", {})
        record = self._backends_record(ing)
        if record is not None:
            original = {e["key"]: e["backend"] for e in record["backends"]}
            routing = _rebackend(spec, lambda k, b: original.get(k, b))
            missing = [k for k, b in _backends(routing) if _service_of(b) == self.maintenance]
            if missing:
                raise PlatformError(
                    f"ingress '{self.ingress}' in namespace '{self.namespace}' has paths {missing} pointing at "
                    f"'{self.maintenance}' with no recorded original backend (its rules changed during maintenance); "
                    "point them at the app by hand, remove the annotation "
                    f"{BACKENDS_ANNOTATION}, then run this again")
            log.info("pointing ingress %s/%s back at the app", self.namespace, self.ingress)
            self._patch_ingress(self.ingress, {
                "metadata": {"resourceVersion": ing["metadata"].get("resourceVersion"),
                             "annotations": {BACKENDS_ANNOTATION: None}},
                "spec": routing,
            })
        elif _points_at(spec, self.maintenance):
            raise PlatformError(
                f"ingress '{self.ingress}' in namespace '{self.namespace}' points at '{self.maintenance}' but carries "
                f"no {BACKENDS_ANNOTATION} annotation, so its original backends are unknown; point it back at the "
                "app by hand (or re-deploy it)")
        # 2. the temporary ingress goes
        self._delete_temp_ingress()
        # 3. the maintenance page stops
        try:
            page = self._read_deployment(self.maintenance)
        except KubeNotFound:
            page = None
        if page is not None and _spec_replicas(page) != 0:
            self._scale(self.maintenance, 0)
        return self.get_status()

    def _backends_record(self, ing: dict[str, Any]) -> dict[str, Any] | None:
        raw = (ing["metadata"].get("annotations") or {}).get(BACKENDS_ANNOTATION)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
            if not all(isinstance(e["key"], str) and isinstance(e["backend"], dict) for e in record["backends"]):
                raise ValueError("malformed entry")
        except (ValueError, KeyError, TypeError) as exc:
            raise PlatformError(f"ingress '{self.ingress}' carries an unreadable {BACKENDS_ANNOTATION} annotation; "
                                f"restore its backends by hand from: {raw!r}") from exc
        return record

    def _start_maintenance_page(self, timeout: float | None) -> int:
        """Make sure the maintenance deployment runs and has a service; returns the service port."""
        try:
            page = self._read_deployment(self.maintenance)
        except KubeNotFound as exc:
            raise PlatformError(f"the maintenance deployment '{self.maintenance}' does not exist in namespace "
                                f"'{self.namespace}'; deploy the maintenance page first (docs/kubernetes.md)") from exc
        port = self._ensure_maintenance_service(page)
        if _spec_replicas(page) < 1:
            self._scale(self.maintenance, 1)
        self._wait_ready([self.maintenance], timeout, what=f"the maintenance page '{self.maintenance}' becoming ready",
                         world_state="users still reach the app; the main ingress is unchanged",
                         resume_hint="run enable-maintenance again once the maintenance pod can start")
        return port

    def _ensure_maintenance_service(self, page: k8s.V1Deployment) -> int:
        op = self._op("get", "services", self.maintenance)
        try:
            svc = self.kube.call(op, self.kube.core.read_namespaced_service, self.maintenance, self.namespace)
        except KubeNotFound:
            selector = (page.spec.selector.match_labels if page.spec and page.spec.selector else None) or {}
            if not selector:
                raise PlatformError(f"deployment '{self.maintenance}' has no matchLabels selector to build its service "
                                    "from; create the service by hand")
            containers = page.spec.template.spec.containers if page.spec.template.spec else []
            ports = [p.container_port for c in containers for p in (c.ports or [])]
            body = {
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": self.maintenance, "namespace": self.namespace,
                             "labels": {TAG_CREATED_BY: TAG_CREATED_BY_VALUE, TAG_PURPOSE: "maintenance-page"}},
                "spec": {"selector": dict(selector),
                         "ports": [{"name": "http", "port": 80, "targetPort": ports[0] if ports else 80,
                                    "protocol": "TCP"}]},
            }
            log.info("creating service %s/%s", self.namespace, self.maintenance)
            try:
                svc = self.kube.call(self._op("create", "services", self.maintenance),
                                     self.kube.core.create_namespaced_service, self.namespace, body)
            except KubeAlreadyExists:
                svc = self.kube.call(op, self.kube.core.read_namespaced_service, self.maintenance, self.namespace)
        ports = svc.spec.ports or []
        if not ports:
            raise PlatformError(f"service '{self.maintenance}' in namespace '{self.namespace}' has no port")
        return int(next((p.port for p in ports if p.name == "http"), ports[0].port))

    def _temp_spec(self, main: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        """The temporary ingress's spec: the main host's original paths, on the temporary host."""
        host = _main_host(main)
        temp_host = self.temp_host_for(host)
        original = {e["key"]: e["backend"] for e in record["backends"]}
        paths = []
        for rule in main.get("spec", {}).get("rules") or []:
            if rule.get("host") != host:
                continue
            for path in (rule.get("http") or {}).get("paths") or []:
                entry = {k: path[k] for k in ("path", "pathType") if path.get(k) is not None}
                entry["backend"] = original.get(_path_key(host, path), path.get("backend"))
                paths.append(entry)
        if not paths and "default" in original:
            paths = [{"path": "/", "pathType": "Prefix", "backend": original["default"]}]
        spec: dict[str, Any] = {"rules": [{"host": temp_host, "http": {"paths": paths}}]}
        if main["spec"].get("ingressClassName"):
            spec["ingressClassName"] = main["spec"]["ingressClassName"]
        secrets = [t["secretName"] for t in main["spec"].get("tls") or [] if t.get("secretName")]
        if secrets:  # the main host's certificate: works when it is a wildcard covering the temporary host
            spec["tls"] = [{"hosts": [temp_host], "secretName": secrets[0]}]
        return spec

    def _ensure_temp_ingress(self, main: dict[str, Any], record: dict[str, Any]) -> None:
        want = self._temp_spec(main, record)
        compared = ("rules", "ingressClassName", "tls")
        try:
            current = self._read_ingress(self.temp_ingress)
        except KubeNotFound:
            annotations = {k: v for k, v in (main["metadata"].get("annotations") or {}).items()
                           if not k.startswith(_NOT_COPIED)}
            body = {
                "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                "metadata": {"name": self.temp_ingress, "namespace": self.namespace,
                             "labels": {TAG_CREATED_BY: TAG_CREATED_BY_VALUE, TAG_PURPOSE: "maintenance-temp-host"},
                             "annotations": {**annotations, TEMP_FOR_ANNOTATION: self.ingress}},
                "spec": want,
            }
            log.info("creating ingress %s/%s for %s", self.namespace, self.temp_ingress, want["rules"][0]["host"])
            try:
                self.kube.call(self._op("create", "ingresses", self.temp_ingress),
                               self.kube.networking.create_namespaced_ingress, self.namespace, body)
                return
            except KubeAlreadyExists:
                current = self._read_ingress(self.temp_ingress)
        self._check_ours(current)
        if any(current["spec"].get(k) != want.get(k) for k in compared):
            log.info("updating ingress %s/%s", self.namespace, self.temp_ingress)
            self._patch_ingress(self.temp_ingress, {"spec": {k: want.get(k) for k in compared}})

    def _delete_temp_ingress(self) -> None:
        try:
            current = self._read_ingress(self.temp_ingress)
        except KubeNotFound:
            return
        self._check_ours(current)
        log.info("deleting ingress %s/%s", self.namespace, self.temp_ingress)
        try:
            self.kube.call(self._op("delete", "ingresses", self.temp_ingress),
                           self.kube.networking.delete_namespaced_ingress, self.temp_ingress, self.namespace)
        except KubeNotFound:
            pass

    def _check_ours(self, ing: dict[str, Any]) -> None:
        if (ing["metadata"].get("labels") or {}).get(TAG_CREATED_BY) != TAG_CREATED_BY_VALUE:
            raise PlatformError(f"ingress '{self.temp_ingress}' in namespace '{self.namespace}' exists but was not "
                                f"created by this tool (no {TAG_CREATED_BY}={TAG_CREATED_BY_VALUE} label); "
                                "rename or remove it by hand")
