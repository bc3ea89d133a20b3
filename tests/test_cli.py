"""The command line as an operator meets it: config errors are clear, envoy-config renders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router_ext.envoy_adapter.envoy_config import validate
from tests.conftest import requires_envoy


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router_ext.app.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ("routing: {default_strategy: fastest}", "unknown strategy 'fastest'; valid: random"),
        ("scrape: {interval_s: -1}", "scrape.interval_s"),
        ("scrape: {intervall_s: 1}", "intervall_s"),
        ("routing: [", "cannot read config"),
    ],
)
def test_bad_config_is_refused_with_the_field_named(
    tmp_path: Path, config: str, needle: str
) -> None:
    (tmp_path / "bad.yaml").write_text(config)
    p = run("serve", "-c", "bad.yaml", cwd=tmp_path)
    assert p.returncode == 2
    assert needle in p.stderr and "Traceback" not in p.stderr


@requires_envoy
def test_envoy_config_renders_a_valid_bootstrap_next_to_its_eds_file(tmp_path: Path) -> None:
    (tmp_path / "pods.yaml").write_text("pods:\n  - {address: 127.0.0.1, port: 8001}\n")
    (tmp_path / "router-ext.yaml").write_text("routing: {default_strategy: least-queue}\n")
    p = run("envoy-config", "-c", "router-ext.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "run" / "envoy"
    assert (out / "envoy.yaml").exists() and (out / "eds" / "pods.yaml").exists()
    assert "127.0.0.1" in (out / "eds" / "pods.yaml").read_text()
    validate(out / "envoy.yaml")


def test_envoy_config_rejects_a_broken_pods_file(tmp_path: Path) -> None:
    (tmp_path / "pods.yaml").write_text("pods: [ {address: ")
    (tmp_path / "router-ext.yaml").write_text("{}\n")
    p = run("envoy-config", "-c", "router-ext.yaml", cwd=tmp_path)
    assert p.returncode == 2 and "not valid YAML" in p.stderr
