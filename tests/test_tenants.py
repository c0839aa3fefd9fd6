"""Tenants: isolation on shared agents, credentials and permissions, CURVE on the peer port, quotas."""

from __future__ import annotations

import asyncio
import os
import time

import msgpack
import pytest
import zmq

import meshq
from meshq._auth import create_tenant, issue_token, load_tenant_file, write_tenant_file, write_token_file
from meshq._auth import Quotas
from conftest import wait_until


@pytest.fixture
def creds(workdir):
    """Tenant files for alpha (rate-limited) and beta, and client credentials."""
    files = {}
    alpha = create_tenant("alpha", Quotas(publish_rate=500, publish_burst=500))
    beta = create_tenant("beta")
    for t in (alpha, beta):
        path = os.path.join(workdir, f"{t.name}.tenant")
        write_tenant_file(path, t)
        files[t.name] = path

    def token(name, tenant, **kw):
        path = os.path.join(workdir, f"{name}.creds")
        write_token_file(path, issue_token(tenant, **kw))
        return path

    files["alpha.creds"] = token("alpha", alpha)
    files["beta.creds"] = token("beta", beta)
    files["alpha-orders.creds"] = token("alpha-orders", alpha, allow_pub=("orders.>",), allow_sub=("orders.>",))
    stranger = create_tenant("gamma")
    files["gamma.creds"] = token("gamma", stranger)
    files["alpha-forged.creds"] = token("alpha-forged", create_tenant("alpha"))   # right name, wrong secret
    return files


def _mesh(agents, creds):
    """x and y serve alpha and beta; z serves alpha only; all linked."""
    both = ["--tenant-file", creds["alpha"], "--tenant-file", creds["beta"]]
    x = agents.start("x", extra=both)
    y = agents.start("y", peers=[x.peer_endpoint], extra=both)
    z = agents.start("z", peers=[x.peer_endpoint, y.peer_endpoint], extra=["--tenant-file", creds["alpha"]])
    return x, y, z


async def _wait_subs(client, peers_with_subs):
    async def ok():
        st = await client.status()
        return sum(1 for p in st["peers"] if p["subscriptions"] > 0 and p["state"] == "alive") >= peers_with_subs
    await wait_until(ok, 20, what="subscriptions to propagate")


async def _drain(sub, seconds=1.0):
    out = []
    while True:
        try:
            out.append(await sub.next_msg(timeout=seconds))
        except meshq.TimeoutError:
            return out


@pytest.mark.timeout(120)
def test_tenants_on_shared_agents_are_isolated(agents, creds):
    async def main():
        x, y, z = _mesh(agents, creds)
        async with await meshq.connect(y.client_endpoint, creds=creds["alpha.creds"]) as ya, \
                await meshq.connect(y.client_endpoint, creds=creds["beta.creds"]) as yb, \
                await meshq.connect(z.client_endpoint, creds=creds["alpha.creds"]) as za, \
                await meshq.connect(x.client_endpoint, creds=creds["alpha.creds"]) as xa, \
                await meshq.connect(x.client_endpoint, creds=creds["beta.creds"]) as xb:
            sub_ya = await ya.subscribe("orders.>")
            sub_yb = await yb.subscribe("orders.>")
            sub_za = await za.subscribe("orders.>")
            await _wait_subs(xa, 2)
            await _wait_subs(xb, 1)
            for i in range(100):
                await xa.publish_async("orders.new", f"alpha-{i}".encode())
                await xb.publish_async("orders.new", f"beta-{i}".encode())
            await xa.flush(10)
            await xb.flush(10)
            got_ya = [m.data.decode() for m in await _drain(sub_ya)]
            got_yb = [m.data.decode() for m in await _drain(sub_yb)]
            got_za = [m.data.decode() for m in await _drain(sub_za)]
            assert got_ya == [f"alpha-{i}" for i in range(100)]
            assert got_yb == [f"beta-{i}" for i in range(100)]
            assert got_za == [f"alpha-{i}" for i in range(100)]

            # z never received a frame of beta: it drops (and counts) any frame of an unproven tenant,
            # and it counted exactly the alpha messages it got
            zst = await za.status()
            assert zst["counters"].get("dropped_unproven_tenant", 0) == 0
            assert zst["counters"]["delivered_in"] == 100
            # ... because x and y never consider z a member of beta
            xst = await xb.status()
            zpeer = next(p for p in xst["peers"] if p["name"] == "z")
            assert zpeer["serves_tenant"] is False and zpeer["subscriptions"] == 0
            xst_alpha = await xa.status()
            assert next(p for p in xst_alpha["peers"] if p["name"] == "z")["serves_tenant"] is True
            # a tenant's status shows only its own traffic
            assert xst["counters"]["published"] == 100 and xst["tenant"] == "beta"

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_credentials_and_permissions(agents, creds):
    async def main():
        x = agents.start("x", extra=["--tenant-file", creds["alpha"], "--tenant-file", creds["beta"]])
        with pytest.raises(meshq.AuthorizationError, match="requires credentials"):
            await meshq.connect(x.client_endpoint)
        for bad in ("gamma.creds", "alpha-forged.creds"):
            with pytest.raises(meshq.AuthorizationError):
                await meshq.connect(x.client_endpoint, creds=creds[bad])
        async with await meshq.connect(x.client_endpoint, creds=creds["alpha-orders.creds"]) as mq:
            await mq.publish("orders.new", b"fine")
            with pytest.raises(meshq.AuthorizationError, match="billing.x"):
                await mq.publish("billing.x", b"not allowed")
            with pytest.raises(meshq.AuthorizationError):
                await mq.subscribe("billing.>")
            with pytest.raises(meshq.AuthorizationError):
                await mq.subscribe(">")
            sub = await mq.subscribe("orders.eu.>")
            await sub.unsubscribe()
            st = await mq.status()
            assert st["tenant"] == "alpha"
            assert st["counters"]["publish_refused"] == 1 and st["counters"]["subscribe_refused"] == 2
            assert st["counters"]["client_auth_failures"] == 3

    asyncio.run(main())


