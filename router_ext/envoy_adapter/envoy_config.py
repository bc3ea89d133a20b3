"""Render the Envoy bootstrap and the pods EDS file from the one router config.

Why generated and not hand-written: ports, header names and the pod list must agree between
router-ext and Envoy. Both read `RouterConfig`, so they cannot drift. Every non-trivial setting is
built together with a one-line reason (`_why(value, reason)`); the same annotated tree produces
the plain bootstrap dict, the commented YAML and the README settings table, so the explanation
cannot drift from the value either.

Pod membership is *not* baked into the bootstrap: the "pods" cluster is EDS, either from a file
that router-ext rewrites (atomically) whenever discovery changes and Envoy reloads while running
(envoy.eds file: sidecar, compose), or served by router-ext itself over gRPC (envoy.eds grpc,
router_ext/envoy_adapter/xds.py: router and Envoy in separate pods). Both send the same
ClusterLoadAssignment with the same content-hash version (`pods_load_assignment`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from router_ext.config import (
    EXT_PROC_SERVICE,
    MODEL_HEADER,
    MODEL_METADATA_NAMESPACE,
    MODEL_NONE,
    MODEL_NOT_JSON,
    PREFIX_HEADER,
    REQUEST_ID_HEADER,
    ROUTER_READS_HEADERS,
    STRATEGY_USED_HEADER,
    TARGET_POD_HEADER,
    RouterConfig,
    load_config,
)
from router_ext.envoy_adapter.auth import TOKEN_METADATA_KEY, load_or_create_token
from router_ext.envoy_adapter.modes import (
    BODY_MODE_OVERRIDE,
    DEFAULT_PROCESSING_MODE,
    processing_mode_dict,
)
from router_ext.fleet.snapshot import Pod

__all__ = [
    "CLA_TYPE",
    "CLUSTER_PODS",
    "CLUSTER_ROUTER",
    "CLUSTER_XDS",
    "EDS_RELATIVE_PATH",
    "ENVOY_DIR",
    "EXAMPLE_BASE_DIR",
    "EXAMPLE_PODS",
    "MODEL_METADATA_KEY",
    "ROUTED_TO_HEADER",
    "EnvoyValidationError",
    "body_buffer_limit",
    "eds_path",
    "eds_version",
    "envoy_dir",
    "example_bootstrap_yaml",
    "ext_proc_forwarded_headers",
    "pods_load_assignment",
    "render_bootstrap",
    "render_bootstrap_yaml",
    "render_eds",
    "settings_table_markdown",
    "validate",
    "write_eds_file",
    "write_envoy_files",
]

CLUSTER_PODS = "pods"
CLUSTER_ROUTER = "router_ext"
#: Envoy's gRPC client to router-ext's EDS server (envoy.eds: grpc). Same address as
#: CLUSTER_ROUTER but its own cluster: that one is health-checked with a panic threshold of 0, so
#: a router still NOT_SERVING (before its first scrape, while draining) would have no healthy
#: host and Envoy could not even fetch the membership it needs to fail open.
CLUSTER_XDS = "router_ext_xds"

#: Response header naming the pod that actually served the request (Envoy's %UPSTREAM_HOST%,
#: i.e. the x-target-pod entry that won after retries). Not in config.py yet.
ROUTED_TO_HEADER = "x-routed-to"

#: Key under MODEL_METADATA_NAMESPACE where json_to_metadata puts the body's `model`.
MODEL_METADATA_KEY = "model"

#: Floor of the request body buffer: retries re-send the buffered body, and long-context
#: prompts exceed Envoy's 1 MiB default (a 3 MiB prompt lost its retry with it, measured).
_RETRY_BUFFER_FLOOR = 16 * 1024 * 1024

#: Downstream connection read/write buffer (Envoy's default, 1 MiB).
_CONNECTION_BUFFER = 1024 * 1024

#: Where rendered Envoy files live, relative to `cfg.base_dir` (the router config's directory).
#: `write_envoy_files(cfg, pods, envoy_dir(cfg))` puts envoy.yaml here, and the EDS file sits in
#: its `eds/` subdirectory. Derived from cfg alone, so the router (which rewrites the EDS file)
#: and the bootstrap (which names it) always agree without another config field.
ENVOY_DIR = Path("run/envoy")
EDS_RELATIVE_PATH = ENVOY_DIR / "eds" / "pods.yaml"

#: base_dir used for the committed example (envoy/envoy.yaml) and the README table, so both are
#: the same on every machine: the config directory inside the container images.
EXAMPLE_BASE_DIR = Path("/etc/router-ext")

_TYPE = "type.googleapis.com/"
CLA_TYPE = _TYPE + "envoy.config.endpoint.v3.ClusterLoadAssignment"
_CLA_TYPE = CLA_TYPE

# Envoy's own local replies we rewrite as OpenAI-style JSON, selected by response flag.
# ext_proc immediate responses carry none of these flags, so router-ext's own JSON bodies pass
# untouched (a top-level body_format would apply to every local reply and re-wrap them).
_LOCAL_REPLY_FLAGS = (
    "UH",  # no healthy upstream (incl. empty pod set)
    "UF",  # upstream connection failure
    "UO",  # upstream overflow (circuit breaker)
    "NR",  # no route
    "URX",  # retries exhausted
    "UT",  # upstream request timeout
    "UC",  # upstream connection termination
    "UR",  # upstream remote reset
    "NC",  # no cluster
    "DF",  # DNS resolution failure
    "DO",  # drop overload
    "SI",  # stream idle timeout
    "UPE",  # upstream protocol error
    "OM",  # overload manager
    "UMSDR",  # upstream max stream duration reached
    "DT",  # duration timeout
)

_ACCESS_LOG_FORMAT = (
    "[%START_TIME%] %REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% "
    "%RESPONSE_CODE_DETAILS% rx=%BYTES_RECEIVED% tx=%BYTES_SENT% dur=%DURATION%ms "
    "up=%UPSTREAM_HOST% tries=%UPSTREAM_REQUEST_ATTEMPT_COUNT% "
    f"strategy=%REQ({STRATEGY_USED_HEADER})% target=%REQ({TARGET_POD_HEADER})% "
    f"rid=%REQ({REQUEST_ID_HEADER})% prefix=%REQ({PREFIX_HEADER}):24%\n"
)


class EnvoyValidationError(RuntimeError):
    """`envoy --mode validate` rejected a config; the message is Envoy's own output."""


# --- annotated tree ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Why:
    """A config value with the one-line reason it is set (becomes a YAML comment)."""

    value: Any
    why: str


def _why(value: Any, why: str) -> _Why:
    return _Why(value, why)


