"""One simulated vLLM pod: its listening socket, HTTP handlers and process-level faults.

Socket model (why it is not a plain aiohttp site):
- The pod binds one *master* listening socket and hands aiohttp (or the hang server) a `dup()`
  of it. Swapping servers for hang/unhang closes only the dup, so the port never stops
  listening: the kernel keeps completing handshakes, exactly like a hung process.
- kill closes every descriptor of the socket (new connects are refused) and aborts each open
  connection with an RST (SO_LINGER 0), so in-flight requests see a reset, as with kill -9.
- revive binds the same port again (SO_REUSEADDR) with a fresh load model and fresh metrics.
- terminate is a planned shutdown as vLLM's uvicorn does it on SIGTERM: the listening socket
  closes (new connects are refused, so /health fails and Envoy's health check and the
  router's scraper see it at once), idle keep-alive connections close, in-flight requests
  (streams included) run to completion for up to a grace period, then the pod is gone.
HTTP is served by aiohttp's low-level `web.Server` with a dict router: no per-request
middleware or access log, which matters when one process plays a whole fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import random
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from router_ext.config import SERVED_BY_HEADER
from router_ext.harness.sim.api import (
    DONE_EVENT,
    MAX_MODEL_LEN,
    ApiError,
    ParsedRequest,
    StreamEncoder,
    error_body,
    full_response,
    parse_request,
)
from router_ext.harness.sim.engine import DONE, LoadModel, SimRequest
from router_ext.harness.sim.metrics import CONTENT_TYPE_LATEST, PodMetrics
from router_ext.harness.sim.podconfig import SimPodConfig

_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
_LINGER_RST = struct.pack("ii", 1, 0)


#: Response header: sha256 of the request body the pod received (non-streamed answers).
BODY_DIGEST_HEADER = "x-sim-body-sha256"


class SimStateError(RuntimeError):
    """A fault that does not apply in the pod's current state (e.g. revive a live pod)."""


@dataclass
class FleetFlags:
    """Fleet-wide switches every pod reads (one shared object, no copies to keep in sync)."""

    metrics_outage: bool = False


class _HoldProtocol(asyncio.Protocol):
    """Accepts a connection and never answers: what a hung (SIGSTOPped, deadlocked) server
    looks like from outside. Bytes received are kept so the connection can be handed to the
    HTTP server on unhang, as a resumed process would then read them."""

    def __init__(self, held: dict[asyncio.Transport, bytearray]) -> None:
        self._held = held
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._held[transport] = bytearray()

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            buf = self._held.get(self._transport)
            if buf is not None and len(buf) < 1 << 20:
                buf += data

    def eof_received(self) -> bool:
        return True  # a hung process does not close its side either

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._held.pop(self._transport, None)


