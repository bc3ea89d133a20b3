"""Timed fault schedule: `--fault ACTION:TARGET[=VALUE]@SECONDS`.

A scripted schedule makes demos and benchmarks repeatable: the same kill at the same second
in every run. Examples:

    kill:pod-1@5        revive:pod-1@12      hang:pod-2@3       unhang:pod-2@8
    slow:pod-0=3@2      fail5xx:pod-0=0.5@2  draining:pod-1@4   ready:pod-1=0@4
    outage:on@4         outage:off@9         add:pod-9@6        remove:pod-9@20
    term:pod-1=20@5     (planned shutdown, 20 s grace; default 30 s)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from router_ext.harness.sim.fleet import SimFleet
from router_ext.harness.sim.podconfig import DEFAULT_GRACE_S, SimPodConfig

log = logging.getLogger("router_ext.harness.sim")

_POD_ACTIONS = (
    "kill", "term", "revive", "hang", "unhang", "slow", "fail5xx", "draining", "ready", "add",
    "remove",
)  # fmt: skip
ACTIONS = (*_POD_ACTIONS, "outage")
# Value meaning and default per action (None = the action takes no value).
_DEFAULT_VALUE: dict[str, float | None] = {
    "kill": None,
    "term": DEFAULT_GRACE_S,
    "revive": None,
    "hang": None,
    "unhang": None,
    "add": None,
    "remove": None,
    "slow": 2.0,
    "fail5xx": 1.0,
    "draining": 1.0,
    "ready": 1.0,
}
_SPEC_RE = re.compile(
    r"^(?P<action>[a-z0-9]+):(?P<target>[^=@\s]+)(?:=(?P<value>[^@\s]+))?@(?P<at>\S+)$"
)
_ON = {"1": True, "on": True, "true": True, "yes": True}
_ON.update({"0": False, "off": False, "false": False, "no": False})


@dataclass(frozen=True)
class FaultStep:
    at: float  # seconds after the fleet is ready
    action: str
    target: str  # pod name, or "on"/"off" for outage
    value: float | None = None

    def describe(self) -> str:
        v = "" if self.value is None else f"={self.value:g}"
        return f"{self.action}:{self.target}{v}@{self.at:g}"


def parse_fault(text: str) -> FaultStep:
    """Parse one `--fault` spec; ValueError says what is wrong and shows the format."""
    usage = (
        f"bad fault {text!r}: expected ACTION:TARGET[=VALUE]@SECONDS, e.g. 'kill:pod-1@5', "
        f"'slow:pod-0=3@2', 'outage:on@4'; actions: {', '.join(ACTIONS)}"
    )
    m = _SPEC_RE.match(text.strip())
    if m is None:
        raise ValueError(usage)
    action, target, raw_value, raw_at = m.group("action", "target", "value", "at")
    if action not in ACTIONS:
        raise ValueError(
            f"unknown fault action {action!r} in {text!r}; actions: {', '.join(ACTIONS)}"
        )
    try:
        at = float(raw_at)
    except ValueError:
        raise ValueError(f"bad time {raw_at!r} in {text!r}: seconds from start, e.g. @5") from None
    if not at >= 0 or at == float("inf"):
        raise ValueError(f"bad time {raw_at!r} in {text!r}: must be a finite number >= 0")
    if action == "outage":
        if target.lower() not in _ON or raw_value is not None:
            raise ValueError(f"bad fault {text!r}: use 'outage:on@T' or 'outage:off@T'")
        return FaultStep(at, action, "on" if _ON[target.lower()] else "off")
    default = _DEFAULT_VALUE[action]
    if raw_value is None:
        return FaultStep(at, action, target, default)
    if default is None:
        raise ValueError(f"bad fault {text!r}: {action} takes no '=VALUE'")
    if action in ("draining", "ready") and raw_value.lower() in _ON:
        return FaultStep(at, action, target, 1.0 if _ON[raw_value.lower()] else 0.0)
    try:
        value = float(raw_value)
    except ValueError:
        raise ValueError(f"bad value {raw_value!r} in {text!r}: expected a number") from None
    if action == "slow" and not value > 0:
        raise ValueError(f"bad fault {text!r}: slow factor must be > 0")
    if action == "term" and not 0 <= value < float("inf"):
        raise ValueError(f"bad fault {text!r}: term grace must be seconds >= 0")
    if action == "fail5xx" and not 0 <= value <= 1:
        raise ValueError(f"bad fault {text!r}: fail5xx rate must be in 0..1")
    return FaultStep(at, action, target, value)


def fault_arg(text: str) -> FaultStep:
    """argparse `type=`: turns a parse error into a clean `argument --fault: ...` message."""
    try:
        return parse_fault(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_targets(steps: Iterable[FaultStep], initial: Sequence[str]) -> list[str]:
    """Names a schedule refers to that no pod will ever have (typos caught before start)."""
    known = set(initial)
    ordered = sorted(steps, key=lambda s: s.at)
    known |= {s.target for s in ordered if s.action == "add"}
    return [s.describe() for s in ordered if s.action in _POD_ACTIONS and s.target not in known]


async def apply_step(
    fleet: SimFleet, step: FaultStep, new_pod: Callable[[str], SimPodConfig]
) -> None:
    a, t, v = step.action, step.target, step.value
    if a == "kill":
        await fleet.kill(t)
    elif a == "term":
        await fleet.terminate(t, v if v is not None else DEFAULT_GRACE_S)
    elif a == "revive":
        await fleet.revive(t)
    elif a == "hang":
        await fleet.hang(t)
    elif a == "unhang":
        await fleet.unhang(t)
    elif a == "slow":
        fleet.slow(t, v if v is not None else 2.0)
    elif a == "fail5xx":
        fleet.fail5xx(t, v if v is not None else 1.0)
    elif a == "draining":
        fleet.set_draining(t, bool(v))
    elif a == "ready":
        fleet.set_ready(t, bool(v))
    elif a == "outage":
        fleet.set_metrics_outage(t == "on")
    elif a == "add":
        await fleet.add_pod(new_pod(t))
    elif a == "remove":
        await fleet.remove_pod(t)
    else:  # pragma: no cover - parse_fault rejects unknown actions
        raise ValueError(f"unknown action {a!r}")


async def run_schedule(
    fleet: SimFleet,
    steps: Sequence[FaultStep],
    new_pod: Callable[[str], SimPodConfig],
    clock: Callable[[], float] | None = None,
) -> None:
    """Apply steps at their times (relative to the call). A failing step is logged and the
    schedule goes on: one bad step must not cancel the rest of a demo."""
    loop = asyncio.get_running_loop()
    now = clock or loop.time
    t0 = now()
    for step in sorted(steps, key=lambda s: s.at):
        delay = t0 + step.at - now()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await apply_step(fleet, step, new_pod)
        except Exception as e:
            log.error("fault %s failed: %s", step.describe(), e)
