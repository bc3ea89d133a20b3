"""router-ext as Envoy's EDS server (envoy.eds: grpc): the pods cluster's members over gRPC.

Why serve it at all: the file EDS needs a volume Envoy and router-ext share, so Envoy must run
beside the router. Served over the router's gRPC port, the router and Envoy can live in
separate pods. Measured with Envoy 1.40 (BACKGROUND §8): membership in `/clusters` 11-15 ms
after a change; with the server SIGKILLed Envoy keeps its last endpoints and keeps routing.

The protocol is xDS state of the world (`StreamEndpoints`): every response carries the whole
ClusterLoadAssignment, built by the same function as the file (`pods_load_assignment`), so both
say the same thing (readiness, draining, hostname). The version is a hash of that content:
several router replicas with the same membership send the same version, and Envoy treats a
reconnect to another replica as no change. Each response has its own nonce; Envoy's next
request names it and either ACKs (version_info = ours) or NACKs (error_detail set; logged once
per version with Envoy's message, the last good version stays in Envoy). A request naming an
older nonce answers a response already superseded and is ignored, as the protocol says.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2 as disc
from envoy.service.endpoint.v3 import eds_pb2_grpc
from google.protobuf import any_pb2, json_format

from router_ext.envoy_adapter.auth import StreamAuth
from router_ext.envoy_adapter.envoy_config import (
    CLA_TYPE,
    CLUSTER_PODS,
    eds_version,
    pods_load_assignment,
)
from router_ext.fleet.snapshot import Pod

__all__ = ["EDS_SERVICE", "EdsServer", "EdsStats"]

log = logging.getLogger("router_ext.envoy_adapter.xds")

#: The gRPC service name, as StreamAuth labels refused streams with it.
EDS_SERVICE = "envoy.service.endpoint.v3.EndpointDiscoveryService"

_CLA_URL = CLA_TYPE


@dataclass(slots=True)
class EdsStats:
    """What the EDS server has done, for tests, status and metrics."""

    streams_open: int = 0
    streams_total: int = 0
    responses: int = 0
    acks: int = 0
    nacks: int = 0
    last_acked: str = ""  # the version some Envoy last accepted
    last_nack: str = ""


@dataclass(eq=False, slots=True)
class _Stream:
    peer: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    subscribed: bool = False
    closed: bool = False
    names: tuple[str, ...] = ()
    sent_version: str | None = None  # what this stream was last sent (None: send again)
    nonce: str = ""
    acked_version: str = ""
    node: str = ""


class EdsServer(eds_pb2_grpc.EndpointDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves CLUSTER_PODS. `publish(pods)` on every discovery change pushes to open streams."""

    def __init__(self) -> None:
        #: Set by the server when router.auth.mode is token: every stream must carry it.
        self.auth: StreamAuth | None = None
        self.stats = EdsStats()
        self._version: str | None = None
        self._resource: any_pb2.Any | None = None
        self._streams: set[_Stream] = set()
        self._nonces = itertools.count(1)
        self._nack_logged: set[str] = set()
        self._type_logged = False

    @property
    def version(self) -> str | None:
        """The version served (None until the first publish: nothing is sent before it)."""
        return self._version

    def publish(self, pods: Sequence[Pod]) -> bool:
        """Serve this pod set; returns whether the membership (its version) changed."""
        cla = pods_load_assignment(pods)
        version = eds_version(cla)
        if version == self._version:
            return False
        msg = endpoint_pb2.ClusterLoadAssignment()
        json_format.ParseDict({k: v for k, v in cla.items() if k != "@type"}, msg)
        resource = any_pb2.Any()
        resource.Pack(msg)
        self._version, self._resource = version, resource
        for stream in self._streams:
            stream.wake.set()
        return True

    def response_for(self, names: Sequence[str]) -> disc.DiscoveryResponse | None:
        """The response a subscriber to `names` gets now (no nonce); None before a publish."""
        if self._version is None or self._resource is None:
            return None
        # An empty list is a wildcard subscription. Names we do not serve get no resource:
        # Envoy then keeps waiting for them (initial_fetch_timeout), which is the honest answer.
        wanted = not names or CLUSTER_PODS in names
        return disc.DiscoveryResponse(
            version_info=self._version,
            resources=[self._resource] if wanted else [],
            type_url=_CLA_URL,
        )

    async def StreamEndpoints(
        self,
        request_iterator: AsyncIterator[disc.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        if self.auth is not None:
            await self.auth.admit(context, EDS_SERVICE)  # aborts the stream if not
        stream = _Stream(peer=context.peer())
        self._streams.add(stream)
        self.stats.streams_open += 1
        self.stats.streams_total += 1
        # Requests (subscription, ACK/NACK) and pushes (publish) arrive independently: one task
        # reads, this one writes whenever either wakes it.
        reader = asyncio.get_running_loop().create_task(self._read(request_iterator, stream))
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if stream.closed:
                    return
                if not stream.subscribed or stream.sent_version == self._version:
                    continue
                resp = self.response_for(stream.names)
                if resp is None:
                    continue
                resp.nonce = str(next(self._nonces))
                stream.nonce, stream.sent_version = resp.nonce, resp.version_info
                await context.write(resp)
                self.stats.responses += 1
        finally:
            self._streams.discard(stream)
            self.stats.streams_open -= 1
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _read(self, requests: AsyncIterator[disc.DiscoveryRequest], stream: _Stream) -> None:
        try:
            async for req in requests:
                self._on_request(req, stream)
        except (grpc.RpcError, asyncio.CancelledError):
            pass  # stream cancelled or reset by Envoy: the writer below ends it
        except Exception:
            log.exception("EDS stream from %s: unreadable request; closing it", stream.peer)
        finally:
            stream.closed = True
            stream.wake.set()

    def _on_request(self, req: disc.DiscoveryRequest, stream: _Stream) -> None:
        if req.type_url and req.type_url != _CLA_URL:
            if not self._type_logged:
                self._type_logged = True
                log.warning(
                    "EDS stream from %s asked for %s; this server serves only %s (logged once)",
                    stream.peer,
                    req.type_url,
                    _CLA_URL,
                )
            return
        if req.node.id:
            stream.node = req.node.id  # sent on the first message only (as rendered)
        if req.response_nonce:
            if req.response_nonce != stream.nonce:
                return  # answers a response already superseded
            if req.HasField("error_detail"):
                self._nack(req, stream)
                return  # keep the version: re-sending what Envoy rejected would loop
            stream.acked_version = self.stats.last_acked = req.version_info
            self.stats.acks += 1
        names = tuple(sorted(req.resource_names))
        if not stream.subscribed or names != stream.names:
            stream.subscribed, stream.names, stream.sent_version = True, names, None
            stream.wake.set()

    def _nack(self, req: disc.DiscoveryRequest, stream: _Stream) -> None:
        self.stats.nacks += 1
        detail = req.error_detail.message or f"code {req.error_detail.code}"
        self.stats.last_nack = detail
        rejected = stream.sent_version or ""
        if rejected not in self._nack_logged:
            self._nack_logged.add(rejected)
            log.error(
                "Envoy %s rejected EDS version %s (still on %s): %s (logged once per version)",
                stream.node or stream.peer,
                rejected,
                req.version_info or "none",
                detail,
            )

    async def FetchEndpoints(
        self, request: disc.DiscoveryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> disc.DiscoveryResponse:
        if self.auth is not None:
            await self.auth.admit(context, EDS_SERVICE)
        resp = self.response_for(tuple(request.resource_names))
        if resp is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "router-ext: no membership yet")
        assert resp is not None
        return resp

    async def DeltaEndpoints(
        self,
        request_iterator: AsyncIterator[disc.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "router-ext serves EDS as state of the world (api_type GRPC), not delta",
        )