def _strip(node: Any) -> Any:
    """The annotated tree as plain data (what Envoy reads)."""
    if isinstance(node, _Why):
        return _strip(node.value)
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


# --- small helpers ----------------------------------------------------------------------------


def _dur(seconds: float) -> str:
    """A protobuf Duration string without float noise: 0.2 -> "0.2s", 300.0 -> "300s"."""
    text = f"{seconds:.6f}".rstrip("0").rstrip(".")
    return f"{text}s"


def _ms(ms: int | float) -> str:
    return _dur(ms / 1000.0)


def _split_host_port(address: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port"; raises ValueError with the address on bad input."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    p = int(port)
    if not 1 <= p <= 65535:
        raise ValueError(f"address {address!r}: port out of range")
    return host, p


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _typed(name: str, type_name: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": _TYPE + type_name, **body}}


def _grpc_cluster(cluster: str) -> dict[str, Any]:
    return {"envoy_grpc": {"cluster_name": cluster}}


def redacted_token(cfg: RouterConfig) -> str:
    """What a rendering meant to be shown or committed carries instead of the secret."""
    return f"REDACTED:{cfg.router.auth.token_file}"


def _router_grpc_service(cfg: RouterConfig, token: str | None) -> dict[str, Any]:
    """Envoy's gRPC client to router-ext, with the shared token when auth is on."""
    svc = _grpc_cluster(CLUSTER_ROUTER)
    if cfg.router.auth.mode == "token":
        svc["initial_metadata"] = _why(
            [{"key": TOKEN_METADATA_KEY, "value": token or redacted_token(cfg)}],
            "router-ext refuses ext_proc and access-log streams without its token: only this "
            "Envoy may steer routing or report pods down",
        )
    return svc


def envoy_dir(cfg: RouterConfig) -> Path:
    """Default directory for the rendered envoy.yaml: `<base_dir>/run/envoy` (absolute)."""
    return Path(os.path.abspath(cfg.base_dir / ENVOY_DIR))


def eds_path(cfg: RouterConfig) -> Path:
    """The EDS file Envoy watches and router-ext rewrites: `<base_dir>/run/envoy/eds/pods.yaml`.

    Absolute, because Envoy and router-ext may run from different working directories; a
    relative base_dir (the default ".") is resolved against the current directory once, here.
    """
    return Path(os.path.abspath(cfg.base_dir / EDS_RELATIVE_PATH))


# --- the bootstrap ----------------------------------------------------------------------------


def _build(cfg: RouterConfig, token: str | None = None) -> dict[str, Any]:
    env = cfg.envoy
    return {
        "node": {"id": "router-ext-envoy", "cluster": "router-ext"},
        "admin": _why(
            {"address": _socket(env.admin.host, env.admin.port)},
            "admin API (/ready, /stats/prometheus, /clusters) for probes, scraping and tests; "
            "it can change state, so bind it to loopback unless configured otherwise",
        ),
        "static_resources": {
            "listeners": [_listener(cfg, token)],
            "clusters": [
                _pods_cluster(cfg, token),
                _router_cluster(cfg),
                *_replica_log_clusters(cfg),
                *(
                    [
                        _why(
                            _xds_cluster(cfg),
                            "gRPC EDS has its own cluster: the ext_proc one is health-checked "
                            "with panic threshold 0, so a NOT_SERVING router (starting, "
                            "draining) would leave Envoy no host to fetch membership from",
                        )
                    ]
                    if cfg.envoy.eds == "grpc"
                    else []
                ),
            ],
        },
        "layered_runtime": {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {
                        "envoy.reloadable_features.ext_proc_graceful_grpc_close": _why(
                            True,
                            "half-close each ext_proc stream and let the router end it; by "
                            "default Envoy resets it (RST_STREAM) right after the half-close, "
                            "and grpc.aio leaks native memory on every reset stream (~130 B "
                            "per request, grpc/grpc#43360; benchmarks/results/soak.md)",
                        )
                    },
                }
            ]
        },
    }


def _listener(cfg: RouterConfig, token: str | None) -> dict[str, Any]:
    env = cfg.envoy
    hcm = _typed(
        "envoy.filters.network.http_connection_manager",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        {
            "stat_prefix": _why(
                "ingress", "stats appear as http.ingress.* (incl. http.ingress.ext_proc.*)"
            ),
            "codec_type": _why("AUTO", "clients may speak HTTP/1.1 or h2c; detect per connection"),
            "use_remote_address": _why(
                True,
                "edge proxy: with no internal_address_config no client is internal (1.40), so "
                "client-sent x-envoy-* control headers are stripped and x-request-id is ours",
            ),
            "generate_request_id": _why(
                True, "x-request-id ties client, access log and router log lines together"
            ),
            "always_set_request_id_in_response": _why(
                True, "the client can quote the request id when reporting a failure"
            ),
            "early_header_mutation_extensions": _why(
                [
                    _typed(
                        "envoy.http.early_header_mutation.header_mutation",
                        "envoy.extensions.http.early_header_mutation.header_mutation.v3."
                        "HeaderMutation",
                        {
                            "mutations": [
                                {"remove": TARGET_POD_HEADER},
                                {"remove": STRATEGY_USED_HEADER},
                                {"remove": MODEL_HEADER},
                                {"remove": PREFIX_HEADER},
                            ]
                        },
                    )
                ],
                "anti-spoofing: drop client-sent routing headers before any filter runs; while "
                f"ext_proc fails open a client x-target-pod would otherwise pick the pod, and a "
                f"client {MODEL_HEADER} on a request without a JSON body (nothing to overwrite "
                "it) would claim a model the body does not name",
            ),
            "route_config": _route_config(cfg),
            "http_filters": [
                *(
                    (_json_to_metadata_filter(), _model_header_filter())
                    if cfg.envoy.model_from_body
                    else ()
                ),
                _ext_proc_filter(cfg, token),
                _router_filter(cfg, token),
            ],
            "local_reply_config": _local_reply_config(),
            "access_log": [*_grpc_access_logs(cfg, token), _file_access_log(cfg)],
        },
    )
    return {
        "name": "ingress",
        "address": _socket(env.listener.host, env.listener.port),
        "per_connection_buffer_limit_bytes": _why(
            _CONNECTION_BUFFER,
            "Envoy's default, stated: the route's request_body_buffer_limit raises each "
            "stream's limit (measured: 31 MiB bodies buffered with this at 1 MiB), so a larger "
            "value would only let every client connection's read buffer grow",
        ),
        "filter_chains": [{"filters": [hcm]}],
    }


