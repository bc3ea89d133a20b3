"""router-ext configuration: the one place ports, header names and defaults are defined.

Everything else (the router process, the rendered Envoy config, the simulator harness, the docs)
reads these values from here, so a port or a header name can never disagree between the
router and Envoy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# --- Header names (wire contract between Envoy, router-ext and the pods) -----------------------
#: Set by router-ext on the upstream request: "ip:port[,ip:port...]", primary first.
#: Read by Envoy's override_host load-balancing policy. Stripped from client requests.
TARGET_POD_HEADER = "x-target-pod"
#: Set by router-ext: the strategy actually used, with degradation ("least-kv-cache>random").
STRATEGY_USED_HEADER = "x-routing-strategy"
#: Sent by a client to ask for a strategy for this one request.
STRATEGY_REQUEST_HEADER = "x-routing-strategy-request"
#: Set by the simulator (and echoed by Envoy) to name the pod that served a response.
SERVED_BY_HEADER = "x-served-by"
#: Envoy's request id; used to tag log lines.
REQUEST_ID_HEADER = "x-request-id"

#: The only request headers router-ext reads. Envoy forwards just these to it (ext_proc
#: forward_rules): less to send, decode and scan per request, and the router never sees
#: credentials such as Authorization.
ROUTER_READS_HEADERS = (STRATEGY_REQUEST_HEADER, REQUEST_ID_HEADER, TARGET_POD_HEADER)

#: The ext_proc service name, also a grpc.health.v1 service name.
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"

STRATEGY_NAMES = ("random", "round-robin", "least-request", "least-kv-cache", "least-queue")

# 0 = pick a free port (tests); the bound port is logged.
_Port = Annotated[int, Field(ge=0, le=65535)]


class ConfigError(ValueError):
    """A config file that cannot be used; the message says which field and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Strict):
    host: str = "127.0.0.1"
    port: _Port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class RouterSection(_Strict):
    grpc: Listen = Field(
        default=Listen(port=50051),
        description=(
            "ext_proc, grpc.health.v1, the access-log sink and the admin API share one gRPC port."
        ),
    )
    metrics: Listen = Field(
        default=Listen(port=9464),
        description="Prometheus /metrics of the router itself. Loopback unless configured.",
    )
    drain_seconds: float = Field(
        default=2.0,
        ge=0,
        le=300,
        description=(
            "On SIGTERM: health goes NOT_SERVING at once, streams keep being answered this "
            "long so Envoy's gRPC health check (interval ~250 ms, 2 failures) takes us out, "
            "then exit."
        ),
    )


class DiscoverySection(_Strict):
    pods_file: Path = Field(
        default=Path("pods.yaml"),
        description=(
            "YAML file listing the pods (format in README). Relative paths resolve against the "
            "config file."
        ),
    )
    poll_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="How often the file's mtime/size is checked. Cheap (one stat()).",
    )


class ScrapeSection(_Strict):
    interval_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description=(
            "500 ms: a dead pod is noticed within one interval, a new pod's first metrics "
            "arrive within ~0.5 s, and one Python core can still fetch+parse >1,000 pods per "
            "interval. (EPP scrapes every 50 ms in Go; production-stack every 30 s, far too "
            "slow for failover.)"
        ),
    )
    timeout_s: float = Field(
        default=0.3,
        gt=0,
        le=60,
        description=(
            "A healthy vLLM answers /metrics in a few ms even when loaded; 300 ms leaves "
            "margin and still finishes inside the interval, so a hung pod never delays the "
            "next round."
        ),
    )
    stale_after_s: float = Field(
        default=2.0,
        gt=0,
        le=600,
        description=(
            "Metrics older than this make a pod stale: not trusted as live load (EPP uses "
            "200 ms at 50 ms scraping = 4 intervals; we use 4 intervals of ours)."
        ),
    )
    unreachable_after_timeouts: int = Field(
        default=2,
        ge=1,
        le=100,
        description=(
            "Consecutive time-outs before a pod counts as unreachable (refused/reset count at"
            " once)."
        ),
    )
    max_concurrency: int = Field(
        default=256,
        ge=1,
        le=10000,
        description=(
            "Fetch concurrency cap so a 10,000-pod fleet does not open 10,000 sockets at once."
        ),
    )
    path: str = "/metrics"


