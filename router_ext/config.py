"""router-ext configuration: the one place ports, header names and defaults are defined.

Everything else (the router process, the rendered Envoy config, the simulator harness, the docs)
reads these values from here, so a port or a header name can never disagree between the
router and Envoy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

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
#: Set by router-ext on a request its prefix scorer judged: the prompt's block-hash chain the
#: decision used (base64url of big-endian 64-bit hashes). Envoy logs it to every replica, so a
#: replica learns a placement it did not make. Stripped from client requests.
PREFIX_HEADER = "x-router-ext-prefix"

#: Set by Envoy, never by a client: the body's `model`, lifted by Envoy's json_to_metadata filter
#: into dynamic metadata (namespace MODEL_METADATA_NAMESPACE, key "model") and copied into this
#: header by a header-mutation filter that overwrites any client-sent copy, so the router learns
#: the model from the headers alone without reading the body.
MODEL_HEADER = "x-router-ext-model"
MODEL_METADATA_NAMESPACE = "router_ext"
#: MODEL_HEADER values for bodies that name no model: JSON without a string `model`, and a body
#: that is not JSON. A request without a body (GET) carries no MODEL_HEADER at all.
MODEL_NONE = "<none>"
MODEL_NOT_JSON = "<not-json>"
#: Default header naming a client session (routing.session_header): sticky by consistent hashing.
SESSION_HEADER = "x-session-id"

#: The only request headers router-ext reads. Envoy forwards just these to it (ext_proc
#: forward_rules): less to send, decode and scan per request, and the router never sees
#: credentials such as Authorization.
#: The pseudo-headers and length/encoding tell the router whether a body is worth asking for
#: (a completion path, a known size under the cap, no content-encoding) and which requests it
#: answers itself (GET /v1/models). The session header is configurable and is added to these
#: when the bootstrap is rendered.
ROUTER_READS_HEADERS = (
    STRATEGY_REQUEST_HEADER,
    REQUEST_ID_HEADER,
    TARGET_POD_HEADER,
    MODEL_HEADER,
    ":path",
    ":method",
    "content-length",
    "content-encoding",
)

#: The ext_proc service name, also a grpc.health.v1 service name.
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
#: Envoy's gRPC access-log service: the router's feedback sink.
ACCESS_LOG_SERVICE = "envoy.service.accesslog.v3.AccessLogService"

STRATEGY_NAMES = ("random", "round-robin", "least-request", "least-kv-cache", "least-queue")
#: Every built-in profile: the five load strategies plus the request-aware ones (they read
#: the prompt's prefix from the body, or the session header; without either they route by load).
BUILTIN_NAMES = (*STRATEGY_NAMES, "prefix-aware", "session")

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


class AuthSection(_Strict):
    """How the router knows a gRPC stream comes from our Envoy (envoy_adapter/auth.py)."""

    mode: Literal["token", "none"] = Field(
        default="token",
        description=(
            "token: ext_proc and access-log streams must carry the shared token Envoy is "
            "rendered with; others are refused (UNAUTHENTICATED) and counted. none: believe "
            "anyone who reaches the port (only on a socket nothing else can reach)."
        ),
    )
    token_file: Path = Field(
        default=Path("run/router-token"),
        description=(
            "The shared token; generated (0600) on first use by `serve` or `envoy-config`. "
            "Relative paths resolve against the config file. Never commit it."
        ),
    )


class RouterSection(_Strict):
    answer: Literal["router-ext", "epp"] = Field(
        default="router-ext",
        description=(
            "router-ext: the answer in x-target-pod (Envoy's override_host policy, as rendered "
            "by `router-ext envoy-config`). epp: as a Gateway API Inference Extension endpoint "
            "picker, in header x-gateway-destination-endpoint and metadata envoy.lb, for a "
            "gateway that speaks the EPP protocol."
        ),
    )
    grpc: Listen = Field(
        default=Listen(port=50051),
        description=(
            "What Envoy must reach: ext_proc, the access-log sink (both authenticated) and "
            "grpc.health.v1."
        ),
    )
    admin: Listen = Field(
        default=Listen(port=9465),
        description=(
            "Admin gRPC API (status, explain): its own listener, loopback unless configured, "
            "so the port Envoy reaches exposes nothing an operator uses."
        ),
    )
    auth: AuthSection = AuthSection()
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
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Router processes `router-ext serve` starts on this host (one per core): worker i "
            "listens on grpc.port + i, metrics.port + 2i and admin.port + 2i (metrics and "
            "admin defaults are adjacent, so they interleave). `router-ext envoy-config` lists "
            "every worker in the ext_proc cluster and gives each its own access logger."
        ),
    )

    @model_validator(mode="after")
    def _worker_ports(self) -> RouterSection:
        if self.workers == 1:
            return self
        taken: dict[int, str] = {}
        for i in range(self.workers):
            for what, listen, step in (
                ("grpc", self.grpc, 1),
                ("metrics", self.metrics, 2),
                ("admin", self.admin, 2),
            ):
                if listen.port == 0:
                    raise ValueError(f"router.workers > 1 needs a fixed router.{what}.port")
                port = listen.port + step * i
                if port > 65535:
                    raise ValueError(f"worker {i}'s {what} port {port} is past 65535")
                if port in taken:
                    raise ValueError(
                        f"worker {i}'s {what} port {port} is also {taken[port]}'s: move "
                        f"router.{what}.port"
                    )
                taken[port] = f"worker {i}'s {what}"
        return self


class KubernetesSection(_Strict):
    """Pods from the Kubernetes API (discovery.source: kubernetes)."""

    kind: Literal["endpointslices", "pods", "inferencepool"] = Field(
        default="endpointslices",
        description=(
            "endpointslices: the EndpointSlices of `service` (label kubernetes.io/service-name). "
            "pods: Pods matching `selector`, on `target_port`. inferencepool: the "
            "inference.networking.k8s.io/v1 InferencePool `inference_pool` (its selector and "
            "targetPorts)."
        ),
    )
    namespace: str | None = Field(
        default=None,
        description="Namespace to watch. Default: the service account's namespace in-cluster, "
        "else the kubeconfig context's, else `default`.",
    )
    service: str | None = Field(default=None, description="Service name (kind endpointslices).")
    port: int | str | None = Field(
        default=None,
        description="EndpointSlice port (number or name) to route to; default the only port.",
    )
    selector: dict[str, str] = Field(
        default_factory=dict, description="Pod label selector (kind pods)."
    )
    target_port: int | None = Field(
        default=None, ge=1, le=65535, description="Pod port (kind pods)."
    )
    inference_pool: str | None = Field(default=None, description="InferencePool name.")
    kubeconfig: Path | None = Field(
        default=None,
        description="Kubeconfig file. Default: in-cluster (service-account token and CA) when "
        "running in a pod, else $KUBECONFIG or ~/.kube/config.",
    )
    watch_timeout_s: int = Field(
        default=300,
        ge=10,
        le=3600,
        description="Server-side timeout of each watch (timeoutSeconds): the watch is resumed "
        "from the last resourceVersion when it ends.",
    )
    backoff_max_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Cap of the retry back-off after API errors (the last good set is kept).",
    )


class DiscoverySection(_Strict):
    source: Literal["file", "kubernetes"] = Field(
        default="file",
        description="Where pods come from: `pods_file`, or the Kubernetes API (`kubernetes`).",
    )
    kubernetes: KubernetesSection = KubernetesSection()
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
    max_body_bytes: int = Field(
        default=4 << 20,
        ge=1024,
        le=1 << 30,
        description=(
            "Largest /metrics body read, in bytes (4 MiB). A real vLLM/SGLang page is tens to a "
            "few hundred KB (~85 KB for two data-parallel engines; LoRA or many-engine pods "
            "stay well under 1 MB), so 4 MiB is >10x headroom. A bigger page is a per-pod "
            "`too_large` failure, checked on Content-Length and again while streaming, so a "
            "runaway exporter (one measured at 20 MB cost 3.7 s of parsing) is never buffered "
            "or parsed."
        ),
    )
    in_process: bool = Field(
        default=False,
        description=(
            "Fetch and parse on the router's own event loop (the old behaviour; unit tests "
            "and A/B benchmarks). Default false: a separate worker process "
            "(router_ext.fleet.scrape_worker) does it, so parsing a big or slow fleet can never "
            "stall the ext_proc streams or the gRPC health answers Envoy needs."
        ),
    )
    path: str = "/metrics"
    models_interval_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description=(
            "How often each pod's /v1/models (the base model and the LoRA adapters it can "
            "serve) is fetched. Slower than metrics: the list changes when an operator loads an "
            "adapter, not per request."
        ),
    )
    models_path: str = "/v1/models"


#: Profile names travel in the x-routing-strategy header and label metrics: keep them plain.
_PROFILE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")


class PluginSpec(_Strict):
    """One plugin of a profile: its registry name (router_ext/routing/registry.py) and params."""

    name: str = Field(description="Registry name of the plugin.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="The plugin's parameters (unknown ones are refused)."
    )

    kind: ClassVar[str] = ""

    @model_validator(mode="after")
    def _known_plugin(self) -> PluginSpec:
        # Imported here: the registry imports this module, and only a validation needs it.
        from router_ext.routing import registry

        registry.check(self.kind, self.name, self.params)
        return self


class FilterSpec(PluginSpec):
    kind: ClassVar[str] = "filter"


class PickerSpec(PluginSpec):
    kind: ClassVar[str] = "picker"


class ScorerSpec(PluginSpec):
    kind: ClassVar[str] = "scorer"
    weight: float = Field(
        default=1.0,
        gt=0,
        allow_inf_nan=False,
        description="Multiplies this scorer's [0, 1] score in the profile's sum.",
    )


class ProfileSpec(_Strict):
    """A routing profile: filters -> weighted scorers -> picker (README, "Routing profiles")."""

    filters: list[FilterSpec] = Field(default_factory=list, description="Applied in order.")
    scorers: list[ScorerSpec] = Field(
        default_factory=list, description="Summed as weight x score; higher total is better."
    )
    picker: PickerSpec | None = Field(
        default=None, description="Orders the candidates; default max-score."
    )

    @model_validator(mode="after")
    def _scores_or_picks(self) -> ProfileSpec:
        if not self.scorers and self.picker is None:
            raise ValueError("a profile needs at least one scorer or a picker")
        return self


class RoutingSection(_Strict):
    profiles: dict[str, ProfileSpec] = Field(
        default_factory=dict,
        description=(
            "Operator-defined routing profiles by name: filters, weighted scorers, picker. The "
            "built-in profiles (" + ", ".join(BUILTIN_NAMES) + ") always exist and cannot be "
            "redefined."
        ),
    )
    default_strategy: str = Field(
        default="least-request",
        description="Profile for requests that do not ask for one (built-in or configured).",
    )
    client_selectable: tuple[str, ...] = Field(
        default=BUILTIN_NAMES,
        description=(
            "Profiles a client may ask for with x-routing-strategy-request (others get HTTP "
            "400, as unknown ones). Default: the built-ins, which only reorder the pods that "
            "serve the request's model (by load, prefix, session); "
            "a configured profile is selectable only once listed here, so adding one for one "
            "tenant or an experiment exposes nothing. The default profile is always allowed."
        ),
    )
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
            "uniformly when the pool is larger; the pods a request-aware scorer names, such as "
            "the prefix's holders or the session's pod, take up to half of it): the decision "
            "cost stays flat as the pool grows (power-of-d choices)."
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
    session_header: str = Field(
        default=SESSION_HEADER,
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
        description=(
            "Request header naming a client session (lower case). Profiles with the session "
            "scorer keep a session on one pod by consistent hashing: no stored state, the same "
            "answer on every router replica and after a restart."
        ),
    )
    max_body_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        le=64 << 20,
        description=(
            "Largest request body the router asks Envoy for (profiles with a body-reading "
            "plugin, completion paths only). Bigger bodies, and uploads with no length, are "
            "routed header-only and counted. Envoy's buffer limit is rendered from it."
        ),
    )

    @field_validator("profiles")
    @classmethod
    def _profile_names(cls, v: dict[str, ProfileSpec]) -> dict[str, ProfileSpec]:
        for name in v:
            if name in BUILTIN_NAMES:
                raise ValueError(f"{name!r} is a built-in profile; choose another name")
            if not (0 < len(name) <= 63 and set(name) <= _PROFILE_CHARS and name[0].isalnum()):
                raise ValueError(
                    f"profile name {name!r}: use 1-63 of a-z 0-9 . _ -, starting with a letter "
                    "or digit (it is sent in a header and labels metrics)"
                )
        return v

    @field_validator("default_strategy")
    @classmethod
    def _known_strategy(cls, v: str, info: ValidationInfo) -> str:
        known = (*BUILTIN_NAMES, *info.data.get("profiles", {}))
        if v not in known:
            raise ValueError(f"unknown strategy {v!r}; valid: {', '.join(known)}")
        return v

    @field_validator("client_selectable")
    @classmethod
    def _known_selectable(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        known = (*BUILTIN_NAMES, *info.data.get("profiles", {}))
        unknown = [n for n in v if n not in known]
        if unknown:
            raise ValueError(f"unknown profile(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return v


class FeedbackSection(_Strict):
    """How far the router trusts Envoy's access-log feedback on its own."""

    max_unreachable_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description=(
            "A feedback mark that would leave no routable pod, or leave more than this share of "
            "ready pods marked unreachable by feedback at once, is acted on only after the "
            "router's own connect attempt to the pod fails: feedback alone (even authenticated, "
            "even replayed) cannot take the pool down."
        ),
    )
    probe_timeout_s: float = Field(
        default=0.3,
        gt=0,
        le=10,
        description="The corroborating TCP connect: refused or no answer within this = down.",
    )


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

    model_from_body: bool = Field(
        default=True,
        description=(
            "Render json_to_metadata + a header copy so the router learns each request's model "
            "from the body without reading it (model-aware routing, 404 for unknown models). "
            "Off: no model routing; for a single-model fleet that wants the last ~0.1 ms of "
            "latency at concurrency 1 (measured in benchmarks/results/overhead.md)."
        ),
    )
    eds: Literal["file", "grpc"] = Field(
        default="file",
        description=(
            "How Envoy learns the pods: a file EDS written by router-ext (sidecar, compose: a "
            "shared volume) or gRPC EDS served by router-ext on its gRPC port (router and Envoy "
            "in separate pods)."
        ),
    )
    eds_initial_fetch_timeout_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="gRPC EDS: how long a starting Envoy waits for the first endpoints.",
    )

    listener: Listen = Listen(port=10000)
    admin: Listen = Listen(port=9901)
    router_address: str | None = Field(
        default=None,
        description="How Envoy reaches router-ext (the ext_proc cluster). Defaults to router.grpc.",
    )
    router_addresses: list[str] = Field(
        default_factory=list,
        max_length=64,
        description=(
            "Router replicas on other hosts (host:port each): every one is an ext_proc endpoint "
            "and gets its own access logger, so each replica sees every request's outcome. "
            "Overrides router_address and router.workers for Envoy."
        ),
    )

    @field_validator("router_addresses")
    @classmethod
    def _host_ports(cls, v: list[str]) -> list[str]:
        for a in v:
            host, sep, port = a.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{a!r} is not host:port")
        if len(set(v)) != len(v):
            raise ValueError("a replica is listed twice")
        return v

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
    placement_log_flush_ms: int = Field(
        default=100,
        ge=1,
        le=1000,
        description=(
            "With several router replicas: how often Envoy flushes the placement log (one "
            "entry per upstream attempt as it starts) to every replica. Until a peer's "
            "placement arrives a replica counts that pod as idler than it is; 20 ms measured "
            "no better than 100 ms with 4 replicas (benchmarks/results/replicas_flush.md)."
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
    feedback: FeedbackSection = FeedbackSection()
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
    def token_file(self) -> Path:
        p = self.router.auth.token_file
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def ext_proc_address(self) -> str:
        return self.envoy.router_address or self.router.grpc.address

    @property
    def replica_addresses(self) -> list[str]:
        """Every router replica Envoy must reach: router_addresses, else router.workers
        consecutive ports from ext_proc_address."""
        if self.envoy.router_addresses:
            return list(self.envoy.router_addresses)
        base = self.ext_proc_address
        if self.router.workers == 1:
            return [base]
        host, _, port = base.rpartition(":")
        return [f"{host}:{int(port) + i}" for i in range(self.router.workers)]

    def for_worker(self, i: int) -> RouterConfig:
        """The config worker `i` of router.workers runs with: its own ports."""
        r = self.router
        if not 0 <= i < r.workers:
            raise ConfigError(f"worker {i} out of range: router.workers is {r.workers}")
        router = r.model_copy(
            update={
                "grpc": r.grpc.model_copy(update={"port": r.grpc.port + i}),
                "metrics": r.metrics.model_copy(update={"port": r.metrics.port + 2 * i}),
                "admin": r.admin.model_copy(update={"port": r.admin.port + 2 * i}),
            }
        )
        return self.model_copy(update={"router": router})


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
