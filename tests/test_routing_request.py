"""Request-aware routing, in process: the model stage, the prompt reader, prefix, session and
LoRA affinity, and the ext_proc body-on-demand exchange (Envoy's side is tested against real
Envoy in test_envoy_body.py and test_e2e_models.py)."""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from router_ext.config import (
    MODEL_HEADER,
    MODEL_NONE,
    MODEL_NOT_JSON,
    SESSION_HEADER,
    RouterConfig,
)
from router_ext.envoy_adapter.extproc import ExtProcServicer
from router_ext.envoy_adapter.modes import BODY_MODE_OVERRIDE
from router_ext.fleet.snapshot import EngineMetrics, Pod, ScrapeResult, Snapshot
from router_ext.routing import Decision, RequestContext
from router_ext.routing.errors import ClientError
from router_ext.routing.pipeline import Trace
from router_ext.routing.prompt import BodySkip, PromptFacts, read_body
from router_ext.routing.router import Router
from router_ext.routing.stats import HotPathStats
from tests.helpers import lifecycle

NO_RAMP = RouterConfig.model_validate({"routing": {"slow_start_s": 0}})


def fleet(
    spec: list[tuple[str, ...]],
    loads: list[tuple[float, float]] | None = None,
    lora: list[tuple[frozenset[str], frozenset[str], int]] | None = None,
) -> tuple[Snapshot, list[Pod]]:
    """Pods serving the given model names (discovery's `models`), warm with the given
    (running, waiting), past slow start (its cap is tested in test_strategies.py)."""
    lc, clk = lifecycle(NO_RAMP)
    ps = [
        Pod("127.0.0.1", 9000 + i, name=f"pod-{i}", model=names[0], models=frozenset(names))
        for i, names in enumerate(spec)
    ]
    lc.apply_discovery(ps)
    results = []
    for i, p in enumerate(ps):
        r, w = loads[i] if loads else (0.0, 0.0)
        run, wait, max_lora = lora[i] if lora else (frozenset(), frozenset(), None)
        results.append(
            ScrapeResult(
                address=p.address,
                ok=True,
                fetched_at=clk.t,
                duration_s=0.001,
                metrics=EngineMetrics(
                    running=r,
                    waiting=w,
                    kv_cache_usage=0.1,
                    lora_running=run,
                    lora_waiting=wait,
                    max_lora=max_lora,
                ),
            )
        )
    lc.apply_scrape(results)
    return lc.build_snapshot(), ps


def router(snap: Snapshot, **routing: Any) -> Router:
    routing.setdefault("slow_start_s", 0)
    r = Router(RouterConfig.model_validate({"routing": routing}), HotPathStats(), seed=3)
    r.publish(snap)
    return r


def req(model: str | None = None, **kw: Any) -> RequestContext:
    ctx = RequestContext(**kw)
    if model is not None:
        ctx.set_model_header(model)
    return ctx


def names(d: object) -> list[str]:
    assert isinstance(d, Decision), d
    return [p.pod.name for p in d.pods]


TWO_MODELS = [("llama",), ("llama",), ("qwen",), ("qwen",), ("qwen", "qwen-lora-0")]


# --- the model stage ------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["least-request", "random", "round-robin", "prefix-aware"])
def test_requests_go_only_to_pods_serving_their_model_primary_and_fallbacks(profile: str) -> None:
    snap, _ = fleet(TWO_MODELS)
    r = router(snap)
    for _ in range(200):
        assert set(names(r.route(req("llama", profile=profile)))) <= {"pod-0", "pod-1"}
        assert set(names(r.route(req("qwen", profile=profile)))) <= {"pod-2", "pod-3", "pod-4"}
        assert names(r.route(req("qwen-lora-0", profile=profile)))[0] == "pod-4"


