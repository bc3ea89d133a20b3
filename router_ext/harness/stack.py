"""The whole request path as real processes on loopback: simulator, router-ext, Envoy.

Used by `router-ext demo`, the end-to-end tests and the benchmarks, so all three exercise the
same wiring a user runs. Each process is its own session (Envoy must not die with the shell,
and a test can SIGKILL/SIGSTOP one without touching the others). Ports are picked free on
127.0.0.1; the router config written here is the single source the Envoy config is rendered
from.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router_ext.config import RouterConfig, load_config
from router_ext.envoy_adapter.envoy_config import CLUSTER_PODS, CLUSTER_ROUTER, write_envoy_files
from router_ext.fleet.discovery import parse_pods
from router_ext.harness.envoy_proc import EnvoyProcess, free_port


class StackError(RuntimeError):
    pass


@dataclass
class StackOptions:
    pods: int = 4
    strategy: str = "least-request"
    sim_args: Sequence[str] = ()
    # Deep-merged into the generated router config (e.g. {"scrape": {"interval_s": 5}}).
    router_overrides: Mapping[str, Any] = field(default_factory=dict)
    router_log_level: str = "info"
    envoy_concurrency: int = 2


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


class ChildProcess:
    """A child process in its own session, output to a log file; `stop()` ends it.

    Own session: Envoy must not die with the shell, a test can SIGKILL/SIGSTOP one process
    without touching the others, and `stop()` can end the whole group (a launcher and what it
    execs) by the pid we started, nothing broader. Shared with the benchmarks.
    """

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: Path,
        *,
        stdout_pipe: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=cwd,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the group (after SIGCONT: a stopped process cannot exit), SIGKILL later."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Stack:
    def __init__(self, workdir: Path, options: StackOptions | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.opts = options or StackOptions()
        self.sim: ChildProcess | None = None
        self.router: ChildProcess | None = None
        self.envoy = EnvoyProcess()
        self.pods: dict[str, str] = {}  # name -> "ip:port"
        self.sim_control = ""
        self.cfg: RouterConfig | None = None
        self.config_path = self.workdir / "router-ext.yaml"
        self.pods_file = self.workdir / "pods.yaml"
        atexit.register(self.stop)

    # --- addresses ---------------------------------------------------------------------
    @property
    def config(self) -> RouterConfig:
        if self.cfg is None:
            raise StackError("stack not started")
        return self.cfg

    @property
    def url(self) -> str:
        lst = self.config.envoy.listener
        return f"http://{lst.host}:{lst.port}"

    @property
    def router_grpc(self) -> str:
        return self.config.router.grpc.address

    @property
    def router_admin(self) -> str:
        """The admin API's own listener (status, explain)."""
        return self.config.router.admin.address

    @property
    def router_metrics_url(self) -> str:
        m = self.config.router.metrics
        return f"http://{m.host}:{m.port}/metrics"

    def pod_name(self, address: str) -> str:
        for n, a in self.pods.items():
            if a == address:
                return n
        return address

    # --- start/stop --------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> Stack:
        deadline = time.monotonic() + timeout
        self._start_sim(deadline)
        self._write_config()
        self.start_router()
        self.wait_router_serving(deadline - time.monotonic())
        self._start_envoy(deadline)
        return self

    def _start_sim(self, deadline: float) -> None:
        cmd = [
            sys.executable, "-m", "router_ext.app.cli", "sim",
            "--pods", str(self.opts.pods),
            "--base-port", "0",
            "--pods-file", str(self.pods_file),
            "--control-port", "0",
            *self.opts.sim_args,
        ]  # fmt: skip
        self.sim = ChildProcess("sim", cmd, self.workdir / "sim.log", stdout_pipe=True)
        line = self._read_line(self.sim, deadline)
        try:
            ready = json.loads(line)
            assert ready.get("event") == "sim_ready"
        except (ValueError, AssertionError) as e:
            raise StackError(f"simulator did not start: {line!r}\n{self.sim.tail()}") from e
        self.pods = dict(ready["pods"])
        self.sim_control = ready["control"]

    @staticmethod
    def _read_line(p: ChildProcess, deadline: float) -> str:
        assert p.proc.stdout is not None
        fd = p.proc.stdout.fileno()
        buf = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                if b"\n" in buf:
                    return buf.split(b"\n", 1)[0].decode()
            elif not p.alive():
                break
        raise StackError(f"{p.name} gave no ready line: {buf!r}\n{p.tail()}")

    def _write_config(self) -> None:
        raw: dict[str, Any] = {
            "router": {
                "grpc": {"port": free_port()},
                "metrics": {"port": free_port()},
                "admin": {"port": free_port()},
                "drain_seconds": 1.5,
            },
            "discovery": {"pods_file": str(self.pods_file), "poll_interval_s": 0.2},
            "routing": {"default_strategy": self.opts.strategy},
            "envoy": {
                "listener": {"port": free_port()},
                "admin": {"port": free_port()},
                "access_log_path": str(self.workdir / "envoy-access.log"),
            },
        }
        _merge(raw, self.opts.router_overrides)
        self.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        self.cfg = load_config(self.config_path)
        pods = parse_pods(self.pods_file.read_text(), str(self.pods_file))
        write_envoy_files(self.cfg, pods, self.workdir / "envoy")

    def start_router(self) -> None:
        cmd = [
            sys.executable, "-m", "router_ext.app.cli", "serve",
            "--config", str(self.config_path),
            "--log-level", self.opts.router_log_level,
        ]  # fmt: skip
        self.router = ChildProcess("router", cmd, self.workdir / "router.log")

    def router_health(self, timeout: float = 0.5) -> int | None:
        """grpc.health.v1 status of the ext_proc service, or None if unreachable."""
        with grpc.insecure_channel(self.router_grpc) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            try:
                resp = stub.Check(
                    health_pb2.HealthCheckRequest(
                        service="envoy.service.ext_proc.v3.ExternalProcessor"
                    ),
                    timeout=timeout,
                )
            except grpc.RpcError:
                return None
            return int(resp.status)

    def wait_router_serving(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.router_health() == health_pb2.HealthCheckResponse.SERVING:
                return
            if self.router is not None and not self.router.alive():
                raise StackError(f"router exited:\n{self.router.tail()}")
            time.sleep(0.05)
        raise StackError(
            f"router not SERVING after {timeout:.0f}s:\n{self.router.tail() if self.router else ''}"
        )

    def _start_envoy(self, deadline: float) -> None:
        self.envoy.start(
            self.workdir / "envoy" / "envoy.yaml",
            self.workdir / "envoy.log",
            concurrency=self.opts.envoy_concurrency,
            log_level="warning",
        )
        self.envoy.wait_ready(max(1.0, deadline - time.monotonic()))
        self.wait_envoy_membership(len(self.pods), max(1.0, deadline - time.monotonic()))

    def wait_envoy_membership(self, n_pods: int, timeout: float = 10.0) -> None:
        """Until Envoy lists `n_pods` pods and sees the router healthy."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                pods = self.envoy.cluster_hosts(CLUSTER_PODS)
                routers = self.envoy.cluster_hosts(CLUSTER_ROUTER)
                last = (pods, routers)
                router_ok = any(
                    "/failed_active_hc" not in h.get("health_flags", "") for h in routers.values()
                )
                if len(pods) == n_pods and router_ok:
                    return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(0.1)
        raise StackError(f"Envoy membership not ready: {last}\n{self.envoy.log_tail()}")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.envoy.stop()
        for p in (self.router, self.sim):
            if p is not None:
                with contextlib.suppress(Exception):
                    p.stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults & observations ---------------------------------------------------------
    def control(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"http://{self.sim_control}{path}",
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read() or b"null")

    def router_metrics(self) -> str:
        with urllib.request.urlopen(self.router_metrics_url, timeout=2) as resp:
            text: str = resp.read().decode()
            return text

    def envoy_stat(self, name: str) -> float:
        return float(self.envoy.stats(name).get(name, 0))
