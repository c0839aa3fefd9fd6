"""`meshq bench`: end-to-end workloads on a mesh of local agents, clients in separate processes.

Every figure is end to end: a publisher process calls the public API (`publish_async`,
`flush`), the agents store (group commit) and forward, consumer processes receive
through the public API and ack.  Latency is measured from the publish call to the
delivery in the consuming process (the body carries the wall-clock send time).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import statistics
import struct
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

from ._spawn import AgentProcess

WORKLOADS = ("pubsub", "queue", "fanout", "request")
_TS = struct.Struct(">Q")


@dataclass
class BenchResult:
    """What one run measured."""

    workload: str
    count: int
    size: int
    consumers: int
    publishers: int
    durability: str
    seconds: float
    msgs_per_s: float             # delivered messages per second, per consumer for fanout
    mb_per_s: float
    delivered: list[int] = field(default_factory=list)
    duplicates: int = 0
    latency_ms: dict = field(default_factory=dict)
    publish_seconds: float = 0.0
    rate: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _percentiles(samples: list[float]) -> dict:
    if not samples:
        return {}
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "p99.9": pick(0.999),
            "max": s[-1], "mean": statistics.fmean(s)}


# ---------------------------------------------------------------- worker processes
def _consumer_main(endpoint, subject, group, expected, ready, results, idx, idle_timeout) -> None:
    asyncio.run(_consume(endpoint, subject, group, expected, ready, results, idx, idle_timeout))


async def _consume(endpoint, subject, group, expected, ready, results, idx, idle_timeout) -> None:
    from ._client import connect
    from ._errors import TimeoutError as MqTimeout
    lat: list[float] = []
    got = 0
    last = 0.0
    async with await connect(endpoint, name=f"bench-consumer-{idx}") as mq:
        sub = await mq.subscribe(subject, group=group)
        ready.put(idx)
        now_ns = time.time_ns
        unpack = _TS.unpack_from
        while expected is None or got < expected:
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except MqTimeout:
                break
            t = now_ns()
            last = time.perf_counter()
            got += 1
            if len(msg.data) >= 8:
                lat.append((t - unpack(msg.data)[0]) / 1e6)
        dups = mq.duplicates
    results.put({"idx": idx, "got": got, "last": last, "lat": lat, "dups": dups})


def _publisher_main(endpoint, subject, count, size, rate, start_evt, results, idx) -> None:
    asyncio.run(_publish(endpoint, subject, count, size, rate, start_evt, results, idx))


async def _publish(endpoint, subject, count, size, rate, start_evt, results, idx) -> None:
    from ._client import connect
    pad = b"x" * max(0, size - 8)
    async with await connect(endpoint, name=f"bench-publisher-{idx}") as mq:
        while not start_evt.is_set():
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        now_ns = time.time_ns
        pack = _TS.pack
        if rate:
            chunk = max(1, int(rate / 1000))          # publish every millisecond
            sent = 0
            while sent < count:
                target = t0 + sent / rate
                delay = target - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                for _ in range(min(chunk, count - sent)):
                    await mq.publish_async(subject, pack(now_ns()) + pad)
                    sent += 1
        else:
            for _ in range(count):
                await mq.publish_async(subject, pack(now_ns()) + pad)
        await mq.flush()
        results.put({"idx": idx, "publish_seconds": time.perf_counter() - t0})


# ---------------------------------------------------------------- orchestration
async def _wait_routes(endpoint: str, agents: int, timeout: float = 15.0) -> None:
    """Wait until the publisher's agent knows subscriptions from `agents` agents."""
    from ._client import connect
    async with await connect(endpoint, name="bench-probe") as mq:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = await mq.status()
            if sum(1 for p in st["peers"] if p["state"] == "alive" and p.get("subscriptions", 0) > 0) >= agents:
                return
            await asyncio.sleep(0.05)
    raise RuntimeError("subscriptions did not propagate to the publisher's agent in time")


