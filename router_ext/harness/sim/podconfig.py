"""Configuration of one simulated vLLM pod.

Kept apart from the pod itself so the CLI, the control API and the fault schedule can build and
validate configs without importing the server machinery.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Planned-shutdown grace period when none is given (SIGTERM, `term` fault/control action):
#: Kubernetes' default terminationGracePeriodSeconds, after which the kubelet SIGKILLs. uvicorn
#: itself (vLLM's server) waits for in-flight requests without a limit.
DEFAULT_GRACE_S = 30.0

# Names end up in URLs (control API), YAML (pods file) and Prometheus labels: keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class SimPodConfig:
    """Static shape of one pod: capacity, base latencies, served models and metrics behaviour.

    Latencies are *base* values; the load model stretches them with the pod's load and its
    per-step token budget (see `router_ext.harness.sim.engine`, which also says where the
    step-cost defaults come from). `kv_blocks` is the whole pod's KV cache; with
    `num_engines > 1` (data parallel) each engine owns an equal share, its own prefix cache,
    and reports its own usage.

    `model` is the base model; `adapters` are the LoRA adapters the pod serves on top of it
    (a request whose `model` names one runs with it). `max_lora` is vLLM's `--max-loras`,
    the adapters one batch may mix. Its default of 2 is what the Gateway API Inference
    Extension's reference vLLM deployment (Llama-3.1-8B, one GPU) runs with; vLLM's own
    default of 1 would let no two adapters ever share a batch, which no LoRA fleet runs.
    `lora_load_ms` is the stall of the engine step that loads an adapter into a free slot:
    20 ms is a rank-16 adapter of an 8B model (~40 MB in BF16) read from local NVMe at
    ~2 GB/s; a reload from vLLM's CPU adapter cache is nearer 2 ms (PCIe), so the default
    errs toward the cost a LoRA-aware router is there to avoid.
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
    adapters: list[str] = field(default_factory=list)
    max_lora: int = 2
    lora_load_ms: float = 20.0
    # vLLM's --max-num-batched-tokens: what one engine step may compute (decode tokens first,
    # then prefill chunks). 8192 is vLLM's default for its API server on an H100-class GPU.
    max_num_batched_tokens: int = 8192
    # Engine time per prefill token at speed 1 (see engine.py for the calibration).
    prefill_us_per_token: float = 40.0

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
        problems.extend(self._adapter_problems())
        if self.max_lora < 1:
            problems.append("max_lora must be >= 1")
        if not self.lora_load_ms >= 0:
            problems.append("lora_load_ms must be >= 0")
        if self.max_num_batched_tokens < self.max_running:
            # vLLM refuses this too: a step must fit one decode token per running sequence.
            problems.append(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_running ({self.max_running})"
            )
        if not self.prefill_us_per_token >= 0:
            problems.append("prefill_us_per_token must be >= 0")
        if problems:
            raise ValueError(f"pod {self.name!r}: " + "; ".join(problems))

    def _adapter_problems(self) -> list[str]:
        if not isinstance(self.adapters, list):
            return ["adapters must be a list of names"]
        problems = []
        for a in self.adapters:
            # Names are comma-joined into vllm:lora_requests_info labels: no commas, plain.
            if not isinstance(a, str) or not _NAME_RE.match(a):
                problems.append(f"adapter name {a!r} must match {_NAME_RE.pattern}")
        if self.model in self.adapters:
            problems.append(f"adapter {self.model!r} has the base model's name")
        if len(set(self.adapters)) != len(self.adapters):
            problems.append("adapter names must be unique")
        if self.adapters and self.num_engines > 1:
            problems.append("adapters need num_engines == 1 (vLLM has no LoRA in DP mode)")
        return problems

    @property
    def served_models(self) -> list[str]:
        """Every name a request's `model` may carry here: the base model, then its adapters."""
        return [self.model, *self.adapters]

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
            elif kind == "list[str]":
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
                if isinstance(value, list) and not ok:
                    raise ValueError(f"field {key!r} must be a list of strings")
                value = list(value) if ok else value
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
