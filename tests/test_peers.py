"""The pure peer table: liveness decisions, indirect probes, flaps, peer-list decoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshq._errors import RemoteProtocolError
from meshq._peers import (
    Died, LivenessSettings, PeerTable, Probe, decode_peer_list, decode_probe_ack, encode_peer_list, should_relink,
)

S = LivenessSettings()


def table(*ids, now=0.0):
    t = PeerTable("me", S)
    for a in ids:
        t.learn(a, f"tcp://10.0.0.{len(t.records) + 1}:7400", "mdns")
        t.linked(a, "inst-" + a, now)
    return t


def run(t, ids, start, end, step=0.1, heard=()):
    """Tick from start to end; peers in `heard` are heard at every step; returns (time, action) pairs."""
    out = []
    now = start
    while now <= end + 1e-9:
        for a in heard:
            t.liveness_for(a, now).heard(now)
        out += [(round(now, 3), x) for x in t.tick(now, ids)]
        now += step
    return out


def test_silent_peer_dies_after_probing_and_within_bounds():
    t = table("a", "b", "c")
    acts = run(t, ["a", "b", "c"], 0.0, 3.0, heard=("a", "b"))
    probes = [(ts, x) for ts, x in acts if isinstance(x, Probe)]
    deaths = [(ts, x) for ts, x in acts if isinstance(x, Died)]
    assert probes and probes[0][0] == pytest.approx(S.suspect_after, abs=0.11)
    assert {x.via for _, x in probes} <= {"a", "b"} and all(x.target == "c" for _, x in probes)
    assert deaths == [(pytest.approx(S.dead_after, abs=0.11), Died("c"))]
    assert probes[0][0] < deaths[0][0]
    assert t.liveness_for("c", 3.0).state(3.0) == "dead"
    assert t.heard_ago("c", 3.0) is None


def test_indirect_evidence_keeps_a_suspect_alive_then_max_suspect_ends_it():
    t = table("a", "c")
    now = 0.0
    died_at = None
    while now < 20:
        t.liveness_for("a", now).heard(now)
        for act in t.tick(now, ["a", "c"]):
            if isinstance(act, Probe):
                t.probe_answer(act.target, 0.2, now)        # "a" still hears "c"
            else:
                died_at = died_at or now
        if 5 < now < 6:
            assert t.liveness_for("c", now).state(now) == "suspect"
        now += 0.1
    assert died_at == pytest.approx(S.max_suspect, abs=0.11)


def test_stale_or_negative_probe_answer_is_no_evidence():
    t = table("a", "c")
    died = []
    now = 0.0
    while now < 3:
        t.liveness_for("a", now).heard(now)
        for act in t.tick(now, ["a", "c"]):
            if isinstance(act, Probe):
                t.probe_answer(act.target, None, now)
                t.probe_answer(act.target, 5.0, now)
            else:
                died.append(now)
        now += 0.1
    assert died and died[0] == pytest.approx(S.dead_after, abs=0.11)


def test_no_witness_means_no_probe_and_death_at_dead_after():
    t = table("c")
    acts = run(t, ["c"], 0.0, 3.0)
    assert not [x for _, x in acts if isinstance(x, Probe)]
    assert [ts for ts, x in acts if isinstance(x, Died)] == [pytest.approx(S.dead_after, abs=0.11)]


def test_own_stall_does_not_kill_anyone():
    t = table("a", "b")
    t.tick(0.0, ["a", "b"])
    assert t.tick(5.0, ["a", "b"]) == []      # we were paused for 5 s
    assert t.liveness_for("a", 5.0).state(5.0) == "alive"


def test_dead_is_latched_and_a_same_instance_revival_is_a_flap():
    t = table("a")
    run(t, ["a"], 0.0, 2.5)
    lv = t.liveness_for("a", 2.5)
    lv.heard(2.6)                              # a stray frame does not revive
    assert lv.state(2.6) == "dead"
    assert t.linked("a", "inst-a", 2.7) is True and t.flaps == 1
    assert lv.state(2.7) == "alive"
    run(t, ["a"], 2.8, 5.5)
    assert t.linked("a", "restarted", 5.6) is False and t.flaps == 1


def test_goodbye_is_dead_without_probes():
    t = table("a", "b")
    t.tick(0.0, ["a", "b"])
    t.goodbye("b")
    acts = t.tick(0.1, ["a", "b"])
    assert acts == [Died("b")]


def test_learn_records_endpoints_and_sources():
    t = PeerTable("me", S)
    assert t.learn("me", "tcp://1.2.3.4:1", "mdns") is None
    t.learn("x", "tcp://1.2.3.4:1", "seed")
    r = t.learn("x", "tcp://1.2.3.4:2", "mdns", pubkey="k")
    assert r.endpoints == ["tcp://1.2.3.4:2", "tcp://1.2.3.4:1"] and r.sources == ["seed", "mdns"] and r.pubkey == "k"


def test_should_relink():
    assert should_relink("tcp://a:1", True, "tcp://a:2", "mdns")
    assert not should_relink("tcp://a:1", True, "tcp://a:2", "peer")
    assert should_relink("tcp://a:1", False, "tcp://a:2", "peer")
    assert not should_relink("tcp://a:1", False, "tcp://a:1", "mdns")


def test_peer_list_round_trip_and_rejects():
    entries = [("a1b2", "tcp://10.0.0.1:7400", "")]
    assert decode_peer_list(encode_peer_list(entries)) == entries
    for bad in [{}, [["x"]], [["bad id", "tcp://1.1.1.1:1", ""]], [["a", "udp://x", ""]],
                [["a", "tcp://0.0.0.0:1", ""]], [["a", "tcp://1.1.1.1:1", "k k"]], [["a"] * 3] * 1025,
                [[1, "tcp://1.1.1.1:1", ""]]]:
        with pytest.raises(RemoteProtocolError):
            decode_peer_list(bad)
    assert decode_probe_ack({"target": "a", "ago": 0.5}) == ("a", 0.5)
    for bad in [{"target": "a", "ago": -1}, {"target": "a", "ago": "x"}, {"ago": 1}, []]:
        with pytest.raises(RemoteProtocolError):
            decode_probe_ack(bad)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.integers() | st.text(max_size=30) | st.binary(max_size=10),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=20))
def test_decoders_only_raise_remote_protocol_error(h):
    for fn in (decode_peer_list, decode_probe_ack):
        try:
            fn(h)
        except RemoteProtocolError:
            pass


@pytest.mark.parametrize("interfaces,listen,enabled,expect", [
    (None, "tcp://127.0.0.1:*", True, (False, [])),
    (None, "tcp://127.0.0.1:7400", True, (False, [])),
    (None, "tcp://localhost:7400", True, (False, [])),
    (None, "tcp://[::1]:7400", True, (False, [])),
    (None, "tcp://0.0.0.0:7400", True, (True, None)),
    (None, "tcp://*:7400", True, (True, None)),
    (None, "tcp://10.1.2.3:*", True, (True, ["10.1.2.3"])),
    (["10.9.9.9"], "tcp://127.0.0.1:7400", True, (True, ["10.9.9.9"])),
    (["10.9.9.9"], "tcp://0.0.0.0:7400", False, (False, [])),
])
def test_mdns_plan_never_goes_wide_for_a_loopback_agent(interfaces, listen, enabled, expect):
    from meshq._doctor import mdns_plan
    plan = mdns_plan(interfaces, listen, enabled)
    assert (plan.enabled, plan.interfaces) == expect and plan.reason


def test_doctor_checks_and_fixes_without_network():
    from meshq._doctor import run_doctor
    names = lambda: {"127.0.0.1": "lo", "10.0.0.5": "eth0", "172.17.0.1": "docker0"}  # noqa: E731
    rep = run_doctor(None, ["tcp://10.0.0.9:7400"], "tcp://0.0.0.0:7400", probe=lambda ip: ip == "10.0.0.5",
                     connect=lambda ep: "Connection refused", names=names)
    by = {c.name: c for c in rep.checks}
    assert rep.interfaces == ["10.0.0.5", "127.0.0.1", "172.17.0.1"] and not rep.ok
    assert by["mdns 10.0.0.5"].ok and not by["mdns 172.17.0.1"].ok and "Docker" in by["mdns 172.17.0.1"].detail
    assert "--seed" in by["mdns 172.17.0.1"].fix and "firewall" in by["seed tcp://10.0.0.9:7400"].fix
    good = run_doctor(["10.0.0.5"], ["tcp://10.0.0.9:7400"], "tcp://0.0.0.0:7400", probe=lambda ip: True,
                      connect=lambda ep: None, names=names)
    assert good.ok and all(not c.fix for c in good.checks)
    off = run_doctor(None, [], "tcp://127.0.0.1:7400", names=names)
    assert not off.ok and "--seed" in off.checks[0].fix
