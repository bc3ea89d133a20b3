"""A proxy peer: the Rust `vllm-router` (PyPI), measured in the same harness as router-ext.

    python -m benchmarks.peer_vllm_router [--quick]

Installed by this script into its own venv (`benchmarks/.venv-peer`, gitignored) so its
dependencies never touch the project venv. It is a proxy in the data path (no Envoy), so:

- overhead: its `round_robin` in front of the same direct_response upstream as Envoy alone
  (configuration (a) of benchmarks/overhead.py), interleaved with (a), (b) and (c);
- routing quality: its load-aware policies (`power_of_two`, and its default `cache_aware`,
  which balances by in-flight load when pods are imbalanced) in front of the same simulated
  pods, interleaved with router-ext's strategies in benchmarks/quality.py;
- shared-prefix routing: its `cache_aware` with every parameter at its command-line default
  (cache_threshold 0.3, balance_abs 64, balance_rel 1.5, eviction 120 s) in
  benchmarks/shared_prefix.py, beside sglang-router (benchmarks/peer_sglang_router.py).

If it cannot be installed or started, `PeerUnavailable` carries the exact reason and the result
files say so; there is no stand-in.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.common import BENCH_DIR, Child, write_result

PEER_VENV = BENCH_DIR / ".venv-peer"
PEER_PACKAGE = "vllm-router"
#: Pinned so a rerun measures the same binary (the newest on PyPI when this was written).
PEER_VERSION = "0.1.17"

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PeerUnavailable(RuntimeError):
    """A peer router could not be installed or started here; the message is the exact reason."""


def install_into_venv(venv: Path, requirement: str, exe: Path) -> Path:
    """`exe` from `venv`, creating the venv and pip-installing `requirement` if it is missing.

    Shared by both Rust peers: each gets its own venv so neither's dependencies touch the
    project venv or each other's (they pin different fastapi/pydantic ranges).
    """
    if exe.exists():
        return exe
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "-q", requirement],
    ]
    for cmd in steps:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PeerUnavailable(f"`{' '.join(cmd)}` failed: {e}") from e
        if proc.returncode != 0:
            # pip's index warnings come first; the reason is in the last lines.
            err = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise PeerUnavailable(f"`{' '.join(cmd)}` exited {proc.returncode}: {err}")
    if not exe.exists():
        raise PeerUnavailable(f"{requirement} installed but {exe} is missing")
    return exe


def installed_version(venv: Path, package: str) -> str:
    try:
        out = subprocess.run(
            [str(venv / "bin" / "pip"), "show", package],
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


def ensure_peer() -> Path:
    """The `vllm-router` launcher in `benchmarks/.venv-peer`, installing it if missing."""
    return install_into_venv(
        PEER_VENV, f"{PEER_PACKAGE}=={PEER_VERSION}", PEER_VENV / "bin" / "vllm-router"
    )


def peer_version() -> str:
    return installed_version(PEER_VENV, PEER_PACKAGE)


#: Flags that only make start-up fast and quiet on loopback and keep two instances from
#: colliding on the default metrics port. None of them tunes routing: every policy parameter
#: (cache_aware: cache_threshold 0.3, balance_abs 64, balance_rel 1.5, eviction 120 s, tree
#: size) stays at its command-line default, which is what the benchmarks compare against.
_STARTUP_FLAGS = ("--worker-startup-check-interval", "1", "--worker-startup-timeout-secs", "30")


def wait_peer_ready(
    child: Child, name: str, ready: Callable[[], bool], timeout: float = 60.0
) -> Child:
    """Poll `ready()` until true; PeerUnavailable with the log tail if the peer exits first."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not child.alive():
            tail = child.tail()
            child.stop()
            raise PeerUnavailable(f"{name} exited at start:\n{tail}")
        try:
            if ready():
                return child
        except (OSError, ValueError) as e:
            last = str(e)
        time.sleep(0.25)
    tail = child.tail(10)
    child.stop()
    raise PeerUnavailable(f"{name} not ready within {timeout:.0f} s ({last})\n{tail}")


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with _NO_PROXY.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_peer(
    workers: Sequence[str],
    policy: str,
    port: int,
    prom_port: int,
    log_path: Path,
    extra_args: Sequence[str] = (),
) -> Child:
    """Start vllm-router in front of `workers` ("ip:port") and wait until it proxies.

    `policy` runs with its command-line defaults unless `extra_args` says otherwise (the
    benchmarks pass none). vllm-router checks every worker's /health before it opens its
    port, so its own /health answering 200 means the workers are registered.
    """
    exe = ensure_peer()
    cmd = [
        str(exe),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--policy", policy,
        "--worker-urls", *(f"http://{w}" for w in workers),
        "--prometheus-host", "127.0.0.1",
        "--prometheus-port", str(prom_port),
        *_STARTUP_FLAGS,
        "--log-level", "warning",
        *extra_args,
    ]  # fmt: skip
    child = Child(f"vllm-router-{policy}", cmd, log_path)
    return wait_peer_ready(
        child, "vllm-router", lambda: http_get(f"http://127.0.0.1:{port}/health")[0] == 200
    )


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
