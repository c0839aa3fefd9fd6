"""Directory-driven routing end to end: header filters at the source, request/reply, `meshq dir`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

import meshq
from meshq import NoRespondersError
from meshq._errors import BadFilterError
from conftest import wait_until


def _counter(st: dict, name: str) -> int:
    return st["counters"].get(name, 0)


async def _drain(sub, seconds=0.5):
    out = []
    while True:
        try:
            out.append(await sub.next_msg(timeout=seconds))
        except meshq.TimeoutError:
            return out


async def _wait_dir(client, predicate, timeout=10.0, what="directory"):
    async def ok():
        listing = await client.directory()
        return predicate(listing["entries"])
    await wait_until(ok, timeout, what=what)


def _subs_of(entries, subject):
    return {e["origin"] for e in entries if e["kind"] == "sub" and e["subject"] == subject}


@pytest.mark.timeout(60)
def test_filtered_subscription_gets_only_matching_and_sender_drops_the_rest(agents):
    """Issue 5, test 5: the publishing agent evaluates the filter; non-matching messages never reach the subscriber's agent."""
    async def main():
        a = agents.start("a")
        b = agents.start("b", peers=[a.peer_endpoint])
        async with await meshq.connect(a.client_endpoint) as pa, await meshq.connect(b.client_endpoint) as sb:
            with pytest.raises(BadFilterError):
                await sb.subscribe("orders.>", filter="priority>=high")       # refused by the agent, typed
            sub = await sb.subscribe("orders.>", filter="region=eu|us, priority>=5")
            await _wait_dir(pa, lambda es: any(e.get("filter") == "priority>=5,region=eu|us" for e in es),
                            what="the filtered subscription to reach the publisher's directory")
            before_b = _counter(await sb.status(), "delivered_in")
            n, expected = 400, []
            for i in range(n):
                headers = {"region": ("eu", "us", "ap", "eu")[i % 4], "priority": str(i % 10)}
                if i % 7 == 0:
                    headers = None                                           # no headers: never matches
                await pa.publish_async("orders.new", str(i).encode(), headers=headers)
                if headers and headers["region"] in ("eu", "us") and int(headers["priority"]) >= 5:
                    expected.append(str(i).encode())
            await pa.flush()
            got = []
            while len(got) < len(expected):
                got.append((await sub.next_msg(timeout=10)).data)
            got += [m.data for m in await _drain(sub)]
            assert got == expected                                          # exactly the matching ones, in order
            st_a, st_b = await pa.status(), await sb.status()
            assert _counter(st_a, "filtered_out") == n - len(expected)       # decided at the sender
            assert _counter(st_b, "delivered_in") - before_b == len(expected)  # only these crossed the network
            print(f"filter: {len(expected)} of {n} delivered, sender filtered_out={_counter(st_a, 'filtered_out')}")
    asyncio.run(main())


RESPONDER = r"""
import asyncio, sys, meshq
async def main():
    async with await meshq.connect(sys.argv[1]) as mq:
        srv = await mq.serve("svc.echo")
        quiet = await mq.serve("svc.silent")          # never answers
        print("ready", flush=True)
        async for req in srv:
            await req.respond(sys.argv[2].encode() + b":" + req.data)
asyncio.run(main())
"""


