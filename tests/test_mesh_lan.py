"""Discovery and liveness of real agents on a virtual LAN (one agent per network namespace, real mDNS).

mDNS is always bound to the host's own address inside the LAN (--interface), never to the
machine's interfaces.  Status is read over each agent's ipc socket from the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

import meshq
from meshq.testing import lan_available
from meshq.testing.mesh import ENV, LanMesh as Mesh

_REASON = lan_available()
pytestmark = [pytest.mark.lan, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.mark.timeout(90)
def test_five_agents_find_each_other_and_a_late_joiner(record_property):
    with Mesh(6) as m:
        t0 = time.time()
        m.start_many(range(5))
        t_all = m.wait(lambda: m.all_alive(range(5)), 5 - (time.time() - t0), "5 agents to know each other")
        record_property("five_all_linked_s", round(t_all - t0, 3))
        while time.time() < t0 + 10:
            time.sleep(0.1)
        t1 = time.time()
        m.start(5)
        t_late = m.wait(lambda: m.all_alive(range(6)), 3 - (time.time() - t1), "all to know the late joiner")
        record_property("late_joiner_linked_s", round(t_late - t1, 3))
        rows = m.status(0)["mesh"]
        assert "mdns" in {s for r in rows for s in r["found_by"]}
        print(f"5 agents linked {t_all - t0:.2f} s after spawn; late joiner {t_late - t1:.2f} s")


PUBLISHER = r"""
import asyncio, sys, time, meshq
async def main():
    async with await meshq.connect(sys.argv[1]) as mq:
        n = 0
        while True:
            for _ in range(500):
                await mq.publish_async("load.x", b"x" * 100)
            n += 500
            await mq.flush(timeout=60)
            print(n, flush=True)
asyncio.run(main())
"""

SUBSCRIBER = r"""
import asyncio, sys, meshq
async def main():
    async with await meshq.connect(sys.argv[1]) as mq:
        sub = await mq.subscribe(sys.argv[2])
        n = 0
        async for msg in sub:
            n += 1
            if n % 5000 == 0:
                print(n, flush=True)
