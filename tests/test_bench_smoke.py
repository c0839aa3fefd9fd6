"""Smoke versions of the benchmarks: they complete and count correctly (speed is not checked)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from meshq._bench import run_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workload,consumers,api", [
    ("pubsub", 1, "batch"), ("pubsub", 1, "single"), ("queue", 2, "batch"), ("fanout", 2, "batch"),
])
def test_bench_workload_counts(workload, consumers, api):
    r = run_bench(workload, 3000, 64, consumers, durability="fsync", api=api, stall_timeout=20)
    assert r.ok, r.errors
    assert r.count == 3000
    assert r.duplicates == 0
    if workload == "queue":
        assert sum(r.delivered) == 3000
    else:
        assert r.delivered == [3000] * consumers
    assert r.msgs_per_s > 0 and r.latency_ms["samples"] > 0


@pytest.mark.timeout(60)
def test_bench_paced_duration_two_publishers():
    r = run_bench("pubsub", None, 32, 1, publishers=2, durability="none", rate=500, duration=1.0)
    assert r.ok, r.errors
    assert 600 <= r.count <= 1100 and r.delivered == [r.count]
    assert r.latency_ms["p50"] <= r.latency_ms["p99"] <= r.latency_ms["max"]
    assert r.latency_ms["samples"] == r.count     # paced: every message is timed


@pytest.mark.timeout(60)
def test_bench_cli_json():
    out = subprocess.run([sys.executable, "-m", "meshq", "bench", "pubsub", "--count", "2000", "--json"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["delivered"] == [2000] and r["ok"] and set(r["latency_ms"]) >= {"p50", "p90", "p99", "p99.9"}


@pytest.mark.timeout(90)
def test_bench_request_workload_answers_every_request():
    r = run_bench("request", 500, consumers=2, concurrency=20)
    assert r.ok, r.errors
    assert r.delivered == [500] and r.msgs_per_s > 0
    assert set(r.latency_ms) >= {"p50", "p90", "p99", "p99.9"}


def test_publish_many_and_next_batch(workdir, agents):
    """The batch API the benchmark uses: every message once, in order, acks cover all."""
    from meshq import connect
    a = agents.start("a")

    async def main():
        async with await connect(a.client_endpoint) as mq:
            sub = await mq.subscribe("s.>")
            ack = await mq.publish_many("s.x", [b"%d" % i for i in range(2500)])
            ids = await ack
            assert len(ids) == 2500 and len(set(ids)) == 2500
            got = []
            while len(got) < 2500:
                got += [m.data for m in await sub.next_batch(700, timeout=5)]
            assert got == [b"%d" % i for i in range(2500)]
            await mq.flush()
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_compare_smoke_brokers():
    import brokers
    import compare
    systems = compare.available_systems()
    if systems == ["meshq"]:
        pytest.skip("neither redis-server/redis-py nor nats-server/nats-py is installed")
    results = compare.run_all(["pubsub"], systems, 1, 1000, 100, 1, 1000, 0.5, log=lambda s: None)
    for r in results:
        assert r["ok"], (r["system"], r["errors"])
        assert r["delivered"] == [1000] or r["delivered"] == 1000
    assert brokers  # imported for the skip check


@pytest.mark.timeout(90)
def test_deep_outbox_bounded_memory_and_fast_restart():
    """Pending messages live on disk: the sender's memory stays bounded, restart is quick, nothing is lost."""
    import deep_outbox
    r = deep_outbox.run(100_000, 100)
    assert r["outbox_depth"] == 100_000
    assert r["outbox_depth_after_restart"] == 100_001      # plus the probe publish after the restart
    assert r["rss_mib_peak_hwm"] < 200
    assert r["restart_serving_s"] < 5
    assert r["drained"] >= 100_000, "the durable's consumer got back every waiting message"


@pytest.mark.timeout(60)
def test_bench_on_a_running_mesh(agents):
    """--agent/--sub-agent: the workload runs on agents that are already up."""
    a = agents.start("a")
    b = agents.start("b", peers=[a.peer_endpoint])
    r = run_bench("queue", 2000, 64, 2, pub_agent=a.client_endpoint, sub_agents=[b.client_endpoint, a.client_endpoint])
    assert r.ok, r.errors
    assert sum(r.delivered) == 2000
