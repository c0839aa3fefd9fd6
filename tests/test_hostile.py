"""Garbage into the peer and client ports: dropped and counted; the agent keeps serving."""

from __future__ import annotations

import asyncio
import os
import socket

import msgpack
import pytest
import zmq

import meshq
from conftest import wait_routes


def _raw_tcp(endpoint: str, payloads) -> None:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    for data in payloads:
        with socket.create_connection((host, int(port)), timeout=2) as s:
            try:
                s.sendall(data)
                s.settimeout(0.2)
                s.recv(100)
            except OSError:
                pass


def _raw_unix(endpoint: str, payloads) -> None:
    for data in payloads:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(endpoint.removeprefix("ipc://"))
            try:
                s.sendall(data)
            except OSError:
                pass


def _zmq_garbage(endpoint: str, messages, identity: bytes | None = None, server_key: str | None = None) -> None:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 2000)
        if server_key:   # a CURVE client with a key nobody knows
            public, secret = zmq.curve_keypair()
            sock.curve_serverkey = server_key.encode()
            sock.curve_publickey, sock.curve_secretkey = public, secret
        if identity:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.connect(endpoint)
        for frames in messages:
            sock.send_multipart(frames)
        sock.close(linger=2000)
    finally:
        ctx.term()


BIG = b"\x00" * (100 * 1024 * 1024)

SHAPES = [
    [os.urandom(64)],
    [b"X"],
    [b"H"],
    [b"H", b"\xc1\xc1\xc1"],
    [b"H", msgpack.packb([1, 2, 3])],
    [b"H", msgpack.packb({"id": 5, "endpoint": None})],
    [b"P", msgpack.packb([1]), b"\x93\x01\x02"],
    [b"P", msgpack.packb([1]), msgpack.packb([[b"short", "s", None, 1, None, b""]])],
    [b"X", msgpack.packb(["default", "", 1, 1]), msgpack.packb("not items")],
    [b"A", msgpack.packb([[1, 10 ** 12]])],
    [b"S", msgpack.packb({"sid": "x"})],
    [b"D", msgpack.packb({"tenant": 1})],
    [b"\xff" * 3, b"", b""],
    [b"P", BIG, BIG],
]


@pytest.mark.timeout(90)
def test_garbage_is_dropped_and_counted_and_the_agent_keeps_serving(agents):
    async def main():
        a = agents.start("a")
        b = agents.start("b", peers=[a.peer_endpoint])
        async with await meshq.connect(b.client_endpoint) as sub_client, \
                await meshq.connect(a.client_endpoint) as pub_client:
            sub = await sub_client.subscribe("ok.>")
            await wait_routes(pub_client)

            await asyncio.to_thread(_raw_tcp, a.peer_endpoint, [os.urandom(4096), b"\xff" * 10, b"GET / HTTP/1.0\r\n\r\n"])
            await asyncio.to_thread(_raw_unix, a.client_endpoint, [os.urandom(4096), b"\x01\x02"])
            # plain zmq never gets past CURVE; CURVE clients with unknown keys reach the decoders
            key = (await pub_client.status())["pubkey"]
            await asyncio.to_thread(_zmq_garbage, a.peer_endpoint, SHAPES)
            await asyncio.to_thread(_zmq_garbage, a.peer_endpoint, SHAPES, None, key)
            await asyncio.to_thread(_zmq_garbage, a.peer_endpoint, SHAPES, b"evil", key)
            # one that impersonates agent b's routing id with its own key
            b_id = (await sub_client.status())["id"].encode()
            await asyncio.to_thread(_zmq_garbage, a.peer_endpoint, SHAPES, b_id, key)
            await asyncio.to_thread(_zmq_garbage, a.client_endpoint, SHAPES)
            # a client that says HELLO properly and then misbehaves
            hello = [b"H", msgpack.packb({"v": 1, "name": "bad"})]
            await asyncio.to_thread(_zmq_garbage, a.client_endpoint, [hello] + SHAPES, b"badclient")

            async def counted():
                st = await pub_client.status()
                c = st["counters"]
                return (c.get("dropped_peer_frames", 0) > 0 and c.get("dropped_client_frames", 0) > 0) and st

            from conftest import wait_until
            st = await wait_until(counted, 30, what="the garbage to be counted")
            assert st["counters"]["dropped_client_frames"] >= 5
            # still serving: a valid message goes through
            await pub_client.publish("ok.after", b"still alive")
            msg = await sub.next_msg(timeout=10)
            assert msg.data == b"still alive"
            assert a.proc.poll() is None and b.proc.poll() is None

    asyncio.run(main())
