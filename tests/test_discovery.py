"""Discovery: TXT validation, StaticDiscovery, and real mDNS (python-zeroconf) inside a VirtualLan."""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshq._discovery import (
    DiscoveryError,
    MalformedRecord,
    MdnsDiscovery,
    PeerGone,
    PeerInfo,
    PeerSeen,
    StaticDiscovery,
    _RateLimitedLog,
    decode_txt,
    encode_txt,
)
from meshq.testing import VirtualLan, lan_available

ROOT = Path(__file__).resolve().parents[1]
NODE = str(Path(__file__).with_name("_mdns_node.py"))
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
_REASON = lan_available()
lan_test = [pytest.mark.lan, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def peer(i: int = 1, **kw) -> PeerInfo:
    base = dict(agent_id=f"agent{i}", name=f"node {i}", endpoint=f"tcp://10.77.0.{i}:7400",
                pubkey="k" * 40, tenant_tags=("a1", "b2"))
    base.update(kw)
    return PeerInfo(**base)


def txt(info: PeerInfo) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in encode_txt(info).items()}


# --------------------------------------------------------------------------- pure


def test_txt_round_trip():
    p = peer(3)
    assert decode_txt(txt(p), "agent3") == p
    # wildcard endpoint host is filled in from the announced address
    w = decode_txt(txt(peer(3, endpoint="tcp://0.0.0.0:7400")), "agent3", ["10.77.0.9"])
    assert w.endpoint == "tcp://10.77.0.9:7400"
    # unknown keys are ignored (forward compatible), missing name defaults to the id
    t = txt(p)
    t[b"future"] = b"x"
    del t[b"name"]
    assert decode_txt(t, "agent3").name == "agent3"


@pytest.mark.parametrize("mutate", [
    lambda t: t.pop(b"id"),
    lambda t: t.pop(b"ep"),
    lambda t: t.update({b"id": b"other"}),
    lambda t: t.update({b"ep": b"garbage"}),
    lambda t: t.update({b"ep": b"tcp://10.0.0.1:99999"}),
    lambda t: t.update({b"ep": b"tcp://" + b"a" * 300 + b":1"}),
    lambda t: t.update({b"ver": b"12345678"}),
    lambda t: t.update({b"ver": b"0"}),
    lambda t: t.update({b"ver": b"\xd9\xa3"}),  # arabic-indic digit three
    lambda t: t.update({b"name": b"\xff\xfe"}),
    lambda t: t.update({b"name": b"a\nb"}),
    lambda t: t.update({b"pk": b"x" * 500}),
    lambda t: t.update({b"tags": b"ok,not ok"}),
    lambda t: t.update({b"tags": b",".join([b"t"] * 40)}),
    lambda t: t.update({b"pad": b"x" * 2000}),
    lambda t: t.update({b"ep": None}),
])
def test_malformed_txt_rejected(mutate):
    t = txt(peer(3))
    mutate(t)
    with pytest.raises(MalformedRecord):
        decode_txt(t, "agent3")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([b"id", b"ep", b"ver", b"name", b"pk", b"tags", b"x"]) | st.binary(max_size=8),
                       st.none() | st.binary(max_size=80) | st.sampled_from([b"agent3", b"tcp://1.2.3.4:5", b"1"]),
                       max_size=8))
def test_decode_txt_only_raises_malformed(props):
    try:
        info = decode_txt(props, "agent3", ["10.0.0.1"])
    except MalformedRecord:
        return
    assert info.agent_id == "agent3"


def test_bad_own_record_refused():
    with pytest.raises(DiscoveryError):
        MdnsDiscovery(peer(1, agent_id="bad id with spaces"), interfaces=["127.0.0.1"])
    with pytest.raises(DiscoveryError):
        MdnsDiscovery(peer(1, endpoint="udp://x"), interfaces=["127.0.0.1"])
    with pytest.raises(DiscoveryError):
        MdnsDiscovery(peer(1), interfaces=["eth0"])


def test_rate_limited_log(caplog):
    rl = _RateLimitedLog(logging.getLogger("meshq.test"), interval=60, burst=3)
    with caplog.at_level(logging.WARNING, logger="meshq.test"):
        assert rl.warning("a", "one")
        assert not rl.warning("a", "again")
        assert rl.warning("b", "two")
        assert rl.warning("c", "three")
        assert not rl.warning("d", "over the burst")
    assert len(caplog.records) == 3 and rl.suppressed == 2


