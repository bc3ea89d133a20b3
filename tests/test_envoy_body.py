"""Request-aware routing, Envoy's side: the model header and the body on demand, on real Envoy.

What Envoy must do without any Python in the path: lift the JSON body's `model` into
MODEL_HEADER (json_to_metadata + header_mutation) before ext_proc's header phase, overwrite a
client's copy, and map the odd bodies to explicit values. What it must do when the router asks:
send the body (BUFFERED) only for the one allowed mode override, honour x-target-pod set in the
body answer, deliver the body byte-identical, fail open in the body phase, and re-send the whole
buffered body on a retry.

The ext_proc server here is a stand-in for router-ext (its body handling is written separately):
it talks through the one header Envoy forwards that a test can set freely,
`x-routing-strategy-request: ACTION[:PODS]`. Backends run on a private event loop thread, as in
test_envoy_config.py, so nothing the synchronous test body does can stall them.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import http.client
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from router_ext import config as rc
from router_ext.config import EnvoySection, Listen, RouterConfig, RoutingSection
from router_ext.envoy_adapter.envoy_config import (
    CLUSTER_PODS,
    CLUSTER_ROUTER,
    ROUTED_TO_HEADER,
    body_buffer_limit,
    write_envoy_files,
)
from router_ext.envoy_adapter.modes import BODY_MODE_OVERRIDE
from router_ext.fleet.snapshot import Pod
from router_ext.harness.envoy_proc import EnvoyProcess, envoy_binary, free_port

pytestmark = pytest.mark.e2e

T = TypeVar("T")
PLAN = rc.STRATEGY_REQUEST_HEADER
SESSION = "x-test-session"  # a non-default routing.session_header: forwarded because configured
JSON = {"content-type": "application/json"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _chat(model: str | None, size: int) -> bytes:
    """An OpenAI chat body of about `size` bytes (`model` omitted when None)."""
    doc: dict[str, Any] = {"messages": [{"role": "user", "content": ""}], "max_tokens": 4}
    if model is not None:
        doc["model"] = model
    pad = max(0, size - len(json.dumps(doc)))
    doc["messages"][0]["content"] = "x" * pad
    return json.dumps(doc).encode()


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    # raw_value: a value-only mutation reaches Envoy as an empty string (BACKGROUND §4).
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode())
    )


def _target(pods: str) -> ep.CommonResponse:
    if not pods:
        return ep.CommonResponse()
    return ep.CommonResponse(
        header_mutation=ep.HeaderMutation(set_headers=[_header(rc.TARGET_POD_HEADER, pods)])
    )


#: Overrides a careless router might send: each differs from BODY_MODE_OVERRIDE in one field.
def _streamed() -> ProcessingMode:
    m = ProcessingMode()
    m.CopyFrom(BODY_MODE_OVERRIDE)
    m.request_body_mode = ProcessingMode.BodySendMode.STREAMED
    return m


def _with_response_headers() -> ProcessingMode:
    m = ProcessingMode()
    m.CopyFrom(BODY_MODE_OVERRIDE)
    m.response_header_mode = ProcessingMode.HeaderSendMode.SEND
    return m


BAD_OVERRIDES = {"streamed": _streamed(), "response-headers": _with_response_headers()}


@dataclass
class _Stream:
    """What one ext_proc stream carried: the forwarded headers and, if sent, the body."""

    headers: dict[str, str]
    body: bytes | None = None
    kinds: list[str] = field(default_factory=list)


class _StandInRouter(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Stands in for router-ext. Plans (x-routing-strategy-request):

    `pick:PODS` x-target-pod in the header answer · `body:PODS` ask for the body with
    BODY_MODE_OVERRIDE, x-target-pod in the body answer · `bad-NAME:PODS` ask with one of
    BAD_OVERRIDES (x-target-pod in the body answer, if Envoy ever sent one) · `hang-body` ask
    for the body, never answer it.
    """

    def __init__(self) -> None:
        self.streams: dict[str, _Stream] = {}

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: Any
    ) -> AsyncIterator[ep.ProcessingResponse]:
        stream: _Stream | None = None
        action, pods = "", ""
        async for req in request_iterator:
            kind = req.WhichOneof("request")
            if kind == "request_headers":
                hdrs = {h.key: h.raw_value.decode() for h in req.request_headers.headers.headers}
                stream = _Stream(hdrs)
                self.streams[hdrs.get(rc.REQUEST_ID_HEADER, "")] = stream
                action, _, pods = hdrs.get(PLAN, "").partition(":")
                if action == "pick":
                    yield ep.ProcessingResponse(
                        request_headers=ep.HeadersResponse(response=_target(pods))
                    )
                elif action in ("body", "hang-body"):
                    yield ep.ProcessingResponse(
                        request_headers=ep.HeadersResponse(), mode_override=BODY_MODE_OVERRIDE
                    )
                elif action.startswith("bad-"):
                    yield ep.ProcessingResponse(
                        request_headers=ep.HeadersResponse(),
                        mode_override=BAD_OVERRIDES[action.removeprefix("bad-")],
                    )
                else:
                    yield ep.ProcessingResponse(request_headers=ep.HeadersResponse())
            elif stream is not None:
                stream.kinds.append(str(kind))
                if kind == "request_body":
                    stream.body = (stream.body or b"") + req.request_body.body
                    if action == "hang-body":
                        await asyncio.Event().wait()  # Envoy's message_timeout ends this
                    yield ep.ProcessingResponse(
                        request_body=ep.BodyResponse(response=_target(pods))
                    )
                elif kind == "response_headers":
                    yield ep.ProcessingResponse(response_headers=ep.HeadersResponse())