def test_unknown_model_is_a_404_worded_as_vllm_and_counted() -> None:
    snap, _ = fleet(TWO_MODELS)
    r = router(snap)
    res = r.route(req("gpt-9"))
    assert isinstance(res, ClientError) and res.status == 404
    body = json.loads(res.body())
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["message"] == "The model `gpt-9` does not exist."
    assert r.stats.decisions == {("least-request", "unknown_model"): 1}


def test_missing_model_routes_in_a_single_model_pool_and_is_400_in_a_multi_model_one() -> None:
    single, _ = fleet([("llama",), ("llama",)])
    assert names(router(single).route(req(MODEL_NONE)))
    multi = router(fleet(TWO_MODELS)[0])
    for value, code in ((MODEL_NONE, "model_required"), (MODEL_NOT_JSON, "invalid_request_body")):
        res = multi.route(req(value))
        assert isinstance(res, ClientError) and res.status == 400 and res.code == code
    # No model header at all (a GET, or an Envoy without json_to_metadata): any pod.
    assert names(multi.route(req()))


def test_pods_with_no_model_information_take_models_nobody_is_known_to_serve() -> None:
    lc, clk = lifecycle()
    ps = [Pod("127.0.0.1", 9000, name="known", model="llama", models=frozenset({"llama"}))]
    ps.append(Pod("127.0.0.1", 9001, name="unknown"))
    lc.apply_discovery(ps)
    lc.apply_scrape(
        [
            ScrapeResult(p.address, True, clk.t, 0.001, EngineMetrics(running=0, waiting=0))
            for p in ps
        ]
    )
    r = router(lc.build_snapshot())
    assert names(r.route(req("mistral")))[0] == "unknown"
    assert set(names(r.route(req("llama")))) == {"known"}


# --- the prompt reader ----------------------------------------------------------------------


def chat(*messages: tuple[str, Any], model: str = "m", **extra: Any) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": r, "content": c} for r, c in messages], **extra}
    ).encode()


def test_the_same_prompt_hashes_the_same_whatever_its_json_spelling() -> None:
    system = "You are a careful assistant. " * 40
    a = read_body(chat(("system", system), ("user", "hi")), 64, 64)
    b = read_body(
        json.dumps(
            {
                "max_tokens": 9,
                "messages": [
                    {"content": [{"type": "text", "text": system}], "role": "system"},
                    {"role": "user", "content": "hi"},
                ],
                "model": "m",
            },
            indent=2,
        ).encode(),
        64,
        64,
    )
    assert isinstance(a, PromptFacts) and isinstance(b, PromptFacts)
    assert a.hashes == b.hashes and len(a.hashes) > 10
    assert b.max_tokens == 9 and a.model == "m"
    # Same text as another role, or under another model (adapter): another prefix.
    c = read_body(chat(("user", system), ("user", "hi")), 64, 64)
    d = read_body(chat(("system", system), ("user", "hi"), model="m-lora"), 64, 64)
    assert isinstance(c, PromptFacts) and isinstance(d, PromptFacts)
    assert c.hashes[0] != a.hashes[0] and d.hashes[0] != a.hashes[0]
    # A shared system prompt: the chains agree on its blocks, then diverge.
    e = read_body(chat(("system", system), ("user", "another question " * 20)), 64, 64)
    assert isinstance(e, PromptFacts)
    shared = sum(1 for x, y in zip(a.hashes, e.hashes, strict=False) if x == y)
    assert 10 <= shared < len(e.hashes)