def run_bench(workload: str = "pubsub", count: int = 100_000, size: int = 100, consumers: int = 1,
              publishers: int = 1, durability: str = "fsync", rate: float | None = None,
              progress=None, workdir: str | None = None) -> BenchResult:
    """Start agents on loopback, run one workload, return the figures."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    if workload == "request":
        raise NotImplementedError("the request workload needs request/reply (not in this build)")
    if workload == "pubsub":
        consumers = 1
    ctx = mp.get_context("spawn")
    extra = ["--durability", durability, "--log-level", "warning"]
    with ExitStack() as stack:
        tmp = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="meshq-bench-"))
        pub_agent = stack.enter_context(AgentProcess(os.path.join(tmp, "pub"), name="bench-pub", extra=extra))
        sub_agents = [stack.enter_context(AgentProcess(os.path.join(tmp, f"sub{i}"), peers=[pub_agent.peer_endpoint],
                                                       name=f"bench-sub{i}", extra=extra))
                      for i in range(consumers)]
        ready, results, start_evt = ctx.Queue(), ctx.Queue(), ctx.Event()
        group = "bench" if workload == "queue" else None
        per_consumer = count * publishers if workload in ("pubsub", "fanout") else None
        procs = []
        for i, agent in enumerate(sub_agents):
            p = ctx.Process(target=_consumer_main, daemon=True,
                            args=(agent.client_endpoint, "bench.>", group, per_consumer, ready, results, i,
                                  None if per_consumer else 3.0))
            p.start()
            procs.append(p)
        for _ in sub_agents:
            ready.get(timeout=30)
        asyncio.run(_wait_routes(pub_agent.client_endpoint, len(sub_agents)))
        pubs = []
        for i in range(publishers):
            p = ctx.Process(target=_publisher_main, daemon=True,
                            args=(pub_agent.client_endpoint, "bench.data", count, size, rate, start_evt, results, i))
            p.start()
            pubs.append(p)
        time.sleep(0.5)  # let publishers connect
        t0 = time.perf_counter()
        start_evt.set()
        outs = []
        total_waiting = len(procs) + len(pubs)
        deadline = time.monotonic() + max(120.0, count * publishers / 5000)
        while len(outs) < total_waiting and time.monotonic() < deadline:
            try:
                outs.append(results.get(timeout=1.0))
            except Exception:
                if progress:
                    progress("waiting…")
                if not any(p.is_alive() for p in procs + pubs):
                    break
        for p in procs + pubs:
            p.join(10)
            if p.is_alive():
                p.kill()
        wall = time.perf_counter() - t0
    cons = [o for o in outs if "got" in o]
    pubr = [o for o in outs if "publish_seconds" in o]
    delivered = [o["got"] for o in sorted(cons, key=lambda o: o["idx"])]
    lat = [x for o in cons for x in o["lat"]]
    seconds = max(1e-9, max((o["last"] for o in cons if o["got"]), default=t0 + wall) - t0)
    if workload == "fanout":
        rate_out = (min(delivered) if delivered else 0) / seconds
    else:
        rate_out = sum(delivered) / seconds
    return BenchResult(workload, count * publishers, size, len(sub_agents), publishers, durability,
                       round(seconds, 4), round(rate_out, 1), round(rate_out * size / 1e6, 2), delivered,
                       sum(o["dups"] for o in cons), _percentiles(lat),
                       round(max((o["publish_seconds"] for o in pubr), default=0.0), 4), rate)


def format_result(r: BenchResult) -> str:
    """A human summary of one run."""
    lines = [
        f"{r.workload}: {r.count:,} × {r.size} B, {r.publishers} publisher(s), {r.consumers} consumer(s), "
        f"durability {r.durability}" + (f", paced at {r.rate:,.0f} msgs/s" if r.rate else ""),
        f"  {r.msgs_per_s:,.0f} msgs/s{' per consumer' if r.workload == 'fanout' else ''}, "
        f"{r.mb_per_s:,.1f} MB/s, {r.seconds:.2f} s, delivered {r.delivered}, duplicates {r.duplicates}",
    ]
    if r.latency_ms:
        lm = r.latency_ms
        lines.append("  latency ms: " + ", ".join(f"{k} {lm[k]:.3f}" for k in ("p50", "p90", "p99", "p99.9", "max")))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(format_result(run_bench(sys.argv[1] if len(sys.argv) > 1 else "pubsub")))
