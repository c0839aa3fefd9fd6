"""Directory: replicated per-tenant entries converge under drops, duplicates, reordering, expiry and restarts."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshq._directory import AgentInfo, Change, Directory, Entry, Service, Subscription
from meshq._errors import (
    BadFilterError,
    BadSubjectError,
    CorruptStateError,
    LocalProtocolError,
    RemoteProtocolError,
)

TTL = 5.0
IDS = ["a", "b", "c", "d", "e"]
KEYS = ["k0", "k1", "k2"]
VALUES = [
    Subscription("orders.>"),
    Subscription("orders.*", queue="workers"),
    Subscription("orders.eu", durable="audit", filter="priority>=5"),
    Subscription("*.eu", filter="region=eu|us"),
    Service("billing"),
    AgentInfo("tcp://10.0.0.1:7001", "host-1"),
]


def live(d: Directory) -> set:
    return set(d.entries())


def truth(replicas: list[Directory]) -> set:
    """What every replica must hold: each agent's own live entries."""
    return {e for d in replicas for e in d.entries() if e.origin == d.self_id}


def exchange_round(replicas: list[Directory], now: float) -> None:
    """Every ordered pair: i asks j for what it misses and applies it."""
    for i in replicas:
        for j in replicas:
            if i is not j:
                i.apply(j.delta_since(i.versions()), now)


_put = st.tuples(st.just("put"), st.integers(0, 4), st.integers(0, len(KEYS) - 1), st.integers(0, len(VALUES) - 1))
_remove = st.tuples(st.just("remove"), st.integers(0, 4), st.integers(0, len(KEYS) - 1))
_deliver = st.tuples(st.just("deliver"), st.integers(0, 1000), st.booleans())   # True: a duplicate stays in flight
ops = st.one_of(   # repeated branches weight the mix towards writes and (lossy, reordered) delivery
    _put, _put, _put, _remove, _remove, _remove, _deliver, _deliver, _deliver, _deliver,
    st.tuples(st.just("drop"), st.integers(0, 1000)),
    st.tuples(st.just("sync"), st.integers(0, 4), st.integers(0, 4)),
    st.tuples(st.just("snap"), st.integers(0, 4), st.integers(0, 4)),
    st.tuples(st.just("tick"), st.floats(0, 2.0)),
    st.tuples(st.just("tick"), st.floats(0, 2.0)),
    st.tuples(st.just("expire"), st.integers(0, 5)),     # 5: every replica
    st.tuples(st.just("expire"), st.integers(0, 5)),
    st.tuples(st.just("restart"), st.integers(0, 4)),
)


