#!/usr/bin/env python3
"""Peer brokers for meshq's comparison benchmark: Redis Streams and NATS JetStream.

Each run measures END TO END, with durable storage and acknowledgements, with the
publisher and every consumer in its own Python process (multiprocessing, spawn):
the clock starts just before the first publish and stops at the last consumer ack.

Workloads (bodies are ``size`` bytes, default 100):

- ``pubsub``  one producer, one consumer.
- ``queue``   one producer, N consumers sharing one consumer group / durable consumer;
              reports the total rate.
- ``fanout``  one producer, N consumers that each get every message (N groups / N durable
              consumers); reports the rate delivered to each consumer
              (``total_msgs_per_s`` is the sum over consumers).
- ``latency`` the producer is paced at ``rate`` msgs/s (default 10,000); each body carries
              its send time (``time.time_ns()``, comparable across processes); consumers
              record publish→delivery latency; p50/p90/p99/p99.9 in ms.

How each system is driven:

- Redis Streams: XADD pipelined in batches of 100; consumers XREADGROUP COUNT 100 in a
  consumer group, XACK of the previous batch pipelined with the next read.
  Server: ``--appendonly yes --appendfsync everysec --save ''``.
- NATS JetStream: a file-storage stream; ``js.publish_async`` with a bounded in-flight window
  (every PubAck checked); durable pull consumers (``fetch(100)``), every message acked.
  Server: ``nats-server -js -sd TMP`` (JetStream's default sync interval).

Neither server fsyncs every message with these settings (Redis: once a second; JetStream:
its periodic sync), which matters when reading these figures next to a system that fsyncs
every batch.

Every count is verified: each message carries its sequence number, the consumers report
which ones they saw, and the result lists any missing, duplicated or extra message and any
publish error in ``errors`` (``ok`` is true only when there is none).

Servers started here bind 127.0.0.1 on a free port with a fresh temporary directory, and
are stopped and their directories removed on exit, error or Ctrl-C (and, on Linux, are
sent SIGTERM if this process dies).

Usage::

    python benchmarks/brokers.py redis pubsub --count 100000
    python benchmarks/brokers.py nats queue --count 100000 --consumers 3 --json
    python benchmarks/brokers.py redis latency --rate 10000 --duration 5

Needs: ``apt-get install -y redis-server nats-server`` and ``pip install redis nats-py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from typing import Any, Iterator

SYSTEMS = ("redis", "nats")
WORKLOADS = ("pubsub", "queue", "fanout", "latency")

DEFAULT_SIZE = 100
DEFAULT_COUNT = 100_000
DEFAULT_RATE = 10_000
DEFAULT_DURATION = 5.0
BATCH = 100  # publish pipeline / fetch batch size
NATS_PUB_WINDOW = 1000  # in-flight async publishes before waiting for their PubAcks

_HDR = struct.Struct("<QQ")  # sequence number, send time (time.time_ns())
MIN_SIZE = _HDR.size

_SERVER_START_TIMEOUT = 15.0


# --------------------------------------------------------------------------- availability


def _find_binary(name: str, env_var: str) -> str | None:
    override = os.environ.get(env_var)
    if override:
        return override if os.access(override, os.X_OK) else None
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def redis_available() -> str | None:
    """None if Redis Streams can be benchmarked here, else the reason why not."""
    if _find_binary("redis-server", "REDIS_SERVER") is None:
        return "redis-server not found (apt-get install -y redis-server, or set REDIS_SERVER)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "Python package 'redis' not installed (pip install redis)"
    return None


def nats_available() -> str | None:
    """None if NATS JetStream can be benchmarked here, else the reason why not."""
    if _find_binary("nats-server", "NATS_SERVER") is None:
        return "nats-server not found (apt-get install -y nats-server, or set NATS_SERVER)"
    try:
        import nats  # noqa: F401
        import nats.js  # noqa: F401
    except ImportError:
        return "Python package 'nats-py' not installed (pip install nats-py)"
    return None


# --------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_dies_with_parent() -> None:  # runs in the server child before exec
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# Watches a pipe from this process; when it closes (normal exit, crash or SIGKILL alike) it
# stops any process still running from the temp dir and removes the dir.
_JANITOR = r"""
import os, shutil, signal, sys, time
tmp = sys.argv[1]
sys.stdin.buffer.read()  # EOF: the benchmark process is gone or done
def procs():
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if tmp.encode() in f.read():
                        out.append(int(d))
            except OSError:
                pass
    return [p for p in out if p != os.getpid()]
