"""`meshq demo`: two agents on loopback and a publish/subscribe round trip."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time

from ._client import connect
from ._spawn import AgentProcess


async def _round_trip(a: AgentProcess, b: AgentProcess, count: int, size: int) -> tuple[int, int, float]:
    async with await connect(b.client_endpoint, name="demo-sub") as sub_client, \
            await connect(a.client_endpoint, name="demo-pub") as pub_client:
        sub = await sub_client.subscribe("demo.>")
        await _wait_linked(pub_client)
        body = b"x" * size
        start = time.perf_counter()

        async def produce() -> None:
            for i in range(count):
                await pub_client.publish_async("demo.messages", body[:max(0, size - 8)] + i.to_bytes(8, "big") if size >= 8 else body)
            await pub_client.flush()

        producer = asyncio.create_task(produce())
        received = in_order = 0
        expected = 0
        async for msg in sub:
            if size >= 8 and int.from_bytes(msg.data[-8:], "big") == expected:
                in_order += 1
            expected += 1
            received += 1
            if received == count:
                break
        await producer
        return received, in_order if size >= 8 else received, time.perf_counter() - start


async def _wait_linked(client, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = await client.status()
        if any(p["state"] == "alive" for p in st["peers"]):
            # give the subscriber's directory announcement a moment to arrive
            await asyncio.sleep(0.3)
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the two demo agents did not link within 10 s")


def run_demo(count: int, size: int) -> int:
    """Start two agents, send `count` messages from A to a subscriber on B, print a summary."""
    with tempfile.TemporaryDirectory(prefix="meshq-demo-") as tmp:
        print(f"starting agents A and B on loopback (data in {tmp}) …")
        with AgentProcess(os.path.join(tmp, "a"), name="demo-a") as a, \
                AgentProcess(os.path.join(tmp, "b"), peers=[a.peer_endpoint], name="demo-b") as b:
            print(f"  A: peer {a.peer_endpoint}, clients {a.client_endpoint}")
            print(f"  B: peer {b.peer_endpoint}, clients {b.client_endpoint}")
            received, in_order, secs = asyncio.run(_round_trip(a, b, count, size))
        ok = received == count and in_order == count
        print(f"published {count} × {size} B on A, received {received} on B "
              f"({in_order} in order) in {secs:.2f} s: {received / secs:,.0f} msgs/s end to end, durable (fsync)")
        print("OK" if ok else "FAILED: messages missing or out of order")
        return 0 if ok else 1
