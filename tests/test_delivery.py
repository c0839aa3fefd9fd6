"""End-to-end delivery between two real agents (child processes, real zmq, real LevelDB)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

import meshq
from conftest import free_port, wait_routes, wait_until


async def _pair(agents, a_port=None, b_port=None):
    a = agents.start("a", port=a_port)
    b = agents.start("b", port=b_port, peers=[a.peer_endpoint])
    return a, b


@pytest.mark.timeout(120)
def test_100k_messages_arrive_once_each_in_order(agents):
    n = 100_000

    async def main():
        a, b = await _pair(agents)
        async with await meshq.connect(b.client_endpoint) as sub_client, \
                await meshq.connect(a.client_endpoint) as pub_client:
            sub = await sub_client.subscribe("orders.>")
            await wait_routes(pub_client)

            async def produce():
                for i in range(n):
                    await pub_client.publish_async("orders.new", i.to_bytes(4, "big"))
                await pub_client.flush(timeout=60)

            producer = asyncio.create_task(produce())
            seen = []
            async for msg in sub:
                seen.append(int.from_bytes(msg.data, "big"))
                if len(seen) == n:
                    break
            await producer
            assert seen == list(range(n))
            # nothing more arrives, and the publisher's outbox drains once the last ack is in
            with pytest.raises(meshq.TimeoutError):
                await sub.next_msg(timeout=0.5)
            assert (await pub_client.status())["outbox"]["messages"] == 0
            assert sub_client.duplicates == 0

    asyncio.run(main())


async def _publish_through(client, n, subject, confirmed, on_progress=None, pad=0):
    """Publish n numbered messages (padded with `pad` spaces); record the numbers whose publish returned."""
    pending = []
    for i in range(n):
        pending.append((i, await client.publish_async(subject, str(i).encode() + b" " * pad)))
        if len(pending) >= 200:
            await _settle(pending, confirmed)
            if on_progress:
                await on_progress(len(confirmed))
    await client.flush(timeout=60)
    await _settle(pending, confirmed)


async def _settle(pending, confirmed):
    waiting = []
    for i, ack in pending:
        if ack.done():
            await ack
            confirmed.add(i)
        else:
            waiting.append((i, ack))
    pending[:] = waiting
    await asyncio.sleep(0)


async def _collect(sub, want, timeout):
    """Receive until every number in `want` has arrived; returns the list in arrival order."""
    got = []
    seen = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not want <= seen:
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            msg = await sub.next_msg(timeout=left)
        except meshq.TimeoutError:
            break
        i = int(msg.data)
        got.append(i)
        seen.add(i)
    return got


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n,pad", [(20_000, 0), (2_000, 40_000)], ids=["small", "large-in-segments"])
def test_publishing_agent_killed_and_restarted_loses_nothing(agents, n, pad):
    a_port = free_port()

    async def main():
        a, b = await _pair(agents, a_port=a_port)
        async with await meshq.connect(b.client_endpoint) as sub_client, \
                await meshq.connect(a.client_endpoint) as pub_client:
            sub = await sub_client.subscribe("crash.>")
            await wait_routes(pub_client)
            confirmed: set[int] = set()
            killed = False

            async def maybe_kill(done):
                nonlocal killed
                if not killed and done >= n // 3:
                    killed = True
                    await asyncio.to_thread(a.kill)
                    await asyncio.to_thread(agents.start, "a", a_port, (), (), a.data_dir)

            collector = asyncio.create_task(_collect(sub, set(range(n)), 90))
            await _publish_through(pub_client, n, "crash.pub", confirmed, maybe_kill, pad)
            assert killed
            assert len(confirmed) == n   # the client resent what the dead agent never confirmed
            got = await collector
            assert set(got) >= confirmed, f"lost {len(confirmed - set(got))} confirmed messages"
            assert len(got) == len(set(got)), "a message reached the application twice"

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_receiving_agent_killed_and_restarted_loses_nothing(agents):
    n = 20_000
    b_port = free_port()

    async def main():
        a, b = await _pair(agents, b_port=b_port)
        async with await meshq.connect(b.client_endpoint) as sub_client, \
                await meshq.connect(a.client_endpoint) as pub_client:
            sub = await sub_client.subscribe("crash.>")
            await wait_routes(pub_client)
            confirmed: set[int] = set()
            got: list[int] = []
            missing = set(range(n))
            killed = asyncio.Event()

            async def consume():
                async for msg in sub:
                    got.append(int(msg.data))
                    missing.discard(got[-1])
                    if len(got) == n // 4 and not killed.is_set():
                        await asyncio.to_thread(b.kill)
                        killed.set()
                        await asyncio.to_thread(agents.start, "b", b_port, [a.peer_endpoint], (), b.data_dir)
                    if not missing:
                        return

            consumer = asyncio.create_task(consume())
            await _publish_through(pub_client, n, "crash.recv", confirmed)
            await asyncio.wait_for(consumer, 90)
            assert killed.is_set()
            assert set(got) == set(range(n))
            assert len(got) == len(set(got)), "a message reached the application twice"
            await sub.unsubscribe()   # acks the last message handed out
            await wait_until(lambda: _outbox_empty(pub_client), 20, what="the outbox to drain")

    asyncio.run(main())


async def _outbox_empty(client):
    return (await client.status())["outbox"]["messages"] == 0


def test_second_agent_on_same_data_dir_fails_fast(agents):
    a = agents.start("a")
    proc = subprocess.run([sys.executable, "-m", "meshq", "agent", "--data-dir", a.data_dir,
                           "--listen", "tcp://127.0.0.1:*"], capture_output=True, text=True, timeout=20)
    assert proc.returncode != 0
    assert "LOCK" in proc.stderr and "in use" in proc.stderr
    assert a.proc.poll() is None, "the first agent must keep running"


def test_sigterm_exits_zero_quickly(agents):
    a = agents.start("a")
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(5) == 0