if os.path.isdir("/proc"):
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        ps = procs()
        if not ps:
            break
        for p in ps:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        end = time.monotonic() + wait
        while procs() and time.monotonic() < end:
            time.sleep(0.1)
shutil.rmtree(tmp, ignore_errors=True)
"""


def _start_janitor(tmp: str) -> int | None:
    """Start the janitor for ``tmp``; returns the write end of its pipe (close it to release)."""
    try:
        r, w = os.pipe()  # not inheritable: only the janitor gets r
        subprocess.Popen([sys.executable, "-c", _JANITOR, tmp], stdin=r,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
        os.close(r)
        return w
    except OSError:
        return None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def _server(kind: str, argv_for, ready, attempts: int = 3) -> Iterator[str]:
    """Start a server on a free loopback port in a fresh temp dir; always stop and clean up."""
    tmp = tempfile.mkdtemp(prefix=f"meshq-bench-{kind}-")
    proc: subprocess.Popen | None = None
    log = None
    janitor = _start_janitor(tmp)
    try:
        last_err = ""
        for _ in range(attempts):
            port = _free_port()
            data = os.path.join(tmp, f"data-{port}")
            os.mkdir(data)
            log = open(os.path.join(tmp, f"server-{port}.log"), "wb")
            proc = subprocess.Popen(
                argv_for(port, data),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp,
                start_new_session=True,  # Ctrl-C reaches us; we stop the server in order
                preexec_fn=_child_dies_with_parent if sys.platform.startswith("linux") else None,
            )
            deadline = time.monotonic() + _SERVER_START_TIMEOUT
            while time.monotonic() < deadline and proc.poll() is None:
                if ready(port, log.name):
                    break
                time.sleep(0.05)
            if proc.poll() is None and ready(port, log.name):
                log.close()
                log = None
                break
            log.close()
            log = None
            _stop(proc)
            with open(os.path.join(tmp, f"server-{port}.log"), "rb") as f:
                last_err = f.read()[-2000:].decode(errors="replace")
            proc = None
        if proc is None:
            raise RuntimeError(f"{kind} server did not start: {last_err}")
        yield f"{kind}://127.0.0.1:{port}"
    finally:
        if log is not None:
            log.close()
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
        if janitor is not None:
            os.close(janitor)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server (AOF on, fsync every second, no RDB) on 127.0.0.1; yields its URL."""
    why = redis_available()
    if why:
        raise RuntimeError(why)
    binary = _find_binary("redis-server", "REDIS_SERVER")

    def argv(port: int, data: str) -> list[str]:
        return [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", data,
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--daemonize", "no", "--protected-mode", "yes", "--logfile", "",
        ]

    def ready(port: int, logname: str) -> bool:
        if not _port_open(port):
            return False
        import redis

        try:
            c = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
            try:
                return bool(c.ping())
            finally:
                c.close()
        except Exception:
            return False

    with _server("redis", argv, ready) as url:
        yield url


