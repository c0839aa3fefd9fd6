#!/usr/bin/env python3
"""meshq side by side with Redis Streams and NATS JetStream: the same workloads, run alternately.

    python benchmarks/compare.py [--rounds 3] [--count 200000] [--consumers 3] [--size 100]
                                 [--workloads pubsub,queue,fanout,latency] [--smoke] [--json]

Each round runs every workload on meshq, then Redis, then NATS (those installed), so load
from anything else on the machine hits all of them alike; the figures are the medians over
the rounds.  meshq runs through `meshq._bench.run_bench` (two or more agents on loopback,
fsync group commit, publisher and consumers as separate processes using the public API);
the brokers through `benchmarks/brokers.py` (private servers on loopback, same workloads,
counts verified).  `latency` paces the publisher at --rate msgs/s (default 10,000) for
--duration seconds and reports publish→delivery percentiles.

Writes docs/compare.md (table of figures and ratios meshq/peer) and docs/compare.png
(needs matplotlib: `pip install -e .[bench]`), unless --no-write.  `--smoke` runs tiny
counts and writes nothing: it checks that every runner completes and counts correctly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import brokers  # noqa: E402
from meshq._bench import run_bench  # noqa: E402

WORKLOADS = ("pubsub", "queue", "fanout", "latency")


MESHQ_API = "batch"


def _meshq(workload: str, count: int, size: int, consumers: int, rate: float, duration: float) -> dict:
    if workload == "latency":
        r = run_bench("pubsub", None, size, 1, 1, "fsync", rate, duration=duration, api=MESHQ_API)
    else:
        r = run_bench(workload, count, size, 1 if workload == "pubsub" else consumers, 1, "fsync", api=MESHQ_API)
    return {"system": "meshq", "workload": workload, "msgs_per_s": r.msgs_per_s, "mb_per_s": r.mb_per_s,
            "latency_ms": r.latency_ms if workload == "latency" else None, "ok": r.ok, "errors": r.errors,
            "delivered": r.delivered, "count": r.count}


def _broker(system: str, workload: str, count: int, size: int, consumers: int, rate: float, duration: float) -> dict:
    if workload == "latency":
        count = max(1, int(rate * duration))
    r = brokers.RUNNERS[system](workload, count, size, 1 if workload in ("pubsub", "latency") else consumers, rate=rate)
    return {"system": system, "workload": workload, "msgs_per_s": r["msgs_per_s"], "mb_per_s": r["mb_per_s"],
            "latency_ms": r.get("latency_ms"), "ok": r["ok"], "errors": r["errors"],
            "delivered": r.get("delivered_each", [r["delivered"]]), "count": r["count"]}


def available_systems() -> list[str]:
    """meshq plus the peer brokers installed here."""
    return ["meshq"] + [s for s in brokers.SYSTEMS if brokers.AVAILABLE[s]() is None]


def run_all(workloads, systems, rounds: int, count: int, size: int, consumers: int, rate: float,
            duration: float, log=print) -> list[dict]:
    """Every workload on every system, alternating systems within each round."""
    out = []
    for rnd in range(rounds):
        for workload in workloads:
            for system in systems:
                load = os.getloadavg()[0]
                t = time.monotonic()
                try:
                    if system == "meshq":
                        r = _meshq(workload, count, size, consumers, rate, duration)
                    else:
                        r = _broker(system, workload, count, size, consumers, rate, duration)
                except Exception as e:  # a runner that fails is reported, the others go on
                    r = {"system": system, "workload": workload, "msgs_per_s": None, "mb_per_s": None,
                         "latency_ms": None, "ok": False, "errors": [f"{type(e).__name__}: {e}"]}
                r["round"], r["load_before"], r["wall_s"] = rnd, round(load, 2), round(time.monotonic() - t, 2)
                out.append(r)
                lat = r.get("latency_ms") or {}
                fig = (f"p50 {lat.get('p50', float('nan')):.3f} ms p99 {lat.get('p99', float('nan')):.3f} ms"
                       if workload == "latency" else f"{(r['msgs_per_s'] or 0):,.0f} msgs/s")
                log(f"round {rnd + 1}/{rounds} {workload:8} {system:6} {fig}  load {load:.2f}"
                    + ("" if r["ok"] else f"  ERRORS {r['errors']}"))
    return out


def summarize(results: list[dict], systems: list[str], workloads) -> dict:
    """Medians per (workload, system)."""
    summary: dict = {}
    for w in workloads:
        for s in systems:
            rs = [r for r in results if r["workload"] == w and r["system"] == s and r["ok"]]
            if not rs:
                continue
            entry = {"runs": len(rs), "msgs_per_s": statistics.median(r["msgs_per_s"] for r in rs),
                     "all_msgs_per_s": [r["msgs_per_s"] for r in rs]}
            if w == "latency":
                for k in ("p50", "p90", "p99", "p99.9"):
                    entry[k] = statistics.median(r["latency_ms"][k] for r in rs if r["latency_ms"])
            summary.setdefault(w, {})[s] = entry
    # the ratio within each round (same conditions), then the median over rounds
    for w in summary:
        ratios = {}
        for s in systems:
            if s == "meshq":
                continue
            per_round = []
            for rnd in sorted({r["round"] for r in results}):
                m = [r for r in results if r["workload"] == w and r["system"] == "meshq" and r["round"] == rnd and r["ok"]]
                p = [r for r in results if r["workload"] == w and r["system"] == s and r["round"] == rnd and r["ok"]]
                if m and p:
                    if w == "latency":
                        per_round.append(m[0]["latency_ms"]["p50"] / p[0]["latency_ms"]["p50"])
                    else:
                        per_round.append(m[0]["msgs_per_s"] / p[0]["msgs_per_s"])
            if per_round:
                ratios[s] = {"median": statistics.median(per_round), "rounds": per_round}
        summary[w]["_ratios"] = ratios
    return summary


def markdown(summary: dict, systems: list[str], args, command: str) -> str:
    peers = [s for s in systems if s != "meshq"]
    lines = [
        "# meshq compared with Redis Streams and NATS JetStream",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M')} "
        f"({os.cpu_count()} cores, Python {sys.version.split()[0]}); medians of {args.rounds} alternating rounds; "
        f"{args.size}-byte bodies; queue and fanout with {args.consumers} consumers (meshq: each behind its own agent); "
        f"latency paced at {args.rate:,.0f} msgs/s for {args.duration:g} s.",
        "meshq fsyncs every group commit; Redis runs `appendfsync everysec`, JetStream its default sync interval.",
        f"meshq's clients use the {'batch calls (publish_many, next_batch)' if MESHQ_API == 'batch' else 'per-message calls (publish_async, next_msg)'}; "
        "Redis's publisher pipelines 100 XADDs per round trip, NATS's keeps 1,000 async publishes in flight.",
        "Ratios are meshq / peer: above 1 means meshq moved more messages; for latency rows (time) above 1 means meshq took longer.",
        "The load average before each run is listed below: other work on the machine makes every figure noisy,",
        "which is why the systems alternate within each round.",
        "",
        "| workload | figure | " + " | ".join(systems) + " | " + " | ".join(f"meshq / {p}" for p in peers) + " |",
        "|---|---|" + "---|" * (len(systems) + len(peers)),
    ]
    for w in summary:
        row = {k: v for k, v in summary[w].items() if k != "_ratios"}
        if w == "latency":
            for k in ("p50", "p99"):
                vals = [f"{row[s][k]:.2f} ms" if s in row else "–" for s in systems]
                ratios = [f"{row['meshq'][k] / row[p][k]:.2f}× (time)" if p in row and "meshq" in row and row[p][k] else "–"
                          for p in peers]
                lines.append(f"| latency | {k} | " + " | ".join(vals) + " | " + " | ".join(ratios) + " |")
            continue
        what = "msgs/s to each consumer" if w == "fanout" else "msgs/s"
        vals = [f"{row[s]['msgs_per_s']:,.0f}" if s in row else "–" for s in systems]
        ratios = [f"{row['meshq']['msgs_per_s'] / row[p]['msgs_per_s']:.2f}×" if p in row and "meshq" in row else "–"
                  for p in peers]
        lines.append(f"| {w} | {what} | " + " | ".join(vals) + " | " + " | ".join(ratios) + " |")
    lines += ["", "Median over rounds of the ratio within each round (meshq / peer; latency: p50 time):", "",
              "| workload | " + " | ".join(f"meshq / {p}" for p in peers) + " |", "|---|" + "---|" * len(peers)]
    for w in summary:
        rr = summary[w].get("_ratios", {})
        lines.append(f"| {w} | " + " | ".join(
            (f"{rr[p]['median']:.2f}× (rounds: " + ", ".join(f"{x:.2f}" for x in rr[p]["rounds"]) + ")") if p in rr else "–"
            for p in peers) + " |")
    lines += ["", "Every run, in order (msgs/s; latency runs show p50/p99 ms):", ""]
    return "\n".join(lines)


def chart(summary: dict, systems: list[str], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tw = [w for w in summary if w != "latency"]
    fig, axes = plt.subplots(1, 2 if "latency" in summary else 1, figsize=(11, 4.2), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(systems))
    for i, s in enumerate(systems):
        xs = [j + i * width for j in range(len(tw))]
        ys = [summary[w].get(s, {}).get("msgs_per_s", 0) / 1000 for w in tw]
        bars = ax.bar(xs, ys, width, label=s)
        ax.bar_label(bars, fmt="%.0fk", fontsize=7)
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(tw))])
    ax.set_xticklabels([("fanout (each)" if w == "fanout" else w) for w in tw])
    ax.set_ylabel("thousand msgs/s (higher is better)")
    ax.set_title("throughput, 100-byte bodies, durable, acked")
    ax.legend()
    if "latency" in summary:
        ax = axes[0][1]
        ks = ["p50", "p90", "p99"]
        for i, s in enumerate(systems):
            if s not in summary["latency"]:
                continue
            xs = [j + i * width for j in range(len(ks))]
            bars = ax.bar(xs, [summary["latency"][s][k] for k in ks], width, label=s)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(ks))])
        ax.set_xticklabels(ks)
        ax.set_yscale("log")
        ax.set_ylabel("ms, publish → delivery (lower is better)")
        ax.set_title("latency at a paced rate")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--consumers", type=int, default=3)
    ap.add_argument("--rate", type=float, default=10_000)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--systems", default=None, help="comma list (default: meshq and every installed broker)")
    ap.add_argument("--api", choices=["batch", "single"], default="batch",
                    help="meshq client calls: publish_many/next_batch (batch) or publish_async/next_msg (single)")
    ap.add_argument("--smoke", action="store_true", help="tiny counts, one round, nothing written")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--md", default=os.path.join(ROOT, "docs", "compare.md"))
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "compare.png"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    global MESHQ_API
    MESHQ_API = args.api
    if args.smoke:
        args.rounds, args.count, args.duration, args.rate = 1, 2000, 1.0, 1000
        args.no_write = True
    workloads = [w for w in args.workloads.split(",") if w]
    bad = set(workloads) - set(WORKLOADS)
    if bad:
        ap.error(f"unknown workloads {sorted(bad)}")
    systems = args.systems.split(",") if args.systems else available_systems()
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    results = run_all(workloads, systems, args.rounds, args.count, args.size, args.consumers, args.rate,
                      args.duration, log)
    summary = summarize(results, systems, workloads)
    command = "python benchmarks/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(summary, systems, args, command.strip())
    runs = []
    for r in results:
        lat = r.get("latency_ms") or {}
        fig = (f"{lat.get('p50', 0):.2f}/{lat.get('p99', 0):.2f} ms" if r["workload"] == "latency"
               else f"{(r['msgs_per_s'] or 0):,.0f}")
        runs.append(f"- round {r['round'] + 1}, {r['workload']}, {r['system']}: {fig} (load {r['load_before']})"
                    + ("" if r["ok"] else f" FAILED: {'; '.join(r['errors'])}"))
    md += "\n".join(runs) + "\n"
    if not args.no_write:
        with open(args.md, "w") as f:
            f.write(md + "\n![throughput and latency](compare.png)\n")
        try:
            chart(summary, systems, args.png)
        except ImportError:
            log("matplotlib is not installed (pip install -e .[bench]): no chart written")
    if args.json:
        print(json.dumps({"summary": summary, "runs": results}))
    else:
        print(md)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
