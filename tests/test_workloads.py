"""Workload shapes as a benchmark or the demo sends them, and the load generator that sends them.

Shapes are checked on the generated requests themselves (what a pod would receive); the load
generator is checked against a real simulated pod on loopback.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from router_ext.config import SESSION_HEADER
from router_ext.harness.loadgen import (
    LoadSpec,
    breakdown,
    closed_loop,
    open_loop,
    open_loop_schedule,
    run_open_loop,
)
from router_ext.harness.sim import SimFleet, SimPodConfig
from router_ext.harness.workloads import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    WORKLOADS,
    UnknownWorkloadError,
    WorkItem,
    WorkloadParamError,
    make_workload,
)

pytestmark = pytest.mark.timeout(60)


def items(name: str, n: int, seed: int = 1, **params: Any) -> list[WorkItem]:
    w = make_workload(name, **params)
    rng = random.Random(seed)
    return [w.next_item(rng) for _ in range(n)]


def body(item: WorkItem) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(item.body)
    return out


def blocks(text: str, size: int = 64) -> set[str]:
    return {text[i : i + size] for i in range(0, len(text) - size + 1, size)}


# --- shared-prefix ---------------------------------------------------------------------------


def test_shared_prefix_groups_share_their_system_prompt_and_nothing_else() -> None:
    groups, prompts = 6, 4
    got = items(
        "shared-prefix",
        groups * prompts,
        groups=groups,
        prompts=prompts,
        system_tokens=300,
        question_tokens=20,
        output_tokens=7,
    )
    systems: dict[str, set[str]] = {}
    questions = []
    for it in got:
        b = body(it)
        assert it.path == CHAT_PATH and it.max_tokens == b["max_tokens"] == 7
        system, user = b["messages"]
        assert system["role"] == "system" and len(system["content"]) == 300 * 4
        assert user["role"] == "user" and len(user["content"]) == 20 * 4
        systems.setdefault(it.group, set()).add(system["content"])
        questions.append(user["content"])
    # One round: every group exactly `prompts` times, each group with one system prompt.
    assert Counter(it.group for it in got) == {f"group-{g}": prompts for g in range(groups)}
    assert all(len(s) == 1 for s in systems.values())
    texts = [next(iter(s)) for s in systems.values()]
    # No 64-character block (one KV block of text) is shared between two groups' prefixes.
    for i, a in enumerate(texts):
        for b in texts[i + 1 :]:
            assert not blocks(a) & blocks(b)
    assert len(set(questions)) == len(questions)
    # Interleaved, not group after group.
    runs = sum(1 for a, b in itertools.pairwise(got) if a.group != b.group)
    assert runs > groups


def test_shared_prefix_keeps_its_prefixes_across_rounds_and_order_seeds() -> None:
    first = items("shared-prefix", 8, seed=1, groups=2, prompts=2, system_tokens=64)
    other = items("shared-prefix", 8, seed=2, groups=2, prompts=2, system_tokens=64)

    def prefixes(got: list[WorkItem]) -> dict[str, str]:
        return {it.group: body(it)["messages"][0]["content"] for it in got}

    # Two rounds of 4: the same documents whatever the order rng, new questions each time.
    assert prefixes(first) == prefixes(other)
    assert len({body(it)["messages"][1]["content"] for it in first}) == 8


def test_shared_prefix_completions_prompt_opens_with_the_group_prefix() -> None:
    got = items("shared-prefix", 6, groups=3, prompts=2, system_tokens=50, chat=False)
    by_group: dict[str, set[str]] = {}
    for it in got:
        assert it.path == COMPLETIONS_PATH
        by_group.setdefault(it.group, set()).add(body(it)["prompt"][:200])
    assert all(len(p) == 1 for p in by_group.values()) and len(by_group) == 3


def test_shared_prefix_groups_spread_over_models() -> None:
    got = items("shared-prefix", 16, groups=4, prompts=4, models=("m-a", "m-b"))
    model_of = {it.group: it.model for it in got}
    assert all(body(it)["model"] == model_of[it.group] for it in got)
    assert sorted(Counter(model_of.values()).values()) == [2, 2]


# --- multi-turn ------------------------------------------------------------------------------


def test_multi_turn_history_grows_each_turn_under_one_session_header() -> None:
    sessions, turns = 3, 4
    got = items("multi-turn", 2 * sessions * turns, sessions=sessions, turns=turns)
    by_session: dict[str, list[WorkItem]] = {}
    for prev, it in zip([None, *got], got, strict=False):
        assert dict(it.headers) == {SESSION_HEADER: it.group}
        assert prev is None or prev.group != it.group  # a user reads before typing again
        by_session.setdefault(it.group, []).append(it)
    assert len(by_session) >= 2 * sessions - 1  # finished sessions were replaced
    complete = [s for s in by_session.values() if len(s) == turns]
    assert complete
    for session in complete:
        history = [body(it)["messages"] for it in session]
        assert history[0][0]["role"] == "system"
        for before, after in itertools.pairwise(history):
            # Every earlier message is resent verbatim, then the reply and one new user turn.
            assert after[: len(before)] == before
            assert [m["role"] for m in after[len(before) :]] == ["assistant", "user"]
    assert all(len(s) <= turns for s in by_session.values())


# --- multi-model -----------------------------------------------------------------------------


def test_multi_model_mixes_every_base_model_and_adapter() -> None:
    got = items("multi-model", 2000, models=("a", "b"), adapters=2, adapter_share=0.5)
    counts = Counter(it.model for it in got)
    assert set(counts) == {"a", "b", "a-lora-0", "a-lora-1", "b-lora-0", "b-lora-1"}
    adapters = sum(n for m, n in counts.items() if "-lora-" in m)
    assert 0.45 < adapters / len(got) < 0.55
    assert all(body(it)["model"] == it.model == it.group for it in got)


def test_multi_model_without_adapters_sends_base_models_only() -> None:
    got = items("multi-model", 50, models=("a", "b"), adapters=0)
    assert {it.model for it in got} == {"a", "b"}


# --- every workload --------------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKLOADS)
def test_same_seed_same_requests_other_seed_other_requests(name: str) -> None:
    a = items(name, 40, seed=5)
    assert a == items(name, 40, seed=5)
    assert [it.body for it in a] != [it.body for it in items(name, 40, seed=6)]


def test_uniform_is_the_historical_short_prompt() -> None:
    (it,) = items("uniform", 1, max_tokens=9, prompt_words=5)
    b = body(it)
    assert set(b) == {"model", "messages", "max_tokens", "stream"}
    assert b["model"] == "sim-model" and b["max_tokens"] == 9 and b["stream"] is False
    words = b["messages"][0]["content"].split()
    assert len(words) == 5 and set(words) <= {"alpha", "beta", "gamma", "delta"}


def test_bad_names_and_parameters_are_refused_with_what_is_known() -> None:
    with pytest.raises(UnknownWorkloadError, match="known: uniform, shared-prefix"):
        make_workload("shared-prefixx")
    with pytest.raises(WorkloadParamError, match=r"unknown parameter.*grups.*known: groups"):
        make_workload("shared-prefix", grups=3)
    with pytest.raises(WorkloadParamError, match="turns must be"):
        make_workload("multi-turn", turns=0)
    with pytest.raises(WorkloadParamError, match="models"):
        make_workload("uniform", models=())


# --- load generator --------------------------------------------------------------------------


def test_open_loop_schedule_is_fixed_by_its_seed() -> None:
    def plan(seed: int) -> list[tuple[float, WorkItem]]:
        return open_loop_schedule(make_workload("multi-turn"), 50.0, 4.0, seed=seed)

    a = plan(3)
    assert a == plan(3) and a != plan(4)
    offsets = [t for t, _ in a]
    assert offsets == sorted(offsets) and offsets[0] > 0 and offsets[-1] < 4.0
    assert 120 < len(a) < 280  # Poisson around 200


@pytest.fixture
async def pod(tmp_path: Path) -> AsyncIterator[str]:
    fleet = SimFleet(pods_file=tmp_path / "pods.yaml", seed=7)
    await fleet.start([SimPodConfig(name="pod-0", ttft_ms=5, tpot_ms=1, max_running=32)])
    try:
        yield f"http://{fleet.pods['pod-0'].address}"
    finally:
        await fleet.stop()


@pytest.mark.parametrize("stream", [False, True])
async def test_closed_loop_records_tokens_model_group_and_ttft(pod: str, stream: bool) -> None:
    w = make_workload(
        "shared-prefix", groups=3, prompts=2, system_tokens=64, output_tokens=6, stream=stream
    )
    results = await closed_loop(LoadSpec(url=pod, workload=w), 3, total=12)
    assert len(results) == 12 and all(r.ok for r in results), results
    assert all(r.output_tokens == 6 and r.model == "sim-model" for r in results)
    assert Counter(r.group for r in results) == {"group-0": 4, "group-1": 4, "group-2": 4}
    for r in results:
        assert r.ttft_s is not None and 0 < r.ttft_s <= r.latency_s
    if stream:  # first token before the last: 6 tokens at 1 ms each follow it
        assert all(r.ttft_s is not None and r.ttft_s < r.latency_s for r in results)


async def test_open_loop_reports_per_model_and_unknown_models_fail(pod: str) -> None:
    # The pod serves sim-model only: the other model gets vLLM's 404, counted as failed.
    w = make_workload("multi-model", models=("sim-model", "nope"), adapters=0, max_tokens=3)
    results = await run_open_loop(pod + "/ignored/path", w, 40.0, 1.5, seed=2)
    assert results and all(r.status in (200, 404) for r in results)
    rows = breakdown(results, lambda r: r.model)
    assert set(rows) == {"sim-model", "nope"}
    assert rows["nope"]["failed"] == rows["nope"]["requests"] > 0
    assert rows["sim-model"]["failed"] == 0
    assert rows["sim-model"]["output_tokens"] == 3 * rows["sim-model"]["requests"]
    assert rows["sim-model"]["ttft_p50_ms"] is not None and rows["nope"]["ttft_p50_ms"] is None


async def test_a_spec_without_workload_posts_short_prompts_to_its_own_url(pod: str) -> None:
    spec = LoadSpec(url=pod + CHAT_PATH, max_tokens=4, stream=True)
    closed = await closed_loop(spec, 2, total=6)
    opened = await open_loop(spec, 30.0, 0.5, seed=1)
    assert opened and all(r.ok for r in [*closed, *opened])
    # Posted to the URL as given (an item path appended would be a 404), stream counted.
    assert all(r.output_tokens == 4 and r.model == "sim-model" for r in [*closed, *opened])
