"""Pure delivery-semantics decisions (`_deadletter`) and hostile DLQ/IN_PROGRESS frames."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

import meshq
from meshq._deadletter import (
    NOT_BEFORE_HEADER, TOMBSTONE_EXPIRY, Attempt, DeadLetter, decode_dlq_request, decode_tag_ranges, is_dead,
    not_before_ms, sweep_verdict, tombstone,
)
from meshq._envelope import Kind
from meshq._errors import RemoteProtocolError
from test_hostile import _zmq_garbage

ITEM = [b"\x01" * 16, "orders.new", {"k": "v"}, 1_000, None, b"body"]


def test_dead_letter_round_trips_and_summarises():
    letter = DeadLetter(list(ITEM), [Attempt("a", 5, "nack"), Attempt("b", 6, "ack-wait")], 7, "prod", "g:w", "orders.>")
    back = DeadLetter.decode(msgpack.unpackb(msgpack.packb(letter.encode(), use_bin_type=True), raw=False))
    assert back.item == ITEM and back.history == letter.history and back.lane == "g:w"
    assert back.summary()["attempts"] == 2 and back.summary()["last_reason"] == "ack-wait"
    assert back.details()["history"][0] == {"agent": "a", "at_ms": 5, "reason": "nack"}


@pytest.mark.parametrize("bad", [None, [], [1, "list"], [1, "drop", None], ["1", "list", None], [1, "show", None],
                                 [1, "show", "xyz"], [1, "purge", 5], [1, "requeue", "a" * 65]])
def test_malformed_dlq_requests_are_typed_errors(bad):
    with pytest.raises(RemoteProtocolError):
        decode_dlq_request(bad)


def test_dlq_request_and_tag_ranges_decode():
    assert decode_dlq_request([3, "purge", None]) == (3, "purge", None)
    assert decode_tag_ranges([[1, 3], [7, 7]]) == [(1, 3), (7, 7)]
    for bad in ([[3, 1]], [[1]], "x", [[0, 10**9]]):
        with pytest.raises(RemoteProtocolError):
            decode_tag_ranges(bad, 1000)


@given(st.integers(0, 50), st.one_of(st.none(), st.integers(1, 50)))
def test_is_dead_only_at_max_deliver(failures, max_deliver):
    assert is_dead(failures, max_deliver) == (max_deliver is not None and failures >= max_deliver)


@settings(max_examples=200)
@given(st.integers(0, 10**13), st.one_of(st.none(), st.integers(0, 10**13)), st.integers(0, 10**13),
       st.one_of(st.none(), st.integers(1, 10**9)))
def test_sweep_verdict(created, expires, now, retention):
    item = [b"\x00" * 16, "s", None, created, expires, b""]
    why = sweep_verdict(item, now, retention)
    if expires == TOMBSTONE_EXPIRY:
        assert why is None
    elif expires is not None and expires <= now:
        assert why == "expired"
    elif retention is not None and created < now - retention:
        assert why == "retention"
    else:
        assert why is None
    assert sweep_verdict(tombstone(item), now, retention) is None


def test_not_before_header_parsing():
    assert not_before_ms({NOT_BEFORE_HEADER: "1700000000000"}) == 1_700_000_000_000
    for h in (None, {}, {NOT_BEFORE_HEADER: "soon"}, {NOT_BEFORE_HEADER: "-5"}, {NOT_BEFORE_HEADER: "9" * 30}):
        assert not_before_ms(h) is None


def test_garbage_dlq_and_in_progress_frames_are_dropped_and_counted(agents):
    a = agents.start("a")

    async def main():
        async with await meshq.connect(a.client_endpoint) as cl:
            ident = b"garbage-client"
            hello = msgpack.packb({"v": 1, "name": "g"})
            frames = [[Kind.HELLO, hello]]
            for payload in (b"\xc1", msgpack.packb([1, "explode", None]), msgpack.packb({"x": 1}),
                            msgpack.packb([[5, 1]]), msgpack.packb([1, "show", "zz"])):
                frames += [[Kind.DLQ, payload], [Kind.IN_PROGRESS, payload]]
            await asyncio.to_thread(_zmq_garbage, a.client_endpoint, frames, ident)
            await asyncio.sleep(0.5)
            st = await cl.status()
            assert st["counters"].get("dropped_client_frames", 0) >= 9
            assert await cl.dlq_list() == []     # still serving
    asyncio.run(main())
