"""A fake Kubernetes API server on loopback: list and watch, as the real one speaks them.

It stands in for a kube-apiserver, which cannot run here (no registry reached has one; kind
and k3s need Docker). What it serves is the wire protocol the discovery source and `kubectl`
use, for EndpointSlices (discovery.k8s.io/v1), Pods (v1) and InferencePools
(inference.networking.k8s.io/v1), namespaced:

- list: `{"kind": "<Kind>List", "metadata": {"resourceVersion": "N"}, "items": [...]}`, with
  `labelSelector` (`k=v`, `k!=v`, comma-joined) and `fieldSelector` (`metadata.name=`);
- watch (`?watch=1`): chunked JSON lines `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR,
  "object": ...}` from `resourceVersion` (replayed from a bounded history; none or "0" starts
  with the current objects as ADDED), BOOKMARKs with `allowWatchBookmarks`, ended after
  `timeoutSeconds`; a version older than the history gets 200 and one ERROR event carrying a
  Status 410 "Expired" (what the real server does), then the stream ends;
- faults on demand: cut every open watch (no chunked terminator), 403 Forbidden Status objects
  as RBAC sends them, malformed watch lines, compaction (the next resume gets 410), a bearer
  token requirement (401), TLS (the in-cluster path), and stop/start on the same port with the
  store kept (an API server restart).

Objects are changed through Python (`put`, `delete`, ...) or the control API under
`/_fake/` (used by the demo and by tests that drive it from another process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import json
import ssl
import sys
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

#: resource plural -> (API path prefix, apiVersion, Kind)
RESOURCES: dict[str, tuple[str, str, str]] = {
    "pods": ("/api/v1", "v1", "Pod"),
    "endpointslices": ("/apis/discovery.k8s.io/v1", "discovery.k8s.io/v1", "EndpointSlice"),
    "inferencepools": (
        "/apis/inference.networking.k8s.io/v1",
        "inference.networking.k8s.io/v1",
        "InferencePool",
    ),
}
_GROUPS = {
    "discovery.k8s.io": ("v1", "endpointslices", "EndpointSlice"),
    "inference.networking.k8s.io": ("v1", "inferencepools", "InferencePool"),
}


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(obj: Mapping[str, Any], labels: str, fields: str) -> bool:
    meta = obj.get("metadata") or {}
    have = meta.get("labels") or {}
    for term in filter(None, (t.strip() for t in labels.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if have.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if have.get(k) != v:
                return False
        elif term not in have:
            return False
    for term in filter(None, (t.strip() for t in fields.split(","))):
        k, _, v = term.replace("==", "=").partition("=")
        if k == "metadata.name" and meta.get("name") != v:
            return False
        if k == "metadata.namespace" and meta.get("namespace") != v:
            return False
    return True


@dataclass
class _Event:
    rv: int
    resource: str
    type: str
    obj: dict[str, Any]


@dataclass(eq=False)  # identity-hashed: a set member per open watch
class _Watcher:
    resource: str
    namespace: str
    labels: str
    fields: str
    queue: asyncio.Queue[_Event | None] = field(default_factory=asyncio.Queue)


class FakeKubeAPI:
    """The fake API server. `await start()` returns its URL; every change bumps one global
    resourceVersion, as etcd's revision does."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        history: int = 10_000,
        bookmark_interval_s: float = 1.0,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.history_size = history
        self.bookmark_interval_s = bookmark_interval_s
        self.token = token
        self.ssl_context = ssl_context
        self.rv = 100
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.history: deque[_Event] = deque()
        self.compacted = self.rv  # versions at or below this are gone
        self.forbidden: set[str] = set()  # resources answered 403 ("*" = all)
        self.malformed_lines = 0  # the next N watch events are preceded by a garbage line
        self.requests: list[str] = []  # "GET /path?query" of API calls (not /_fake)
        self._watchers: set[_Watcher] = set()
        self._runner: web.AppRunner | None = None

    # --- process -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api", self._api_versions)
        app.router.add_get("/apis", self._api_groups)
        app.router.add_get("/api/v1", self._resource_list)
        app.router.add_get("/apis/{group}/{version}", self._resource_list)
        app.router.add_get("/api/v1/namespaces/{ns}/{resource}", self._list_or_watch)
        app.router.add_get(
            "/apis/{group}/{version}/namespaces/{ns}/{resource}", self._list_or_watch
        )
        app.router.add_get("/version", self._version)
        app.router.add_post("/_fake/objects/{resource}", self._ctl_put)
        app.router.add_delete("/_fake/objects/{resource}/{ns}/{name}", self._ctl_delete)
        app.router.add_post("/_fake/{action}", self._ctl_action)
        app.router.add_get("/_fake/state", self._ctl_state)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])
        return self.url

    async def stop(self) -> None:
        """Like a killed API server: every connection cut, the port closed; the store stays,
        so `start()` again resumes with the same objects and versions (as etcd would)."""
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- store -------------------------------------------------------------------------
    def put(self, resource: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace an object (ADDED or MODIFIED); returns it as stored."""
        if resource not in RESOURCES:
            raise ValueError(f"unknown resource {resource!r}; known: {', '.join(RESOURCES)}")
        o = copy.deepcopy(dict(obj))
        meta = o.setdefault("metadata", {})
        ns = meta.setdefault("namespace", "default")
        name = meta.get("name")
        if not name:
            raise ValueError("metadata.name is required")
        key = (resource, ns, name)
        old = self.objects.get(key)
        meta["uid"] = meta.get("uid") or (old["metadata"]["uid"] if old else str(uuid.uuid4()))
        meta.setdefault(
            "creationTimestamp", old["metadata"]["creationTimestamp"] if old else _now()
        )
        _, api_version, kind = RESOURCES[resource]
        o["apiVersion"], o["kind"] = api_version, kind
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        self.objects[key] = o
        self._emit(_Event(self.rv, resource, "MODIFIED" if old else "ADDED", o))
        return o

    def delete(self, resource: str, namespace: str, name: str) -> bool:
        o = self.objects.pop((resource, namespace, name), None)
        if o is None:
            return False
        self.rv += 1
        o = copy.deepcopy(o)
        o["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(_Event(self.rv, resource, "DELETED", o))
        return True

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((resource, namespace, name))

    def compact(self) -> None:
        """Forget the history: a watch resumed from any version before now gets 410 Gone."""
        self.history.clear()
        self.compacted = self.rv

    def drop_watches(self) -> int:
        """Cut every open watch stream mid-body (a load balancer or API server restart)."""
        for w in self._watchers:
            w.queue.put_nowait(None)
        return len(self._watchers)

    def _emit(self, ev: _Event) -> None:
        self.history.append(ev)
        while len(self.history) > self.history_size:
            self.compacted = self.history.popleft().rv
        for w in list(self._watchers):
            if w.resource == ev.resource and self._visible(w, ev.obj):
                w.queue.put_nowait(ev)

    @staticmethod
    def _visible(w: _Watcher, obj: Mapping[str, Any]) -> bool:
        return (obj.get("metadata") or {}).get("namespace") == w.namespace and _matches(
            obj, w.labels, w.fields
        )

    # --- API ---------------------------------------------------------------------------
    def _auth(self, request: web.Request, resource: str, ns: str) -> web.Response | None:
        if self.token is not None and (
            request.headers.get("Authorization", "") != f"Bearer {self.token}"
        ):
            return web.json_response(status_object(401, "Unauthorized", "Unauthorized"), status=401)
        if resource in self.forbidden or "*" in self.forbidden:
            group = RESOURCES[resource][1].rpartition("/")[0] if resource in RESOURCES else ""
            verb = "watch" if _true(request.query.get("watch")) else "list"
            return web.json_response(
                status_object(
                    403,
                    "Forbidden",
                    f"{resource}{'.' + group if group else ''} is forbidden: User "
                    f'"system:serviceaccount:{ns}:router-ext" cannot {verb} resource '
                    f'"{resource}" in API group "{group}" in the namespace "{ns}"',
                ),
                status=403,
            )
        return None

    async def _list_or_watch(self, request: web.Request) -> web.StreamResponse:
        resource, ns = request.match_info["resource"], request.match_info["ns"]
        self.requests.append(f"GET {request.path_qs}")
        group = request.match_info.get("group")
        if resource not in RESOURCES or (
            group is not None and not RESOURCES[resource][0].endswith(f"/{group}/v1")
        ):
            return web.json_response(
                status_object(404, "NotFound", "the server could not find the requested resource"),
                status=404,
            )
        denied = self._auth(request, resource, ns)
        if denied is not None:
            return denied
        q = request.query
        labels, fields = q.get("labelSelector", ""), q.get("fieldSelector", "")
        if _true(q.get("watch")):
            return await self._watch(request, _Watcher(resource, ns, labels, fields))
        _, api_version, kind = RESOURCES[resource]
        items = [
            o
            for (r, n, _), o in sorted(self.objects.items())
            if r == resource and n == ns and _matches(o, labels, fields)
        ]
        return web.json_response(
            {
                "kind": f"{kind}List",
                "apiVersion": api_version,
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        )

    async def _watch(self, request: web.Request, w: _Watcher) -> web.StreamResponse:
        q = request.query
        rv_raw = q.get("resourceVersion", "")
        timeout = float(q.get("timeoutSeconds", "1800"))
        bookmarks = _true(q.get("allowWatchBookmarks"))
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        _, _, kind = RESOURCES[w.resource]
        self._watchers.add(w)
        try:
            start: list[_Event]
            if rv_raw in ("", "0"):
                start = [
                    _Event(self.rv, w.resource, "ADDED", o)
                    for (r, n, _), o in sorted(self.objects.items())
                    if r == w.resource and self._visible(w, o)
                ]
            else:
                try:
                    since = int(rv_raw)
                except ValueError:
                    since = -1
                if since < self.compacted:
                    status = status_object(
                        410, "Expired", f"too old resource version: {rv_raw} ({self.compacted})"
                    )
                    await resp.write(_line({"type": "ERROR", "object": status}))
                    await resp.write_eof()
                    return resp
                start = [
                    e
                    for e in self.history
                    if e.rv > since and e.resource == w.resource and self._visible(w, e.obj)
                ]
            for old in start:
                await self._send(resp, old)
            loop = asyncio.get_running_loop()
            end = loop.time() + timeout
            while (left := end - loop.time()) > 0:
                wait = min(left, self.bookmark_interval_s) if bookmarks else left
                try:
                    ev = await asyncio.wait_for(w.queue.get(), wait)
                except asyncio.TimeoutError:
                    if bookmarks and end - loop.time() > 0:
                        mark = {
                            "kind": kind,
                            "apiVersion": RESOURCES[w.resource][1],
                            "metadata": {"resourceVersion": str(self.rv)},
                        }
                        await resp.write(_line({"type": "BOOKMARK", "object": mark}))
                    continue
                if ev is None:
                    # drop_watches: cut the connection without the chunked terminator.
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                await self._send(resp, ev)
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away
        finally:
            self._watchers.discard(w)
        return resp

    async def _send(self, resp: web.StreamResponse, ev: _Event) -> None:
        if self.malformed_lines > 0:
            self.malformed_lines -= 1
            await resp.write(b'{"type": "MODIFIED", "object": {"metadata": \n')
        await resp.write(_line({"type": ev.type, "object": ev.obj}))

    # --- discovery endpoints (kubectl asks these first) --------------------------------
    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"major": "1", "minor": "34", "gitVersion": "v1.34.0-fake", "platform": "linux/amd64"}
        )

    async def _api_versions(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                ],
            }
        )

    async def _api_groups(self, request: web.Request) -> web.Response:
        groups = [
            {
                "name": g,
                "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v},
            }
            for g, (v, _, _) in _GROUPS.items()
        ]
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})

    async def _resource_list(self, request: web.Request) -> web.Response:
        group = request.match_info.get("group")
        if group is None:
            gv, plurals = "v1", ["pods"]
        elif group in _GROUPS:
            gv, plurals = f"{group}/v1", [_GROUPS[group][1]]
        else:
            return web.json_response(status_object(404, "NotFound", "not found"), status=404)
        resources = [
            {
                "name": p,
                "singularName": RESOURCES[p][2].lower(),
                "namespaced": True,
                "kind": RESOURCES[p][2],
                "verbs": ["get", "list", "watch"],
            }
            for p in plurals
        ]
        return web.json_response(
            {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": gv,
                "resources": resources,
            }
        )

    # --- control API -------------------------------------------------------------------
    async def _ctl_put(self, request: web.Request) -> web.Response:
        try:
            obj = await request.json()
            return web.json_response(self.put(request.match_info["resource"], obj))
        except (ValueError, AttributeError) as e:
            return web.json_response({"error": str(e)}, status=400)

    async def _ctl_delete(self, request: web.Request) -> web.Response:
        m = request.match_info
        ok = self.delete(m["resource"], m["ns"], m["name"])
        return web.json_response({"deleted": ok}, status=200 if ok else 404)

    async def _ctl_action(self, request: web.Request) -> web.Response:
        action, q = request.match_info["action"], request.query
        if action == "compact":
            self.compact()
        elif action == "drop-watches":
            return web.json_response({"dropped": self.drop_watches()})
        elif action == "forbid":
            res = q.get("resource", "*")
            if q.get("on", "1") == "1":
                self.forbidden.add(res)
            else:
                self.forbidden.discard(res)
        elif action == "malformed":
            self.malformed_lines = int(q.get("count", "1"))
        else:
            return web.json_response({"error": f"unknown action {action!r}"}, status=404)
        return web.json_response({"ok": True, "resourceVersion": str(self.rv)})

    async def _ctl_state(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "resourceVersion": str(self.rv),
                "compacted": str(self.compacted),
                "watchers": len(self._watchers),
                "objects": {f"{r}/{n}/{name}": o for (r, n, name), o in self.objects.items()},
            }
        )


def _true(value: str | None) -> bool:
    # Go's strconv.ParseBool, as the API server parses query flags ("True" from Python).
    return (value or "").lower() in ("1", "t", "true")


def _line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


# --- object builders (what the controllers would write) -------------------------------
def endpoint_slice(
    name: str,
    service: str,
    port: int,
    endpoints: list[dict[str, Any]],
    *,
    namespace: str = "default",
    address_type: str = "IPv4",
    port_name: str = "http",
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {
            "kubernetes.io/service-name": service,
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
        },
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return {
        "metadata": meta,
        "addressType": address_type,
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


def slice_endpoint(
    ip: str,
    pod_name: str,
    uid: str,
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
) -> dict[str, Any]:
    return {
        "addresses": [ip],
        "conditions": {
            "ready": ready,
            "serving": ready if serving is None else serving,
            "terminating": terminating,
        },
        "targetRef": {"kind": "Pod", "namespace": "default", "name": pod_name, "uid": uid},
    }


def pod_object(
    name: str,
    ip: str | None,
    labels: Mapping[str, str],
    *,
    namespace: str = "default",
    ready: bool = True,
    phase: str = "Running",
    deleting: bool = False,
    uid: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if uid:
        meta["uid"] = uid
    if annotations:
        meta["annotations"] = dict(annotations)
    if deleting:
        meta["deletionTimestamp"] = _now()
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {"metadata": meta, "spec": {"containers": [{"name": "vllm"}]}, "status": status}


def inference_pool(
    name: str,
    match_labels: Mapping[str, str],
    ports: list[int],
    *,
    namespace: str = "default",
    failure_mode: str = "FailOpen",
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": {"matchLabels": dict(match_labels)},
        "endpointPickerRef": {
            "name": "router-ext",
            "port": {"number": 9002},
            "failureMode": failure_mode,
        },
    }
    if ports:
        spec["targetPorts"] = [{"number": p} for p in ports]
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def write_kubeconfig(
    path: Path, server: str, *, token: str = "fake-token", namespace: str = "default"
) -> Path:
    """A kubeconfig whose current context points at `server` (the fake's URL)."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "router-ext", "user": {"token": token}}],
        "contexts": [
            {
                "name": "fake",
                "context": {"cluster": "fake", "user": "router-ext", "namespace": namespace},
            }
        ],
        "current-context": "fake",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


async def _main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="fake Kubernetes API server (list/watch) on loopback")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    api = FakeKubeAPI(args.host, args.port)
    url = await api.start()
    print(json.dumps({"event": "kube_fake_ready", "url": url}), flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()
    await api.stop()


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(sys.argv[1:]))