def _peer_port_probe(endpoint: str, server_key: str | None) -> list[list[bytes]]:
    """Connect to a peer port (plain, or CURVE with a fresh unknown key), say HELLO, collect replies."""
    ctx = zmq.Context()
    got = []
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        public, secret = zmq.curve_keypair()
        if server_key:
            sock.curve_serverkey = server_key.encode()
            sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.setsockopt(zmq.ROUTING_ID, b"intruder")
        sock.connect(endpoint)
        hello = {"v": 1, "id": "intruder", "name": "i", "pk": public.decode(), "endpoint": "tcp://127.0.0.1:9",
                 "instance": "1", "open": True,
                 "member": {"type": "member_hello", "v": 1, "nonce": os.urandom(32), "tags": ["00" * 8]}}
        try:
            sock.send_multipart([b"H", msgpack.packb(hello)], zmq.NOBLOCK)
        except zmq.Again:
            return got     # nothing even accepted the frame
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if sock.poll(100):
                got.append(sock.recv_multipart())
                if got[-1][0] == b"W":
                    sock.send_multipart([b"R", msgpack.packb({"type": "member_proof", "v": 1, "proofs": {}})], zmq.NOBLOCK)
    finally:
        ctx.destroy(0)
    return got


@pytest.mark.timeout(60)
def test_peer_port_gives_strangers_nothing(agents, creds):
    async def main():
        x = agents.start("x", extra=["--tenant-file", creds["alpha"]])
        y = agents.start("y", peers=[x.peer_endpoint], extra=["--tenant-file", creds["alpha"]])
        async with await meshq.connect(x.client_endpoint, creds=creds["alpha.creds"]) as xa, \
                await meshq.connect(y.client_endpoint, creds=creds["alpha.creds"]) as ya:
            sub = await ya.subscribe("orders.>")
            await _wait_subs(xa, 1)
            key = (await xa.status())["pubkey"]
            plain = await asyncio.to_thread(_peer_port_probe, x.peer_endpoint, None)
            assert plain == [], "a plain connection must get nothing"
            curve = await asyncio.to_thread(_peer_port_probe, x.peer_endpoint, key)
            kinds = {frames[0] for frames in curve}
            assert kinds <= {b"W", b"K", b"E", b"h"}, kinds
            blob = b"".join(b"".join(f) for f in curve)
            assert b"alpha" not in blob and b"orders" not in blob
            marks = [msgpack.unpackb(f[1]) for f in curve if f[0] == b"K"]
            assert all(m["marks"] == [] for m in marks)
            # everyone else is still served
            await xa.publish("orders.new", b"after the intruder")
            assert (await sub.next_msg(timeout=10)).data == b"after the intruder"

    asyncio.run(main())


@pytest.mark.timeout(90)
def test_rate_quota_refuses_the_flooder_not_the_neighbour(agents, creds):
    async def main():
        both = ["--tenant-file", creds["alpha"], "--tenant-file", creds["beta"]]
        x = agents.start("x", extra=both)
        async with await meshq.connect(x.client_endpoint, creds=creds["alpha.creds"]) as flood, \
                await meshq.connect(x.client_endpoint, creds=creds["beta.creds"]) as calm:
            sub = await calm.subscribe("calm.>")
            acks = [await flood.publish_async("flood.x", b"x" * 100) for _ in range(5000)]
            results = await asyncio.gather(*[_outcome(a) for a in acks])
            refused = sum(1 for r in results if isinstance(r, meshq.QuotaExceeded))
            assert 0 < refused < 5000
            assert all(r is None or isinstance(r, meshq.QuotaExceeded) for r in results)
            retry = next(r for r in results if isinstance(r, meshq.QuotaExceeded)).retry_after
            assert retry is not None and 0 <= retry < 5
            for i in range(2000):
                await calm.publish_async("calm.y", b"%d" % i)
            await calm.flush(10)   # beta is never refused
            got = await _drain(sub, 1.0)
            assert len(got) == 2000
            assert (await flood.status())["counters"]["quota_refused"] == refused

    asyncio.run(main())


async def _outcome(ack):
    try:
        await ack
    except meshq.MeshqError as e:
        return e
    return None


def test_blocking_api_applies_backpressure_under_the_rate_quota(agents, creds):
    import meshq.sync
    x = agents.start("x", extra=["--tenant-file", creds["alpha"]])
    with meshq.sync.connect(x.client_endpoint, creds=creds["alpha.creds"]) as mq:
        start = time.monotonic()
        for i in range(700):           # 500 burst + 200 at 500/s: at least ~0.4 s of backpressure
            mq.publish("rate.x", b"%d" % i)
        assert time.monotonic() - start >= 0.3
        assert mq.status()["counters"]["published"] == 700