def run(n: int, script: list, lost_state: bool) -> tuple[list[Directory], float]:
    replicas = [Directory(IDS[i], tombstone_ttl=TTL) for i in range(n)]
    routing = [set() for _ in range(n)]     # each replica's remote entries, rebuilt only from Changes
    net: list[tuple[float, int, list]] = []  # (sent at, destination, message)
    now = 0.0
    lost_restarts = 0

    def deliver(dst: int, msg: list) -> None:
        for ch in replicas[dst].apply(msg, now):
            assert isinstance(ch, Change)
            if ch.old is not None:
                routing[dst].remove(ch.old)
            if ch.new is not None:
                routing[dst].add(ch.new)

    def broadcast(src: int, delta) -> None:
        if delta is not None:
            net.extend((now, dst, delta) for dst in range(n) if dst != src)

    for op in script:
        kind = op[0]
        if kind == "put":
            r = op[1] % n
            broadcast(r, replicas[r].put_local(KEYS[op[2]], VALUES[op[3]], now))
        elif kind == "remove":
            r = op[1] % n
            broadcast(r, replicas[r].remove_local(KEYS[op[2]], now))
        elif kind in ("sync", "snap"):
            src, dst = op[1] % n, op[2] % n
            if src != dst:
                msg = replicas[src].snapshot() if kind == "snap" else replicas[src].delta_since(replicas[dst].versions())
                net.append((now, dst, msg))
        elif kind == "deliver" and net:
            i = op[1] % len(net)
            sent, dst, msg = net[i] if op[2] else net.pop(i)   # op[2]: leave a duplicate in flight
            if now - sent < TTL:                               # delays stay below the tombstone ttl
                deliver(dst, msg)
        elif kind == "drop" and net:
            net.pop(op[1] % len(net))
        elif kind == "tick":
            now += op[1]
        elif kind == "expire":
            for d in (replicas if op[1] == 5 else [replicas[op[1] % n]]):
                d.expire(now)
        elif kind == "restart":
            r = op[1] % n
            if lost_state:   # a fresh start with an epoch above every earlier version (like wall-clock µs)
                lost_restarts += 1
                replicas[r] = Directory(IDS[r], tombstone_ttl=TTL, epoch=1_000_000 * lost_restarts)
            else:
                replicas[r] = Directory.from_state(replicas[r].to_state(), IDS[r], now)
            routing[r] = {e for e in replicas[r].entries() if e.origin != IDS[r]}
        # invariant at every step: the Change stream reproduces each replica's remote entries
        for i, d in enumerate(replicas):
            assert routing[i] == {e for e in d.entries() if e.origin != d.self_id}
    return replicas, now


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 5), script=st.lists(ops, min_size=20, max_size=100))
def test_replicas_converge_after_one_exchange_round(n, script):
    replicas, now = run(n, script, lost_state=False)
    exchange_round(replicas, now)
    expected = truth(replicas)
    for d in replicas:
        assert live(d) == expected      # identical, and nothing removed came back
    # the directory is quiescent: another round changes nothing
    before = [d.snapshot() for d in replicas]
    exchange_round(replicas, now)
    assert [d.snapshot() for d in replicas] == before


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 5), script=st.lists(ops, min_size=20, max_size=100))
# b's put v3 reaches only c; b restarts without state; a, complete for b after b's full
# listing, must not take c's stale v3 over its own older tombstone of the key
@example(n=3, script=[("put", 1, 0, 0), ("remove", 1, 0), ("deliver", 0, False), ("deliver", 0, False),
                      ("deliver", 0, False), ("put", 1, 0, 0), ("drop", 0), ("drop", 0), ("restart", 1),
                      ("deliver", 0, False)] + [("remove", 0, 0)] * 10)
def test_replicas_converge_after_restarts_without_state_given_an_epoch(n, script):
    replicas, now = run(n, script, lost_state=True)
    exchange_round(replicas, now)
    expected = truth(replicas)
    for d in replicas:
        assert live(d) == expected
    before = [d.snapshot() for d in replicas]
    exchange_round(replicas, now)
    assert [d.snapshot() for d in replicas] == before


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 4), script=st.lists(ops, min_size=20, max_size=100), wait=st.floats(0, 3 * TTL))
@example(n=3, script=[('put', 2, 0, 0), ('remove', 0, 0), ('remove', 0, 0), ('drop', 0), ('tick', 0.0),
                      ('deliver', 0, False), ('drop', 0), ('drop', 0), ('drop', 0), ('drop', 0), ('drop', 0),
                      ('remove', 0, 0), ('remove', 0, 0), ('remove', 0, 0), ('remove', 0, 0), ('remove', 0, 0),
                      ('put', 0, 0, 0), ('remove', 2, 0), ('drop', 0), ('drop', 0)], wait=5.0)
def test_expiry_everywhere_then_sync_does_not_resurrect(n, script, wait):
    """Laggards meet replicas that purged the tombstones they miss: a full round still reaches the truth."""
    replicas, now = run(n, script, lost_state=False)
    now += wait
    for d in replicas:
        d.expire(now)
    exchange_round(replicas, now)
    for d in replicas:
        assert live(d) == truth(replicas)


# ----------------------------------------------------------------------------- unit tests