@contextlib.contextmanager
def nats_server() -> Iterator[str]:
    """A throwaway nats-server with JetStream (file storage in a temp dir) on 127.0.0.1; yields its URL."""
    why = nats_available()
    if why:
        raise RuntimeError(why)
    binary = _find_binary("nats-server", "NATS_SERVER")

    def argv(port: int, data: str) -> list[str]:
        return [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", data]

    def ready(port: int, logname: str) -> bool:
        try:
            with open(logname, "rb") as f:
                if b"Server is ready" not in f.read():
                    return False
        except OSError:
            return False
        return _port_open(port)

    with _server("nats", argv, ready) as url:
        yield url


# --------------------------------------------------------------------------- shared helpers


class _Plan:
    """What one run does; picklable, handed to every worker process."""

    def __init__(self, system: str, workload: str, count: int, size: int, consumers: int,
                 rate: float, url: str, stream: str, groups: list[str], timeout: float):
        self.system = system
        self.workload = workload
        self.count = count
        self.size = size
        self.consumers = consumers
        self.rate = rate
        self.url = url
        self.stream = stream
        self.groups = groups  # one per consumer (fanout) or one shared
        self.timeout = timeout

    @property
    def shared(self) -> bool:  # consumers share one group/durable
        return self.workload != "fanout"

    def group_for(self, idx: int) -> str:
        return self.groups[0] if self.shared else self.groups[idx]


def _body(seq: int, pad: bytes) -> bytes:
    return _HDR.pack(seq, time.time_ns()) + pad


class _Tally:
    """A consumer's record of what it saw."""

    def __init__(self, count: int, latency: bool):
        self.count = count
        self.seen = bytearray(count)
        self.received = 0
        self.duplicates = 0
        self.out_of_range = 0
        self.lat = array("q") if latency else None
        self.last_ack_ns = 0
        self.first_ns = 0

    def add(self, body: bytes, now_ns: int) -> None:
        seq, sent = _HDR.unpack_from(body)
        self.received += 1
        if seq >= self.count:
            self.out_of_range += 1
        elif self.seen[seq]:
            self.duplicates += 1
        else:
            self.seen[seq] = 1
        if self.lat is not None:
            self.lat.append(now_ns - sent)

    def result(self, idx: int, errors: list[str]) -> dict:
        return {
            "role": "consumer", "idx": idx, "received": self.received,
            "duplicates": self.duplicates, "out_of_range": self.out_of_range,
            "seen": bytes(self.seen), "lat": self.lat.tobytes() if self.lat is not None else None,
            "last_ack_ns": self.last_ack_ns, "first_ns": self.first_ns, "errors": errors,
        }


def _worker(target, parent_pid: int, *args) -> None:
    """Entry point of every worker process: dies with the parent, exits quietly on Ctrl-C."""
    if sys.platform.startswith("linux"):
        _child_dies_with_parent()
    if os.getppid() != parent_pid:  # parent already gone
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    target(*args)


def _pace(i: int, t0: float, rate: float, count: int) -> int:
    """How many messages should have been sent by now (at least i+1 when one is due)."""
    return min(count, int((time.perf_counter() - t0) * rate) + 1)


# --------------------------------------------------------------------------- redis workers


def _redis_client(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=60, socket_connect_timeout=10)


def _redis_publisher(plan: _Plan, ready, go, stop, out) -> None:
    errors: list[str] = []
    r = _redis_client(plan.url)
    r.ping()
    pad = b"\0" * (plan.size - MIN_SIZE)
    stream = plan.stream
    ready.put(("publisher", 0))
    go.wait()
    published = 0
    t_start = time.time_ns()
    try:
        if plan.workload == "latency":
            t0 = time.perf_counter()
            i = 0
            while i < plan.count and not stop.is_set():
                due = _pace(i, t0, plan.rate, plan.count)
                if due <= i:
                    time.sleep(max(0.0, t0 + i / plan.rate - time.perf_counter()))
                    continue
                due = min(due, i + BATCH)
                p = r.pipeline(transaction=False)
                for seq in range(i, due):
                    p.xadd(stream, {b"d": _body(seq, pad)})
                for res in p.execute(raise_on_error=False):
                    if isinstance(res, Exception):
                        errors.append(f"XADD: {res!r}")
                    else:
                        published += 1
                i = due
        else:
            for start in range(0, plan.count, BATCH):
                if stop.is_set():
                    break
                p = r.pipeline(transaction=False)
                for seq in range(start, min(start + BATCH, plan.count)):
                    p.xadd(stream, {b"d": _body(seq, pad)})
                for res in p.execute(raise_on_error=False):
                    if isinstance(res, Exception):
                        errors.append(f"XADD: {res!r}")
                    else:
                        published += 1
    except Exception as e:  # report, don't hang the run
        errors.append(f"publisher: {e!r}")
    t_end = time.time_ns()
    r.close()
    out.put({"role": "publisher", "published": published, "t_start": t_start,
             "t_end": t_end, "errors": errors[:20]})


def _redis_consumer(plan: _Plan, idx: int, done_counter, ready, go, stop, out) -> None:
    errors: list[str] = []
    r = _redis_client(plan.url)
    r.ping()
    group = plan.group_for(idx)
    name = f"c{idx}"
    stream = plan.stream
    tally = _Tally(plan.count, plan.workload == "latency")
    ready.put(("consumer", idx))
    go.wait()
    deadline = time.monotonic() + plan.timeout

    def finished() -> bool:
        if plan.shared:
            return done_counter.value >= plan.count
        return tally.received >= plan.count

    to_ack: list[bytes] = []
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            if to_ack and finished():
                r.xack(stream, group, *to_ack)
                tally.last_ack_ns = time.time_ns()
                to_ack = []
                break
            if not to_ack and finished():
                break
            # XACK of the previous batch pipelined with the next (non-blocking) read.
            p = r.pipeline(transaction=False)
            if to_ack:
                p.xack(stream, group, *to_ack)
            p.xreadgroup(group, name, {stream: ">"}, count=BATCH)
            res = p.execute()
            now = time.time_ns()
            if to_ack:
                if res[0] != len(to_ack):
                    errors.append(f"XACK acked {res[0]} of {len(to_ack)}")
                tally.last_ack_ns = now
                to_ack = []
            resp = res[-1]
            if not resp:
                # Nothing waiting: block briefly for more (acks are all sent by now).
                resp = r.xreadgroup(group, name, {stream: ">"}, count=BATCH, block=100)
                now = time.time_ns()
                if not resp:
                    continue
            entries = resp[0][1]
            if not tally.first_ns:
                tally.first_ns = now
            for msg_id, fields in entries:
                tally.add(fields[b"d"], now)
                to_ack.append(msg_id)
            if plan.shared:
                with done_counter.get_lock():
                    done_counter.value += len(entries)
        else:
            if to_ack:
                r.xack(stream, group, *to_ack)
                tally.last_ack_ns = time.time_ns()
            if not finished():
                errors.append(f"consumer {idx}: stopped before all messages arrived")
    except Exception as e:
        errors.append(f"consumer {idx}: {e!r}")
    r.close()
    out.put(tally.result(idx, errors[:20]))


def _redis_setup(plan: _Plan) -> None:
    r = _redis_client(plan.url)
    try:
        for g in plan.groups:
            r.xgroup_create(plan.stream, g, id="0", mkstream=True)
    finally:
        r.close()


def _redis_teardown(plan: _Plan) -> None:
    r = _redis_client(plan.url)
    try:
        r.delete(plan.stream)
    finally:
        r.close()


def _redis_version(url: str) -> str | None:
    try:
        r = _redis_client(url)
        try:
            return str(r.info("server").get("redis_version"))
        finally:
            r.close()
    except Exception:
        return None


# --------------------------------------------------------------------------- nats workers


def _nats_url(url: str) -> str:
    return "nats://" + url.split("://", 1)[1] if "://" in url else url


async def _nats_connect(url: str):
    import nats

    return await nats.connect(_nats_url(url), connect_timeout=10, max_reconnect_attempts=3,
                              pending_size=64 * 1024 * 1024)


def _nats_publisher(plan: _Plan, ready, go, stop, out) -> None:
    asyncio.run(_nats_publisher_async(plan, ready, go, stop, out))


async def _nats_publisher_async(plan: _Plan, ready, go, stop, out) -> None:
    errors: list[str] = []
    nc = await _nats_connect(plan.url)
    js = nc.jetstream(publish_async_max_pending=NATS_PUB_WINDOW * 2)
    subject = plan.stream
    pad = b"\0" * (plan.size - MIN_SIZE)
    has_async = hasattr(js, "publish_async")
    ready.put(("publisher", 0))
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    published = 0
    pending: list = []

    async def send(seq: int) -> None:
        if has_async:
            pending.append(await js.publish_async(subject, _body(seq, pad)))
        else:
            pending.append(asyncio.ensure_future(js.publish(subject, _body(seq, pad), timeout=30)))

    async def settle() -> None:
        nonlocal published, pending
        if not pending:
            return
        for res in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(res, BaseException):
                errors.append(f"publish: {res!r}")
            else:
                published += 1
        pending = []

    t_start = time.time_ns()
    try:
        if plan.workload == "latency":
            t0 = time.perf_counter()
            i = 0
            while i < plan.count and not stop.is_set():
                due = _pace(i, t0, plan.rate, plan.count)
                if due <= i:
                    await asyncio.sleep(max(0.0, t0 + i / plan.rate - time.perf_counter()))
                    continue
                for seq in range(i, min(due, i + BATCH)):
                    await send(seq)
                i = min(due, i + BATCH)
                if len(pending) >= NATS_PUB_WINDOW:
                    await settle()
        else:
            for seq in range(plan.count):
                await send(seq)
                if len(pending) >= NATS_PUB_WINDOW:
                    # Keep a window in flight: settle the older half, keep publishing.
                    head, pending = pending[: NATS_PUB_WINDOW // 2], pending[NATS_PUB_WINDOW // 2:]
                    for res in await asyncio.gather(*head, return_exceptions=True):
                        if isinstance(res, BaseException):
                            errors.append(f"publish: {res!r}")
                        else:
                            published += 1
                if seq % 1000 == 0 and stop.is_set():
                    break
        await settle()
    except Exception as e:
        errors.append(f"publisher: {e!r}")
    t_end = time.time_ns()
    with contextlib.suppress(Exception):
        await nc.close()
    out.put({"role": "publisher", "published": published, "t_start": t_start,
             "t_end": t_end, "errors": errors[:20]})


def _nats_consumer(plan: _Plan, idx: int, done_counter, ready, go, stop, out) -> None:
    asyncio.run(_nats_consumer_async(plan, idx, done_counter, ready, go, stop, out))


async def _nats_consumer_async(plan: _Plan, idx: int, done_counter, ready, go, stop, out) -> None:
    import nats.errors

    errors: list[str] = []
    nc = await _nats_connect(plan.url)
    js = nc.jetstream()
    psub = await js.pull_subscribe_bind(durable=plan.group_for(idx), stream=plan.stream)
    tally = _Tally(plan.count, plan.workload == "latency")
    ready.put(("consumer", idx))
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    deadline = time.monotonic() + plan.timeout

    def finished() -> bool:
        if plan.shared:
            return done_counter.value >= plan.count
        return tally.received >= plan.count

    try:
        while not finished():
            if stop.is_set() or time.monotonic() > deadline:
                errors.append(f"consumer {idx}: stopped before all messages arrived")
                break
            try:
                msgs = await psub.fetch(BATCH, timeout=0.5)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            now = time.time_ns()
            if not tally.first_ns:
                tally.first_ns = now
            for m in msgs:
                tally.add(m.data, now)
                await m.ack()
            if plan.shared:
                with done_counter.get_lock():
                    done_counter.value += len(msgs)
            if finished():
                await nc.flush(timeout=30)  # the acks have reached the server
            tally.last_ack_ns = time.time_ns()
    except Exception as e:
        errors.append(f"consumer {idx}: {e!r}")
    with contextlib.suppress(Exception):
        await nc.close()
    out.put(tally.result(idx, errors[:20]))


async def _nats_setup_async(plan: _Plan) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType

    nc = await _nats_connect(plan.url)
    try:
        js = nc.jetstream()
        for attempt in range(50):  # JetStream may need a moment after the server is ready
            try:
                await js.add_stream(name=plan.stream, subjects=[plan.stream],
                                    storage=StorageType.FILE, retention=RetentionPolicy.LIMITS,
                                    num_replicas=1, max_msg_size=max(plan.size * 2, 1 << 20))
                break
            except Exception:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        for g in plan.groups:
            await js.add_consumer(plan.stream, ConsumerConfig(
                durable_name=g, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                ack_wait=120, max_ack_pending=20_000, max_waiting=512))
    finally:
        await nc.close()


async def _nats_teardown_async(plan: _Plan) -> None:
    nc = await _nats_connect(plan.url)
    try:
        await nc.jetstream().delete_stream(plan.stream)
    finally:
        await nc.close()


def _nats_setup(plan: _Plan) -> None:
    asyncio.run(_nats_setup_async(plan))


def _nats_teardown(plan: _Plan) -> None:
    asyncio.run(_nats_teardown_async(plan))


def _nats_version(url: str) -> str | None:
    async def v() -> str | None:
        nc = await _nats_connect(url)
        try:
            info = getattr(nc, "_server_info", None) or {}
            return info.get("version")
        finally:
            await nc.close()

    try:
        return asyncio.run(v())
    except Exception:
        return None


# --------------------------------------------------------------------------- orchestration


def _client_info(system: str) -> str:
    from importlib import metadata

    def v(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    if system == "redis":
        hi = v("hiredis")
        return f"redis-py {v('redis')}" + (f" + hiredis {hi}" if hi else " (pure-Python parser)")
    return f"nats-py {v('nats-py')}"

_IMPL = {
    "redis": (_redis_setup, _redis_teardown, _redis_publisher, _redis_consumer, _redis_version),
    "nats": (_nats_setup, _nats_teardown, _nats_publisher, _nats_consumer, _nats_version),
}


def _percentiles(lat_ns: array) -> dict:
    if not lat_ns:
        return {}
    s = sorted(lat_ns)
    n = len(s)

    def pct(p: float) -> float:
        k = max(0, min(n - 1, math.ceil(p / 100.0 * n) - 1))  # nearest rank
        return round(s[k] / 1e6, 3)

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "p99.9": pct(99.9),
            "max": round(s[-1] / 1e6, 3), "samples": n}


def _validate(workload: str, count: int, size: int, consumers: int) -> None:
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")
    if count < 1:
        raise ValueError("count must be >= 1")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} (sequence number + send time)")
    if consumers < 1:
        raise ValueError("consumers must be >= 1")
    if workload == "pubsub" and consumers != 1:
        raise ValueError("pubsub is one producer, one consumer; use queue or fanout for more")


def _run(system: str, workload: str, count: int, size: int, consumers: int, *,
         rate: float, url: str, timeout: float | None) -> dict:
    setup, teardown, publisher, consumer, version = _IMPL[system]
    run_id = uuid.uuid4().hex[:8]
    stream = f"bench_{workload}_{run_id}"
    n_groups = consumers if workload == "fanout" else 1
    groups = [f"g{i}_{run_id}" for i in range(n_groups)]
    if timeout is None:
        expected = count / rate if workload == "latency" else count / 2000.0
        timeout = max(60.0, expected * 4 + 30)
    plan = _Plan(system, workload, count, size, consumers, rate, url, stream, groups, timeout)
    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

    ctx = mp.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    done_counter = ctx.Value("q", 0)
    procs: list = []
    me = os.getpid()
    errors: list[str] = []
    pub_res: dict | None = None
    cons_res: dict[int, dict] = {}
    setup(plan)
    try:
        for i in range(consumers):
            procs.append(ctx.Process(target=_worker, name=f"{system}-consumer-{i}", daemon=True,
                                     args=(consumer, me, plan, i, done_counter, ready, go, stop, out)))
        procs.append(ctx.Process(target=_worker, name=f"{system}-publisher", daemon=True,
                                 args=(publisher, me, plan, ready, go, stop, out)))
        for p in procs:
            p.start()
        # Everyone connected and bound before the clock starts.
        t_ready = time.monotonic() + 60
        n_ready = 0
        while n_ready < len(procs):
            try:
                ready.get(timeout=0.5)
                n_ready += 1
            except queue_mod.Empty:
                dead = [p.name for p in procs if not p.is_alive()]
                if dead or time.monotonic() > t_ready:
                    raise RuntimeError(f"workers failed to start: {dead or 'timeout'}")
        go.set()
        t_end = time.monotonic() + timeout + 30
        stopping = False
        while pub_res is None or len(cons_res) < consumers:
            try:
                res = out.get(timeout=0.5)
            except queue_mod.Empty:
                now = time.monotonic()
                if not stopping and now > t_end:
                    errors.append(f"timed out after {timeout:.0f}s")
                    stop.set()  # workers stop and report what they have
                    stopping, t_end = True, now + 15
                elif stopping and now > t_end:
                    break
                elif not any(p.is_alive() for p in procs):
                    with contextlib.suppress(queue_mod.Empty):  # drain what is in flight
                        while pub_res is None or len(cons_res) < consumers:
                            res = out.get(timeout=1)
                            if res["role"] == "publisher":
                                pub_res = res
                            else:
                                cons_res[res["idx"]] = res
                    break
                continue
            if res["role"] == "publisher":
                pub_res = res
            else:
                cons_res[res["idx"]] = res
        for p in procs:
            p.join(timeout=10)
    finally:
        stop.set()
        go.set()  # release anyone still waiting, so they exit
        for p in procs:
            if p.is_alive():
                p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        with contextlib.suppress(Exception):
            teardown(plan)
        for q in (ready, out):
            q.close()
            q.join_thread()

    # ---- verify and summarise
    published = pub_res["published"] if pub_res else 0
    if pub_res:
        errors.extend(pub_res["errors"])
        if published != count:
            errors.append(f"published {published} of {count}")
    else:
        errors.append("publisher did not report")
    delivered_each: list[int] = []
    duplicates = 0
    lat = array("q")
    last_ack = 0
    union = bytearray(count)
    for i in range(consumers):
        c = cons_res.get(i)
        if c is None:
            errors.append(f"consumer {i} did not report")
            delivered_each.append(0)
            continue
        errors.extend(c["errors"])
        delivered_each.append(c["received"])
        duplicates += c["duplicates"]
        if c["out_of_range"]:
            errors.append(f"consumer {i}: {c['out_of_range']} messages with unknown sequence numbers")
        last_ack = max(last_ack, c["last_ack_ns"])
        if c["lat"]:
            lat.frombytes(c["lat"])
        seen = c["seen"]
        if plan.shared:
            overlap = sum(1 for a, b in zip(union, seen) if a and b) if consumers > 1 else 0
            duplicates += overlap
            union = bytearray(a | b for a, b in zip(union, seen))
        else:
            missing = count - sum(seen)
            if missing:
                errors.append(f"consumer {i}: {missing} of {count} messages missing")
    if plan.shared:
        missing = count - sum(union)
        if missing:
            errors.append(f"{missing} of {count} messages never delivered")
    if duplicates:
        errors.append(f"{duplicates} duplicate deliveries")

    t_start = pub_res["t_start"] if pub_res else 0
    seconds = (last_ack - t_start) / 1e9 if (pub_res and last_ack > t_start) else None
    delivered = sum(delivered_each) if plan.shared else min(delivered_each, default=0)
    rate_each = (delivered / seconds) if seconds else None
    result: dict[str, Any] = {
        "system": system,
        "workload": workload,
        "count": count,
        "size": size,
        "consumers": consumers,
        "seconds": round(seconds, 4) if seconds else None,
        "msgs_per_s": round(rate_each, 1) if rate_each else None,
        "mb_per_s": round(rate_each * size / 1e6, 3) if rate_each else None,  # MB = 10**6 bytes
        "latency_ms": _percentiles(lat) if workload == "latency" else None,
        "delivered": delivered,
        "errors": errors,
        "ok": not errors,
        "published": published,
        "publish_seconds": round((pub_res["t_end"] - t_start) / 1e9, 4) if pub_res else None,
        "server_version": version(url),
        "client": _client_info(system),
        "host": {"cpus": os.cpu_count(), "loadavg_1m_before": load_before},
    }
    if workload == "fanout":
        result["delivered_each"] = delivered_each
        result["total_msgs_per_s"] = round(sum(delivered_each) / seconds, 1) if seconds else None
    if workload == "queue":
        result["delivered_each"] = delivered_each
    if workload == "latency":
        result["target_rate"] = rate
    return result


def _run_with_server(system: str, server_cm, workload: str, count: int, size: int,
                     consumers: int, rate: float, url: str | None, timeout: float | None) -> dict:
    _validate(workload, count, size, consumers)
    if url is not None:
        return _run(system, workload, count, size, consumers, rate=rate, url=url, timeout=timeout)
    with server_cm() as u:
        return _run(system, workload, count, size, consumers, rate=rate, url=u, timeout=timeout)


def run_redis(workload: str, count: int, size: int = DEFAULT_SIZE, consumers: int = 1, *,
              rate: float = DEFAULT_RATE, url: str | None = None,
              timeout: float | None = None) -> dict:
    """Benchmark Redis Streams. Starts (and stops) a private redis-server unless ``url`` is given."""
    why = redis_available()
    if why:
        raise RuntimeError(why)
    return _run_with_server("redis", redis_server, workload, count, size, consumers, rate, url, timeout)


def run_nats(workload: str, count: int, size: int = DEFAULT_SIZE, consumers: int = 1, *,
             rate: float = DEFAULT_RATE, url: str | None = None,
             timeout: float | None = None) -> dict:
    """Benchmark NATS JetStream. Starts (and stops) a private nats-server unless ``url`` is given."""
    why = nats_available()
    if why:
        raise RuntimeError(why)
    return _run_with_server("nats", nats_server, workload, count, size, consumers, rate, url, timeout)


RUNNERS = {"redis": run_redis, "nats": run_nats}
AVAILABLE = {"redis": redis_available, "nats": nats_available}


# --------------------------------------------------------------------------- CLI


def format_result(r: dict) -> str:
    parts = [f"{r['system']:5} {r['workload']:7} count={r['count']} size={r['size']}B "
             f"consumers={r['consumers']}"]
    if r["seconds"]:
        parts.append(f"  {r['seconds']:.3f}s  {r['msgs_per_s']:,.0f} msgs/s"
                     + (" each" if r["workload"] == "fanout" else "")
                     + f"  {r['mb_per_s']:.2f} MB/s")
    if r["workload"] == "fanout" and r.get("total_msgs_per_s"):
        parts.append(f"  total delivered {r['total_msgs_per_s']:,.0f} msgs/s")
    if r.get("latency_ms"):
        l = r["latency_ms"]
        parts.append(f"  latency ms p50={l['p50']} p90={l['p90']} p99={l['p99']} "
                     f"p99.9={l['p99.9']} max={l['max']} (n={l['samples']})")
    parts.append(f"  delivered={r['delivered']} " + ("OK" if r["ok"] else "ERRORS: " + "; ".join(r["errors"])))
    return "\n".join(parts)


def _on_sigterm(signum, frame):  # run finally-blocks (stop servers, remove temp dirs)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("system", choices=SYSTEMS)
    ap.add_argument("workload", choices=WORKLOADS)
    ap.add_argument("--count", type=int, default=None,
                    help=f"messages (default {DEFAULT_COUNT:,}; latency: rate x duration)")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, help="body bytes (default 100)")
    ap.add_argument("--consumers", type=int, default=1, help="consumer processes (default 1)")
    ap.add_argument("--rate", type=float, default=DEFAULT_RATE, help="latency: msgs/s (default 10000)")
    ap.add_argument("--duration", type=float, default=DEFAULT_DURATION,
                    help="latency: seconds when --count is not given (default 5)")
    ap.add_argument("--url", default=None, help="use this running server instead of starting one")
    ap.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    a = ap.parse_args(argv)
    count = a.count if a.count is not None else (
        int(a.rate * a.duration) if a.workload == "latency" else DEFAULT_COUNT)

    why = AVAILABLE[a.system]()
    if why:
        if a.json:
            print(json.dumps({"system": a.system, "workload": a.workload, "skipped": why}))
        else:
            print(f"{a.system}: not available: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        res = RUNNERS[a.system](a.workload, count, a.size, a.consumers, rate=a.rate,
                                url=a.url, timeout=a.timeout)
    except ValueError as e:
        ap.error(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(res) if a.json else format_result(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
