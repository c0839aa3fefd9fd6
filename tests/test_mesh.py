"""Mesh behaviour on loopback (no root needed): peer lists from seeds, dead-peer queue-group re-routing."""

from __future__ import annotations

import asyncio
import time

import pytest

import meshq
from conftest import wait_until


def _alive(st) -> set:
    return {r["id"] for r in st["mesh"] if r["state"] == "alive"}


@pytest.mark.timeout(60)
def test_one_seed_is_enough_for_a_full_mesh(agents):
    async def main():
        a = agents.start("a")
        b = agents.start("b", extra=["--seed", a.peer_endpoint])
        c = agents.start("c", extra=["--seed", b.peer_endpoint])
        clients = [await meshq.connect(x.client_endpoint) for x in (a, b, c)]
        try:
            ids = [(await cl.status())["id"] for cl in clients]

            async def full():
                views = [_alive(await cl.status()) for cl in clients]
                return all(v == set(ids) - {me} for v, me in zip(views, ids))
            await wait_until(full, 10, what="a full mesh")          # a and c only meet through b's PEERS
            rows = {r["id"]: r for r in (await clients[2].status())["mesh"]}
            assert rows[ids[1]]["found_by"][0] == "seed" and "seed" in rows[ids[0]]["found_by"]
            st = (await clients[0].status())["discovery"]
            assert st["mdns"] == "off" and "loopback" in st["reason"]
        finally:
            for cl in clients:
                await cl.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_dead_members_queue_backlog_moves_to_a_live_member(agents):
    n = 500

    async def main():
        a = agents.start("a")
        b = agents.start("b", peers=[a.peer_endpoint])
        c = agents.start("c", peers=[a.peer_endpoint])
        pa, sb, sc = [await meshq.connect(x.client_endpoint) for x in (a, b, c)]
        try:
            hog = await sb.subscribe("work.>", group="workers", manual_ack=True)   # takes and never acks

            async def routed(k):
                st = await pa.status()
                return sum(1 for p in st["peers"] if p["state"] == "alive" and p["subscriptions"] > 0) >= k
            await wait_until(lambda: routed(1), 10, what="b's group to reach a")
            for i in range(n):
                await pa.publish_async("work.item", str(i).encode())
            await pa.flush(timeout=30)
            await hog.next_msg(timeout=10)                 # b has them, unacked: they stay in a's outbox
            assert (await pa.status())["outbox"]["messages"] == n
            worker = await sc.subscribe("work.>", group="workers")
            await wait_until(lambda: routed(2), 10, what="c's group to reach a")
            b.kill()
            t0 = time.monotonic()
            got = set()
            while len(got) < n:
                msg = await worker.next_msg(timeout=10)
                got.add(int(msg.data))
            assert got == set(range(n))
            assert time.monotonic() - t0 < 8
            st = await pa.status()
            assert st["counters"]["rerouted_from_dead"] == n and st["counters"]["peer_deaths"] == 1
            with pytest.raises(meshq.TimeoutError):
                await worker.next_msg(timeout=0.5)
        finally:
            for cl in (pa, sc):
                await cl.close()
            await sb.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_malformed_peer_lists_and_probes_are_dropped_and_probes_answered(agents):
    import msgpack
    import zmq

    async def main():
        a = agents.start("a")
        b = agents.start("b", peers=[a.peer_endpoint])
        async with await meshq.connect(a.client_endpoint) as ca, await meshq.connect(b.client_endpoint) as cb:
            b_id = (await cb.status())["id"]
            a_key = (await ca.status())["pubkey"]
            await wait_until(lambda: _probe_alive(ca, b_id), 10, what="a and b to link")
            before = (await ca.status())["counters"].get("dropped_peer_frames", 0)
            bad = [
                [b"L", msgpack.packb("not a list")],
                [b"L", msgpack.packb([["bad id!", "tcp://10.0.0.1:1", ""]])],
                [b"L", msgpack.packb([["x1", "udp://10.0.0.1:1", ""]])],
                [b"L", msgpack.packb([["x1", "tcp://10.0.0.1:1", ""]] * 2000)],
                [b"Q", msgpack.packb({"target": 5})],
                [b"Q", msgpack.packb([])],
            ]

            def evil():
                ctx = zmq.Context()
                try:
                    s = ctx.socket(zmq.DEALER)
                    public, secret = zmq.curve_keypair()
                    s.curve_serverkey, s.curve_publickey, s.curve_secretkey = a_key.encode(), public, secret
                    s.setsockopt(zmq.ROUTING_ID, b"evil01")
                    s.setsockopt(zmq.LINGER, 0)
                    s.setsockopt(zmq.RCVTIMEO, 5000)
                    s.connect(a.peer_endpoint)
                    member = {"type": "member_hello", "v": 1, "nonce": b"n" * 32, "tags": []}
                    s.send_multipart([b"H", msgpack.packb({"v": 1, "id": "evil01", "name": "e", "instance": "i",
                                                           "pk": public.decode(), "open": True, "member": member,
                                                           "endpoint": "tcp://127.0.0.1:9"})])
                    assert s.recv_multipart()[0] == b"W"
                    for frames in bad:
                        s.send_multipart(frames)
                    s.send_multipart([b"Q", msgpack.packb({"target": b_id})])
                    while True:
                        kind, h = s.recv_multipart()[:2]
                        if kind == b"q":
                            return msgpack.unpackb(h)
                finally:
                    ctx.destroy(0)

            ack = await asyncio.to_thread(evil)
            assert ack["target"] == b_id and 0 <= ack["ago"] < 1.0

            async def counted():
                c = (await ca.status())["counters"]
                return c.get("dropped_peer_frames", 0) - before >= len(bad)
            await wait_until(counted, 10, what="malformed frames to be counted")
            assert await _probe_alive(ca, b_id) and a.proc.poll() is None

    asyncio.run(main())


async def _probe_alive(client, agent_id) -> bool:
    return any(r["id"] == agent_id and r["state"] == "alive" for r in (await client.status())["mesh"])