def test_put_remove_and_deltas():
    a, b = Directory("a"), Directory("b")
    d1 = a.put_local("sub:1", Subscription("orders.*", queue="q"), 0.0)
    assert d1 == [["a", 0, 1, [["sub:1", 1, "sub", ["orders.*", "q", None, None]]], 0]]
    (ch,) = b.apply(d1, 0.0)
    assert ch.action == "added" and ch.new.origin == "a" and ch.new.version == 1
    assert b.apply(d1, 0.0) == []                         # idempotent
    d2 = a.put_local("sub:1", Subscription("orders.>"), 1.0)
    assert [c.action for c in b.apply(d2, 1.0)] == ["updated"]
    d3 = a.remove_local("sub:1", 2.0)
    assert a.remove_local("sub:1", 2.0) is None
    assert [c.action for c in b.apply(d3, 2.0)] == ["removed"]
    assert b.apply(d2, 3.0) == []                         # late, older delta: ignored
    assert list(b.entries()) == [] and b.versions() == {"a": 3}


def test_reordered_deltas_fill_in_via_delta_since():
    a, b = Directory("a"), Directory("b")
    d1 = a.put_local("x", Service("s1"), 0)
    d2 = a.put_local("y", Service("s2"), 0)
    b.apply(d2, 0)                                        # d1 lost
    assert b.versions().get("a", 0) == 0                  # gap: not complete
    b.apply(a.delta_since(b.versions()), 0)
    assert {e.key for e in b.entries()} == {"x", "y"} and b.versions() == {"a": 2}
    b.apply(d1, 0)
    assert len(b) == 2


def test_matching_and_services_and_agent_info():
    a, b = Directory("a"), Directory("b")
    for key, value in [("s1", Subscription("orders.>")), ("s2", Subscription("orders.*.eu")),
                       ("s3", Subscription("users.*")), ("svc", Service("billing")),
                       ("agent", AgentInfo("tcp://h:1", "h"))]:
        b.apply(a.put_local(key, value, 0), 0)
    b.put_local("mine", Subscription("orders.new.eu"), 0)
    got = [(e.origin, e.key) for e in b.subscriptions_matching("orders.new.eu")]
    assert got == [("a", "s1"), ("a", "s2"), ("b", "mine")]
    assert [e.key for e in b.subscriptions_matching("users.x")] == ["s3"]
    assert b.subscriptions_matching("nothing") == []
    assert [e.origin for e in b.services("billing")] == ["a"]
    assert b.agent_info("a").value == AgentInfo("tcp://h:1", "h")
    b.apply(a.remove_local("s1", 1), 1)
    assert [e.key for e in b.subscriptions_matching("orders.new.eu")] == ["s2", "mine"]
    assert {e.key for e in b.entries("sub")} == {"s2", "s3", "mine"}


def test_subscription_filter_is_canonical_and_evaluated():
    s = Subscription("a.b", filter="priority >= 5 , region=eu")
    assert s.filter == "priority>=5,region=eu"
    assert s.accepts_headers({"priority": "7", "region": "eu"})
    assert not s.accepts_headers({"priority": "3", "region": "eu"})
    with pytest.raises(BadFilterError):
        Subscription("a.b", filter="priority>=high")
    with pytest.raises(BadSubjectError):
        Subscription("a..b")
    with pytest.raises(LocalProtocolError):
        Subscription("a.b", queue="")


def test_entries_are_immutable():
    a = Directory("a")
    a.put_local("k", Subscription("x"), 0)
    (e,) = a.entries()
    with pytest.raises(AttributeError):
        e.version = 9
    with pytest.raises(AttributeError):
        e.value.pattern = "y"


