"""The asyncio client against a real agent: liveness while busy, requests across agent restarts."""

from __future__ import annotations

import asyncio
import time

import pytest

import meshq
from meshq._client import CHECKPOINT_SECONDS
from conftest import wait_until


@pytest.mark.timeout(60)
def test_a_consumer_draining_its_buffer_lets_other_tasks_run(agents):
    """A consumer busy with every message, never awaiting otherwise, still lets heartbeats go out."""
    n = 400
    busy = 0.002                  # seconds of synchronous work per message: 0.8 s in all
    a = agents.start("a")

    async def main():
        async with await meshq.connect(a.client_endpoint) as mq:
            sub = await mq.subscribe("busy.>")
            for i in range(n):
                await mq.publish_async("busy.x", str(i).encode())
            await mq.flush(timeout=20)
            await wait_until(lambda: _buffered(sub, n), 20, what="every message to be buffered")

            ticks = 0

            async def other_task():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            other = asyncio.create_task(other_task())
            await asyncio.sleep(0)
            ticks_before = ticks
            for _ in range(n):      # never waits: everything is already here
                await sub.next_msg(timeout=1)
                deadline = time.monotonic() + busy
                while time.monotonic() < deadline:
                    pass
            ran = ticks - ticks_before
            other.cancel()
            assert CHECKPOINT_SECONDS <= 0.2
            assert ran >= 3, f"other tasks ran {ran} times in {n * busy:.1f} s of busy consumer"

    asyncio.run(main())


async def _buffered(sub, n):
    return len(sub._queue) >= n


@pytest.mark.timeout(60)
def test_status_asked_while_the_agent_restarts_is_answered(agents):
    """A status request the restarted agent dropped (no HELLO yet) is asked again."""
    a = agents.start("a")

    async def main():
        async with await meshq.connect(a.client_endpoint) as mq:
            first = await mq.status()
            await asyncio.to_thread(a.kill)
            restarted = await asyncio.to_thread(agents.start, "a", None, (), (), a.data_dir)
            assert restarted.client_endpoint == a.client_endpoint
            st = await mq.status(timeout=10)
            assert st["id"] == first["id"]
            assert st["instance"] != first["instance"], "the answer must come from the restarted agent"

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_publishers_wait_within_the_unconfirmed_bounds(agents):
    """publish_async and publish_many block at max_pending / max_pending_bytes, and every publish lands."""
    a = agents.start("a")

    async def main():
        async with await meshq.connect(a.client_endpoint, max_pending=50, max_pending_bytes=20_000) as mq:
            sub = await mq.subscribe("bound.>")
            most_msgs = most_bytes = 0
            for i in range(300):
                await mq.publish_async("bound.one", b"x" * 500)
                most_msgs = max(most_msgs, mq._inflight_msgs)
                most_bytes = max(most_bytes, mq._inflight_bytes)
            many = await mq.publish_many("bound.many", [b"y" * 500] * 300)
            await many
            await mq.flush(timeout=20)
            assert most_msgs <= 50 and most_bytes <= 20_000 + 1000
            got = 0
            while got < 600:
                got += len(await sub.next_batch(1000, timeout=10))
            assert got == 600

    asyncio.run(main())
