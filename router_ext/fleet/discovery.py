"""Discovery: where the pod set comes from. A YAML pods file, re-read when it changes, or the
Kubernetes API (router_ext/fleet/kubernetes.py), behind one `DiscoverySource` seam.

Only pods named here are ever routable (the router never routes to an address a request
names). A broken file never empties the pool: the last good pod set stays in force and the
error is logged once per distinct error, so an operator's typo cannot take the fleet down.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator

from router_ext.fleet.snapshot import Pod

if TYPE_CHECKING:
    from router_ext.config import RouterConfig

log = logging.getLogger("router_ext.fleet.discovery")


class DiscoverySource(Protocol):
    """What the server uses of a discovery source. `pods` is the last good set: an error never
    empties it. Listeners get every new set; error listeners one call per distinct error."""

    pods: tuple[Pod, ...]
    loaded: bool  # a usable pod set has been read at least once
    last_error: str  # "" while healthy
    error_listeners: list[Callable[[str], None]]

    def subscribe(self, fn: Callable[[Sequence[Pod]], None]) -> None: ...

    def check(self, force: bool = False) -> bool:
        """Pick up a change now if the source can without I/O waits (the file: one stat);
        `force` re-reads from scratch (SIGHUP). Returns True when the pod set changed."""
        ...

    def status(self) -> dict[str, Any]:
        """Health detail for the admin API: JSON-serialisable, no secrets."""
        ...

    async def run(self, stop: asyncio.Event) -> None: ...


def make_discovery(cfg: RouterConfig) -> DiscoverySource:
    """The source `discovery.source` names. The Kubernetes client is imported only when
    chosen: a pods-file router never loads it."""
    if cfg.discovery.source == "kubernetes":
        from router_ext.fleet.kubernetes import KubernetesDiscovery

        return KubernetesDiscovery(cfg.discovery.kubernetes)
    return PodsFileDiscovery(cfg.pods_file, cfg.discovery.poll_interval_s)


class DiscoveryError(ValueError):
    """A pods file that cannot be used; the message names the file and the problem."""


class _PodEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str
    port: int | None = Field(default=None, ge=1, le=65535)
    name: str = ""
    uid: str = ""
    # Strict: YAML turns `model: 1.5` or `model: yes` into a float or bool, and a model named
    # "1.5" or "True" would silently never match a request.
    model: StrictStr = ""
    # Further base models and LoRA adapters this pod serves (with `model`, Pod.models).
    models: list[StrictStr] = Field(default_factory=list)
    ready: bool = True
    draining: bool = False

    @field_validator("address")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("address is empty")
        return v

    @field_validator("model")
    @classmethod
    def _model_trimmed(cls, v: str) -> str:
        return v.strip()

    @field_validator("models")
    @classmethod
    def _models_named(cls, v: list[str]) -> list[str]:
        out = [m.strip() for m in v]
        if any(not m for m in out):
            raise ValueError("model names must not be empty")
        return out

    def to_pod(self) -> Pod:
        host, port = self.address, self.port
        if port is None:
            host, port = _split_host_port(self.address)
        elif self.address.startswith("["):
            host = self.address.strip("[]")
        return Pod(
            host=host,
            port=port,
            name=self.name,
            uid=self.uid,
            model=self.model,
            models=frozenset(self.models),
            ready=self.ready,
            draining=self.draining,
        )


class _PodsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pods: list[_PodEntry] = Field(default_factory=list)


def _split_host_port(addr: str) -> tuple[str, int]:
    if addr.startswith("["):  # [v6]:port
        host, sep, port = addr[1:].partition("]:")
    else:
        host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address {addr!r} needs a port: use 'ip:port' or give 'port'")
    p = int(port)
    if not 1 <= p <= 65535:
        raise ValueError(f"port {p} out of range in {addr!r}")
    return host, p


def parse_pods(text: str, source: str = "<pods file>") -> tuple[Pod, ...]:
    """Parse pods-file text; raise DiscoveryError saying exactly what is wrong.

    An empty pool must be said explicitly (`pods: []`). An empty or comment-only file, or a
    mapping without `pods`, is what a truncated or non-atomic write looks like
    (`: > pods.yaml` once emptied a running fleet for 6 s): an error, and the caller keeps its
    last good set.
    """
    if not text.strip():
        raise DiscoveryError(
            f"{source}: file is empty (a truncated or non-atomic write?); an intentionally "
            "empty pool is 'pods: []'"
        )
    try:
        raw: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DiscoveryError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(raw, dict) or "pods" not in raw:
        raise DiscoveryError(
            f"{source}: top level must be a mapping with 'pods:' (a partial write?); an "
            "intentionally empty pool is 'pods: []'"
        )
    try:
        parsed = _PodsFile.model_validate(raw)
        pods = tuple(e.to_pod() for e in parsed.pods)
    except (ValidationError, ValueError) as e:
        raise DiscoveryError(f"{source}: {_short(e, raw)}") from e
    seen: set[str] = set()
    for p in pods:
        _check_host(p.host, source)
        if p.address in seen:
            raise DiscoveryError(f"{source}: pod address {p.address} listed twice")
        seen.add(p.address)
    return pods


def _check_host(host: str, source: str) -> None:
    # Envoy's override_host matches on the endpoint address string; a hostname here would be
    # a pod Envoy can never be steered to, so we reject it instead of silently never routing.
    try:
        ipaddress.ip_address(host)
    except ValueError as e:
        raise DiscoveryError(
            f"{source}: pod host {host!r} must be an IP address (Envoy steers by ip:port)"
        ) from e


def _short(e: Exception, raw: dict[str, Any] | None = None) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(f"{_where(err['loc'], raw)}: {err['msg']}" for err in e.errors())
    return str(e)


def _where(loc: tuple[int | str, ...], raw: dict[str, Any] | None) -> str:
    """`pods.3.models` -> `pods.3 (10.0.0.7:8000).models`: an index alone is hard to find in a
    long file, the address is what the operator searches for."""
    where = ".".join(str(x) for x in loc)
    if raw is None or len(loc) < 2 or loc[0] != "pods" or not isinstance(loc[1], int):
        return where
    pods = raw.get("pods")
    entry = pods[loc[1]] if isinstance(pods, list) and loc[1] < len(pods) else None
    address = entry.get("address") if isinstance(entry, dict) else None
    if not isinstance(address, str) or not address:
        return where
    rest = "".join(f".{x}" for x in loc[2:])
    return f"pods.{loc[1]} ({address}){rest}"


@dataclass(frozen=True)
class _FileStamp:
    mtime_ns: int
    size: int
    inode: int


class PodsFileDiscovery:
    """Watches one pods file by polling its stat (cheap, works on every filesystem and in
    ConfigMap volumes, where the file is swapped by a symlink flip that inotify can miss)."""

    def __init__(self, path: Path, poll_interval_s: float = 1.0) -> None:
        self.path = path
        self.poll_interval_s = poll_interval_s
        self.pods: tuple[Pod, ...] = ()
        self.loaded = False  # a good file has been read at least once
        self.last_error: str = ""
        self._stamp: _FileStamp | None = None
        self._listeners: list[Callable[[Sequence[Pod]], None]] = []
        #: Called once per distinct error (as it is logged): the operator's metric.
        self.error_listeners: list[Callable[[str], None]] = []

    def subscribe(self, fn: Callable[[Sequence[Pod]], None]) -> None:
        self._listeners.append(fn)

    def check(self, force: bool = False) -> bool:
        """Re-read the file if it changed (or `force`). Returns True when the pod set changed."""
        if force:
            self._stamp = None
        try:
            st = os.stat(self.path)
        except OSError as e:
            self._fail(f"{self.path}: cannot stat pods file: {e.strerror or e}")
            self._stamp = None
            return False
        stamp = _FileStamp(st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            text = self.path.read_text()
            pods = parse_pods(text, str(self.path))
        except OSError as e:
            self._fail(f"{self.path}: cannot read pods file: {e.strerror or e}")
            return False
        except DiscoveryError as e:
            self._fail(str(e))
            return False
        if self.last_error:
            log.info("pods file usable again: %s (%d pods)", self.path, len(pods))
            self.last_error = ""
        first = not self.loaded
        self.loaded = True
        if pods == self.pods and not first:
            return False
        self._log_diff(self.pods, pods)
        self.pods = pods
        for fn in self._listeners:
            fn(pods)
        return True

    def status(self) -> dict[str, Any]:
        return {
            "source": "file",
            "path": str(self.path),
            "loaded": self.loaded,
            "pods": len(self.pods),
            "ready": sum(1 for p in self.pods if p.ready),
            "draining": sum(1 for p in self.pods if p.draining),
            "last_error": self.last_error,
        }

    def _fail(self, msg: str) -> None:
        if msg != self.last_error:
            kept = (
                f"keeping last good set of {len(self.pods)} pods"
                if self.loaded
                else ("no pods loaded yet")
            )
            log.error("discovery error: %s (%s)", msg, kept)
            self.last_error = msg
            for fn in self.error_listeners:
                fn(msg)

    def _log_diff(self, old: tuple[Pod, ...], new: tuple[Pod, ...]) -> None:
        o = {p.address: p for p in old}
        n = {p.address: p for p in new}
        added = [a for a in n if a not in o]
        removed = [a for a in o if a not in n]
        changed = [a for a in n if a in o and n[a] != o[a]]
        log.info(
            "pods file loaded: %d pods (added %s, removed %s, changed %s)",
            len(new),
            added or "-",
            removed or "-",
            changed or "-",
        )

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.check()
            except Exception:  # a listener bug must not stop discovery
                log.exception("discovery listener failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_interval_s)
