"""Property tests: every decoder facing the network turns arbitrary input into typed errors only.

Fixed budgets (max_examples) keep CI bounded; `derandomize` makes a CI run repeatable.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshq import MeshqError
from meshq._envelope import Kind, check_item, unpack_header, unpack_items
from meshq._errors import RemoteProtocolError
from meshq._peers import decode_peer_list, decode_probe, decode_probe_ack

BUDGET = settings(max_examples=300, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# msgpack values of every shape, nested a little
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats(allow_nan=True)
    | st.text(max_size=40) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=10), inner, max_size=8),
    max_leaves=30,
)
frames_bytes = st.one_of(st.binary(max_size=300), msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)))


@BUDGET
@given(data=frames_bytes)
def test_header_decoder_raises_only_typed_errors(data):
    try:
        unpack_header(data)
    except RemoteProtocolError:
        pass


@BUDGET
@given(data=frames_bytes)
def test_payload_decoder_raises_only_typed_errors(data):
    try:
        items = unpack_items(data)
    except RemoteProtocolError:
        return
    for item in items:   # whatever got through has the documented shape
        check_item(item)
        assert len(item[0]) == 16 and isinstance(item[5], bytes)


@BUDGET
@given(value=msgpack_values)
def test_mesh_frame_decoders_raise_only_typed_errors(value):
    for decode in (decode_peer_list, decode_probe, decode_probe_ack):
        try:
            decode(value)
        except RemoteProtocolError:
            pass


KINDS = [getattr(Kind, k) for k in dir(Kind) if not k.startswith("_")] + [b"", b"\xff", b"XX"]
agent_frames = st.lists(st.one_of(st.sampled_from(KINDS), frames_bytes), min_size=0, max_size=5)


@pytest.fixture(scope="module")
def agent():
    """A real agent (real sockets, real LevelDB) whose frame handlers we call directly."""
    from meshq._agent import Agent, AgentConfig
    tmp = tempfile.mkdtemp(prefix="mq-dec-")
    a = Agent(AgentConfig(data_dir=os.path.join(tmp, "a"), listen="tcp://127.0.0.1:*"))
    yield a
    a.stop()
    a._shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def _only_typed(handler, *args):
    try:
        handler(*args)
    except (MeshqError, UnicodeDecodeError):
        pass    # typed: the agent's guard drops and counts these


@BUDGET
@given(frames=agent_frames, as_known_client=st.booleans())
def test_agent_client_handler_raises_only_typed_errors(agent, frames, as_known_client):
    ident = b"fuzz-client"
    if as_known_client:
        agent._client_hello(ident, {"v": 1, "name": "fuzz"})
    _only_typed(agent._on_client_frames, [ident, *frames])
    agent._pubacks.clear()


@BUDGET
@given(frames=agent_frames, user=st.sampled_from(["", "k" * 40]))
def test_agent_peer_handler_raises_only_typed_errors(agent, frames, user):
    _only_typed(agent._on_peer_frames, [b"fuzzpeer", *frames], user)


@BUDGET
@given(frames=agent_frames)
def test_agent_link_handler_raises_only_typed_errors(agent, frames):
    from meshq._agent import Peer
    dealer = object()
    peer = Peer("fuzzlink", "tcp://127.0.0.1:9", None)
    agent._dials[dealer] = peer
    try:
        _only_typed(agent._on_dealer_frames, frames, dealer)
    finally:
        agent._dials.pop(dealer, None)


# frames of almost the right shape reach deeper than random bytes
ints = st.integers(-(2 ** 63), 2 ** 64 - 1)


def _packed(strategy):
    return strategy.map(lambda v: msgpack.packb(v, use_bin_type=True))


item_like = st.lists(msgpack_values, min_size=6, max_size=6) | st.tuples(
    st.binary(min_size=16, max_size=16), st.text(min_size=1, max_size=20),
    st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5) | ints, max_size=3),
    ints, st.none() | ints, st.binary(max_size=20)).map(list)
sub_like = st.fixed_dictionaries({"sid": ints | st.text(), "subject": st.text(max_size=20) | ints},
                                 optional={"group": msgpack_values, "durable": msgpack_values, "filter": msgpack_values,
                                           "ack_wait": msgpack_values, "max_deliver": msgpack_values})
shaped_client_frames = st.one_of(
    st.tuples(st.just(Kind.PUB), _packed(st.lists(ints, min_size=1, max_size=2)),
              _packed(st.lists(item_like, max_size=4))).map(list),
    st.tuples(st.just(Kind.SUB), _packed(sub_like)).map(list),
    st.tuples(st.just(Kind.ACK), _packed(st.lists(st.lists(st.integers(-5, 10 ** 7), min_size=2, max_size=2), max_size=3))).map(list),
    st.tuples(st.just(Kind.NACK), _packed(st.fixed_dictionaries({"tags": msgpack_values, "delay": msgpack_values}))).map(list),
    st.tuples(st.sampled_from([Kind.UNSUB, Kind.STATUS, Kind.HEARTBEAT, Kind.HELLO]), _packed(msgpack_values)).map(list),
)
shaped_peer_frames = st.one_of(
    st.tuples(st.just(Kind.DELIVER), _packed(st.lists(msgpack_values | ints, max_size=4)),
              _packed(st.lists(item_like, max_size=4))).map(list),
    st.tuples(st.sampled_from([Kind.HELLO, Kind.DIR, Kind.PROOF, Kind.HEARTBEAT, b"L", b"Q"]),
              _packed(st.dictionaries(st.sampled_from(["id", "pk", "endpoint", "instance", "member", "tenant",
                                                       "version", "subs", "target", "type", "nonce", "tags"]),
                                      msgpack_values, max_size=6))).map(list),
)


@BUDGET
@given(frames=shaped_client_frames)
def test_agent_client_handler_with_shaped_frames(agent, frames):
    ident = b"fuzz-shaped"
    agent._client_hello(ident, {"v": 1, "name": "fuzz"})
    _only_typed(agent._on_client_frames, [ident, *frames])
    agent._pubacks.clear()
    agent.store.commit()


@BUDGET
@given(frames=shaped_peer_frames)
def test_agent_peer_handler_with_shaped_frames(agent, frames):
    _only_typed(agent._on_peer_frames, [b"fuzzpeer", *frames], "k" * 40)


def test_fuzzing_hit_no_internal_error(agent):
    """Runs last in this module: nothing above fell through to the catch-all of the receive loop."""
    assert agent.counters.get("internal_errors", 0) == 0
