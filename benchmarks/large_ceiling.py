"""The ceiling for large bodies on this machine: meshq's three hops with no meshq in them.

A publisher process sends 1 MiB frames (16 × 64 KiB bodies, as meshq batches them) over ipc
to relay A, which forwards them over TCP on loopback to relay B, which forwards them over ipc
to a consumer; acks flow back as small frames.  Pure pyzmq, zero-copy forwarding, no
decoding: what is left is the kernel's copies, libzmq and, with ``--curve``, the encryption
of the agent link; ``--fsync`` makes relay A append every frame to a file and fdatasync once
per loop turn, as the sending agent's group commit does (or, the last variant, in a thread
of its own while the loop goes on forwarding).  Every variant runs alternately in
one invocation; compare with ``meshq bench pubsub --size 65536``.

    python benchmarks/large_ceiling.py --mib 1024 --rounds 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import zmq

FRAME = 1 << 20


def _publisher(endpoint: str, frames: int, window: int, done) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    payload = os.urandom(FRAME)
    sent = acked = 0
    start = time.perf_counter()
    while acked < frames:
        while sent < frames and sent - acked < window:
            sock.send(payload, copy=False)
            sent += 1
        sock.recv()
        acked += 1
    done.put(time.perf_counter() - start)
    sock.close(0)
    ctx.term()


def _relay(inbound: str, outbound: str, bind_out: bool, keys, role: str, log_path: str | None,
           sync_thread: bool = False) -> None:
    """Forward frames one way and acks the other; `keys` = (server_public, server_secret, client_public, client_secret)."""
    ctx = zmq.Context()
    up = ctx.socket(zmq.ROUTER) if role == "a" else ctx.socket(zmq.ROUTER)
    down = ctx.socket(zmq.DEALER)
    if keys and role == "b":
        up.curve_server = True
        up.curve_publickey, up.curve_secretkey = keys[0], keys[1]
    if keys and role == "a":
        down.curve_serverkey = keys[0]
        down.curve_publickey, down.curve_secretkey = keys[2], keys[3]
    up.bind(inbound)
    down.connect(outbound) if not bind_out else down.bind(outbound)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log_path else None
    if fd is not None and sync_thread:
        import threading

        def syncer():
            while True:
                try:
                    os.fdatasync(fd)
                except OSError:
                    return
                time.sleep(0.0005)
        threading.Thread(target=syncer, daemon=True).start()
    poller = zmq.Poller()
    poller.register(up, zmq.POLLIN)
    poller.register(down, zmq.POLLIN)
    ident = None
    while True:
        ready = dict(poller.poll(1000))
        if up in ready:
            batch = []
            while True:
                try:
                    ident, frame = up.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if frame.bytes == b"stop":
                    if fd is not None:
                        os.close(fd)
                    return
                batch.append(frame)
            if fd is not None and batch:
                for frame in batch:
                    os.write(fd, frame.buffer)
                if not sync_thread:
                    os.fdatasync(fd)
            for frame in batch:
                down.send(frame, copy=False)
        if down in ready:
            while True:
                try:
                    ack = down.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                up.send_multipart([ident.bytes, ack])


def _consumer(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        ident, frame = sock.recv_multipart(copy=False)
        if frame.bytes == b"stop":
            return
        sock.send_multipart([ident, b"k"])


def run(mib: int, curve: bool, fsync: bool, sync_thread: bool = False) -> float:
    """MB/s through publisher → relay A → relay B → consumer, for `mib` MiB."""
    tmp = tempfile.mkdtemp(prefix="mq-ceiling-")
    a_in, b_out = f"ipc://{tmp}/a", f"ipc://{tmp}/b"
    with zmq.Context() as probe:
        s = probe.socket(zmq.ROUTER)
        port = s.bind_to_random_port("tcp://127.0.0.1")
        s.close(0)
    link = f"tcp://127.0.0.1:{port}"
    keys = (*zmq.curve_keypair(), *zmq.curve_keypair()) if curve else None
    log = os.path.join(tmp, "log") if fsync else None
    done = mp.Queue()
    procs = [mp.Process(target=_consumer, args=(b_out,)),
             mp.Process(target=_relay, args=(link, b_out, False, keys, "b", None)),
             mp.Process(target=_relay, args=(a_in, link, False, keys, "a", log, sync_thread))]
    for p in procs:
        p.start()
    time.sleep(0.5)
    pub = mp.Process(target=_publisher, args=(a_in, mib, 32, done))
    pub.start()
    seconds = done.get(timeout=300)
    pub.join()
    with zmq.Context() as ctx:       # stop the chain front to back
        for endpoint in (a_in,):
            s = ctx.socket(zmq.DEALER)
            s.connect(endpoint)
            s.send(b"stop")
            s.close(1000)
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    for name in os.listdir(tmp):
        os.unlink(os.path.join(tmp, name))
    os.rmdir(tmp)
    return mib * FRAME / seconds / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="MiB moved per run")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    variants = [("ipc+tcp", False, False, False), ("ipc+tcp CURVE", True, False, False),
                ("ipc+tcp CURVE + fdatasync", True, True, False),
                ("... fdatasync in a thread", True, True, True)]
    results: dict[str, list[float]] = {v[0]: [] for v in variants}
    for _ in range(args.rounds):
        for name, curve, fsync, sync_thread in variants:
            results[name].append(run(args.mib, curve, fsync, sync_thread))
            print(f"  {name:28s} {results[name][-1]:7.0f} MB/s  (load {os.getloadavg()[0]:.1f})", flush=True)
    print("median MB/s:")
    for name, values in results.items():
        print(f"  {name:28s} {statistics.median(values):7.0f}")


if __name__ == "__main__":
    main()
