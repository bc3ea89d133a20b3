"""Simulated vLLM fleet: many OpenAI-compatible pods with vLLM /metrics in one process.

An honest load model (FIFO queue, engine steps under a token budget shared by chunked prefill
and decode, a prefix cache bounded by KV blocks, LoRA adapters with vLLM's max_lora
scheduling), real vLLM V1 metric names, and process-level faults (kill, hang, slow, 5xx, metrics
outage, cold start) for the demo, the end-to-end tests through Envoy and the benchmarks.

    fleet = SimFleet(pods_file=Path("pods.yaml"), seed=1)
    await fleet.start([SimPodConfig(name="pod-0"), SimPodConfig(name="pod-1", speed=0.5)])
    await fleet.kill("pod-1")
"""

from router_ext.harness.sim.cli import add_sim_arguments, run_sim_cli
from router_ext.harness.sim.control import ControlServer
from router_ext.harness.sim.faults import FaultStep, parse_fault
from router_ext.harness.sim.fleet import SimFleet, UnknownPodError
from router_ext.harness.sim.pod import SimPod, SimStateError
from router_ext.harness.sim.podconfig import SimPodConfig

__all__ = [
    "ControlServer",
    "FaultStep",
    "SimFleet",
    "SimPod",
    "SimPodConfig",
    "SimStateError",
    "UnknownPodError",
    "add_sim_arguments",
    "parse_fault",
    "run_sim_cli",
]