def test_persistence_round_trip_keeps_counter_monotonic():
    a = Directory("a", tombstone_ttl=10)
    b = Directory("b")
    a.put_local("k1", Subscription("x.>", durable="d", filter="k"), 0)
    a.put_local("k2", Service("svc"), 0)
    a.remove_local("k2", 1)
    b.put_local("agent", AgentInfo("tcp://b:1"), 0)
    a.apply(b.snapshot(), 0)
    restored = Directory.from_state(a.to_state(), "a", now=100.0)
    assert restored.snapshot() == a.snapshot()
    assert restored.versions() == a.versions() and restored.tombstone_ttl == 10
    assert [e.key for e in restored.subscriptions_matching("x.y")] == ["k1"]
    delta = restored.put_local("k3", Service("t"), 101)
    assert delta[0][2] == 4                               # continues after version 3
    assert restored.expire(105) == 0 and restored.expire(110) == 1   # tombstone timer restarted at `now`


def test_corrupt_state_is_a_typed_error():
    for data in [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"format": 99}),
                 msgpack.packb({"format": 1, "self": "a", "ttl": 1.0, "complete": {}, "floor": {},
                                "forgotten": {}, "entries": [["a", "k", -1]]})]:
        with pytest.raises(CorruptStateError):
            Directory.from_state(data, "a")


def test_own_entries_cannot_be_overwritten_from_outside():
    a, b = Directory("a"), Directory("b")
    a.put_local("k", Subscription("x"), 0)
    b.apply(a.snapshot(), 0)
    forged = seg([["k", 1, "sub", ["evil.>", None, None, None]]])
    a.apply(forged, 0)                                    # same version, other content: we lost nothing, we reset
    assert {(e.key, e.value.pattern) for e in a.entries()} == {("k", "x")}
    a.apply(seg([["k", 1]]), 0)                # forged removal
    assert a.get("a", "k").value.pattern == "x"
    assert a.counter > 1                                  # the reset re-stamped our entry past the forgery
    b.apply(a.delta_since(b.versions()), 0)
    assert b.get("a", "k").value.pattern == "x" and b.get("a", "k").version == a.counter


def test_restart_without_state_jumps_counter_and_retracts_old_entries():
    a, b = Directory("a"), Directory("b")
    for i in range(5):
        b.apply(a.put_local(f"old{i}", Subscription(f"old.{i}"), 0), 0)
    a2 = Directory("a")                                    # lost its disk
    b.apply(a2.put_local("new", Subscription("new.x"), 1), 1)   # version 1 collides with old history
    a2.apply(b.delta_since(a2.versions()), 1)             # sees own version 5 > 1: resets
    assert a2.counter > 5 and a2.resets == 1
    b.apply(a2.delta_since(b.versions()), 1)
    assert {e.key for e in b.entries()} == {"new"} and b.get("a", "new").version == a2.counter
    # a peer reporting a higher own version in delta_since also triggers the jump
    a3 = Directory("a")
    a3.delta_since({"a": 40})
    assert a3.counter > 40


def test_tombstones_expire_and_stale_copies_stay_dead():
    a, b, c = Directory("a", 5), Directory("b", 5), Directory("c", 5)
    d = a.put_local("k", Subscription("x"), 0)
    b.apply(d, 0)
    c.apply(d, 0)
    stale = b.snapshot()
    rm = a.remove_local("k", 1)
    b.apply(rm, 1)
    for x in (a, b):
        assert x.expire(5.9) == 0
        assert x.expire(6.0) == 1
    b.apply(stale, 7)                                     # a stale copy arrives after the purge
    b.apply(c.delta_since(b.versions()), 7)               # and from a replica that never saw the removal
    assert b.get("a", "k") is None
    c.apply(a.delta_since(c.versions()), 7)               # a full listing (floor) repairs the laggard
    assert c.get("a", "k") is None and c.versions()["a"] == 2


def test_purge_floor_travels_with_full_listings():
    """A relay that learned an origin from a post-purge listing must not vouch for a laggard's stale entry."""
    a, b, c = Directory("a", 5), Directory("b", 5), Directory("c", 5)
    c.apply(b.put_local("k", Subscription("x"), 0), 0)   # c has the entry ...
    b.remove_local("k", 0)                              # ... and misses its removal
    b.expire(5)                                         # the tombstone is purged at the origin
    a.apply(b.delta_since(a.versions()), 5)             # a learns b's (empty) state and b's floor
    c.apply(a.delta_since(c.versions()), 5)             # a must answer c with a full listing
    assert c.get("b", "k") is None and c.versions() == {"b": 2}


