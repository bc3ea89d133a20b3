"""Benchmarks for router-ext: overhead, decision cost, scrape cost, routing quality, a peer.

Run them all with ``python -m benchmarks.run_all`` (``--quick`` for a smoke run); each module
is also runnable alone (``python -m benchmarks.overhead`` ...). Results go to
``benchmarks/results/*.md`` and plots to ``docs/``.
"""
