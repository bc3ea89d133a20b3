"""A fleet of simulated pods in one event loop, plus the pods file the router discovers.

The fleet is the single entry point for faults (Python API, control API and the fault
schedule all call it), so every state change is logged once and rewrites the pods file once.
Killed and hung pods stay in the pods file on purpose: real discovery lags behind a crash
(BACKGROUND §1A), and the router must cope on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import yaml

from router_ext.harness.sim.pod import FleetFlags, SimPod, SimStateError
from router_ext.harness.sim.podconfig import SimPodConfig

log = logging.getLogger("router_ext.harness.sim")

__all__ = ["SimFleet", "SimStateError", "UnknownPodError"]


class UnknownPodError(KeyError):
    """No pod with that name (the control API answers 404)."""

    def __str__(self) -> str:
        return f"unknown pod {self.args[0]!r}"


def _engine_clock(p: SimPod) -> dict[str, float]:
    """Engine time scheduled, how late its step timers fired, and time lost to host stalls
    (seconds, summed since the pod started): how much the host disturbed the simulated GPU."""
    load = p.load
    if load is None:
        return {"step_s": 0.0, "step_lag_s": 0.0, "step_lost_s": 0.0}
    return {"step_s": load.step_s, "step_lag_s": load.step_lag_s, "step_lost_s": load.step_lost_s}


class SimFleet:
    """Simulated vLLM pods, each on its own loopback port, sharing one event loop."""

    def __init__(
        self, host: str = "127.0.0.1", pods_file: Path | None = None, seed: int | None = None
    ) -> None:
        self.host = host
        self.pods_file = Path(pods_file) if pods_file is not None else None
        self.seed = seed
        self.pods: dict[str, SimPod] = {}
        self._flags = FleetFlags()

    # --- membership ---------------------------------------------------------------------------

    async def start(self, configs: list[SimPodConfig]) -> None:
        """Start all pods (in order, so `--base-port` ports are predictable), then write the
        pods file once."""
        names = [c.name for c in configs]
        dupes = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(self.pods)))
        if dupes:
            raise ValueError(f"duplicate pod name(s): {', '.join(dupes)}")
        try:
            for cfg in configs:
                await self._start_pod(cfg)
        except BaseException:
            await self.stop()
            raise
        self._write_pods_file()

    async def add_pod(self, cfg: SimPodConfig) -> SimPod:
        """A pod joins mid-run (scale-out): listening at once, metrics after its delay."""
        if cfg.name in self.pods:
            raise ValueError(f"pod {cfg.name!r} already exists")
        pod = await self._start_pod(cfg)
        log.info("pod %s added at %s", pod.name, pod.address)
        self._write_pods_file()
        return pod

    async def remove_pod(self, name: str, grace_s: float = 0.0) -> None:
        """Scale-in: leaves the pods file first, then stops (in-flight may finish in grace_s)."""
        pod = self.pod(name)
        del self.pods[name]
        self._write_pods_file()
        await pod.stop(grace_s)
        log.info("pod %s removed", name)

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop every pod. The pods file is left as it was (like a crashed fleet)."""
        pods = list(self.pods.values())
        await asyncio.gather(*(p.stop(grace_s) for p in pods))

    async def _start_pod(self, cfg: SimPodConfig) -> SimPod:
        rng = random.Random(f"{self.seed}:{cfg.name}") if self.seed is not None else random.Random()
        pod = SimPod(cfg, self.host, self._flags, rng)
        await pod.start()
        self.pods[cfg.name] = pod
        return pod

    def pod(self, name: str) -> SimPod:
        try:
            return self.pods[name]
        except KeyError:
            raise UnknownPodError(name) from None

    # --- faults -------------------------------------------------------------------------------

    async def kill(self, name: str) -> None:
        """Like kill -9: connects refused, in-flight requests reset."""
        self.pod(name).kill()
        self._changed(f"pod {name} killed")

    async def terminate(self, name: str, grace_s: float) -> None:
        """Planned shutdown (SIGTERM as vLLM handles it): connects refused from now on,
        in-flight requests finish within `grace_s`, then the pod is gone. Returns once it
        stopped accepting; the drain goes on in the background (GET /pods shows the state).
        The pod stays in the pods file, as after a kill: discovery lags behind shutdowns too."""
        pod = self.pod(name)
        in_flight = pod.inflight
        task = pod.terminate(grace_s)
        self._changed(
            f"pod {name} terminating: not accepting, {in_flight} in flight, grace {grace_s:g}s"
        )

        def done(t: asyncio.Task[int]) -> None:
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                log.error("pod %s shutdown failed: %s", name, exc)
                return
            log.info(
                "pod %s terminated: %d in-flight requests finished, %d cut at the grace limit",
                name,
                pod.drained,
                t.result(),
            )

        task.add_done_callback(done)

    async def revive(self, name: str) -> None:
        """Listen again on the same port with fresh state (metrics after metrics_delay_s)."""
        pod = self.pod(name)
        await pod.revive()
        self._changed(f"pod {name} revived on {pod.address}")

    async def hang(self, name: str) -> None:
        """Accept TCP connections but never answer anything."""
        await self.pod(name).hang()
        self._changed(f"pod {name} hung")

    async def unhang(self, name: str) -> None:
        await self.pod(name).unhang()
        self._changed(f"pod {name} unhung")

    def slow(self, name: str, factor: float) -> None:
        """Divide the pod's speed by `factor` (1 = back to normal)."""
        self.pod(name).set_slow(factor)
        self._changed(f"pod {name} slow factor {factor:g}")

    def flush_cache(self, name: str) -> int:
        """Empty the pod's prefix cache (a benchmark's next cell starts cold)."""
        n = self.pod(name).flush_prefix_cache()
        self._changed(f"pod {name} prefix cache flushed ({n} blocks)")
        return n

    def fail5xx(self, name: str, rate: float) -> None:
        """Inference answers HTTP 500 with probability `rate` (0 = off)."""
        self.pod(name).set_fail_rate(rate)
        self._changed(f"pod {name} fail5xx rate {rate:g}")

    def set_metrics_outage(self, on: bool) -> None:
        """Every pod's /metrics answers 500 while inference keeps working."""
        self._flags.metrics_outage = on
        self._changed(f"fleet metrics outage {'on' if on else 'off'}")

    @property
    def metrics_outage(self) -> bool:
        return self._flags.metrics_outage

    def set_draining(self, name: str, on: bool) -> None:
        """Pods-file flag only: the pod keeps serving whatever is sent to it."""
        self.pod(name).draining = on
        self._changed(f"pod {name} draining={on}")

    def set_ready(self, name: str, on: bool) -> None:
        """Pods-file flag; /health follows it (503 when not ready), inference keeps working."""
        self.pod(name).ready = on
        self._changed(f"pod {name} ready={on}")

    def status(self) -> dict[str, Any]:
        """Everything the control API's GET /pods shows."""
        return {
            "metrics_outage": self.metrics_outage,
            "pods": {
                name: {
                    "address": p.address,
                    "port": p.port,
                    "model": p.cfg.model,
                    "adapters": list(p.cfg.adapters),
                    "loaded_adapters": p.loaded_adapters,
                    "state": p.state,
                    "ready": p.ready,
                    "draining": p.draining,
                    "slow_factor": p.slow_factor,
                    "fail5xx_rate": p.fail_rate,
                    "served": p.served,
                    "errors": p.errors,
                    "running": p.running,
                    "waiting": p.waiting,
                    "in_flight": p.inflight,
                    **_engine_clock(p),
                }
                for name, p in self.pods.items()
            },
        }

    def _changed(self, what: str) -> None:
        log.info("%s", what)
        self._write_pods_file()

    def _write_pods_file(self) -> None:
        """Atomic replace, so the router's poller never reads a half-written file."""
        if self.pods_file is None:
            return
        entries = []
        for p in self.pods.values():
            entry: dict[str, Any] = {
                "name": p.name,
                "address": p.host,
                "port": p.port,
                "model": p.cfg.model,
                # Every name a request's `model` may carry: discovery reads both fields.
                "models": p.cfg.served_models,
            }
            if not p.ready:
                entry["ready"] = False
            if p.draining:
                entry["draining"] = True
            entries.append(entry)
        text = yaml.safe_dump({"pods": entries}, sort_keys=False)
        target = self.pods_file
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the file from other users
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