def test_block_count_is_capped_so_a_huge_prompt_costs_what_a_long_one_does() -> None:
    f = read_body(json.dumps({"model": "m", "prompt": "x" * 1_000_000}).encode(), 256, 128)
    assert isinstance(f, PromptFacts) and len(f.hashes) == 128


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"not json", BodySkip.NOT_JSON),
        (b'{"model": "m", "messages": "hi \xff"}', BodySkip.NOT_JSON),  # invalid UTF-8
        (b"[1, 2]", BodySkip.NOT_OBJECT),
        (b'{"model": "m", "messages": "hello"}', BodySkip.BAD_MESSAGES),
        (b'{"model": "m", "messages": [{"role": "user", "content": 7}]}', BodySkip.BAD_MESSAGES),
        (b'{"model": "m"}', BodySkip.BAD_MESSAGES),
        (b'{"model": "m", "prompt": ""}', BodySkip.EMPTY_PROMPT),
    ],
)
def test_bodies_that_say_nothing_usable_are_a_reason_never_an_exception(
    raw: bytes, why: BodySkip
) -> None:
    assert read_body(raw, 64, 64) is why


# --- prefix affinity ------------------------------------------------------------------------


def prompt_ctx(group: int, question: int, profile: str = "prefix-aware") -> RequestContext:
    body = chat(("system", f"group {group} shared document. " * 80), ("user", f"q{question}"))
    facts = read_body(body, 256, 128)
    assert isinstance(facts, PromptFacts)
    ctx = req("llama", profile=profile)
    ctx.prefix_hashes = facts.hashes
    return ctx


def test_a_shared_prefix_stays_on_one_pod_and_groups_spread_over_the_fleet() -> None:
    snap, _ = fleet([("llama",)] * 8)
    r = router(snap, sample_size=2)  # a sample of 2 of 8: the holder is found by its hint
    homes: dict[int, Counter[str]] = {}
    for q in range(40):
        for g in range(4):
            d = r.route(prompt_ctx(g, q))
            homes.setdefault(g, Counter())[names(d)[0]] += 1
            r.completed(d.pods[0].address)  # type: ignore[union-attr]
    for c in homes.values():
        assert c.most_common(1)[0][1] >= 39  # the first request placed it; the rest follow
    assert len({c.most_common(1)[0][0] for c in homes.values()}) >= 3


def test_a_miss_goes_to_the_least_loaded_pod_not_the_first() -> None:
    snap, _ = fleet([("llama",)] * 4, loads=[(6, 0), (5, 0), (0, 0), (4, 0)])
    r = router(snap)
    assert names(r.route(prompt_ctx(1, 1)))[0] == "pod-2"


def _homes(r: Router, sizes: list[int], profile: str) -> list[str]:
    """Send `sizes[g]` prompts of group g, one group after another, each completed at once
    (idle pods: load cannot tell them apart); the pod each group settled on."""
    out = []
    for g, n in enumerate(sizes):
        for q in range(n):
            d = r.route(prompt_ctx(g, q, profile=profile))
            assert isinstance(d, Decision)
            r.completed(d.pods[0].address)
        out.append(names(d)[0])
    return out


BALANCED = {
    "scorers": [
        {"name": "prefix-cache", "weight": 3, "params": {"miss_owner": 0, "miss_balance": 1}},
        {"name": "queue", "weight": 2, "params": {"running_tie_break": True}},
    ]
}


def test_miss_balance_places_new_prefixes_by_the_traffic_each_pod_already_draws() -> None:
    snap, _ = fleet([("llama",)] * 4)
    r = router(snap, profiles={"balanced": BALANCED}, client_selectable=["balanced"])
    # A hot group first: the three groups after it avoid its pod, one per other pod.
    homes = _homes(r, [30, 10, 10, 10], "balanced")
    assert homes[0] not in homes[1:] and len(set(homes[1:])) == 3
    # Equal groups land two per pod, as sglang's smallest-tree rule would place them.
    snap2, _ = fleet([("llama",)] * 4)
    r2 = router(snap2, profiles={"balanced": BALANCED}, client_selectable=["balanced"])
    assert sorted(Counter(_homes(r2, [10] * 8, "balanced")).values()) == [2, 2, 2, 2]


def _placed(weight: float) -> dict[int, str]:
    """Two idle pods; group 0 sends 6 prompts, then groups 1-3 one each: where each settled."""
    prof = {
        "scorers": [
            {
                **BALANCED["scorers"][0],
                "params": {"miss_owner": 0, "miss_balance": 1, "placement_weight": weight},
            },
            BALANCED["scorers"][1],
        ]
    }
    snap, _ = fleet([("llama",)] * 2)
    r = router(snap, profiles={"p": prof}, client_selectable=["p"])
    homes = {}
    for g, n in ((0, 6), (1, 1), (2, 1), (3, 1)):
        for q in range(n):
            d = r.route(prompt_ctx(g, q, profile="p"))
            assert isinstance(d, Decision)
            r.completed(d.pods[0].address)
        homes[g] = names(d)[0]
    return homes


def test_a_prefix_just_placed_counts_as_the_traffic_it_will_bring() -> None:
    # Groups 1 and 2 have sent one prompt each, group 0 six: by prompts alone the pod holding
    # 1 and 2 looks quieter and takes group 3 too (3 groups against 1); counted as the
    # traffic they will bring (placement_weight 8), group 3 goes to group 0's pod.
    by_placement = _placed(8.0)
    assert by_placement[1] == by_placement[2] != by_placement[0]
    assert by_placement[3] == by_placement[0]
    by_prompts = _placed(1.0)  # the control: the pile-on the weight prevents
    assert by_prompts[1] == by_prompts[2] == by_prompts[3] != by_prompts[0]


def test_without_miss_balance_idle_pods_take_new_prefixes_regardless_of_their_traffic() -> None:
    # The control for the test above: load alone cannot see that one pod draws a hot group.
    plain = {
        "scorers": [
            {**BALANCED["scorers"][0], "params": {"miss_owner": 0, "miss_balance": 0}},
            BALANCED["scorers"][1],
        ]
    }
    snap, _ = fleet([("llama",)] * 4)
    r = router(snap, profiles={"plain": plain}, client_selectable=["plain"])
    homes = _homes(r, [30] + [10] * 12, "plain")
    assert homes[0] in homes[1:]


def test_a_hot_prefix_spills_when_its_pod_queues() -> None:
    snap, _ = fleet([("llama",)] * 3)
    r = router(snap)
    home = names(r.route(prompt_ctx(7, 0)))[0]
    assert names(r.route(prompt_ctx(7, 1)))[0] == home
    loads = [(8.0, 9.0) if f"pod-{i}" == home else (1.0, 0.0) for i in range(3)]
    busy, _ = fleet([("llama",)] * 3, loads=loads)
    r.publish(busy)  # same pods (same identities): the index is kept, the home now queues
    assert names(r.route(prompt_ctx(7, 2)))[0] != home


def test_picks_split_a_prefix_only_behind_a_queue() -> None:
    # Between scrapes the router's own picks count as waiting only on a pod the scrape saw
    # queueing: one with free slots (vLLM runs up to max_num_seqs at once) admits them.
    snap, _ = fleet([("llama",)] * 3, loads=[(1.0, 0.0)] * 3)
    r = router(snap)
    home = names(r.route(prompt_ctx(7, 0)))[0]
    for q in range(1, 20):  # never completed: 19 picks in flight on a pod with no queue
        assert names(r.route(prompt_ctx(7, q)))[0] == home
    loads = [(8.0, 1.0) if f"pod-{i}" == home else (1.0, 0.0) for i in range(3)]
    queued, _ = fleet([("llama",)] * 3, loads=loads)
    r.publish(queued)  # a new scrape: its picks restart at 0, and it now has 1 waiting
    scorer = next(s for s, _ in r.profiles["prefix-aware"].scorers if s.name == "prefix-cache")
    spill = int(scorer.params.spill_waiting)  # type: ignore[attr-defined]
    for q in range(20, 20 + spill - 1):  # waiting 1 + picks 0 .. spill - 2: under it
        assert names(r.route(prompt_ctx(7, q)))[0] == home
    assert names(r.route(prompt_ctx(7, 99)))[0] != home  # 1 + (spill - 1) picks: spill


