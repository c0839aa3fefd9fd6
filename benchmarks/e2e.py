#!/usr/bin/env python3
"""End-to-end durable throughput: two agents on loopback, fsync group commit, 100-byte bodies,
publisher and subscriber as separate processes using the public API.

    python benchmarks/e2e.py [--count 200000] [--size 100] [--durability fsync] [--runs 3] [--api batch|single]

Prints one line per run and the median, in msgs/s (publish call -> delivery -> ack).
"""

from __future__ import annotations

import argparse
import json
import statistics

from meshq._bench import format_result, run_bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--durability", choices=["fsync", "none"], default="fsync")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--api", choices=["batch", "single"], default="batch",
                    help="batch: publish_many/next_batch; single: publish_async/next_msg per message")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    for _ in range(args.runs):
        r = run_bench("pubsub", args.count, args.size, 1, 1, args.durability, api=args.api)
        assert r.delivered == [args.count], f"delivered {r.delivered}, expected {args.count}"
        results.append(r)
        if not args.json:
            print(format_result(r), flush=True)
    med = statistics.median(r.msgs_per_s for r in results)
    if args.json:
        print(json.dumps({"median_msgs_per_s": med, "runs": [r.as_dict() for r in results]}))
    else:
        print(f"median end-to-end durable throughput: {med:,.0f} msgs/s over {args.runs} runs")


if __name__ == "__main__":
    main()
