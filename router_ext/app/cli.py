"""`router-ext` command line: serve, sim, envoy-config, demo (and operator tools)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from router_ext.app.logs import setup_logging
from router_ext.config import ConfigError, RouterConfig, load_config


def _add_logging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")


def _with_workers(cfg: RouterConfig, workers: int | None) -> RouterConfig:
    """The config with `--workers N` applied (validated as router.workers would be)."""
    if workers is None:
        return cfg
    try:
        router = type(cfg.router).model_validate({**cfg.router.model_dump(), "workers": workers})
    except ValueError as e:
        raise ConfigError(f"--workers {workers}: {e}") from e
    return cfg.model_copy(update={"router": router})


def _cmd_serve(args: argparse.Namespace) -> int:
    from router_ext.app.server import StartupError, serve

    setup_logging(args.log_level, args.log_json, args.worker)
    cfg = _with_workers(load_config(args.config), args.workers)
    if args.worker is not None:
        cfg = cfg.for_worker(args.worker)
    elif cfg.router.workers > 1:
        from router_ext.app.workers import supervise

        child_args = [
            "--workers", str(cfg.router.workers),
            "--log-level", args.log_level,
            *(["--log-json"] if args.log_json else []),
        ]  # fmt: skip
        return asyncio.run(supervise(cfg, args.config, child_args))
    try:
        return asyncio.run(serve(cfg))
    except StartupError as e:
        print(f"router-ext: cannot start: {e}", file=sys.stderr)
        return 2


def _cmd_envoy_config(args: argparse.Namespace) -> int:
    from router_ext.envoy_adapter.envoy_config import (
        envoy_dir,
        render_bootstrap_yaml,
        write_envoy_files,
    )
    from router_ext.fleet.discovery import DiscoveryError, parse_pods

    cfg = _with_workers(load_config(args.config), args.workers)
    if args.stdout:
        sys.stdout.write(render_bootstrap_yaml(cfg))
        return 0
    try:
        pods = parse_pods(cfg.pods_file.read_text(), str(cfg.pods_file))
    except OSError as e:
        print(f"warning: {cfg.pods_file}: {e.strerror}; writing an empty pod set", file=sys.stderr)
        pods = ()
    except DiscoveryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Default: next to the EDS file router-ext rewrites (<base_dir>/run/envoy/).
    out = Path(args.out) if args.out else envoy_dir(cfg)
    for kind, path in write_envoy_files(cfg, pods, out).items():
        print(f"{kind}: {path}")
    return 0


def _cmd_sim(args: argparse.Namespace) -> int:
    from router_ext.harness.sim import run_sim_cli

    setup_logging(args.log_level, args.log_json)
    return run_sim_cli(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from router_ext.harness.demo import run_demo

    setup_logging("warning" if not args.verbose else "info", False)
    return run_demo(args)


#: Sub-commands that run the harness (simulator, demo). Their modules are imported only when one
#: of them runs: `router-ext serve` must not load (and gc.freeze) the test harness.
HARNESS_COMMANDS = {
    "sim": "run simulated vLLM pods (OpenAI API + vLLM /metrics)",
    "demo": "simulator + router + real Envoy, with live traffic",
}


def build_parser(harness: bool = False) -> argparse.ArgumentParser:
    """The `router-ext` parser. With `harness` False, `sim` and `demo` are listed (for
    `--help`) but their arguments, and so their modules, are not loaded."""
    parser = argparse.ArgumentParser(
        prog="router-ext",
        description="Envoy ext_proc router for LLM inference fleets.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the router (ext_proc + health + metrics)")
    p.add_argument("--config", "-c", help="router config YAML (defaults apply if omitted)")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="router processes on this host, one per core (overrides router.workers)",
    )
    p.add_argument(
        "--worker",
        type=int,
        metavar="I",
        help="run only worker I of router.workers (what --workers starts; its ports)",
    )
    _add_logging(p)
    p.set_defaults(fn=_cmd_serve)

    p = sub.add_parser("envoy-config", help="render the Envoy bootstrap from the router config")
    p.add_argument("--config", "-c", help="router config YAML")
    p.add_argument("--out", help="directory for envoy.yaml (default <config dir>/run/envoy)")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="list N router workers (as `serve --workers N` starts them; overrides router.workers)",
    )
    p.add_argument(
        "--stdout",
        action="store_true",
        help="print the bootstrap YAML only, the token redacted (for review and commits)",
    )
    p.set_defaults(fn=_cmd_envoy_config)

    if harness:
        from router_ext.harness.demo import add_demo_arguments
        from router_ext.harness.sim import add_sim_arguments

        p = sub.add_parser("sim", help=HARNESS_COMMANDS["sim"])
        add_sim_arguments(p)
        _add_logging(p)
        p.set_defaults(fn=_cmd_sim)

        p = sub.add_parser("demo", help=HARNESS_COMMANDS["demo"])
        add_demo_arguments(p)
        p.set_defaults(fn=_cmd_demo)
    else:
        for name, text in HARNESS_COMMANDS.items():
            sub.add_parser(name, help=text, add_help=False)
    from router_ext.app.admin_cli import add_admin_commands

    add_admin_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(harness=bool(words) and words[0] in HARNESS_COMMANDS)
    args = parser.parse_args(argv)
    try:
        rc: int = args.fn(args)
    except ConfigError as e:
        print(f"router-ext: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
