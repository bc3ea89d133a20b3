"""Several router replicas without a shared store, in process: the ledger that matches Envoy's
access-log entries to decisions, placements learned from a peer, and prefixes nobody holds
placed alike by replicas that never heard of each other. (Envoy delivering every entry to every
replica is tested against real Envoy in test_e2e_replicas.py and test_envoy_config.py.)"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from router_ext.config import PREFIX_HEADER, TARGET_POD_HEADER, RouterConfig
from router_ext.envoy_adapter.extproc import ExtProcServicer
from router_ext.fleet.feedback import FeedbackSink, LogEntry
from router_ext.routing import Decision, RequestContext
from router_ext.routing.ledger import Ignored, Ledger, Origin
from router_ext.routing.prompt import decode_prefix, encode_prefix
from router_ext.routing.router import Router
from router_ext.routing.stats import HotPathStats
from tests.test_routing_request import chat, fleet, names, prompt_ctx, router

A, B = "10.0.0.1:80", "10.0.0.2:80"


class Calls:
    def __init__(self) -> None:
        self.added: list[str] = []
        self.ended: list[str] = []
        self.learned: list[tuple[str, int, tuple[int, ...]]] = []

    def ledger(self, **kw: int) -> Ledger:
        return Ledger(
            self.added.append,
            self.ended.append,
            lambda a, b, h: self.learned.append((a, b, h)),
            **kw,
        )


def placed(rid: str, primary: str = A, prefix: str = "", attempt: int = 1) -> LogEntry:
    return LogEntry(True, rid, primary, prefix, attempt)


def ended(rid: str, primary: str = A, prefix: str = "") -> LogEntry:
    return LogEntry(False, rid, primary, prefix)


PREFIX = encode_prefix(256, (11, 22, 33)).decode()


# --- the ledger -------------------------------------------------------------------------------


def test_own_decision_ends_its_pick_once_even_when_the_entry_comes_twice() -> None:
    c = Calls()
    led = c.ledger()
    led.decided("r1", A)
    led.apply(placed("r1"))  # our own placement, logged back to us: nothing new
    led.apply(ended("r1"))
    led.apply(ended("r1"))  # a resent batch
    assert c.added == [] and c.ended == [A]
    assert led.entries == {("placed", Origin.OWN): 1, ("ended", Origin.OWN): 1}
    assert led.ignored == {Ignored.DUPLICATE: 1}


def test_a_peers_placement_is_counted_and_learned_then_ended() -> None:
    c = Calls()
    led = c.ledger()
    led.apply(placed("p1", B, PREFIX))
    assert c.added == [B] and c.learned == [(B, 256, (11, 22, 33))]
    led.apply(placed("p1", B, PREFIX))  # duplicate: no second pick
    led.apply(placed("p1", B, PREFIX, attempt=2))  # Envoy retried it: same decision
    led.apply(ended("p1", B))
    assert c.added == [B] and c.ended == [B]
    assert led.ignored == {Ignored.DUPLICATE: 1, Ignored.RETRY: 1}
    assert led.peer == {}  # nothing left open


def test_an_end_before_its_placement_counts_nothing_twice() -> None:
    c = Calls()
    led = c.ledger()
    led.apply(ended("p2", B, PREFIX))  # out of order: the end first
    led.apply(placed("p2", B, PREFIX))  # then its placement, late
    assert c.added == [] and c.ended == []  # never added, so never ended
    assert c.learned == [(B, 256, (11, 22, 33))]  # the placement is still worth knowing
    assert led.entries == {("ended", Origin.UNSEEN): 1}
    assert led.ignored == {Ignored.LATE: 1}


def test_decisions_never_seen_are_learned_not_ended() -> None:
    # A replica that restarted gets ends for requests placed before it started.
    c = Calls()
    led = c.ledger()
    for i in range(5):
        led.apply(ended(f"old{i}", A, PREFIX))
    assert c.ended == [] and len(c.learned) == 5
    assert led.entries == {("ended", Origin.UNSEEN): 5}


def test_bad_entries_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    c = Calls()
    led = c.ledger()
    with caplog.at_level(logging.WARNING, "router_ext.routing.ledger"):
        for i in range(3):
            led.apply(placed(f"x{i}", B, "256.not*base64"))
            led.apply(placed("", B))
    assert led.ignored == {Ignored.BAD_PREFIX: 3, Ignored.NO_REQUEST_ID: 3}
    assert c.added == [B] * 3 and c.learned == []  # the pick still counts, the prefix not
    assert len(caplog.records) == 2  # one line per reason


def test_open_decisions_are_bounded() -> None:
    c = Calls()
    led = c.ledger(max_open=100)
    for i in range(1000):
        led.decided(f"own{i}", A)
        led.apply(placed(f"peer{i}", B))
        led.apply(ended(f"gone{i}", B))
    assert len(led.own) <= 100 and len(led.peer) <= 100 and len(led.ended) <= 100
    led.apply(ended("own999", A))  # the newest are kept
    assert c.ended == [A]


@pytest.mark.parametrize(
    "value",
    ["", "256", "256.", "x.AAAAAAAAAAA", "256.AAAA", "256.!!!!", "256." + "A" * 20_000],
)
def test_malformed_prefix_values_decode_to_none(value: str) -> None:
    assert decode_prefix(value) is None


def test_prefix_value_round_trips() -> None:
    chain = (0, 1, 2**64 - 1, 123456789)
    assert decode_prefix(encode_prefix(128, chain).decode()) == (128, chain)


# --- replicas agreeing ------------------------------------------------------------------------


def replicas(n: int, pods: int = 8, **routing: Any) -> list[Router]:
    snap, _ = fleet([("llama",)] * pods)
    out = []
    for seed in range(n):
        r = Router(
            RouterConfig.model_validate(
                {"routing": {"slow_start_s": 0, "sample_size": 2, **routing}}
            ),
            HotPathStats(),
            seed=seed,
        )
        r.publish(snap)
        out.append(r)
    return out


def test_replicas_that_never_heard_of_each_other_place_new_prefixes_alike() -> None:
    # Idle fleet, a sample of 2 of 8 pods, different random generators: only the ring owner
    # of each prompt's first block can make them agree. The built-in prefix-aware also
    # balances a miss by the prompts each pod was sent lately (miss_balance), which replicas
    # agree on only once the access log has told each of the other's: this is the profile
    # without it, placing by load and ring owner.
    ring_only = {
        "scorers": [
            {"name": "prefix-cache", "weight": 3, "params": {"miss_balance": 0}},
            {"name": "queue", "weight": 2, "params": {"running_tie_break": True}},
            {"name": "kv-cache", "weight": 1},
        ]
    }
    a, b = replicas(2, profiles={"ring": ring_only}, client_selectable=["ring"])
    homes = []
    for g in range(24):
        da, db = a.route(prompt_ctx(g, 0, "ring")), b.route(prompt_ctx(g, 1, "ring"))
        assert names(da)[0] == names(db)[0]
        homes.append(names(da)[0])
        a.completed(da.pods[0].address)  # type: ignore[union-attr]
        b.completed(db.pods[0].address)  # type: ignore[union-attr]
    assert len(set(homes)) >= 5  # and the new prefixes spread over the fleet


def test_without_the_ring_replicas_disagree() -> None:
    # The control for the test above: miss_owner 0 places a miss by load alone.
    snap, _ = fleet([("llama",)] * 8)
    spec = {
        "scorers": [
            {"name": "prefix-cache", "weight": 3, "params": {"miss_owner": 0, "miss_balance": 0}},
            {"name": "queue", "weight": 2, "params": {"running_tie_break": True}},
            {"name": "kv-cache", "weight": 1},
        ]
    }
    rs = [router(snap, sample_size=2, profiles={"p": spec}, default_strategy="p") for _ in range(2)]
    rs[1].rng.seed(99)
    agree = sum(
        names(rs[0].route(prompt_ctx(g, 0, "p")))[0] == names(rs[1].route(prompt_ctx(g, 0, "p")))[0]
        for g in range(24)
    )
    assert agree < 12


def test_a_replica_learns_a_peers_placement_from_the_access_log() -> None:
    a, b = replicas(2)
    # Replica a places group 5 on the pod of its choice; spread the load so b's own choice
    # for a miss would differ: b must follow what it learned, not its ring.
    ctx = prompt_ctx(5, 0)
    ctx.request_id = "req-a-1"
    d = a.route(ctx)
    assert isinstance(d, Decision)
    home = d.pods[0]
    value = a.prefix_value(ctx).decode()
    b.ledger.apply(LogEntry(True, "req-a-1", home.address, value))
    assert b.view.picks[home.index] == 1  # b counts a's request as load on that pod
    for q in range(1, 6):
        assert names(b.route(prompt_ctx(5, q)))[0] == home.pod.name
    b.ledger.apply(LogEntry(False, "req-a-1", home.address, value))
    assert b.view.picks[home.index] == 5  # a's pick ended; b's five are still in flight


def test_a_peers_pick_steers_load_away_from_its_pod() -> None:
    # Two replicas with header-only least-request: b hears of a's 3 picks on one pod and
    # stops treating it as idle, so the replicas do not herd onto the same pod.
    a, b = replicas(2, pods=2)
    for i in range(3):
        ctx = RequestContext(profile="least-request", request_id=f"a{i}")
        d = a.route(ctx)
        assert isinstance(d, Decision)
        b.ledger.apply(LogEntry(True, f"a{i}", d.pods[0].address))
    counts = Counter(names(b.route(RequestContext(profile="least-request")))[0] for _ in range(3))
    total_a = Counter(a.view.picks)
    assert sum(b.view.picks) == 6 and max(b.view.picks) - min(b.view.picks) <= 1, (counts, total_a)


# --- the access-log side ----------------------------------------------------------------------


def _entry(kind: int, rid: str, primary: str, prefix: str = "") -> al.HTTPAccessLogEntry:
    e = al.HTTPAccessLogEntry()
    c = e.common_properties
    c.access_log_type = kind
    c.start_time.FromSeconds(1_800_000_000)
    c.upstream_remote_address.socket_address.address = primary.split(":")[0]
    c.upstream_remote_address.socket_address.port_value = int(primary.split(":")[1])
    c.upstream_request_attempt_count = 1
    e.request.request_id = rid
    e.request.request_headers[TARGET_POD_HEADER] = primary
    if prefix:
        e.request.request_headers[PREFIX_HEADER] = prefix
    e.response.response_code.value = 200
    return e


def test_the_sink_turns_upstream_and_downstream_entries_into_placements_and_ends() -> None:
    got: list[LogEntry] = []
    sink = FeedbackSink(lambda a, w: False, got.append, clock=lambda: 1_800_000_000.0)
    T = al.AccessLogType
    sink.apply(
        [
            _entry(T.UpstreamPoolReady, "r1", A, PREFIX),
            _entry(T.UpstreamEnd, "r1", A),  # an attempt's end: the downstream one counts
            _entry(T.DownstreamEnd, "r1", A, PREFIX),
        ]
    )
    assert got == [LogEntry(True, "r1", A, PREFIX), LogEntry(False, "r1", A, PREFIX)]
    assert sink.pods[A].requests == 1  # the placement is not an observed response


def test_clock_skew_beyond_tolerance_is_refused_not_double_counted() -> None:
    got: list[LogEntry] = []
    skewed = FeedbackSink(lambda a, w: False, got.append, clock=lambda: 1_800_000_000.0 - 30)
    e = _entry(al.AccessLogType.UpstreamPoolReady, "r1", A)
    skewed.apply([e, e])
    assert got == [] and skewed.rejected == {"future": 2}


# --- the answer carries the prefix ------------------------------------------------------------


def _body_answer(cfg: RouterConfig) -> tuple[ep.ProcessingResponse, RequestContext]:
    snap, _ = fleet([("m",)] * 3)
    r = Router(cfg, HotPathStats(), seed=1)
    r.publish(snap)
    svc = ExtProcServicer(r)
    hdrs = ep.HttpHeaders()
    for k, v in (
        (":path", "/v1/chat/completions"),
        (":method", "POST"),
        ("content-length", "100"),
        ("x-request-id", "rid-1"),
    ):
        hdrs.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    _, ctx = svc.headers_phase(hdrs)
    assert ctx is not None
    body = chat(("system", "shared document " * 100), ("user", "q"), model="m")
    return svc.handle_request_body(ep.HttpBody(body=body, end_of_stream=True), ctx), ctx


def _set(resp: ep.ProcessingResponse) -> dict[str, bytes]:
    hm = resp.request_body.response.header_mutation
    return {h.header.key: h.header.raw_value for h in hm.set_headers}


def test_with_replicas_the_answer_names_the_prefix_it_used() -> None:
    cfg = RouterConfig.model_validate(
        {
            "routing": {"default_strategy": "prefix-aware", "slow_start_s": 0},
            "router": {"workers": 2},
        }
    )
    from router_ext.envoy_adapter import extproc

    # A single router's answer for the same request fills the shared answer cache first.
    single = cfg.model_copy(update={"router": cfg.router.model_copy(update={"workers": 1})})
    _body_answer(single)
    before = {k: v.SerializeToString() for k, v in extproc._body_response_cache.items()}
    assert before
    resp, ctx = _body_answer(cfg)
    headers = _set(resp)
    assert decode_prefix(headers[PREFIX_HEADER].decode()) == (256, ctx.prefix_hashes)
    assert TARGET_POD_HEADER in headers
    # The cached answers other requests share are untouched.
    after = {k: v.SerializeToString() for k, v in extproc._body_response_cache.items()}
    assert after == before
    assert all(PREFIX_HEADER not in _set(c) for c in extproc._body_response_cache.values())


def test_a_single_router_sends_no_prefix_header() -> None:
    cfg = RouterConfig.model_validate(
        {"routing": {"default_strategy": "prefix-aware", "slow_start_s": 0}}
    )
    resp, _ = _body_answer(cfg)
    assert PREFIX_HEADER not in _set(resp) and TARGET_POD_HEADER in _set(resp)


def test_a_restarted_replica_warms_its_index_from_the_entries_it_receives() -> None:
    # Another replica placed six prompt groups (on pods other than the ring would choose:
    # say the load differed then) before b (re)started. Those requests end after b is up:
    # decisions b never saw, so it ends nothing, but it learns where each group lives.
    b, fresh = replicas(2)
    pods = b.snapshot.routable
    homes = {}
    for g in range(6):
        ring_choice = names(fresh.route(prompt_ctx(g, 0)))[0]
        home = next(p for p in pods if p.pod.name != ring_choice)
        ctx = prompt_ctx(g, 0)
        value = b.prefix_value(ctx).decode()
        b.ledger.apply(LogEntry(False, f"peer-{g}", home.address, value))
        homes[g] = home.pod.name
    assert sum(b.view.picks) == 0
    for g, home in homes.items():
        assert names(b.route(prompt_ctx(g, 1)))[0] == home


def test_an_edited_ring_names_the_same_owners_as_a_fresh_one() -> None:
    # A replica that lived through membership changes edits its ring (departed pods' points
    # stay behind an empty slot); one that started later builds it fresh. They must agree,
    # or replicas would disagree about sessions and new prefixes after churn.
    import bisect
    import random

    from router_ext.routing import affinity as A

    rng = random.Random(5)
    ids = [f"uid-{i}" for i in range(400)]
    pts = A._build_points(tuple(ids), 32)
    for step in range(6):  # churn: a few pods leave and join each time
        for _ in range(3):
            ids.pop(rng.randrange(len(ids)))
        ids += [f"uid-{step}-{j}" for j in range(3)]
        edited = A._edit_points(pts, tuple(ids), 32)
        assert edited is not None  # a few changes are an edit, not a rebuild
        pts = edited
    fresh = A._build_points(tuple(ids), 32)
    assert len(pts.points) > len(fresh.points)  # the departed pods' points are still there

    def owners(p: A._Points, key: int) -> list[str]:
        i = bisect.bisect_left(p.points, key & ~A._POD_MASK)
        out: list[str] = []
        for k in range(len(p.points)):
            ident = p.slots[p.points[(i + k) % len(p.points)] & A._POD_MASK]
            if ident is not None and ident not in out:
                out.append(ident)
                if len(out) == 3:
                    break
        return out

    keys = [rng.getrandbits(64) for _ in range(5000)]
    assert all(owners(pts, k) == owners(fresh, k) for k in keys)
    # Most pods replaced at once: rebuilt, not edited.
    assert A._edit_points(pts, tuple(f"other-{i}" for i in range(400)), 32) is None