def body_buffer_limit(cfg: RouterConfig) -> int:
    """Bytes Envoy buffers of one request body: for retries, the model lookup and body phase.

    At least routing.max_body_bytes, so every body the router asks for fits (a body over the
    limit in BUFFERED mode is a 413); never below the 16 MiB that keeps retries of long prompts.
    json_to_metadata buffers every JSON body to find `model`, so a JSON body over this limit is
    refused with 413 (measured: 17 MiB JSON -> 413; a non-JSON body streams through).
    """
    return max(_RETRY_BUFFER_FLOOR, cfg.routing.max_body_bytes)


def ext_proc_forwarded_headers(cfg: RouterConfig) -> tuple[str, ...]:
    """The request headers Envoy sends router-ext: what it reads, plus the session header."""
    extra = (
        () if cfg.routing.session_header in ROUTER_READS_HEADERS else (cfg.routing.session_header,)
    )
    return (*ROUTER_READS_HEADERS, *extra)


def _json_to_metadata_filter() -> dict[str, Any]:
    def kv(value: str | None) -> dict[str, Any]:
        pair: dict[str, Any] = {
            "metadata_namespace": MODEL_METADATA_NAMESPACE,
            "key": MODEL_METADATA_KEY,
        }
        if value is None:
            pair["type"] = "STRING"  # the extracted value, as a string (a number stays usable)
        else:
            pair["value"] = value
        return pair

    return _typed(
        "envoy.filters.http.json_to_metadata",
        "envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
        {
            "request_rules": _why(
                {
                    "rules": [
                        {
                            "selectors": [{"key": "model"}],
                            "on_present": kv(None),
                            "on_missing": _why(
                                kv(MODEL_NONE),
                                "JSON without a top-level model; also an empty body and a "
                                "top-level array (measured)",
                            ),
                            "on_error": _why(
                                kv(MODEL_NOT_JSON),
                                "not JSON, a content-type that is not JSON, or compressed "
                                "(content-encoding: gzip, measured): the router maps it "
                                "explicitly",
                            ),
                        }
                    ],
                    "allow_content_types_regex": _why(
                        {"regex": r"(?i)application/json\s*(;.*)?"},
                        "a regex, because the plain list matches the whole header exactly "
                        f"(measured: 'application/json; charset=utf-8' gave {MODEL_NOT_JSON}); "
                        f"any other type counts as not JSON ({MODEL_NOT_JSON})",
                    ),
                    "allow_empty_content_type": _why(
                        True,
                        "a body with no content-type is parsed as JSON by vLLM's server "
                        "(FastAPI), so it names a model just the same",
                    ),
                },
                "lift the body's model into dynamic metadata in Envoy (C++), before ext_proc's "
                "header phase: model-aware routing without sending the body to the router",
            ),
        },
    )


def _model_header_filter() -> dict[str, Any]:
    copy = _typed(
        "envoy.filters.http.header_mutation",
        "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        {
            "mutations": {
                "request_mutations": _why(
                    [
                        {
                            "append": {
                                "header": {
                                    "key": MODEL_HEADER,
                                    "value": f"%DYNAMIC_METADATA({MODEL_METADATA_NAMESPACE}:"
                                    f"{MODEL_METADATA_KEY})%",
                                },
                                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                            }
                        }
                    ],
                    "copy the body's model into a header ext_proc receives with the request "
                    "headers, overwriting any client-sent copy",
                ),
            }
        },
    )
    skip_bodyless = {
        "matcher_list": {
            "matchers": [
                {
                    "predicate": {
                        "single_predicate": {
                            "input": {
                                "name": "method",
                                "typed_config": {
                                    "@type": _TYPE
                                    + "envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                                    "header_name": ":method",
                                },
                            },
                            "value_match": {"safe_regex": {"google_re2": {}, "regex": "GET|HEAD"}},
                        }
                    },
                    "on_match": {
                        "action": {
                            "name": "skip",
                            "typed_config": {
                                "@type": _TYPE
                                + "envoy.extensions.filters.common.matcher.action.v3.SkipFilter"
                            },
                        }
                    },
                }
            ]
        }
    }
    return _typed(
        "router_ext.model_header",
        "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
        {
            "extension_config": copy,
            "xds_matcher": _why(
                skip_bodyless,
                "GET and HEAD carry no body: json_to_metadata would report it as a body "
                f"without a model ({MODEL_NONE}); these requests carry no model header instead",
            ),
        },
    )


def _ext_proc_filter(cfg: RouterConfig, token: str | None) -> dict[str, Any]:
    env = cfg.envoy
    return _typed(
        "envoy.filters.http.ext_proc",
        "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        {
            "grpc_service": _why(
                _router_grpc_service(cfg, token),
                "Envoy's own gRPC client: the router cluster's health checks and circuit "
                "breakers apply to ext_proc streams",
            ),
            "failure_mode_allow": _why(
                True,
                "fail open: if router-ext is down, hung or slow, requests still go to a pod via "
                "the cluster's least-request fallback instead of an empty 500",
            ),
            "message_timeout": _why(
                _ms(env.message_timeout_ms),
                "bound the wait for each answer (the header answer, and the body answer when "
                "the router asked for the body); past it the request fails open",
            ),
            "processing_mode": _why(
                processing_mode_dict(DEFAULT_PROCESSING_MODE),
                "most picks need request headers only; bodies and responses would add a round "
                "trip per chunk and buffer streamed tokens",
            ),
            "allow_mode_override": _why(
                True,
                "the router asks for the body in its header answer only when the chosen "
                "profile reads it (prefix routing) and the size is under routing.max_body_bytes",
            ),
            "allowed_override_modes": _why(
                [processing_mode_dict(BODY_MODE_OVERRIDE)],
                "the only widening allowed: the request body, BUFFERED (a header mutation in "
                "the body answer is honoured only then); any other override is ignored, so "
                "responses and streamed tokens never pass through the router",
            ),
            "forward_rules": _why(
                {
                    "allowed_headers": {
                        "patterns": [{"exact": h} for h in ext_proc_forwarded_headers(cfg)],
                    }
                },
                "send only the headers the router reads: less to encode and decode per "
                "request, and client credentials (Authorization) never reach the router",
            ),
            # No stat_prefix: stats are then exactly http.ingress.ext_proc.*.
            # No route_cache_action / clear_route_cache: the route matches every path and
            # override_host reads x-target-pod at host selection (after routing), so a re-match
            # after our header mutation would be pure cost. Needed only if a route ever
            # matched on a header router-ext sets.
        },
    )


