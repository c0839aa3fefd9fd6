#!/usr/bin/env python3
"""Two tenants on the same three agents, shown isolated (see README.md)."""

from __future__ import annotations

import asyncio
import os
import tempfile

import meshq
from meshq._auth import create_tenant, issue_token, write_tenant_file, write_token_file
from meshq._spawn import AgentProcess


async def show(agents, creds) -> None:
    a1, _a2, a3 = agents
    async with await meshq.connect(a3.client_endpoint, creds=creds["red"]) as red_sub, \
            await meshq.connect(a3.client_endpoint, creds=creds["blue"]) as blue_sub, \
            await meshq.connect(a1.client_endpoint, creds=creds["red-orders"]) as red_pub, \
            await meshq.connect(a1.client_endpoint, creds=creds["blue"]) as blue_pub:
        subs = {"red": await red_sub.subscribe("orders.new"), "blue": await blue_sub.subscribe("orders.new")}
        await asyncio.sleep(1.5)      # let the subscriptions reach agent 1
        for i in range(3):
            await red_pub.publish("orders.new", f"red order {i}".encode())
            await blue_pub.publish("orders.new", f"blue order {i}".encode())
        for name, sub in subs.items():
            got = []
            while True:
                try:
                    got.append((await sub.next_msg(timeout=1.0)).data.decode())
                except meshq.TimeoutError:
                    break
            print(f"{name:>4} subscriber on agent 3 received: {got}")
        try:
            await red_pub.publish("billing.x", b"nope")
        except meshq.AuthorizationError as e:
            print(f"red token limited to orders.> publishing billing.x: AuthorizationError: {e}")
        try:
            await meshq.connect(a1.client_endpoint)
        except meshq.AuthorizationError as e:
            print(f"a client without credentials: AuthorizationError: {e}")
        for name, client in (("red", red_pub), ("blue", blue_pub)):
            st = await client.status()
            print(f"{name:>4} status on agent 1: tenant={st['tenant']} published={st['counters'].get('published')} "
                  f"refused={st['counters'].get('publish_refused', 0)}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="meshq-tenants-") as tmp:
        files, creds = [], {}
        for name in ("red", "blue"):
            t = create_tenant(name)
            path = os.path.join(tmp, f"{name}.tenant")
            write_tenant_file(path, t)
            files += ["--tenant-file", path]
            creds[name] = os.path.join(tmp, f"{name}.creds")
            write_token_file(creds[name], issue_token(t))
            if name == "red":
                creds["red-orders"] = os.path.join(tmp, "red-orders.creds")
                write_token_file(creds["red-orders"], issue_token(t, allow_pub=("orders.>",)))
        a1 = AgentProcess(os.path.join(tmp, "a1"), name="agent-1", extra=files)
        try:
            a2 = AgentProcess(os.path.join(tmp, "a2"), name="agent-2", peers=[a1.peer_endpoint], extra=files)
            try:
                a3 = AgentProcess(os.path.join(tmp, "a3"), name="agent-3", peers=[a1.peer_endpoint], extra=files)
                try:
                    print("three agents serving tenants red and blue are up")
                    asyncio.run(show((a1, a2, a3), creds))
                finally:
                    a3.stop()
            finally:
                a2.stop()
        finally:
            a1.stop()


if __name__ == "__main__":
    main()
