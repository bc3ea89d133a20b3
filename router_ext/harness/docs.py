"""Generated parts of README.md: the config reference and the Envoy settings table.

Both come from the code (config.py's field descriptions, envoy_config.py's "why" comments), so
the docs cannot drift from what the router and Envoy actually do. A test fails when README.md
is stale; `python -m router_ext.harness.docs` rewrites it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from router_ext.config import (
    MODEL_HEADER,
    PREFIX_HEADER,
    REQUEST_ID_HEADER,
    SERVED_BY_HEADER,
    SESSION_HEADER,
    STRATEGY_REQUEST_HEADER,
    STRATEGY_USED_HEADER,
    TARGET_POD_HEADER,
    Listen,
    RouterConfig,
)
from router_ext.envoy_adapter.envoy_config import ROUTED_TO_HEADER, settings_table_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def _default(v: Any) -> str:
    if isinstance(v, Listen):
        return f"`{v.address}`"
    if isinstance(v, Path):
        return f"`{v}`"
    if v is None:
        return "(unset)"
    if isinstance(v, dict):
        if not v:
            return "(none)"
        return "`" + ", ".join(f"{k}: {x}" for k, x in v.items()) + "`"
    if isinstance(v, tuple):
        return "`" + ", ".join(str(x) for x in v) + "`"
    return f"`{v}`"


def _rows(prefix: str, model: BaseModel) -> list[str]:
    rows = []
    for name, sub in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel) and not isinstance(value, Listen):
            rows.extend(_rows(f"{prefix}.{name}", value))  # nested section: one row a field
            continue
        desc = (sub.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}.{name}` | {_default(value)} | {desc} |")
    return rows


def config_reference_markdown() -> str:
    rows = ["| key | default | what and why |", "|---|---|---|"]
    cfg = RouterConfig()
    for section in RouterConfig.model_fields:
        value = getattr(cfg, section)
        if isinstance(value, BaseModel):
            rows.extend(_rows(section, value))
    return "\n".join(rows)


def headers_markdown() -> str:
    rows = [
        "| header | set by | meaning |",
        "|---|---|---|",
        f"| `{TARGET_POD_HEADER}` | router-ext (request to upstream) | `ip:port[,ip:port…]`, "
        "primary first, then distinct fallbacks; read by Envoy's override_host policy. "
        "Stripped from client requests before any filter runs. |",
        f"| `{STRATEGY_USED_HEADER}` | router-ext; echoed to the client by Envoy | strategy "
        "actually used, with degradation (`least-kv-cache>random`); absent when the router "
        "failed open. |",
        f"| `{STRATEGY_REQUEST_HEADER}` | client | ask for a strategy for this request; an "
        "unknown name gets HTTP 400 naming the valid ones. |",
        f"| `{ROUTED_TO_HEADER}` | Envoy (response) | the upstream host that served it. |",
        f"| `{SERVED_BY_HEADER}` | simulator (response) | the pod name that served it. |",
        f"| `{REQUEST_ID_HEADER}` | Envoy | request id, also in router log lines for errors; "
        "replicas match access-log entries to decisions by it. |",
        f"| `{MODEL_HEADER}` | Envoy (from the body's `model`, json_to_metadata) | the model "
        "the router routes by, without reading the body. Client-sent copies are stripped. |",
        f"| `{SESSION_HEADER}` | client | session key for the `session` profile "
        "(`routing.session_header`). |",
        f"| `{PREFIX_HEADER}` | router-ext (request to upstream), with several replicas | the "
        "prompt's block-hash chain the decision used (`<block_chars>.<base64url>`), logged to "
        "every replica so each learns the placement. Stripped from client requests. |",
    ]
    return "\n".join(rows)


SECTIONS = {
    "config": config_reference_markdown,
    "envoy-settings": settings_table_markdown,
    "headers": headers_markdown,
}


def render_readme(text: str) -> str:
    for name, fn in SECTIONS.items():
        pattern = re.compile(
            rf"(<!-- BEGIN GENERATED: {name} -->\n)(?:.*?\n)?(<!-- END GENERATED: {name} -->)",
            re.S,
        )
        if not pattern.search(text):
            raise ValueError(f"README has no generated section {name!r}")
        body = fn().rstrip("\n")

        def _fill(m: re.Match[str], body: str = body) -> str:
            return m.group(1) + body + "\n" + m.group(2)

        text = pattern.sub(_fill, text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    current = README.read_text()
    new = render_readme(current)
    if "--check" in args:
        if new != current:
            print("README.md generated sections are stale: run python -m router_ext.harness.docs")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