def test_forget_origin():
    a, b = Directory("a", 5), Directory("b", 5)
    snap_before = a.snapshot()
    b.apply(a.put_local("k", Subscription("x"), 0), 0)
    snap = a.snapshot()
    (ch,) = b.forget_origin("a", 1)
    assert ch.action == "removed" and len(b) == 0
    assert b.apply(snap, 2) == [] and len(b) == 0         # relayed stale copies stay forgotten
    assert "a" not in b.versions() and not any(s[0] == "a" for s in b.snapshot())
    assert b.apply(a.put_local("k2", Service("s"), 3), 3)   # the origin wrote again: it is back
    b.apply(a.delta_since(b.versions()), 3)
    assert {e.key for e in b.entries()} == {"k", "k2"}
    with pytest.raises(LocalProtocolError):
        b.forget_origin("b", 0)
    assert snap_before == []


def seg(items, origin="a", frm=0, to=1, floor=0):
    return [[origin, frm, to, items, floor]]


@pytest.mark.parametrize("bad", [
    None, "x", {"a": 1}, [1], [["a", 0, 1, []]], [["a", 0, 1, "items", 0]], seg([], origin=""),
    seg([], origin="a" * 300), seg([], frm=-1), seg([], to=True), seg([], to=2**64), seg([], floor=-1),
    seg([["k"]]), seg([["k", 0]]), seg([["k", 1.0]]), seg([[b"k", 1]]), seg([["", 1]]),
    seg([["k", 1, "sub"]]), seg([["k", 1, "nope", []]]),
    seg([["k", 1, "sub", ["a..b", None, None, None]]]),
    seg([["k", 1, "sub", ["a.b", 5, None, None]]]),
    seg([["k", 1, "sub", ["a.b", None, None, "x>>1"]]]),
    seg([["k", 1, "sub", ["a.b"]]]), seg([["k", 1, "svc", [None]]]),
    seg([["k", 1, "agent", ["", "n"]]]), seg([["k", 1, "agent", "tcp://x"]]),
])
def test_malformed_input_is_rejected_and_nothing_applied(bad):
    b = Directory("b")
    b.put_local("mine", Service("s"), 0)
    before = b.to_state()
    good = seg([["k", 1, "svc", ["ok"]]], origin="c")
    with pytest.raises(RemoteProtocolError):
        b.apply(good + bad if isinstance(bad, list) else bad, 0)
    assert b.to_state() == before                         # all-or-nothing


def test_limits_on_size():
    b = Directory("b", max_items=10)
    with pytest.raises(RemoteProtocolError):
        b.apply(seg([[f"k{i}", i + 1, "svc", ["s"]] for i in range(11)], to=11), 0)
    with pytest.raises(RemoteProtocolError):
        b.delta_since({f"o{i}": 1 for i in range(11)})
    with pytest.raises(RemoteProtocolError):
        b.delta_since({"a": -1})
    with pytest.raises(RemoteProtocolError):
        b.delta_since(["a"])


def test_unknown_trailing_body_fields_are_ignored():
    b = Directory("b")
    (ch,) = b.apply(seg([["k", 1, "agent", ["tcp://x:1", "x", "future-field"]]]), 0)
    assert ch.new == Entry("a", "k", 1, AgentInfo("tcp://x:1", "x"))


def test_local_input_is_checked():
    a = Directory("a")
    with pytest.raises(LocalProtocolError):
        a.put_local("", Service("s"), 0)
    with pytest.raises(LocalProtocolError):
        a.put_local("k", {"pattern": "x"}, 0)
    with pytest.raises(LocalProtocolError):
        Directory("")