def _router_filter(cfg: RouterConfig, token: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if len(cfg.replica_addresses) > 1:
        spec["upstream_log"] = _why(
            _grpc_access_logs(cfg, token, upstream=True),
            "with several replicas each must learn the others' placements while the requests "
            "run, not when they end (an LLM request lasts seconds): one entry per upstream "
            "attempt as soon as its stream is set up, to every replica",
        )
        spec["upstream_log_options"] = _why(
            {"flush_upstream_log_on_upstream_stream": True},
            "log when the upstream stream is associated with the request (the decision's "
            "x-target-pod and prefix are known), in addition to when the attempt ends",
        )
    return _typed(
        "envoy.filters.http.router", "envoy.extensions.filters.http.router.v3.Router", spec
    )


def _echo_target(cfg: RouterConfig) -> list[dict[str, Any]]:
    # Opt-in (envoy.echo_target_pod): the full answer names pod addresses, which clients
    # should not normally learn; the demo and end-to-end tests use it to check routing.
    if not cfg.envoy.echo_target_pod:
        return []
    return [
        {
            "header": {"key": TARGET_POD_HEADER, "value": f"%REQ({TARGET_POD_HEADER})%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]


def _route_config(cfg: RouterConfig) -> dict[str, Any]:
    env = cfg.envoy
    retry: dict[str, Any] = {
        "retry_on": _why(
            "connect-failure,refused-stream,reset-before-request,gateway-error"
            + (",reset" if env.retry_on_reset else ""),
            "the engine never got the request, a gateway said so, or (reset, when "
            "envoy.retry_on_reset) the pod died before answering; never plain 5xx, and never "
            "once the response started",
        ),
        "num_retries": _why(
            env.num_retries, "walk the router's fallback entries in x-target-pod on failure"
        ),
        "retry_back_off": _why(
            {"base_interval": "0.025s", "max_interval": "0.25s"},
            "explicit (equal to Envoy's defaults) and short: the retry goes to another pod, "
            "so a long back-off would only add latency",
        ),
        "retry_host_predicate": _why(
            [
                _typed(
                    "envoy.retry_host_predicates.previous_hosts",
                    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
                    {},
                )
            ],
            "a retry never lands on a pod that already failed this request",
        ),
        "host_selection_retry_max_attempts": _why(
            5, "re-pick up to 5 times to find a host the predicate accepts"
        ),
    }
    if env.per_try_timeout_s > 0:
        retry["per_try_timeout"] = _why(
            _dur(env.per_try_timeout_s), "configured per-try timeout (0 = none)"
        )
    route: dict[str, Any] = {
        "cluster": CLUSTER_PODS,
        "timeout": _why(
            _dur(env.route_timeout_s), "whole-request timeout: long generations must finish"
        ),
        "retry_policy": retry,
    }
    return {
        "name": "inference",
        "virtual_hosts": [
            {
                "name": "inference",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "route": route,
                        "request_body_buffer_limit": _why(
                            body_buffer_limit(cfg),
                            "retries need the buffered request body; long-context prompts "
                            "exceed the 1 MiB default and would silently lose retries; at "
                            "least routing.max_body_bytes, so a body the router asks for fits; "
                            "a JSON body over it gets 413 (json_to_metadata buffers it whole)",
                        ),
                        "response_headers_to_add": _why(
                            [
                                {
                                    "header": {
                                        "key": STRATEGY_USED_HEADER,
                                        "value": f"%REQ({STRATEGY_USED_HEADER})%",
                                    },
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                },
                                {
                                    "header": {
                                        "key": ROUTED_TO_HEADER,
                                        "value": "%UPSTREAM_HOST%",
                                    },
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                },
                                *_echo_target(cfg),
                            ],
                            "echo the routing decision (strategy used, pod that served) to the "
                            "client; absent when the router failed open",
                        ),
                    }
                ],
            }
        ],
    }


def _local_reply_config() -> _Why:
    body = {
        "error": {
            "message": "%LOCAL_REPLY_BODY%",
            "type": "upstream_error",
            # A string like router-ext's own codes (OpenAI clients expect a string or null).
            "code": "%RESPONSE_CODE_DETAILS%",
            "response_flags": "%RESPONSE_FLAGS%",
            "request_id": f"%REQ({REQUEST_ID_HEADER})%",
        }
    }
    return _why(
        {
            "mappers": [
                {
                    "filter": {"response_flag_filter": {"flags": list(_LOCAL_REPLY_FLAGS)}},
                    "body_format_override": {"json_format": body},
                }
            ]
        },
        "Envoy's own errors (no healthy upstream, connect failure, ...) as OpenAI-style JSON; "
        "filtered by response flag so router-ext's ext_proc JSON replies are not re-wrapped",
    )


def _grpc_access_logs(cfg: RouterConfig, token: str | None, *, upstream: bool = False) -> list[Any]:
    """One gRPC access logger per router replica: each replica receives every entry."""
    replicas = cfg.replica_addresses
    if len(replicas) == 1:
        return [_grpc_access_log(cfg, token, CLUSTER_ROUTER, "router-ext", upstream)]
    return [
        _grpc_access_log(cfg, token, replica_log_cluster(i), f"router-ext-{i}", upstream)
        for i in range(len(replicas))
    ]


def _grpc_access_log(
    cfg: RouterConfig, token: str | None, cluster: str, log_name: str, upstream: bool
) -> dict[str, Any]:
    svc = _router_grpc_service(cfg, token)
    svc["envoy_grpc"] = {"cluster_name": cluster}
    logger = _typed(
        "envoy.access_loggers.http_grpc",
        "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
        {
            "common_config": {
                "log_name": _why(
                    log_name + ("-upstream" if upstream else ""),
                    "Envoy shares one gRPC stream per logger name and config; a name per "
                    "replica and kind keeps them apart",
                ),
                "transport_api_version": "V3",
                "grpc_service": _why(
                    svc,
                    "one entry per finished request (pod, status, flags, timings) streamed to "
                    "router-ext: the ext_proc stream ends before the request does",
                ),
                "buffer_flush_interval": (
                    _why(
                        f"{cfg.envoy.placement_log_flush_ms / 1000:g}s",
                        "envoy.placement_log_flush_ms: a peer replica's placement is load this "
                        "replica cannot see until the entry arrives (100 ms default: 20 ms "
                        "measured no better with 4 replicas)",
                    )
                    if upstream
                    else _why(
                        "0.1s", "a failed request reaches the router within ~100 ms (default 1 s)"
                    )
                ),
                "buffer_size_bytes": _why(
                    16384,
                    "~40 entries per message under load (fewer gRPC messages for the router to "
                    "read); the 100 ms flush interval still bounds how late a failure arrives",
                ),
            },
            "additional_request_headers_to_log": _why(
                [TARGET_POD_HEADER, STRATEGY_USED_HEADER, REQUEST_ID_HEADER, PREFIX_HEADER],
                "the router matches each entry to its own decision (pods offered, strategy), "
                "and learns a peer replica's placement from the prefix the decision used",
            ),
        },
    )
    if upstream:
        logger["filter"] = _why(
            {"log_type_filter": {"types": ["UpstreamPoolReady"]}},
            "only the placement: each attempt's end is already in the downstream entry",
        )
    return logger


def _file_access_log(cfg: RouterConfig) -> dict[str, Any]:
    return _typed(
        "envoy.access_loggers.file",
        "envoy.extensions.access_loggers.file.v3.FileAccessLog",
        {
            "path": _why(
                cfg.envoy.access_log_path,
                "plain one-line log for humans; /dev/null by default (the gRPC log is the "
                "machine-readable one)",
            ),
            "log_format": {"text_format_source": {"inline_string": _ACCESS_LOG_FORMAT}},
        },
    )


def _eds_config(cfg: RouterConfig, token: str | None) -> _Why:
    """Where the pods cluster's membership comes from: the file router-ext rewrites, or
    router-ext's EDS server over gRPC (envoy.eds)."""
    if cfg.envoy.eds == "file":
        path = eds_path(cfg)
        return _why(
            {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": str(path),
                    "watched_directory": {"path": str(path.parent)},
                },
            },
            "router-ext rewrites this file atomically (temp file + rename into the watched "
            "directory); Envoy reloads it on the move",
        )
    grpc_service = _router_grpc_service(cfg, token)
    if "initial_metadata" in grpc_service:
        grpc_service["initial_metadata"] = _why(
            _strip(grpc_service["initial_metadata"]),
            "router-ext refuses EDS streams without its token, as it does ext_proc and "
            "access-log streams",
        )
    grpc_service["envoy_grpc"] = {
        "cluster_name": CLUSTER_XDS,
        "retry_policy": _why(
            {"retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}},
            "reconnect to a restarted router within ~1 s (measured); Envoy's default back-off "
            "took up to 11 s, all that time without membership updates",
        ),
    }
    return _why(
        {
            "resource_api_version": "V3",
            "api_config_source": {
                "api_type": _why(
                    "GRPC", "state of the world: every response carries the whole pod set"
                ),
                "transport_api_version": "V3",
                "grpc_services": [grpc_service],
                "set_node_on_first_message_only": _why(
                    True, "the node identity is sent once per stream, not on every ACK"
                ),
            },
            "initial_fetch_timeout": _why(
                _dur(cfg.envoy.eds_initial_fetch_timeout_s),
                "a starting Envoy with no reachable EDS server stops waiting for membership "
                "after this and serves (503s until router-ext answers) instead of refusing "
                "connections for the 15 s default",
            ),
        },
        "router-ext serves this cluster's endpoints over gRPC (EDS): router and Envoy can run "
        "in separate pods; with the EDS server gone Envoy keeps its last endpoints",
    )


def _pods_cluster(cfg: RouterConfig, token: str | None = None) -> dict[str, Any]:
    env = cfg.envoy
    hc_interval = env.health_check_interval_ms
    # No slow_start_config: measured, it had no visible effect with equal weights (a new pod got
    # its full share at once); the router's own ramp (routing.slow_start_s) is what protects it.
    least_request: dict[str, Any] = {
        "choice_count": _why(2, "power of two choices: near-best balance at O(1) cost"),
    }
    return {
        "name": CLUSTER_PODS,
        "type": _why("EDS", "membership follows discovery at runtime, no Envoy restart"),
        "eds_cluster_config": {"eds_config": _eds_config(cfg, token)},
        "connect_timeout": _why(
            "0.5s", "a dead pod is found fast and the retry goes elsewhere (default 5 s)"
        ),
        "ignore_health_on_host_removal": _why(
            True,
            "a pod removed from discovery leaves at once, even while it still passes health "
            "checks (else draining pods keep getting new requests)",
        ),
        "load_balancing_policy": _why(
            {
                "policies": [
                    {
                        "typed_extension_config": _typed(
                            "envoy.load_balancing_policies.override_host",
                            "envoy.extensions.load_balancing_policies.override_host.v3."
                            "OverrideHost",
                            {
                                "override_host_sources": _why(
                                    [{"header": TARGET_POD_HEADER}],
                                    "router-ext's pick, ip:port[,ip:port...]; retries take the "
                                    "next entry; addresses not in this cluster are skipped",
                                ),
                                "fallback_policy": _why(
                                    {
                                        "policies": [
                                            {
                                                "typed_extension_config": _typed(
                                                    "envoy.load_balancing_policies.least_request",
                                                    "envoy.extensions.load_balancing_policies."
                                                    "least_request.v3.LeastRequest",
                                                    least_request,
                                                )
                                            }
                                        ]
                                    },
                                    "no header (router failed open) or list exhausted: least "
                                    "request, which respects health checks and outlier ejection",
                                ),
                            },
                        )
                    }
                ]
            },
            "the router picks the pod (header); only pods in this cluster can be chosen, unlike "
            "ORIGINAL_DST which dials any ip:port a header names",
        ),
        "common_lb_config": {
            "healthy_panic_threshold": _why(
                {"value": 0.0},
                "never panic: the fallback balancer only serves requests that failed open, and "
                "in panic it spreads them over pods health checks call dead (3 of 2,000 "
                "healthy: 345/630 failed); router-ext's own answers ignore Envoy's health "
                "anyway, so a fleet-wide health-check fault cannot stop routing while the "
                "router is up",
            ),
            "update_merge_window": _why(
                "0s",
                "health changes reach the balancer at once; the 1 s default merge window kept a "
                "new healthy pod unpicked (and a failed one picked) for ~1 s",
            ),
            "ignore_new_hosts_until_first_hc": _why(
                True,
                "a scale-out of not-yet-checked pods neither receives fallback traffic nor "
                "drags the healthy percentage into panic",
            ),
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": _why(
                        100000,
                        "HTTP/1.1: one connection per in-flight request; streams last minutes "
                        "(default 1024 caps the whole fleet)",
                    ),
                    "max_pending_requests": _why(
                        100000, "requests waiting for a connection: never the limiting factor"
                    ),
                    "max_requests": _why(
                        100000,
                        "concurrent requests fleet-wide; the engines queue, router-ext sheds",
                    ),
                    "max_retries": _why(
                        1024,
                        "default 3 concurrent retries: 160/200 requests failed at concurrency "
                        "8 when a pod died",
                    ),
                    "track_remaining": _why(True, "export remaining_* gauges to see headroom"),
                }
            ]
        },
        "outlier_detection": {
            "split_external_local_origin_errors": _why(
                True, "count connect/reset/timeout (local origin) apart from HTTP status codes"
            ),
            "consecutive_local_origin_failure": _why(
                1, "one refused/reset connection ejects the pod: it is almost surely gone"
            ),
            "enforcing_consecutive_local_origin_failure": _why(
                100, "eject, not only detect (default 100 but stated: this is the key one)"
            ),
            "consecutive_gateway_failure": _why(3, "3 x 502/503/504 in a row ejects"),
            "enforcing_consecutive_gateway_failure": _why(
                100, "default 0 = detect only; enforce it"
            ),
            "enforcing_consecutive_5xx": _why(
                0,
                "plain 500s are often caused by the request (bad prompt), not the pod; "
                "connection and gateway failures are the ejection signals",
            ),
            "interval": _why("1s", "evaluate ejections every second (default 10 s)"),
            "base_ejection_time": _why(
                "5s",
                "short: a passing active health check unejects the pod anyway; repeat "
                "offenders get k x 5 s",
            ),
            "max_ejection_time": _why("30s", "cap repeated ejections (default 300 s)"),
            "max_ejection_percent": _why(
                50,
                "never eject more than half the fleet on passive signals: mass failure is more "
                "likely our path than every pod; active health checks decide beyond that",
            ),
            "always_eject_one_host": _why(
                True, "a 1-2 pod fleet can still eject its dead pod despite the 50% cap"
            ),
        },
        "health_checks": [
            {
                "timeout": _why(
                    _ms(hc_interval / 2), "half the interval: a slow check never overlaps"
                ),
                "interval": _why(_ms(hc_interval), "configured pod health check interval"),
                "unhealthy_threshold": _why(2, "two misses: one slow reply under load is noise"),
                "healthy_threshold": _why(1, "one pass brings a pod (back) in at once"),
                "no_traffic_interval": _why(
                    _ms(hc_interval), "default 60 s while idle: a dead pod looked fine for 60 s"
                ),
                "no_traffic_healthy_interval": _why(
                    _ms(hc_interval), "same for healthy idle pods (defaults to 60 s too)"
                ),
                "http_health_check": {"path": cfg.envoy.health_check_path},
            }
        ],
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": _why(
                    {"http_protocol_options": {}},
                    "engines (vLLM, SGLang) serve HTTP/1.1; connections are kept alive",
                ),
                "common_http_protocol_options": {
                    "idle_timeout": _why(
                        "4s",
                        "close idle keep-alive connections before uvicorn's 5 s "
                        "timeout, so Envoy never reuses one the pod is closing",
                    ),
                },
            }
        },
        "upstream_connection_options": {
            "tcp_keepalive": _why(
                {"keepalive_time": 30, "keepalive_interval": 5, "keepalive_probes": 3},
                "a pod whose node vanished (no RST) is detected on a long stream in ~45 s, "
                "not at the route timeout",
            )
        },
    }


