"""Command line of the simulator (`router-ext sim ...` or `python -m router_ext.harness.sim ...`).

Prints exactly one JSON line to stdout once every pod listens, so a parent process (tests,
demo, benchmarks) can wait for it and learn the ports; all other output is logging on stderr,
one line per fault or state change and never one per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from router_ext.harness.sim.control import ControlServer
from router_ext.harness.sim.faults import FaultStep, check_targets, fault_arg, run_schedule
from router_ext.harness.sim.fleet import SimFleet
from router_ext.harness.sim.podconfig import DEFAULT_GRACE_S, SimPodConfig

log = logging.getLogger("router_ext.harness.sim")


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, e.g. 1,1,0.5; got {text!r}"
        ) from None


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be >= 0, got {text!r}")
    return v


def _name_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected NAME[,NAME...], got {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"model names repeat in {text!r}")
    return names


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def adapter_names(model: str, n: int) -> list[str]:
    """The `--adapters N` names of one base model: every pod of that model can load them."""
    return [f"{model}-lora-{i}" for i in range(n)]


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port {v} out of range 0..65535")
    return v


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's flags to `parser` (the router CLI adds logging flags itself)."""
    g = parser.add_argument_group("simulated fleet")
    g.add_argument("--pods", type=int, default=2, help="number of pods (default 2)")
    g.add_argument(
        "--base-port",
        type=_port,
        default=0,
        help="first pod port; pods use P, P+1, ... (default 0 = ephemeral ports)",
    )
    g.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    g.add_argument("--pods-file", type=Path, help="write the pods YAML here on every change")
    g.add_argument("--names-prefix", default="pod-", help="pod names are PREFIX0, PREFIX1, ...")
    g.add_argument("--model", default="sim-model", help="served model name (default sim-model)")
    g.add_argument(
        "--models",
        type=_name_list,
        help="several base models, NAME[,NAME...]: pods are assigned to them round-robin "
        "(overrides --model)",
    )
    g.add_argument(
        "--adapters",
        type=_count,
        default=0,
        metavar="N",
        help="LoRA adapters per model, named MODEL-lora-0.., loadable by every pod of that "
        "model (default 0: LoRA off)",
    )
    g.add_argument(
        "--max-lora",
        type=int,
        default=SimPodConfig.max_lora,
        metavar="K",
        help=f"adapters one batch may mix, vLLM's --max-loras (default {SimPodConfig.max_lora})",
    )
    g.add_argument(
        "--lora-load-ms",
        type=float,
        default=SimPodConfig.lora_load_ms,
        metavar="MS",
        help="engine stall to load an adapter into a free slot "
        f"(default {SimPodConfig.lora_load_ms:g})",
    )
    g.add_argument(
        "--max-batched-tokens",
        type=int,
        default=SimPodConfig.max_num_batched_tokens,
        metavar="N",
        help="tokens one engine step computes, decode first then prefill chunks, vLLM's "
        f"--max-num-batched-tokens (default {SimPodConfig.max_num_batched_tokens})",
    )
    g.add_argument(
        "--prefill-us-per-token",
        type=float,
        default=SimPodConfig.prefill_us_per_token,
        metavar="US",
        help="engine time per uncached prompt token at speed 1 "
        f"(default {SimPodConfig.prefill_us_per_token:g})",
    )
    g.add_argument("--max-running", type=int, default=8, help="concurrent requests per pod")
    g.add_argument("--ttft-ms", type=float, default=30.0, help="base time to first token")
    g.add_argument("--tpot-ms", type=float, default=5.0, help="base time per output token")
    g.add_argument("--speeds", type=_float_list, help="per-pod speed factors, e.g. 1,1,0.5")
    g.add_argument("--kv-blocks", type=int, default=2048, help="KV-cache blocks per pod")
    g.add_argument("--metrics-delay", type=float, default=0.0, help="cold start seconds (all)")
    g.add_argument("--metrics-delays", type=_float_list, help="per-pod cold start, e.g. 0,10")
    g.add_argument("--metrics-fail-rate", type=float, default=0.0, help="/metrics 500 chance")
    g.add_argument("--engines", type=int, default=1, help="data-parallel engines per pod")
    g.add_argument(
        "--eos-prob", type=float, default=0.0, help="per-token early-stop chance (default 0)"
    )
    g.add_argument(
        "--control-port",
        type=_port,
        default=0,
        help="control API port (default 0 = ephemeral; printed in the ready line)",
    )
    g.add_argument(
        "--fault",
        action="append",
        type=fault_arg,
        default=[],
        metavar="ACTION:TARGET[=VALUE]@SECONDS",
        help="scheduled fault, repeatable: kill:pod-1@5 revive:pod-1@12 hang:pod-2@3 "
        "unhang:pod-2@8 slow:pod-0=3@2 fail5xx:pod-0=0.5@2 draining:pod-1@4 ready:pod-1=0@4 "
        "outage:on@4 outage:off@9 add:pod-9@6 remove:pod-9@20 term:pod-1=20@5",
    )
    g.add_argument("--seed", type=int, help="seed for every random choice (fail rates, EOS)")
    g.add_argument(
        "--grace",
        type=_seconds,
        default=DEFAULT_GRACE_S,
        help="on SIGTERM/SIGINT, as vLLM does: stop accepting at once, let in-flight "
        "requests (streams too) finish for up to this many seconds, then exit "
        f"(default {DEFAULT_GRACE_S:g})",
    )


