"""Plugins by name. Adding one: write its module, add one line to `PLUGINS`.

Entries are import paths, resolved when a config names the plugin (start-up, off the hot path),
so this file is the complete list of what `routing.profiles` may use.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from pydantic import ValidationError

from router_ext.routing.plugins import Plugin

#: name -> "module:Class". The name is what `routing.profiles` uses and what labels metrics.
PLUGINS: dict[str, str] = {
    # filters
    "low-queue": "router_ext.routing.filters:LowQueueFilter",
    # scorers
    "queue": "router_ext.routing.scorers:QueueScorer",
    "running": "router_ext.routing.scorers:RunningScorer",
    "requests": "router_ext.routing.scorers:RequestsScorer",
    "kv-cache": "router_ext.routing.scorers:KVCacheScorer",
    "lora-affinity": "router_ext.routing.affinity:LoraAffinityScorer",
    "prefix-cache": "router_ext.routing.affinity:PrefixCacheScorer",
    "session-affinity": "router_ext.routing.affinity:SessionAffinityScorer",
    # pickers
    "max-score": "router_ext.routing.pickers:MaxScorePicker",
    "weighted-random": "router_ext.routing.pickers:WeightedRandomPicker",
    "random": "router_ext.routing.pickers:RandomPicker",
    "round-robin": "router_ext.routing.pickers:RoundRobinPicker",
}


@cache
def plugin_class(name: str) -> type[Plugin]:
    module, _, attr = PLUGINS[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Plugin) and cls.kind):
        raise TypeError(f"registry entry {name!r} is not a Filter, Scorer or Picker: {cls!r}")
    return cls


def names(kind: str) -> list[str]:
    return sorted(n for n in PLUGINS if plugin_class(n).kind == kind)


def check(kind: str, name: str, params: dict[str, Any]) -> None:
    """Raise ValueError saying what is wrong with this plugin reference (config validation)."""
    if name not in PLUGINS or plugin_class(name).kind != kind:
        raise ValueError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(names(kind))}")
    try:
        plugin_class(name).Params.model_validate(params)
    except ValidationError as e:
        raise ValueError(_params_error(e)) from None


def build(kind: str, name: str, params: dict[str, Any]) -> Plugin:
    check(kind, name, params)
    cls = plugin_class(name)
    plugin = cls(cls.Params.model_validate(params))
    plugin.name = name
    return plugin


def _params_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in ("params", *err["loc"]))
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
