"""Admin API (router_ext.v1.AdminService): read-only views of a running router.

Served by the routing process on its own listener (`router.admin`, loopback by default), not on
the port Envoy reaches: an operator asks the process that routes rather than a copy of its
state, and nothing that can reach ext_proc can read the fleet through it. Both calls run on
the router's event loop and only read: the snapshot is immutable, and `Explain` runs the
router's own decision on a *copy* of the pick counters, with its own random generator and its
own copies of the profiles' stateful plugins, so asking "where would this go?" never moves a
counter, a round-robin cursor or the routing RNG.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from router_ext.api.v1 import admin_pb2 as pb
from router_ext.api.v1 import admin_pb2_grpc as pb_grpc
from router_ext.fleet.snapshot import ROUTABLE_STATES, EngineMetrics, PodState, PodStatus, Snapshot
from router_ext.routing import RequestContext, Trace
from router_ext.routing.errors import NO_POD, SATURATED, ClientError
from router_ext.routing.prompt import BodySkip
from router_ext.routing.router import DryRun, NotReady, Router

if TYPE_CHECKING:
    from router_ext.app.server import RouterApp

_STATE_TO_PB: dict[PodState, int] = {
    PodState.NOT_READY: pb.POD_STATE_NOT_READY,
    PodState.COLD: pb.POD_STATE_COLD,
    PodState.WARM: pb.POD_STATE_WARM,
    PodState.STALE: pb.POD_STATE_STALE,
    PodState.UNREACHABLE: pb.POD_STATE_UNREACHABLE,
    PodState.DRAINING: pb.POD_STATE_DRAINING,
}

#: Proto enum value -> the state name operators see in logs and metrics ("warm", ...).
STATE_NAMES: dict[int, str] = {v: k.value for k, v in _STATE_TO_PB.items()}


def metrics_pb(m: EngineMetrics | None) -> pb.EngineMetrics | None:
    if m is None:
        return None
    out = pb.EngineMetrics(
        running=m.running,
        waiting=m.waiting,
        engine=m.engine,
        models=sorted(m.models),
        num_engines=m.num_engines,
    )
    if m.kv_cache_usage is not None:
        out.kv_cache_usage = m.kv_cache_usage
    if m.ttft_p90_s is not None:
        out.ttft_p90_seconds = m.ttft_p90_s
    if m.prefix_cache_hit_rate is not None:
        out.prefix_cache_hit_rate = m.prefix_cache_hit_rate
    return out


def build_snapshot_response(
    router: Router,
    reasons: Mapping[str, tuple[str, int]],
    serving: bool,
    now: float | None = None,
) -> pb.GetSnapshotResponse:
    """The pool as published to the hot path, plus lifecycle reasons (address -> reason, n)."""
    now = time.monotonic() if now is None else now
    view = router.view
    snap = view.snapshot
    resp = pb.GetSnapshotResponse(
        version=snap.version,
        snapshot_age_seconds=max(0.0, now - snap.created_at) if snap.version else 0.0,
        ready=snap.ready,
        serving=serving,
        default_strategy=router.default_strategy,
        kv_per_request=snap.kv_per_request,
    )
    med = metrics_pb(snap.warm_median)
    if med is not None:
        resp.warm_median.CopyFrom(med)
    totals = router.stats.picks
    for p in snap.pods:
        reason, changes = reasons.get(p.address, ("", 0))
        item = pb.Pod(
            name=p.pod.name,
            address=p.address,
            model=p.pod.model,
            state=_STATE_TO_PB[p.state],
            reason=reason,
            picks_since_snapshot=view.picks[p.index] if p.index < len(view.picks) else 0,
            picks_total=totals.get(p.address, 0),
            ramp=p.ramp,
            last_error=p.last_error,
            state_changes=changes,
            routable=p.state in ROUTABLE_STATES,
        )
        m = metrics_pb(p.metrics)
        if m is not None:
            item.metrics.CopyFrom(m)
        if p.metrics_at is not None:
            item.metrics_age_seconds = max(0.0, now - p.metrics_at)
        sm = metrics_pb(p.score_metrics)
        if sm is not None:
            item.score_metrics.CopyFrom(sm)
        resp.pods.append(item)
    return resp


def _score_basis(p: PodStatus, snap: Snapshot) -> str:
    if p.score_metrics is not None:
        return "live" if p.state is PodState.WARM else "estimate"
    return "median" if snap.warm_median is not None else "none"


def explain(
    router: Router,
    headers: Iterable[tuple[str, str]],
    reasons: Mapping[str, tuple[str, int]] | None = None,
    rng: random.Random | None = None,
    body: bytes = b"",
) -> pb.ExplainResponse:
    """What `router.route` would answer for these headers, without routing anything.

    Runs the router's own decision (`Router.route` as a dry run: the same checks, the same
    pipeline) on private copies: of the pick counters, of the profiles' stateful plugins (a
    round-robin cursor) and of the random generator. A trace of that run gives what the hot
    path never keeps: each scorer's score per sampled pod, and the pods kept out and by what.
    """
    reasons = reasons or {}
    ctx = RequestContext.from_headers(headers, router.cfg.routing.session_header)
    if body:
        facts = router.read_prompt(ctx, body)
        if not isinstance(facts, BodySkip):
            ctx.use_prompt(facts)
    name = ctx.profile or router.default_strategy
    view = router.view
    snap = view.snapshot
    resp = pb.ExplainResponse(requested_strategy=name, snapshot_version=snap.version)
    for p in snap.pods:
        if p.state not in ROUTABLE_STATES:
            detail = reasons.get(p.address, (p.last_error, 0))[0] or p.last_error
            if p.state is PodState.DRAINING:
                detail = (detail + "; " if detail else "") + "fallback of last resort only"
            resp.exclusions.append(
                pb.Exclusion(
                    name=p.pod.label, address=p.address, filter=p.state.value, detail=detail
                )
            )
        elif p.ramp < 1.0:
            resp.exclusions.append(
                pb.Exclusion(
                    name=p.pod.label,
                    address=p.address,
                    filter="slow_start",
                    detail=f"ramp {p.ramp:.2f}: at most that share of a fair share of picks",
                )
            )
    private = {n: prof.fork() for n, prof in router.selectable.items()}
    trial = dataclasses.replace(view, picks=list(view.picks), started=list(view.started))
    trace = Trace()
    d = router.route(ctx, DryRun(trial, rng or random.Random(), private, trace))
    if isinstance(d, NotReady):
        resp.outcome = pb.EXPLAIN_OUTCOME_NOT_READY
        resp.error = "router has no ready snapshot yet: Envoy's fallback policy balances"
        return resp
    if isinstance(d, ClientError):
        resp.outcome = _ERROR_OUTCOME.get(d.code, pb.EXPLAIN_OUTCOME_BAD_REQUEST)
        resp.error = d.message
        return resp
    resp.strategy_used = d.used
    resp.degraded_reason = d.degraded
    resp.target_pod_header = d.header_value
    resp.outcome = pb.EXPLAIN_OUTCOME_DEGRADED if d.degraded else pb.EXPLAIN_OUTCOME_PICKED
    for filt, p in trace.removed:
        resp.exclusions.append(
            pb.Exclusion(
                name=p.pod.label, address=p.address, filter=filt, detail="removed by the profile"
            )
        )
    position = {p.address: i for i, p in enumerate(d.pods)}
    # Per sampled pod: (shortfall, total, per-scorer detail); only when the scores decided.
    scored: dict[str, tuple[float, float, list[pb.ScorerScore]]] = {}
    if trace.totals is not None and not d.degraded:
        weights = sum(w for _, w, _ in trace.scores)
        for j, p in enumerate(trace.candidates):
            per_scorer = []
            for scorer, w, got in trace.scores:
                item = pb.ScorerScore(scorer=scorer, weight=w)
                x = got[j] if got is not None else None
                if x is not None:
                    item.score = x
                per_scorer.append(item)
            total = max(0.0, trace.totals[j])
            scored[p.address] = (weights - total, total, per_scorer)
    sampled = {p.address for p in trace.candidates}
    # Routable pods plus any draining pod that made it into the answer as a last resort.
    shown = [p for p in snap.pods if p.state in ROUTABLE_STATES or p.address in position]

    def order(p: PodStatus) -> tuple[int, float, int]:
        mine = scored.get(p.address)
        return (0 if mine else 1, mine[0] if mine else 0.0, position.get(p.address, 1 << 20))

    for p in sorted(shown, key=order):
        c = pb.Candidate(
            name=p.pod.label,
            address=p.address,
            state=_STATE_TO_PB[p.state],
            score_basis="none",
            picks_since_snapshot=view.picks[p.index],
            ramp=p.ramp,
            position=position.get(p.address, -1),
        )
        mine = scored.get(p.address)
        if mine is not None:
            c.score, c.total = mine[0], mine[1]
            c.scores.extend(mine[2])
            c.score_basis = _score_basis(p, snap)
        elif scored and p.address not in sampled:
            c.score_basis = "not_sampled"
        resp.candidates.append(c)
    return resp


_ERROR_OUTCOME = {
    SATURATED.code: pb.EXPLAIN_OUTCOME_SATURATED,
    NO_POD.code: pb.EXPLAIN_OUTCOME_NO_POD,
}


class AdminServicer(pb_grpc.AdminServiceServicer):  # type: ignore[misc]
    """router_ext.v1.AdminService over a RouterApp (reads only)."""

    def __init__(self, app: RouterApp) -> None:
        self.app = app

    def _reasons(self) -> dict[str, tuple[str, int]]:
        return {
            pod.address: (reason, changes)
            for pod, _state, reason, changes in self.app.lifecycle.records_view()
        }

    async def GetSnapshot(
        self, request: pb.GetSnapshotRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetSnapshotResponse:
        return build_snapshot_response(self.app.router, self._reasons(), self.app.serving)

    async def Explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExplainResponse:
        headers = [(h.name, h.value) for h in request.headers]
        return explain(self.app.router, headers, self._reasons(), body=request.body)


def add_admin_service(app: RouterApp, server: grpc.aio.Server) -> None:
    """Register the admin API on the admin gRPC server (called by RouterApp)."""
    pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(app), server)
