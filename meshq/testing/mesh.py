"""Agents on a virtual LAN, for tests, benchmarks and demos (see docs/lan.md and docs/discovery.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import meshq.sync
from meshq._spawn import AgentProcess
from meshq.testing.lan import VirtualLan

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


class LanMesh:
    """Agents on a VirtualLan (one per host, real mDNS on the host's own address), their clients; closes everything."""

    def __init__(self, hosts: int, root: str | None = None) -> None:
        self.lan = VirtualLan(hosts)
        self.root = root or tempfile.mkdtemp(prefix="mq-")
        os.makedirs(self.root, exist_ok=True)
        self.agents: dict[int, AgentProcess] = {}
        self.clients: dict[int, meshq.sync.Client] = {}
        self.ids: dict[int, str] = {}
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "LanMesh":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill every agent and client process, tear the LAN down, remove the temp dir."""
        for c in self.clients.values():
            try:
                c.close()
            except Exception:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for a in self.agents.values():
            a.kill()
        self.lan.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def ip(self, host: int) -> str:
        return self.lan.hosts[host].ip

    def start(self, host: int, port: int = 7400, mdns: bool = True, seeds=()) -> AgentProcess:
        ip = self.ip(host)
        extra = ["--interface", ip] if mdns else ["--no-mdns"]
        for s in seeds:
            extra += ["--seed", s]
        data = os.path.join(self.root, f"h{host}")
        agent = AgentProcess(data, listen=f"tcp://{ip}:{port}", name=f"h{host}", extra=extra, env=ENV,
                             prefix=["nsenter", f"--net={self.lan._ns_path(self.lan.hosts[host].name)}", "--"],
                             log_path=os.path.join(self.root, f"h{host}.log"))
        old = self.clients.pop(host, None)
        if old is not None:
            old.close()
        self.agents[host] = agent
        self.ids[host] = agent.ready_line.split("(")[1].split(")")[0]
        self.clients[host] = meshq.sync.connect(agent.client_endpoint, name="test")
        return agent

    def start_many(self, hosts, **kw) -> None:
        with ThreadPoolExecutor(len(hosts)) as ex:
            list(ex.map(lambda h: self.start(h, **kw), hosts))

    def status(self, host: int) -> dict:
        return self.clients[host].status()

    def states(self, host: int) -> dict[str, str]:
        return {r["id"]: r["state"] for r in self.status(host)["mesh"] if r["id"]}

    def wait(self, pred, timeout: float, what: str, step: float = 0.05) -> float:
        """Poll pred() until true; returns when (time.time()); fails after timeout."""
        deadline = time.time() + timeout
        while True:
            if pred():
                return time.time()
            if time.time() > deadline:
                logs = "\n".join(f"--- {h}\n{a.tail_log(1500)}" for h, a in self.agents.items())
                raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")
            time.sleep(step)

    def all_alive(self, hosts, among=None) -> bool:
        among = hosts if among is None else among
        for h in among:
            st = self.states(h)
            if any(st.get(self.ids[o]) != "alive" for o in hosts if o != h):
                return False
        return True

    def spawn_client(self, host: int, code: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", code, self.agents[host].client_endpoint, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **ENV}, start_new_session=True)
        self.procs.append(p)
        return p
