#!/usr/bin/env python3
"""A deep outbox: messages waiting for an offline subscriber, the sender's memory, and its restart.

    python benchmarks/deep_outbox.py [--count 1000000] [--size 100] [--json]

Two agents on loopback (fsync group commit).  A durable subscription (`deep`) on agent B
makes A route `deep.>` to B; then B is killed, so everything published on A waits in A's
outbox (on disk).  A publisher process publishes --count messages through A with the public API.
Reported: A's resident memory (VmRSS, and the peak VmHWM) during and after the
publishing, the outbox depth A reports, then the time from `kill -9` of A and its
restart on the same data directory until a publish through it returns again, and,
finally, that B (restarted) delivers every message to the durable's returning consumer, and
how long that took.  (A plain subscription would do the same, but only after its 30 s
grace for a client that vanished without a goodbye: its messages wait for it that long.)  Pass --no-drain to skip the last step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from meshq._client import connect  # noqa: E402
from meshq._spawn import AgentProcess  # noqa: E402


def _rss(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) / 1024   # MiB
    return out


async def _wait_routes(endpoint: str, timeout: float = 15.0) -> None:
    async with await connect(endpoint, name="deep-probe") as mq:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = await mq.status()
            if any(p.get("subscriptions", 0) > 0 for p in st["peers"]):
                return
            await asyncio.sleep(0.05)
    raise RuntimeError("the subscription did not reach the sending agent")


async def _publish(endpoint: str, count: int, size: int, pid: int, samples: list) -> float:
    body = b"x" * size
    t0 = time.monotonic()
    async with await connect(endpoint, name="deep-pub") as mq:
        sent = 0
        next_sample = 0
        while sent < count:
            n = min(1000, count - sent)
            await mq.publish_many("deep.data", [body] * n)
            sent += n
            if sent >= next_sample:
                samples.append((sent, _rss(pid)))
                next_sample += max(1, count // 20)
        await mq.flush(timeout=300)
    return time.monotonic() - t0


async def _depth(endpoint: str) -> int:
    async with await connect(endpoint, name="deep-status") as mq:
        return (await mq.status())["outbox"]["messages"]


async def _first_publish(endpoint: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with await connect(endpoint, name="deep-after", timeout=1.0) as mq:
                await asyncio.wait_for(mq.publish("deep.after", b"x"), max(0.1, deadline - time.monotonic()))
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


async def _drain(endpoint: str, expected: int, timeout: float) -> int:
    got = 0
    async with await connect(endpoint, name="deep-sub") as mq:
        sub = await mq.subscribe("deep.>", durable="deep")
        deadline = time.monotonic() + timeout
        while got < expected and time.monotonic() < deadline:
            try:
                got += len(await sub.next_batch(1000, timeout=5))
            except Exception:
                pass
    return got


def run(count: int = 1_000_000, size: int = 100, drain: bool = True, workdir: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="mq-deep-") as tmp:
        tmp = workdir or tmp
        extra = ["--durability", "fsync", "--log-level", "warning"]
        a_dir, b_dir = os.path.join(tmp, "a"), os.path.join(tmp, "b")
        a = AgentProcess(a_dir, name="deep-a", extra=extra)
        b = AgentProcess(b_dir, peers=[a.peer_endpoint], name="deep-b", extra=extra)
        try:
            asyncio.run(_subscribe_and_go_offline(b, a.client_endpoint))
            base = _rss(a.pid)
            samples: list = []
            seconds = asyncio.run(_publish(a.client_endpoint, count, size, a.pid, samples))
            after = _rss(a.pid)
            depth = asyncio.run(_depth(a.client_endpoint))
            a.kill()
            t0 = time.monotonic()
            a = AgentProcess(a_dir, name="deep-a", extra=extra, ready_timeout=60)
            ready_s = time.monotonic() - t0
            asyncio.run(_first_publish(a.client_endpoint, 30))
            serving_s = time.monotonic() - t0
            rss_restarted = _rss(a.pid)
            depth_after = asyncio.run(_depth(a.client_endpoint))
            result = {
                "count": count, "size": size, "publish_seconds": round(seconds, 2),
                "publish_msgs_per_s": round(count / seconds),
                "rss_mib_idle": round(base["VmRSS"], 1),
                "rss_mib_max_sampled": round(max(s[1]["VmRSS"] for s in samples + [(0, after)]), 1),
                "rss_mib_peak_hwm": round(after["VmHWM"], 1),
                "rss_mib_after": round(after["VmRSS"], 1),
                "outbox_depth": depth,
                "restart_ready_s": round(ready_s, 3), "restart_serving_s": round(serving_s, 3),
                "rss_mib_after_restart": round(rss_restarted["VmRSS"], 1),
                "outbox_depth_after_restart": depth_after,
                "samples": [(n, round(r["VmRSS"], 1)) for n, r in samples],
            }
            if drain:
                b = AgentProcess(b_dir, peers=[a.peer_endpoint], name="deep-b", extra=extra)
                t1 = time.monotonic()
                got = asyncio.run(_drain(b.client_endpoint, count, max(60.0, count / 5000)))
                result["drained"] = got
                result["drain_seconds"] = round(time.monotonic() - t1, 2)
            return result
        finally:
            a.kill()
            b.kill()


async def _subscribe_and_go_offline(b: AgentProcess, a_endpoint: str) -> None:
    """A durable subscription on B; once A routes to B, B is killed (the subscriber is offline)."""
    async with await connect(b.client_endpoint, name="deep-sub") as mq:
        await mq.subscribe("deep.>", durable="deep")
        await _wait_routes(a_endpoint)
        b.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--no-drain", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = run(args.count, args.size, not args.no_drain)
    if args.json:
        print(json.dumps(r))
        return
    print(f"{r['count']:,} × {r['size']} B published in {r['publish_seconds']} s ({r['publish_msgs_per_s']:,} msgs/s) "
          f"while the subscriber's agent was down; outbox depth {r['outbox_depth']:,}")
    print(f"sending agent RSS: idle {r['rss_mib_idle']} MiB, max sampled {r['rss_mib_max_sampled']} MiB, "
          f"peak (VmHWM) {r['rss_mib_peak_hwm']} MiB, after {r['rss_mib_after']} MiB")
    print(f"kill -9 and restart: ready in {r['restart_ready_s']} s, a publish returned {r['restart_serving_s']} s "
          f"after the restart began; RSS {r['rss_mib_after_restart']} MiB; outbox depth {r['outbox_depth_after_restart']:,}")
    if "drained" in r:
        print(f"subscriber's agent back: {r['drained']:,} of {r['count']:,} delivered in {r['drain_seconds']} s")


if __name__ == "__main__":
    main()
