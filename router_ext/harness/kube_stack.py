"""The request path with Kubernetes discovery: simulator, fake API server, router-ext, Envoy.

`KubeStack` is a `Stack` whose router runs `discovery.source: kubernetes` (kind
endpointslices, Service `vllm`) against the fake API server (router_ext/harness/kube_fake.py;
it stands in for a kube-apiserver, which cannot run here). Each sim pod is one EndpointSlice
of that Service: the sim pods share 127.0.0.1 on different ports, and an EndpointSlice's ports
apply to all its endpoints. The fake runs on its own event loop in a thread, so the sync stack
helpers, the demo and async tests can all drive it (`kube(...)`), kill it and bring it back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from router_ext.harness.kube_fake import (
    FakeKubeAPI,
    endpoint_slice,
    slice_endpoint,
    write_kubeconfig,
)
from router_ext.harness.stack import Stack, StackOptions, _merge

SERVICE = "vllm"
T = TypeVar("T")


class FakeKubeThread:
    """A FakeKubeAPI on its own loop in a daemon thread; calls are marshalled onto it."""

    def __init__(self, **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.api = self._await(self._make(kw))
        self.url = self._await(self.api.start())

    async def _make(self, kw: dict[str, Any]) -> FakeKubeAPI:
        return FakeKubeAPI(**kw)  # built on its loop: its queues belong there

    def _await(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run `fn(*args, **kw)` on the fake's loop (its store is not thread-safe)."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args, **kw))
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)

        self._loop.call_soon_threadsafe(run)
        return fut.result(10)

    def kill(self) -> None:
        """Every connection cut and the port closed; the store is kept (etcd would be)."""
        self._await(self.api.stop())

    def revive(self) -> None:
        self._await(self.api.start())

    def close(self) -> None:
        if not self._loop.is_closed():
            self._await(self.api.stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()


class KubeStack(Stack):
    """A Stack discovering its sim pods from the fake API server's EndpointSlices."""

    def __init__(
        self,
        workdir: Path,
        options: StackOptions | None = None,
        *,
        kube: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(workdir, options)
        self.fake = FakeKubeThread(bookmark_interval_s=1.0)
        self.kubeconfig = write_kubeconfig(self.workdir / "kubeconfig", self.fake.url)
        self.uids: dict[str, str] = {}  # pod name -> the UID of its current incarnation
        over: dict[str, Any] = {
            "discovery": {
                "source": "kubernetes",
                "kubernetes": {
                    "kind": "endpointslices",
                    "service": SERVICE,
                    "kubeconfig": str(self.kubeconfig),
                    "watch_timeout_s": 30,
                    "backoff_max_s": 1.0,
                    **(kube or {}),
                },
            }
        }
        self.opts = replace(self.opts, router_overrides=_merge(over, self.opts.router_overrides))

    def _start_sim(self, deadline: float) -> None:
        super()._start_sim(deadline)
        for name, address in self.pods.items():
            self.register(name, address)

    def stop(self) -> None:
        super().stop()
        self.fake.close()

    # --- what the EndpointSlice controller would write ----------------------------------
    def register(
        self,
        name: str,
        address: str,
        *,
        ready: bool = True,
        serving: bool | None = None,
        terminating: bool = False,
        new_uid: bool = False,
    ) -> str:
        """Put pod `name`'s EndpointSlice; a new UID when asked (a new pod at that address)."""
        if new_uid or name not in self.uids:
            self.uids[name] = str(uuid.uuid4())
        host, _, port = address.rpartition(":")
        ep = slice_endpoint(
            host.strip("[]"),
            name,
            self.uids[name],
            ready=ready,
            serving=serving,
            terminating=terminating,
        )
        sl = endpoint_slice(f"{SERVICE}-{name}", SERVICE, int(port), [ep])
        self.fake.call(self.fake.api.put, "endpointslices", sl)
        return self.uids[name]

    def unregister(self, name: str) -> None:
        self.fake.call(self.fake.api.delete, "endpointslices", "default", f"{SERVICE}-{name}")

    def compact(self) -> None:
        """The next watch resume gets 410 Gone (after `drop_watches`)."""
        self.fake.call(self.fake.api.compact)

    def drop_watches(self) -> int:
        return self.fake.call(self.fake.api.drop_watches)