def _abort(transport: asyncio.Transport) -> None:
    """Close with RST, not FIN: the peer sees 'connection reset', as after a crash."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


class SimPod:
    """A pod's lifecycle and its HTTP API.

    `state`: stopped, up, hung, killed, terminating (planned shutdown, draining in-flight
    requests) and terminated (gone after a planned shutdown; revive brings it back).
    """

    def __init__(self, cfg: SimPodConfig, host: str, flags: FleetFlags, rng: random.Random) -> None:
        self.cfg = dataclasses.replace(cfg)  # own copy: the port is filled in on start
        self.name = cfg.name
        self.host = host
        self.port = cfg.port
        self.state = "stopped"
        # Pods-file flags (discovery's view); `ready` also drives /health like a readiness probe.
        self.ready = True
        self.draining = False
        # Injected faults; they survive kill/revive (they are the operator's knobs, shown in
        # the control API) while the load model and metrics start fresh.
        self.slow_factor = 1.0
        self.fail_rate = 0.0
        # Cumulative over revivals: how many inference requests this pod answered OK / 5xx.
        self.served = 0
        self.errors = 0
        self.started_at = 0.0
        self.load: LoadModel | None = None
        self.metrics: PodMetrics | None = None
        self._flags = flags
        self._rng = rng
        self._lsock: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._web: web.Server | None = None
        self._held: dict[asyncio.Transport, bytearray] = {}
        self._inflight = 0  # HTTP requests being handled (graceful stop waits for these)
        self._idle = asyncio.Event()  # set while _inflight == 0: the drain waits on it
        self._idle.set()
        self._drain_task: asyncio.Task[int] | None = None
        # Last planned shutdown: requests that finished in the grace period / were cut.
        self.drained = 0
        self.cut_at_grace = 0
        self._headers = {SERVED_BY_HEADER: self.name}
        self._adapters = frozenset(cfg.adapters)
        self._routes: dict[str, tuple[str, _Handler]] = {
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/completions": ("POST", self._completions),
            "/v1/models": ("GET", self._models),
            "/health": ("GET", self._health),
            "/metrics": ("GET", self._metrics),
        }

    @property
    def address(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def _gone(self) -> bool:
        return self.state in ("killed", "terminated")

    @property
    def running(self) -> int:
        return self.load.running if self.load is not None and not self._gone else 0

    @property
    def waiting(self) -> int:
        return self.load.waiting if self.load is not None and not self._gone else 0

    @property
    def loaded_adapters(self) -> list[str]:
        """LoRA adapters in the GPU slots now, least recently used first."""
        if self.load is None or self._gone:
            return []
        return list(self.load.lora_loaded)

    @property
    def inflight(self) -> int:
        return self._inflight

    def flush_prefix_cache(self) -> int:
        """Empty the pod's prefix cache (blocks of running requests stay): a cold cache
        without a restart, so counters and connections carry on."""
        return self.load.flush_prefix_cache() if self.load is not None else 0

    def set_slow(self, factor: float) -> None:
        if not factor > 0:
            raise ValueError("slow factor must be > 0")
        self.slow_factor = factor
        if self.load is not None:
            self.load.speed = self.cfg.speed / factor

    def set_fail_rate(self, rate: float) -> None:
        if not 0 <= rate <= 1:
            raise ValueError("fail5xx rate must be in 0..1")
        self.fail_rate = rate

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start (or revive): fresh load model and metrics, listening on `self.port`."""
        if self.state in ("up", "hung", "terminating"):
            raise SimStateError(f"pod {self.name} is already {self.state}")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._lsock = sock
        self.port = sock.getsockname()[1]
        self.cfg.port = self.port  # a revive must come back on the same port
        self.metrics = PodMetrics(
            self.cfg.model,
            self.cfg.num_engines,
            self.cfg.block_size,
            self.cfg.kv_blocks,
            max_lora=self.cfg.max_lora if self.cfg.adapters else None,
        )
        self.load = LoadModel(self.cfg, self.metrics)
        self.load.speed = self.cfg.speed / self.slow_factor
        self.started_at = time.monotonic()
        self._web = web.Server(
            self._dispatch, handler_cancellation=True, access_log=None, keepalive_timeout=75.0
        )
        self._server = await self._serve(self._web)
        self.state = "up"

    async def _serve(self, factory: Callable[[], asyncio.BaseProtocol]) -> asyncio.Server:
        assert self._lsock is not None
        loop = asyncio.get_running_loop()
        return await loop.create_server(factory, sock=self._lsock.dup(), backlog=1024)

    def kill(self) -> None:
        """kill -9: refuse new connects, reset every open connection, drop all state."""
        if self.state not in ("up", "hung"):
            raise SimStateError(f"pod {self.name} is {self.state}, not running")
        self._close_listeners()
        self._abort_connections()
        if self.load is not None:
            self.load.close()
        self.state = "killed"

    async def revive(self) -> None:
        if not self._gone:
            raise SimStateError(f"pod {self.name} is {self.state}, not killed or terminated")
        await self.start()

    def terminate(self, grace_s: float) -> asyncio.Task[int]:
        """Planned shutdown (SIGTERM to a vLLM pod): stop accepting now, let in-flight
        requests finish within `grace_s`, then go. Returns the drain task; its result is the
        number of requests still running at the deadline (cut, as when the kubelet SIGKILLs
        a pod whose grace period ran out)."""
        if self.state != "up":
            raise SimStateError(f"pod {self.name} is {self.state}, not up")
        if not grace_s >= 0:
            raise ValueError("grace must be >= 0 seconds")
        self.state = "terminating"
        self._stop_accepting()
        self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_close(grace_s))
        return self._drain_task

    async def _drain_then_close(self, grace_s: float) -> int:
        started = self._inflight
        cut = await self._drain(grace_s)
        self.drained, self.cut_at_grace = max(0, started - cut), cut
        if self.load is not None:
            self.load.close()
        if self.state == "terminating":  # stop() may have overtaken us
            self.state = "terminated"
        return cut

    def _stop_accepting(self) -> None:
        self._close_listeners()
        if self._web is not None:
            # Idle keep-alive connections close now, busy ones right after their response
            # (aiohttp's own shutdown also waits on idle connections, which would make every
            # stop take the whole grace period).
            self._web.pre_shutdown()

    async def _drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for in-flight requests; then close what is left. Returns how
        many requests were still in flight at the deadline (their connections get an RST)."""
        if grace_s > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
        cut = self._inflight
        if cut:
            self._abort_connections()
        else:
            # Nothing in flight: close with FIN. An RST here could discard the tail of a
            # response still in the socket buffers, i.e. cut the stream we just let finish.
            self._close_connections()
        return cut

    async def hang(self) -> None:
        """Keep the port open but answer nothing, on new and on existing connections."""
        if self.state != "up":
            raise SimStateError(f"pod {self.name} is {self.state}, not up")
        if self._server is not None:
            self._server.close()  # closes only our dup; the master keeps listening
        for conn in self._connections():
            with contextlib.suppress(RuntimeError):
                conn.pause_reading()
        if self.load is not None:
            self.load.freeze()
        held = self._held
        self._server = await self._serve(lambda: _HoldProtocol(held))
        self.state = "hung"

    async def unhang(self) -> None:
        """Resume: held connections are handed to the HTTP server with what they sent."""
        if self.state != "hung":
            raise SimStateError(f"pod {self.name} is {self.state}, not hung")
        if self._server is not None:
            self._server.close()
        assert self._web is not None
        self._server = await self._serve(self._web)
        for conn in self._connections():
            if not conn.is_closing():
                with contextlib.suppress(RuntimeError):
                    conn.resume_reading()
        held, self._held = self._held, {}
        for transport, buf in held.items():
            if transport.is_closing():
                continue
            proto = self._web()
            transport.set_protocol(proto)
            proto.connection_made(transport)
            if buf:
                proto.data_received(bytes(buf))
        if self.load is not None:
            self.load.thaw()
        self.state = "up"

    async def stop(self, grace_s: float = 0.0) -> None:
        """Shut down; with `grace_s` in-flight requests may finish first (like SIGTERM)."""
        if self.state == "terminating" and self._drain_task is not None:
            # A planned shutdown is already draining: wait for it, within this grace.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drain_task), grace_s)
        if self.state not in ("up", "hung", "terminating"):
            self.state = "stopped"
            return
        # A hung pod answers nothing, so there is nothing to wait for; a terminating one has
        # had its grace above.
        no_wait = self.state in ("hung", "terminating")
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()
        self._stop_accepting()
        cut = await self._drain(0.0 if no_wait else grace_s)
        if cut and grace_s > 0:
            self.cut_at_grace = cut
        if self.load is not None:
            self.load.close()
        self.state = "stopped"

    def _close_listeners(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None

    def _connections(self) -> list[asyncio.Transport]:
        if self._web is None:
            return []
        return [h.transport for h in self._web.connections if h.transport is not None]

    def _abort_connections(self) -> None:
        for t in self._connections():
            _abort(t)
        held, self._held = self._held, {}
        for t in held:
            _abort(t)

    def _close_connections(self) -> None:
        for t in self._connections():
            t.close()
        held, self._held = self._held, {}
        for t in held:
            _abort(t)  # held by a hung server: it never answered, a reset is what it gets

    # --- HTTP ---------------------------------------------------------------------------------

    def _json(self, obj: Any, status: int = 200) -> web.Response:
        return web.Response(
            body=json.dumps(obj).encode(),
            status=status,
            content_type="application/json",
            headers=self._headers,
        )

    def _error(
        self, status: int, message: str, err_type: str, param: str | None = None
    ) -> web.Response:
        return web.Response(
            body=error_body(status, message, err_type, param),
            status=status,
            content_type="application/json",
            headers=self._headers,
        )

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        route = self._routes.get(request.path)
        if route is None:
            return self._json({"detail": "Not Found"}, 404)
        method, handler = route
        if request.method != method:
            return self._json({"detail": "Method Not Allowed"}, 405)
        self._inflight += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def _health(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(status=200 if self.ready else 503, headers=self._headers)

    async def _models(self, request: web.BaseRequest) -> web.StreamResponse:
        # vLLM's show_available_models: the base model's card, then one per LoRA adapter with
        # `parent` = the base model, its adapter path as `root` and no max_model_len.
        model = self.cfg.model
        created = int(time.time())
        cards = [_model_card(model, model, None, MAX_MODEL_LEN, created)]
        cards += [_model_card(a, f"/adapters/{a}", model, None, created) for a in self.cfg.adapters]
        return self._json({"object": "list", "data": cards})

    async def _metrics(self, request: web.BaseRequest) -> web.StreamResponse:
        if time.monotonic() - self.started_at < self.cfg.metrics_delay_s:
            return web.Response(status=503, text="metrics not ready", headers=self._headers)
        rate = self.cfg.metrics_fail_rate
        if self._flags.metrics_outage or (rate > 0 and self._rng.random() < rate):
            return web.Response(status=500, text="metrics unavailable", headers=self._headers)
        assert self.metrics is not None
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": CONTENT_TYPE_LATEST, SERVED_BY_HEADER: self.name},
        )

    async def _chat(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._inference(request, chat=True)

    async def _completions(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._inference(request, chat=False)

    async def _inference(self, request: web.BaseRequest, chat: bool) -> web.StreamResponse:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as e:  # aiohttp's 1 MiB body cap
            return self._error(413, e.text or "request body too large", "BadRequestError")
        resp = await self._answer(request, raw, chat)
        if not resp.prepared:
            # What the pod received, so tests can check a body crossed Envoy and the router
            # byte-identical (streamed responses are sent already: not set).
            resp.headers[BODY_DIGEST_HEADER] = hashlib.sha256(raw).hexdigest()
        return resp

    async def _answer(self, request: web.BaseRequest, raw: bytes, chat: bool) -> web.StreamResponse:
        try:
            body = json.loads(raw)
        except ValueError as e:
            return self._error(400, f"JSON decode error: {e}", "BadRequestError")
        try:
            p = parse_request(body, chat, self.cfg.model, self._adapters)
        except ApiError as e:
            return self._error(e.status, e.message, e.err_type, e.param)
        if self.fail_rate > 0 and self._rng.random() < self.fail_rate:
            self.errors += 1
            return self._error(500, "simulated engine failure", "InternalServerError")
        load = self.load
        assert load is not None
        out = self._output_length(p)
        req = load.submit(p.prompt_text, p.prompt_tokens, out, p.max_tokens, p.stream, p.adapter)
        req_id = f"{'chatcmpl' if chat else 'cmpl'}-{self.name}-{req.seq}"
        created = int(time.time())
        try:
            if p.stream:
                return await self._stream(request, load, req, p, req_id, created)
            while req.phase < DONE:
                await load.wait(req, req.generated)
            self.served += 1
            return web.Response(
                body=full_response(p, req_id, created, req.seq, req.generated, req.finish_reason),
                content_type="application/json",
                headers=self._headers,
            )
        finally:
            load.abort(req)  # no-op once finished; frees the slot if the client went away

    def _output_length(self, p: ParsedRequest) -> int:
        eos = self.cfg.eos_prob
        if eos <= 0 or p.ignore_eos:
            return p.max_tokens
        n = p.min_tokens or 1
        rnd = self._rng.random
        while n < p.max_tokens and rnd() >= eos:
            n += 1
        return n

    async def _stream(
        self,
        request: web.BaseRequest,
        load: LoadModel,
        req: SimRequest,
        p: ParsedRequest,
        req_id: str,
        created: int,
    ) -> web.StreamResponse:
        # Headers go out at once, before the first token, as with vLLM's StreamingResponse.
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                SERVED_BY_HEADER: self.name,
            }
        )
        await resp.prepare(request)
        enc = StreamEncoder(p, req_id, created, req.seq)
        sent = 0
        try:
            while True:
                await load.wait(req, sent)
                gen = req.generated
                done = req.phase == DONE
                if gen > sent:
                    await resp.write(enc.tokens(sent, gen, req.finish_reason if done else None))
                    sent = gen
                elif done:
                    await resp.write(enc.finish_only(req.finish_reason))
                if done:
                    break
            tail = enc.usage(sent) + DONE_EVENT if p.include_usage else DONE_EVENT
            await resp.write(tail)
            await resp.write_eof()
        except ConnectionError:
            return resp  # client went away mid-stream; `abort` in the caller frees the slot
        self.served += 1
        return resp


def _model_card(
    model_id: str, root: str, parent: str | None, max_model_len: int | None, created: int
) -> dict[str, Any]:
    """One entry of /v1/models with vLLM's ModelCard fields and default ModelPermission."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [
            {
                "id": f"modelperm-{uuid.uuid4().hex}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }
