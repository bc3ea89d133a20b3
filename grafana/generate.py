"""Generates router-ext's Grafana dashboards (grafana/dashboards/*.json) from Python.

Why code: three dashboards share one datasource variable, one pod variable, one layout rule and
one rate window; hand-edited JSON drifts (duplicate panel ids, overlapping panels, a hard-coded
datasource uid). The committed JSON is what Grafana provisioning loads; tests/test_dashboards.py
fails when it differs from this script's output and runs every expression below against a real
Prometheus fed by a real router, Envoy and simulated pods.

    python grafana/generate.py          # rewrite grafana/dashboards/*.json
    python grafana/generate.py --check  # exit 1 if the committed JSON is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards"

#: Every panel and query names the datasource through the variable, never a fixed uid, so the
#: dashboards work against whatever Prometheus the operator picks.
DS: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
POD = 'pod=~"$pod"'
PODS_CLUSTER = 'envoy_cluster_name="pods"'
INGRESS = 'envoy_http_conn_manager_prefix="ingress"'
GRID_WIDTH = 24


@dataclass
class Target:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass
class Panel:
    title: str
    description: str
    targets: list[Target]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat | table
    w: int = 12
    h: int = 8
    extra: dict[str, Any] = field(default_factory=dict)


def _rate(metric: str, by: str = "", sel: str = "") -> str:
    grouped = f"sum by ({by}) " if by else "sum"
    s = f"{{{sel}}}" if sel else ""
    return f"{grouped}(rate({metric}{s}[{RATE}]))"


def _quantile(q: float, bucket: str, by: str = "", sel: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    s = f"{{{sel}}}" if sel else ""
    return f"histogram_quantile({q}, sum by ({labels}) (rate({bucket}{s}[{RATE}])))"


# --- (a) router overview -------------------------------------------------------------------
def overview_panels() -> list[Panel]:
    decisions = "router_ext_decisions_total"
    return [
        Panel(
            "Router health",
            "1 while the router's gRPC health is SERVING (Envoy routes through it); 0 while "
            "starting or draining, when Envoy fails open to its own balancer.",
            [Target("min(router_ext_health_serving)", "serving")],
            kind="stat",
            w=6,
            h=4,
        ),
        Panel(
            "Routable pods",
            "Pods that may be a primary pick (cold, warm or stale).",
            [Target('sum(router_ext_pods{state=~"cold|warm|stale"})', "routable")],
            kind="stat",
            w=6,
            h=4,
        ),
        Panel(
            "Decisions per second",
            "All routing decisions the router answered, whatever the outcome.",
            [Target(_rate(decisions), "decisions/s")],
            unit="reqps",
            kind="stat",
            w=6,
            h=4,
        ),
        Panel(
            "Degraded share",
            "Share of decisions where the requested metric strategy fell back to random "
            "(no fresh metrics). 0 when nothing degraded; should stay near 0.",
            [
                Target(
                    f'(sum(rate({decisions}{{outcome="degraded"}}[{RATE}])) or vector(0)) '
                    f"/ {_rate(decisions)}",
                    "degraded",
                )
            ],
            unit="percentunit",
            kind="stat",
            w=6,
            h=4,
        ),
        Panel(
            "Requests routed per pod",
            "Primary picks per pod per second: where the router sends traffic.",
            [Target(_rate("router_ext_pod_picks_total", "pod", POD), "{{pod}}")],
            unit="reqps",
        ),
        Panel(
            "Decisions by strategy and outcome",
            "Per strategy actually used (e.g. least-kv-cache>random when degraded) and outcome "
            "(picked, degraded, no_pod = 503, bad_request = 400, not_ready = fail-open).",
            [Target(_rate(decisions, "strategy, outcome"), "{{strategy}} {{outcome}}")],
            unit="reqps",
        ),
        Panel(
            "Degraded decisions by reason",
            "Why a metric strategy could not use live metrics (no_fresh_metrics, no_kv_metric).",
            [
                Target(
                    _rate("router_ext_degraded_decisions_total", "strategy, reason"),
                    "{{strategy}}: {{reason}}",
                )
            ],
            unit="reqps",
        ),
        Panel(
            "Picks of cold pods",
            "Primary picks that went to a pod with no metrics yet (slow start limits these).",
            [Target(_rate("router_ext_cold_pod_requests_total", "pod", POD), "{{pod}}")],
            unit="reqps",
        ),
        Panel(
            "Decision latency",
            "Time to build one answer inside the router (strategy + encoding), p50 and p99.",
            [
                Target(_quantile(0.5, "router_ext_decision_duration_seconds_bucket"), "p50"),
                Target(_quantile(0.99, "router_ext_decision_duration_seconds_bucket"), "p99"),
            ],
            unit="s",
        ),
        Panel(
            "Routing delay seen by Envoy",
            "Envoy's time from a request's start to its first byte sent upstream (ext_proc "
            "exchanges, body buffering, connect), p50 and p99, from the access log.",
            [
                Target(_quantile(0.5, "router_ext_envoy_pre_upstream_seconds_bucket"), "p50"),
                Target(_quantile(0.99, "router_ext_envoy_pre_upstream_seconds_bucket"), "p99"),
            ],
            unit="s",
        ),
        Panel(
            "Mean fallback list length",
            "Fallbacks sent after the primary, on average. Below routing.fallbacks means the "
            "pool is too small to fail over as configured.",
            [
                Target(
                    f"{_rate('router_ext_fallback_entries_total')} / "
                    f'sum(rate({decisions}{{outcome=~"picked|degraded"}}[{RATE}]))',
                    "fallbacks",
                )
            ],
        ),
        Panel(
            "Pods per state",
            "How many pods are not_ready, cold, warm, stale, unreachable, draining.",
            [Target("sum by (state) (router_ext_pods)", "{{state}}")],
        ),
        Panel(
            "Pod state changes",
            "State transitions per window (each is also one log line).",
            [
                Target(
                    f"sum by (from_state, to_state) "
                    f"(increase(router_ext_pod_state_changes_total[{RATE}]))",
                    "{{from_state}} -> {{to_state}}",
                )
            ],
        ),
        Panel(
            "Current pod states",
            "One row per pod and the state it is in now.",
            [Target(f"max by (pod, state) (router_ext_pod_state{{{POD}}})", instant=True)],
            kind="table",
            w=24,
            h=7,
        ),
        Panel(
            "Scrape errors by pod and reason",
            "Failed /metrics fetches: refused/reset mark a pod unreachable at once, time-outs "
            "after repeats, http_500/parse make its metrics go stale.",
            [
                Target(
                    _rate("router_ext_scrape_errors_total", "pod, reason", POD),
                    "{{pod}} {{reason}}",
                )
            ],
            unit="reqps",
        ),
        Panel(
            "Scrape duration",
            "p99 of one pod's fetch+parse and of a whole round (the round must fit the interval).",
            [
                Target(_quantile(0.99, "router_ext_scrape_duration_seconds_bucket"), "pod p99"),
                Target(
                    _quantile(0.99, "router_ext_scrape_round_duration_seconds_bucket"),
                    "round p99",
                ),
            ],
            unit="s",
        ),
        Panel(
            "Metrics age per pod",
            "Age of each pod's last good metrics; past scrape.stale_after_s the pod is stale.",
            [Target(f"max by (pod) (router_ext_pod_metrics_age_seconds{{{POD}}})", "{{pod}}")],
            unit="s",
        ),
        Panel(
            "Cold-start duration p90",
            "Time from a pod turning Ready to its first good metrics (pods added after start).",
            [Target(_quantile(0.9, "router_ext_pod_coldstart_duration_seconds_bucket"), "p90")],
            unit="s",
        ),
        Panel(
            "ext_proc streams and access log",
            "ext_proc streams open now, and Envoy access-log entries received per second "
            "(the router's view of finished requests).",
            [
                Target("sum(router_ext_ext_proc_streams_open)", "streams open"),
                Target(_rate("router_ext_access_log_entries_total"), "access-log entries/s"),
            ],
        ),
        Panel(
            "Replicas: decisions seen in the access log",
            "Entries each replica matched: own decisions, peers' (counted as load and learned), "
            "ended requests whose placement it never saw (a restarted replica warming up); "
            "and entries that changed nothing (duplicate, late, retry, bad_prefix).",
            [
                Target(
                    "sum by (instance, kind, origin) "
                    "(rate(router_ext_replication_entries_total[$__rate_interval]))",
                    "{{instance}} {{kind}} {{origin}}",
                ),
                Target(
                    _rate("router_ext_replication_ignored_total", "reason"), "ignored {{reason}}"
                ),
            ],
            unit="ops",
        ),
        Panel(
            "Config and input errors",
            "Pods-file loads that failed, and requests that still carried a client-sent "
            "x-target-pod (Envoy should strip it): both should stay 0.",
            [
                Target(_rate("router_ext_discovery_errors_total"), "discovery errors/s"),
                Target(_rate("router_ext_client_target_header_total"), "client x-target-pod/s"),
            ],
            unit="reqps",
        ),
    ]


# --- (b) failover --------------------------------------------------------------------------
def failover_panels() -> list[Panel]:
    c = PODS_CLUSTER

    def env(metric: str, by: str = "") -> str:
        return _rate(f"envoy_cluster_{metric}", by, c)

    def ext(metric: str) -> str:
        return _rate(f"envoy_http_ext_proc_{metric}", "", INGRESS)

    return [
        Panel(
            "Healthy pods (Envoy)",
            "Pods Envoy considers healthy (active health check + outlier detection).",
            [Target(f"sum(envoy_cluster_membership_healthy{{{c}}})", "healthy")],
            kind="stat",
            w=6,
            h=4,
        ),
        Panel(
            "Pods ejected now",
            "Pods outlier detection has ejected at this moment.",
            [Target(f"sum(envoy_cluster_outlier_detection_ejections_active{{{c}}})", "ejected")],
            kind="stat",
            w=6,
            h=4,
        ),
        Panel(
            "Retries in range",
            "Upstream retries Envoy made in the selected time range.",
            [Target(f"sum(increase(envoy_cluster_upstream_rq_retry{{{c}}}[$__range]))", "retries")],
            kind="stat",
            w=6,
            h=4,
        ),
        Panel(
            "Fail-open in range",
            "Requests Envoy let through without the router (ext_proc failed, "
            "failure_mode_allow): they were balanced by Envoy's fallback policy.",
            [
                Target(
                    f"sum(increase(envoy_http_ext_proc_failure_mode_allowed{{{INGRESS}}}"
                    "[$__range]))",
                    "fail-open",
                )
            ],
            kind="stat",
            w=6,
            h=4,
        ),
        Panel(
            "Envoy retries",
            "Retries on the pods cluster, retries that then succeeded, retries refused by the "
            "max_retries circuit breaker (overflow) and requests that ran out of retries.",
            [
                Target(env("upstream_rq_retry"), "retries"),
                Target(env("upstream_rq_retry_success"), "retry successes"),
                Target(env("upstream_rq_retry_overflow"), "retry overflow"),
                Target(env("upstream_rq_retry_limit_exceeded"), "retry limit exceeded"),
            ],
            unit="reqps",
        ),
        Panel(
            "Upstream responses by code",
            "Responses from pods by HTTP status (after retries).",
            [Target(env("upstream_rq", "envoy_response_code"), "{{envoy_response_code}}")],
            unit="reqps",
        ),
        Panel(
            "Client-visible 5xx",
            "5xx answered to clients by the ingress listener: the number failover must keep at 0.",
            [
                Target(
                    _rate(
                        "envoy_http_downstream_rq_xx",
                        "",
                        f'{INGRESS},envoy_response_code_class="5"',
                    ),
                    "5xx/s",
                )
            ],
            unit="reqps",
        ),
        Panel(
            "Upstream connect failures",
            "Connections to pods that failed (a dead pod before ejection / the router's "
            "unreachable mark).",
            [Target(env("upstream_cx_connect_fail"), "connect failures/s")],
            unit="ops",
        ),
        Panel(
            "Outlier ejections",
            "Ejections enforced per second and pods ejected now.",
            [
                Target(env("outlier_detection_ejections_enforced_total"), "enforced/s"),
                Target(
                    f"sum(envoy_cluster_outlier_detection_ejections_active{{{c}}})",
                    "active",
                ),
            ],
        ),
        Panel(
            "Active health checks",
            "Health-check failures per second, and healthy vs total members.",
            [
                Target(env("health_check_failure"), "failures/s"),
                Target(f"sum(envoy_cluster_membership_healthy{{{c}}})", "healthy"),
                Target(f"sum(envoy_cluster_membership_total{{{c}}})", "total"),
            ],
        ),
        Panel(
            "ext_proc streams",
            "Streams Envoy opened to the router and streams that failed.",
            [
                Target(ext("streams_started"), "started/s"),
                Target(ext("streams_failed"), "failed/s"),
            ],
            unit="ops",
        ),
        Panel(
            "ext_proc fail-open and time-outs",
            "Requests that went on without the router (failure_mode_allow) and router answers "
            "slower than message_timeout.",
            [
                Target(ext("failure_mode_allowed"), "fail-open/s"),
                Target(ext("message_timeouts"), "message time-outs/s"),
            ],
            unit="reqps",
        ),
        Panel(
            "Streams cut after headers",
            "Responses whose 200 had reached the client when the pod reset or closed the "
            "stream (a pod crash under streaming load), from Envoy's access log. Envoy cannot "
            "retry these: the client saw a truncated stream. Planned shutdowns (SIGTERM with "
            "a grace period) keep this at 0.",
            [
                Target(_rate("router_ext_streams_cut_total", "reason"), "{{reason}}/s"),
                Target(
                    "sum(increase(router_ext_streams_cut_total[$__range]))",
                    "cut in range",
                ),
            ],
            unit="reqps",
        ),
        Panel(
            "Access-log entries rejected",
            "Entries the router ignored: stale (ended > 60 s ago: a replay), future (clock "
            "skew or forgery) or naming a pod discovery does not know. Anything above 0 outside "
            "a scale-in means someone other than Envoy is talking to the access-log port.",
            [Target(_rate("router_ext_access_log_entries_rejected_total", "reason"), "{{reason}}")],
            unit="ops",
        ),
        Panel(
            "Router: unreachable pods",
            "Pods the router keeps out of its answers, and pods it marked unreachable from "
            "Envoy's access log (before the next scrape could).",
            [
                Target('sum(router_ext_pods{state="unreachable"})', "unreachable (router)"),
                Target(
                    _rate("router_ext_access_log_unreachable_marks_total", "pod", POD),
                    "marked from access log: {{pod}}",
                ),
            ],
            w=24,
        ),
    ]


# --- (c) fleet (engines' own metrics) -------------------------------------------------------
def fleet_panels() -> list[Panel]:
    return [
        Panel(
            "Queue (waiting requests) per pod",
            "vllm:num_requests_waiting, summed over data-parallel engines.",
            [Target(f"sum by (pod) (vllm:num_requests_waiting{{{POD}}})", "{{pod}}")],
        ),
        Panel(
            "Running requests per pod",
            "vllm:num_requests_running, summed over data-parallel engines.",
            [Target(f"sum by (pod) (vllm:num_requests_running{{{POD}}})", "{{pod}}")],
        ),
        Panel(
            "KV-cache use per pod",
            "vllm:kv_cache_usage_perc (0..1), averaged over engines.",
            [Target(f"avg by (pod) (vllm:kv_cache_usage_perc{{{POD}}})", "{{pod}}")],
            unit="percentunit",
        ),
        Panel(
            "Time to first token p90 per pod",
            "From the engine's own TTFT histogram.",
            [
                Target(
                    _quantile(0.9, "vllm:time_to_first_token_seconds_bucket", "pod", POD),
                    "{{pod}}",
                )
            ],
            unit="s",
        ),
        Panel(
            "End-to-end latency p90 per pod",
            "From the engine's e2e request latency histogram.",
            [
                Target(
                    _quantile(0.9, "vllm:e2e_request_latency_seconds_bucket", "pod", POD),
                    "{{pod}}",
                )
            ],
            unit="s",
        ),
        Panel(
            "Generated tokens per second per pod",
            "Throughput: vllm:generation_tokens_total rate.",
            [Target(_rate("vllm:generation_tokens_total", "pod", POD), "{{pod}}")],
        ),
        Panel(
            "Finished requests by reason",
            "vllm:request_success_total by pod and finished_reason (stop, length, abort).",
            [
                Target(
                    _rate("vllm:request_success_total", "pod, finished_reason", POD),
                    "{{pod}} {{finished_reason}}",
                )
            ],
            unit="reqps",
        ),
        Panel(
            "Engine /metrics up",
            "Prometheus's own scrape of each pod (1 = up). A killed pod shows 0 here and "
            "unreachable in the router.",
            [Target(f'max by (pod) (up{{job="vllm",{POD}}})', "{{pod}}")],
        ),
    ]


def request_panels() -> list[Panel]:
    """What request-aware routing sees and reads: models, bodies, prefix hits."""
    return [
        Panel(
            "Decisions by model",
            "Routed decisions by the model the request named (models the pool serves) and "
            "the profile asked for. Unknown models are 404s, counted as outcome unknown_model "
            "in the overview's decisions panel.",
            [
                Target(
                    _rate("router_ext_model_decisions_total", "model, strategy"),
                    "{{model}} {{strategy}}",
                )
            ],
            unit="reqps",
        ),
        Panel(
            "Bodies read and routed header-only",
            "Bodies the router asked Envoy for (body-reading profiles only), and requests of "
            "such profiles routed from headers alone, by reason (no_length: chunked upload; "
            "too_large: over routing.max_body_bytes; encoded; not_json, bad_messages: the "
            "pod answers those itself).",
            [
                Target(_rate("router_ext_body_reads_total"), "read"),
                Target(_rate("router_ext_body_skipped_total", "reason"), "skipped {{reason}}"),
            ],
            unit="reqps",
        ),
        Panel(
            "Prefix hit ratio: predicted vs achieved",
            "Predicted: of the prompt blocks the prefix scorer routed, the share the chosen pod "
            "was predicted to hold. Achieved: the pods' own vllm:prefix_cache_hits_total / "
            "queries_total over the routable pods (tokens, since each pod started). A "
            "prediction well above the achieved ratio means the index overestimates the "
            "caches (evictions it does not see).",
            [
                Target(
                    "sum(rate(router_ext_prefix_predicted_blocks_total[$__rate_interval])) / "
                    "clamp_min(sum(rate(router_ext_prefix_routed_blocks_total"
                    "[$__rate_interval])), 1)",
                    "predicted",
                ),
                Target("avg(router_ext_fleet_prefix_cache_hit_ratio)", "achieved (fleet)"),
            ],
            unit="percentunit",
        ),
        Panel(
            "Achieved prefix-cache hit ratio per pod",
            "Each pod's own prefix-cache hits / queries since it started, as the router "
            "scraped them.",
            [Target(f"avg by (pod) (router_ext_pod_prefix_cache_hit_ratio{{{POD}}})", "{{pod}}")],
            unit="percentunit",
        ),
    ]


def _layout(panels: list[Panel]) -> list[dict[str, Any]]:
    """Flow panels left to right, top to bottom, on Grafana's 24-column grid."""
    out = []
    x = y = row_h = 0
    for i, p in enumerate(panels, start=1):
        if x + p.w > GRID_WIDTH:
            x, y, row_h = 0, y + row_h, 0
        out.append(_panel(i, p, {"x": x, "y": y, "w": p.w, "h": p.h}))
        x += p.w
        row_h = max(row_h, p.h)
    return out


