"""The whole request path as real processes on loopback: simulator, router-ext, Envoy.

Used by `router-ext demo`, the end-to-end tests and the benchmarks, so all three exercise the
same wiring a user runs. Each process is its own session (Envoy must not die with the shell,
and a test can SIGKILL/SIGSTOP one without touching the others). Ports are picked free on
127.0.0.1; the router config written here is the single source the Envoy config is rendered
from.

`StackOptions.routers` > 1 runs that many router replicas active-active (issue 13): separate
`router-ext serve` processes, each with its own config file (its own gRPC, metrics and admin
ports; the same pods file, token file and EDS file), and an Envoy rendered from replica 0's
config, whose `envoy.router_addresses` lists every replica. Every single-router accessor
(`router`, `router_grpc`, `router_metrics_url`, `start_router`, ...) means replica 0.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
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
    # Router replicas (separate processes, one ext_proc endpoint each); 1 = the single router.
    routers: int = 1


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
        if self.opts.routers < 1:
            raise StackError(f"routers must be >= 1, not {self.opts.routers}")
        self.sim: ChildProcess | None = None
        # Replica i's process (the latest started); empty until the routers start.
        self.routers: list[ChildProcess] = []
        self.envoy = EnvoyProcess()
        self.pods: dict[str, str] = {}  # name -> "ip:port"
        self.sim_control = ""
        self.cfg: RouterConfig | None = None  # replica 0's; Envoy's config is rendered from it
        self.cfgs: list[RouterConfig] = []  # replica i's
        self.config_path = self.workdir / "router-ext.yaml"
        self.pods_file = self.workdir / "pods.yaml"
        atexit.register(self.stop)

    @property
    def n_routers(self) -> int:
        return self.opts.routers

    @property
    def router(self) -> ChildProcess | None:
        """Replica 0's process (the single router when there is one)."""
        return self.routers[0] if self.routers else None

    def config_path_of(self, i: int) -> Path:
        """Replica i's config file: router-ext.yaml for replica 0 (as with one router)."""
        self._check_replica(i)
        return self.config_path if i == 0 else self.workdir / f"router-ext-{i}.yaml"

    def router_log_of(self, i: int) -> Path:
        self._check_replica(i)
        return self.workdir / ("router.log" if i == 0 else f"router-{i}.log")

    def _check_replica(self, i: int) -> None:
        if not 0 <= i < self.opts.routers:
            raise StackError(f"router replica {i} out of range: the stack has {self.opts.routers}")

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

    def config_of(self, i: int) -> RouterConfig:
        """Replica i's router config."""
        self._check_replica(i)
        if len(self.cfgs) <= i:
            raise StackError("stack not started")
        return self.cfgs[i]

    @property
    def router_grpc(self) -> str:
        return self.router_grpc_of(0)

    def router_grpc_of(self, i: int) -> str:
        return self.config_of(i).router.grpc.address

    @property
    def router_grpcs(self) -> list[str]:
        """Every replica's gRPC address (Envoy's ext_proc endpoints), replica 0 first."""
        return [self.router_grpc_of(i) for i in range(self.n_routers)]

    @property
    def router_admin(self) -> str:
        """The admin API's own listener (status, explain)."""
        return self.router_admin_of(0)

    def router_admin_of(self, i: int) -> str:
        return self.config_of(i).router.admin.address

    @property
    def router_metrics_url(self) -> str:
        return self.router_metrics_url_of(0)

    def router_metrics_url_of(self, i: int) -> str:
        m = self.config_of(i).router.metrics
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
        for i in range(self.n_routers):
            self.start_router(i)
        for i in range(self.n_routers):
            self.wait_router_serving(max(1.0, deadline - time.monotonic()), replica=i)
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
        """One config file per replica: the same document but for the router's own ports.

        Every file lives in the workdir, so the relative defaults (the token file
        `run/router-token`, the EDS file under `run/envoy/`) resolve to the same paths for
        every replica: one token Envoy carries to all of them, one EDS file they all rewrite
        with the same pods. With several replicas each config lists all of them in
        `envoy.router_addresses` (what Envoy's config is rendered from), and a configured
        `routing.seed` is offset by the replica's index."""
        n = self.n_routers
        ports = [
            {
                "grpc": {"port": free_port()},
                "metrics": {"port": free_port()},
                "admin": {"port": free_port()},
            }
            for _ in range(n)
        ]
        raw: dict[str, Any] = {
            "router": {**ports[0], "drain_seconds": 1.5},
            "discovery": {"pods_file": str(self.pods_file), "poll_interval_s": 0.2},
            "routing": {"default_strategy": self.opts.strategy},
            "envoy": {
                "listener": {"port": free_port()},
                "admin": {"port": free_port()},
                "access_log_path": str(self.workdir / "envoy-access.log"),
            },
        }
        _merge(raw, self.opts.router_overrides)
        # Replica 0 keeps whatever the overrides set; the others get their own free ports.
        for what in ports[0]:
            ports[0][what]["port"] = raw["router"][what]["port"]
        if n > 1:
            host = raw["router"]["grpc"].get("host", "127.0.0.1")
            raw["envoy"]["router_addresses"] = [f"{host}:{p['grpc']['port']}" for p in ports]
        self.cfgs = []
        for i in range(n):
            doc = copy.deepcopy(raw)
            for what, listen in ports[i].items():
                doc["router"][what]["port"] = listen["port"]
            seed = doc["routing"].get("seed")
            if i and isinstance(seed, int):
                # Replicas never share one random stream (they would break ties alike).
                doc["routing"]["seed"] = seed + i
            path = self.config_path_of(i)
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            self.cfgs.append(load_config(path))
        self.cfg = self.cfgs[0]
        pods = parse_pods(self.pods_file.read_text(), str(self.pods_file))
        write_envoy_files(self.cfg, pods, self.workdir / "envoy")

    def start_router(self, i: int = 0) -> None:
        """Start replica i's process (its previous one, if any, must be gone)."""
        self._check_replica(i)
        old = self.routers[i] if i < len(self.routers) else None
        if old is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                old.proc.wait(2)  # signalled a moment ago: give the kernel time to end it
            if old.alive():
                raise StackError(f"router replica {i} is still running (pid {old.pid})")
            old.stop()  # reaped already: closes its log file
        cmd = [
            sys.executable, "-m", "router_ext.app.cli", "serve",
            "--config", str(self.config_path_of(i)),
            "--log-level", self.opts.router_log_level,
        ]  # fmt: skip
        name = "router" if self.n_routers == 1 else f"router-{i}"
        child = ChildProcess(name, cmd, self.router_log_of(i))
        if i < len(self.routers):
            self.routers[i] = child
        elif i == len(self.routers):
            self.routers.append(child)
        else:
            raise StackError(f"start router replicas in order: {len(self.routers)} before {i}")

    def kill_router(self, i: int = 0, timeout: float = 5.0) -> None:
        """SIGKILL replica i and reap it: afterwards it is gone, not just signalled."""
        self._check_replica(i)
        if i >= len(self.routers):
            raise StackError(f"router replica {i} was never started")
        p = self.routers[i]
        p.signal(signal.SIGKILL)
        p.proc.wait(timeout)

    def restart_router(self, i: int = 0, timeout: float = 15.0) -> None:
        """Replica i again, as a new process (SIGTERM, drained, if it still runs), until it
        is SERVING."""
        self._check_replica(i)
        if i < len(self.routers) and self.routers[i].alive():
            self.routers[i].stop()
        self.start_router(i)
        self.wait_router_serving(timeout, replica=i)

    def router_health(self, timeout: float = 0.5, replica: int = 0) -> int | None:
        """grpc.health.v1 status of replica's ext_proc service, or None if unreachable."""
        with grpc.insecure_channel(self.router_grpc_of(replica)) as ch:
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

    def wait_router_serving(self, timeout: float = 15.0, replica: int = 0) -> None:
        """Until replica (0: the single router) answers SERVING."""
        proc = self.routers[replica] if replica < len(self.routers) else None
        what = "router" if self.n_routers == 1 else f"router replica {replica}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.router_health(replica=replica) == health_pb2.HealthCheckResponse.SERVING:
                return
            if proc is not None and not proc.alive():
                raise StackError(f"{what} exited:\n{proc.tail()}")
            time.sleep(0.05)
        raise StackError(f"{what} not SERVING after {timeout:.0f}s:\n{proc.tail() if proc else ''}")

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
        """Until Envoy lists `n_pods` pods and sees the router healthy (with several
        replicas: every one of them listed and healthy)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                pods = self.envoy.cluster_hosts(CLUSTER_PODS)
                routers = self.envoy.cluster_hosts(CLUSTER_ROUTER)
                last = (pods, routers)
                healthy = {
                    a
                    for a, h in routers.items()
                    if "/failed_active_hc" not in h.get("health_flags", "")
                }
                if self.n_routers == 1:
                    router_ok = bool(healthy)
                else:
                    router_ok = healthy >= set(self.router_grpcs)
                if len(pods) == n_pods and router_ok:
                    return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(0.1)
        raise StackError(f"Envoy membership not ready: {last}\n{self.envoy.log_tail()}")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.envoy.stop()
        for p in (*self.routers, self.sim):
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
        return self.router_metrics_of(0)

    def router_metrics_of(self, i: int) -> str:
        """Replica i's /metrics text (OSError when it is down)."""
        with urllib.request.urlopen(self.router_metrics_url_of(i), timeout=2) as resp:
            text: str = resp.read().decode()
            return text

    def envoy_stat(self, name: str) -> float:
        return float(self.envoy.stats(name).get(name, 0))
