#!/usr/bin/env python3
"""Discovery and failure-detection times on a virtual LAN (needs root): median and worst of N runs.

    sudo python3 benchmarks/discovery.py --runs 5            # all scenarios, default settings
    sudo python3 benchmarks/discovery.py --runs 5 --only kill9

Times are wall-clock from the event (spawn, kill -9, heal, restart) until the condition held on
every agent, as seen by polling each agent's status over its ipc socket every 20 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshq.testing import lan_available  # noqa: E402
from meshq.testing.mesh import LanMesh  # noqa: E402


def five_together() -> float:
    with LanMesh(5) as m:
        t0 = time.time()
        m.start_many(range(5))
        return m.wait(lambda: m.all_alive(range(5)), 15, "all linked", step=0.02) - t0


def late_joiner() -> float:
    with LanMesh(4) as m:
        m.start_many(range(3))
        m.wait(lambda: m.all_alive(range(3)), 15, "all linked")
        time.sleep(6)            # well past everyone's start-up queries
        t0 = time.time()
        m.start(3)
        return m.wait(lambda: m.all_alive(range(4)), 15, "late joiner linked", step=0.02) - t0


def kill9() -> float:
    with LanMesh(3) as m:
        m.start_many(range(3))
        m.wait(lambda: m.all_alive(range(3)), 15, "all linked")
        time.sleep(1)
        victim = m.ids[2]
        t0 = time.time()
        m.agents[2].kill()
        m.clients.pop(2).close()
        return m.wait(lambda: all(m.states(h).get(victim) == "dead" for h in (0, 1)), 15, "dead", step=0.02) - t0


def heal(cut_seconds: float, silent: bool = False) -> float:
    with LanMesh(3) as m:
        m.start_many(range(3))
        m.wait(lambda: m.all_alive(range(3)), 15, "all linked")
        m.lan.cut(2, silent=silent)
        time.sleep(cut_seconds)
        t0 = time.time()
        m.lan.heal(2)
        return m.wait(lambda: m.all_alive(range(3)), 15, "relinked", step=0.02) - t0


def new_port() -> float:
    with LanMesh(3) as m:
        m.start_many(range(3))
        m.wait(lambda: m.all_alive(range(3)), 15, "all linked")
        m.agents[2].kill()
        m.clients.pop(2).close()
        t0 = time.time()
        m.start(2, port=7401)
        ep = f"tcp://{m.ip(2)}:7401"

        def ok():
            return all(any(r["id"] == m.ids[2] and r["state"] == "alive" and r["endpoint"] == ep
                           for r in m.status(h)["mesh"]) for h in (0, 1))
        return m.wait(ok, 15, "relinked on the new port", step=0.02) - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cut-seconds", type=float, default=20.0)
    ap.add_argument("--only", choices=["five", "late", "kill9", "heal", "newport"], action="append")
    ap.add_argument("--silent", action="store_true", help="cut by detaching the port (carrier stays up)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    reason = lan_available()
    if reason:
        print(f"skipped: {reason}", file=sys.stderr)
        return 1
    scenarios = {
        "five": ("5 agents started together: all linked (from spawn)", five_together),
        "late": ("a late joiner: linked with every running agent (from its spawn)", late_joiner),
        "kill9": ("kill -9: every other agent marks it dead", kill9),
        "heal": (f"host cut{' silently' if a.silent else ''} {a.cut_seconds:g} s then healed: all links alive "
                 "again (from heal)", lambda: heal(a.cut_seconds, a.silent)),
        "newport": ("agent restarted on a new port: re-linked by the others (from its spawn)", new_port),
    }
    results = {}
    for key, (label, fn) in scenarios.items():
        if a.only and key not in a.only:
            continue
        times = [fn() for _ in range(a.runs)]
        results[key] = {"label": label, "runs": [round(t, 3) for t in times],
                        "median": round(statistics.median(times), 3), "worst": round(max(times), 3)}
        r = results[key]
        print(f"{label}: median {r['median']:.2f} s, worst {r['worst']:.2f} s  ({r['runs']})", flush=True)
    if a.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