def _panel(pid: int, p: Panel, grid: dict[str, int]) -> dict[str, Any]:
    targets = []
    for i, t in enumerate(p.targets):
        tgt: dict[str, Any] = {
            "refId": chr(ord("A") + i),
            "datasource": DS,
            "expr": t.expr,
            "legendFormat": t.legend or "__auto",
            "range": not (t.instant or p.kind == "table"),
            "instant": t.instant or p.kind == "table",
        }
        if p.kind == "table":
            tgt["format"] = "table"
        targets.append(tgt)
    options: dict[str, Any]
    if p.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    elif p.kind == "table":
        options = {"showHeader": True}
    else:
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DS,
        "gridPos": grid,
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
        "options": options,
        "targets": targets,
        **p.extra,
    }


def _variables() -> list[dict[str, Any]]:
    pod_query = "label_values(router_ext_pod_state, pod)"
    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
            "regex": "",
        },
        {
            "name": "pod",
            "label": "Pod",
            "type": "query",
            "datasource": DS,
            "definition": pod_query,
            "query": {"query": pod_query, "refId": "PromVariableQueryEditor-VariableQuery"},
            "current": {},
            "hide": 0,
            "includeAll": True,
            "multi": True,
            "refresh": 2,
            "regex": "",
            "sort": 1,
        },
    ]


