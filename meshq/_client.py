"""The asyncio client: `await meshq.connect()` talks to the agent on this host.

Publishes are batched per event-loop tick into one PUB frame; the agent answers each
batch once it is durably in its outbox.  Deliveries arrive in batches too, and acks go
back as tag ranges.  The client survives agent restarts: it says HELLO again,
resubscribes, resends the publish batches that were not yet confirmed, and remembers
the ids it already handed to the application so a redelivery never reaches it twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import struct
import time
from types import MappingProxyType
from typing import Any, AsyncIterator, Mapping

from . import _envelope as env
from ._envelope import Kind, make_item, pack, unpack_bulk, unpack_header, unpack_items
from ._auth import load_token_file
from ._errors import (
    AuthorizationError, BadFilterError, BadSubjectError, ConnectionClosedError, LocalProtocolError, MeshqError,
    NoRespondersError, QuotaExceeded,
    RemoteProtocolError, TimeoutError,
)
from ._deadletter import NOT_BEFORE_HEADER
from ._ids import IdGenerator
from ._subject import validate_pattern, validate_subject
from ._transport import ClientChannel, default_client_endpoint

DEFAULT_DATA_DIR = os.path.expanduser("~/.meshq")
REPLY_HEADER = "_reply"          # set by the agent on requests: where respond() sends the answer
SERVE_GROUP = "_responders"      # the queue group serve() joins unless given one
MAX_BATCH_ITEMS = 1000
MAX_BATCH_BYTES = 1 << 20
HEARTBEAT_INTERVAL = 1.0
AGENT_SILENCE = 3.0
ASK_RETRY = 1.0              # seconds before a status/directory request is asked again
ACK_BATCH = 1000             # pending acks go out at once when this many gathered (else when the loop comes round)
# next_msg yields to the event loop after this long without a real await; by time, not by count:
# each yield also flushes the pending acks, so a fast consumer must not yield every few messages
CHECKPOINT_SECONDS = 0.1


def resolve_agent(agent: str | None) -> str:
    """An endpoint for `agent`: an endpoint as is, a data directory as its ipc socket, default from MESHQ_AGENT."""
    agent = agent or os.environ.get("MESHQ_AGENT") or DEFAULT_DATA_DIR
    if "://" in agent:
        return agent
    return default_client_endpoint(agent)


class Message(tuple):
    """An immutable received message; `await msg.ack()` when handled (unless auto-acked)."""

    __slots__ = ()

    id: bytes = property(lambda self: self[0])            # type: ignore[assignment]
    subject: str = property(lambda self: self[1])         # type: ignore[assignment]
    headers: Mapping[str, str] = property(lambda self: self[2])  # type: ignore[assignment]
    data: bytes = property(lambda self: self[3])          # type: ignore[assignment]
    redelivered: bool = property(lambda self: self[4])    # type: ignore[assignment]
    created_ms: int = property(lambda self: self[5])      # type: ignore[assignment]

    @property
    def expires_ms(self) -> int | None:
        return self[6]

    async def ack(self) -> None:
        """Tell the mesh this message is handled; it will not be delivered again."""
        self[7]._ack(self)

    async def nack(self, delay: float = 0.0) -> None:
        """Give the message back for redelivery after `delay` seconds."""
        self[7]._nack(self, delay)

    async def in_progress(self) -> None:
        """Still working on it: restart the subscription's ack wait for this message."""
        self[7]._in_progress(self)

    @property
    def reply(self) -> str | None:
        """The reply address of a request (None for a plain message)."""
        return self[2].get(REPLY_HEADER)

    async def respond(self, data: bytes = b"", *, headers: Mapping[str, str] | None = None) -> None:
        """Answer this request (replies go straight to the requester's agent; they are not durable)."""
        to = self.reply
        if to is None:
            raise MeshqError("this message is not a request: it has no reply address")
        self[7]._respond(to, self[1], data, headers)

    def __repr__(self) -> str:
        return f"Message(subject={self[1]!r}, data={self[3][:40]!r}, id={self[0].hex()}, redelivered={self[4]})"


_EMPTY = MappingProxyType({})


class _PubAck:
    """Awaitable confirmation of one publish (shares its batch's future)."""

    __slots__ = ("_batch", "_index", "msg_id")

    def __init__(self, batch: "_Batch", index: int, msg_id: bytes) -> None:
        self._batch, self._index, self.msg_id = batch, index, msg_id

    def __await__(self):
        rejects = yield from asyncio.shield(self._batch.future).__await__()
        if rejects:
            for first, last, *why in rejects:     # [first, last, code, text, retry_after]
                if first <= self._index <= last:
                    raise _reject_error(*why)
        return self.msg_id

    def done(self) -> bool:
        return self._batch.future.done()


