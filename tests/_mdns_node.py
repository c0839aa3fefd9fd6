"""Helper run inside a VirtualLan host by tests/test_discovery.py (not a test module).

usage: _mdns_node.py AGENT_ID IP [reannounce_interval]
Prints JSON lines: {"ev": "started", "t": ...}, {"ev": "seen", "id": ..., "ep": ..., "t": ...},
{"ev": "gone", "id": ..., "t": ...}, {"ev": "stats", "dropped": n}. Exits cleanly on SIGTERM or
when stdin closes / reads "quit"."""

import json
import os
import select
import signal
import sys
import time

from meshq._discovery import MdnsDiscovery, PeerGone, PeerInfo, PeerSeen


def out(**kw):
    kw["t"] = time.time()
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def main():
    agent_id, ip = sys.argv[1], sys.argv[2]
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    me = PeerInfo(agent_id=agent_id, name=f"node {agent_id}", endpoint=f"tcp://{ip}:7400",
                  pubkey="k" * 40, tenant_tags=("t1", "t2"))
    d = MdnsDiscovery(me, interfaces=[ip], reannounce_interval=interval)
    t0 = time.time()
    out(ev="starting")
    d.start()
    out(ev="started", took=time.time() - t0)
    fds = [d.wakeup_fd, sys.stdin.fileno()]
    last_stats = 0.0
    try:
        while not stop:
            r, _, _ = select.select(fds, [], [], 0.1)
            if sys.stdin.fileno() in r:
                line = sys.stdin.readline()
                if not line or line.strip() == "quit":
                    break
                if line.strip() == "reannounce":
                    d.reannounce()
            for ev in d.events():
                if isinstance(ev, PeerSeen):
                    out(ev="seen", id=ev.info.agent_id, ep=ev.info.endpoint, tags=list(ev.info.tenant_tags),
                        name=ev.info.name)
                elif isinstance(ev, PeerGone):
                    out(ev="gone", id=ev.agent_id)
            if time.time() - last_stats > 0.5:
                last_stats = time.time()
                out(ev="stats", dropped=d.dropped)
    finally:
        d.close()
        out(ev="closed")


if __name__ == "__main__":
    main()