def _xds_cluster(cfg: RouterConfig) -> dict[str, Any]:
    """Envoy's connection to router-ext's EDS server: the router's address, no health checks."""
    router = _router_cluster(cfg)
    cluster: dict[str, Any] = {"name": CLUSTER_XDS}
    for key in ("type", "cluster_type"):
        if key in router:
            cluster[key] = router[key]
    cluster["connect_timeout"] = _why(
        "0.25s", "router is local or near: a slow connect means it is down; retry soon"
    )
    cluster["load_assignment"] = {**router["load_assignment"], "cluster_name": CLUSTER_XDS}
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {
                "http2_protocol_options": {
                    "connection_keepalive": _why(
                        {"interval": "10s", "timeout": "3s"},
                        "a router gone without closing its socket (node lost) is noticed in "
                        "~13 s and the stream reopened, instead of waiting on TCP; router-ext "
                        "accepts pings every 5 s",
                    )
                }
            },
        }
    }
    return cluster


def _router_cluster(cfg: RouterConfig) -> dict[str, Any]:
    return _router_like_cluster(cfg, CLUSTER_ROUTER, cfg.replica_addresses, health_checked=True)


def replica_log_cluster(i: int) -> str:
    """The cluster of replica i's own access logger (only with more than one replica)."""
    return f"{CLUSTER_ROUTER}_log_{i}"