@pytest.mark.timeout(90)
def test_request_reply_two_responders_one_agent_killed_keeps_answering(agents, workdir):
    """Issue 5, test 6: two responders on two agents; kill -9 one agent; every request after detection is answered."""
    async def main():
        a = agents.start("a")
        b = agents.start("b", peers=[a.peer_endpoint])
        c = agents.start("c", peers=[a.peer_endpoint, b.peer_endpoint])
        env = {**os.environ}
        procs = [subprocess.Popen([sys.executable, "-c", RESPONDER, x.client_endpoint, name], env=env,
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
                 for x, name in ((b, "b"), (c, "c"))]
        try:
            for p in procs:
                assert p.stdout.readline().strip() == "ready"
            async with await meshq.connect(a.client_endpoint) as mq:
                ids = {}
                for x in (b, c):
                    ids[x] = x.ready_line.split("(")[1].split(")")[0]
                await _wait_dir(mq, lambda es: _subs_of(es, "svc.echo") >= set(ids.values()),
                                what="both responders in the requester's directory")
                t0 = time.monotonic()
                with pytest.raises(NoRespondersError):
                    await mq.request("svc.nobody", b"?", timeout=5)
                assert time.monotonic() - t0 < 0.5                         # at once, not after the timeout
                t0 = time.monotonic()
                with pytest.raises(meshq.TimeoutError):
                    await mq.request("svc.silent", b"?", timeout=0.5)
                assert 0.45 < time.monotonic() - t0 < 2
                answers = {}
                for i in range(20):
                    r = await mq.request("svc.echo", str(i).encode(), timeout=5)
                    who, body = r.data.split(b":")
                    assert body == str(i).encode()
                    answers[who] = answers.get(who, 0) + 1
                last = who                                                  # the member sequential requests prefer
                # many in flight at once: queue-group semantics, exactly one answer each, both serve
                replies = await asyncio.gather(*[mq.request("svc.echo", str(i).encode(), timeout=5) for i in range(100)])
                assert sorted(int(r.data.split(b":")[1]) for r in replies) == list(range(100))
                for r in replies:
                    answers[r.data.split(b":")[0]] = answers.get(r.data.split(b":")[0], 0) + 1
                assert set(answers) == {b"b", b"c"}, answers
                victim, survivor = (b, b"c") if last == b"b" else (c, b"b")
                victim.kill()                                               # kill -9 of one responder's agent
                t_kill = time.monotonic()
                lost = 0
                while True:                                                 # the detection window
                    try:
                        r = await mq.request("svc.echo", b"x", timeout=0.5)
                        if r.data.startswith(survivor + b":"):
                            break
                    except meshq.TimeoutError:
                        lost += 1
                    assert time.monotonic() - t_kill < 10, "requests never failed over"
                failover = time.monotonic() - t_kill
                for i in range(50):                                         # after it: every request answered
                    r = await mq.request("svc.echo", str(i).encode(), timeout=2)
                    assert r.data == survivor + b":" + str(i).encode()
                print(f"failover after {failover:.2f} s ({lost} requests timed out in the window); answers {answers}")
                assert failover < 5
        finally:
            for p in procs:
                p.kill()
                p.wait()
    asyncio.run(main())


def _cli(*args, timeout=20, **kw):
    return subprocess.run([sys.executable, "-m", "meshq", *args], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.timeout(60)
def test_cli_req_reply_and_dir(agents):
    """`meshq reply --count 1 --body`, `meshq req --json`, `meshq dir --json` on two linked agents."""
    a = agents.start("a")
    b = agents.start("b", peers=[a.peer_endpoint])
    server = subprocess.Popen([sys.executable, "-m", "meshq", "reply", "svc.time", "--count", "2", "--body", "pong {i}",
                               "--agent", b.client_endpoint], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 15
        while True:
            listing = json.loads(_cli("dir", "--json", "--agent", a.client_endpoint).stdout)
            subs = [e for e in listing["entries"] if e["kind"] == "sub" and e["subject"] == "svc.time"]
            if subs and subs[0]["state"] == "alive":
                break
            assert time.time() < deadline, listing
            time.sleep(0.1)
        assert subs[0]["group"] == "_responders"
        assert any(e["kind"] == "svc" and e["subject"] == "svc.time" for e in listing["entries"])
        r = _cli("req", "svc.time", "ping", "--json", "--agent", a.client_endpoint)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["data"] == "pong 1"
        r = _cli("req", "svc.time", "ping", "--agent", a.client_endpoint)
        assert r.returncode == 0 and r.stdout.strip() == "pong 2", r.stderr
        assert server.wait(10) == 0
        r = _cli("req", "svc.none", "--timeout", "1", "--agent", a.client_endpoint, input="")
        assert r.returncode == 1 and "no responders" in r.stderr
        text = _cli("dir", "--agent", a.client_endpoint).stdout
        assert "tenant default" in text
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


@pytest.mark.timeout(60)
def test_agent_restarts_with_its_last_directory_view(agents):
    """The directory is persisted: a restarted agent alone still routes to the subscriptions it last saw."""
    async def main():
        a = agents.start("a")
        b = agents.start("b", peers=[a.peer_endpoint])
        async with await meshq.connect(b.client_endpoint) as sb:
            await sb.subscribe("persist.x")
            async with await meshq.connect(a.client_endpoint) as pa:
                await _wait_dir(pa, lambda es: "persist.x" in {e.get("subject") for e in es}, what="b's subscription")
            b.kill()          # before the client says goodbye (which would retract the subscription)
        assert a.stop() == 0
        a2 = agents.start("a2", data_dir=a.data_dir)
        async with await meshq.connect(a2.client_endpoint) as pa:
            entries = (await pa.directory())["entries"]
            assert any(e.get("subject") == "persist.x" and e["state"] != "self" for e in entries), entries
            await pa.publish("persist.x", b"kept")
            st = await pa.status()
            assert st["outbox"]["messages"] == 1 and _counter(st, "dropped_no_subscriber") == 0
    asyncio.run(main())


@pytest.mark.timeout(30)
def test_malformed_request_and_directory_frames_are_dropped_and_counted(agents):
    """Bounded, typed decoding of REQ / RESPOND / DIRQ from a raw client: dropped, counted, agent keeps serving."""
    import msgpack
    import zmq
    from meshq._envelope import Kind

    async def main():
        a = agents.start("a")
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.connect(a.client_endpoint)
            sock.send_multipart([Kind.HELLO, msgpack.packb({"v": 1, "name": "raw"})])
            assert sock.poll(5000)
            sock.recv_multipart()
            item = [os.urandom(16), "svc.x", None, 1, None, b""]
            for frames in ([Kind.REQ, msgpack.packb([1, 1000])],
                           [Kind.REQ, msgpack.packb(["1", 1000]), msgpack.packb([item])],
                           [Kind.REQ, msgpack.packb([1, 10 ** 12]), msgpack.packb([item])],
                           [Kind.REQ, msgpack.packb([1, 1000]), msgpack.packb([item, item])],
                           [Kind.RESPOND, msgpack.packb({"to": "nonsense"}), msgpack.packb([item])],
                           [Kind.RESPOND, msgpack.packb({"to": "a.zz.1"}), msgpack.packb([item])],
                           [Kind.RESPOND, msgpack.packb({"to": 5}), b"\xc1"]):
                sock.send_multipart(frames)
            sock.send_multipart([Kind.REQ, msgpack.packb([7, 1000]), msgpack.packb([item])])   # well formed
            assert sock.poll(5000)
            kind, header, *_ = sock.recv_multipart()
            assert kind == Kind.PUBACK and msgpack.unpackb(header)[2][0][2] == "no-responders"
        finally:
            sock.close(linger=0)
            ctx.term()
        async with await meshq.connect(a.client_endpoint) as mq:
            st = await mq.status()
            assert _counter(st, "dropped_client_frames") == 7
            assert (await mq.directory())["tenant"] == "default"
    asyncio.run(main())
