"""Built-in profiles and the set of profiles a router runs.

The five strategies router-ext always had are profiles like any other, with the same names
and the same answers; the scores behind them now share one scale, so they combine:

    least-request   scorer requests                   (running + waiting + picks since scrape)
    least-queue     scorer queue, running_tie_break   (fewest waiting, then fewest running)
    least-kv-cache  scorer kv-cache                   (KV-cache use + picks x one request's)
    random          picker random
    round-robin     picker round-robin

Scored ones use the default picker, max-score.
"""

from __future__ import annotations

from typing import Any

from router_ext.config import (
    STRATEGY_NAMES,
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
}
assert tuple(BUILTIN_PROFILES) == STRATEGY_NAMES


def build_profiles(cfg: RoutingSection) -> dict[str, Profile]:
    """Every profile by name: the built-ins, then `routing.profiles` (validated by config)."""
    shared: dict[tuple[str, str], Scorer[Any]] = {}
    specs = {**BUILTIN_PROFILES, **cfg.profiles}
    return {name: Profile(name, spec, cfg, shared) for name, spec in specs.items()}
