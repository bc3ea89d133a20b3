"""A prefix-aware proxy peer: the Rust `sglang-router` (PyPI; SMG), in the same harness.

    python -m benchmarks.peer_sglang_router      # install, start in front of 4 sim pods, check

Installed by this script into its own venv (`benchmarks/.venv-peer-sglang`, gitignored) so its
dependencies never touch the project venv or vllm-router's. Started as its README says, with
`--policy cache_aware` and every routing parameter at its command-line default (0.3.2:
cache_threshold 0.3, balance_abs 64, balance_rel 1.5, eviction 60 s, max tree 64 Mi chars).

What it asks of a worker, found by running it against `router-ext sim` (0.3.2):
- at start, per worker: `GET /health` (connection mode; must be 200), then `GET /server_info`
  falling back to `/get_server_info`, and `GET /model_info` falling back to `/get_model_info`.
  The simulator answers 404 to all four of the last; sglang-router logs a warning and goes
  on, registering the worker with model id `unknown`. Single-model routing is unaffected:
  one radix tree holds every request. A multi-model fleet would share that one tree across
  models (SGLang's `/get_model_info` answers `{"model_path": ...}`).
- `/health` again every 60 s (its default health-check interval).
- it proxies `/v1/chat/completions` and `/v1/completions` as they are, streams included, and
  passes the pod's own headers (x-served-by) through.
Ready means: its `/workers` lists every worker as healthy (its `/health` answers 200 before
the background registration has finished, so it is not enough).

If it cannot be installed or started, `PeerUnavailable` carries the exact reason; there is no
stand-in.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import BENCH_DIR, RUN_DIR, Child
from benchmarks.peer_vllm_router import (
    PeerUnavailable,
    http_get,
    install_into_venv,
    installed_version,
    wait_peer_ready,
)

SGLANG_VENV = BENCH_DIR / ".venv-peer-sglang"
SGLANG_PACKAGE = "sglang-router"
#: Pinned so a rerun measures the same binary (the newest in the registry when this was written).
SGLANG_VERSION = "0.3.2"
SGLANG_LABEL = "sglang-router cache_aware"


def ensure_sglang() -> Path:
    """The python of `benchmarks/.venv-peer-sglang` with sglang-router installed."""
    py = SGLANG_VENV / "bin" / "python"
    # The console script is the marker: the venv's python exists before pip has run.
    install_into_venv(
        SGLANG_VENV, f"{SGLANG_PACKAGE}=={SGLANG_VERSION}", SGLANG_VENV / "bin" / "smg"
    )
    return py


def sglang_version() -> str:
    return installed_version(SGLANG_VENV, SGLANG_PACKAGE)


def _workers_ready(port: int, n: int) -> bool:
    status, body = http_get(f"http://127.0.0.1:{port}/workers")
    if status != 200:
        return False
    workers = json.loads(body).get("workers", [])
    return len(workers) == n and all(w.get("is_healthy") for w in workers)


def start_sglang(
    workers: Sequence[str],
    port: int,
    prom_port: int,
    log_path: Path,
    policy: str = "cache_aware",
) -> Child:
    """Start sglang-router in front of `workers` ("ip:port"); return once all are registered."""
    py = ensure_sglang()
    cmd = [
        str(py), "-m", "sglang_router.launch_router",
        "--worker-urls", *(f"http://{w}" for w in workers),
        "--policy", policy,
        "--host", "127.0.0.1",
        "--port", str(port),
        # Not routing parameters: the default metrics port (29000) would collide between two
        # instances, and the default 30 s startup check interval only delays readiness.
        "--prometheus-host", "127.0.0.1",
        "--prometheus-port", str(prom_port),
        "--worker-startup-check-interval", "1",
        "--log-level", "warn",
    ]  # fmt: skip
    child = Child(f"sglang-router-{policy}", cmd, log_path)
    return wait_peer_ready(child, "sglang-router", lambda: _workers_ready(port, len(workers)))


def main() -> None:
    """Install it, start it in front of 4 simulated pods, send one shared-prefix group."""
    import urllib.request

    from router_ext.harness.envoy_proc import free_port
    from router_ext.harness.stack import Stack

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.parse_args()
    try:
        ensure_sglang()
    except PeerUnavailable as e:
        print(f"NOT AVAILABLE: {e}")
        sys.exit(1)
    print(f"{SGLANG_PACKAGE} {sglang_version()} in {SGLANG_VENV}")
    workdir = RUN_DIR / "peer_sglang"
    stack = Stack(workdir)
    child: Child | None = None
    try:
        stack.start(timeout=60)  # only its pods are used; the whole stack is the simple way
        port = free_port()
        child = start_sglang(list(stack.pods.values()), port, free_port(), workdir / "sgl.log")
        served = []
        system = "You are a careful assistant. " * 40
        for i in range(8):
            body = {
                "model": "sim-model",
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"question {i}"},
                ],
                "max_tokens": 4,
            }
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={"content-type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                served.append(r.headers.get("x-served-by", "?"))
        print(f"8 requests of one prefix group served by: {sorted(set(served))}")
    finally:
        if child is not None:
            child.stop()
        stack.stop()


if __name__ == "__main__":
    main()
