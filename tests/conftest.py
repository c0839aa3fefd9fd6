"""Shared fixtures: agents as real child processes on loopback, short temp dirs for ipc sockets."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time

import pytest
from hypothesis import settings

from meshq._spawn import AgentProcess

# Property tests explore new examples on every local run; under CI (CI=true) they replay a fixed
# set, so that a landing is decided by the code, not by the draw.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def workdir():
    """A short temp dir (ipc socket paths are limited to ~107 bytes); removed afterwards."""
    path = tempfile.mkdtemp(prefix="mq-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class AgentFactory:
    """Starts agents for one test and makes sure every one of them is gone afterwards."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.started: list[AgentProcess] = []

    def start(self, name: str, port: int | None = None, peers=(), extra=(), data_dir: str | None = None) -> AgentProcess:
        listen = f"tcp://127.0.0.1:{port}" if port else "tcp://127.0.0.1:*"
        agent = AgentProcess(data_dir or os.path.join(self.root, name), listen=listen, peers=list(peers),
                             name=name, extra=list(extra), log_path=os.path.join(self.root, f"{name}.log"))
        self.started.append(agent)
        return agent

    def close(self) -> None:
        for agent in self.started:
            agent.kill()


@pytest.fixture
def agents(workdir):
    factory = AgentFactory(workdir)
    yield factory
    factory.close()


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll an async predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_routes(client, peers_with_subs: int = 1, timeout: float = 10.0) -> None:
    """Wait until the client's agent sees subscriptions from `peers_with_subs` live peers."""
    async def ok():
        st = await client.status()
        return sum(1 for p in st["peers"] if p["state"] == "alive" and p["subscriptions"] > 0) >= peers_with_subs
    await wait_until(ok, timeout, what="subscriptions to propagate")
