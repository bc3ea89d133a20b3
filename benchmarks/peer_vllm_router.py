"""A proxy peer: the Rust `vllm-router` (PyPI), measured in the same harness as router-ext.

    python -m benchmarks.peer_vllm_router [--quick]

Installed by this script into its own venv (`benchmarks/.venv-peer`, gitignored) so its
dependencies never touch the project venv. It is a proxy in the data path (no Envoy), so:

- overhead: its `round_robin` in front of the same direct_response upstream as Envoy alone
  (configuration (a) of benchmarks/overhead.py), interleaved with (a), (b) and (c);
- routing quality: its load-aware policies (`power_of_two`, and its default `cache_aware`,
  which balances by in-flight load when pods are imbalanced) in front of the same simulated
  pods, interleaved with router-ext's strategies in benchmarks/quality.py.

If it cannot be installed or started, `PeerUnavailable` carries the exact reason and the result
files say so; there is no stand-in.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import BENCH_DIR, Child, write_result

PEER_VENV = BENCH_DIR / ".venv-peer"
PEER_PACKAGE = "vllm-router"
#: Pinned so a rerun measures the same binary (the newest on PyPI when this was written).
PEER_VERSION = "0.1.17"

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PeerUnavailable(RuntimeError):
    """vllm-router could not be installed or started here; the message is the exact reason."""


def ensure_peer() -> Path:
    """The `vllm-router` launcher in `benchmarks/.venv-peer`, installing it if missing."""
    exe = PEER_VENV / "bin" / "vllm-router"
    if exe.exists():
        return exe
    steps = [
        [sys.executable, "-m", "venv", str(PEER_VENV)],
        [str(PEER_VENV / "bin" / "pip"), "install", "-q", f"{PEER_PACKAGE}=={PEER_VERSION}"],
    ]
    for cmd in steps:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PeerUnavailable(f"`{' '.join(cmd)}` failed: {e}") from e
        if proc.returncode != 0:
            err = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise PeerUnavailable(f"`{' '.join(cmd)}` exited {proc.returncode}: {err}")
    if not exe.exists():
        raise PeerUnavailable(f"{PEER_PACKAGE}=={PEER_VERSION} installed but {exe} is missing")
    return exe


def peer_version() -> str:
    try:
        out = subprocess.run(
            [str(PEER_VENV / "bin" / "pip"), "show", PEER_PACKAGE],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return "?"


def start_peer(
    workers: Sequence[str], policy: str, port: int, prom_port: int, log_path: Path
) -> Child:
    """Start vllm-router in front of `workers` ("ip:port") and wait until it proxies."""
    exe = ensure_peer()
    cmd = [
        str(exe),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--policy", policy,
        "--worker-urls", *(f"http://{w}" for w in workers),
        "--prometheus-host", "127.0.0.1",
        "--prometheus-port", str(prom_port),
        "--worker-startup-check-interval", "1",
        "--worker-startup-timeout-secs", "30",
        "--log-level", "warning",
    ]  # fmt: skip
    child = Child(f"vllm-router-{policy}", cmd, log_path)
    deadline = time.monotonic() + 60
    last = ""
    while time.monotonic() < deadline:
        if not child.alive():
            tail = child.tail()
            child.stop()
            raise PeerUnavailable(f"vllm-router exited at start:\n{tail}")
        try:
            with _NO_PROXY.open(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return child
        except OSError as e:
            last = str(e)
        time.sleep(0.25)
    child.stop()
    raise PeerUnavailable(f"vllm-router not answering /health within 60 s ({last})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from benchmarks import overhead, quality

    try:
        ensure_peer()
        status = f"{PEER_PACKAGE} {peer_version()} installed in {PEER_VENV.relative_to(BENCH_DIR)}"
    except PeerUnavailable as e:
        status = f"NOT AVAILABLE: {e}"
    print(status)
    ov = overhead.run(quick=args.quick, configs=("a", "d"))
    q = quality.run(quick=args.quick, strategies=(), peer_policies=quality.PEER_POLICIES)
    write_result("peer_vllm_router", peer_markdown(status, ov, q))


def peer_markdown(status: str, overhead_md: str, quality_md: str) -> str:
    return (
        "# Peer: vllm-router (Rust proxy)\n\n"
        f"Status: {status}\n\n"
        "## Overhead\n\n" + overhead_md + "\n## Routing quality\n\n" + quality_md
    )


if __name__ == "__main__":
    main()
