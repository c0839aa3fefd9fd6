#!/usr/bin/env python3
"""A virtual LAN of N meshq agents on one machine (needs root), and a tiny chat over it.

    sudo python3 demos/lan/lan.py up 4          # foreground; Ctrl-C (or `down`) tears it all down
    python3 demos/lan/lan.py chat 0 alice       # in another terminal: chat through host 0's agent
    python3 demos/lan/lan.py chat 3 bob
    python3 demos/lan/lan.py peers 2            # what host 2's agent knows (meshq peers)
    sudo python3 demos/lan/lan.py down          # stop a running `up` (uses the state file)

`up` writes a state file ($MESHQ_LAN_STATE, default /tmp/meshq-lan.json) with its pid and each
agent's client endpoint (an ipc socket in a temp dir, reachable from outside the namespaces);
`chat`, `peers` and `down` read it.  Everything lives inside a throw-away network namespace:
no packet reaches the machine's real interfaces.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
sys.path.insert(0, REPO)

STATE = os.environ.get("MESHQ_LAN_STATE", "/tmp/meshq-lan.json")


def up(n: int) -> int:
    from meshq.testing import lan_available
    from meshq.testing.mesh import LanMesh

    reason = lan_available()
    if reason:
        print(f"cannot build a virtual LAN here: {reason}", file=sys.stderr)
        return 1
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    with LanMesh(n) as mesh:
        mesh.start_many(range(n))
        t0 = time.time()
        mesh.wait(lambda: mesh.all_alive(range(n)), 15, "the agents to find each other")
        with open(STATE, "w") as f:
            json.dump({"pid": os.getpid(), "hosts": [
                {"host": h, "ip": mesh.ip(h), "id": mesh.ids[h], "client": mesh.agents[h].client_endpoint,
                 "log": mesh.agents[h].log_path} for h in range(n)]}, f, indent=2)
        print(f"{n} agents up, all linked by mDNS in {time.time() - t0:.2f} s; state in {STATE}")
        for h in range(n):
            print(f"  h{h}  {mesh.ip(h):<12} agent {mesh.ids[h]}  client {mesh.agents[h].client_endpoint}")
        print("chat: python3 demos/lan/lan.py chat HOST NAME   |   stop: Ctrl-C or lan.py down", flush=True)
        while not stop:
            time.sleep(0.2)
    try:
        os.unlink(STATE)
    except FileNotFoundError:
        pass
    print("down: agents stopped, LAN removed")
    return 0


def _state() -> dict:
    try:
        with open(STATE) as f:
            return json.load(f)
    except FileNotFoundError:
        sys.exit(f"no LAN is up (no {STATE}); run: sudo python3 demos/lan/lan.py up N")


def down() -> int:
    pid = _state()["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        os.unlink(STATE)
        print("the LAN process was already gone; state file removed")
        return 0
    for _ in range(100):
        if not os.path.exists(STATE):
            print("LAN is down")
            return 0
        time.sleep(0.1)
    print("the LAN process did not stop within 10 s", file=sys.stderr)
    return 1


async def chat(host: int, name: str) -> int:
    import meshq

    endpoint = _state()["hosts"][host]["client"]
    async with await meshq.connect(endpoint, name=f"chat-{name}") as mq:
        sub = await mq.subscribe("chat.room")

        async def show():
            async for msg in sub:
                who = msg.headers.get("from", "?")
                if who != name:
                    print(f"<{who}@h{msg.headers.get('host', '?')}> {msg.data.decode(errors='replace')}", flush=True)

        shower = asyncio.create_task(show())
        loop = asyncio.get_running_loop()
        interactive = sys.stdin.isatty()
        if interactive:
            print(f"you are {name} on h{host}; type lines, Ctrl-D to leave", flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            await mq.publish("chat.room", line.rstrip("\n").encode(), headers={"from": name, "host": str(host)})
        if not interactive:
            await asyncio.sleep(float(os.environ.get("CHAT_LINGER", "3")))   # hear the others before leaving
        shower.cancel()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "up":
        return up(int(argv[1]))
    if argv[:1] == ["down"]:
        return down()
    if len(argv) == 3 and argv[0] == "chat":
        return asyncio.run(chat(int(argv[1]), argv[2]))
    if len(argv) == 2 and argv[0] == "peers":
        endpoint = _state()["hosts"][int(argv[1])]["client"]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.call([sys.executable, "-m", "meshq", "peers", "--agent", endpoint], env=env)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