def _replica_log_clusters(cfg: RouterConfig) -> list[Any]:
    replicas = cfg.replica_addresses
    if len(replicas) == 1:
        return []
    return [
        _why(
            _router_like_cluster(cfg, replica_log_cluster(i), [a], health_checked=False),
            f"replica {i}'s access-log stream: a gRPC client sends each stream to one host of "
            "its cluster, so every replica has a cluster of its own to receive every entry",
        )
        for i, a in enumerate(replicas)
    ]


def _router_like_cluster(
    cfg: RouterConfig, name: str, addresses: Sequence[str], *, health_checked: bool
) -> dict[str, Any]:
    env = cfg.envoy
    hosts = [_split_host_port(a) for a in addresses]
    is_ip = all(_is_ip(h) for h, _ in hosts)
    interval = env.router_health_interval_ms
    cluster: dict[str, Any] = {"name": name}
    if is_ip:
        cluster["type"] = _why("STATIC", "router address is an IP literal")
    else:
        cluster["cluster_type"] = _why(
            _typed(
                "envoy.cluster.dns",
                "envoy.extensions.clusters.dns.v3.DnsCluster",
                {
                    "dns_refresh_rate": _why(
                        "1s", "a restarted router container (new IP) is found within 1 s"
                    ),
                    "dns_lookup_family": _why(
                        "V4_PREFERRED", "container networks are IPv4; v6 only if that is all"
                    ),
                },
            ),
            "router address is a name (router:50051 in compose): STRICT_DNS semantics, every "
            "resolved address is an endpoint (Cluster.type STRICT_DNS's non-deprecated form)",
        )
    cluster.update(
        {
            "connect_timeout": _why(
                "0.25s", "router is local or near: a slow connect means it is down; fail open"
            ),
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {"endpoint": {"address": _socket(host, port)}} for host, port in hosts
                        ]
                    }
                ],
            },
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": _why(
                        {"http2_protocol_options": {}}, "gRPC (ext_proc, access log) needs HTTP/2"
                    ),
                }
            },
        }
    )
    if not health_checked:
        return cluster
    cluster.update(
        {
            "circuit_breakers": {
                "thresholds": [
                    {
                        "priority": "DEFAULT",
                        "max_requests": _why(
                            10000,
                            "each request opens one ext_proc stream; default 1024 would fail "
                            "open at ~1k concurrent decisions",
                        ),
                        "max_pending_requests": _why(
                            10000, "streams queued while the HTTP/2 connection is (re)opened"
                        ),
                    }
                ]
            },
            "health_checks": [
                {
                    "timeout": _why(
                        _ms(interval * 4 // 5), "below the interval so checks never pile up"
                    ),
                    "interval": _why(
                        _ms(interval),
                        "a hung router (streams time out) is taken out in ~2 intervals, "
                        "after which requests fail open at once instead of after "
                        "message_timeout",
                    ),
                    "unhealthy_threshold": _why(2, "two misses: tolerate one GC/scheduling blip"),
                    "healthy_threshold": _why(1, "back in on the first SERVING answer"),
                    "no_traffic_interval": _why(
                        _ms(interval), "default 60 s: a router restart must be seen fast"
                    ),
                    "no_traffic_healthy_interval": _why(
                        _ms(interval), "same when idle and healthy"
                    ),
                    "grpc_health_check": _why(
                        {"service_name": EXT_PROC_SERVICE},
                        "router-ext reports NOT_SERVING until its first discovery+scrape and "
                        "while draining",
                    ),
                }
            ],
            "common_lb_config": {
                "healthy_panic_threshold": _why(
                    {"value": 0.0},
                    "never panic: with one router host the default 50% would keep sending "
                    "streams to a dead router; 0 = unhealthy means excluded, fail open at once",
                )
            },
        }
    )
    return cluster


def render_bootstrap(cfg: RouterConfig, token: str | None = None) -> dict[str, Any]:
    """The Envoy bootstrap as plain data (what `envoy -c` reads).

    `token`: the router's shared token; None renders a placeholder (for display and for
    committed files: a secret is never printed or committed by default)."""
    result: dict[str, Any] = _strip(_build(cfg, token))
    return result


# --- commented YAML ---------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float, str)):
        text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000)
        text = text.removesuffix("\n").removesuffix("\n...")
        if "\n" in text:  # pragma: no cover - only multi-line strings, quoted below
            return json.dumps(value)
        return text
    raise TypeError(f"cannot emit {type(value).__name__} as a YAML scalar")


