"""`python -m router_ext.harness.sim ...`: the simulator without the router's CLI (subprocesses)."""

from __future__ import annotations

import argparse
import logging
import sys

from router_ext.harness.sim.cli import add_sim_arguments, run_sim_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m router_ext.harness.sim",
        description="Simulated vLLM fleet (OpenAI API + vLLM /metrics) with fault injection.",
    )
    add_sim_arguments(parser)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_sim_cli(args)


if __name__ == "__main__":
    sys.exit(main())
