"""Routing: request context, plugin interfaces, registry, profiles and the decision pipeline.

Imports go one way: fleet facts (snapshot) -> routing -> the router and the Envoy adapter.
"""

from router_ext.routing.context import BodyFacts, RequestContext
from router_ext.routing.pipeline import Profile, Trace
from router_ext.routing.plugins import Filter, Picker, PluginParams, Prepared, Scorer
from router_ext.routing.profiles import BUILTIN_PROFILES, build_profiles
from router_ext.routing.view import Decision, NoPodError, PoolView, make_view

__all__ = [
    "BUILTIN_PROFILES",
    "BodyFacts",
    "Decision",
    "Filter",
    "NoPodError",
    "Picker",
    "PluginParams",
    "PoolView",
    "Prepared",
    "Profile",
    "RequestContext",
    "Scorer",
    "Trace",
    "build_profiles",
    "make_view",
]
