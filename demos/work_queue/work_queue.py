#!/usr/bin/env python3
"""A producer and three redundant workers (one queue group); one worker's agent is killed mid-run.

    python3 demos/work_queue/work_queue.py                 # four agents on loopback
    sudo python3 demos/work_queue/work_queue.py --lan      # four agents on a virtual LAN (network namespaces, mDNS)
    python3 demos/work_queue/work_queue.py --jobs 50000 --kill-after 0.3 --work-ms 0.5

Host 0 runs the producer's agent, hosts 1-3 one worker each (`subscribe("jobs.>", group="workers")`).
When a third of the jobs are done, host 3's agent is killed with SIGKILL.  Its worker keeps
handling what it had already received (those acks never arrive: the mesh redelivers them, so
they are counted as duplicates); the producer's agent notices the dead agent within ~2 s and
moves the jobs queued for it to the live members.  The run ends when every job was handled;
it prints what each worker did, the duplicates, and the jobs lost (always 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import meshq  # noqa: E402
from meshq._spawn import AgentProcess  # noqa: E402


def start_loopback(root: str) -> list[AgentProcess]:
    """Four agents on 127.0.0.1, each given the earlier ones as peers."""
    agents: list[AgentProcess] = []
    for h in range(4):
        agents.append(AgentProcess(os.path.join(root, f"h{h}"), name=f"h{h}", peers=[a.peer_endpoint for a in agents],
                                   log_path=os.path.join(root, f"h{h}.log")))
    return agents


async def run(agents: list[AgentProcess], jobs: int, kill_after: float, work_ms: float) -> int:
    handled: list[int] = []
    per_worker = {1: 0, 2: 0, 3: 0}
    killed_at = None
    workers = {h: await meshq.connect(agents[h].client_endpoint, name=f"worker-{h}") for h in (1, 2, 3)}
    producer = await meshq.connect(agents[0].client_endpoint, name="producer")
    subs = {h: await c.subscribe("jobs.>", group="workers", manual_ack=True) for h, c in workers.items()}
    while True:     # wait until the producer's agent knows all three members
        st = await producer.status()
        if sum(1 for p in st["peers"] if p["state"] == "alive" and p["subscriptions"] > 0) >= 3:
            break
        await asyncio.sleep(0.1)

    async def work(h: int, sub) -> None:
        nonlocal killed_at
        async for msg in sub:
            if work_ms:
                await asyncio.sleep(work_ms / 1000)
            handled.append(int(msg.data))
            per_worker[h] += 1
            await msg.ack()
            if killed_at is None and len(set(handled)) >= jobs * kill_after:
                killed_at = time.monotonic()
                print(f"  {len(set(handled))} jobs done: kill -9 host 3's agent (pid {agents[3].pid})", flush=True)
                await asyncio.to_thread(agents[3].kill)

    tasks = [asyncio.create_task(work(h, s)) for h, s in subs.items()]
    t0 = time.monotonic()
    for i in range(jobs):
        await producer.publish_async("jobs.resize", str(i).encode())
    await producer.flush(timeout=120)
    print(f"  published {jobs} jobs in {time.monotonic() - t0:.2f} s", flush=True)
    while len(set(handled)) < jobs:
        await asyncio.sleep(0.1)
    done = time.monotonic()
    await asyncio.sleep(1.0)
    for t in tasks:
        t.cancel()
    counters = (await producer.status())["counters"]
    await producer.close()
    for h, c in workers.items():
        if h != 3:
            await c.close()
    lost = jobs - len(set(handled))
    print(f"all {jobs} jobs handled in {done - t0:.2f} s "
          f"({done - killed_at:.2f} s after the kill)" if killed_at else f"all {jobs} jobs handled")
    for h, n in per_worker.items():
        print(f"  worker on host {h}: {n} jobs{' (its agent was killed)' if h == 3 and killed_at else ''}")
    print(f"  duplicates (handled twice): {len(handled) - len(set(handled))}; lost: {lost}; "
          f"moved from the dead agent: {counters.get('rerouted_from_dead', 0)}")
    return 0 if lost == 0 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--kill-after", type=float, default=1 / 3, help="fraction of jobs done before the kill")
    ap.add_argument("--work-ms", type=float, default=0.2, help="simulated work per job")
    ap.add_argument("--lan", action="store_true", help="run the agents on a virtual LAN (needs root)")
    args = ap.parse_args()
    if args.lan:
        from meshq.testing import lan_available
        from meshq.testing.mesh import LanMesh
        reason = lan_available()
        if reason:
            print(f"cannot build a virtual LAN here: {reason}", file=sys.stderr)
            return 1
        with LanMesh(4) as mesh:
            mesh.start_many(range(4))
            mesh.wait(lambda: mesh.all_alive(range(4)), 20, "the agents to find each other by mDNS")
            print("4 agents on a virtual LAN: " + ", ".join(f"h{h} {mesh.ip(h)}" for h in range(4)), flush=True)
            return asyncio.run(run([mesh.agents[h] for h in range(4)], args.jobs, args.kill_after, args.work_ms))
    root = tempfile.mkdtemp(prefix="mq-wq-")
    agents = []
    try:
        agents = start_loopback(root)
        print("4 agents on loopback", flush=True)
        return asyncio.run(run(agents, args.jobs, args.kill_after, args.work_ms))
    finally:
        for a in agents:
            a.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