def _dashboard(uid: str, title: str, description: str, panels: list[Panel]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["router-ext"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": ["router-ext"],
                "asDropdown": False,
                "title": "router-ext",
            }
        ],
        "templating": {"list": _variables()},
        "panels": _layout(panels),
    }


def build() -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON object."""
    return {
        "router-ext-overview.json": _dashboard(
            "router-ext-overview",
            "router-ext / Router overview",
            "Routing decisions, their latency and degradation, pod states and scrape health.",
            overview_panels(),
        ),
        "router-ext-failover.json": _dashboard(
            "router-ext-failover",
            "router-ext / Failover",
            "Envoy retries, outlier ejections, health checks and ext_proc failures.",
            failover_panels(),
        ),
        "router-ext-fleet.json": _dashboard(
            "router-ext-fleet",
            "router-ext / Fleet",
            "Per-pod queue, running requests, KV-cache use and latency from the engines' own "
            "metrics.",
            fleet_panels(),
        ),
        "router-ext-requests.json": _dashboard(
            "router-ext-requests",
            "router-ext / Request-aware routing",
            "Models, bodies read and prefix-cache hits: what the request-aware profiles see.",
            request_panels(),
        ),
    }


def render() -> dict[str, str]:
    """File name -> exact file text (what is committed)."""
    return {name: json.dumps(d, indent=2) + "\n" for name, d in build().items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--check", action="store_true", help="fail if committed JSON differs")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    files = render()
    if args.check:
        bad = [n for n, text in files.items() if _read(args.out / n) != text]
        extra = sorted(p.name for p in args.out.glob("*.json") if p.name not in files)
        if bad or extra:
            print(f"out of date: {bad}; not generated: {extra}", file=sys.stderr)
            print("run: python grafana/generate.py", file=sys.stderr)
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
        print(args.out / name)
    return 0


def _read(p: Path) -> str | None:
    try:
        return p.read_text()
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
