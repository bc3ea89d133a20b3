"""Kubernetes discovery: the pod set from the API server, listed then watched.

Three kinds (`discovery.kubernetes.kind`): the EndpointSlices of a Service (label
`kubernetes.io/service-name`), Pods by label selector on a target port, or an
`inference.networking.k8s.io/v1` InferencePool (its `spec.selector.matchLabels` and
`spec.targetPorts`; the pool and its pods are both watched, and a change of selector or ports
relists). Each resource is listed, then watched from the list's resourceVersion with
`allowWatchBookmarks` and a server-side `timeoutSeconds`; a watch that ends (timeout, a cut
stream) resumes from the last resourceVersion seen, bookmarks included. 410 Gone (an ERROR
event or an HTTP 410) means that version is compacted away: the source relists and replaces
its whole set at once, so the old set stays routable until the new one is in. Any other API
error (403, 404, an unreachable server, a malformed line) backs off up to `backoff_max_s` and
keeps the last good set; it shows in `status()`, calls the error listeners (the
`router_ext_discovery_errors_total` metric) and is logged once per change of error.

Mapping. An EndpointSlice endpoint with `conditions.ready` is a ready pod; `serving` while
`terminating` is a draining pod (routable only as a last resort, BACKGROUND §2); terminating and
not serving, or not ready, is listed not-ready (never routed, not scraped). A Pod is ready when
Running with condition Ready; `deletionTimestamp` makes it draining; a pod without an IP yet is
skipped (counted in `status()`). A pod's identity is its UID (the EndpointSlice's
`targetRef.uid`, a Pod's `metadata.uid`), so a new pod reusing an old pod's IP starts cold.
IPv6 addresses are kept as they are (`[v6]:port` in Envoy). Model names come from the
annotation `router-ext.io/models` (comma list, the first is the pod's `model`) on the Pod, or on
the EndpointSlice for that kind; without it the pod's own /metrics tell.

Why kubernetes-asyncio. It is asyncio on aiohttp, which router-ext already uses, so there is no
second HTTP stack in the serving process; it ships type hints (mypy strict), in-cluster config
(service-account token, CA, KUBERNETES_SERVICE_HOST, token refresh) and kubeconfig loading
(contexts, exec plugins); and in a list/watch/410 lab against a fake API server it listed,
watched, resumed and relisted on 410 correctly. lightkube passed the same lab but brings httpx
and hides its watch loop's resume and bookmark handling; kr8s was rejected: on 410 it silently
retried the expired resourceVersion (823 requests in 2 s, no error to the caller). Only the
client's configuration, authentication and request building are used; the watch stream's lines
are read here, so a malformed line, a Status object and a 410 are each handled explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

from router_ext.config import KubernetesSection
from router_ext.fleet.snapshot import Pod

log = logging.getLogger("router_ext.fleet.kubernetes")

#: Comma-separated model names a pod serves (first = its `model`); on the Pod or EndpointSlice.
MODELS_ANNOTATION = "router-ext.io/models"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
POOL_GROUP, POOL_VERSION, POOL_PLURAL = "inference.networking.k8s.io", "v1", "inferencepools"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: One watch line is one object; a bigger one is refused rather than buffered without end.
MAX_LINE_BYTES = 16 << 20
_LIST_TIMEOUT_S = 15.0
_BACKOFF_START_S = 0.5


class KubeErrorKind(str, enum.Enum):
    CONFIG = "config"  # no usable kubeconfig / in-cluster config
    UNREACHABLE = "unreachable"
    UNAUTHORIZED = "unauthorized"  # 401
    FORBIDDEN = "forbidden"  # 403: RBAC
    NOT_FOUND = "not_found"  # 404: the InferencePool (or the API group) does not exist
    SERVER_ERROR = "server_error"  # 5xx and other unexpected statuses
    MALFORMED = "malformed"  # a response or watch line that is not what the API sends
    INVALID = "invalid"  # an object we cannot route from (a pool without targetPorts)
    EXPIRED = "expired"  # 410: resourceVersion compacted; relist (not reported as an error)


class KubeAPIError(Exception):
    def __init__(self, kind: KubeErrorKind, message: str, status: int = 0, what: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        # What the error is about: logged once per (kind, what), however its text varies
        # (list vs watch, refused vs cut).
        self.key = f"{kind.value}:{what}"


class _Relist(Exception):
    """Raised inside a watch when the whole set must be read again (pool spec changed)."""


@dataclass
class _Watched:
    """One listed-and-watched collection: its objects by name and the version to resume from."""

    what: str  # "endpointslices" | "pods" | "inferencepools"
    label_selector: str = ""
    field_selector: str = ""
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    resource_version: str = ""


def _selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _status_message(body: bytes | str, status: int) -> str:
    """The `message` of a Kubernetes Status body, else the body's start."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    with contextlib.suppress(ValueError):
        obj = json.loads(text)
        if isinstance(obj, dict) and obj.get("message"):
            return str(obj["message"])
    return text.strip()[:200] or f"HTTP {status}"


