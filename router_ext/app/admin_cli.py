"""`router-ext status` and `router-ext explain`: operator views over the admin API.

Both talk to a running router's gRPC port (router_ext.v1.AdminService), so they show what the
routing process itself believes, not a re-derivation from Prometheus that could disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from router_ext.config import ConfigError, load_config

#: ANSI: cursor home + clear screen (what `top`/`watch` do between frames).
_CLEAR = "\x1b[H\x1b[2J"


def _default_router(config: str | None) -> str:
    try:
        g = load_config(config).router.admin
    except ConfigError:
        g = load_config(None).router.admin
    host = "127.0.0.1" if g.host in ("0.0.0.0", "", "::") else g.host
    return f"{host}:{g.port}"


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", help="router admin address host:port (default: config router.admin)")
    p.add_argument("--config", "-c", help="router config YAML to take the address from")
    p.add_argument("--timeout", type=float, default=3.0, help="per-call deadline in seconds")


def add_admin_commands(sub: Any) -> None:
    """Add `status` and `explain` to the `router-ext` sub-command parser."""
    p = sub.add_parser("status", help="live per-pod table from a running router (admin API)")
    _add_target(p)
    p.add_argument("--once", action="store_true", help="print the table once and exit")
    p.add_argument("--interval", type=float, default=1.0, help="refresh interval in seconds")
    p.set_defaults(fn=_cmd_status)

    p = sub.add_parser("explain", help="what the router would answer for a request, and why")
    _add_target(p)
    p.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="request header as the client would send it (repeatable)",
    )
    p.add_argument(
        "--body",
        metavar="FILE",
        help="request body (JSON) for profiles that read it, e.g. prefix-aware; - = stdin",
    )
    p.add_argument("--json", action="store_true", help="print the ExplainResponse as JSON")
    p.set_defaults(fn=_cmd_explain)


def _stub(address: str) -> tuple[grpc.Channel, Any]:
    from router_ext.api.v1 import admin_pb2_grpc

    ch = grpc.insecure_channel(address)
    return ch, admin_pb2_grpc.AdminServiceStub(ch)


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def render_status(resp: Any) -> str:
    """The `status` table for one GetSnapshotResponse."""
    from router_ext.app.admin import STATE_NAMES

    head = (
        f"snapshot v{resp.version}  age {resp.snapshot_age_seconds:.2f}s  "
        f"{'SERVING' if resp.serving else 'NOT_SERVING'}  default strategy "
        f"{resp.default_strategy}  pods {len(resp.pods)}"
    )
    cols = ("POD", "ADDRESS", "STATE", "REASON", "RUN", "WAIT", "KV", "AGE", "PICKS", "RAMP")
    rows: list[tuple[str, ...]] = [cols]
    for p in resp.pods:
        m = p.metrics if p.HasField("metrics") else None
        kv = m.kv_cache_usage if m is not None and m.HasField("kv_cache_usage") else None
        age = p.metrics_age_seconds if p.HasField("metrics_age_seconds") else None
        reason = p.reason if len(p.reason) <= 40 else p.reason[:37] + "..."
        rows.append(
            (
                p.name or p.address,
                p.address,
                STATE_NAMES.get(p.state, "?"),
                reason,
                _fmt(m.running if m else None),
                _fmt(m.waiting if m else None),
                "-" if kv is None else f"{kv * 100:.0f}%",
                "-" if age is None else f"{age:.1f}s",
                f"{p.picks_total}+{p.picks_since_snapshot}",
                f"{p.ramp:.2f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [head, ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append("")
    lines.append("PICKS = total primary picks + picks since the last scrape")
    return "\n".join(lines)


def render_explain(resp: Any) -> str:
    """Human-readable ExplainResponse: the answer, who is primary, each pod's score."""
    from router_ext.api.v1 import admin_pb2 as pb
    from router_ext.app.admin import STATE_NAMES

    outcome = pb.ExplainOutcome.Name(resp.outcome).removeprefix("EXPLAIN_OUTCOME_").lower()
    lines = [
        f"strategy requested: {resp.requested_strategy}   used: {resp.strategy_used or '-'}"
        f"   outcome: {outcome}   snapshot v{resp.snapshot_version}"
    ]
    if resp.degraded_reason:
        lines.append(f"degraded: {resp.degraded_reason}")
    if resp.error:
        lines.append(f"error: {resp.error}")
    if resp.target_pod_header:
        lines.append(f"x-target-pod: {resp.target_pod_header}")
    primary = next((c for c in resp.candidates if c.position == 0), None)
    if primary is not None:
        lines.append(f"primary: {primary.name} ({primary.address})")
    if resp.candidates:
        lines.append("")
        lines.append("candidates (lower score is better):")
        rows: list[tuple[str, ...]] = [
            ("ROLE", "POD", "ADDRESS", "STATE", "SCORE", "BASIS", "PICKS", "RAMP")
        ]
        for c in resp.candidates:
            role = (
                "primary"
                if c.position == 0
                else (f"fallback{c.position}" if c.position > 0 else "-")
            )
            rows.append(
                (
                    role,
                    c.name,
                    c.address,
                    STATE_NAMES.get(c.state, "?"),
                    f"{c.score:g}" if c.HasField("score") else "-",
                    c.score_basis,
                    str(c.picks_since_snapshot),
                    f"{c.ramp:.2f}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += [
            "  " + "  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        ]
    if resp.exclusions:
        lines.append("")
        lines.append("filtered out of the primary choice:")
        for e in resp.exclusions:
            lines.append(f"  {e.name} ({e.address}): {e.filter}: {e.detail}")
    return "\n".join(lines)


def _parse_headers(raw: list[str]) -> list[tuple[str, str]]:
    out = []
    for h in raw:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"header {h!r} is not 'name: value'")
        out.append((name.strip().lower(), value.strip()))
    return out


def _cmd_status(args: argparse.Namespace) -> int:
    from router_ext.api.v1 import admin_pb2 as pb

    address = args.router or _default_router(args.config)
    ch, stub = _stub(address)
    try:
        while True:
            try:
                resp = stub.GetSnapshot(pb.GetSnapshotRequest(), timeout=args.timeout)
                frame = render_status(resp)
            except grpc.RpcError as e:
                if args.once:
                    print(f"router-ext status: {address}: {e.code().name}", file=sys.stderr)
                    return 1
                frame = f"{address}: {e.code().name} ({e.details()}); retrying"
            if args.once:
                print(frame)
                return 0
            sys.stdout.write(_CLEAR + time.strftime("%H:%M:%S ") + address + "\n" + frame + "\n")
            sys.stdout.flush()
            time.sleep(max(0.1, args.interval))
    except KeyboardInterrupt:
        return 0
    finally:
        ch.close()


def _cmd_explain(args: argparse.Namespace) -> int:
    from router_ext.api.v1 import admin_pb2 as pb

    try:
        headers = _parse_headers(args.header)
    except ValueError as e:
        print(f"router-ext explain: {e}", file=sys.stderr)
        return 2
    body = b""
    if args.body:
        try:
            body = sys.stdin.buffer.read() if args.body == "-" else Path(args.body).read_bytes()
        except OSError as e:
            print(f"router-ext explain: {args.body}: {e.strerror or e}", file=sys.stderr)
            return 2
    address = args.router or _default_router(args.config)
    ch, stub = _stub(address)
    try:
        req = pb.ExplainRequest(headers=[pb.Header(name=n, value=v) for n, v in headers], body=body)
        resp = stub.Explain(req, timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"router-ext explain: {address}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        ch.close()
    if args.json:
        doc = MessageToDict(
            resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        print(json.dumps(doc, indent=2))
    else:
        print(render_explain(resp))
    return 0