def _spill_profiles() -> dict[str, Any]:
    def spec(relative: bool) -> dict[str, Any]:
        return {
            "scorers": [
                {
                    "name": "prefix-cache",
                    "weight": 3,
                    "params": {"spill_waiting": 4, "spill_relative": relative},
                },
                {"name": "queue", "weight": 2, "params": {"running_tie_break": True}},
            ]
        }

    return {"absolute": spec(False), "relative": spec(True)}


@pytest.mark.parametrize(
    ("others_waiting", "relative_stays"),
    [(6.0, True), (0.0, False)],
    ids=["every-pod-queues", "another-pod-is-free"],
)
def test_relative_spill_keeps_a_prefix_home_when_every_pod_queues(
    others_waiting: float, relative_stays: bool
) -> None:
    # Home queues 9; the others 6 (a burst everywhere) or 0. spill_waiting 4 from zero moves
    # the prefix in both cases; counted above the least-waiting candidate (6 + 4 = 10) it
    # stays while every pod queues, and moves like the absolute rule when one is free.
    profiles = _spill_profiles()
    for k in profiles:
        r = router(fleet([("llama",)] * 3)[0], profiles=profiles, client_selectable=list(profiles))
        home = names(r.route(prompt_ctx(7, 0, k)))[0]
        loads = [(8.0, 9.0 if f"pod-{i}" == home else others_waiting) for i in range(3)]
        r.publish(fleet([("llama",)] * 3, loads=loads)[0])  # same pods: the index is kept
        moved = names(r.route(prompt_ctx(7, 1, k)))[0] != home
        assert moved is not (k == "relative" and relative_stays), (k, loads)


def test_a_pod_that_leaves_takes_its_prefix_entries_with_it() -> None:
    snap, ps = fleet([("llama",)] * 3)
    r = router(snap)
    home = names(r.route(prompt_ctx(3, 0)))[0]
    scorer = next(s for s, _ in r.profiles["prefix-aware"].scorers if s.name == "prefix-cache")
    assert home in scorer._pods  # learned under the pod's identity (its name here)
    lc, clk = lifecycle(NO_RAMP)
    rest = [p for p in ps if p.name != home]
    lc.apply_discovery(rest)
    lc.apply_scrape(
        [ScrapeResult(p.address, True, clk.t, 0.001, EngineMetrics(0, 0, 0.1)) for p in rest]
    )
    r.publish(lc.build_snapshot())
    assert home not in scorer._pods and all(home not in d for d in scorer._holders.values())


def test_without_a_prompt_the_prefix_profile_routes_by_load_without_degrading() -> None:
    snap, _ = fleet([("llama",)] * 3, loads=[(3, 1), (0, 0), (2, 0)])
    r = router(snap)
    d = r.route(req("llama", profile="prefix-aware"))
    assert names(d)[0] == "pod-1" and isinstance(d, Decision) and d.used == "prefix-aware"


# --- session affinity -----------------------------------------------------------------------


def sticky(r: Router, key: str) -> str:
    """The primary for one session request, completed at once (as Envoy's access log would
    report it), so picks do not pile up into a queue that makes the session spill."""
    d = r.route(req("llama", profile="session", session_key=key))
    assert isinstance(d, Decision)
    r.completed(d.pods[0].address)
    return d.pods[0].pod.name


def test_a_session_sticks_across_requests_router_restarts_and_replicas() -> None:
    snap, _ = fleet([("llama",)] * 6)
    first = router(snap, sample_size=2)
    second = router(snap, sample_size=2)  # another replica, or the same one restarted
    for s in range(30):
        key = f"session-{s}"
        a = {sticky(first, key) for _ in range(5)}
        b = sticky(second, key)
        assert a == {b}