def _comment_lines(why: str, pad: str) -> list[str]:
    return [f"{pad}# {why}"]


def _emit(node: Any, indent: int) -> list[str]:
    """Block-style YAML for dict/list nodes, with `# why` lines above annotated entries."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(node, dict):
        for key, raw in node.items():
            value = raw
            if isinstance(raw, _Why):
                lines += _comment_lines(raw.why, pad)
                value = raw.value
            k = _scalar(key)
            if isinstance(value, (dict, list)) and value:
                lines.append(f"{pad}{k}:")
                lines += _emit(value, indent + 2)
            elif isinstance(value, (dict, list)):
                lines.append(f"{pad}{k}: {'{}' if isinstance(value, dict) else '[]'}")
            else:
                lines.append(f"{pad}{k}: {_scalar(value)}")
        return lines
    if isinstance(node, list):
        for raw in node:
            value = raw
            if isinstance(raw, _Why):
                lines += _comment_lines(raw.why, pad)
                value = raw.value
            if isinstance(value, (dict, list)) and value:
                sub = _emit(value, indent + 2)
                # "- " replaces the indentation of the first non-comment line.
                for i, line in enumerate(sub):
                    if not line.lstrip().startswith("#"):
                        sub[i] = f"{pad}- {line[indent + 2 :]}"
                        break
                lines += sub
            elif isinstance(value, (dict, list)):
                lines.append(f"{pad}- {'{}' if isinstance(value, dict) else '[]'}")
            else:
                lines.append(f"{pad}- {_scalar(value)}")
        return lines
    raise TypeError(f"top level must be a mapping or list, got {type(node).__name__}")


_HEADER = (
    "# Envoy bootstrap for router-ext. Generated from the router config by\n"
    "# router_ext.envoy_adapter.envoy_config (`router-ext envoy-config`): do not edit.\n"
    "# Each commented line says why a setting differs from Envoy's default or matters.\n"
)


def render_bootstrap_yaml(cfg: RouterConfig, token: str | None = None) -> str:
    """The bootstrap as YAML with a one-line `# why` comment above every non-trivial setting.

    Parses to exactly `render_bootstrap(cfg, token)`: the comments carry no data.
    """
    return _HEADER + "\n".join(_emit(_build(cfg, token), 0)) + "\n"


# --- README table -----------------------------------------------------------------------------


def _walk(node: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any, str]]:
    if isinstance(node, _Why):
        yield path, _strip(node.value), node.why
        node = node.value
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            label = str(i)
            plain = _strip(v)
            if isinstance(plain, dict) and isinstance(plain.get("name"), str):
                label = plain["name"]
            yield from _walk(v, (*path, f"[{label}]"))


_PATH_NOISE = frozenset(
    {
        "typed_config",
        "static_resources",
        "typed_extension_config",
        "policies",
        "typed_extension_protocol_options",
    }
)


def _short_path(path: tuple[str, ...]) -> str:
    """`clusters[pods].outlier_detection.interval`-style name, scoped to the nearest named item."""
    scope = ""
    rest: list[str] = []
    for seg in path:
        if seg.startswith("[") and not seg[1:-1].isdigit():
            scope = seg[1:-1].rsplit(".", 1)[-1]
            rest = []
        elif seg.startswith("[") or seg in _PATH_NOISE:
            continue
        else:
            rest.append(seg.rsplit(".", 1)[-1])  # "envoy.extensions...HttpProtocolOptions"
    tail = ".".join(rest)
    return f"{scope}: {tail}" if scope and tail else (scope or tail)


def _cell(text: str, limit: int = 90) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def settings_table_markdown() -> str:
    """`| setting | value | why |` for the README, from the same annotations as the YAML.

    Rendered for the default config with base_dir /etc/router-ext (the container layout), so
    the table is identical on every machine.
    """
    cfg = RouterConfig(base_dir=EXAMPLE_BASE_DIR)
    rows = ["| setting | value | why |", "|---|---|---|"]
    for path, value, why in _walk(_build(cfg), ()):
        shown = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        rows.append(f"| `{_cell(_short_path(path))}` | `{_cell(shown)}` | {_cell(why, 400)} |")
    return "\n".join(rows) + "\n"


#: Pods in the committed example EDS file (envoy/eds/pods.yaml).
EXAMPLE_PODS = (Pod("10.0.0.11", 8000, name="vllm-0"), Pod("10.0.0.12", 8000, name="vllm-1"))


def example_bootstrap_yaml() -> str:
    """The committed envoy/envoy.yaml: defaults, base_dir /etc/router-ext (container layout)."""
    return render_bootstrap_yaml(RouterConfig(base_dir=EXAMPLE_BASE_DIR))


# --- EDS --------------------------------------------------------------------------------------


def render_eds(cfg: RouterConfig, pods: Sequence[Pod]) -> dict[str, Any]:
    """The EDS file for the pods cluster: a DiscoveryResponse with one ClusterLoadAssignment.

    `version_info` is a content hash, so Envoy's logs and config dump show when the membership
    really changed; the gRPC EDS server (xds.py) sends the same assignment and version.
    """
    cla = pods_load_assignment(pods)
    return {"version_info": eds_version(cla), "resources": [cla]}


def eds_version(cla: dict[str, Any]) -> str:
    """A content hash of the assignment: router replicas with the same membership agree."""
    return hashlib.sha256(json.dumps(cla, sort_keys=True).encode()).hexdigest()[:16]


def pods_load_assignment(pods: Sequence[Pod]) -> dict[str, Any]:
    """The pods cluster's ClusterLoadAssignment (JSON form, with its `@type`).

    Not-ready pods are left out (never routed). Draining pods stay listed with health_status
    DRAINING: the fallback policy stops picking them while their in-flight requests finish.
    Duplicate addresses keep the first entry; endpoints are sorted by address.
    """
    lb_endpoints: list[dict[str, Any]] = []
    seen: set[str] = set()
    for pod in pods:
        if not pod.ready or pod.address in seen:
            continue
        seen.add(pod.address)
        endpoint: dict[str, Any] = {"address": _socket(pod.host, pod.port)}
        if pod.name:
            endpoint["hostname"] = pod.name
        entry: dict[str, Any] = {"endpoint": endpoint}
        if pod.draining:
            entry["health_status"] = "DRAINING"
        lb_endpoints.append(entry)
    # Address order, not discovery's: replicas whose sources list the same pods in another
    # order (Kubernetes watch events) must still send the same content and version.
    lb_endpoints.sort(key=_endpoint_order)
    cla: dict[str, Any] = {"@type": _CLA_TYPE, "cluster_name": CLUSTER_PODS}
    cla["endpoints"] = [{"lb_endpoints": lb_endpoints}] if lb_endpoints else []
    return cla


def _endpoint_order(entry: dict[str, Any]) -> tuple[str, int]:
    sock = entry["endpoint"]["address"]["socket_address"]
    return str(sock["address"]), int(sock["port_value"])


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write via a temp file in the same directory + os.replace (Envoy reloads on the move)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; the EDS file must be readable by Envoy running as another user
        # (containers sharing a volume), while the bootstrap (it holds the token) stays 0600.
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_eds_file(cfg: RouterConfig, pods: Sequence[Pod], path: Path | None = None) -> Path:
    """Atomically (re)write the pods EDS file; Envoy picks up the change in well under 1 s."""
    target = path if path is not None else eds_path(cfg)
    text = (
        "# Pods for Envoy's EDS (cluster 'pods'). Written by router-ext on every discovery\n"
        "# change via rename into this directory; do not edit.\n"
        + yaml.safe_dump(render_eds(cfg, pods), sort_keys=False)
    )
    _atomic_write(target, text)
    return target


def write_envoy_files(cfg: RouterConfig, pods: Sequence[Pod], out_dir: Path) -> dict[str, Path]:
    """Write `<out_dir>/envoy.yaml` and, with envoy.eds file, the initial EDS file (at
    `eds_path(cfg)`).

    The EDS file must exist before Envoy starts (path config sources are checked at load).
    Returns {"envoy": ..., "eds": ...} ("eds" only with the file EDS). `envoy_dir(cfg)` is the
    conventional out_dir.
    """
    envoy_yaml = Path(out_dir) / "envoy.yaml"
    token = load_or_create_token(cfg.token_file) if cfg.router.auth.mode == "token" else None
    # The file holds the token: readable by its owner only (Envoy runs as the same user, or
    # the deployment sets it so; see docker-compose.yml).
    _atomic_write(envoy_yaml, render_bootstrap_yaml(cfg, token), mode=0o600)
    if cfg.envoy.eds == "grpc":
        return {"envoy": envoy_yaml}  # membership comes from router-ext itself, no file
    eds = write_eds_file(cfg, pods)
    return {"envoy": envoy_yaml, "eds": eds}


# --- validation -------------------------------------------------------------------------------


def validate(path: Path, envoy_bin: str | None = None) -> None:
    """Run `envoy --mode validate -c path`; raise EnvoyValidationError with Envoy's message."""
    if envoy_bin is None:
        from router_ext.envoy_adapter.envoy_bin import envoy_binary

        envoy_bin = envoy_binary()
    cmd = [envoy_bin, "--mode", "validate", "-c", str(path), "--log-level", "warn"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as e:
        raise EnvoyValidationError(f"envoy binary {envoy_bin!r} not found: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise EnvoyValidationError(f"{' '.join(cmd)}: timed out after 60 s") from e
    if proc.returncode != 0:
        out = (proc.stderr + proc.stdout).strip()
        raise EnvoyValidationError(f"{path}: envoy rejected the config:\n{out}")


# --- command line (python -m router_ext.envoy_adapter.envoy_config) ---------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Print the bootstrap (or `--table`), or write the committed example (`--example DIR`).

    Writing envoy.yaml + the EDS file for a deployment is `router-ext envoy-config`; this entry
    point never touches a live EDS file.
    """
    ap = argparse.ArgumentParser(prog="python -m router_ext.envoy_adapter.envoy_config")
    ap.add_argument("--config", "-c", help="router config YAML (defaults if omitted)")
    ap.add_argument("--table", action="store_true", help="print the README settings table")
    ap.add_argument(
        "--example",
        metavar="DIR",
        help="write DIR/envoy.yaml and DIR/eds/pods.yaml for the default config "
        f"(base_dir {EXAMPLE_BASE_DIR}; the token redacted)",
    )
    args = ap.parse_args(argv)
    if args.table:
        sys.stdout.write(settings_table_markdown())
        return 0
    if args.example:
        out = Path(args.example)
        _atomic_write(out / "envoy.yaml", example_bootstrap_yaml())
        write_eds_file(
            RouterConfig(base_dir=EXAMPLE_BASE_DIR), EXAMPLE_PODS, out / "eds" / "pods.yaml"
        )
        print(out / "envoy.yaml")
        return 0
    sys.stdout.write(render_bootstrap_yaml(load_config(args.config)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
