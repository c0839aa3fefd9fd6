"""`meshq bench`: end-to-end workloads on a mesh of local agents, clients in separate processes.

Every figure is end to end: publisher processes call the public API (`publish_many`, or
`publish_async` per message with ``api="single"``), the agents store (fsync group commit)
and forward, consumer processes receive through the public API (`next_batch`, or
`next_msg` per message) and ack.  Latency is measured from the publish call to the
delivery in the consuming process (each body starts with the wall-clock time of its
publish call).  The clock of a run starts when the publishers are released and stops
at the last delivery.

Workloads:

* ``pubsub``: publishers → one subscriber behind a second agent;
* ``queue``: publishers → a queue group of N consumers, each behind its own agent (total rate);
* ``fanout``: publishers → N subscribers, each behind its own agent (rate to each).

The ``request`` workload measures request/reply: responders (one queue group) behind their
own agents, one requester keeping up to ``--concurrency`` requests in flight.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue as queue_mod
import statistics
import struct
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

from ._spawn import AgentProcess

WORKLOADS = ("pubsub", "queue", "fanout", "request")
APIS = ("batch", "single")
_TS = struct.Struct(">Q")
_CHUNK = 1000            # bodies per publish_many call when unpaced
MAX_LAT_SAMPLES = 2_000_000


@dataclass
class BenchResult:
    """What one run measured."""

    workload: str
    count: int                    # messages published (all publishers)
    size: int
    consumers: int
    publishers: int
    durability: str
    seconds: float                # release of the publishers → last delivery
    msgs_per_s: float             # delivered per second: total (pubsub, queue) or to each consumer (fanout)
    mb_per_s: float
    delivered: list[int] = field(default_factory=list)
    duplicates: int = 0
    latency_ms: dict = field(default_factory=dict)
    publish_seconds: float = 0.0
    rate: float | None = None
    api: str = "batch"
    duration: float | None = None
    ok: bool = True
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _percentiles(samples: list[float]) -> dict:
    if not samples:
        return {}
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"p50": round(pick(0.50), 4), "p90": round(pick(0.90), 4), "p99": round(pick(0.99), 4),
            "p99.9": round(pick(0.999), 4), "max": round(s[-1], 4), "mean": round(statistics.fmean(s), 4),
            "samples": len(s)}


# ---------------------------------------------------------------- worker processes
def _consumer_main(endpoint, subject, group, api, paced, ready, stop_evt, counters, results, idx) -> None:
    asyncio.run(_consume(endpoint, subject, group, api, paced, ready, stop_evt, counters, results, idx))


async def _consume(endpoint, subject, group, api, paced, ready, stop_evt, counters, results, idx) -> None:
    from ._client import connect
    lat: list[float] = []
    state = {"got": 0, "last": 0.0}
    unpack = _TS.unpack_from
    now_ns = time.time_ns
    async with await connect(endpoint, name=f"bench-consumer-{idx}") as mq:
        sub = await mq.subscribe(subject.rsplit(".", 1)[0] + ".>", group=group)

        async def read() -> None:
            # no per-call timeout (it would cost a timer per wait); the watcher below cancels
            got = 0
            while True:
                msgs = await sub.next_batch(1000) if api == "batch" else [await sub.next_msg()]
                t = now_ns()
                state["last"] = time.monotonic()
                got += len(msgs)
                state["got"] = counters[idx] = got
                if len(lat) < MAX_LAT_SAMPLES:
                    # every message when paced; unpaced runs sample 1 in 8 (their latency is queueing delay)
                    lat.extend([(t - unpack(m[3])[0]) / 1e6 for m in (msgs if paced else msgs[::8])])

        reader = asyncio.create_task(read())
        ready.put(idx)
        while not stop_evt.is_set() and not reader.done():
            await asyncio.sleep(0.05)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        dups = mq.duplicates
    results.put({"idx": idx, "got": state["got"], "last": state["last"], "lat": lat, "dups": dups})


def _publisher_main(endpoint, subject, count, duration, size, rate, api, ready, start_evt, published, results,
                    idx) -> None:
    asyncio.run(_publish(endpoint, subject, count, duration, size, rate, api, ready, start_evt, published, results, idx))


async def _publish(endpoint, subject, count, duration, size, rate, api, ready, start_evt, published, results,
                   idx) -> None:
    from ._client import connect
    pad = b"x" * max(0, size - 8)
    pack = _TS.pack
    now_ns = time.time_ns
    errors: list[str] = []
    async with await connect(endpoint, name=f"bench-publisher-{idx}") as mq:
        ready.put(("pub", idx))
        while not start_evt.is_set():
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        end = t0 + duration if duration else None
        limit = count if count else 1 << 62
        sent = 0
        acks = []
        burst = max(1, int(rate / 1000)) if rate else 0
        while sent < limit:
            now = time.monotonic()
            if end is not None and now >= end:
                break
            if rate:
                # publish what is due in bursts about a millisecond apart: sleeping until each
                # single message is due would spin the publisher at high rates
                due = min(limit, int((now - t0) * rate) + 1)
                if due <= sent:
                    await asyncio.sleep(max(0.0, t0 + (sent + burst) / rate - now))
                    continue
                n = due - sent
            else:
                n = min(_CHUNK, limit - sent)
            if api == "batch":
                acks.append(await mq.publish_many(subject, [pack(now_ns()) + pad for _ in range(n)]))
            else:
                for _ in range(n):
                    acks.append(await mq.publish_async(subject, pack(now_ns()) + pad))
            sent += n
            published[idx] = sent
            if len(acks) > 10_000:
                acks = [a for a in acks if not a.done()]
            if not rate:
                await asyncio.sleep(0)   # let the reader take PUBACKs and deliveries in
        try:
            await mq.flush(timeout=120)
            for a in acks:
                await a
        except Exception as e:  # refusals and timeouts are reported, not raised
            errors.append(f"publisher {idx}: {type(e).__name__}: {e}")
        results.put({"idx": idx, "published": sent, "publish_seconds": time.monotonic() - t0, "errors": errors})


# ---------------------------------------------------------------- orchestration
async def _agent_id(endpoint: str) -> str:
    from ._client import connect
    async with await connect(endpoint, name="bench-probe") as mq:
        return (await mq.status())["id"]


async def _wait_routes(endpoint: str, agent_ids: set, timeout: float = 15.0) -> None:
    """Wait until the publisher's agent knows subscriptions of every agent in `agent_ids`."""
    from ._client import connect
    async with await connect(endpoint, name="bench-probe") as mq:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = await mq.status()
            seen = {p["id"] for p in st["peers"] if p["state"] == "alive" and p.get("subscriptions", 0) > 0}
            if agent_ids - {st["id"]} <= seen:
                return
            await asyncio.sleep(0.05)
    raise RuntimeError("subscriptions did not propagate to the publisher's agent in time")


