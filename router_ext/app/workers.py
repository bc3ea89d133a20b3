"""`router-ext serve --workers N`: one router process per core on one host.

A router decides on one Python event loop, so one process uses at most one core. N workers
are N independent replicas (worker i on router.grpc.port + i; metrics and admin on port + 2i),
each with its own discovery, scraper and snapshot, agreeing through Envoy's access log as any
replicas do (router_ext.routing.ledger). `router-ext envoy-config` with the same config lists
all N in the ext_proc cluster, with one access logger each.

This process only supervises: it creates the shared stream token first (so the workers do not
race to create it), starts the workers, forwards SIGTERM/SIGINT/SIGHUP to them, and restarts
a worker that died on its own (after a growing pause, so a worker that cannot start does not
spin). Each worker drains on its own on SIGTERM, as a single router does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time

from router_ext.config import RouterConfig
from router_ext.envoy_adapter.auth import TokenError, load_or_create_token

log = logging.getLogger("router_ext.app.workers")

#: A worker that lived this long before dying is restarted at once; one that dies sooner waits
#: twice as long each time, up to RESTART_MAX_S.
HEALTHY_RUN_S = 30.0
RESTART_MIN_S = 0.5
RESTART_MAX_S = 10.0


async def supervise(cfg: RouterConfig, config_path: str | None, child_args: list[str]) -> int:
    """Run router.workers workers until a signal stops them; `child_args` are passed on."""
    if cfg.router.auth.mode == "token":
        try:
            load_or_create_token(cfg.token_file)
        except TokenError as e:
            log.error("cannot start workers: %s", e)
            return 2
    stopping = asyncio.Event()
    procs: dict[int, asyncio.subprocess.Process] = {}
    loop = asyncio.get_running_loop()

    def _forward(sig: signal.Signals) -> None:
        if sig is not signal.SIGHUP:
            stopping.set()
        log.info("received %s: forwarding to %d workers", sig.name, len(procs))
        for p in procs.values():
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, _forward, sig)

    async def run(i: int) -> int:
        pause = RESTART_MIN_S
        while True:
            cmd = [sys.executable, "-m", "router_ext.app.cli", "serve", "--worker", str(i)]
            if config_path:
                cmd += ["--config", config_path]
            started = time.monotonic()
            p = procs[i] = await asyncio.create_subprocess_exec(*cmd, *child_args)
            w = cfg.for_worker(i).router
            log.info("worker %d (pid %d) on gRPC %s", i, p.pid, w.grpc.address)
            rc = await p.wait()
            if stopping.is_set():
                return rc
            lived = time.monotonic() - started
            pause = RESTART_MIN_S if lived >= HEALTHY_RUN_S else min(RESTART_MAX_S, pause * 2)
            log.error(
                "worker %d exited with %d after %.1f s: restarting in %.1f s", i, rc, lived, pause
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), pause)
            if stopping.is_set():
                return rc

    codes = await asyncio.gather(*(run(i) for i in range(cfg.router.workers)))
    # Workers that drained normally exit 0; report the first failure otherwise.
    return next((c for c in codes if c), 0)
