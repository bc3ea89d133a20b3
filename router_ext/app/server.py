"""The router process: wires discovery -> scraper -> lifecycle -> snapshot -> router -> ext_proc.

The serving event loop runs ext_proc, health, the access-log sink and the admin API. Fetching
and parsing the pods' /metrics runs in a worker process (router_ext/fleet/scrape_worker.py; the GIL
makes a thread no answer): a 20 MB page or 2,000 pods once starved this loop into failing
open. The worker hands back compact per-pod results; background tasks here (scrape rounds,
discovery changes, access-log batches) build a new snapshot and publish it with one attribute
swap, and the ext_proc handler only reads it. No threads share state, so there are no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import aiohttp
import grpc
from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.endpoint.v3 import eds_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router_ext.app.telemetry import Telemetry
from router_ext.config import EXT_PROC_SERVICE, RouterConfig
from router_ext.envoy_adapter.auth import StreamAuth, TokenError, load_or_create_token
from router_ext.envoy_adapter.extproc import ExtProcServicer
from router_ext.envoy_adapter.xds import EdsServer
from router_ext.fleet.discovery import make_discovery
from router_ext.fleet.feedback import FeedbackSink
from router_ext.fleet.lifecycle import PodLifecycle
from router_ext.fleet.scrape_worker import make_scraper
from router_ext.fleet.snapshot import Pod, PodState, ScrapeResult
from router_ext.routing.router import Router

log = logging.getLogger("router_ext.app.server")

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# "readiness" and "liveness" are the names the Gateway API Inference Extension's endpoint
# picker protocol asks for (docs/epp.md); readiness follows the ext_proc service.
HEALTH_SERVICES = ("", EXT_PROC_SERVICE, "readiness")
LIVENESS_SERVICE = "liveness"


class StartupError(RuntimeError):
    """The router cannot start (port in use, unreadable token); the message says why."""


class RouterApp:
    def __init__(self, cfg: RouterConfig, *, write_eds: bool = True) -> None:
        self.cfg = cfg
        self.telemetry = Telemetry()
        self.router = Router(cfg, self.telemetry.hot)
        self.lifecycle = PodLifecycle(cfg)
        self.lifecycle.on_state_change(self._on_state_change)
        self.lifecycle.coldstart_listeners.append(
            lambda _pod, s: self.telemetry.coldstart.observe(s)
        )
        self.discovery = make_discovery(cfg)
        self.discovery.subscribe(self._on_discovery)
        self.discovery.error_listeners.append(lambda _msg: self.telemetry.discovery_errors.inc())
        # A worker process unless scrape.in_process: parsing must not stall this loop.
        self.scraper = make_scraper(cfg.scrape)
        self.health = health_aio.HealthServicer()
        self.extproc = ExtProcServicer(self.router)
        self.eds = EdsServer()
        self.telemetry.fleet.eds = lambda: self.eds.stats
        self.telemetry.fleet.models_failures = lambda: self.lifecycle.models_fetch_failures
        self.telemetry.fleet.ledger = self.router.ledger
        self.feedback = FeedbackSink(
            self._feedback_unreachable,
            self.router.ledger.apply,
            self.telemetry.als_entries.inc,
            known=lambda address: address in self._known,
            on_cut=self.telemetry.on_stream_cut,
            on_rejected=self.telemetry.on_access_log_rejected,
        )
        self.telemetry.fleet.pre_upstream = self.feedback.pre_upstream
        self.write_eds = write_eds
        self.serving = False
        self.draining = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._known: set[str] = set()
        self._server: grpc.aio.Server | None = None
        self._admin_server: grpc.aio.Server | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.grpc_port = 0
        self.admin_port = 0
        self.metrics_port = 0
        # Feedback marks waiting for the router's own connect attempt (address -> why).
        self._probing: set[str] = set()

    # --- data flow ---------------------------------------------------------------------
    def _on_discovery(self, pods: Sequence[Pod]) -> None:
        known = self._known
        self._known = {p.address for p in pods}
        self.lifecycle.apply_discovery(pods)
        self.publish()
        self.eds.publish(pods)
        if self.write_eds and self.cfg.envoy.eds == "file":
            self._write_eds(pods)
        # New pods are scraped at once rather than at the next tick: their cold window (and
        # the router's first SERVING) should not wait up to a whole interval.
        new = [p for p in pods if p.ready and p.address not in known]
        if new and self._server is not None:
            self._spawn(self._scrape_new(new))
            for p in new:
                if self.lifecycle.needs_warmup(p.address):
                    self._spawn(self._warm_up(p))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _warm_up(self, pod: Pod) -> None:
        w = self.cfg.warmup
        body = dict(w.body)
        if pod.model:
            body.setdefault("model", pod.model)
        t0 = time.monotonic()
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    f"http://{pod.address}{w.path}",
                    json=body,
                    timeout=aiohttp.ClientTimeout(total=w.timeout_s),
                ) as resp,
            ):
                await resp.read()
                ok, detail = resp.status == 200, f"HTTP {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        detail += f" in {time.monotonic() - t0:.2f}s"
        self.lifecycle.warmup_done(pod.address, ok, detail)
        self.publish()

    async def _scrape_new(self, pods: Sequence[Pod]) -> None:
        self._on_round(await self.scraper.scrape_round(pods))

    def _write_eds(self, pods: Sequence[Pod]) -> None:
        from router_ext.envoy_adapter.envoy_config import write_eds_file

        try:
            write_eds_file(self.cfg, pods)
        except OSError as e:
            log.error("cannot write Envoy EDS file: %s", e)

    def _on_round(self, results: list[ScrapeResult]) -> None:
        self.lifecycle.apply_scrape(results)
        # Fetches run concurrently: the slowest one bounds the round's wall time.
        wall = max((r.duration_s for r in results), default=0.0)
        self.telemetry.on_scrape_round(results, wall)
        self.publish()

    def _on_state_change(self, pod: Pod, old: PodState, new: PodState, why: str) -> None:
        self.telemetry.on_state_change(old, new)

    def publish(self) -> None:
        snap = self.lifecycle.build_snapshot()
        self.router.publish(snap)
        self.telemetry.on_snapshot(snap, self.lifecycle.state_counts())
        if snap.ready and not self.serving and not self.draining:
            self.serving = True
            self._spawn(self._set_health(_SERVING))
            log.info(
                "router SERVING: %d pods discovered, first scrape round done (%s)",
                len(snap.pods),
                ", ".join(f"{s.value}={n}" for s, n in self.lifecycle.state_counts().items() if n),
            )

    def _scrape_targets(self) -> Sequence[Pod]:
        return [p for p in self.discovery.pods if p.ready]

    async def _set_health(self, status: int) -> None:
        for svc in HEALTH_SERVICES:
            await self.health.set(svc, status)
        self.telemetry.health.set(1 if status == _SERVING else 0)

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Bind every listener, then start discovery and scraping.

        Raises `StartupError` (after releasing whatever was bound) when a port is taken or the
        token cannot be read: the CLI prints one line and exits 2, no traceback.
        """
        try:
            await self._start_listeners()
        except BaseException:
            await self.stop()
            raise
        g, a, m = self.cfg.router.grpc, self.cfg.router.admin, self.cfg.router.metrics
        log.info(
            "router-ext listening: grpc %s:%d (ext_proc, access log: %s; health), "
            "admin %s:%d, metrics http://%s:%d/metrics",
            g.host,
            self.grpc_port,
            "token required" if self.cfg.router.auth.mode == "token" else "UNAUTHENTICATED",
            a.host,
            self.admin_port,
            m.host,
            self.metrics_port,
        )
        if self.cfg.router.auth.mode == "none":
            log.warning(
                "router.auth.mode is none: anyone who reaches %s can steer routing and mark "
                "pods down; use it only on a socket nothing but Envoy can reach",
                g.address,
            )
        # First discovery load happens before scraping so round one has pods to scrape.
        self.discovery.check()
        if not self.discovery.loaded and self.cfg.discovery.source == "file":
            log.error(
                "no usable pods file yet (%s); NOT_SERVING until one loads",
                self.discovery.last_error,
            )
        elif not self.discovery.loaded:  # the API is listed by run(), not by check()
            log.info(
                "kubernetes discovery: NOT_SERVING until the first list (%s)",
                self.discovery.status(),
            )
        self._tasks.append(asyncio.create_task(self.discovery.run(self._stop)))
        self._tasks.append(
            asyncio.create_task(self.scraper.run(self._scrape_targets, self._on_round, self._stop))
        )

    async def _start_listeners(self) -> None:
        await self._set_health(_NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, _SERVING)  # answering at all is alive
        if self.cfg.router.auth.mode == "token":
            try:
                token = load_or_create_token(self.cfg.token_file)
            except TokenError as e:
                raise StartupError(str(e)) from e
            # Both servicers that change routing (ext_proc, access log) check it per stream.
            auth = StreamAuth(token, lambda svc: self.telemetry.streams_refused.labels(svc).inc())
            self.extproc.auth = auth
            self.feedback.auth = auth
            self.eds.auth = auth
        server = grpc.aio.server(
            options=[
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ("grpc.so_reuseport", 0),
                # A body the router asked for arrives as one message: gRPC's 4 MiB default
                # would refuse a bigger one and the request would silently fail open.
                (
                    "grpc.max_receive_message_length",
                    self.cfg.routing.max_body_bytes + (64 << 10),
                ),
            ],
        )
        self._server = server
        ep_grpc.add_ExternalProcessorServicer_to_server(self.extproc, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.feedback, server)
        eds_pb2_grpc.add_EndpointDiscoveryServiceServicer_to_server(self.eds, server)
        self.grpc_port = _bind(server, self.cfg.router.grpc.address, "gRPC (ext_proc)")
        await server.start()

        from router_ext.app.admin import add_admin_service  # admin imports server: import late

        admin = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._admin_server = admin
        add_admin_service(self, admin)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, admin)
        self.admin_port = _bind(admin, self.cfg.router.admin.address, "admin")
        await admin.start()
        try:
            await self._start_metrics()
        except OSError as e:
            raise StartupError(
                f"cannot listen for metrics on {self.cfg.router.metrics.address}: {e.strerror or e}"
            ) from e

    def _feedback_unreachable(self, address: str, why: str) -> bool:
        """Envoy's access log says `address` failed. Act at once, unless acting would leave no
        routable pod or mark more than `feedback.max_unreachable_share` of the pool: then the
        router first tries to connect to the pod itself (off the hot path)."""
        lc = self.lifecycle
        if not lc.can_mark_unreachable(address):
            return False
        if lc.feedback_mark_needs_corroboration(address, self.cfg.feedback.max_unreachable_share):
            if address not in self._probing:
                self._probing.add(address)
                self._spawn(self._corroborate(address, why))
            return False
        return self._apply_feedback_mark(address, why)

    def _apply_feedback_mark(self, address: str, why: str) -> bool:
        if self.lifecycle.mark_unreachable(address, why, from_feedback=True):
            status = self.router.snapshot.get(address)
            self.telemetry.als_unreachable.labels(status.pod.label if status else address).inc()
            self.publish()
            return True
        return False

    async def _corroborate(self, address: str, why: str) -> None:
        try:
            down, detail = await probe_connect(address, self.cfg.feedback.probe_timeout_s)
        finally:
            self._probing.discard(address)
        if down:
            self.telemetry.feedback_corroborations.labels("confirmed").inc()
            if self._apply_feedback_mark(address, f"{why}; confirmed: {detail}"):
                log.warning("pod %s marked unreachable: %s, and %s", address, why, detail)
            return
        self.telemetry.feedback_corroborations.labels("refuted").inc()
        self.lifecycle.note_refuted_feedback(address, why, detail)

    async def _start_metrics(self) -> None:
        async def metrics(_req: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(self.telemetry.registry),
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        m = self.cfg.router.metrics
        site = web.TCPSite(runner, m.host, m.port)
        await site.start()
        self._metrics_runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.metrics_port = sockets[0].getsockname()[1] if sockets else m.port

    async def drain_and_stop(self) -> None:
        """Graceful shutdown: NOT_SERVING now, keep answering for the drain window, exit."""
        if self.draining:
            return
        self.draining = True
        self.serving = False
        await self.health.enter_graceful_shutdown()
        self.telemetry.health.set(0)
        drain = self.cfg.router.drain_seconds
        log.info("shutting down: health NOT_SERVING, answering streams for %.1fs", drain)
        await asyncio.sleep(drain)
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        for t in (*self._tasks, *self._side_tasks):
            t.cancel()
        for t in (*self._tasks, *self._side_tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self._server is not None:
            await self._server.stop(grace=0.25)
            self._server = None
        if self._admin_server is not None:
            await self._admin_server.stop(grace=0.1)
            self._admin_server = None
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        await self.scraper.close()
        log.info("router-ext stopped")


def _bind(server: grpc.aio.Server, address: str, what: str) -> int:
    try:
        port: int = server.add_insecure_port(address)
    except RuntimeError as e:  # grpc >= 1.60 raises instead of returning 0
        raise StartupError(f"cannot listen for {what} on {address}: {e}") from e
    if not port:
        raise StartupError(f"cannot listen for {what} on {address}: address in use?")
    return port


async def probe_connect(address: str, timeout_s: float) -> tuple[bool, str]:
    """The router's own check of a pod Envoy reported as failed: can we open a TCP connection?

    Returns (down, detail). Refused, reset, unreachable or no answer within `timeout_s` means
    down; an accepted connection (closed at once) means the pod's listener is alive.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port)), timeout=timeout_s
        )
    except (asyncio.TimeoutError, TimeoutError):
        return True, f"no TCP answer within {timeout_s:g}s"
    except OSError as e:
        return True, f"connect {type(e).__name__}: {e.strerror or e}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False, "the router connected to it"


def tune_gc() -> None:
    """Keep the collector off the hot path's back.

    Everything alive after start-up (modules, protobuf descriptors, config) lives for the whole
    process: `gc.freeze()` moves it out of the collector's view, so full collections no longer
    walk hundreds of thousands of objects that can never be garbage. A larger first-generation
    threshold makes young collections rarer; gRPC's per-request objects are freed by reference
    counting anyway (no cycles), so memory does not grow.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


async def serve(cfg: RouterConfig) -> int:
    app = RouterApp(cfg)
    await app.start()  # StartupError propagates to the CLI: one line, exit 2
    tune_gc()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    pending: set[asyncio.Task[None]] = set()

    def _signal(sig: signal.Signals) -> None:
        log.info("received %s", sig.name)
        pending.add(loop.create_task(_shutdown()))

    async def _shutdown() -> None:
        await app.drain_and_stop()
        done.set()

    def _hangup() -> None:
        # SIGHUP (the usual "reload" signal; also what a closed terminal sends) re-reads the
        # pods file now instead of killing the router, which is Python's default for it.
        # The router config itself is not reloaded: ports and plugins need a restart.
        log.info("received SIGHUP: re-reading the pods file (router config is not reloaded)")
        app.discovery.check(force=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _signal, sig)
    loop.add_signal_handler(signal.SIGHUP, _hangup)
    await done.wait()
    return 0
