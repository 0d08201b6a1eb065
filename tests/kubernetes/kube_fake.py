"""A small, honest HTTP fake of the Kubernetes API endpoints the app backend uses.

Served by the stdlib `ThreadingHTTPServer` on 127.0.0.1, reached by the real
`kubernetes` client through a generated kubeconfig. What it does like the API server:

- routes: apps/v1 deployments (get, patch) and their `scale` subresource (get, patch);
  networking.k8s.io/v1 ingresses (list, get, create, patch, delete); core/v1 services
  (get, create) and pods (list with `labelSelector`). Anything else is a 404 Status.
- bearer-token authentication (401 without it), RBAC denials per (verb, resource) (403
  with the API server's message), errors as `Status` objects with `reason` and `code`.
- `metadata.resourceVersion` bumped on every write; a patch that names a stale one gets
  409 Conflict; `metadata.generation` bumped on spec changes; create of an existing name
  gets 409 AlreadyExists.
- PATCH with `application/merge-patch+json` (RFC 7386) and
  `application/strategic-merge-patch+json`; the latter is applied as a merge patch, which
  is what Kubernetes does for every field used here (maps, and ingress `rules`, an atomic
  list). JSON patch with an object body is rejected as the API server rejects it; other
  patch types are 415.
- light validation: annotation and label values must be strings, replicas a non-negative
  integer, ingress paths need `pathType` and a service backend with a port.
- a controller: `settle_delay` seconds after a deployment's replicas change, its status
  (`observedGeneration`, `replicas`, `readyReplicas`, ...) catches up and its pods are
  created or deleted to match (omitting zero counts, as the API does).

What it does not do: watches, field selectors, server-side apply, JSON patch, admission,
finalizers, real scheduling. Faults are injected with `fail_next`, RBAC limits with `deny`
or `allowed`, and other actors (kubectl, an HPA) with `after_next` and `scale`.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "fake-token-for-tests"
USER = "system:serviceaccount:dr:dr-orchestrator"

ROUTES = [
    (re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/(?P<res>deployments)(?:/(?P<name>[^/]+)(?:/(?P<sub>scale))?)?$"),
     "apps", "Deployment"),
    (re.compile(r"^/apis/networking\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/(?P<res>ingresses)(?:/(?P<name>[^/]+))?$"),
     "networking.k8s.io", "Ingress"),
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<res>services|pods)(?:/(?P<name>[^/]+))?$"), "", None),
]
API_VERSION = {"deployments": "apps/v1", "ingresses": "networking.k8s.io/v1", "services": "v1", "pods": "v1"}
KIND = {"deployments": "Deployment", "ingresses": "Ingress", "services": "Service", "pods": "Pod"}
#: what the fake serves: (method, resource, with a name) -> RBAC verb
VERBS = {
    ("GET", "deployments", True): "get", ("PATCH", "deployments", True): "patch",
    ("GET", "deployments/scale", True): "get", ("PATCH", "deployments/scale", True): "patch",
    ("GET", "ingresses", False): "list", ("GET", "ingresses", True): "get", ("POST", "ingresses", False): "create",
    ("PATCH", "ingresses", True): "patch", ("DELETE", "ingresses", True): "delete",
    ("GET", "services", True): "get", ("POST", "services", False): "create",
    ("GET", "pods", False): "list",
}
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "details": self.details, "code": self.code}


@dataclass
class Request:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: Any
    status: int = 0

    @property
    def mutating(self) -> bool:
        return self.method in MUTATING


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    code: int
    reason: str
    times: int


@dataclass
class FakeKube:
    """The fake API server's state and behaviour; `start()` serves it over HTTP."""

    settle_delay: float = 0.2
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    denied: set[tuple[str, str]] = field(default_factory=set)
    allowed: set[tuple[str, str]] | None = None  # when set, RBAC grants only these (verb, resource)
    faults: list[Fault] = field(default_factory=list)
    hooks: list[tuple[str, re.Pattern[str], Any]] = field(default_factory=list)
    pods_stuck: bool = False  # pods never go away (a stuck finalizer, say)
    never_ready: bool = False  # new pods never become ready
    lock: threading.RLock = field(default_factory=threading.RLock)
    _rv: int = 1000
    _changed: dict[tuple[str, str], float] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None

    # --- serving ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeKube":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                code, payload = fake.handle(self.command, self.path, dict(self.headers.items()), raw)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def write_kubeconfig(self, path: Path, *, context: str = "fake") -> Path:
        """A kubeconfig whose context `context` points at this server with its bearer token."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "dr", "user": {"token": TOKEN}}],
            "contexts": [{"name": context, "context": {"cluster": "fake", "user": "dr"}}],
        }
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    # --- test controls ---------------------------------------------------------------------

    def deny(self, verb: str, resource: str) -> None:
        """Make RBAC forbid `verb` on `resource` (e.g. "patch", "deployments/scale")."""
        self.denied.add((verb, resource))

    def fail_next(self, method: str, path_pattern: str, code: int = 500, *, times: int = 1,
                  reason: str = "InternalError") -> None:
        """Answer the next `times` requests matching method and path regex with an error."""
        self.faults.append(Fault(method, re.compile(path_pattern), code, reason, times))

    def after_next(self, method: str, path_pattern: str, action: Any) -> None:
        """Run `action()` once, right after the next request matching method and path regex is answered."""
        self.hooks.append((method, re.compile(path_pattern), action))

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        """Someone else (kubectl scale, an HPA) changes a deployment's replicas."""
        with self.lock:
            dep = copy.deepcopy(self.objects[("deployments", namespace, name)])
            dep["spec"]["replicas"] = replicas
            self._store("deployments", namespace, dep, previous=self.objects[("deployments", namespace, name)])

    def mutations(self, since: int = 0) -> list[Request]:
        """Mutating requests the fake accepted (2xx), from request index `since`."""
        return [r for r in self.requests[since:] if r.mutating and 200 <= r.status < 300]

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        """A stored object (after letting the controller catch up)."""
        with self.lock:
            self._reconcile()
            return copy.deepcopy(self.objects[(resource, namespace, name)])

    def exists(self, resource: str, namespace: str, name: str) -> bool:
        with self.lock:
            return (resource, namespace, name) in self.objects

    def pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        with self.lock:
            self._reconcile()
            return [p for (r, ns, _), p in self.objects.items() if r == "pods" and ns == namespace
                    and all(p["metadata"]["labels"].get(k) == v for k, v in labels.items())]

    # --- seeding -----------------------------------------------------------------------------

    def add_deployment(self, namespace: str, name: str, replicas: int, *, port: int = 8080) -> dict[str, Any]:
        labels = {"app": name}
        dep = {
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels), "annotations": {}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": dict(labels)},
                     "template": {"metadata": {"labels": dict(labels)},
                                  "spec": {"containers": [{"name": name, "image": f"example/{name}:1",
                                                           "ports": [{"containerPort": port}]}]}}},
            "status": {},
        }
        with self.lock:
            self._store("deployments", namespace, dep)
            self._settle(namespace, name)
        return dep

    def add_service(self, namespace: str, name: str, port: int, selector: dict[str, str]) -> None:
        with self.lock:
            self._store("services", namespace, {
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"selector": selector, "ports": [{"name": "http", "port": port, "targetPort": 8080,
                                                          "protocol": "TCP"}], "type": "ClusterIP"}})

    def add_ingress(self, namespace: str, name: str, spec: dict[str, Any],
                    annotations: dict[str, str] | None = None) -> None:
        with self.lock:
            self._store("ingresses", namespace, {"metadata": {"name": name, "namespace": namespace,
                                                              "annotations": dict(annotations or {})},
                                                 "spec": copy.deepcopy(spec)})

    # --- the API -------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        url = urlsplit(raw_path)
        query = parse_qs(url.query)
        ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        req = Request(method, url.path, query, ctype, body)
        with self.lock:
            self.requests.append(req)
            try:
                code, payload = self._dispatch(req, headers)
            except ApiError as exc:
                code, payload = exc.code, exc.status()
            req.status = code
            for hook in list(self.hooks):
                if hook[0] == method and hook[1].search(req.path):
                    self.hooks.remove(hook)
                    hook[2]()
            return code, copy.deepcopy(payload)

    def _dispatch(self, req: Request, headers: dict[str, str]) -> tuple[int, Any]:
        auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        if auth != f"Bearer {TOKEN}":
            raise ApiError(401, "Unauthorized", "Unauthorized")
        for route, group, _ in ROUTES:
            m = route.match(req.path)
            if m:
                break
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        ns, res, name, sub = m["ns"], m["res"], m["name"], m.groupdict().get("sub")
        resource = f"{res}/{sub}" if sub else res
        verb = VERBS.get((req.method, resource, name is not None))
        if verb is None:
            raise ApiError(405, "MethodNotAllowed", f"the fake does not serve {req.method} {resource}")
        if (verb, resource) in self.denied or (self.allowed is not None and (verb, resource) not in self.allowed):
            obj = f"{res}{'.' + group if group else ''} \"{name}\" is" if name else f"{res}{'.' + group if group else ''} is"
            raise ApiError(403, "Forbidden", f"{obj} forbidden: User \"{USER}\" cannot {verb} resource \"{resource}\" "
                           f"in API group \"{group}\" in the namespace \"{ns}\"",
                           {"name": name or "", "group": group, "kind": res})
        for fault in self.faults:
            if fault.times > 0 and fault.method == req.method and fault.path.search(req.path):
                fault.times -= 1
                raise ApiError(fault.code, fault.reason, f"injected fault ({fault.code})")
        self._reconcile()
        return getattr(self, f"_{verb}")(req, res, ns, name, sub)

    # verbs

    def _obj(self, res: str, ns: str, name: str) -> dict[str, Any]:
        obj = self.objects.get((res, ns, name))
        if obj is None:
            group = {"deployments": ".apps", "ingresses": ".networking.k8s.io"}.get(res, "")
            raise ApiError(404, "NotFound", f"{res}{group} \"{name}\" not found",
                           {"name": name, "group": group.lstrip("."), "kind": res})
        return obj

    def _get(self, req: Request, res: str, ns: str, name: str, sub: str | None) -> tuple[int, Any]:
        obj = self._obj(res, ns, name)
        return 200, (self._scale_of(obj) if sub else obj)

    def _list(self, req: Request, res: str, ns: str, name: None, sub: None) -> tuple[int, Any]:
        match = parse_selector(req.query.get("labelSelector", [""])[0])
        items = [o for (r, n, _), o in sorted(self.objects.items()) if r == res and n == ns
                 and match(o["metadata"].get("labels") or {})]
        return 200, {"kind": KIND[res] + "List", "apiVersion": API_VERSION[res],
                     "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _create(self, req: Request, res: str, ns: str, name: None, sub: None) -> tuple[int, Any]:
        body = req.body
        if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
            raise ApiError(422, "Invalid", f"{KIND[res]} is invalid: metadata.name: Required value")
        if body["metadata"].get("namespace", ns) != ns:
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                           "sent on the request")
        obj_name = body["metadata"]["name"]
        if (res, ns, obj_name) in self.objects:
            raise ApiError(409, "AlreadyExists", f"{res} \"{obj_name}\" already exists",
                           {"name": obj_name, "kind": res})
        obj = copy.deepcopy(body)
        obj.pop("status", None)
        self._validate(res, obj)
        return 201, self._store(res, ns, obj)

    def _delete(self, req: Request, res: str, ns: str, name: str, sub: None) -> tuple[int, Any]:
        obj = self._obj(res, ns, name)
        del self.objects[(res, ns, name)]
        self._rv += 1
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                     "details": {"name": name, "kind": res, "uid": obj["metadata"]["uid"]}}

    def _patch(self, req: Request, res: str, ns: str, name: str, sub: str | None) -> tuple[int, Any]:
        obj = self._obj(res, ns, name)
        ctype = (req.content_type or "").split(";")[0].strip()
        if ctype == "application/json-patch+json":
            if not isinstance(req.body, list):
                raise ApiError(400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
            raise ApiError(415, "UnsupportedMediaType", "the fake does not implement JSON patch")
        if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                           f"accepted media types include: application/json-patch+json, "
                           f"application/merge-patch+json, application/apply-patch+yaml, "
                           f"application/strategic-merge-patch+json (got {ctype!r})")
        if not isinstance(req.body, dict):
            raise ApiError(400, "BadRequest", "patch body must be a JSON object")
        if any(k.startswith("$") for k in _all_keys(req.body)):
            raise ApiError(415, "UnsupportedMediaType", "the fake does not implement strategic-merge directives")
        patch_rv = (req.body.get("metadata") or {}).get("resourceVersion")
        if patch_rv is not None and patch_rv != obj["metadata"]["resourceVersion"]:
            group = {"deployments": ".apps", "ingresses": ".networking.k8s.io"}.get(res, "")
            raise ApiError(409, "Conflict", f"Operation cannot be fulfilled on {res}{group} \"{name}\": the object has "
                           "been modified; please apply your changes to the latest version and try again")
        if sub == "scale":
            scale = merge_patch(self._scale_of(obj), req.body)
            replicas = (scale.get("spec") or {}).get("replicas")
            new = copy.deepcopy(obj)
            new["spec"]["replicas"] = replicas
        else:
            new = merge_patch(obj, req.body)
            for key in ("name", "namespace", "uid", "creationTimestamp"):
                if new["metadata"].get(key) != obj["metadata"].get(key):
                    raise ApiError(422, "Invalid", f"metadata.{key}: field is immutable")
            new["status"] = obj.get("status", {})
        self._validate(res, new)
        stored = self._store(res, ns, new, previous=obj)
        return 200, (self._scale_of(stored) if sub else stored)

    # state

    def _store(self, res: str, ns: str, obj: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
        self._rv += 1
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = ns
        meta["resourceVersion"] = str(self._rv)
        obj["apiVersion"], obj["kind"] = API_VERSION[res], KIND[res]
        if previous is None:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            meta["generation"] = 1
        elif obj.get("spec") != previous.get("spec"):
            meta["generation"] = previous["metadata"].get("generation", 1) + 1
        if res == "deployments" and (previous is None or obj["spec"] != previous["spec"]):
            self._changed[(ns, meta["name"])] = time.monotonic()
        self.objects[(res, ns, meta["name"])] = obj
        return obj

    def _scale_of(self, dep: dict[str, Any]) -> dict[str, Any]:
        meta = dep["metadata"]
        selector = ",".join(f"{k}={v}" for k, v in sorted(dep["spec"]["selector"]["matchLabels"].items()))
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
                             "resourceVersion": meta["resourceVersion"]},
                "spec": {"replicas": dep["spec"]["replicas"]},
                "status": {"replicas": dep.get("status", {}).get("replicas", 0), "selector": selector}}

    def _validate(self, res: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        for key in ("annotations", "labels"):
            for k, v in (meta.get(key) or {}).items():
                if not isinstance(v, str):
                    raise ApiError(400, "BadRequest", f"json: cannot unmarshal {type(v).__name__} into Go struct field "
                                   f"ObjectMeta.metadata.{key} of type string ({k})")
        if res == "deployments":
            n = obj["spec"].get("replicas")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ApiError(422, "Invalid", f"spec.replicas: Invalid value: {n!r}: must be a non-negative integer")
        if res == "ingresses":
            spec = obj.get("spec") or {}
            backends = [spec["defaultBackend"]] if spec.get("defaultBackend") is not None else []
            for rule in spec.get("rules") or []:
                for path in (rule.get("http") or {}).get("paths") or []:
                    if not path.get("pathType"):
                        raise ApiError(422, "Invalid", "Ingress is invalid: spec.rules[].http.paths[].pathType: "
                                       "Required value")
                    backends.append(path.get("backend"))
            for b in backends:
                svc = (b or {}).get("service") or {}
                port = svc.get("port") or {}
                if not svc.get("name") or not (port.get("number") or port.get("name")):
                    raise ApiError(422, "Invalid", f"Ingress is invalid: backend {b!r}: a service name and port are "
                                   "required")

    def _settle(self, ns: str, name: str) -> None:
        """The deployment controller and kubelet, done: status and pods match spec.replicas."""
        dep = self.objects[("deployments", ns, name)]
        want = dep["spec"]["replicas"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        owner = f"{name}-rs"  # pods belong to the deployment's (one, implicit) ReplicaSet
        pods = [k for k, p in self.objects.items() if k[0] == "pods" and k[1] == ns
                and p["metadata"]["ownerReferences"][0]["name"] == owner]
        if len(pods) > want and not self.pods_stuck:
            for key in pods[want:]:
                del self.objects[key]
            pods = pods[:want]
        while len(pods) < want:
            pod_name = f"{name}-{uuid.uuid4().hex[:10]}"
            self.objects[("pods", ns, pod_name)] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": ns, "labels": dict(labels),
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": owner,
                                                  "uid": dep["metadata"]["uid"], "controller": True}],
                             "uid": str(uuid.uuid4()), "resourceVersion": str(self._rv)},
                "spec": copy.deepcopy(dep["spec"]["template"]["spec"]),
                "status": {"phase": "Running"},
            }
            pods.append(("pods", ns, pod_name))
        ready = 0 if self.never_ready else want
        status: dict[str, Any] = {"observedGeneration": dep["metadata"]["generation"]}
        for key, n in (("replicas", len(pods)), ("updatedReplicas", len(pods)), ("readyReplicas", ready),
                       ("availableReplicas", ready)):
            if n:
                status[key] = n  # the API omits zero counts
        dep["status"] = status

    def _reconcile(self) -> None:
        now = time.monotonic()
        for (ns, name), changed in list(self._changed.items()):
            if ("deployments", ns, name) not in self.objects:
                del self._changed[(ns, name)]
            elif now - changed >= self.settle_delay:
                self._settle(ns, name)
                if not self.pods_stuck and not self.never_ready:
                    del self._changed[(ns, name)]


def _all_keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [k for k in value] + [k2 for v in value.values() for k2 in _all_keys(v)]
    if isinstance(value, list):
        return [k for v in value for k in _all_keys(v)]
    return []


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def parse_selector(text: str) -> Any:
    """A label selector string (`a=b,c!=d,e in (f,g),h notin (i),j,!k`) as a predicate on labels."""
    terms = [t.strip() for t in re.split(r",(?![^()]*\))", text) if t.strip()]
    tests = []
    for term in terms:
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, op, values = m[1], m[2], {v.strip() for v in m[3].split(",")}
            tests.append(lambda lb, k=key, o=op, vs=values: (lb.get(k) in vs) == (o == "in"))
        elif m := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)", term):
            key, op, value = m[1], m[2], m[3]
            tests.append(lambda lb, k=key, o=op, v=value: (lb.get(k) == v) == (o != "!="))
        elif m := re.fullmatch(r"!([\w./-]+)", term):
            tests.append(lambda lb, k=m[1]: k not in lb)
        elif re.fullmatch(r"[\w./-]+", term):
            tests.append(lambda lb, k=term: k in lb)
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return lambda labels: all(t(labels) for t in tests)