class _ManyAck:
    """Awaitable confirmation of a `publish_many` call: the ids, once all are durable."""

    __slots__ = ("_spans", "msg_ids")

    def __init__(self, spans: list, msg_ids: list) -> None:
        self._spans, self.msg_ids = spans, msg_ids

    def __await__(self):
        for batch, start, end in self._spans:
            rejects = yield from asyncio.shield(batch.future).__await__()
            for first, last, *why in rejects or ():
                if first < end and last >= start:
                    raise _reject_error(*why)
        return self.msg_ids

    def done(self) -> bool:
        return all(b.future.done() for b, _, _ in self._spans)


def _reject_error(code: str, text: str, retry_after: float | None = None) -> MeshqError:
    """The typed error for an agent's refusal code."""
    if code == "quota":
        return QuotaExceeded(text, retry_after)
    return {"bad-subject": BadSubjectError, "bad-filter": BadFilterError, "forbidden": AuthorizationError, "auth": AuthorizationError,
            "no-responders": NoRespondersError}.get(code, MeshqError)(text)


class _Batch:
    """Publishes on their way to the agent as one PUB frame.

    Each message is encoded into its item bytes when it is queued (`parts`, after a slot
    for the array header), so a batch holds bytes, not per-message Python containers
    (which the cyclic garbage collector would walk over and over while they wait).
    """

    __slots__ = ("parts", "n", "future", "payload", "bytes")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.parts: list = [b""]
        self.n = 0
        self.future = loop.create_future()
        self.payload = b""
        self.bytes = 0


_pack_q = struct.Struct(">Q").pack
_pack_h = struct.Struct(">H").pack
_pack_i = struct.Struct(">I").pack


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return b"\xdc" + _pack_h(n)
    return b"\xdd" + _pack_i(n)


def _bin_header(n: int) -> bytes:
    if n < 256:
        return bytes((0xc4, n))
    if n < 65536:
        return b"\xc5" + _pack_h(n)
    return b"\xc6" + _pack_i(n)


def _plain_item(msg_id: bytes, subject_enc: bytes, created: int, data: bytes) -> bytes:
    """The msgpack bytes of [msg_id, subject, nil, created, nil, data] (`subject_enc` is the packed subject)."""
    return b"".join((b"\x96\xc4\x10", msg_id, subject_enc, b"\xc0\xcf", _pack_q(created), b"\xc0",
                     _bin_header(len(data)), data))


class Subscription:
    """A subscription; iterate it with `async for msg in sub`.  Awaiting it confirms it with the agent."""

    def __init__(self, client: "Client", sid: int, subject: str, group: str | None, manual_ack: bool,
                 max_pending: int, options: dict | None = None) -> None:
        self._client = client
        self.sid = sid
        self.subject = subject
        self.group = group
        self.options = options or {}
        self.manual_ack = manual_ack
        self._queue: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._last: Message | None = None
        self._last_batch: list | None = None
        self._outstanding: set[int] = set()
        self._seen: set[bytes] = set()          # ids handed out (a redelivery of one is dropped)
        self._seen_order: collections.deque = collections.deque()
        self._confirmed = client._loop.create_future()
        self._closed = False
        self.delivered = 0
        self.max_pending = max_pending
        self._awaited_at = time.monotonic()     # when next_msg last really gave the event loop a turn

    def __await__(self):
        yield from asyncio.shield(self._confirmed).__await__()
        return self

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        return await self.next_msg()

    async def next_msg(self, timeout: float | None = None) -> Message:
        """The next message; raises TimeoutError after `timeout` seconds, StopAsyncIteration once closed."""
        if not self.manual_ack and (self._last is not None or self._last_batch is not None):
            self._auto_ack()
        if not self._confirmed.done():
            await self
        queue = self._queue
        if time.monotonic() - self._awaited_at > CHECKPOINT_SECONDS:
            # a busy consumer draining a full buffer never awaits anything that blocks; without
            # this the client's heartbeats stop and the agent detaches it as silent
            await asyncio.sleep(0)
            self._awaited_at = time.monotonic()
        while True:
            while not queue:
                if self._closed:
                    raise StopAsyncIteration
                self._waiter = self._client._loop.create_future()
                try:
                    if timeout is None:
                        await self._waiter
                    else:
                        await asyncio.wait_for(self._waiter, timeout)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"no message on {self.subject!r} within {timeout} s") from None
                finally:
                    self._waiter = None
                    self._awaited_at = time.monotonic()
            msg = queue.popleft()
            if msg[6] is not None and msg[6] <= time.time() * 1000:
                self._client._ack(msg)          # expired while it waited here: never handed out
                self._client.expired_dropped += 1
                continue
            self.delivered += 1
            self._last = msg
            return msg

    async def next_batch(self, max_msgs: int = 1000, timeout: float | None = None) -> list[Message]:
        """The messages waiting (at least one, at most `max_msgs`), in order.

        Like `next_msg` for each of them, with one await for the lot; with auto-ack, a
        batch is acked when the next one is asked for (or at unsubscribe/close).
        """
        first = await self.next_msg(timeout)
        self._last = None
        queue = self._queue
        n = min(len(queue), max_msgs - 1)
        if n > 0:
            popleft = queue.popleft
            out = [first, *(popleft() for _ in range(n))]
            self.delivered += n
        else:
            out = [first]
        if not self.manual_ack:
            self._last_batch = out
        return out

    def _auto_ack(self) -> None:
        """With auto-ack: ack what the application was handed last (it asked for more)."""
        if self._last is not None:
            self._client._ack(self._last)
            self._last = None
        if self._last_batch is not None:
            self._client._ack_many(self._last_batch)
            self._last_batch = None

    def _push(self, msgs: list) -> None:
        self._queue.extend(msgs)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def pending(self) -> int:
        """Messages received and not yet handed to the application."""
        return len(self._queue)

    async def unsubscribe(self, delete: bool = False) -> None:
        """End the subscription; messages not yet handed out go back to the mesh.

        A durable subscription only detaches (its messages wait for the next client) unless `delete`.
        """
        if self._closed:
            return
        if not self.manual_ack:
            self._auto_ack()
        self._closed = True
        self._client._unsubscribe(self, delete)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def __aenter__(self) -> "Subscription":
        return await self

    async def __aexit__(self, *exc) -> None:
        await self.unsubscribe()