def _kind_for_status(status: int) -> KubeErrorKind:
    return {
        401: KubeErrorKind.UNAUTHORIZED,
        403: KubeErrorKind.FORBIDDEN,
        404: KubeErrorKind.NOT_FOUND,
        410: KubeErrorKind.EXPIRED,
    }.get(status, KubeErrorKind.SERVER_ERROR)


def _models(meta: Mapping[str, Any]) -> tuple[str, frozenset[str]]:
    ann = meta.get("annotations") or {}
    raw = ann.get(MODELS_ANNOTATION, "") if isinstance(ann, dict) else ""
    names = [m.strip() for m in str(raw).split(",") if m.strip()]
    return (names[0] if names else ""), frozenset(names)


def _ip(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


_RANK = {(True, False): 0, (True, True): 1, (False, True): 2, (False, False): 3}


def _better(a: Pod, b: Pod) -> bool:
    """During a rollout an endpoint can sit in two slices: keep the most routable copy."""
    return _RANK[(a.ready, a.draining)] < _RANK[(b.ready, b.draining)]


@dataclass
class _Mapped:
    pods: dict[str, Pod] = field(default_factory=dict)  # address -> pod
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    problems: list[str] = field(default_factory=list)

    def add(self, pod: Pod) -> None:
        old = self.pods.get(pod.address)
        if old is None or _better(pod, old):
            self.pods[pod.address] = pod

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def map_endpoint_slices(slices: Sequence[Mapping[str, Any]], port: int | str | None) -> _Mapped:
    """EndpointSlices -> pods. `port`: the slice port's number or name; None = the only one."""
    out = _Mapped()
    for sl in slices:
        meta = sl.get("metadata") or {}
        name = meta.get("name", "?")
        addr_type = sl.get("addressType", "IPv4")
        if addr_type not in ("IPv4", "IPv6"):
            out.skip(f"addressType {addr_type}")
            continue
        ports = [p for p in (sl.get("ports") or []) if isinstance(p, dict) and p.get("port")]
        chosen: int | None = None
        if port is None:
            if len(ports) == 1:
                chosen = int(ports[0]["port"])
            elif ports:
                out.problems.append(
                    f"EndpointSlice {name} has ports "
                    f"{[p.get('name') or p['port'] for p in ports]}: set discovery.kubernetes.port"
                )
        else:
            for p in ports:
                if p.get("name") == port or (isinstance(port, int) and p["port"] == port):
                    chosen = int(p["port"])
        if chosen is None:
            out.skip("slice without the port")
            continue
        model, models = _models(meta)
        for ep in sl.get("endpoints") or []:
            addrs = ep.get("addresses") or []
            host = _ip(addrs[0]) if addrs else None
            if host is None:
                out.skip("endpoint without an IP address")
                continue
            cond = ep.get("conditions") or {}
            # The API says nil `ready` means ready and nil `serving` means `ready`.
            ready = cond.get("ready") is not False
            terminating = cond.get("terminating") is True
            serving = cond.get("serving", ready) is not False
            ref = ep.get("targetRef") or {}
            out.add(
                Pod(
                    host=host,
                    port=chosen,
                    name=str(ref.get("name") or ep.get("hostname") or ""),
                    uid=str(ref.get("uid") or ""),
                    model=model,
                    models=models,
                    ready=serving if terminating else ready,
                    draining=terminating,
                )
            )
    return out


def map_pods(pods: Sequence[Mapping[str, Any]], ports: Sequence[int]) -> _Mapped:
    """Pods -> endpoints, one per target port (an InferencePool may list several)."""
    out = _Mapped()
    for obj in pods:
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        phase = status.get("phase")
        if phase in ("Succeeded", "Failed"):
            out.skip(f"phase {phase}")
            continue
        host = _ip(status.get("podIP"))
        if host is None:
            out.skip("no IP yet")
            continue
        conds = status.get("conditions") or []
        ready_cond = any(
            isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True"
            for c in conds
        )
        model, models = _models(meta)
        name = str(meta.get("name", ""))
        for port in ports:
            out.add(
                Pod(
                    host=host,
                    port=port,
                    name=name if len(ports) == 1 else f"{name}:{port}",
                    uid=str(meta.get("uid", "")),
                    model=model,
                    models=models,
                    ready=phase == "Running" and ready_cond,
                    draining=bool(meta.get("deletionTimestamp")),
                )
            )
    return out


@dataclass(frozen=True)
class PoolSpec:
    selector: dict[str, str]
    ports: tuple[int, ...]
    failure_mode: str


def parse_pool(obj: Mapping[str, Any]) -> PoolSpec:
    """An InferencePool's routing facts; KubeAPIError(INVALID) says what is missing."""
    name = (obj.get("metadata") or {}).get("name", "?")
    spec = obj.get("spec") or {}
    sel = spec.get("selector") or {}
    labels = sel.get("matchLabels") if isinstance(sel, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise KubeAPIError(
            KubeErrorKind.INVALID, f"InferencePool {name} has no spec.selector.matchLabels"
        )
    ports = tuple(
        int(p["number"])
        for p in spec.get("targetPorts") or []
        if isinstance(p, dict) and isinstance(p.get("number"), int) and 1 <= p["number"] <= 65535
    )
    if not ports:
        raise KubeAPIError(
            KubeErrorKind.INVALID, f"InferencePool {name} has no usable spec.targetPorts"
        )
    ref = spec.get("endpointPickerRef") or {}
    mode = str(ref.get("failureMode") or "FailOpen") if isinstance(ref, dict) else "FailOpen"
    return PoolSpec({str(k): str(v) for k, v in labels.items()}, ports, mode)


class KubernetesDiscovery:
    """A `DiscoverySource` (router_ext/fleet/discovery.py) fed by list + watch."""

    def __init__(
        self,
        cfg: KubernetesSection,
        *,
        environ: Mapping[str, str] | None = None,
        service_account_dir: Path = SERVICE_ACCOUNT_DIR,
    ) -> None:
        self.cfg = cfg
        self._environ = os.environ if environ is None else environ
        self._sa_dir = service_account_dir
        self.pods: tuple[Pod, ...] = ()
        self.loaded = False
        self.last_error = ""
        self.error_kind: KubeErrorKind | None = None
        self.error_listeners: list[Callable[[str], None]] = []
        self._listeners: list[Callable[[Sequence[Pod]], None]] = []
        self.namespace = cfg.namespace or ""
        self.server = ""
        self._api: k8s.ApiClient | None = None
        self._relist = asyncio.Event()
        self._error_since: float | None = None
        self._skipped: dict[str, int] = {}
        self._problems: tuple[str, ...] = ()
        self._pool: PoolSpec | None = None
        self._watched: list[_Watched] = []
        self.counters = {"lists": 0, "relists_410": 0, "watches": 0, "events": 0, "bookmarks": 0}
        self._last_sync: float | None = None
        self._expired_streak = 0
        self._error_key = ""

    # --- DiscoverySource ---------------------------------------------------------------
    def subscribe(self, fn: Callable[[Sequence[Pod]], None]) -> None:
        self._listeners.append(fn)

    def check(self, force: bool = False) -> bool:
        """The watch pushes changes as they come; nothing to poll. `force` (SIGHUP) relists."""
        if force:
            self._relist.set()
        return False

    def status(self) -> dict[str, Any]:
        c = self.cfg
        targets: dict[str, dict[str, Any]] = {
            "endpointslices": {"service": c.service, "port": c.port},
            "pods": {"selector": c.selector, "target_port": c.target_port},
            "inferencepool": {"inference_pool": c.inference_pool},
        }
        target = dict(targets[c.kind])
        if self._pool is not None:
            target.update(
                selector=self._pool.selector,
                target_ports=list(self._pool.ports),
                failure_mode=self._pool.failure_mode,
            )
        now = time.time()
        return {
            "source": "kubernetes",
            "kind": c.kind,
            "namespace": self.namespace,
            "server": self.server,
            **target,
            "loaded": self.loaded,
            "pods": len(self.pods),
            "ready": sum(1 for p in self.pods if p.ready),
            "draining": sum(1 for p in self.pods if p.draining),
            "skipped": dict(self._skipped),
            "problems": list(self._problems),
            "objects": sum(len(w.objects) for w in self._watched),
            "resource_version": ",".join(w.resource_version for w in self._watched),
            "last_error": self.last_error,
            "error_kind": self.error_kind.value if self.error_kind else "",
            "error_for_s": round(now - self._error_since, 1) if self._error_since else 0.0,
            "last_sync_age_s": round(now - self._last_sync, 1) if self._last_sync else None,
            **self.counters,
        }

    async def run(self, stop: asyncio.Event) -> None:
        backoff = _BACKOFF_START_S
        try:
            while not stop.is_set():
                try:
                    if self._api is None:
                        self._api = await self._connect()
                    await self._list_all()
                    backoff = _BACKOFF_START_S
                    if self.error_kind is not KubeErrorKind.MALFORMED:
                        self._healthy()
                    await self._watch_until(stop)
                except KubeAPIError as e:
                    if e.kind is KubeErrorKind.EXPIRED:
                        self.counters["relists_410"] += 1
                        self._expired_streak += 1
                        log.info("kubernetes watch expired (%s): relisting", e.message)
                        # A server that answers every fresh version with 410 is broken: only
                        # the first relist is immediate.
                        if self._expired_streak == 1:
                            continue
                    self._fail(e.kind, e.message, e.key)
                except _Relist:
                    continue
                except Exception as e:  # a listener or mapping bug must not stop discovery
                    log.exception("kubernetes discovery failed")
                    self._fail(KubeErrorKind.SERVER_ERROR, f"{type(e).__name__}: {e}", "bug")
                delay = backoff * random.uniform(0.8, 1.2)
                backoff = min(backoff * 2, self.cfg.backoff_max_s)
                await _wait(stop, delay, self._relist)
        finally:
            if self._api is not None:
                await self._api.close()
                self._api = None

    # --- connection --------------------------------------------------------------------
    async def _connect(self) -> k8s.ApiClient:
        conf = k8s.Configuration()
        env = self._environ
        try:
            if self.cfg.kubeconfig is None and env.get("KUBERNETES_SERVICE_HOST"):
                InClusterConfigLoader(
                    token_filename=str(self._sa_dir / "token"),
                    cert_filename=str(self._sa_dir / "ca.crt"),
                    environ=dict(env),
                ).load_and_set(conf)
                ns_file = self._sa_dir / "namespace"
                if not self.namespace and ns_file.is_file():
                    self.namespace = ns_file.read_text().strip()
            else:
                path = self.cfg.kubeconfig
                loader = await k8s_config.load_kube_config(
                    config_file=str(path) if path is not None else None,
                    client_configuration=conf,
                    persist_config=False,
                )
                if not self.namespace:
                    # A plain dict in kubernetes-asyncio 36 (a ConfigNode in older releases).
                    ctx: Any = loader.current_context
                    with contextlib.suppress(KeyError, TypeError, AttributeError):
                        node = ctx["context"]
                        get = node.get if isinstance(node, dict) else node.safe_get
                        self.namespace = str(get("namespace") or "")
        except (k8s_config.ConfigException, OSError, ValueError, KeyError, TypeError) as e:
            where = self.cfg.kubeconfig or env.get("KUBECONFIG") or "~/.kube/config"
            raise KubeAPIError(
                KubeErrorKind.CONFIG,
                f"no usable Kubernetes config (in-cluster: KUBERNETES_SERVICE_HOST unset or "
                f"service-account files missing; kubeconfig {where}): {e}",
            ) from e
        self.namespace = self.namespace or "default"
        self.server = str(conf.host)
        return k8s.ApiClient(conf)

    async def _open(self, w: _Watched, *, watch: bool) -> aiohttp.ClientResponse:
        """A list, get or watch request; the raw response, status checked."""
        assert self._api is not None
        kw: dict[str, Any] = {"_preload_content": False}
        if w.label_selector:
            kw["label_selector"] = w.label_selector
        if w.field_selector:
            kw["field_selector"] = w.field_selector
        t = self.cfg.watch_timeout_s
        if watch:
            kw.update(
                watch=True,
                resource_version=w.resource_version,
                timeout_seconds=t,
                allow_watch_bookmarks=True,
                # The server ends the watch at `t`; a silent connection past that is dead.
                _request_timeout=aiohttp.ClientTimeout(total=t + 30, sock_connect=5),
            )
        else:
            kw["_request_timeout"] = aiohttp.ClientTimeout(total=_LIST_TIMEOUT_S, sock_connect=5)
        ns = self.namespace
        resp: Any
        try:
            if w.what == "endpointslices":
                resp = await k8s.DiscoveryV1Api(self._api).list_namespaced_endpoint_slice(ns, **kw)
            elif w.what == "pods":
                resp = await k8s.CoreV1Api(self._api).list_namespaced_pod(ns, **kw)
            else:
                resp = await k8s.CustomObjectsApi(self._api).list_namespaced_custom_object(
                    POOL_GROUP, POOL_VERSION, ns, POOL_PLURAL, **kw
                )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise KubeAPIError(
                KubeErrorKind.UNREACHABLE,
                f"API server {self.server} unreachable: {type(e).__name__}: {e}",
                what=w.what,
            ) from e
        if not isinstance(resp, aiohttp.ClientResponse):  # pragma: no cover - client contract
            raise KubeAPIError(KubeErrorKind.MALFORMED, f"unexpected response {type(resp)}")
        if resp.status >= 300:
            body = await _read_quietly(resp)
            resp.release()
            msg = _status_message(body, resp.status)
            what = f"{'watch' if watch else 'list'} {w.what} in {ns}"
            raise KubeAPIError(
                _kind_for_status(resp.status),
                f"{what}: HTTP {resp.status}: {msg}",
                resp.status,
                what=w.what,
            )
        return resp

    # --- list --------------------------------------------------------------------------
    async def _list(self, w: _Watched) -> None:
        resp = await self._open(w, watch=False)
        try:
            body = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise KubeAPIError(
                KubeErrorKind.UNREACHABLE, f"list {w.what}: cut: {e}", what=w.what
            ) from e
        finally:
            resp.release()
        try:
            doc = json.loads(body)
            items = doc["items"] or []
            rv = str(doc["metadata"]["resourceVersion"])
        except (ValueError, KeyError, TypeError) as e:
            raise KubeAPIError(
                KubeErrorKind.MALFORMED, f"list {w.what}: not a Kubernetes list: {e}"
            ) from e
        w.objects = {
            str(o["metadata"]["name"]): o
            for o in items
            if isinstance(o, dict) and isinstance(o.get("metadata"), dict)
        }
        w.resource_version = rv
        self.counters["lists"] += 1

    async def _list_all(self) -> None:
        """Read the whole set again; the current set stays in force until this succeeds."""
        self._relist.clear()
        c = self.cfg
        watched: list[_Watched] = []
        self._pool = None
        if c.kind == "endpointslices":
            if not c.service:
                raise KubeAPIError(KubeErrorKind.CONFIG, "discovery.kubernetes.service is required")
            watched.append(
                _Watched("endpointslices", label_selector=f"{SERVICE_NAME_LABEL}={c.service}")
            )
        elif c.kind == "pods":
            if not c.selector or c.target_port is None:
                raise KubeAPIError(
                    KubeErrorKind.CONFIG,
                    "discovery.kubernetes.selector and target_port are required (kind pods)",
                )
            watched.append(_Watched("pods", label_selector=_selector(c.selector)))
        else:
            if not c.inference_pool:
                raise KubeAPIError(
                    KubeErrorKind.CONFIG, "discovery.kubernetes.inference_pool is required"
                )
            pool = _Watched("inferencepools", field_selector=f"metadata.name={c.inference_pool}")
            await self._list(pool)
            obj = pool.objects.get(c.inference_pool)
            if obj is None:
                raise KubeAPIError(
                    KubeErrorKind.NOT_FOUND,
                    f"InferencePool {c.inference_pool} not found in {self.namespace}",
                )
            self._pool = parse_pool(obj)
            watched += [pool, _Watched("pods", label_selector=_selector(self._pool.selector))]
        for w in watched:
            if w.what != "inferencepools":
                await self._list(w)
        self._watched = watched
        self._publish()
        self._last_sync = time.time()

    # --- watch -------------------------------------------------------------------------
    async def _watch_until(self, stop: asyncio.Event) -> None:
        """Watch every collection until stop, a relist request, or an error (raised)."""
        tasks = [asyncio.ensure_future(self._watch_loop(w)) for w in self._watched]
        stopper = asyncio.ensure_future(stop.wait())
        relister = asyncio.ensure_future(self._relist.wait())
        try:
            done, _ = await asyncio.wait(
                [*tasks, stopper, relister], return_when=asyncio.FIRST_COMPLETED
            )
            for t in tasks:
                if t in done:
                    t.result()  # raises the watch's error
            if relister in done:
                raise _Relist
        finally:
            for f in (*tasks, stopper, relister):
                f.cancel()
            await asyncio.gather(*tasks, stopper, relister, return_exceptions=True)

    async def _watch_loop(self, w: _Watched) -> None:
        cut = 0
        while True:
            self.counters["watches"] += 1
            resp = await self._open(w, watch=True)
            try:
                async for batch in _lines(resp):
                    changed = False
                    for line in batch:
                        changed |= self._on_line(w, line)
                    cut = 0
                    self._healthy()
                    if changed:
                        self._publish()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                # A cut stream resumes at once; cut twice in a row without an event is an
                # outage, reported and backed off by the caller.
                cut += 1
                if cut > 1:
                    raise KubeAPIError(
                        KubeErrorKind.UNREACHABLE,
                        f"watch {w.what}: stream cut: {type(e).__name__}: {e}",
                        what=w.what,
                    ) from e
                log.debug("watch %s cut (%s): resuming at %s", w.what, e, w.resource_version)
            finally:
                resp.release()
            # A clean end (timeoutSeconds) resumes from the last version seen.

    def _on_line(self, w: _Watched, line: bytes) -> bool:
        """Apply one watch event; True when the object set changed."""
        try:
            ev = json.loads(line)
            etype, obj = ev["type"], ev["object"]
            meta = obj["metadata"] if etype != "ERROR" else {}
        except (ValueError, KeyError, TypeError) as e:
            # A lost event cannot be skipped safely: the caller relists after a back-off.
            raise KubeAPIError(
                KubeErrorKind.MALFORMED,
                f"watch {w.what}: malformed event line: {line[:120].decode(errors='replace')!r}",
                what=w.what,
            ) from e
        if etype == "ERROR":
            code = obj.get("code", 0) if isinstance(obj, dict) else 0
            msg = _status_message(json.dumps(obj), code)
            raise KubeAPIError(
                _kind_for_status(int(code) if isinstance(code, int) else 0),
                f"watch {w.what}: {msg}",
                code if isinstance(code, int) else 0,
                what=w.what,
            )
        rv = meta.get("resourceVersion")
        if rv:
            w.resource_version = str(rv)
        if etype == "BOOKMARK":
            self.counters["bookmarks"] += 1
            return False
        name = str(meta.get("name", ""))
        self.counters["events"] += 1
        if etype == "DELETED":
            if w.what == "inferencepools":
                raise KubeAPIError(
                    KubeErrorKind.NOT_FOUND, f"InferencePool {self.namespace}/{name} was deleted"
                )
            return w.objects.pop(name, None) is not None
        if etype in ("ADDED", "MODIFIED"):
            if w.what == "inferencepools":
                old = w.objects.get(name)
                w.objects[name] = obj
                if old is None or old.get("spec") != obj.get("spec"):
                    log.info("InferencePool %s changed: relisting its pods", name)
                    raise _Relist
                return False
            w.objects[name] = obj
            return True
        raise KubeAPIError(KubeErrorKind.MALFORMED, f"watch {w.what}: unknown event type {etype!r}")

    # --- publish -----------------------------------------------------------------------
    def _publish(self) -> None:
        c = self.cfg
        w = self._watched[-1]  # the pods or slices; a pool, if any, comes first
        if c.kind == "endpointslices":
            m = map_endpoint_slices(list(w.objects.values()), c.port)
        else:
            ports = self._pool.ports if self._pool else (c.target_port or 0,)
            m = map_pods(list(w.objects.values()), ports)
        problems = tuple(m.problems)
        if problems != self._problems:
            for p in problems:
                if p not in self._problems:
                    log.warning("kubernetes discovery: %s", p)
            self._problems = problems
        self._skipped = m.skipped
        pods = tuple(sorted(m.pods.values(), key=lambda p: p.address))
        first = not self.loaded
        self.loaded = True
        if not first and pods == self.pods:
            return
        if not pods and first:
            log.warning(
                "kubernetes discovery: %s matches no pods yet (%s)",
                self._target(),
                ", ".join(f"{k}: {v}" for k, v in m.skipped.items()) or "nothing skipped",
            )
        self._log_diff(self.pods, pods)
        self.pods = pods
        for fn in self._listeners:
            fn(pods)

    def _target(self) -> str:
        c = self.cfg
        if c.kind == "endpointslices":
            return f"Service {self.namespace}/{c.service}"
        if c.kind == "pods":
            return f"selector {_selector(c.selector)} in {self.namespace}"
        return f"InferencePool {self.namespace}/{c.inference_pool}"

    def _log_diff(self, old: tuple[Pod, ...], new: tuple[Pod, ...]) -> None:
        o = {p.address: p for p in old}
        n = {p.address: p for p in new}

        def short(xs: list[str]) -> str:
            return (", ".join(xs[:5]) + (f" +{len(xs) - 5}" if len(xs) > 5 else "")) or "-"

        added = [n[a].label for a in n if a not in o]
        removed = [o[a].label for a in o if a not in n]
        changed = [n[a].label for a in n if a in o and n[a] != o[a]]
        log.info(
            "kubernetes discovery: %d pods, %d ready (added %s; removed %s; changed %s)",
            len(new),
            sum(1 for p in new if p.ready),
            short(added),
            short(removed),
            short(changed),
        )

    # --- errors ------------------------------------------------------------------------
    def _fail(self, kind: KubeErrorKind, msg: str, key: str) -> None:
        self.error_kind = kind
        if self._error_since is None:
            self._error_since = time.time()
        same = key == self._error_key
        self.last_error = msg
        if same:
            return
        self._error_key = key
        kept = f"keeping last good set of {len(self.pods)} pods" if self.loaded else "no pods yet"
        log.error("kubernetes discovery error (%s): %s (%s)", kind.value, msg, kept)
        for fn in self.error_listeners:
            fn(msg)

    def _healthy(self) -> None:
        self._expired_streak = 0
        if not self.last_error:
            return
        since = time.time() - (self._error_since or time.time())
        log.info(
            "kubernetes discovery recovered after %.1fs: %d pods (%s)",
            since,
            len(self.pods),
            self._target(),
        )
        self.last_error = ""
        self.error_kind = None
        self._error_key = ""
        self._error_since = None


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[list[bytes]]:
    """The watch body as batches of complete lines: each chunk's lines together, so a burst of
    events is applied and published once."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        if b"\n" not in buf:
            if len(buf) > MAX_LINE_BYTES:
                raise KubeAPIError(KubeErrorKind.MALFORMED, "watch line over 16 MiB")
            continue
        *complete, buf = buf.split(b"\n")
        lines = [ln for ln in complete if ln.strip()]
        if lines:
            yield lines
    if buf.strip():
        yield [buf]


async def _read_quietly(resp: aiohttp.ClientResponse) -> bytes:
    try:
        return await resp.read()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return b""


async def _wait(stop: asyncio.Event, delay: float, wake: asyncio.Event) -> None:
    """Sleep `delay`, or less when stopping or a relist is asked for."""
    waiters: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(stop.wait()),
        asyncio.ensure_future(wake.wait()),
    ]
    try:
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in waiters:
            t.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
