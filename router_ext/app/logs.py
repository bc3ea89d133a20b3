"""Logging setup: one line per state change or error, plain text or JSON lines.

Routed requests are never logged one per line at the default level: at thousands of requests a
second that would be the incident (BACKGROUND §1B: a flood of "metric not found" warnings).
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("pod", "old_state", "new_state", "reason", "request_id"):
            val = record.__dict__.get(key)
            if val is not None:
                out[key] = val
        if self.worker is not None:
            out["worker"] = self.worker
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "info", json_lines: bool = False, worker: int | None = None) -> None:
    """`worker`: the index of a `serve --workers N` process, on every line (the N workers
    share one terminal or log stream)."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter(worker))
    else:
        tag = "" if worker is None else f"[worker {worker}] "
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would be one line per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