class Client:
    """A connection to the local agent (see `connect`)."""

    def __init__(self, endpoint: str, name: str = "", max_pending: int = 100_000, token: str | None = None,
                 max_pending_bytes: int = 32 << 20) -> None:
        self.endpoint = endpoint
        self.name = name
        self._token = token
        self._loop = asyncio.get_running_loop()
        self._session = os.urandom(8)
        self._channel = ClientChannel(endpoint, self._session)
        self._ids = IdGenerator()
        self._batch: _Batch | None = None
        self._flush_scheduled = False
        self._batch_ids = itertools.count(1)
        self._inflight: dict[int, _Batch] = {}
        self._inflight_msgs = 0
        self._inflight_bytes = 0
        self.max_pending = max_pending                  # publishes sent and not yet confirmed: at most
        self.max_pending_bytes = max_pending_bytes      # this many messages and about this many bytes
        self._room = asyncio.Event()
        self._room.set()
        self._valid_subjects: set[str] = set()
        self._subject_bytes: dict[str, bytes] = {}
        self._subs: dict[int, Subscription] = {}
        self._sids = itertools.count(1)
        self._acks: list[int] = []
        self._ack_scheduled = False
        self._epoch = 0
        self.seen_limit = 200_000     # ids remembered per subscription (redelivery dedupe)
        self.duplicates = 0
        self.expired_dropped = 0
        self._requests: dict[int, asyncio.Future] = {}
        self._req_ids = itertools.count(1)
        self._welcome: asyncio.Future | None = None
        self._status_waiters: collections.deque = collections.deque()
        self._dir_waiters: collections.deque = collections.deque()
        self._requests: dict[int, asyncio.Future] = {}
        self._req_ids = itertools.count(1)
        self._agent_instance = ""
        self._hello_at = 0.0
        self._last_heard = time.monotonic()
        self._closed = False
        self._broken: BaseException | None = None
        self.agent_info: dict = {}
        self._reader = self._loop.create_task(self._read_loop(), name="meshq-client-reader")
        self._keeper = self._loop.create_task(self._keepalive(), name="meshq-client-keepalive")

    # -------------------------------------------------------------- lifecycle
    async def _handshake(self, timeout: float) -> None:
        self._welcome = self._loop.create_future()
        self._channel.send([Kind.HELLO, self._hello()])
        try:
            await asyncio.wait_for(asyncio.shield(self._welcome), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no meshq agent answered at {self.endpoint} within {timeout} s "
                               "(is `meshq agent` running? set --agent or MESHQ_AGENT)") from None

    def _hello(self) -> bytes:
        hello = {"v": env.PROTOCOL_VERSION, "name": self.name}
        if self._token is not None:
            hello["token"] = self._token
        return pack(hello)

    async def close(self) -> None:
        """Flush pending acks, say goodbye and release the socket; idempotent."""
        if self._closed:
            return
        for sub in list(self._subs.values()):
            if not sub.manual_ack:
                sub._auto_ack()
        self._flush_acks()
        self._closed = True
        with contextlib.suppress(Exception):
            self._channel.send([Kind.BYE, pack({})])
        for task in (self._reader, self._keeper):
            task.cancel()
        await asyncio.gather(self._reader, self._keeper, return_exceptions=True)
        err = ConnectionClosedError("the client was closed")
        for batch in self._inflight.values():
            if not batch.future.done():
                batch.future.set_exception(err)
                batch.future.exception()  # mark retrieved
        if self._batch is not None and not self._batch.future.done():
            self._batch.future.set_exception(err)
            self._batch.future.exception()
        for sub in self._subs.values():
            sub._closed = True
            sub._push([])
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(err)
                fut.exception()
        await asyncio.sleep(0)
        self._channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosedError("the client is closed")

    # -------------------------------------------------------------- publishing
    async def publish(self, subject: str, data: bytes = b"", *, headers: Mapping[str, str] | None = None,
                      ttl: float | None = None, delay: float | None = None, not_before: float | None = None) -> bytes:
        """Publish and return the message id once the local agent has it durably.

        `ttl`: drop it if not delivered within this many seconds; `delay` (seconds) or
        `not_before` (epoch seconds): do not deliver it before then (kept durably by the agent).
        """
        ack = await self.publish_async(subject, data, headers=headers, ttl=ttl, delay=delay, not_before=not_before)
        self._flush_now()
        return await ack

    async def publish_async(self, subject: str, data: bytes = b"", *, headers: Mapping[str, str] | None = None,
                            ttl: float | None = None, delay: float | None = None,
                            not_before: float | None = None) -> _PubAck:
        """Queue a publish; returns an awaitable that completes once it is durable (see `flush`)."""
        if self._inflight_msgs >= self.max_pending or self._inflight_bytes >= self.max_pending_bytes:
            await self._make_room()
        self._check_open()
        if delay is not None or not_before is not None:
            headers = _with_not_before(headers, delay, not_before)
        return self._enqueue(subject, data, headers, ttl)

    async def _make_room(self) -> None:
        """Send what is queued and wait until unconfirmed publishes are within both bounds again."""
        self._flush_now()
        while self._inflight_msgs >= self.max_pending or self._inflight_bytes >= self.max_pending_bytes:
            self._check_open()
            self._room.clear()
            await self._room.wait()

    async def publish_many(self, subject: str, bodies, *, headers: Mapping[str, str] | None = None,
                           ttl: float | None = None) -> "_ManyAck":
        """Queue one publish per body in `bodies` (same subject, headers and ttl).

        The same as calling `publish_async` for each body, minus the per-call overhead;
        returns one awaitable that completes (with the list of message ids) once every
        one of them is durable at the agent, or raises the first refusal.
        """
        self._check_open()
        self._check_subject(subject)
        if headers is not None or ttl is not None:
            make_item(b"\0" * 16, subject, headers, 0, None, b"")   # check them once
            headers = dict(headers) if headers else None
        ids = self._ids
        now_ns = time.time_ns
        plain = headers is None and ttl is None
        subject_enc = self._subject_enc(subject)
        spans = []
        out_ids = []
        batch = None
        for data in bodies:
            if self._inflight_msgs >= self.max_pending or self._inflight_bytes >= self.max_pending_bytes:
                await self._make_room()
                batch = None
            if type(data) is not bytes:
                if not isinstance(data, (bytearray, memoryview)):
                    raise LocalProtocolError(f"message data must be bytes, not {type(data).__name__}")
                data = bytes(data)
            t = now_ns()
            msg_id = ids.next(t)
            created = t // 1_000_000
            b = self._batch
            if b is None:
                b = self._batch = _Batch(self._loop)
            if b is not batch:
                batch = b
                spans.append([b, b.n, b.n])
            if plain:
                b.parts.append(_plain_item(msg_id, subject_enc, created, data))
            else:
                b.parts.append(pack([msg_id, subject, headers, created,
                                     None if ttl is None else created + int(ttl * 1000), data]))
            b.n += 1
            spans[-1][2] = b.n
            out_ids.append(msg_id)
            b.bytes += len(data) + len(subject) + 32
            if b.n >= MAX_BATCH_ITEMS or b.bytes >= MAX_BATCH_BYTES:
                self._flush_now()
        if self._batch is not None and self._batch.n and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_now)
        return _ManyAck(spans, out_ids)

    def _subject_enc(self, subject: str) -> bytes:
        enc = self._subject_bytes.get(subject)
        if enc is None:
            if len(self._subject_bytes) >= 10_000:
                self._subject_bytes.clear()
            enc = self._subject_bytes[subject] = pack(subject)
        return enc

    def _check_subject(self, subject: str) -> None:
        valid = self._valid_subjects
        if subject not in valid:
            validate_subject(subject)
            if len(valid) >= 10_000:
                valid.clear()
            valid.add(subject)

    def _enqueue(self, subject, data, headers, ttl) -> _PubAck:
        if subject not in self._valid_subjects:
            self._check_subject(subject)
        now_ns = time.time_ns()
        msg_id = self._ids.next(now_ns)
        created = now_ns // 1_000_000
        if headers is None and ttl is None and type(data) is bytes:
            part = _plain_item(msg_id, self._subject_enc(subject), created, data)
        else:
            expires = None if ttl is None else created + int(ttl * 1000)
            part = pack(make_item(msg_id, subject, headers, created, expires, data))
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch(self._loop)
        batch.parts.append(part)
        ack = _PubAck(batch, batch.n, msg_id)
        batch.n += 1
        batch.bytes += len(data) + len(subject) + 32
        if batch.n >= MAX_BATCH_ITEMS or batch.bytes >= MAX_BATCH_BYTES:
            self._flush_now()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_now)
        return ack

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        batch = self._batch
        if batch is None or not batch.n:
            return
        self._batch = None
        batch_id = next(self._batch_ids)
        n = batch.n
        parts = batch.parts
        parts[0] = _array_header(n)
        batch.payload = b"".join(parts)
        batch.parts = None
        self._inflight[batch_id] = batch
        self._inflight_msgs += n
        self._inflight_bytes += batch.bytes
        if self._broken is None:
            self._channel.send([Kind.PUB, pack([batch_id]), batch.payload])

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every publish so far is durable at the agent."""
        self._flush_now()
        futures = [b.future for b in self._inflight.values()]
        if not futures:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*[asyncio.shield(f) for f in futures]), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"publishes not confirmed within {timeout} s") from None

    def _on_puback(self, h: Any) -> None:
        if type(h) is not list or len(h) != 3 or type(h[0]) is not int:
            raise RemoteProtocolError("PUBACK must be [batch_id, accepted, rejects]")
        if h[0] < 0:                          # the fate of a request (negative request id)
            fut = self._requests.get(-h[0])
            if h[2] and fut is not None and not fut.done():
                first = h[2][0]
                fut.set_exception(_reject_error(str(first[2]), str(first[3]), first[4] if len(first) > 4 else None))
            return
        batch = self._inflight.pop(h[0], None)
        if batch is None:
            return
        self._inflight_msgs -= batch.n
        self._inflight_bytes -= batch.bytes
        if not batch.future.done():
            batch.future.set_result(h[2])
        if self._inflight_msgs < self.max_pending and self._inflight_bytes < self.max_pending_bytes:
            self._room.set()

    # -------------------------------------------------------------- request/reply
    async def request(self, subject: str, data: bytes = b"", *, timeout: float = 5.0,
                      headers: Mapping[str, str] | None = None) -> Message:
        """Send a request and return the first reply; NoRespondersError at once, TimeoutError after `timeout` s."""
        self._check_open()
        validate_subject(subject)
        if not 0 < timeout <= 3600:
            raise ValueError("timeout must be between 0 and 3600 seconds")
        now_ns = time.time_ns()
        created = now_ns // 1_000_000
        item = make_item(self._ids.next(now_ns), subject, headers, created, created + int(timeout * 1000), data)
        req_id = next(self._req_ids)
        fut = self._loop.create_future()
        self._requests[req_id] = fut
        try:
            self._channel.send([Kind.REQ, pack([req_id, max(1, int(timeout * 1000))]), pack([item])])
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no reply to the request on {subject!r} within {timeout} s") from None
        finally:
            self._requests.pop(req_id, None)

    def serve(self, subject: str, *, group: str | None = None, manual_ack: bool = False,
              max_pending: int = 100_000) -> Subscription:
        """Serve requests on `subject`: a queue-group subscription (default group "_responders", so one
        responder answers each request); answer with `await msg.respond(data)`."""
        return self.subscribe(subject, group=group or SERVE_GROUP, manual_ack=manual_ack,
                              max_pending=max_pending, _service=True)

    def _respond(self, to: str, subject: str, data: bytes, headers) -> None:
        self._check_open()
        now_ns = time.time_ns()
        item = make_item(self._ids.next(now_ns), subject, headers, now_ns // 1_000_000, None, data)
        self._channel.send([Kind.RESPOND, pack({"to": to}), pack([item])])

    def _on_reply(self, h: Any, payload: bytes) -> None:
        if type(h) is not list or len(h) != 1 or type(h[0]) is not int:
            raise RemoteProtocolError("REPLY header must be [req_id]")
        fut = self._requests.get(h[0])
        items = unpack_items(payload)
        if fut is None or fut.done() or len(items) != 1:
            return
        item = items[0]
        headers = item[2]
        fut.set_result(Message((item[0], item[1], MappingProxyType(headers) if headers else _EMPTY, item[5],
                                False, item[3], item[4], self, None, 0, self._epoch)))

    async def directory(self, timeout: float = 5.0) -> dict:
        """The tenant's directory as the local agent sees it (entries of every agent, versions)."""
        return await self._ask(Kind.DIRQ, self._dir_waiters, "agent directory", timeout)

    # -------------------------------------------------------------- subscribing
    def subscribe(self, subject: str, *, group: str | None = None, durable: str | None = None,
                  filter: str | None = None, manual_ack: bool = False, ack_wait: float | None = None,
                  max_deliver: int | None = None, max_pending: int = 100_000, _service: bool = False) -> Subscription:
        """Subscribe to a subject pattern; `await` it to confirm, `async for` it to read.

        `group`: share the messages with the other members of a queue group; `durable`: keep
        the subscription (and its messages) while this client is away; `filter`: only messages
        whose headers match (see docs/filters.md); `ack_wait`/`max_deliver`: redelivery policy.
        """
        self._check_open()
        validate_pattern(subject)
        sid = next(self._sids)
        options = {k: v for k, v in (("durable", durable), ("filter", filter), ("ack_wait", ack_wait),
                                     ("max_deliver", max_deliver)) if v is not None}
        if _service:
            options["service"] = True
        sub = Subscription(self, sid, subject, group, manual_ack, max_pending, options)
        self._subs[sid] = sub
        self._send_sub(sub)
        return sub

    def _send_sub(self, sub: Subscription) -> None:
        self._channel.send([Kind.SUB, pack({"sid": sub.sid, "subject": sub.subject, "group": sub.group, **sub.options})])

    def _unsubscribe(self, sub: Subscription, delete: bool = False) -> None:
        if self._subs.pop(sub.sid, None) is not None and not self._closed:
            self._flush_acks()
            self._channel.send([Kind.UNSUB, pack({"sid": sub.sid, "delete": bool(delete)})])

    def _on_msg(self, h: Any, payload: bytes) -> None:
        if type(h) is not list or len(h) != 3 or type(h[0]) is not int or type(h[1]) is not int:
            raise RemoteProtocolError("MSG header must be [sid, first_tag, redelivered]")
        sid, tag, redelivered = h
        items = unpack_items(payload)
        sub = self._subs.get(sid)
        if sub is None:
            self._nack_tags([[tag, tag + len(items) - 1]], 0.0)
            return
        seen, order = sub._seen, sub._seen_order
        epoch = self._epoch
        redelivered = bool(redelivered)
        outstanding = sub._outstanding
        mids = [item[0] for item in items]
        if seen.isdisjoint(mids) and len(set(mids)) == len(mids):
            # no duplicates (the usual case): the whole batch at once
            seen.update(mids)
            order.extend(mids)
            tags = range(tag, tag + len(items))
            outstanding.update(tags)
            msgs = [Message((item[0], item[1], MappingProxyType(item[2]) if item[2] else _EMPTY, item[5],
                             redelivered, item[3], item[4], self, sub, t, epoch)) for t, item in zip(tags, items)]
            items = ()
        else:
            msgs = []
        for item in items:
            mid = item[0]
            if mid in seen:
                self.duplicates += 1
                self._acks.append(tag)
                tag += 1
                continue
            seen.add(mid)
            order.append(mid)
            outstanding.add(tag)
            headers = item[2]
            msgs.append(Message((mid, item[1], MappingProxyType(headers) if headers else _EMPTY, item[5],
                                 redelivered, item[3], item[4], self, sub, tag, epoch)))
            tag += 1
        while len(order) > self.seen_limit:
            seen.discard(order.popleft())
        if self._acks:
            self._schedule_acks()
        if msgs:
            sub._push(msgs)

    def _ack(self, msg: Message) -> None:
        sub, tag, epoch = msg[8], msg[9], msg[10]
        if sub is None or epoch != self._epoch or tag not in sub._outstanding:
            return
        sub._outstanding.discard(tag)
        self._acks.append(tag)
        if len(self._acks) >= ACK_BATCH:
            self._flush_acks()
        else:
            self._schedule_acks()

    def _ack_many(self, msgs: list) -> None:
        epoch = self._epoch
        acks = self._acks
        for msg in msgs:
            sub, tag = msg[8], msg[9]
            if msg[10] != epoch or tag not in sub._outstanding:
                continue
            sub._outstanding.discard(tag)
            acks.append(tag)
        if len(acks) >= ACK_BATCH:
            self._flush_acks()
        elif acks:
            self._schedule_acks()

    def _nack(self, msg: Message, delay: float) -> None:
        sub, tag, epoch = msg[8], msg[9], msg[10]
        if sub is None or epoch != self._epoch or tag not in sub._outstanding:
            return
        sub._outstanding.discard(tag)
        if sub._last is msg:
            sub._last = None
        sub._seen.discard(msg[0])
        self._nack_tags([[tag, tag]], delay)

    def _in_progress(self, msg: Message) -> None:
        sub, tag, epoch = msg[8], msg[9], msg[10]
        if epoch != self._epoch or tag not in sub._outstanding:
            return
        self._channel.send([Kind.IN_PROGRESS, pack([[tag, tag]])])

    def _on_expired(self, h: Any) -> None:
        """The agent gave these deliveries back (ack wait passed): forget them so they can come again."""
        if type(h) is not list:
            raise RemoteProtocolError("EXPIRED must be a list of [sid, tag, id]")
        for entry in h:
            if type(entry) is not list or len(entry) != 3:
                continue
            sid, tag, mid = entry
            sub = self._subs.get(sid)
            if sub is not None:
                sub._outstanding.discard(tag)
                sub._seen.discard(mid)

    # -------------------------------------------------------------- dead letters
    async def _request_dlq(self, op: str, msg_id: str | None, timeout: float) -> Any:
        self._check_open()
        req_id = next(self._req_ids)
        fut = self._loop.create_future()
        self._requests[req_id] = fut
        self._channel.send([Kind.DLQ, pack([req_id, op, msg_id])])
        try:
            result, error = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no answer to dlq {op} within {timeout} s") from None
        finally:
            self._requests.pop(req_id, None)
        if error:
            raise MeshqError(error)
        return result

    async def dlq_list(self, timeout: float = 10.0) -> list[dict]:
        """This tenant's dead letters on the local agent (summaries, oldest first)."""
        return await self._request_dlq("list", None, timeout)

    async def dlq_show(self, msg_id: str, timeout: float = 10.0) -> dict:
        """One dead letter with headers, body (`data`, bytes) and its attempt history."""
        return await self._request_dlq("show", msg_id, timeout)

    async def dlq_requeue(self, msg_id: str, timeout: float = 10.0) -> dict:
        """Republish a dead letter to its subject (new id, header meshq-requeued-from) and remove it."""
        return await self._request_dlq("requeue", msg_id, timeout)

    async def dlq_purge(self, msg_id: str | None = None, timeout: float = 10.0) -> int:
        """Delete one dead letter, or all of this tenant's; returns how many."""
        return (await self._request_dlq("purge", msg_id, timeout))["purged"]

    def _nack_tags(self, ranges: list, delay: float) -> None:
        self._flush_acks()
        self._channel.send([Kind.NACK, pack({"tags": ranges, "delay": float(delay)})])

    def _schedule_acks(self) -> None:
        if not self._ack_scheduled:
            self._ack_scheduled = True
            self._loop.call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        tags = self._acks
        if not tags or self._broken is not None:
            return
        self._acks = []
        tags.sort()
        ranges = []
        start = prev = tags[0]
        for t in tags[1:]:
            if t != prev + 1:
                ranges.append([start, prev])
                start = t
            prev = t
        ranges.append([start, prev])
        self._channel.send([Kind.ACK, pack(ranges)])

    # -------------------------------------------------------------- status
    async def status(self, timeout: float = 5.0) -> dict:
        """The local agent's status (name, peers, outbox depth, counters)."""
        return await self._ask(Kind.STATUS, self._status_waiters, "agent status", timeout)

    async def _ask(self, kind: bytes, waiters: collections.deque, what: str, timeout: float) -> Any:
        """Send a one-shot request frame and wait for the answer its reader hands to `waiters`.

        The request is idempotent and asked again every ASK_RETRY seconds: an agent that
        restarted, or detached this client as silent, drops the first one unanswered.
        """
        self._check_open()
        fut = self._loop.create_future()
        waiters.append(fut)
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._channel.send([kind, pack({})])
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what} not received within {timeout} s")
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), min(left, ASK_RETRY))
                except asyncio.TimeoutError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"{what} not received within {timeout} s") from None
        finally:
            fut.cancel()
            if fut in waiters:
                waiters.remove(fut)

    # -------------------------------------------------------------- the reader and keeper
    async def _read_loop(self) -> None:
        recv = self._channel.recv
        while True:
            frames = await recv()
            self._last_heard = time.monotonic()
            try:
                self._dispatch(frames)
            except (RemoteProtocolError, ValueError, TypeError, KeyError, IndexError):
                pass  # a malformed frame from the agent is dropped

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            raise RemoteProtocolError("frame too short")
        kind = frames[0]
        if kind == Kind.MSG and len(frames) == 3:
            self._on_msg(unpack_header(frames[1]), frames[2])
            return
        if kind == Kind.REPLY and len(frames) == 3:
            self._on_reply(unpack_header(frames[1]), frames[2])
            return
        if kind == Kind.DIRQOK and len(frames) == 3:
            listing = unpack_bulk(frames[2])
            while self._dir_waiters:
                fut = self._dir_waiters.popleft()
                if not fut.done():
                    fut.set_result(listing)
                    break
            return
        h = unpack_header(frames[1])
        if kind == Kind.PUBACK:
            self._on_puback(h)
        elif kind == Kind.SUBOK:
            sub = self._subs.get(h.get("sid")) if type(h) is dict else None
            if sub is not None and not sub._confirmed.done():
                if h.get("error"):
                    sub._confirmed.set_exception(_reject_error(str(h.get("code", "bad-subject")), str(h["error"])))
                    self._subs.pop(sub.sid, None)
                else:
                    sub._confirmed.set_result(None)
        elif kind == Kind.WELCOME:
            self._on_welcome(h)
        elif kind == Kind.HEARTBEAT:
            if type(h) is dict and h.get("instance") != self._agent_instance and self._agent_instance:
                self._rehello()
        elif kind == Kind.ERROR:
            code = h.get("code") if type(h) is dict else None
            if code == "hello":
                self._rehello()
            elif code == "auth" and self._welcome is not None and not self._welcome.done():
                self._welcome.set_exception(AuthorizationError(str(h.get("message", "refused by the agent"))))
        elif kind == Kind.EXPIRED:
            self._on_expired(h)
        elif kind == Kind.DLQOK:
            if type(h) is list and len(h) == 3 and type(h[0]) is int:
                fut = self._requests.get(h[0])
                if fut is not None and not fut.done():
                    fut.set_result((h[1], h[2]))
        elif kind == Kind.STATUSOK:
            while self._status_waiters:
                fut = self._status_waiters.popleft()
                if not fut.done():
                    fut.set_result(h)
                    break

    def _on_welcome(self, h: Any) -> None:
        if type(h) is not dict:
            raise RemoteProtocolError("WELCOME must be a map")
        restarted = bool(self._agent_instance) and h.get("instance") != self._agent_instance
        self._agent_instance = h.get("instance", "")
        self.agent_info = h
        self._broken = None
        if restarted or self._epoch:
            self._resume()
        self._epoch += 1
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_result(h)

    def _rehello(self) -> None:
        """The agent does not know us (it restarted): introduce ourselves again."""
        now = time.monotonic()
        if now - self._hello_at < 0.5:
            return
        self._hello_at = now
        self._acks = []
        self._channel.send([Kind.HELLO, self._hello()])

    def _resume(self) -> None:
        """After a new WELCOME: resubscribe and resend unconfirmed publishes, in order."""
        self._acks = []
        for sub in self._subs.values():
            sub._outstanding.clear()
            sub._last = sub._last_batch = None
            self._send_sub(sub)
        for batch_id in sorted(self._inflight):
            self._channel.send([Kind.PUB, pack([batch_id]), self._inflight[batch_id].payload])

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            self._channel.send([Kind.HEARTBEAT, pack({})])
            if time.monotonic() - self._last_heard > AGENT_SILENCE * 3:
                # long silence: the agent may have restarted without our noticing; ask again
                self._rehello()
                self._last_heard = time.monotonic()