def run_bench(workload: str = "pubsub", count: int | None = 100_000, size: int = 100, consumers: int = 1,
              publishers: int = 1, durability: str = "fsync", rate: float | None = None,
              progress=None, workdir: str | None = None, duration: float | None = None,
              api: str = "batch", stall_timeout: float = 30.0, pub_agent: str | None = None,
              sub_agents: list[str] | None = None, concurrency: int = 100) -> BenchResult:
    """Start agents on loopback, run one workload, return the figures.

    `count` messages per publisher, or publish for `duration` seconds; `rate` paces each
    publisher (msgs/s) so latency is that of a loaded, not saturated, mesh; `progress`
    is called about twice a second with a one-line status.  With `pub_agent` (and
    `sub_agents`, client endpoints, cycled over the consumers; default: `pub_agent`) the
    run uses a mesh that is already running instead of starting agents.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}")
    if size < 8:
        raise ValueError("size must be at least 8 bytes (the body carries its send time)")
    if not count and not duration:
        raise ValueError("give a count or a duration")
    if workload == "pubsub":
        consumers = 1
    if workload == "request":
        return _run_request(count or 10_000, size, consumers, durability, concurrency, workdir)
    ctx = mp.get_context("spawn")
    extra = ["--durability", durability, "--log-level", "warning"]
    errors: list[str] = []
    with ExitStack() as stack:
        if pub_agent is None:
            tmp = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="meshq-bench-"))
            pub = stack.enter_context(AgentProcess(os.path.join(tmp, "pub"), name="bench-pub", extra=extra))
            pub_ep = pub.client_endpoint
            sub_eps = [stack.enter_context(AgentProcess(os.path.join(tmp, f"sub{i}"), peers=[pub.peer_endpoint],
                                                        name=f"bench-sub{i}", extra=extra)).client_endpoint
                       for i in range(consumers)]
        else:
            from ._client import resolve_agent
            pub_ep = resolve_agent(pub_agent)
            given = [resolve_agent(a) for a in (sub_agents or [pub_agent])]
            sub_eps = [given[i % len(given)] for i in range(consumers)]
        subject = f"bench.{os.getpid()}{int(time.time() * 1000) % 100000}.data"
        ready, results = ctx.Queue(), ctx.Queue()
        start_evt, stop_evt = ctx.Event(), ctx.Event()
        delivered_c = ctx.Array("q", consumers, lock=False)
        published_c = ctx.Array("q", publishers, lock=False)
        group = "bench" if workload == "queue" else None
        procs = []
        for i, ep in enumerate(sub_eps):
            p = ctx.Process(target=_consumer_main, daemon=True,
                            args=(ep, subject, group, api, bool(rate), ready, stop_evt, delivered_c, results, i))
            p.start()
            procs.append(p)
        for _ in sub_eps:
            ready.get(timeout=60)
        ids = {asyncio.run(_agent_id(ep)) for ep in set(sub_eps)}
        asyncio.run(_wait_routes(pub_ep, ids))
        pubs = []
        for i in range(publishers):
            p = ctx.Process(target=_publisher_main, daemon=True,
                            args=(pub_ep, subject, count if not duration else None, duration, size, rate,
                                  api, ready, start_evt, published_c, results, i))
            p.start()
            pubs.append(p)
        for _ in pubs:
            ready.get(timeout=60)
        t0 = time.monotonic()
        start_evt.set()
        pub_out: dict[int, dict] = {}
        cons_out: dict[int, dict] = {}
        last_total, last_change, last_report = -1, time.monotonic(), 0.0
        while True:
            try:
                o = results.get(timeout=0.05)
                (cons_out if "got" in o else pub_out)[o["idx"]] = o
            except queue_mod.Empty:
                pass
            now = time.monotonic()
            got = list(delivered_c)
            total = sum(got)
            sent = sum(published_c)
            if total != last_total:
                last_total, last_change = total, now
            if progress is not None and now - last_report >= 0.5:
                last_report = now
                el = now - t0
                progress(f"{el:6.1f} s  published {sent:,}  delivered {total:,}  ({total / max(el, 1e-9):,.0f} msgs/s)")
            if len(pub_out) == publishers:
                expected = sum(o["published"] for o in pub_out.values())
                need = [expected] * consumers if workload != "queue" else None
                if (need is not None and all(g >= expected for g in got)) or (need is None and total >= expected):
                    break
            if now - last_change > stall_timeout:
                errors.append(f"no delivery progress for {stall_timeout:.0f} s")
                break
            if not any(p.is_alive() for p in pubs) and len(pub_out) < publishers and results.empty():
                errors.append("a publisher exited without reporting")
                break
        stop_evt.set()
        deadline = time.monotonic() + 30
        while len(cons_out) < consumers and time.monotonic() < deadline:
            try:
                o = results.get(timeout=0.5)
                (cons_out if "got" in o else pub_out)[o["idx"]] = o
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    break
        for p in procs + pubs:
            p.join(10)
            if p.is_alive():
                p.kill()
        if progress is not None:
            progress("")
    published = sum(o["published"] for o in pub_out.values())
    for o in pub_out.values():
        errors.extend(o["errors"])
    delivered = [cons_out[i]["got"] if i in cons_out else 0 for i in range(consumers)]
    lat = [x for o in cons_out.values() for x in o["lat"]]
    dups = sum(o["dups"] for o in cons_out.values())
    seconds = max(1e-9, max((o["last"] for o in cons_out.values() if o["got"]), default=t0) - t0)
    if workload == "queue":
        if sum(delivered) != published:
            errors.append(f"delivered {sum(delivered)} of {published} published")
        rate_out = sum(delivered) / seconds
    else:
        for i, d in enumerate(delivered):
            if d != published:
                errors.append(f"consumer {i} got {d} of {published}")
        rate_out = (min(delivered) if delivered else 0) / seconds
    if dups:
        errors.append(f"{dups} duplicates reached the application")
    return BenchResult(workload, published, size, len(sub_eps), publishers,
                       durability if pub_agent is None else "of the running mesh",
                       round(seconds, 4), round(rate_out, 1), round(rate_out * size / 1e6, 2), delivered,
                       dups, _percentiles(lat),
                       round(max((o["publish_seconds"] for o in pub_out.values()), default=0.0), 4), rate,
                       api, duration, not errors, errors)


# ---------------------------------------------------------------- request/reply
def _responder_main(endpoint, subject, ready, stop_evt, results, idx) -> None:
    asyncio.run(_respond(endpoint, subject, ready, stop_evt, results, idx))


async def _respond(endpoint, subject, ready, stop_evt, results, idx) -> None:
    from ._client import connect
    answered = 0
    async with await connect(endpoint, name=f"bench-responder-{idx}") as mq:
        server = await mq.serve(subject)

        async def answer() -> None:
            nonlocal answered
            async for msg in server:
                await msg.respond(msg.data)
                answered += 1

        task = asyncio.create_task(answer())
        ready.put(idx)
        while not stop_evt.is_set():
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    results.put({"idx": idx, "answered": answered})


def _requester_main(endpoint, subject, count, size, concurrency, results) -> None:
    asyncio.run(_request(endpoint, subject, count, size, concurrency, results))


async def _request(endpoint, subject, count, size, concurrency, results) -> None:
    from ._client import connect
    from ._errors import MeshqError, NoRespondersError
    body = b"q" * size
    lat: list[float] = []
    errors: list[str] = []
    async with await connect(endpoint, name="bench-requester") as mq:
        deadline = time.monotonic() + 15
        while True:      # wait until the responders are in this agent's directory
            try:
                await mq.request(subject, body, timeout=2.0)
                break
            except NoRespondersError:
                if time.monotonic() > deadline:
                    results.put({"lat": [], "seconds": 0.0, "ok": 0, "errors": ["no responders appeared"]})
                    return
                await asyncio.sleep(0.05)
        ok = 0
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            nonlocal ok
            async with sem:
                t = time.perf_counter()
                try:
                    reply = await mq.request(subject, body, timeout=10.0)
                except MeshqError as e:
                    if len(errors) < 10:
                        errors.append(f"{type(e).__name__}: {e}")
                    return
                lat.append((time.perf_counter() - t) * 1000)
                if reply.data == body:
                    ok += 1
        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(count)])
        seconds = time.perf_counter() - t0
    results.put({"lat": lat, "seconds": seconds, "ok": ok, "errors": errors})


def _run_request(count: int, size: int, responders: int, durability: str, concurrency: int,
                 workdir: str | None) -> BenchResult:
    """Requests from a process on one agent to `responders` responders, each behind its own agent."""
    ctx = mp.get_context("spawn")
    extra = ["--durability", durability, "--log-level", "warning"]
    with ExitStack() as stack:
        tmp = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="meshq-bench-"))
        pub = stack.enter_context(AgentProcess(os.path.join(tmp, "req"), name="bench-req", extra=extra))
        sub_eps = [stack.enter_context(AgentProcess(os.path.join(tmp, f"rep{i}"), peers=[pub.peer_endpoint],
                                                    name=f"bench-rep{i}", extra=extra)).client_endpoint
                   for i in range(responders)]
        subject = f"bench.req.{os.getpid()}"
        ready, results, stop_evt = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_responder_main, daemon=True, args=(ep, subject, ready, stop_evt, results, i))
                 for i, ep in enumerate(sub_eps)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=60)
        req = ctx.Process(target=_requester_main, daemon=True, args=(pub.client_endpoint, subject, count, size,
                                                                      concurrency, results))
        req.start()
        out = None
        answered = []
        while out is None:
            o = results.get(timeout=max(120.0, count / 500))
            if "lat" in o:
                out = o
            else:
                answered.append(o)
        stop_evt.set()
        for p in procs + [req]:
            p.join(10)
            if p.is_alive():
                p.kill()
    errors = list(out["errors"])
    if out["ok"] != count:
        errors.append(f"{out['ok']} of {count} requests answered correctly")
    seconds = max(out["seconds"], 1e-9)
    rate = out["ok"] / seconds
    return BenchResult("request", count, size, responders, 1, durability, round(seconds, 4), round(rate, 1),
                       round(rate * size / 1e6, 2), [out["ok"]], 0, _percentiles(out["lat"]), 0.0, None,
                       "single", None, not errors, errors)


def format_result(r: BenchResult) -> str:
    """A human summary of one run."""
    if r.workload == "request":
        lm = r.latency_ms or {}
        lines = [f"request: {r.count:,} × {r.size} B to {r.consumers} responder(s) on their own agents, "
                 f"durability {r.durability}",
                 f"  {r.msgs_per_s:,.0f} requests/s, {r.seconds:.2f} s, answered {r.delivered}"]
        if lm:
            lines.append("  round trip ms: " + ", ".join(f"{k} {lm[k]:.3f}" for k in ("p50", "p90", "p99", "p99.9", "max")))
        if r.errors:
            lines.append("  ERRORS: " + "; ".join(r.errors))
        return "\n".join(lines)
    lines = [
        f"{r.workload}: {r.count:,} × {r.size} B, {r.publishers} publisher(s), {r.consumers} consumer(s), "
        f"durability {r.durability}, api {r.api}" + (f", paced at {r.rate:,.0f} msgs/s" if r.rate else ""),
        f"  {r.msgs_per_s:,.0f} msgs/s{' to each consumer' if r.workload == 'fanout' else ''}, "
        f"{r.mb_per_s:,.1f} MB/s, {r.seconds:.2f} s, delivered {r.delivered}, duplicates {r.duplicates}",
    ]
    if r.latency_ms:
        lm = r.latency_ms
        lines.append("  latency ms (publish call → delivery): "
                     + ", ".join(f"{k} {lm[k]:.3f}" for k in ("p50", "p90", "p99", "p99.9", "max")))
    if not r.rate:
        lines.append("  (unpaced: latency is queueing delay at saturation; use --rate for latency)")
    if r.errors:
        lines.append("  ERRORS: " + "; ".join(r.errors))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(format_result(run_bench(sys.argv[1] if len(sys.argv) > 1 else "pubsub",
                                  int(sys.argv[2]) if len(sys.argv) > 2 else 100_000)))
