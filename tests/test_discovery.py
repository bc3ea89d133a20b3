"""Static discovery: parsing, reload on change, and a broken file keeping the last good set."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from router_ext.fleet.discovery import DiscoveryError, PodsFileDiscovery, parse_pods
from router_ext.fleet.snapshot import Pod


def test_parse_both_address_forms() -> None:
    pods = parse_pods(
        """
pods:
  - {name: a, address: 10.0.0.1, port: 8000, model: m}
  - {address: "10.0.0.2:8001", ready: false}
  - {address: "[::1]:8002", draining: true}
"""
    )
    assert [p.address for p in pods] == ["10.0.0.1:8000", "10.0.0.2:8001", "[::1]:8002"]
    assert pods[0] == Pod("10.0.0.1", 8000, name="a", model="m")
    assert not pods[1].ready
    assert pods[2].draining


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("pods: [", "not valid YAML"),
        ("- just a list", "top level must be a mapping"),
        ("pods:\n  - {address: 10.0.0.1}", "needs a port"),
        ("pods:\n  - {address: 10.0.0.1, port: 70000}", "port"),
        ("pods:\n  - {address: pod-a.svc, port: 80}", "must be an IP address"),
        ("pods:\n  - {address: 10.0.0.1, port: 80, colour: red}", "colour"),
        ("pods:\n  - {address: 10.0.0.1, port: 80}\n  - {address: 10.0.0.1, port: 80}", "twice"),
    ],
)
def test_parse_errors_are_clear(text: str, needle: str) -> None:
    with pytest.raises(DiscoveryError) as e:
        parse_pods(text, "pods.yaml")
    assert needle in str(e.value)
    assert "pods.yaml" in str(e.value)


@pytest.mark.parametrize("text", ["", "   \n\t\n", "# just a comment\n", "{}\n", "other: 1\n"])
def test_empty_or_podless_file_is_a_broken_write_not_an_empty_pool(text: str) -> None:
    # `: > pods.yaml` (a truncated or non-atomic write) once emptied a running fleet.
    with pytest.raises(DiscoveryError, match="pods: \\[\\]"):
        parse_pods(text)


def test_explicitly_empty_pool_is_allowed() -> None:
    assert parse_pods("pods: []") == ()
    assert parse_pods("pods: []\n# scaled to zero on purpose\n") == ()


def test_truncated_file_keeps_last_good_set_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "pods.yaml"
    _write(f, "pods:\n  - {address: 127.0.0.1, port: 9001}\n")
    d = PodsFileDiscovery(f)
    seen: list[int] = []
    d.subscribe(lambda pods: seen.append(len(pods)))
    assert d.check()
    caplog.set_level(logging.ERROR)
    f.write_text("")  # `: > pods.yaml` in place, as an operator's tool might
    assert not d.check()
    assert [p.port for p in d.pods] == [9001]
    assert seen == [1]  # listeners (router, Envoy EDS writer) never saw an empty set
    assert caplog.text.count("file is empty") == 1
    assert "keeping last good set of 1 pods" in caplog.text
    caplog.clear()
    os.utime(f, ns=(5, 5))
    d.check()
    assert caplog.text == ""  # the same broken file again: no second line
    assert d.check(force=True) is False and d.pods  # SIGHUP path: re-read, still kept


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_reload_and_broken_file_keeps_last_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "pods.yaml"
    _write(f, "pods:\n  - {address: 127.0.0.1, port: 9001}\n")
    d = PodsFileDiscovery(f)
    seen: list[int] = []
    d.subscribe(lambda pods: seen.append(len(pods)))
    assert d.check() and d.loaded
    assert [p.port for p in d.pods] == [9001]
    assert not d.check()  # unchanged file: no reload

    _write(f, "pods:\n  - {address: 127.0.0.1, port: 9001}\n  - {address: 127.0.0.1, port: 9002}\n")
    assert d.check()
    assert [p.port for p in d.pods] == [9001, 9002]

    caplog.set_level(logging.ERROR)
    _write(f, "pods: [ {address: 127.0.0.1, port: }")
    assert not d.check()
    assert [p.port for p in d.pods] == [9001, 9002]  # last good set kept
    assert "keeping last good set of 2 pods" in caplog.text
    caplog.clear()
    os.utime(f, ns=(1, 1))  # same broken content seen again: not logged twice
    d.check()
    assert caplog.text == ""

    f.unlink()  # a missing file also keeps the last good set
    assert not d.check()
    assert len(d.pods) == 2

    _write(f, "pods: []\n")
    assert d.check()
    assert d.pods == ()
    assert seen == [1, 2, 0]


def test_missing_file_at_start_is_not_loaded(tmp_path: Path) -> None:
    d = PodsFileDiscovery(tmp_path / "nope.yaml")
    assert not d.check()
    assert not d.loaded
    assert "cannot stat" in d.last_error


def test_model_and_models_are_the_pods_served_set() -> None:
    pods = parse_pods(
        """
pods:
  - {address: 10.0.0.1:8000, model: llama-8b, models: [sql-lora, chat-lora]}
  - {address: 10.0.0.2:8000, models: [" qwen-7b "]}
  - {address: 10.0.0.3:8000, model: llama-8b, models: [llama-8b]}
  - {address: 10.0.0.4:8000}
"""
    )
    assert [p.models for p in pods] == [
        frozenset({"llama-8b", "sql-lora", "chat-lora"}),
        frozenset({"qwen-7b"}),
        frozenset({"llama-8b"}),
        frozenset(),
    ]
    assert pods[0].model == "llama-8b" and pods[1].model == ""


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ("models: sql-lora", "pods.1 (10.0.0.2:8000).models: Input should be a valid list"),
        ("models: [7]", "pods.1 (10.0.0.2:8000).models.0: Input should be a valid string"),
        ("models: [a, '']", "pods.1 (10.0.0.2:8000).models: Value error, model names must not"),
        ("models: {a: 1}", "pods.1 (10.0.0.2:8000).models: Input should be a valid list"),
        # YAML reads these as a float and a bool: a model "1.5" would never match a request.
        ("model: 1.5", "pods.1 (10.0.0.2:8000).model: Input should be a valid string"),
        ("model: yes", "pods.1 (10.0.0.2:8000).model: Input should be a valid string"),
    ],
)
def test_wrong_model_types_name_the_entry(entry: str, needle: str) -> None:
    text = f"pods:\n  - {{address: 10.0.0.1:8000}}\n  - {{address: 10.0.0.2:8000, {entry}}}\n"
    with pytest.raises(DiscoveryError) as e:
        parse_pods(text, "pods.yaml")
    assert str(e.value).startswith("pods.yaml: ")
    assert needle in str(e.value)
