"""Plot real Prometheus query results of dashboard panels with matplotlib (for docs).

Not a Grafana screenshot: tests/test_dashboards.py, run with ROUTER_EXT_DASHBOARD_DUMP=FILE,
saves the query_range result of every panel expression from its end-to-end run (cold pod
added, pod killed under load, fleet metrics outage); this script draws a few of them so the
docs can show what the panels show, honestly labelled as such.

    ROUTER_EXT_DASHBOARD_DUMP=/tmp/dump.json pytest tests/test_dashboards.py -k every
    python grafana/render_results.py /tmp/dump.json docs/img/dashboard-queries.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

#: (dashboard uid, panel title) drawn, in order.
PANELS = (
    ("router-ext-overview", "Requests routed per pod"),
    ("router-ext-overview", "Pods per state"),
    ("router-ext-overview", "Degraded decisions by reason"),
    ("router-ext-failover", "Envoy retries"),
    ("router-ext-fleet", "Queue (waiting requests) per pod"),
    ("router-ext-fleet", "KV-cache use per pod"),
)


def _legend(fmt: str, metric: dict[str, str]) -> str:
    if not fmt or fmt == "__auto":
        return ",".join(f"{k}={v}" for k, v in sorted(metric.items())) or "value"
    out = fmt
    for k, v in metric.items():
        out = out.replace("{{" + k + "}}", v)
    return out


def render(dump: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(13, 10), constrained_layout=True)
    t0 = min(
        float(v[0])
        for entry in dump.values()
        for series in entry["result"]
        for v in series["values"]
    )
    for ax, (uid, title) in zip(axes.flat, PANELS, strict=True):
        for key, entry in sorted(dump.items()):
            d_uid, d_title, _ref = key.split("|")
            if (d_uid, d_title) != (uid, title):
                continue
            for series in entry["result"]:
                xs = [float(t) - t0 for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=_legend(entry["legend"], series["metric"]))
            ax.set_ylabel(entry["unit"])
        ax.set_title(f"{title}\n({uid})", fontsize=10)
        ax.set_xlabel("seconds")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle(
        "Dashboard panel queries: real Prometheus results from tests/test_dashboards.py "
        "(matplotlib, not Grafana)",
        fontsize=11,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    render(json.loads(Path(argv[0]).read_text()), Path(argv[1]))
    print(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