def test_only_the_sessions_of_a_pod_that_leaves_move() -> None:
    snap, ps = fleet([("llama",)] * 5)
    r = router(snap)
    keys = [f"s{i}" for i in range(300)]
    before = {k: sticky(r, k) for k in keys}
    assert len(set(before.values())) == 5  # spread over every pod
    gone = "pod-2"
    lc, clk = lifecycle(NO_RAMP)
    rest = [p for p in ps if p.name != gone]
    lc.apply_discovery(rest)
    lc.apply_scrape(
        [ScrapeResult(p.address, True, clk.t, 0.001, EngineMetrics(0, 0, 0.1)) for p in rest]
    )
    r.publish(lc.build_snapshot())
    after = {k: sticky(r, k) for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == gone}


# --- LoRA affinity --------------------------------------------------------------------------


def test_lora_requests_prefer_running_adapter_then_free_slot_then_waiting() -> None:
    spec = [("base", "ad-1", "ad-2", "ad-3")] * 4
    lora = [
        (frozenset({"ad-2", "ad-3"}), frozenset({"ad-1"}), 2),  # full, ad-1 waiting
        (frozenset({"ad-3"}), frozenset(), 2),  # a free slot
        (frozenset({"ad-1"}), frozenset(), 2),  # ad-1 running
        (frozenset({"ad-2", "ad-3"}), frozenset(), 2),  # full, without ad-1
    ]
    snap, _ = fleet(spec, lora=lora)
    order = names(router(snap, fallbacks=3).route(req("ad-1", profile="prefix-aware")))
    assert order == ["pod-2", "pod-1", "pod-0", "pod-3"]


# --- ext_proc: body on demand and /v1/models --------------------------------------------------


def headers_msg(**h: str) -> ep.HttpHeaders:
    return ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in h.items()]
        ),
        end_of_stream=False,
    )


def post(profile: str, length: int | None = 100, **extra: str) -> ep.HttpHeaders:
    h = {":method": "POST", ":path": "/v1/chat/completions", MODEL_HEADER: "llama"}
    h["x-routing-strategy-request"] = profile
    if length is not None:
        h["content-length"] = str(length)
    h.update(extra)
    return headers_msg(**h)


def target(resp: ep.ProcessingResponse, phase: str) -> str:
    common = getattr(resp, phase).response
    got = {h.header.key: h.header.raw_value for h in common.header_mutation.set_headers}
    return got.get("x-target-pod", b"").decode()


def test_only_body_reading_profiles_ask_for_the_body_then_answer_in_the_body_phase() -> None:
    snap, _ = fleet([("llama",)] * 3)
    r = router(snap)
    sv = ExtProcServicer(r)
    resp, pending = sv.headers_phase(post("least-request"))
    assert pending is None and not resp.HasField("mode_override")
    assert target(resp, "request_headers")

    resp, pending = sv.headers_phase(post("prefix-aware"))
    assert pending is not None and resp.mode_override == BODY_MODE_OVERRIDE
    assert target(resp, "request_headers") == ""  # the decision waits for the body
    body = ep.HttpBody(body=chat(("system", "doc " * 300), ("user", "q")), end_of_stream=True)
    answer = sv.handle_request_body(body, pending)
    assert target(answer, "request_body")
    assert r.stats.body_reads == 1 and r.stats.body_bytes == len(body.body)
    assert pending.prefix_hashes and pending.body is not None


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        (post("prefix-aware", length=None), "no_length"),
        (post("prefix-aware", length=(1 << 20) + 1), "too_large"),
        (post("prefix-aware", **{"content-encoding": "gzip"}), "encoded"),
        (
            headers_msg(
                **{
                    ":method": "GET",
                    ":path": "/health",
                    "x-routing-strategy-request": "prefix-aware",
                }
            ),
            "not_completion_path",
        ),
    ],
)
def test_bodies_not_worth_reading_are_routed_from_headers_and_counted(
    msg: ep.HttpHeaders, reason: str
) -> None:
    r = router(fleet([("llama",)] * 2)[0])
    resp, pending = ExtProcServicer(r).headers_phase(msg)
    assert pending is None and not resp.HasField("mode_override")
    assert target(resp, "request_headers")
    assert r.stats.body_skipped[reason] == 1


