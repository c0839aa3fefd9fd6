#!/usr/bin/env python3
"""Round-trip latency through one agent: publish one message, wait for its delivery, repeat.

    python benchmarks/pingpong.py [--durability fsync|none] [--count 2000] [--gap 0.001]

Publisher and subscriber are two clients in this process, the agent a child process on
loopback; so a round is two hops (client → agent → client) plus, with fsync, one group
commit.  Prints p50/p90/p99 in ms.  A floor for what `meshq bench --rate` can show.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from meshq._client import connect  # noqa: E402
from meshq._spawn import AgentProcess  # noqa: E402


async def rounds(endpoint: str, count: int, gap: float) -> list[float]:
    async with await connect(endpoint) as pub, await connect(endpoint) as con:
        sub = await con.subscribe("pingpong.>")
        await asyncio.sleep(0.2)
        lat = []
        for _ in range(count):
            t = time.perf_counter_ns()
            await pub.publish_many("pingpong.x", [struct.pack(">Q", t)])
            for m in await sub.next_batch(100, timeout=5):
                lat.append((time.perf_counter_ns() - struct.unpack(">Q", m.data)[0]) / 1e6)
            if gap:
                await asyncio.sleep(gap)
        return sorted(lat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--durability", choices=["fsync", "none"], default="fsync")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--gap", type=float, default=0.001, help="seconds between rounds")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mq-pp-") as d:
        with AgentProcess(os.path.join(d, "a"), extra=["--durability", args.durability, "--log-level", "warning"]) as a:
            lat = asyncio.run(rounds(a.client_endpoint, args.count, args.gap))
    n = len(lat)
    print(f"durability {args.durability}: {n} rounds, p50 {lat[n // 2]:.3f} ms, p90 {lat[int(n * .9)]:.3f} ms, "
          f"p99 {lat[int(n * .99)]:.3f} ms")


if __name__ == "__main__":
    main()
