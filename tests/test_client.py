"""The asyncio client against a real agent: liveness while busy, requests across agent restarts."""

from __future__ import annotations

import asyncio

import pytest

import meshq
from meshq._client import CHECKPOINT_EVERY
from conftest import wait_until


@pytest.mark.timeout(60)
def test_a_consumer_draining_its_buffer_lets_other_tasks_run(agents):
    """Draining buffered messages yields now and then, so heartbeats keep flowing."""
    n = 4 * CHECKPOINT_EVERY + 10
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
            ran = ticks - ticks_before
            other.cancel()
            assert ran >= n // CHECKPOINT_EVERY - 1, f"other tasks ran {ran} times while {n} messages were drained"

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