class _Plan:
    """Pod configs derived from the flags, plus defaults for pods added later."""

    def __init__(self, args: argparse.Namespace) -> None:
        n = args.pods
        if n < 0:
            raise ValueError("--pods must be >= 0")
        speeds: list[float] = args.speeds or []
        delays: list[float] = args.metrics_delays or []
        for flag, values in (("--speeds", speeds), ("--metrics-delays", delays)):
            if len(values) > n:
                raise ValueError(f"{flag} has {len(values)} values for {n} pods")
        self.base_port: int = args.base_port
        self.models: list[str] = args.models or [args.model]
        self.n_adapters: int = args.adapters
        self._next_model = n  # pods added later continue the round-robin
        self.defaults: dict[str, Any] = {
            "max_lora": args.max_lora,
            "lora_load_ms": args.lora_load_ms,
            "max_num_batched_tokens": args.max_batched_tokens,
            "prefill_us_per_token": args.prefill_us_per_token,
            "max_running": args.max_running,
            "ttft_ms": args.ttft_ms,
            "tpot_ms": args.tpot_ms,
            "metrics_delay_s": args.metrics_delay,
            "metrics_fail_rate": args.metrics_fail_rate,
            "kv_blocks": args.kv_blocks,
            "num_engines": args.engines,
            "eos_prob": args.eos_prob,
        }
        self.configs = [
            SimPodConfig(
                **{
                    **self.defaults,
                    **self._served(i),
                    "name": f"{args.names_prefix}{i}",
                    "port": self.base_port + i if self.base_port else 0,
                    "speed": speeds[i] if i < len(speeds) else 1.0,
                    "metrics_delay_s": delays[i] if i < len(delays) else args.metrics_delay,
                }
            )
            for i in range(n)
        ]
        self._next_port = self.base_port + n if self.base_port else 0

    def _served(self, i: int) -> dict[str, Any]:
        model = self.models[i % len(self.models)]
        return {"model": model, "adapters": adapter_names(model, self.n_adapters)}

    def new_pod(self, name: str) -> SimPodConfig:
        return self.from_mapping({"name": name})

    def from_mapping(self, data: dict[str, Any]) -> SimPodConfig:
        """CLI defaults under a control-API body; the next base port if none is given."""
        served: dict[str, Any] = {}
        if "model" not in data:
            served = self._served(self._next_model)
            self._next_model += 1
        elif "adapters" not in data:
            # A pod of a named model serves that model's adapters, as its siblings do.
            served = {"adapters": adapter_names(str(data["model"]), self.n_adapters)}
        merged = {**self.defaults, **served, **data}
        if "port" not in data and self._next_port:
            merged["port"] = self._next_port
            self._next_port += 1
        return SimPodConfig.from_mapping(merged)


def run_sim_cli(args: argparse.Namespace) -> int:
    """Run the fleet until SIGINT/SIGTERM; 0 on a clean stop, 2 on bad flags, 1 if start fails."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        plan = _Plan(args)
    except ValueError as e:
        print(f"sim: {e}", file=sys.stderr)
        return 2
    steps: list[FaultStep] = list(args.fault or [])
    unknown = check_targets(steps, [c.name for c in plan.configs])
    if unknown:
        print(f"sim: --fault names an unknown pod: {', '.join(unknown)}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(args, plan, steps))


async def _serve(args: argparse.Namespace, plan: _Plan, steps: list[FaultStep]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    fleet = SimFleet(host=args.host, pods_file=args.pods_file, seed=args.seed)
    control = ControlServer(fleet, args.host, args.control_port, pod_config=plan.from_mapping)
    schedule: asyncio.Task[None] | None = None
    try:
        try:
            await fleet.start(plan.configs)
            await control.start()
        except OSError as e:
            log.error("simulator failed to start: %s", e)
            return 1
        ready = {
            "event": "sim_ready",
            "pods": {name: pod.address for name, pod in fleet.pods.items()},
            "control": control.address,
        }
        print(json.dumps(ready), flush=True)
        log.info("simulator ready: %d pods, control API on %s", len(fleet.pods), control.address)
        if steps:
            schedule = asyncio.create_task(run_schedule(fleet, steps, plan.new_pod))
        await stop.wait()
        # Like vLLM on SIGTERM: every pod stops accepting now (connects refused, /health
        # fails), in-flight requests finish within --grace, then the process exits.
        in_flight = sum(p.inflight for p in fleet.pods.values())
        log.info(
            "simulator stopping: not accepting; %d requests in flight, grace %gs",
            in_flight,
            args.grace,
        )
        await fleet.stop(grace_s=args.grace)
        cut = sum(p.cut_at_grace for p in fleet.pods.values())
        log.info("simulator stopped: %d requests cut at the grace limit", cut)
        return 0
    finally:
        if schedule is not None:
            schedule.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await schedule
        await control.stop()
        await fleet.stop(grace_s=0.0)  # no-op after a graceful stop; start-up failures
        for sig in signals:
            loop.remove_signal_handler(sig)