class RoutingSection(_Strict):
    default_strategy: str = "least-request"
    fallbacks: int = Field(
        default=2,
        ge=0,
        le=16,
        description=(
            "Distinct fallbacks after the primary in x-target-pod; Envoy walks them on retry."
        ),
    )
    sample_size: int = Field(
        default=16,
        ge=2,
        le=1024,
        description=(
            "Metric strategies compare at most this many candidates per pick (sampled "
            "uniformly when the pool is larger): the decision cost stays flat as the pool "
            "grows (power-of-d choices)."
        ),
    )
    slow_start_s: float = Field(
        default=10.0,
        ge=0,
        le=600,
        description=(
            "Slow start: a pod that turns Ready gets a share that ramps from ~0 to full over this."
        ),
    )
    saturation_queue: int = Field(
        default=0,
        ge=0,
        description=(
            "Shed load with HTTP 429 when every routable pod is warm and has at least this many "
            "requests waiting (0 = never shed). Cold or stale pods never count as saturated: "
            "their load is unknown, so the router degrades instead of refusing."
        ),
    )
    seed: int | None = Field(default=None, description="Random seed (tests, benchmarks).")

    @field_validator("default_strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        if v not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {v!r}; valid: {', '.join(STRATEGY_NAMES)}")
        return v


class WarmupSection(_Strict):
    """One small request to a pod that just turned Ready, before it gets normal traffic.

    Off by default: it costs GPU time on every scale-out. Turn it on when an engine's first
    requests are much slower than the rest (CUDA graph capture, torch.compile, LoRA loading),
    so that cost lands on a synthetic request instead of a user's.
    """

    enabled: bool = False
    path: str = "/v1/completions"
    body: dict[str, object] = Field(
        default_factory=lambda: {"prompt": "warm-up", "max_tokens": 1},
        description='Sent as JSON; "model" is filled from discovery when absent.',
    )
    timeout_s: float = Field(default=30.0, gt=0, le=600)


class EnvoySection(_Strict):
    """Values rendered into the Envoy bootstrap by `router-ext envoy-config`."""

    listener: Listen = Listen(port=10000)
    admin: Listen = Listen(port=9901)
    router_address: str | None = Field(
        default=None,
        description="How Envoy reaches router-ext (the ext_proc cluster). Defaults to router.grpc.",
    )
    message_timeout_ms: int = Field(
        default=200,
        ge=10,
        le=10000,
        description=(
            "Per ext_proc message; past it Envoy fails open. Our p99 decision is well under 5 ms."
        ),
    )
    route_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Whole-request timeout for inference calls (streams can be long).",
    )
    per_try_timeout_s: float = Field(
        default=0.0,
        ge=0,
        description="Per-try timeout: 0 = none (a long generation must not be cut and retried).",
    )
    num_retries: int = Field(default=2, ge=0, le=10)
    retry_on_reset: bool = Field(
        default=True,
        description=(
            "Also retry when the pod resets the connection before any response byte (it died "
            "while generating). Completions have no side effects, so re-running costs GPU "
            "time but saves the client an error; Envoy never retries once the response has "
            "started, so a stream already sending tokens is never duplicated. Turn off for "
            "non-idempotent upstreams."
        ),
    )
    health_check_path: str = Field(
        default="/health",
        description="Active HTTP health check on each pod.",
    )
    health_check_interval_ms: int = Field(default=1000, ge=50)
    router_health_interval_ms: int = Field(
        default=250,
        ge=50,
        description=(
            "gRPC health check on the router (ext_proc cluster): a hung router is out in ~2 "
            "intervals."
        ),
    )
    access_log_path: str = "/dev/null"
    echo_target_pod: bool = Field(
        default=False,
        description=(
            "Echo the router's full answer (x-target-pod) to the client. Off by default: it "
            "exposes pod addresses. The demo and the end-to-end tests turn it on to check "
            "routing."
        ),
    )


class RouterConfig(_Strict):
    router: RouterSection = RouterSection()
    discovery: DiscoverySection = DiscoverySection()
    scrape: ScrapeSection = ScrapeSection()
    routing: RoutingSection = RoutingSection()
    warmup: WarmupSection = WarmupSection()
    envoy: EnvoySection = EnvoySection()
    base_dir: Path = Field(
        default=Path("."),
        description="Directory the config was loaded from; relative paths resolve against it.",
    )

    @property
    def pods_file(self) -> Path:
        p = self.discovery.pods_file
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def ext_proc_address(self) -> str:
        return self.envoy.router_address or self.router.grpc.address


def load_config(path: str | Path | None) -> RouterConfig:
    """Load a YAML config; every error names the file and the field."""
    if path is None:
        return RouterConfig()
    p = Path(path)
    try:
        raw: Any = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: cannot read config: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
    raw.setdefault("base_dir", str(p.resolve().parent))
    try:
        return RouterConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{p}: {_format_validation(e)}") from e


def _format_validation(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
