"""Built-in profiles and the set of profiles a router runs.

The five strategies router-ext always had are profiles like any other, with the same names
and the same answers; the scores behind them now share one scale, so they combine:

    least-request   scorer requests                   (running + waiting + picks since scrape)
    least-queue     scorer queue, running_tie_break   (fewest waiting, then fewest running)
    least-kv-cache  scorer kv-cache                   (KV-cache use + picks x one request's)
    random          picker random
    round-robin     picker round-robin

Two more see the request (they route by load alone when it carries nothing to match):

    prefix-aware    prefix-cache 3 + queue 2 + kv-cache 1 + lora-affinity 1  (reads the body)
    session         session-affinity 4 + requests 1 + lora-affinity 1    (session header)

Scored ones use the default picker, max-score. Every profile routes only to pods serving the
request's model (pipeline.pool_for), so model awareness needs no plugin.
"""

from __future__ import annotations

from typing import Any

from router_ext.config import (
    BUILTIN_NAMES,
    PickerSpec,
    ProfileSpec,
    RoutingSection,
    ScorerSpec,
)
from router_ext.routing.pipeline import Profile
from router_ext.routing.plugins import Scorer

BUILTIN_PROFILES: dict[str, ProfileSpec] = {
    "random": ProfileSpec(picker=PickerSpec(name="random")),
    "round-robin": ProfileSpec(picker=PickerSpec(name="round-robin")),
    "least-request": ProfileSpec(scorers=[ScorerSpec(name="requests")]),
    "least-kv-cache": ProfileSpec(scorers=[ScorerSpec(name="kv-cache")]),
    "least-queue": ProfileSpec(
        scorers=[ScorerSpec(name="queue", params={"running_tie_break": True})]
    ),
    # Prefix-cache affinity first, load second: a pod holding the prompt's prefix wins unless
    # it queues (the scorer's spill_waiting) or is clearly busier; a prefix no pod holds goes
    # to the pod sent the fewest prompts lately (miss_balance), then by load and ring owner.
    # LoRA affinity keeps adapter requests on pods with the adapter loaded. Weights and the
    # prefix scorer's defaults measured in benchmarks/prefix_tuning.py (README, Performance).
    "prefix-aware": ProfileSpec(
        scorers=[
            ScorerSpec(name="prefix-cache", weight=3.0),
            ScorerSpec(name="queue", weight=2.0, params={"running_tie_break": True}),
            ScorerSpec(name="kv-cache", weight=1.0),
            ScorerSpec(name="lora-affinity", weight=1.0),
        ]
    ),
    # A session sticks to its pod (its prefix stays warm there) unless that pod queues.
    "session": ProfileSpec(
        scorers=[
            ScorerSpec(name="session-affinity", weight=4.0),
            ScorerSpec(name="requests", weight=1.0),
            ScorerSpec(name="lora-affinity", weight=1.0),
        ]
    ),
}
assert tuple(BUILTIN_PROFILES) == BUILTIN_NAMES


def build_profiles(cfg: RoutingSection) -> dict[str, Profile]:
    """Every profile by name: the built-ins, then `routing.profiles` (validated by config)."""
    shared: dict[tuple[str, str], Scorer[Any]] = {}
    specs = {**BUILTIN_PROFILES, **cfg.profiles}
    return {name: Profile(name, spec, cfg, shared) for name, spec in specs.items()}