def test_static_discovery():
    me = peer(0)
    d = StaticDiscovery(me, peers=[peer(1)])
    assert not select.select([d.wakeup_fd], [], [], 0)[0]
    d.start()
    assert select.select([d.wakeup_fd], [], [], 1)[0]
    assert d.events() == [PeerSeen(peer(1))]
    assert not select.select([d.wakeup_fd], [], [], 0)[0]
    d.add(me)  # never reports itself
    d.add(peer(1))  # duplicate: nothing
    assert d.events() == []
    d.add(peer(1, endpoint="tcp://10.77.0.1:7500"))  # changed: reported again
    d.remove("agent1")
    d.remove("nobody")
    assert d.events() == [PeerSeen(peer(1, endpoint="tcp://10.77.0.1:7500")), PeerGone("agent1")]
    # thread-safe: many producers, one consumer
    threads = [threading.Thread(target=lambda i=i: [d.add(peer(i * 100 + j)) for j in range(50)]) for i in range(1, 5)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(d.events()) == 200 and len(d.peers()) == 200
    d.reannounce()
    assert d.interfaces_in_use() == []
    d.close()
    d.close()
    d.add(peer(9))
    assert d.events() == []


# --------------------------------------------------------------------------- real mDNS in a VirtualLan


class Node:
    """A _mdns_node.py process in one host; collects its JSON-line events."""

    def __init__(self, lan: VirtualLan, host: int, agent_id: str | None = None, interval: float = 5.0):
        self.lan, self.host = lan, host
        self.agent_id = agent_id or f"agent{host}"
        self.t_spawn = time.time()
        self.proc = lan.spawn(host, [sys.executable, NODE, self.agent_id, lan.hosts[host].ip, str(interval)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=ENV)
        self.lines: list[dict] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                self.lines.append(ev)
                self.cond.notify_all()

    def wait(self, pred, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for ev in self.lines:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._more():
                    return None
                self.cond.wait(min(left, 0.2))

    def _more(self) -> bool:
        return False

    def seen(self, agent_id: str, timeout: float) -> dict | None:
        return self.wait(lambda e: e["ev"] == "seen" and e["id"] == agent_id, timeout)

    def gone(self, agent_id: str, timeout: float) -> dict | None:
        return self.wait(lambda e: e["ev"] == "gone" and e["id"] == agent_id, timeout)

    def dropped(self) -> int:
        with self.cond:
            stats = [e["dropped"] for e in self.lines if e["ev"] == "stats"]
        return stats[-1] if stats else 0

    def send(self, cmd: str):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 10) -> int:
        try:
            self.send("quit")
        except (BrokenPipeError, ValueError):
            pass
        rc = self.proc.wait(timeout)
        assert self.wait(lambda e: e["ev"] == "closed", 2), self.proc.stderr.read()
        return rc


@pytest.mark.parametrize("_", [0], ids=["3-hosts"])
@pytest.mark.timeout(60)
@lan_test[0]
@lan_test[1]
def test_hosts_started_together_see_each_other(_, record_property):
    with VirtualLan(3) as lan:
        nodes = [Node(lan, i) for i in range(3)]
        worst = 0.0
        for n in nodes:
            for other in nodes:
                if other is n:
                    continue
                ev = n.seen(other.agent_id, timeout=5 - (time.time() - n.t_spawn))
                assert ev is not None, f"{n.agent_id} did not see {other.agent_id} within 5 s"
                assert ev["ep"] == f"tcp://{lan.hosts[other.host].ip}:7400" and ev["tags"] == ["t1", "t2"]
                worst = max(worst, ev["t"] - max(n.t_spawn, other.t_spawn))
            assert n.wait(lambda e: e["ev"] == "seen" and e["id"] == n.agent_id, 0) is None  # never itself
        record_property("discovery_all_seen_s", round(worst, 3))
        print(f"3 hosts started together: all seen {worst:.2f} s after spawn")
        for n in nodes:
            assert n.stop() == 0


@pytest.mark.timeout(60)
@lan_test[0]
@lan_test[1]
def test_late_joiner_seen_quickly_and_clean_close_is_gone(record_property):
    with VirtualLan(3) as lan:
        a, b = Node(lan, 0), Node(lan, 1)
        assert a.seen("agent1", 5) and b.seen("agent0", 5)
        c = Node(lan, 2)
        for n in (a, b):
            ev = n.seen("agent2", 3)
            assert ev is not None, "late joiner not seen within 3 s"
            record_property(f"late_joiner_seen_by_{n.agent_id}_s", round(ev["t"] - c.t_spawn, 3))
        assert c.seen("agent0", 3) and c.seen("agent1", 3)
        t_quit = time.time()
        assert c.stop() == 0
        for n in (a, b):
            ev = n.gone("agent2", 3)
            assert ev is not None, "clean close not seen as PeerGone"
            record_property(f"gone_seen_by_{n.agent_id}_s", round(ev["t"] - t_quit, 3))
        a.stop(), b.stop()


HOSTILE = r"""
import sys, time
from zeroconf import IPVersion, ServiceInfo, Zeroconf
ip = sys.argv[1]
zc = Zeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
T = "_meshq._tcp.local."
good = {"id": "x", "ver": "1", "ep": f"tcp://{ip}:7400", "name": "n", "pk": "", "tags": ""}
bad = [
    ("evil1", {**good, "id": "evil1", "ep": "not-an-endpoint"}),
    ("evil2", {**good, "id": "someone-else"}),
    ("evil3", {**good, "id": "evil3", "ver": "99999999"}),
    ("evil4", {b"id": b"evil4", b"ver": b"1", b"ep": f"tcp://{ip}:7400".encode(), b"name": b"\xff\xfe\xfd"}),
    ("evil5", {**good, "id": "evil5", **{f"pad{i}": "x" * 240 for i in range(6)}}),
    ("evil6", {"ver": "1"}),
    ("evil7", b"\x08id=evil7\x50ver=1"),  # raw TXT whose second length byte overruns
]
infos = []
for inst, props in bad:
    info = ServiceInfo(T, f"{inst}.{T}", port=7400, properties=props, server=f"{inst}.local.", parsed_addresses=[ip])
    zc.register_service(info, cooperating_responders=True)
    infos.append(info)
print("registered", flush=True)
sys.stdin.readline()
zc.close()
"""


@pytest.mark.timeout(60)
@lan_test[0]
@lan_test[1]
def test_malformed_txt_is_ignored_and_browser_keeps_working():
    with VirtualLan(3) as lan:
        observer = Node(lan, 0)
        assert observer.wait(lambda e: e["ev"] == "started", 10)
        hostile = lan.spawn(1, [sys.executable, "-c", HOSTILE, lan.hosts[1].ip], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV)
        assert hostile.stdout.readline().strip() == "registered"
        good = Node(lan, 2)
        assert observer.seen("agent2", 5), "browser stopped working after malformed records"
        deadline = time.monotonic() + 5
        while observer.dropped() < 7 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert observer.dropped() >= 7
        assert observer.wait(lambda e: e["ev"] == "seen" and e["id"].startswith("evil"), 0) is None
        assert observer.proc.poll() is None
        hostile.stdin.close()
        hostile.wait(10)
        good.stop(), observer.stop()


@pytest.mark.timeout(60)
@lan_test[0]
@lan_test[1]
def test_reannounce_finds_peer_after_partition_heals(record_property):
    """Browsers stop asking after startup: only the periodic re-announce finds a peer after a heal."""
    with VirtualLan(2) as lan:
        lan.cut(1, silent=True)
        a, b = Node(lan, 0, interval=1.0), Node(lan, 1, interval=1.0)
        assert a.wait(lambda e: e["ev"] == "started", 10) and b.wait(lambda e: e["ev"] == "started", 10)
        time.sleep(1.0)
        assert a.seen("agent1", 0) is None
        t_heal = time.time()
        lan.heal(1)
        ev = a.seen("agent1", 5)
        assert ev is not None and b.seen("agent0", 5)
        record_property("seen_after_heal_s", round(ev["t"] - t_heal, 3))
        a.stop(), b.stop()


PROBE = r"""
import sys
from meshq._discovery import multicast_probe, default_interfaces
print(multicast_probe(sys.argv[1], timeout=3), multicast_probe("10.123.0.1", timeout=1), default_interfaces())
"""


@pytest.mark.timeout(60)
@lan_test[0]
@lan_test[1]
def test_multicast_probe_and_default_interfaces():
    with VirtualLan(1) as lan:
        r = lan.run(0, [sys.executable, "-c", PROBE, lan.hosts[0].ip], env=ENV, timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split(" ", 2)[:2] == ["True", "False"]
        assert "10.77.0.1" in r.stdout and "127.0.0.1" in r.stdout


DUP = r"""
import sys
from meshq._discovery import MdnsDiscovery, PeerInfo, DuplicateAgentError
ip = sys.argv[1]
d = MdnsDiscovery(PeerInfo("agent0", "dup", f"tcp://{ip}:7400"), interfaces=[ip])
try:
    d.start()
except DuplicateAgentError:
    print("duplicate")
else:
    print("registered")
    d.close()
"""


@pytest.mark.timeout(60)
@lan_test[0]
@lan_test[1]
def test_duplicate_agent_id_refused():
    with VirtualLan(2) as lan:
        a = Node(lan, 0)
        assert a.wait(lambda e: e["ev"] == "started", 10)
        r = lan.run(1, [sys.executable, "-c", DUP, lan.hosts[1].ip], env=ENV, timeout=30)
        assert r.stdout.strip() == "duplicate", r.stderr
        a.stop()
