"""Delivery semantics end to end: queue groups across agents, durables, acks, dead letters, TTL, delay.

Real agents as child processes on loopback (the `agents` fixture), real clients in this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

import meshq
from conftest import free_port, wait_routes, wait_until

MESHQ = [sys.executable, "-m", "meshq"]


async def _status(client):
    return await client.status()


async def _counter(client, name):
    return (await client.status())["counters"].get(name, 0)


async def _publish_numbers(client, subject, numbers, **kw):
    for i in numbers:
        await client.publish_async(subject, str(i).encode(), **kw)
    await client.flush(timeout=60)


# ---------------------------------------------------------------- queue groups across three agents
async def _work_queue(agents, n, kill_mid_run):
    c_port = free_port()
    a = agents.start("a")
    b = agents.start("b", peers=[a.peer_endpoint])
    c = agents.start("c", port=c_port, peers=[a.peer_endpoint, b.peer_endpoint])
    handled: list[int] = []
    per_worker = {"a": 0, "b": 0, "c": 0}
    workers = {name: await meshq.connect(ag.client_endpoint, name=f"worker-{name}")
               for name, ag in (("a", a), ("b", b), ("c", c))}
    producer = await meshq.connect(a.client_endpoint, name="producer")
    killed = asyncio.Event()
    try:
        subs = {name: await cl.subscribe("jobs.>", group="workers", manual_ack=True) for name, cl in workers.items()}
        await wait_routes(producer, 2)

        async def work(name, sub):
            async for msg in sub:
                handled.append(int(msg.data))
                per_worker[name] += 1
                await msg.ack()
                if kill_mid_run and name == "c" and per_worker["c"] == 2000 and not killed.is_set():
                    killed.set()
                    await asyncio.to_thread(c.kill)   # the worker goes on with what it already received

        tasks = [asyncio.create_task(work(name, sub)) for name, sub in subs.items()]
        await _publish_numbers(producer, "jobs.new", range(n))
        await wait_until(lambda: _all_handled(handled, n), 60, interval=0.2, what="every job to be handled")
        # let stragglers (duplicates) in before counting: after a kill, until the dead agent's backlog moved
        await asyncio.sleep(3.0 if kill_mid_run else 0.5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return handled, per_worker, killed.is_set(), await producer.status()
    finally:
        await producer.close()
        for cl in workers.values():
            if cl is not workers["c"] or not killed.is_set():
                await cl.close()
            else:
                cl._closed = True     # its agent is gone: do not wait for a goodbye
                for t in (cl._reader, cl._keeper):
                    t.cancel()
                cl._channel.close()


async def _all_handled(handled, n):
    return len(set(handled)) >= n


@pytest.mark.timeout(120)
def test_queue_group_on_three_agents_handles_20000_exactly_once(agents):
    n = 20_000

    async def main():
        handled, per_worker, _, _ = await _work_queue(agents, n, kill_mid_run=False)
        assert sorted(handled) == list(range(n)), "each message handled exactly once"
        assert all(v > 0 for v in per_worker.values()), f"all three members share the work: {per_worker}"

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_queue_group_member_agent_killed_mid_run_every_message_handled(agents, capsys):
    n = 20_000

    async def main():
        handled, per_worker, killed, st = await _work_queue(agents, n, kill_mid_run=True)
        assert killed
        assert set(handled) == set(range(n)), "every message handled at least once"
        duplicates = len(handled) - len(set(handled))
        with capsys.disabled():
            print(f"\n[queue group kill -9] handled {len(handled)} for {n} messages: {duplicates} duplicates; "
                  f"per worker {per_worker}; rerouted_from_dead={st['counters'].get('rerouted_from_dead', 0)}")
        assert duplicates <= n // 2

    asyncio.run(main())


# ---------------------------------------------------------------- durable subscriptions
@pytest.mark.timeout(120)
def test_durable_subscriber_agent_down_receives_10000_in_order_after_restart(agents):
    n = 10_000
    b_port = free_port()

    async def main():
        a = agents.start("a")
        b = agents.start("b", port=b_port, peers=[a.peer_endpoint])
        async with await meshq.connect(a.client_endpoint) as pub:
            async with await meshq.connect(b.client_endpoint) as first:
                await first.subscribe("audit.>", durable="auditor")
                await wait_routes(pub)
            await asyncio.to_thread(b.stop)                    # the subscriber's agent is down
            await _publish_numbers(pub, "audit.event", range(n))
            assert (await pub.status())["outbox"]["messages"] == n   # they wait in the sender's outbox
            b2 = await asyncio.to_thread(agents.start, "b", b_port, [a.peer_endpoint], (), b.data_dir)
            async with await meshq.connect(b2.client_endpoint) as again:   # a new client, a new session
                sub = await again.subscribe("audit.>", durable="auditor")
                got = []
                while len(got) < n:
                    msg = await sub.next_msg(timeout=30)
                    got.append(int(msg.data))
                assert got == list(range(n)), "all of them, in order"
                with pytest.raises(meshq.TimeoutError):
                    await sub.next_msg(timeout=0.5)
                await sub.unsubscribe(delete=True)
            await wait_until(lambda: _outbox_empty(pub), 20, what="the outbox to drain")

    asyncio.run(main())


async def _outbox_empty(client):
    return (await client.status())["outbox"]["messages"] == 0


@pytest.mark.timeout(60)
def test_durable_survives_client_absence_and_plain_subscribers_are_unaffected(agents):
    async def main():
        a = agents.start("a")
        async with await meshq.connect(a.client_endpoint) as cl:
            sub = await cl.subscribe("d.>", durable="keep")
            await sub.unsubscribe()                          # detaches; the durable stays
            plain = await cl.subscribe("d.>")
            await _publish_numbers(cl, "d.x", range(5))
            assert [int((await plain.next_msg(timeout=5)).data) for _ in range(5)] == list(range(5))
            again = await cl.subscribe("d.>", durable="keep")
            assert [int((await again.next_msg(timeout=5)).data) for _ in range(5)] == list(range(5))
            with pytest.raises(meshq.BadSubjectError):
                await cl.subscribe("other.>", durable="keep")    # a durable keeps its pattern

    asyncio.run(main())


# ---------------------------------------------------------------- acks, max deliver, dead letters
@pytest.mark.timeout(60)
def test_nacked_past_max_deliver_is_dead_lettered_with_history_and_requeued_by_cli(agents):
    async def main():
        a = agents.start("a")
        env = {**os.environ, "MESHQ_AGENT": a.client_endpoint}
        async with await meshq.connect(a.client_endpoint) as cl:
            sub = await cl.subscribe("pay.>", manual_ack=True, max_deliver=3, ack_wait=0.5)
            await cl.publish("pay.nacked", b"nack me")
            await cl.publish("pay.ignored", b"ignore me")
            deliveries = {"pay.nacked": 0, "pay.ignored": 0}
            loop = asyncio.get_running_loop()
            end = loop.time() + 8
            while loop.time() < end:
                try:
                    msg = await sub.next_msg(timeout=0.3)
                except meshq.TimeoutError:
                    if len(await cl.dlq_list()) == 2:
                        break
                    continue
                deliveries[msg.subject] += 1
                if msg.subject == "pay.nacked":
                    await msg.nack()
            assert deliveries == {"pay.nacked": 3, "pay.ignored": 3}
            rows = {r["subject"]: r for r in await cl.dlq_list()}
            assert set(rows) == {"pay.nacked", "pay.ignored"}
            assert rows["pay.nacked"]["attempts"] == 3 and rows["pay.ignored"]["attempts"] == 3

            shown = json.loads(await asyncio.to_thread(_cli, env, "dlq", "show", rows["pay.nacked"]["id"], "--json"))
            assert shown["data"] == "nack me" and shown["subscription"] == "pay.>"
            assert [h["reason"] for h in shown["history"]] == ["nack"] * 3
            assert all(h["agent"] == "a" and h["at_ms"] > 0 for h in shown["history"])
            ignored = await cl.dlq_show(rows["pay.ignored"]["id"])
            assert [h["reason"] for h in ignored["history"]] == ["ack-wait"] * 3

            out = await asyncio.to_thread(_cli, env, "dlq", "requeue", rows["pay.nacked"]["id"], "--json")
            assert json.loads(out)["subject"] == "pay.nacked"
            msg = await sub.next_msg(timeout=5)
            assert msg.data == b"nack me" and msg.headers["meshq-requeued-from"] == rows["pay.nacked"]["id"]
            await msg.ack()
            listed = json.loads(await asyncio.to_thread(_cli, env, "dlq", "list", "--json"))
            assert [r["subject"] for r in listed] == ["pay.ignored"]
            assert "purged 1" in await asyncio.to_thread(_cli, env, "dlq", "purge")
            assert await cl.dlq_list() == []

    asyncio.run(main())


def _cli(env, *args):
    proc = subprocess.run([*MESHQ, *args], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.timeout(60)
def test_in_progress_extends_the_ack_wait(agents):
    async def main():
        a = agents.start("a")
        async with await meshq.connect(a.client_endpoint) as cl:
            sub = await cl.subscribe("slow.>", manual_ack=True, ack_wait=0.5, max_deliver=1)
            await cl.publish("slow.job", b"long")
            msg = await sub.next_msg(timeout=5)
            for _ in range(6):                 # 1.8 s of work, more than three ack waits
                await asyncio.sleep(0.3)
                await msg.in_progress()
            await msg.ack()
            with pytest.raises(meshq.TimeoutError):
                await sub.next_msg(timeout=1.0)
            assert await cl.dlq_list() == []
            assert await _counter(cl, "ack_wait_expired") == 0

    asyncio.run(main())


# ---------------------------------------------------------------- TTL and delay
@pytest.mark.timeout(60)
def test_expired_messages_are_never_delivered(agents):
    b_port = free_port()

    async def main():
        a = agents.start("a")
        b = agents.start("b", port=b_port, peers=[a.peer_endpoint])
        async with await meshq.connect(a.client_endpoint) as pub:
            async with await meshq.connect(b.client_endpoint) as first:
                await first.subscribe("ttl.>", durable="late")
                await wait_routes(pub)
            # the durable is away: 200 short-lived messages and 50 lasting ones wait in the outbox
            await _publish_numbers(pub, "ttl.short", range(200), ttl=0.5)
            await _publish_numbers(pub, "ttl.long", range(1000, 1050))
            await asyncio.sleep(1.5)
            async with await meshq.connect(b.client_endpoint) as late:
                sub = await late.subscribe("ttl.>", durable="late")
                got = []
                try:
                    while True:
                        got.append(int((await sub.next_msg(timeout=2.0)).data))
                except meshq.TimeoutError:
                    pass
                assert got == list(range(1000, 1050)), "only the unexpired ones, in order"
                dropped = await _counter(pub, "dropped_expired") + await _counter(late, "dropped_expired")
                assert dropped >= 200

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_delayed_messages_not_early_and_survive_sending_agent_restart(agents):
    a_port = free_port()

    async def main():
        a = agents.start("a", port=a_port)
        b = agents.start("b", peers=[a.peer_endpoint])
        async with await meshq.connect(b.client_endpoint) as subc:
            sub = await subc.subscribe("later.>")
            async with await meshq.connect(a.client_endpoint) as pub:
                await wait_routes(pub)
                t0 = time.time()
                await pub.publish("later.delayed", b"delayed", delay=3.0)
                await pub.publish("later.now", b"now")        # not held back by the delayed one
            first = await sub.next_msg(timeout=2)
            assert first.data == b"now"
            await asyncio.to_thread(a.kill)                  # kill -9 the sending agent
            await asyncio.to_thread(agents.start, "a", a_port, (), (), a.data_dir)
            msg = await sub.next_msg(timeout=15)
            arrived = time.time()
            assert msg.data == b"delayed"
            assert arrived >= t0 + 3.0, f"delivered {t0 + 3.0 - arrived:.3f} s early"
            assert msg.headers["meshq-not-before"].isdigit()
            with pytest.raises(meshq.TimeoutError):
                await sub.next_msg(timeout=0.5)

    asyncio.run(main())


# ---------------------------------------------------------------- retention (per tenant)
def _tenant_with_one_second_retention(workdir) -> tuple[str, str]:
    """Tenant "ret" (retention 1 s): its tenant file and a client creds file."""
    from meshq._auth import Quotas, create_tenant, issue_token, write_tenant_file, write_token_file

    tenant = create_tenant("ret", Quotas(retention_seconds=1.0))
    tfile, cfile = os.path.join(workdir, "ret.tenant"), os.path.join(workdir, "ret.creds")
    write_tenant_file(tfile, tenant)
    write_token_file(cfile, issue_token(tenant))
    return tfile, cfile


@pytest.mark.timeout(60)
def test_durable_backlog_past_tenant_retention_is_dropped_and_counted(agents, workdir):
    tfile, cfile = _tenant_with_one_second_retention(workdir)

    async def main():
        a = agents.start("a", extra=["--tenant-file", tfile])
        b = agents.start("b", peers=[a.peer_endpoint], extra=["--tenant-file", tfile])
        async with await meshq.connect(a.client_endpoint, creds=cfile) as pub:
            async with await meshq.connect(b.client_endpoint, creds=cfile) as first:
                await first.subscribe("keep.>", durable="slow")
                await wait_routes(pub)
            await _publish_numbers(pub, "keep.old", range(100))       # waits past the 1 s retention
            await wait_until(lambda: _counter_at_least(pub, "dropped_retention", 100), 10,
                             what="the old backlog to be dropped")
            await _publish_numbers(pub, "keep.new", range(100, 110))
            async with await meshq.connect(b.client_endpoint, creds=cfile) as back:
                sub = await back.subscribe("keep.>", durable="slow")
                got = [int((await sub.next_msg(timeout=10)).data) for _ in range(10)]
                assert got == list(range(100, 110))
                with pytest.raises(meshq.TimeoutError):
                    await sub.next_msg(timeout=0.5)
            assert (await pub.status())["counters"]["dropped_retention"] == 100

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_plain_subscriber_gone_for_good_its_backlog_goes_at_retention(agents, workdir):
    """Messages for a plain subscriber whose agent never comes back do not wait for ever."""
    tfile, cfile = _tenant_with_one_second_retention(workdir)

    async def main():
        a = agents.start("a", extra=["--tenant-file", tfile])
        b = agents.start("b", peers=[a.peer_endpoint], extra=["--tenant-file", tfile])
        async with await meshq.connect(a.client_endpoint, creds=cfile) as pub:
            async with await meshq.connect(b.client_endpoint, creds=cfile) as sub_client:
                await sub_client.subscribe("gone.>")
                await wait_routes(pub)
                b.kill()
            for i in range(50):
                await pub.publish_async("gone.x", b"x" * 2000)
            await pub.flush(timeout=20)
            waiting = (await pub.status())["outbox"]
            assert waiting["messages"] == 50 and waiting["bytes"] >= 100_000, "they wait for b at first"
            await wait_until(lambda: _counter_at_least(pub, "dropped_retention", 50), 15,
                             what="the backlog for the dead agent to pass its retention")
            # what stays is a tombstone per message (ids and numbering, no bodies), for a b that returns
            assert (await pub.status())["outbox"]["bytes"] < 10_000

    asyncio.run(main())


async def _counter_at_least(client, name, n):
    return await _counter(client, name) >= n


# ---------------------------------------------------------------- ack wait in a queue group: another agent's member
@pytest.mark.timeout(60)
def test_queue_group_ack_wait_passed_redelivers_to_a_member_on_another_agent(agents):
    async def main():
        a = agents.start("a")
        b = agents.start("b", peers=[a.peer_endpoint])
        c = agents.start("c", peers=[a.peer_endpoint, b.peer_endpoint])
        receivers: list[str] = []
        async with await meshq.connect(a.client_endpoint) as pub, \
                await meshq.connect(b.client_endpoint) as cb, await meshq.connect(c.client_endpoint) as cc:
            subs = {"b": await cb.subscribe("stuck.>", group="w", manual_ack=True, ack_wait=0.5),
                    "c": await cc.subscribe("stuck.>", group="w", manual_ack=True, ack_wait=0.5)}
            await wait_routes(pub, 2)

            async def member(name, sub):
                async for msg in sub:
                    receivers.append(name)
                    if len(receivers) > 1:
                        await msg.ack()          # the first receiver hangs; whoever gets it next acks

            tasks = [asyncio.create_task(member(n, s)) for n, s in subs.items()]
            await pub.publish("stuck.job", b"x")
            await wait_until(lambda: _len_at_least(receivers, 2), 10, what="the redelivery")
            await asyncio.sleep(1.5)
            for t in tasks:
                t.cancel()
            assert receivers[0] != receivers[1], f"redelivered to the member on the other agent: {receivers}"
            assert len(receivers) == 2
            assert await _counter(pub, "rerouted_ack_wait") == 1

    asyncio.run(main())


async def _len_at_least(seq, n):
    return len(seq) >= n
