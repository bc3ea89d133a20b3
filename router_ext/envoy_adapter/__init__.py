"""The Envoy side: ext_proc stream handling, the stream token, the bootstrap and EDS files.

Imports `router_ext.config`, `router_ext.fleet`, `router_ext.routing` and itself.
"""
