"""Delivery state machines (pure, sans-IO): what to send, what to delete, what is a duplicate.

Theory of operation
-------------------
Messages travel in *streams*: all messages of one tenant from one producing agent to one
destination agent on one *lane* ("" for plain subscribers, ``g:<group>`` for a queue
group, ``d:<durable>`` for a durable subscription).  The producer numbers each stream's
messages 1, 2, 3 … and stores them in its outbox in *records* (a batch of consecutive
sequence numbers, written as one LevelDB entry).

`StreamSender` is the producer's half: a go-back-N window over records.  It hands out
records to send while the window has room, remembers what is in flight, and on a
cumulative ``ACK(through)`` reports which records may now be deleted.  A timeout, a
``NACK`` (the receiver cannot take the message yet) or a link reset rewinds to the oldest
unacknowledged sequence and backs off with jitter; resends carry ``attempt > 1``.

`InboundStream` is the receiver's half: the watermark ``W`` (every sequence ≤ W was
handled and may be acknowledged) plus the sequences above W that are already handled or
in progress.  Anything at or below W, or already in progress, is a duplicate and is
skipped, so a resend never reaches an application twice.  The watermark is persisted,
so this holds across restarts of the receiver.

The window is also the flow control: a receiver acknowledges only what its consumers
handled, so at most ``window`` messages of a stream are ever outstanding downstream.

Nothing here reads a clock or touches a socket; `now` comes in as an argument and the
random source for jitter is injected.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

DEFAULT_WINDOW_MSGS = 20_000
DEFAULT_WINDOW_RECORDS = 512
DEFAULT_ACK_WAIT = 5.0
BACKOFF_BASE = 0.05
BACKOFF_MAX = 5.0


@dataclass(frozen=True, slots=True)
class Record:
    """Consecutive messages of one stream stored as one outbox entry."""

    seq: int
    count: int
    payload: bytes
    attempt: int = 1

    @property
    def last(self) -> int:
        return self.seq + self.count - 1


Loader = Callable[[int, int], Iterable[tuple[int, int, bytes]]]
"""load(from_seq, max_msgs) -> (seq, count, payload) records in order, from durable storage."""


class Backoff:
    """Exponential backoff with full jitter (the rng is injected for tests)."""

    def __init__(self, base: float = BACKOFF_BASE, cap: float = BACKOFF_MAX, rng: random.Random | None = None):
        self.base, self.cap = base, cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """Delay before the next try; grows with each failure."""
        ceiling = min(self.cap, self.base * (2 ** min(self.failures, 30)))
        self.failures += 1
        return ceiling * (0.5 + self._rng.random() / 2)

    def reset(self) -> None:
        self.failures = 0


class StreamSender:
    """The producer side of one stream: a go-back-N window over outbox records."""

    def __init__(
        self, next_seq: int = 1, acked_through: int = 0, *,
        window_msgs: int = DEFAULT_WINDOW_MSGS, window_records: int = DEFAULT_WINDOW_RECORDS,
        ack_wait: float = DEFAULT_ACK_WAIT, cache_bytes: int = 32 * 1024 * 1024,
        rng: random.Random | None = None,
    ) -> None:
        self.next_seq = max(next_seq, acked_through + 1)
        self.acked_through = acked_through
        self.send_pos = acked_through + 1     # next sequence to (re)send
        self.max_sent = acked_through         # highest sequence ever sent in this run
        self.window_msgs = window_msgs
        self.window_records = window_records
        self.ack_wait = ack_wait
        self.cache_bytes = cache_bytes
        self.backoff = Backoff(rng=rng)
        self.hold_until = 0.0
        self._inflight: deque[list] = deque()   # [seq, count, sent_at, size]
        self._inflight_msgs = 0
        self._limbo: dict[int, tuple[int, int]] = {}   # seq -> (count, size): sent, rewound, not resent yet
        self._cache: dict[int, tuple[int, bytes]] = {}  # seq -> (count, payload), recent records
        self._cached_bytes = 0
        self.pending_msgs = 0   # messages stored and not yet acknowledged (for depth gauges)

    # -- producing -----------------------------------------------------
    def append(self, count: int, payload: bytes) -> int:
        """Assign sequence numbers to a new record of `count` messages; returns its first seq."""
        seq = self.next_seq
        self.next_seq += count
        self.pending_msgs += count
        if self._cached_bytes + len(payload) <= self.cache_bytes:
            self._cache[seq] = (count, payload)
            self._cached_bytes += len(payload)
        return seq

    @property
    def idle(self) -> bool:
        """True when everything appended has been acknowledged."""
        return self.acked_through >= self.next_seq - 1

    @property
    def has_unsent(self) -> bool:
        return self.send_pos < self.next_seq

    # -- sending -------------------------------------------------------
    def due(self, now: float, load: Loader) -> list[Record]:
        """Records to send now (call only after the records are committed to the store)."""
        if now < self.hold_until or self.send_pos >= self.next_seq:
            return []
        room = self.window_msgs - self._inflight_msgs
        out: list[Record] = []
        while room > 0 and self.send_pos < self.next_seq and len(self._inflight) < self.window_records:
            cached = self._cache.get(self.send_pos)
            if cached is not None:
                records: Iterable[tuple[int, int, bytes]] = ((self.send_pos, cached[0], cached[1]),)
            else:
                records = load(self.send_pos, room)
            progressed = False
            for seq, count, payload in records:
                if seq + count - 1 < self.send_pos:
                    continue
                attempt = 2 if seq <= self.max_sent else 1
                self._limbo.pop(seq, None)
                out.append(Record(seq, count, payload, attempt))
                self._inflight.append([seq, count, now, len(payload)])
                self._inflight_msgs += count
                self.send_pos = seq + count
                self.max_sent = max(self.max_sent, seq + count - 1)
                room -= count
                progressed = True
                if room <= 0 or len(self._inflight) >= self.window_records:
                    break
            if not progressed:
                # nothing stored at send_pos (already deleted): skip the gap
                self.send_pos = self.next_seq
        return out

    def on_ack(self, through: int, now: float) -> list[tuple[int, int, int]]:
        """Handle a cumulative ack; returns the (seq, count, size) records that may now be deleted."""
        through = min(through, self.next_seq - 1)
        if through > self.acked_through:
            self.pending_msgs -= through - self.acked_through
            self.acked_through = through
            if self.send_pos <= through:
                self.send_pos = through + 1
            self.backoff.reset()
        done: list[tuple[int, int, int]] = []
        while self._inflight and self._inflight[0][0] + self._inflight[0][1] - 1 <= through:
            seq, count, _, size = self._inflight.popleft()
            self._inflight_msgs -= count
            done.append((seq, count, size))
        if self._limbo:
            for seq in [s for s, (c, _) in self._limbo.items() if s + c - 1 <= through]:
                count, size = self._limbo.pop(seq)
                done.append((seq, count, size))
        if self._cache:
            for seq in [s for s in self._cache if s + self._cache[s][0] - 1 <= through]:
                self._cached_bytes -= len(self._cache.pop(seq)[1])
        return done

    def rewind(self, now: float, delay: float | None = None) -> None:
        """Resend from the oldest unacknowledged sequence after `delay` (default: backoff)."""
        for seq, count, _, size in self._inflight:
            self._limbo[seq] = (count, size)
        self._inflight.clear()
        self._inflight_msgs = 0
        self.send_pos = self.acked_through + 1
        self.hold_until = now + (self.backoff.next_delay() if delay is None else delay)

    def resized(self, seq: int, size: int) -> None:
        """The stored record at `seq` was rewritten with `size` bytes (tombstones): keep the accounting right."""
        if seq in self._limbo:
            self._limbo[seq] = (self._limbo[seq][0], size)
        for entry in self._inflight:
            if entry[0] == seq:
                entry[3] = size

    def drop_cache(self) -> None:
        """Forget cached payloads (the stored records were rewritten); sends reload from the store."""
        self._cache.clear()
        self._cached_bytes = 0

    def on_nack(self, from_seq: int, delay: float, now: float) -> None:
        """The receiver cannot take `from_seq` yet: go back and retry after `delay`."""
        self.rewind(now, max(0.0, min(delay, 60.0)))

    def check_timeout(self, now: float) -> bool:
        """Rewind if the oldest record in flight waited longer than the ack wait; True if so."""
        if self._inflight and now - self._inflight[0][2] > self.ack_wait:
            self.rewind(now)
            return True
        return False

    def next_deadline(self) -> float | None:
        """When `check_timeout` or `due` may next have something to do."""
        times = []
        if self._inflight:
            times.append(self._inflight[0][2] + self.ack_wait)
        if self.send_pos < self.next_seq and self.hold_until:
            times.append(self.hold_until)
        return min(times) if times else None


class InboundStream:
    """The receiver side of one stream: dedupe, and the watermark to acknowledge."""

    __slots__ = ("watermark", "_done", "_busy", "acked_sent")

    def __init__(self, watermark: int = 0) -> None:
        self.watermark = watermark   # every seq <= watermark has been handled
        self._done: set[int] = set()   # handled, above the watermark
        self._busy: set[int] = set()   # handed to consumers, not yet handled
        self.acked_sent = watermark  # last watermark told to the producer

    def is_new(self, seq: int) -> bool:
        """True unless `seq` was already handled or is being handled."""
        return seq > self.watermark and seq not in self._done and seq not in self._busy

    def all_new(self, seqs: range) -> bool:
        """True when no sequence of `seqs` (all above the watermark) was handled or is in progress."""
        return self._done.isdisjoint(seqs) and self._busy.isdisjoint(seqs)

    def start_range(self, seqs: range) -> None:
        """Mark every sequence of `seqs` as handed to consumers."""
        self._busy.update(seqs)

    def start(self, seq: int) -> None:
        """Mark `seq` as handed to consumers."""
        self._busy.add(seq)

    def finish(self, seq: int) -> None:
        """Mark `seq` as handled (acked by every consumer it went to, or dropped)."""
        self._busy.discard(seq)
        if seq == self.watermark + 1:
            w = seq
            done = self._done
            while w + 1 in done:
                w += 1
                done.discard(w)
            self.watermark = w
        elif seq > self.watermark:
            self._done.add(seq)

    def abandon(self, seq: int) -> None:
        """Forget that `seq` is in progress (its consumer left); a resend will bring it back."""
        self._busy.discard(seq)

    @property
    def ack_due(self) -> bool:
        return self.watermark > self.acked_sent


class Liveness:
    """Heartbeat bookkeeping for one link: alive → suspect → dead, from silence (pure)."""

    def __init__(self, now: float, suspect_after: float = 1.5, dead_after: float = 3.0) -> None:
        self.last_heard = now
        self.suspect_after = suspect_after
        self.dead_after = dead_after

    def heard(self, now: float) -> None:
        self.last_heard = now

    def state(self, now: float) -> str:
        silent = now - self.last_heard
        if silent >= self.dead_after:
            return "dead"
        if silent >= self.suspect_after:
            return "suspect"
        return "alive"
