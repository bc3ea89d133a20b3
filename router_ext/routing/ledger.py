"""Every replica's placements and completions, from Envoy's access log, without a shared store.

Several router replicas behind one Envoy each answer a share of the requests. Envoy logs every
request to every replica (one access logger per replica, rendered by `envoy-config`): an entry
when the upstream stream is set up (`placed`: the decision's x-target-pod and prefix) and one
when the request ends (`ended`). So each replica can count every replica's picks as in-flight
load, end them when they finish, and learn where every prompt prefix went.

Entries are matched by Envoy's request id, never by clocks:

    placed, own decision          nothing to do (counted when decided)
    placed, a peer's              +1 in-flight on its primary; learn its prefix placement
    ended, own or a peer's open   -1 in-flight, once
    ended, never seen placed      learn the placement only (a replica that just started, or a
                                  lost placed entry): nothing was added, nothing is ended
    repeated / after its end      ignored and counted (duplicate, late): no double counting

Both maps are bounded: an entry whose end never arrives (Envoy's logger dropped it) is
forgotten after `max_open` newer ones, and its pick is anyway replaced by the pod's next scrape.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

from router_ext.fleet.feedback import LogEntry
from router_ext.routing.prompt import decode_prefix

log = logging.getLogger("router_ext.routing.ledger")

#: Open decisions (own, peers') and ended request ids remembered. 64k at ~1 KB/s of entries
#: is a minute of traffic at 1,000 req/s, far more than a request is in flight.
MAX_OPEN = 65_536


class Origin(enum.Enum):
    """Whose decision an access-log entry reports."""

    OWN = "own"
    PEER = "peer"
    UNSEEN = "unseen"  # ended, and its placement never reached this replica


class Ignored(enum.Enum):
    """Why an entry changed nothing."""

    DUPLICATE = "duplicate"  # the same entry again (a resent batch)
    LATE = "late"  # a placement that arrived after the request's end
    RETRY = "retry"  # a later attempt of a placed request (same decision, same primary)
    NO_REQUEST_ID = "no_request_id"  # cannot be matched, so cannot be counted safely
    BAD_PREFIX = "bad_prefix"  # a malformed prefix value (the rest of the entry still counts)


def _trim(d: dict[str, str] | dict[str, None], keep: int) -> None:
    """Drop the oldest entries down to `keep` (insertion order), amortised O(1) per insert."""
    for k in list(islice(d, len(d) - keep)):
        del d[k]


@dataclass
class Ledger:
    """Matches access-log entries to decisions. The callbacks are the router's."""

    add_pick: Callable[[str], None]
    end_pick: Callable[[str], None]
    learn: Callable[[str, int, tuple[int, ...]], None]
    max_open: int = MAX_OPEN
    own: dict[str, str] = field(default_factory=dict)  # request id -> primary
    peer: dict[str, str] = field(default_factory=dict)
    ended: dict[str, None] = field(default_factory=dict)
    entries: dict[tuple[str, Origin], int] = field(default_factory=dict)
    ignored: dict[Ignored, int] = field(default_factory=dict)
    _logged: set[Ignored] = field(default_factory=set)

    # --- hot path ---------------------------------------------------------------------------
    def decided(self, request_id: str, primary: str) -> None:
        """This replica answered `request_id` with `primary` first (one dict insert)."""
        own = self.own
        own[request_id] = primary
        if len(own) > self.max_open:
            _trim(own, self.max_open // 2)

    # --- access-log stream --------------------------------------------------------------------
    def _count(self, kind: str, origin: Origin) -> None:
        key = (kind, origin)
        self.entries[key] = self.entries.get(key, 0) + 1

    def _ignore(self, why: Ignored, detail: str) -> None:
        self.ignored[why] = self.ignored.get(why, 0) + 1
        if why not in self._logged and why is not Ignored.RETRY:
            self._logged.add(why)
            log.warning(
                "access-log entry not counted (%s): %s; further ones are only counted in "
                "router_ext_replication_ignored_total",
                why.value,
                detail,
            )

    def _learn(self, e: LogEntry) -> None:
        if not e.prefix or not e.primary:
            return
        decoded = decode_prefix(e.prefix)
        if decoded is None:
            self._ignore(Ignored.BAD_PREFIX, f"prefix value {e.prefix[:40]!r}")
            return
        self.learn(e.primary, *decoded)

    def apply(self, e: LogEntry) -> None:
        rid = e.request_id
        if not rid:
            self._ignore(Ignored.NO_REQUEST_ID, "an entry without x-request-id")
            return
        if e.placed:
            self._placed(e, rid)
        else:
            self._ended(e, rid)

    def _placed(self, e: LogEntry, rid: str) -> None:
        if rid in self.own:
            if e.attempt == 1:
                self._count("placed", Origin.OWN)
            return
        if rid in self.peer:
            self._ignore(
                Ignored.RETRY if e.attempt > 1 else Ignored.DUPLICATE, f"request {rid} again"
            )
            return
        if rid in self.ended:
            self._ignore(Ignored.LATE, f"request {rid} placed after it ended")
            return
        if not e.primary:
            return  # Envoy balanced it (the router failed open): no decision to count
        peer = self.peer
        peer[rid] = e.primary
        if len(peer) > self.max_open:
            _trim(peer, self.max_open // 2)
        self._count("placed", Origin.PEER)
        self.add_pick(e.primary)
        self._learn(e)

    def _ended(self, e: LogEntry, rid: str) -> None:
        primary = self.own.pop(rid, None)
        origin = Origin.OWN
        if primary is None:
            primary = self.peer.pop(rid, None)
            origin = Origin.PEER
        ended = self.ended
        if primary is None:
            if rid in ended:
                self._ignore(Ignored.DUPLICATE, f"request {rid} ended twice")
                return
            origin = Origin.UNSEEN
            self._learn(e)
        else:
            self.end_pick(primary)
        ended[rid] = None
        if len(ended) > self.max_open:
            _trim(ended, self.max_open // 2)
        self._count("ended", origin)
