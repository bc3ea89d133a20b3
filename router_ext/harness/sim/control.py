"""HTTP control API of a running simulator (loopback only, JSON answers).

Lets a test, a demo script or a human with curl inject faults into a simulator that runs in
another process, without restarting it:

    POST   /pods/{name}/kill | revive | hang | unhang
    POST   /pods/{name}/term?grace=30   (planned shutdown: stop accepting, drain, exit)
    POST   /pods/{name}/slow?factor=3      POST /pods/{name}/fail5xx?rate=1
    POST   /pods/{name}/draining?on=1      POST /pods/{name}/ready?on=0
    POST   /metrics-outage?on=1
    POST   /pods            (JSON body: SimPodConfig fields; adds a pod)
    DELETE /pods/{name}     (?grace=SECONDS lets in-flight requests finish)
    GET    /pods            (state, flags, served counts)
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from router_ext.harness.sim.fleet import SimFleet, UnknownPodError
from router_ext.harness.sim.pod import SimStateError
from router_ext.harness.sim.podconfig import DEFAULT_GRACE_S, SimPodConfig

log = logging.getLogger("router_ext.harness.sim")

_TRUE = {"1", "on", "true", "yes"}
_FALSE = {"0", "off", "false", "no"}

PodConfigFactory = Callable[[dict[str, Any]], SimPodConfig]


def _err(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": HTTPStatus(status).phrase, "code": status}},
        status=status,
    )


def _bool_param(request: web.Request, key: str, default: bool = True) -> bool:
    raw = request.query.get(key)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"query parameter {key!r} must be 1/0, on/off or true/false, got {raw!r}")


def _float_param(request: web.Request, key: str, default: float | None = None) -> float:
    raw = request.query.get(key)
    if raw is None:
        if default is None:
            raise ValueError(f"query parameter {key!r} is required")
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"query parameter {key!r} must be a number, got {raw!r}") from None


class ControlServer:
    """Serves the control API for one fleet on its own port."""

    def __init__(
        self,
        fleet: SimFleet,
        host: str = "127.0.0.1",
        port: int = 0,
        pod_config: PodConfigFactory | None = None,
    ) -> None:
        self.fleet = fleet
        self.host = host
        self.port = port
        # Fills CLI defaults into a POST /pods body (the CLI passes one); else dataclass defaults.
        self._pod_config: PodConfigFactory = pod_config or SimPodConfig.from_mapping
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> int:
        app = web.Application(middlewares=[self._errors])
        app.router.add_get("/pods", self._list)
        app.router.add_post("/pods", self._add)
        app.router.add_delete("/pods/{name}", self._remove)
        app.router.add_post("/pods/{name}/{action}", self._action)
        app.router.add_post("/metrics-outage", self._outage)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            await runner.cleanup()
            raise
        self.port = sock.getsockname()[1]
        site = web.SockSite(runner, sock)
        await site.start()
        self._runner = runner
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every failure becomes a JSON error with the right status, never an HTML page."""
        try:
            return await handler(request)
        except UnknownPodError as e:
            return _err(404, str(e))
        except SimStateError as e:
            return _err(409, str(e))
        except ValueError as e:
            return _err(400, str(e))
        except web.HTTPException as e:
            return _err(e.status, e.reason)
        except OSError as e:
            return _err(500, f"{type(e).__name__}: {e}")

    async def _list(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.fleet.status())

    async def _add(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError as e:
            raise ValueError(f"body must be JSON: {e}") from None
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object of SimPodConfig fields")
        cfg = self._pod_config(body)
        if cfg.name in self.fleet.pods:
            return _err(409, f"pod {cfg.name!r} already exists")
        pod = await self.fleet.add_pod(cfg)
        return web.json_response(
            {"name": pod.name, "address": pod.address, "port": pod.port}, status=201
        )

    async def _remove(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.fleet.pod(name)
        grace = _float_param(request, "grace", 0.0)
        await self.fleet.remove_pod(name, grace_s=max(0.0, grace))
        return web.json_response({"name": name, "removed": True})

    async def _outage(self, request: web.Request) -> web.StreamResponse:
        on = _bool_param(request, "on")
        self.fleet.set_metrics_outage(on)
        return web.json_response({"metrics_outage": on})

    async def _action(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        action = request.match_info["action"]
        fleet = self.fleet
        fleet.pod(name)  # 404 before anything else
        if action == "kill":
            await fleet.kill(name)
        elif action == "term":
            await fleet.terminate(name, _float_param(request, "grace", DEFAULT_GRACE_S))
        elif action == "revive":
            await fleet.revive(name)
        elif action == "hang":
            await fleet.hang(name)
        elif action == "unhang":
            await fleet.unhang(name)
        elif action == "slow":
            fleet.slow(name, _float_param(request, "factor"))
        elif action == "flush-cache":
            fleet.flush_cache(name)
        elif action == "fail5xx":
            fleet.fail5xx(name, _float_param(request, "rate", 1.0))
        elif action == "draining":
            fleet.set_draining(name, _bool_param(request, "on"))
        elif action == "ready":
            fleet.set_ready(name, _bool_param(request, "on"))
        else:
            return _err(404, f"unknown action {action!r}")
        return web.json_response({"name": name, "action": action, **fleet.status()["pods"][name]})