asyncio.run(main())
"""


def _last_line(p: subprocess.Popen, out: list) -> None:
    for line in p.stdout:
        out.append(line)


@pytest.mark.timeout(150)
def test_no_flaps_under_full_throughput_then_kill9_detected(record_property):
    with Mesh(3) as m:
        m.start_many(range(3))
        m.wait(lambda: m.all_alive(range(3)), 10, "3 agents to link")
        subs = [m.spawn_client(h, SUBSCRIBER, "load.>") for h in (1, 2)]
        got = [[], []]
        for p, out in zip(subs, got):
            threading.Thread(target=_last_line, args=(p, out), daemon=True).start()

        def routed():
            return sum(1 for r in m.status(0)["peers"] if r["subscriptions"] > 0) == 2
        m.wait(routed, 10, "subscriptions to reach the publisher's agent")
        pub = m.spawn_client(0, PUBLISHER)
        published: list = []
        threading.Thread(target=_last_line, args=(pub, published), daemon=True).start()
        t_end = time.time() + 60
        while time.time() < t_end:
            time.sleep(2)
            for h in range(3):
                c = m.status(h)["counters"]
                assert c["peer_flaps"] == 0 and c["peer_deaths"] == 0, (h, c)
        n_pub = int(published[-1]) if published else 0
        n_sub = [int(o[-1]) if o else 0 for o in got]
        record_property("published_in_60s", n_pub)
        print(f"60 s at full throughput: published {n_pub}, received {n_sub}; flaps 0")
        assert n_pub > 50_000 and min(n_sub) > 50_000
        # now a real failure, still under load: kill -9 the agent on host 2
        victim = m.ids[2]
        t_kill = time.time()
        m.agents[2].kill()
        m.clients.pop(2).close()
        done = {}

        def dead_everywhere():
            for h in (0, 1):
                if h not in done and m.states(h).get(victim) == "dead":
                    done[h] = time.time() - t_kill
            return len(done) == 2
        m.wait(dead_everywhere, 3.0, "every agent to mark the killed one dead", step=0.02)
        record_property("kill9_detected_s", round(max(done.values()), 3))
        print(f"kill -9 detected after {max(done.values()):.2f} s")
        for h in (0, 1):
            c = m.status(h)["counters"]
            assert c["peer_flaps"] == 0 and c["peer_deaths"] == 1, (h, c)
            assert m.states(h)[m.ids[1 - h]] == "alive"


@pytest.mark.timeout(120)
def test_cut_host_relinks_after_heal_and_delivers_everything_once(record_property):
    with Mesh(3) as m:
        m.start_many(range(3))
        m.wait(lambda: m.all_alive(range(3)), 10, "3 agents to link")
        subs = {h: m.clients[h].subscribe("cut.>", manual_ack=True) for h in (0, 2)}
        m.wait(lambda: all(sum(1 for r in m.status(h)["peers"] if r["subscriptions"] > 0) >= 1 for h in (0, 2)),
               10, "subscriptions to propagate")
        m.lan.cut(2)
        t_cut = time.time()
        m.wait(lambda: m.states(0).get(m.ids[2]) == "dead" and m.states(2).get(m.ids[0]) == "dead", 5,
               "the cut to be noticed")
        n = 300
        for i in range(n):
            m.clients[0].publish(f"cut.a.{i}", str(i).encode())
            m.clients[2].publish(f"cut.b.{i}", str(i).encode())
        while time.time() < t_cut + 20:
            time.sleep(0.1)
        t_heal = time.time()
        m.lan.heal(2)
        t_up = m.wait(lambda: m.all_alive(range(3)), 3, "links to come back after the heal", step=0.02)
        record_property("relinked_after_heal_s", round(t_up - t_heal, 3))
        print(f"links back {t_up - t_heal:.2f} s after the heal")
        for h, sub in subs.items():
            seen = []
            deadline = time.time() + 20
            while len(seen) < 2 * n and time.time() < deadline:
                try:
                    msg = sub.next(timeout=1)
                except meshq.TimeoutError:
                    continue
                seen.append(msg.subject)
                sub.ack(msg)
            expected = {f"cut.{s}.{i}" for s in "ab" for i in range(n)}
            assert sorted(seen) == sorted(expected), (h, len(seen), len(set(seen)))
            with pytest.raises(meshq.TimeoutError):
                sub.next(timeout=0.5)


@pytest.mark.timeout(90)
def test_seeds_only_full_mesh_and_peers_and_doctor_cli():
    with Mesh(5) as m:
        seed = f"tcp://{m.ip(0)}:7400"
        m.start(0, mdns=False, seeds=[f"tcp://{m.ip(1)}:7400"])
        m.start_many(range(1, 5), mdns=False, seeds=[seed])
        m.wait(lambda: m.all_alive(range(5)), 10, "a full mesh from one seed each")
        m.wait(lambda: all(r["rtt_ms"] is not None for r in m.status(3)["mesh"]), 3, "a heartbeat round trip")
        # meshq peers --json through the CLI
        r = subprocess.run([sys.executable, "-m", "meshq", "peers", "--json", "--agent", m.agents[3].client_endpoint],
                           capture_output=True, text=True, env={**os.environ, **ENV}, timeout=30)
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert {row["id"] for row in rows} == {m.ids[h] for h in (0, 1, 2, 4)}
        by_id = {row["id"]: row for row in rows}
        assert by_id[m.ids[0]]["found_by"][0] == "seed"
        assert {s for h in (1, 2, 4) for s in by_id[m.ids[h]]["found_by"]} & {"seed", "peer"}
        for row in rows:
            assert row["state"] == "alive" and row["rtt_ms"] is not None and row["last_heard_s"] < 2
            assert row["endpoints"][0].startswith("tcp://10.77.0.")
        st = m.status(3)["discovery"]
        assert st["mdns"] == "off" and st["seeds"] == [seed]
        # meshq doctor through the CLI, inside host 1: mDNS on its interface, the seed answers
        ok = m.lan.run(1, [sys.executable, "-m", "meshq", "doctor", "--interface", m.ip(1), "--seed", seed, "--json"],
                       env={**os.environ, **ENV}, timeout=60)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        rep = json.loads(ok.stdout)
        assert rep["ok"] and rep["mdns_interfaces"] == [m.ip(1)] and len(rep["checks"]) == 2
        bad = m.lan.run(1, [sys.executable, "-m", "meshq", "doctor", "--no-mdns", "--seed", f"tcp://{m.ip(0)}:7999"],
                        env={**os.environ, **ENV}, timeout=60)
        assert bad.returncode == 1
        assert "FAIL" in bad.stdout and "fix:" in bad.stdout and "mDNS is off" in bad.stdout


@pytest.mark.timeout(90)
def test_agent_restarted_on_new_port_is_relinked(record_property):
    with Mesh(3) as m:
        m.start_many(range(3))
        m.wait(lambda: m.all_alive(range(3)), 10, "3 agents to link")
        m.agents[2].kill()
        m.clients.pop(2).close()
        t0 = time.time()
        m.start(2, port=7401)
        new_ep = f"tcp://{m.ip(2)}:7401"

        def relinked():
            for h in (0, 1):
                row = next((r for r in m.status(h)["mesh"] if r["id"] == m.ids[2]), None)
                if row is None or row["state"] != "alive" or row["endpoint"] != new_ep:
                    return False
            return True
        t = m.wait(relinked, 3, "the others to re-link to the new port", step=0.02)
        record_property("relinked_new_port_s", round(t - t0, 3))
        print(f"restarted agent re-linked {t - t0:.2f} s after it was spawned")


def _dir_view(m, host):
    """The directory host's agent holds, without the liveness column (identical everywhere once converged)."""
    rows = [json.dumps({k: v for k, v in e.items() if k != "state"}, sort_keys=True)
            for e in m.clients[host].directory()["entries"]]
    return sorted(rows)


