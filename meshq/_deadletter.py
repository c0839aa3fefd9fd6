"""Delivery-semantics decisions (pure): dead letters, attempt history, retention, expiry, delay.

Theory of operation
-------------------
* **Attempts.**  The receiving agent counts, per (stream, seq), how often a message it
  handed to a subscription came back (nack, ack wait passed).  The count lives in memory
  while the message is in progress (it is the receiver's business, not the sender's: the
  sender's ``attempt`` is per batch record and only says "this is a resend").  Each
  failure adds an `Attempt` (agent, wall time, reason) to the message's history.  When
  the number of failed deliveries reaches the subscription's ``max_deliver`` the message
  is *dead*: the next time the producer resends it, the receiver stores it in the
  tenant's dead-letter table instead of handing it out, and acknowledges it.
* **Dead letters** are `DeadLetter` records in the receiving agent's store, keyed per
  tenant by the message id (hex).  A requeue republishes the body, subject and headers
  under a *new* id with the header ``meshq-requeued-from: <old id>``: a requeue is a new
  message (deduplication must not swallow it), and the header links the two.
* **Retention.**  Messages for a durable subscription that is away wait in the senders'
  outboxes.  A record whose messages are older than the tenant's ``retention_seconds``,
  or the oldest ones while the tenant's outbox is above ``retention_bytes``, are replaced
  by *tombstones* (same id and subject, empty body, already expired) so the stream keeps
  its sequence numbers; the receiver drops tombstones as expired.
* **Delay.**  ``not_before`` travels as the reserved header ``meshq-not-before`` (epoch
  milliseconds, decimal); the publishing agent parks such a message in its delayed table
  until it is due and only then routes it, so it never blocks its stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._envelope import check_item, header_field
from ._errors import RemoteProtocolError

NOT_BEFORE_HEADER = "meshq-not-before"
REQUEUED_HEADER = "meshq-requeued-from"
TOMBSTONE_EXPIRY = 1                 # expires_ms of a tombstone: expired since 1970
DEFAULT_ACK_WAIT = 30.0              # a subscription's ack wait when it does not set one
MAX_HISTORY = 100                    # attempts remembered per dead letter
DLQ_OPS = ("list", "show", "requeue", "purge")
MAX_DLQ_LIST = 10_000


@dataclass(frozen=True, slots=True)
class Attempt:
    """One failed delivery: which agent, when (epoch ms), why (nack, ack-wait, client-gone)."""

    agent: str
    at_ms: int
    reason: str

    def to_list(self) -> list:
        return [self.agent, self.at_ms, self.reason]


@dataclass(slots=True)
class DeadLetter:
    """A message that exhausted its deliveries, with where it came from and its history."""

    item: list                         # the message item [id, subject, headers, created_ms, expires_ms, body]
    history: list[Attempt] = field(default_factory=list)
    dead_ms: int = 0
    producer: str = ""
    lane: str = ""
    subscription: str = ""             # the pattern (and durable/group) that gave up

    @property
    def dlq_id(self) -> str:
        return self.item[0].hex()

    def encode(self) -> dict:
        """The msgpack-able stored form."""
        return {"item": self.item, "history": [a.to_list() for a in self.history[-MAX_HISTORY:]],
                "dead_ms": self.dead_ms, "producer": self.producer, "lane": self.lane, "sub": self.subscription}

    @classmethod
    def decode(cls, raw: Any) -> "DeadLetter":
        """Parse a stored record (RemoteProtocolError when malformed)."""
        item = header_field(raw, "item", list)
        check_item(item)
        history = []
        for a in header_field(raw, "history", list)[:MAX_HISTORY]:
            if type(a) is not list or len(a) != 3 or type(a[0]) is not str or type(a[1]) is not int or type(a[2]) is not str:
                raise RemoteProtocolError("dead-letter history entry must be [agent, at_ms, reason]")
            history.append(Attempt(a[0], a[1], a[2]))
        return cls(item, history, header_field(raw, "dead_ms", int, 0), header_field(raw, "producer", str, ""),
                   header_field(raw, "lane", str, ""), header_field(raw, "sub", str, ""))

    def summary(self) -> dict:
        """The `meshq dlq list` row."""
        last = self.history[-1] if self.history else None
        return {"id": self.dlq_id, "subject": self.item[1], "attempts": len(self.history), "dead_ms": self.dead_ms,
                "last_reason": last.reason if last else "", "last_agent": last.agent if last else "",
                "bytes": len(self.item[5])}

    def details(self) -> dict:
        """The `meshq dlq show` view: the summary plus headers, body and the whole history."""
        return {**self.summary(), "headers": self.item[2] or {}, "created_ms": self.item[3], "expires_ms": self.item[4],
                "data": self.item[5], "producer": self.producer, "lane": self.lane, "subscription": self.subscription,
                "history": [{"agent": a.agent, "at_ms": a.at_ms, "reason": a.reason} for a in self.history]}


def decode_dlq_request(h: Any) -> tuple[int, str, str | None]:
    """Parse a DLQ request header [req_id, op, id-or-nil] (RemoteProtocolError when malformed)."""
    if type(h) is not list or len(h) != 3 or type(h[0]) is not int or type(h[1]) is not str:
        raise RemoteProtocolError("DLQ request must be [req_id, op, id]")
    req_id, op, arg = h
    if op not in DLQ_OPS:
        raise RemoteProtocolError(f"unknown DLQ operation {op[:20]!r}")
    if arg is not None and (type(arg) is not str or not 0 < len(arg) <= 64 or not all(c in "0123456789abcdef" for c in arg)):
        raise RemoteProtocolError("DLQ id must be a hex message id")
    if op in ("show", "requeue") and arg is None:
        raise RemoteProtocolError(f"DLQ {op} needs an id")
    return req_id, op, arg


def decode_tag_ranges(h: Any, limit: int = 1_000_000) -> list[tuple[int, int]]:
    """Parse [[first, last], ...] tag ranges (IN_PROGRESS frames) with a bound on their total size."""
    if type(h) is not list:
        raise RemoteProtocolError("tag ranges must be a list")
    out, total = [], 0
    for rng in h:
        if type(rng) is not list or len(rng) != 2 or type(rng[0]) is not int or type(rng[1]) is not int or rng[1] < rng[0]:
            raise RemoteProtocolError("tag range must be [first, last]")
        total += rng[1] - rng[0] + 1
        if total > limit:
            raise RemoteProtocolError("tag ranges too large")
        out.append((rng[0], rng[1]))
    return out


def is_dead(failures: int, max_deliver: int | None) -> bool:
    """True when `failures` failed deliveries exhaust a subscription's `max_deliver` (None: never)."""
    return max_deliver is not None and failures >= max_deliver


def not_before_ms(headers: Any) -> int | None:
    """The due time (epoch ms) a message asks for in its reserved header, or None (malformed: None)."""
    if not headers:
        return None
    raw = headers.get(NOT_BEFORE_HEADER)
    if raw is None or not raw.isdigit() or len(raw) > 15:
        return None
    return int(raw)


def is_tombstone(item: list) -> bool:
    """True for an item that only holds a dropped message's place in its stream."""
    return item[4] == TOMBSTONE_EXPIRY


def tombstone(item: list) -> list:
    """The placeholder that keeps a dropped message's sequence number (id, subject, created kept)."""
    return [item[0], item[1], None, item[3], TOMBSTONE_EXPIRY, b""]


def sweep_verdict(item: list, now_ms: int, retention_ms: int | None) -> str | None:
    """Why a waiting item must be dropped now: "expired", "retention", or None to keep it."""
    if item[4] == TOMBSTONE_EXPIRY:
        return None
    if item[4] is not None and item[4] <= now_ms:
        return "expired"
    if retention_ms is not None and item[3] < now_ms - retention_ms:
        return "retention"
    return None
