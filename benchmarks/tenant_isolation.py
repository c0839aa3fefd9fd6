#!/usr/bin/env python3
"""Tenant isolation under a flood: tenant beta's end-to-end throughput alone, and while tenant alpha
floods the same two agents far past its publish-rate quota.

    python benchmarks/tenant_isolation.py [--count 100000] [--rate 2000] [--runs 3]

Two agents on loopback serve both tenants; beta's publisher (on agent x) and subscriber (on agent y)
are separate processes using the public API; alpha's flooder is a third process on agent x that
publishes as fast as it can.  Two flooder behaviours are measured: "polite" waits the
`retry_after` the QuotaExceeded error carries (what the blocking API does by itself), "hostile"
ignores it and retries at once.  Prints msgs/s for beta alone and under each flood, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack

from meshq._auth import Quotas, create_tenant, issue_token, write_tenant_file, write_token_file
from meshq._spawn import AgentProcess


def _subscriber(endpoint, creds, count, ready, results):
    async def go():
        import meshq
        async with await meshq.connect(endpoint, creds=creds) as mq:
            sub = await mq.subscribe("work.>")
            ready.put(1)
            got, last = 0, 0.0
            while got < count:
                try:
                    await sub.next_msg(timeout=30)
                except meshq.TimeoutError:
                    break
                got += 1
                last = time.perf_counter()
            results.put(("sub", got, last))
    asyncio.run(go())


def _publisher(endpoint, creds, count, start, results):
    async def go():
        import meshq
        async with await meshq.connect(endpoint, creds=creds) as mq:
            start.wait()
            t0 = time.perf_counter()
            for i in range(count):
                await mq.publish_async("work.item", b"x" * 100)
            await mq.flush(120)
            results.put(("pub", count, time.perf_counter() - t0))
    asyncio.run(go())


def _flooder(endpoint, creds, polite, stop, results):
    async def go():
        import meshq
        accepted = refused = 0
        async with await meshq.connect(endpoint, creds=creds) as mq:
            while not stop.is_set():
                acks = [await mq.publish_async("flood.x", b"f" * 100) for _ in range(1000)]
                wait = 0.0
                for ack in acks:
                    try:
                        await ack
                        accepted += 1
                    except meshq.QuotaExceeded as e:
                        refused += 1
                        wait = max(wait, e.retry_after or 0.0)
                if polite and wait:
                    await asyncio.sleep(wait)
        results.put(("flood", accepted, refused))
    asyncio.run(go())


def run_once(tmp: str, files: dict, count: int, flood: str | None) -> dict:
    ctx = mp.get_context("spawn")
    both = ["--tenant-file", files["alpha"], "--tenant-file", files["beta"], "--log-level", "warning"]
    with ExitStack() as stack:
        run_dir = tempfile.mkdtemp(dir=tmp)
        x = stack.enter_context(AgentProcess(os.path.join(run_dir, "x"), name="x", extra=both))
        y = stack.enter_context(AgentProcess(os.path.join(run_dir, "y"), name="y", peers=[x.peer_endpoint], extra=both))
        ready, results, start, stop = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
        procs = [ctx.Process(target=_subscriber, args=(y.client_endpoint, files["beta.creds"], count, ready, results))]
        procs[0].start()
        ready.get(timeout=30)
        time.sleep(1.5)   # the subscription reaches x
        procs.append(ctx.Process(target=_publisher, args=(x.client_endpoint, files["beta.creds"], count, start, results)))
        if flood:
            procs.append(ctx.Process(target=_flooder, args=(x.client_endpoint, files["alpha.creds"], flood == "polite", stop, results)))
        for p in procs[1:]:
            p.start()
        time.sleep(1.0)
        t0 = time.perf_counter()
        start.set()
        out = {}
        while "sub" not in out or "pub" not in out:
            kind, *rest = results.get(timeout=180)
            out[kind] = rest
        stop.set()
        if flood:
            kind, *rest = results.get(timeout=30)
            out[kind] = rest
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    got, last = out["sub"]
    res = {"flood": flood or "none", "delivered": got, "msgs_per_s": got / (last - t0)}
    if flood:
        res["flood_accepted"], res["flood_refused"] = out["flood"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=2000.0, help="alpha's publish-rate quota (msgs/s)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshq-iso-") as tmp:
        files = {}
        alpha = create_tenant("alpha", Quotas(publish_rate=args.rate))
        beta = create_tenant("beta")
        for t in (alpha, beta):
            files[t.name] = os.path.join(tmp, t.name + ".tenant")
            write_tenant_file(files[t.name], t)
            files[t.name + ".creds"] = os.path.join(tmp, t.name + ".creds")
            write_token_file(files[t.name + ".creds"], issue_token(t))
        figures: dict[str, list[float]] = {"none": [], "polite": [], "hostile": []}
        for _ in range(args.runs):
            for flood in (None, "polite", "hostile"):   # alternate so drift hits all three alike
                r = run_once(tmp, files, args.count, flood)
                assert r["delivered"] == args.count, r
                figures[r["flood"]].append(r["msgs_per_s"])
                extra = f", alpha accepted {r['flood_accepted']:,} refused {r['flood_refused']:,}" if flood else ""
                print(f"beta with flood={r['flood']:<8} {r['msgs_per_s']:>10,.0f} msgs/s{extra}", flush=True)
        alone = statistics.median(figures["none"])
        print(f"\nmedian over {args.runs} runs: beta alone {alone:,.0f} msgs/s")
        for kind in ("polite", "hostile"):
            m = statistics.median(figures[kind])
            print(f"  beta while alpha floods ({kind}): {m:,.0f} msgs/s = {m / alone:.0%} of alone")


if __name__ == "__main__":
    sys.exit(main())
