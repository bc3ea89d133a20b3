"""Test and demo harness: simulated vLLM pods, the sim + router + Envoy stack, the load
generator, the live demo, the Envoy process helper and the README generator.

May import product code; product code never imports this package.
"""
