"""Configuration of one simulated vLLM pod.

Kept apart from the pod itself so the CLI, the control API and the fault schedule can build and
validate configs without importing the server machinery.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Planned-shutdown grace period when none is given (SIGTERM, `term` fault/control action):
#: Kubernetes' default terminationGracePeriodSeconds, after which the kubelet SIGKILLs. uvicorn
#: itself (vLLM's server) waits for in-flight requests without a limit.
DEFAULT_GRACE_S = 30.0

# Names end up in URLs (control API), YAML (pods file) and Prometheus labels: keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class SimPodConfig:
    """Static shape of one pod: capacity, base latencies and metrics behaviour.

    Latencies are *base* values; the load model stretches them with the pod's load (see
    `router_ext.harness.sim.engine`). `kv_blocks` is the whole pod's KV cache; with
    `num_engines > 1`
    (data parallel) each engine owns an equal share and reports its own usage.
    """

    name: str
    port: int = 0  # 0 = ephemeral; the pod keeps the port it got across kill/revive
    model: str = "sim-model"
    max_running: int = 8
    ttft_ms: float = 30.0
    tpot_ms: float = 5.0
    speed: float = 1.0  # 0.5 = twice as slow (older GPU, noisy neighbour)
    metrics_delay_s: float = 0.0  # cold start: /metrics answers 503 until this has passed
    metrics_fail_rate: float = 0.0  # chance that one /metrics answer is a 500
    kv_blocks: int = 2048
    block_size: int = 16
    num_engines: int = 1
    # Per-token end-of-sequence chance for requests that do not set `ignore_eos` (0 = every
    # request runs to max_tokens, which keeps benchmarks' work per request exact).
    eos_prob: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            problems.append(f"name {self.name!r} must match {_NAME_RE.pattern}")
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} out of range 0..65535")
        if not self.model:
            problems.append("model must not be empty")
        if self.max_running < 1:
            problems.append("max_running must be >= 1")
        if self.ttft_ms < 0 or self.tpot_ms < 0:
            problems.append("ttft_ms and tpot_ms must be >= 0")
        if not self.speed > 0:
            problems.append("speed must be > 0")
        if self.metrics_delay_s < 0:
            problems.append("metrics_delay_s must be >= 0")
        if not 0 <= self.metrics_fail_rate <= 1:
            problems.append("metrics_fail_rate must be in 0..1")
        if self.kv_blocks < 1 or self.block_size < 1:
            problems.append("kv_blocks and block_size must be >= 1")
        if self.num_engines < 1:
            problems.append("num_engines must be >= 1")
        if not 0 <= self.eos_prob < 1:
            problems.append("eos_prob must be in 0..1 (exclusive of 1)")
        if problems:
            raise ValueError(f"pod {self.name!r}: " + "; ".join(problems))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SimPodConfig:
        """Build from untrusted JSON (control API): unknown fields and wrong types are errors,
        so a typo like `ttft` never silently falls back to a default."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(unknown)}")
        if "name" not in data:
            raise ValueError("field 'name' is required")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            kind = known[key].type
            if kind == "str":
                ok = isinstance(value, str)
            elif kind == "int":
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:  # float
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                value = float(value) if ok else value
            if not ok:
                raise ValueError(f"field {key!r} must be {kind}, got {type(value).__name__}")
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
