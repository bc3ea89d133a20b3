"""router-ext: an Envoy ext_proc router for LLM inference fleets.

Layout by concern; imports run one way (a test checks it, tests/test_layout.py):

- `router_ext.config`: every port, header name and default, defined once (read by all layers).
- `router_ext.fleet`: facts about the pods: discovery, scraping and engine dialects, lifecycle
  states, the immutable snapshot, Envoy's access-log feedback.
- `router_ext.routing`: the request context, plugin interfaces and registry, built-in
  filters/scorers/pickers, profiles, the one decision pipeline, the router.
- `router_ext.envoy_adapter`: ext_proc stream handling, the stream token, the Envoy bootstrap
  renderer and EDS file writer.
- `router_ext.app`: the process: server wiring, admin API and CLI, telemetry, logs, `router-ext`.
- `router_ext.harness`: simulator, stack, load generator, demo, Envoy process helper, docs
  generator. Never imported by product code; `router-ext sim` and `router-ext demo` load it
  only when run.
"""