@pytest.mark.timeout(90)
def test_directory_converges_after_partition_heals(record_property):
    """Issue 5, test 7: subscriptions added/removed on both sides of a partition are seen identically after healing."""
    with Mesh(3) as m:
        m.start_many(range(3))
        m.wait(lambda: m.all_alive(range(3)), 15, "3 agents to know each other")
        keep = {h: m.clients[h].subscribe(f"pre.{h}.keep") for h in range(3)}
        gone = {h: m.clients[h].subscribe(f"pre.{h}.gone", group="g") for h in range(3)}

        def subjects(host):
            return {e["subject"] for e in m.clients[host].directory()["entries"] if e["kind"] == "sub"}
        before = {f"pre.{h}.{w}" for h in range(3) for w in ("keep", "gone")}
        m.wait(lambda: all(subjects(h) == before for h in range(3)), 10, "directories before the partition")
        m.lan.block(0, 1)
        m.lan.block(0, 2)                               # host 0 alone | hosts 1 and 2
        m.wait(lambda: m.states(1).get(m.ids[0]) == "dead" and m.states(0).get(m.ids[1]) == "dead", 10,
               "both sides to see the partition")
        added = {0: m.clients[0].subscribe("side0.new", filter="region=eu"), 1: m.clients[1].subscribe("side1.new"),
                 2: m.clients[2].serve("side2.svc")}
        gone[0].unsubscribe()
        gone[1].unsubscribe()
        time.sleep(1.0)
        assert "side0.new" not in subjects(1) and "side1.new" not in subjects(0)   # really partitioned
        t_heal = time.time()
        m.lan.unblock(0, 1)
        m.lan.unblock(0, 2)
        expected = {"pre.0.keep", "pre.1.keep", "pre.2.keep", "pre.2.gone", "side0.new", "side1.new", "side2.svc"}
        t_conv = m.wait(lambda: all(subjects(h) == expected for h in range(3)) and
                        _dir_view(m, 0) == _dir_view(m, 1) == _dir_view(m, 2), 20, "directories to converge")
        record_property("directory_converged_after_heal_s", round(t_conv - t_heal, 3))
        print(f"directories identical {t_conv - t_heal:.2f} s after the partition healed")
        assert keep and added