def _quiet_cut_streams(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if "ExecuteBatchError" in type(context.get("exception")).__name__:
        return
    loop.default_exception_handler(context)


@dataclass
class _Seen:
    """One request as an upstream received it."""

    method: str
    path: str
    headers: dict[str, str]
    sha: str
    length: int


class _Backends:
    """Echoing upstreams, a resetting upstream and the stand-in router on one loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_quiet_cut_streams)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.seen: dict[str, list[_Seen]] = {}
        self._runners: list[web.AppRunner] = []
        self._servers: list[grpc.aio.Server] = []
        self._raw: list[asyncio.Server] = []

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def upstream(self, name: str) -> str:
        """An upstream that records each request (headers, body hash) and echoes it back."""
        seen: list[_Seen] = []
        self.seen[name] = seen

        async def handle(req: web.Request) -> web.Response:
            body = await req.read()
            if req.path == "/health":
                return web.Response(text="ok")
            headers = {k.lower(): v for k, v in req.headers.items()}
            seen.append(_Seen(req.method, req.path, headers, _sha(body), len(body)))
            return web.json_response(
                {"model_header": headers.get(rc.MODEL_HEADER), "sha": _sha(body)},
                headers={rc.SERVED_BY_HEADER: name},
            )

        async def start() -> int:
            app = web.Application(client_max_size=64 << 20)
            app.router.add_route("*", "/{tail:.*}", handle)
            # The raw bytes: a gzip body must reach the pod as sent, not inflated by aiohttp.
            runner = web.AppRunner(app, access_log=None, auto_decompress=False)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self._runners.append(runner)
            port: int = runner.addresses[0][1]
            return port

        return f"127.0.0.1:{self.call(start())}"

    def resetter(self, name: str) -> str:
        """A pod that reads a whole request, then resets the connection (RST) instead of
        answering: the engine died mid-request. Answers /health so it looks alive."""
        seen: list[_Seen] = []
        self.seen[name] = seen

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            first, *lines = head.split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines if x)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            method, path, _ = first.split(" ", 2)
            if path == "/health":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                await writer.drain()
                writer.close()
                return
            seen.append(_Seen(method, path, headers, _sha(body), len(body)))
            sock = writer.get_extra_info("socket")
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            writer.transport.abort()

        async def start() -> int:
            server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
            self._raw.append(server)
            port: int = server.sockets[0].getsockname()[1]
            return port

        return f"127.0.0.1:{self.call(start())}"

    def router(self) -> tuple[str, _StandInRouter, grpc.aio.Server]:
        fake = _StandInRouter()

        async def start() -> tuple[int, grpc.aio.Server]:
            server = grpc.aio.server()
            ep_grpc.add_ExternalProcessorServicer_to_server(fake, server)
            hs = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(hs, server)
            await hs.set(rc.EXT_PROC_SERVICE, health_pb2.HealthCheckResponse.SERVING)
            port: int = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self._servers.append(server)
            return port, server

        port, server = self.call(start())
        return f"127.0.0.1:{port}", fake, server

    def kill_router(self, server: grpc.aio.Server) -> None:
        self.call(server.stop(0))

    def close(self) -> None:
        async def stop() -> None:
            for server in self._servers:
                await server.stop(0)
            for raw in self._raw:
                raw.close()
            for runner in self._runners:
                await runner.cleanup()
            current = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not current]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self.call(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


@pytest.fixture
def backends() -> Iterator[_Backends]:
    b = _Backends()
    try:
        yield b
    finally:
        b.close()


def _wait_for(what: str, pred: Callable[[], T], timeout: float = 8.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class _Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def rid(self) -> str:
        return self.headers[rc.REQUEST_ID_HEADER]


class _Live:
    def __init__(self, cfg: RouterConfig, envoy: EnvoyProcess) -> None:
        self.cfg = cfg
        self.envoy = envoy
        self.port = cfg.envoy.listener.port

    def send(
        self,
        method: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        path: str = "/v1/chat/completions",
        chunked: bool = False,
    ) -> _Reply:
        """One request with exactly these headers (http.client adds no content-type)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            if chunked:
                assert body is not None
                conn.putrequest(method, path)
                for k, v in (headers or {}).items():
                    conn.putheader(k, v)
                conn.putheader("transfer-encoding", "chunked")
                conn.endheaders()
                for i in range(0, len(body), 8192):
                    piece = body[i : i + 8192]
                    conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                conn.send(b"0\r\n\r\n")
            else:
                conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return _Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def router_healthy(self, address: str) -> None:
        _wait_for(
            "router cluster healthy",
            lambda: (
                self.envoy.cluster_hosts(CLUSTER_ROUTER).get(address, {}).get("health_flags")
                == "healthy"
            ),
        )


@pytest.fixture
def refused_address() -> Iterator[Callable[[], str]]:
    """Addresses that refuse connections (bound, never listening) for the test's duration."""
    held: list[socket.socket] = []

    def make() -> str:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        held.append(s)
        return f"127.0.0.1:{s.getsockname()[1]}"

    try:
        yield make
    finally:
        for s in held:
            s.close()


@pytest.fixture
def start_envoy(
    tmp_path: Path, refused_address: Callable[[], str]
) -> Iterator[Callable[..., _Live]]:
    started: list[EnvoyProcess] = []

    def start(pods: list[str], router_address: str | None = None) -> _Live:
        cfg = RouterConfig(
            base_dir=tmp_path,
            envoy=EnvoySection(
                listener=Listen(port=free_port()),
                admin=Listen(port=free_port()),
                router_address=router_address or refused_address(),
                access_log_path=str(tmp_path / "access.log"),
            ),
            routing=RoutingSection(session_header=SESSION),
        )
        host_ports = [a.rsplit(":", 1) for a in pods]
        files = write_envoy_files(cfg, [Pod(h, int(p)) for h, p in host_ports], tmp_path)
        envoy = EnvoyProcess(envoy_binary())
        started.append(envoy)
        envoy.start(files["envoy"], tmp_path / "envoy.log")
        envoy.wait_ready(15)
        live = _Live(cfg, envoy)

        def all_checked() -> bool:
            hosts = envoy.cluster_hosts(CLUSTER_PODS)
            return all(hosts.get(a, {}).get("health_flags") == "healthy" for a in pods)

        # The fallback balancer only picks pods that passed a health check.
        _wait_for("every pod health-checked", all_checked)
        return live

    try:
        yield start
    finally:
        for envoy in started:
            envoy.stop()


# --- the model header ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1024, 128 * 1024])
def test_model_header_reaches_router_and_pod_and_overwrites_a_clients(
    backends: _Backends, start_envoy: Callable[..., _Live], size: int
) -> None:
    a = backends.upstream("A")
    addr, fake, _ = backends.router()
    live = start_envoy([a], router_address=addr)
    live.router_healthy(addr)

    body = _chat("llama-3-8b", size)
    r = live.send(
        "POST", body, {**JSON, rc.MODEL_HEADER: "spoofed", PLAN: f"pick:{a}", SESSION: "s-1"}
    )
    assert r.status == 200, r.body
    seen = fake.streams[r.rid].headers
    assert seen[rc.MODEL_HEADER] == "llama-3-8b"
    # Pseudo-headers and the length reach the router with forward_rules' exact patterns.
    assert seen[":path"] == "/v1/chat/completions"
    assert seen[":method"] == "POST"
    assert seen["content-length"] == str(len(body))
    assert "content-type" not in seen  # not read by the router: not forwarded (a header
    # costs the handler ~0.5 µs to walk)
    assert seen[SESSION] == "s-1"  # the configured session header is forwarded too
    # Header-only answer: Envoy sent the router no body.
    assert fake.streams[r.rid].body is None
    (got,) = backends.seen["A"]
    assert got.headers[rc.MODEL_HEADER] == "llama-3-8b"
    assert (got.sha, got.length) == (_sha(body), len(body))


def test_router_sees_only_the_headers_it_reads(
    backends: _Backends, start_envoy: Callable[..., _Live]
) -> None:
    a = backends.upstream("A")
    addr, fake, _ = backends.router()
    live = start_envoy([a], router_address=addr)
    live.router_healthy(addr)
    r = live.send(
        "POST",
        _chat("m", 100),
        {**JSON, "authorization": "Bearer secret", "x-other": "1", "content-encoding": "identity"},
    )
    assert r.status == 200
    allowed = {*rc.ROUTER_READS_HEADERS, SESSION}
    seen = fake.streams[r.rid].headers
    assert set(seen) <= allowed, set(seen) - allowed
    assert seen["content-encoding"] == "identity"
    assert "authorization" not in seen


# Measured in Envoy 1.40 (json_to_metadata with allow_content_types [application/json] and
# allow_empty_content_type): which bodies yield which MODEL_HEADER, at the router and the pod.
# None = no header at all.
MODEL_CASES: list[tuple[str, str, bytes, dict[str, str], bool, str | None]] = [
    ("json", "POST", b'{"model": "m1", "prompt": "hi"}', JSON, False, "m1"),
    (
        "json-charset",
        "POST",
        b'{"model": "m1"}',
        {"content-type": "application/json; charset=utf-8"},
        False,
        "m1",
    ),
    ("no-content-type", "POST", b'{"model": "m1"}', {}, False, "m1"),
    ("chunked", "POST", _chat("m-chunked", 64 * 1024), JSON, True, "m-chunked"),
    ("missing-model", "POST", b'{"prompt": "hi"}', JSON, False, rc.MODEL_NONE),
    ("model-not-string", "POST", b'{"model": 7}', JSON, False, "7"),
    ("not-json", "POST", b"model=m1&prompt=hi", JSON, False, rc.MODEL_NOT_JSON),
    ("json-array", "POST", b'[{"model": "m1"}]', JSON, False, rc.MODEL_NONE),
    ("empty-body", "POST", b"", JSON, False, rc.MODEL_NONE),
    (
        "text-plain",
        "POST",
        b'{"model": "m1"}',
        {"content-type": "text/plain"},
        False,
        rc.MODEL_NOT_JSON,
    ),
    (
        "form",
        "POST",
        b'{"model": "m1"}',
        {"content-type": "application/x-www-form-urlencoded"},
        False,
        rc.MODEL_NOT_JSON,
    ),
    (
        "gzip",
        "POST",
        gzip.compress(b'{"model": "m1"}'),
        {**JSON, "content-encoding": "gzip"},
        False,
        rc.MODEL_NOT_JSON,
    ),
    ("get", "GET", b"", {}, False, None),
]


@pytest.mark.parametrize(
    ("method", "body", "headers", "chunked", "expected"),
    [pytest.param(*c[1:], id=c[0]) for c in MODEL_CASES],
)
def test_model_header_for_each_kind_of_body(
    backends: _Backends,
    start_envoy: Callable[..., _Live],
    method: str,
    body: bytes,
    headers: dict[str, str],
    chunked: bool,
    expected: str | None,
) -> None:
    a = backends.upstream("A")
    addr, fake, _ = backends.router()
    live = start_envoy([a], router_address=addr)
    live.router_healthy(addr)
    # Every request carries a client copy: it must never survive, with or without a body.
    r = live.send(method, body or None, {**headers, rc.MODEL_HEADER: "spoofed"}, chunked=chunked)
    assert r.status == 200, r.body
    assert fake.streams[r.rid].headers.get(rc.MODEL_HEADER) == expected
    (got,) = backends.seen["A"]
    assert got.headers.get(rc.MODEL_HEADER) == expected
    assert (got.sha, got.length) == (_sha(body), len(body))  # the body passes untouched


# --- body on demand -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1024, 128 * 1024])
def test_body_phase_target_is_honoured_and_body_arrives_intact(
    backends: _Backends, start_envoy: Callable[..., _Live], size: int
) -> None:
    a, b = backends.upstream("A"), backends.upstream("B")
    addr, fake, _ = backends.router()
    live = start_envoy([a, b], router_address=addr)
    live.router_healthy(addr)
    body = _chat("m", size)
    for _ in range(3):
        r = live.send("POST", body, {**JSON, PLAN: f"body:{b}"})
        assert r.status == 200, r.body
        assert r.headers[ROUTED_TO_HEADER] == b  # x-target-pod from the body answer
        assert fake.streams[r.rid].body == body  # the whole body, in one BUFFERED message
        assert fake.streams[r.rid].kinds == ["request_body"]
    assert not backends.seen["A"]
    assert [(s.sha, s.length) for s in backends.seen["B"]] == [(_sha(body), len(body))] * 3


@pytest.mark.parametrize("bad", sorted(BAD_OVERRIDES))
def test_any_other_mode_override_is_ignored(
    backends: _Backends, start_envoy: Callable[..., _Live], bad: str
) -> None:
    a, b = backends.upstream("A"), backends.upstream("B")
    addr, fake, _ = backends.router()
    live = start_envoy([a, b], router_address=addr)
    live.router_healthy(addr)
    body = _chat("m", 4096)
    for _ in range(6):
        r = live.send("POST", body, {**JSON, PLAN: f"bad-{bad}:{b}"})
        assert r.status == 200, r.body
        # Envoy went on header-only: no body and no response phase reached the router.
        assert fake.streams[r.rid].kinds == []
    # Still delivered, intact, by the fallback balancer (no body answer, so no x-target-pod).
    served = [*backends.seen["A"], *backends.seen["B"]]
    assert [(s.sha, s.length) for s in served] == [(_sha(body), len(body))] * 6


def test_body_phase_fails_open_when_router_hangs_or_is_gone(
    backends: _Backends, start_envoy: Callable[..., _Live]
) -> None:
    a = backends.upstream("A")
    addr, fake, server = backends.router()
    live = start_envoy([a], router_address=addr)
    live.router_healthy(addr)
    body = _chat("m", 32 * 1024)

    # Hung in the body phase: message_timeout (200 ms) covers the body answer too.
    t0 = time.monotonic()
    r = live.send("POST", body, {**JSON, PLAN: "hang-body"})
    took = time.monotonic() - t0
    assert r.status == 200, r.body
    assert fake.streams[r.rid].body == body  # it was in the body phase when it hung
    assert 0.15 < took < 2.0, took
    stats = live.envoy.stats("http.ingress.ext_proc.")
    assert stats["http.ingress.ext_proc.message_timeouts"] >= 1

    # Gone: every request still reaches a pod, body intact (failure_mode_allow).
    backends.kill_router(server)
    for _ in range(3):
        r = live.send("POST", body, {**JSON, PLAN: f"body:{a}"})
        assert r.status == 200, r.body
    assert [(s.sha, s.length) for s in backends.seen["A"]] == [(_sha(body), len(body))] * 4
    stats = live.envoy.stats("http.ingress.ext_proc.")
    assert stats["http.ingress.ext_proc.failure_mode_allowed"] >= 3


def test_retry_resends_the_whole_buffered_body_to_the_fallback(
    backends: _Backends, start_envoy: Callable[..., _Live]
) -> None:
    dying, good = backends.resetter("dying"), backends.upstream("good")
    addr, _, _ = backends.router()
    live = start_envoy([dying, good], router_address=addr)
    live.router_healthy(addr)
    body = _chat("m", 128 * 1024)
    r = live.send("POST", body, {**JSON, PLAN: f"body:{dying},{good}"})
    assert r.status == 200, r.body
    assert r.headers[ROUTED_TO_HEADER] == good
    # The first pod got the whole body and reset; the retry carried the same bytes.
    assert [(s.sha, s.length) for s in backends.seen["dying"]] == [(_sha(body), len(body))]
    assert [(s.sha, s.length) for s in backends.seen["good"]] == [(_sha(body), len(body))]
    assert (
        live.envoy.stats(f"cluster.{CLUSTER_PODS}.upstream_rq_retry")[
            f"cluster.{CLUSTER_PODS}.upstream_rq_retry"
        ]
        >= 1
    )


def test_json_body_over_the_buffer_limit_is_413_and_other_bodies_stream(
    backends: _Backends, start_envoy: Callable[..., _Live]
) -> None:
    """json_to_metadata buffers a JSON body whole to find `model`: past the stream's buffer
    limit Envoy refuses it before any routing. Other content types are not buffered."""
    a = backends.upstream("A")
    live = start_envoy([a])  # router down: fail-open path
    body = _chat("m", body_buffer_limit(live.cfg) + 1024)
    r = live.send("POST", body, JSON)
    assert r.status == 413
    assert not backends.seen["A"]
    r = live.send("POST", body, {"content-type": "application/octet-stream"})
    assert r.status == 200
    (got,) = backends.seen["A"]
    assert (got.sha, got.headers[rc.MODEL_HEADER]) == (_sha(body), rc.MODEL_NOT_JSON)