def test_a_body_that_is_not_json_is_routed_and_counted_not_broken() -> None:
    r = router(fleet([("llama",)] * 2)[0])
    sv = ExtProcServicer(r)
    _, pending = sv.headers_phase(post("prefix-aware"))
    assert pending is not None
    answer = sv.handle_request_body(ep.HttpBody(body=b"{oops", end_of_stream=True), pending)
    assert target(answer, "request_body")
    assert r.stats.body_skipped["not_json"] == 1


def test_v1_models_is_answered_from_the_snapshot() -> None:
    r = router(fleet(TWO_MODELS)[0])
    resp = ExtProcServicer(r).handle_request_headers(
        headers_msg(**{":method": "GET", ":path": "/v1/models"})
    )
    assert resp.immediate_response.status.code == 200
    data = json.loads(resp.immediate_response.body)["data"]
    ids = {m["id"]: m["parent"] for m in data}
    assert set(ids) == {"llama", "qwen", "qwen-lora-0"} and ids["llama"] is None


def test_client_session_keys_are_cut_to_a_bounded_length() -> None:
    r = router(fleet([("llama",)] * 2)[0])
    sv = ExtProcServicer(r)
    ctx = sv.request_context(post("session", **{SESSION_HEADER: "k" * 100_000}))
    assert ctx.session_key is not None and len(ctx.session_key) == 256


def test_explain_shows_each_scorers_score_for_a_given_body() -> None:
    from router_ext.app.admin import explain

    snap, _ = fleet([("llama",)] * 3)
    r = router(snap)
    body = chat(("system", "a long shared document " * 60), ("user", "q"), model="llama")
    home = names(r.route(prompt_ctx_for(r, body)))[0]
    resp = explain(r, [("x-routing-strategy-request", "prefix-aware")], body=body)
    prefix = {
        c.name: next(s.score for s in c.scores if s.scorer == "prefix-cache")
        for c in resp.candidates
        if c.scores
    }
    assert prefix[home] == 1.0 and all(v == 0.0 for n, v in prefix.items() if n != home)
    assert resp.target_pod_header.split(",")[0] == snap.pods[int(home[-1])].address
    # Explain taught the index nothing: a pick it did not make.
    scorer = next(s for s, _ in r.profiles["prefix-aware"].scorers if s.name == "prefix-cache")
    assert list(scorer._pods) == [home]


def prompt_ctx_for(r: Router, body: bytes) -> RequestContext:
    ctx = req(None, profile="prefix-aware")
    facts = r.read_prompt(ctx, body)
    assert isinstance(facts, PromptFacts)
    ctx.use_prompt(facts)
    return ctx


def test_hinted_pods_are_part_of_the_sample_not_added_to_it() -> None:
    """routing.sample_size bounds the candidates a decision scores, hints included: the pods
    holding the prefix take up to half of it and a uniform window the rest."""
    snap, _ = fleet([("llama",)] * 40)
    r = router(snap, sample_size=8)
    last = None
    for q in range(30):  # never completed: holders fill up and spill, so it spreads
        last = r.route(prompt_ctx(1, q))
    assert isinstance(last, Decision)
    trace = Trace()
    d = r.profiles["prefix-aware"].decide(prompt_ctx(1, 99), r.view, random.Random(0), trace)
    assert isinstance(d, Decision)
    assert len(trace.candidates) == 8
    assert last.pods[0] in trace.candidates  # the newest holder is always compared
    assert len({p.index for p in trace.candidates}) == 8  # no pod twice