def _with_not_before(headers: Mapping[str, str] | None, delay: float | None, not_before: float | None) -> dict:
    """Headers plus the reserved meshq-not-before (epoch ms) for a delayed publish."""
    if delay is not None and not_before is not None:
        raise ValueError("give delay or not_before, not both")
    due = time.time() + delay if delay is not None else not_before
    if not isinstance(due, (int, float)) or due != due:
        raise ValueError("delay/not_before must be a number of seconds")
    out = dict(headers or {})
    out[NOT_BEFORE_HEADER] = str(max(0, int(due * 1000)))
    return out


async def connect(agent: str | None = None, *, creds: str | None = None, name: str = "", timeout: float = 5.0,
                  max_pending: int = 100_000, max_pending_bytes: int = 32 << 20) -> Client:
    """Connect to the local agent (`agent`: endpoint or data dir, default $MESHQ_AGENT; `creds`: a token file, default $MESHQ_CREDS)."""
    creds = creds or os.environ.get("MESHQ_CREDS") or None
    token = load_token_file(creds).token if creds else None
    client = Client(resolve_agent(agent), name=name, max_pending=max_pending, token=token,
                    max_pending_bytes=max_pending_bytes)
    try:
        await client._handshake(timeout)
    except BaseException:
        await client.close()
        raise
    return client
