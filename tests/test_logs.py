"""Structured logs (`--log-json`): one JSON object per line, one line per pod state change.

An operator's log pipeline parses these lines; a flood of lines per request (BACKGROUND §1B)
or a state change that is silent would both be incidents, so both are checked here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from router_ext.app.logs import JsonFormatter, setup_logging
from tests.helpers import fail, lifecycle, ok, pods


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_log_json_lines_parse_and_carry_level_logger_and_time(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("info", json_lines=True)
    log = logging.getLogger("router_ext.test")
    log.info("plain %s", "message")
    log.warning('quotes " and\nnewlines stay inside one line', extra={"pod": "pod-0"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    log.debug("below the level: not written")
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 3  # the traceback and the newline are inside the JSON
    first, second, third = _lines(err)
    assert first["msg"] == "plain message" and first["level"] == "info"
    assert first["logger"] == "router_ext.test"
    assert str(first["ts"]).endswith("Z") and "T" in str(first["ts"])
    assert second["msg"] == 'quotes " and\nnewlines stay inside one line'
    assert second["level"] == "warning" and second["pod"] == "pod-0"
    assert third["level"] == "error" and "ValueError: boom" in str(third["exc"])


def test_each_state_change_is_exactly_one_json_line(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("info", json_lines=True)
    lc, clock = lifecycle()
    p0, p1 = pods(2)
    lc.apply_discovery([p0, p1])  # 2 lines: discovered (cold)
    lc.apply_scrape([ok(p0, clock.t), ok(p1, clock.t)])  # 2 lines: cold -> warm
    for _ in range(5):  # nothing changes: no lines, however many rounds
        clock.advance(0.5)
        lc.apply_scrape([ok(p0, clock.t), ok(p1, clock.t)])
        lc.build_snapshot()
    lc.apply_scrape([ok(p0, clock.t), fail(p1, clock.t, "refused")])  # 1 line: -> unreachable
    clock.advance(3.0)
    lc.build_snapshot()  # p0's metrics are now 3 s old: 1 line, warm -> stale
    lc.build_snapshot()  # still stale: no line
    lines = _lines(capsys.readouterr().err)
    msgs = [str(x["msg"]) for x in lines]
    assert all(x["logger"] == "router_ext.fleet.lifecycle" for x in lines)
    assert len(lines) == 6, msgs
    assert sum("discovered: state cold" in m for m in msgs) == 2
    assert sum("state cold -> warm" in m for m in msgs) == 2
    unreachable = [x for x in lines if "warm -> unreachable" in str(x["msg"])]
    assert len(unreachable) == 1 and "pod-1" in str(unreachable[0]["msg"])
    assert unreachable[0]["level"] == "warning" and "refused" in str(unreachable[0]["msg"])
    stale = [m for m in msgs if "warm -> stale" in m]
    assert len(stale) == 1 and "pod-0" in stale[0] and "3.0s old" in stale[0]


def test_json_formatter_is_the_one_log_json_selects(restore_logging: None) -> None:
    setup_logging("warning", json_lines=True)
    assert isinstance(logging.getLogger().handlers[0].formatter, JsonFormatter)
    setup_logging("warning", json_lines=False)
    assert not isinstance(logging.getLogger().handlers[0].formatter, JsonFormatter)
