"""The agent's delivery semantics: durables, ack wait, max deliver, dead letters, delay, retention.

`SemanticsMixin` is mixed into `Agent` (like `MeshMixin`); the decisions are the pure
functions of `_deadletter`, this module carries them out on the agent's state, sockets
and store.

* **Durable subscriptions** are keyed by (tenant, durable name), not by the client
  session: a synthetic session ``durable\\x00<tenant>\\x00<name>`` and sid 0, so any client
  of the tenant that subscribes with the same name and pattern re-attaches to it (taking
  it over from a client that still holds it).  They never expire when their client is
  away; they end only on ``unsubscribe(delete=True)``.  Their messages travel on lane
  ``d:<name>``; while no client is attached the receiving agent holds them (DNACK), so
  they wait in the senders' outboxes, in order, up to the tenant's retention.
* **Ack wait.**  Each batch handed to a client pushes one (deadline, conn, tag range) on
  a heap; `_ack_timers` pops what is due and gives back every tag still outstanding
  (unless `in_progress` pushed its deadline further): the receiver records a failed
  attempt, tells the client the tags are void (EXPIRED) and asks the producer to resend
  (DNACK).  For a queue group the DNACK asks the producer to re-route the message to a
  member on another agent when there is one.
* **Max deliver / dead letters**: see `_deadletter`.
* **Delay**: messages with ``meshq-not-before`` in the future are parked in the store's
  delayed table at accept time and routed when due (`_release_delayed`).
* **Retention and expiry in waiting outboxes**: once a second, streams that made no
  progress since the last sweep are scanned (bounded work per sweep) and expired or
  too-old messages are replaced by tombstones (`_sweep_outboxes`).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from typing import Any

from ._auth import Quotas
from ._deadletter import (
    DEFAULT_ACK_WAIT, MAX_DLQ_LIST, NOT_BEFORE_HEADER, REQUEUED_HEADER, Attempt, DeadLetter, decode_dlq_request,
    decode_tag_ranges, is_dead, is_tombstone, sweep_verdict, tombstone,
)
from ._envelope import Kind, check_item, pack, unpack_items
from ._errors import RemoteProtocolError
from ._ids import IdGenerator
from ._store import StreamKey

log = logging.getLogger("meshq.agent")

SWEEP_INTERVAL = 1.0
SWEEP_RECORDS = 256          # records examined per stream per sweep (bounded work)
RELEASE_BATCH = 10_000
DURABLE_HOLD_DELAY = 2.0     # resend interval for a durable whose client is away       # delayed messages released per timer tick


def durable_session(tenant: str, name: str) -> bytes:
    """The synthetic session that owns a durable subscription."""
    return b"durable\x00" + tenant.encode() + b"\x00" + name.encode()


class SemanticsMixin:
    """Durables, acks, dead letters, delay and retention for `Agent` (see module doc)."""

    def _semantics_init(self) -> None:
        self._ack_heap: list = []                 # (deadline, n, conn, first_tag, last_tag)
        self._heap_n = itertools.count()
        self._attempts: dict[tuple, list[Attempt]] = {}   # (inbound key, seq) -> failed attempts
        self._dead: dict[tuple, tuple[list[Attempt], str]] = {}  # (inbound key, seq) -> (history, sub) to dead-letter
        self._msg_ids = IdGenerator()
        self._swept: dict[StreamKey, int] = {}    # stream -> acked_through at the last sweep
        self._sweep_at = 0.0
        self._next_due_ms = next((d for d, *_ in self.store.delayed_due()), None)

    def _quotas(self, tenant: str) -> Quotas:
        secret = self.tenants.get(tenant)
        return secret.quotas if secret is not None else _DEFAULT_QUOTAS

    # ------------------------------------------------------------------ durable subscriptions
    def _durable_sub(self, conn: Any, sid: int, spec: Any) -> None:
        """Create or re-attach the tenant's durable subscription `spec.durable` for this client."""
        from ._agent import LocalSub
        if spec.group is not None:
            return self._sub_refused(conn, sid, "a durable subscription cannot be in a queue group", "bad-subject")
        session = durable_session(conn.tenant, spec.durable)
        sub = self.local_subs.get((session, 0))
        if sub is not None and sub.spec.pattern != spec.pattern:
            return self._sub_refused(conn, sid, f"durable {spec.durable!r} is bound to {sub.spec.pattern!r}; "
                                     "delete it first (unsubscribe(delete=True))", "bad-subject")
        if sub is None:
            sub = LocalSub(session, 0, conn.tenant, spec, conn, detached_until=float("inf"), csid=sid)
            self._add_local_sub(sub)
            self._persist_sub(sub)
        else:
            old = sub.conn
            if old is not None and old is not conn:
                self._abandon(old, lambda t: t[3] is sub)       # another client held it: take it over
                for k in [k for k, v in old.subs.items() if v is sub]:
                    del old.subs[k]
            for k in [k for k, v in conn.subs.items() if v is sub and k != sid]:
                del conn.subs[k]
            if sub.spec != spec:
                sub.spec = spec
                self._persist_sub(sub)
            sub.conn, sub.csid, sub.detached_until = conn, sid, float("inf")
            self._local_cache.clear()
            self._resume_durable(sub)
        conn.subs[sid] = sub
        self.sockets.send(self.sockets.clients, [conn.ident, Kind.SUBOK, pack({"sid": sid})])

    def _hold_delay(self, lane: str) -> float:
        """How long a producer should wait before resending held messages of `lane`."""
        if lane.startswith("d:"):
            return DURABLE_HOLD_DELAY     # a re-attach calls them back at once (`_resume_durable`)
        return self.config.hold_delay

    def _resume_durable(self, sub: Any) -> None:
        """A client attached to a durable: ask every producer holding its messages to send now."""
        lane = "d:" + sub.spec.durable
        for (tenant, producer, l), st in self.inbound.items():
            if tenant == sub.tenant and l == lane:
                self._send_dnack(tenant, producer, lane, st.watermark + 1, 0.0)

    def _persist_sub(self, sub: Any) -> None:
        self.store.put(sub.key, pack({"session": sub.session.hex(), "sid": sub.sid, "tenant": sub.tenant,
                                      **sub.spec.to_dict()}), durable=True)

    def _sub_refused(self, conn: Any, sid: int, text: str, code: str) -> None:
        self._count("subscribe_refused", tenant=conn.tenant)
        self.sockets.send(self.sockets.clients, [conn.ident, Kind.SUBOK, pack({"sid": sid, "error": text, "code": code})])

    # ------------------------------------------------------------------ ack wait, in progress, nack
    def _track(self, conn: Any, sub: Any, first_tag: int, last_tag: int, now: float) -> None:
        """Start the ack wait of tags first..last just handed to `conn` for `sub`."""
        wait = sub.spec.ack_wait or DEFAULT_ACK_WAIT
        heapq.heappush(self._ack_heap, (now + wait, next(self._heap_n), conn, first_tag, last_tag))

    def _client_in_progress(self, conn: Any, header: Any) -> None:
        """The client is still working on these tags: push their ack wait out by a full wait."""
        now = time.monotonic()
        out, ext = conn.outstanding, conn.extended
        for first, last in decode_tag_ranges(header, 100_000):
            for tag in range(first, last + 1):
                entry = out.get(tag)
                if entry is not None:
                    ext[tag] = now + (entry[3].spec.ack_wait or DEFAULT_ACK_WAIT)
        self._count("in_progress", tenant=conn.tenant)

    def _ack_timers(self, now: float) -> None:
        """Give back every delivery whose ack wait passed (in_progress extensions honoured)."""
        heap = self._ack_heap
        if not heap or heap[0][0] > now:
            return
        expired: dict[Any, list[int]] = {}
        while heap and heap[0][0] <= now:
            _, _, conn, first, last = heapq.heappop(heap)
            if self.clients.get(conn.ident) is not conn:
                continue
            out, ext = conn.outstanding, conn.extended
            for tag in range(first, last + 1):
                later = ext.pop(tag, None) if ext else None
                if tag not in out:
                    continue
                if later is not None and later > now:
                    ext[tag] = later
                    heapq.heappush(heap, (later, next(self._heap_n), conn, tag, tag))
                    continue
                expired.setdefault(conn, []).append(tag)
        for conn, tags in expired.items():
            void = [[conn.outstanding[t][3].csid, t, conn.outstanding[t][4]] for t in tags]
            self._give_back(conn, tags, 0.0, "ack-wait")
            for i in range(0, len(void), 10_000):
                self.sockets.send(self.sockets.clients, [conn.ident, Kind.EXPIRED, pack(void[i:i + 10_000])])
            self._count("ack_wait_expired", len(tags), tenant=conn.tenant)

    def _give_back(self, conn: Any, tags, delay: float, reason: str) -> int:
        """Deliveries that failed (nack, ack wait): record the attempt; resend, re-route or dead-letter."""
        now_ms = int(time.time() * 1000)
        lowest: dict[tuple, list] = {}     # inbound key -> [lowest seq, delay, reroute]
        n = 0
        for tag in tags:
            entry = conn.outstanding.pop(tag, None)
            if entry is None:
                continue
            n += 1
            key, seq, _counter, sub, _mid = entry
            sub.inflight -= 1
            hist = self._attempts.setdefault((key, seq), [])
            hist.append(Attempt(self.name, now_ms, reason))
            d = delay
            if is_dead(len(hist), sub.spec.max_deliver):
                self._dead[(key, seq)] = (self._attempts.pop((key, seq)), _describe(sub))
                d = 0.0
            st = self.inbound.get(key)
            if st is not None:
                st.abandon(seq)
            reroute = (reason == "ack-wait" and d == delay and key[2].startswith("g:") and key[1] != self.agent_id)
            cur = lowest.get(key)
            if cur is None:
                lowest[key] = [seq, d, reroute]
            else:
                cur[0], cur[1], cur[2] = min(cur[0], seq), min(cur[1], d), cur[2] and reroute
        for (tenant, producer, lane), (seq, d, reroute) in lowest.items():
            if producer == self.agent_id and reason == "ack-wait" and lane.startswith("g:") and d == delay:
                self._reroute_one(StreamKey(tenant, self.agent_id, lane), seq, time.monotonic())
            if reroute:
                self.sockets.send(self.sockets.peers, [producer.encode(), Kind.DNACK,
                                                       pack([tenant, lane, seq, int(d * 1000), "elsewhere"])])
            else:
                self._send_dnack(tenant, producer, lane, seq, d)
        return n

    def _dead_letter(self, key: tuple, seq: int, item: list, dead: tuple) -> None:
        """Store a message that exhausted its deliveries in its tenant's dead-letter table."""
        history, described = dead
        tenant, producer, lane = key
        letter = DeadLetter(item, history, int(time.time() * 1000), producer, lane, described)
        self.store.dlq_put(tenant, letter.dlq_id, pack(letter.encode()))
        self.store.commit()          # on disk before the watermark that acknowledges it can go out
        self._count("dead_lettered", tenant=tenant)
        log.info("dead-lettered %s on %s after %d attempts", letter.dlq_id, item[1], len(history))

    # ------------------------------------------------------------------ dead-letter requests
    def _client_dlq(self, conn: Any, header: Any) -> None:
        """Answer a tenant-scoped DLQ request: list, show, requeue or purge."""
        req_id, op, arg = decode_dlq_request(header)
        tenant = conn.tenant
        result: Any = None
        error = None
        if op == "list":
            rows = []
            for dlq_id, raw in self.store.dlq_scan(tenant):
                try:
                    rows.append(DeadLetter.decode(unpack_header_big(raw)).summary())
                except RemoteProtocolError:
                    rows.append({"id": dlq_id, "subject": "?", "attempts": 0, "dead_ms": 0, "last_reason": "corrupt",
                                 "last_agent": "", "bytes": 0})
                if len(rows) >= MAX_DLQ_LIST:
                    break
            result = rows
        elif op == "purge":
            ids = [arg] if arg is not None else [i for i, _ in self.store.dlq_scan(tenant)]
            n = 0
            for dlq_id in ids:
                if self.store.dlq_get(tenant, dlq_id) is not None:
                    self.store.dlq_delete(tenant, dlq_id)
                    n += 1
            result = {"purged": n}
        else:
            raw = self.store.dlq_get(tenant, arg)
            if raw is None:
                error = f"no dead letter {arg} in tenant {tenant!r}"
            else:
                try:
                    letter = DeadLetter.decode(unpack_header_big(raw))
                except RemoteProtocolError as e:
                    self._count("store_bad_dead_letter")
                    letter, error = None, f"dead letter {arg} is unreadable ({e}); purge it"
            if raw is not None and letter is not None:
                if op == "show":
                    result = letter.details()
                else:
                    result, error = self._requeue(conn, letter)
        self._count(f"dlq_{op}", tenant=tenant)
        self.sockets.send(self.sockets.clients, [conn.ident, Kind.DLQOK, pack([req_id, result, error])])

    def _requeue(self, conn: Any, letter: DeadLetter) -> tuple[Any, str | None]:
        """Republish a dead letter to its subject under a new id; the entry goes once routed."""
        item = letter.item
        if conn.grant is not None and not conn.grant.may_publish(item[1]):
            return None, f"not allowed to publish to {item[1]!r}"
        headers = {k: v for k, v in (item[2] or {}).items() if k not in (NOT_BEFORE_HEADER, REQUEUED_HEADER)}
        headers[REQUEUED_HEADER] = letter.dlq_id
        now_ns = time.time_ns()
        new = [self._msg_ids.next(now_ns), item[1], headers, now_ns // 1_000_000, None, item[5]]
        if not self._route_items(conn.tenant, [new]):
            return None, f"no subscriber for {item[1]!r} now; the dead letter stays"
        self.store.dlq_delete(conn.tenant, letter.dlq_id)
        self._count("dlq_requeued", tenant=conn.tenant)
        return {"id": letter.dlq_id, "new_id": new[0].hex(), "subject": item[1]}, None

    def _route_items(self, tenant: str, items: list) -> int:
        """Route already-accepted items into outbox streams (delayed release, requeue); returns how many had a route."""
        per_stream: dict[StreamKey, list] = {}
        routed = 0
        for item in items:
            route = self._route_cache.get((tenant, item[1])) or self._compute_route(tenant, item[1])
            plain, groups, filt = route
            if filt:
                plain, groups = self._filtered(tenant, item, route)
            if not plain and not groups:
                continue
            routed += 1
            for stream in plain:
                per_stream.setdefault(stream, []).append(item)
            for group, candidates in groups:
                per_stream.setdefault(self._pick_member(tenant, group, candidates), []).append(item)
        for stream, lst in per_stream.items():
            self._enqueue(stream, lst)
        return routed

    # ------------------------------------------------------------------ delay
    def _defer(self, tenant: str, item: list, due_ms: int) -> None:
        """Park an accepted message until `due_ms` (epoch ms) in the delayed table."""
        self.store.delayed_put(due_ms, tenant, item[0], pack(item))
        if self._next_due_ms is None or due_ms < self._next_due_ms:
            self._next_due_ms = due_ms
        self._count("delayed", tenant=tenant)

    def _release_delayed(self, now_ms: int) -> None:
        """Route the delayed messages that are due (one store scan from the earliest)."""
        if self._next_due_ms is None or now_ms < self._next_due_ms:
            return
        per_tenant: dict[str, list] = {}
        n = 0
        self._next_due_ms = None
        for due, tenant, msg_id, value in self.store.delayed_due():
            if due > now_ms or n >= RELEASE_BATCH:
                self._next_due_ms = due
                break
            self.store.delayed_delete(due, tenant, msg_id)
            n += 1
            try:
                item = unpack_header_big(value)
                check_item(item)
            except RemoteProtocolError:
                self._count("store_bad_delayed")
                continue
            if item[4] is not None and item[4] <= now_ms:
                self._count("dropped_expired", tenant=tenant)
                continue
            per_tenant.setdefault(tenant, []).append(item)
        for tenant, items in per_tenant.items():
            routed = self._route_items(tenant, items)
            self._count("released_delayed", routed, tenant=tenant)
            if routed < len(items):
                self._count("dropped_no_subscriber", len(items) - routed, tenant=tenant)
        if n:
            self.store.commit()      # the move from the delayed table to the outbox is one batch

    # ------------------------------------------------------------------ retention and expiry in waiting outboxes
    def _sweep_outboxes(self, now: float) -> None:
        """Tombstone expired messages, and messages past the tenant's retention, in streams that are stuck.

        Retention covers every lane: a durable's messages wait for it that long, and so do a
        plain subscriber's whose agent is down (gone for good, they would wait for ever).
        """
        if now - self._sweep_at < SWEEP_INTERVAL:
            return
        self._sweep_at = now
        now_ms = int(time.time() * 1000)
        swept = self._swept
        stuck = []
        for stream, sender in list(self.senders.items()):
            if sender.pending_msgs <= 0 or sender.idle:
                swept.pop(stream, None)
                continue
            if swept.get(stream) != sender.acked_through:     # it moved since the last sweep: not stuck
                swept[stream] = sender.acked_through
                continue
            stuck.append((stream, sender))
            retention_ms = int(self._quotas(stream.tenant).retention_seconds * 1000)
            self._sweep_stream(stream, sender, now_ms, retention_ms, None)
        for tenant, box in list(self._tenant_outbox.items()):
            limit = self._quotas(tenant).retention_bytes
            for stream, sender in stuck:
                if box[1] <= limit:
                    break
                if stream.tenant == tenant and sender.pending_msgs > 0:
                    self._sweep_stream(stream, sender, now_ms, None, limit)

    def _sweep_stream(self, stream: StreamKey, sender: Any, now_ms: int, retention_ms: int | None,
                      byte_limit: int | None) -> None:
        """Rewrite this stream's waiting records with tombstones where messages must go (bounded work)."""
        box = self._tenant_outbox.setdefault(stream.tenant, [0, 0])
        start = sender.acked_through + 1
        counts = {"expired": 0, "retention": 0}
        rewrote = False
        for i, (seq, count, payload) in enumerate(self.store.outbox_records(stream, start)):
            if i >= SWEEP_RECORDS or (byte_limit is not None and box[1] <= byte_limit):
                break
            try:
                items = unpack_items(payload)
            except RemoteProtocolError:
                continue
            changed = False
            out = []
            for item in items:
                why = "retention" if byte_limit is not None and not is_tombstone(item) else \
                    sweep_verdict(item, now_ms, retention_ms)
                if why is None:
                    out.append(item)
                else:
                    counts[why] += 1
                    out.append(tombstone(item))
                    changed = True
            if not changed:
                if retention_ms is not None and byte_limit is None and all(it[4] is None for it in items):
                    break    # oldest first: nothing further down this stream is older, and none expires
                continue
            data = pack(out)
            self.store.outbox_put(stream, seq, count, data)
            sender.resized(seq, len(data))
            box[1] += len(data) - len(payload)
            rewrote = True
        if rewrote:
            sender.drop_cache()
        if counts["expired"]:
            self._count("dropped_expired", counts["expired"], tenant=stream.tenant)
        if counts["retention"]:
            self._count("dropped_retention", counts["retention"], tenant=stream.tenant)

    # ------------------------------------------------------------------ queue-group re-route on ack wait
    def _reroute_one(self, stream: StreamKey, seq: int, now: float) -> bool:
        """Move message `seq` of a queue-group stream to a live member on another agent; True if moved."""
        sender = self.senders.get(stream)
        if sender is None or seq <= sender.acked_through:
            return False
        for rseq, count, payload in self.store.outbox_records(stream, seq):
            if not rseq <= seq < rseq + count:
                return False
            try:
                items = unpack_items(payload)
            except RemoteProtocolError:
                return False
            item = items[seq - rseq]
            if is_tombstone(item):
                return False
            target = self._live_member(stream.tenant, stream.lane[2:], item[1], stream.dest)
            if target is None:
                return False
            tsender = self.senders.get(target) or self._new_sender(target, 1, 0)
            data = pack([item])
            tseq = tsender.append(1, data)
            self.store.outbox_put(target, tseq, 1, data)
            self._outbox_add(stream.tenant, 1, len(data))
            self._touched.add(target)
            items[seq - rseq] = tombstone(item)
            new = pack(items)
            self.store.outbox_put(stream, rseq, count, new)
            sender.resized(rseq, len(new))
            sender.drop_cache()
            self._count("rerouted_ack_wait", tenant=stream.tenant)
            return True
        return False


def _describe(sub: Any) -> str:
    spec = sub.spec
    extra = f" durable={spec.durable}" if spec.durable else f" group={spec.group}" if spec.group else ""
    return f"{spec.pattern}{extra}"


def unpack_header_big(raw: bytes) -> Any:
    """Decode a stored msgpack value that may exceed the control-header bound (our own store)."""
    import msgpack
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:
        raise RemoteProtocolError(f"malformed stored value: {type(e).__name__}") from None


_DEFAULT_QUOTAS = Quotas()
