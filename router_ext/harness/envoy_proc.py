"""Start, probe and stop a real Envoy process (demo, end-to-end tests).

Why a helper: Envoy started from a script dies with the shell unless it has its own session,
concurrent Envoys on one machine collide on the hot-restart shared memory unless hot restart is
off, and "started" is not "ready" (clusters and listeners initialise after exec). This module
gets those details right once. Admin calls use plain urllib with proxies disabled: the admin
port is on loopback and an `http_proxy` in the environment must not intercept it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml

from router_ext.envoy_adapter.envoy_bin import envoy_binary

__all__ = ["EnvoyError", "EnvoyProcess", "envoy_binary", "free_port"]

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EnvoyError(RuntimeError):
    """Envoy exited, never became ready, or an admin call failed; includes the log tail."""


#: Below Linux's ephemeral range (32768-60999 here): a port handed out by bind(0) comes from
#: that range, so after a process on it dies (a restart test), an outgoing connection can take
#: it before the process comes back, and the restart fails with "address in use".
_FIXED_RANGE = (20000, 32700)
#: Ports this process already handed out: a random pick must not return one twice.
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, outside the ephemeral range (bind, read, close).

    Racy by nature (another process may take it before ours binds); on loopback, outside the
    range outgoing connections use, that needs another test picking the same port.
    """
    for _ in range(64):
        port = random.randrange(*_FIXED_RANGE)
        if port in _handed_out:  # one stack asks for several ports before binding any
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # crowded: let the OS choose
        s.bind((host, 0))
        got: int = s.getsockname()[1]
        return got


def _admin_from_config(config_path: Path) -> tuple[str, int]:
    doc: Any = yaml.safe_load(config_path.read_text())
    sock = doc["admin"]["address"]["socket_address"]
    return str(sock["address"]), int(sock["port_value"])


class EnvoyProcess:
    """One Envoy process in its own session.

    Usage::

        envoy = EnvoyProcess()
        envoy.start(config_path, log_path)   # admin address read from the config
        envoy.wait_ready(10)
        envoy.stats("http.ingress.ext_proc.")
        envoy.stop()

    Also a context manager (stop on exit).
    """

    def __init__(self, envoy_bin: str | None = None) -> None:
        self.envoy_bin = envoy_bin or envoy_binary()
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin_host = "127.0.0.1"
        self.admin_port = 0
        self.log_path: Path | None = None
        self._log_file: IO[bytes] | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(
        self,
        config_path: Path,
        log_path: Path,
        *,
        concurrency: int = 2,
        log_level: str = "info",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """Exec Envoy with stdout+stderr to `log_path`; returns at once (see `wait_ready`).

        `start_new_session=True` (setsid): Envoy must not die with the caller's terminal or
        process group, and `stop()` signals exactly this process. `--disable-hot-restart`:
        several Envoys on one host (parallel tests, demo) would otherwise fight over the
        same shared-memory base id.
        """
        if self.proc is not None and self.proc.poll() is None:
            raise EnvoyError("Envoy already running")
        config_path = Path(config_path)
        self.admin_host, self.admin_port = _admin_from_config(config_path)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [
            self.envoy_bin,
            "-c",
            str(config_path),
            "--concurrency",
            str(concurrency),
            "--log-level",
            log_level,
            "--disable-hot-restart",
            *extra_args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll admin `/ready` until it answers 200 (LIVE); raise with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.running():
                raise EnvoyError(f"Envoy exited (rc={self._rc()}) before ready:\n{self.log_tail()}")
            try:
                status, body = self._get("/ready", timeout=0.5)
                if status == 200:
                    return
                last = f"/ready -> {status} {body.strip()}"
            except OSError as e:
                last = f"/ready: {e}"
            time.sleep(0.05)
        raise EnvoyError(f"Envoy not ready after {timeout:.1f} s ({last}):\n{self.log_tail()}")

    async def wait_ready_async(self, timeout: float = 10.0) -> None:
        """`wait_ready` in a worker thread, for asyncio callers.

        Calling the blocking `wait_ready` on an event loop that also serves in-process upstreams
        or a gRPC router freezes them: Envoy's first health checks then time out and the
        cluster starts out unhealthy (seen in practice). Use this from async code.
        """
        await asyncio.to_thread(self.wait_ready, timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code (None if never started)."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
        return proc.returncode

    def __enter__(self) -> EnvoyProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _rc(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    # --- admin API ---------------------------------------------------------------------

    @property
    def admin_url(self) -> str:
        host = f"[{self.admin_host}]" if ":" in self.admin_host else self.admin_host
        return f"http://{host}:{self.admin_port}"

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        try:
            with _NO_PROXY.open(self.admin_url + path, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode("utf-8", "replace")

    def admin(self, path: str, timeout: float = 2.0) -> str:
        """GET an admin path; raise EnvoyError unless it answers 200."""
        status, body = self._get(path, timeout)
        if status != 200:
            raise EnvoyError(f"admin {path} -> {status}: {body[:500]}")
        return body

    def stats(self, prefix: str = "") -> dict[str, int | float]:
        """Counters and gauges whose name starts with `prefix` (histograms are skipped)."""
        query = "/stats?format=json"
        if prefix:
            regex = "^" + "".join("\\" + c if c in ".^$*+?()[]{}|\\" else c for c in prefix)
            query += "&filter=" + urllib.parse.quote(regex)
        doc: Any = json.loads(self.admin(query))
        out: dict[str, int | float] = {}
        for entry in doc.get("stats", []):
            if "name" in entry and "value" in entry:
                out[str(entry["name"])] = entry["value"]
        return out

    def cluster_hosts(self, cluster: str) -> dict[str, dict[str, str]]:
        """Hosts of `cluster` from admin `/clusters`: {"ip:port": {"health_flags": ..., ...}}.

        Values are Envoy's text (health_flags "healthy" or "/failed_active_hc/...", rq_total,
        cx_connect_fail, hostname, ...). A host missing here is not in Envoy's cluster.
        """
        hosts: dict[str, dict[str, str]] = {}
        pattern = re.compile(
            "^" + re.escape(cluster) + r"::(\[[^\]]+\]:\d+|[^:\[]+:\d+)::([a-z_]+)::(.*)$"
        )
        for line in self.admin("/clusters").splitlines():
            m = pattern.match(line)
            if m:
                hosts.setdefault(m.group(1), {})[m.group(2)] = m.group(3)
        return hosts

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        with open(self.log_path, "rb") as f:
            try:
                f.seek(-16384, os.SEEK_END)
            except OSError:
                f.seek(0)
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])
