"""Fleet facts: which pods exist, what state each is in, what their engines report.

Imports only `router_ext.config` and itself.
"""
