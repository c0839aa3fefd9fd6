"""Run agents as child processes (for the demo, tests and benchmarks)."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from typing import Sequence

_READY = re.compile(r"ready: client (\S+) peer (\S+)")


class AgentProcess:
    """A `meshq agent` child process; `stop()` ends it with SIGTERM, `kill()` with SIGKILL."""

    def __init__(self, data_dir: str, listen: str = "tcp://127.0.0.1:*", peers: Sequence[str] = (),
                 name: str | None = None, extra: Sequence[str] = (), env: dict | None = None,
                 prefix: Sequence[str] = (), log_path: str | None = None, ready_timeout: float = 15.0) -> None:
        self.data_dir = data_dir
        self.name = name
        argv = [*prefix, sys.executable, "-m", "meshq", "agent", "--data-dir", data_dir, "--listen", listen]
        for p in peers:
            argv += ["--peer", p]
        if name:
            argv += ["--name", name]
        argv += list(extra)
        self.argv = argv
        self.log_path = log_path or os.path.join(data_dir + ".log")
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self.client_endpoint = ""
        self.peer_endpoint = ""
        self.ready_line = ""
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        buf = b""
        try:
            while time.monotonic() < deadline:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                if b"\n" in buf:
                    line = buf.split(b"\n", 1)[0].decode()
                    m = _READY.search(line)
                    if m:
                        self.ready_line = line
                        self.client_endpoint, self.peer_endpoint = m.group(1), m.group(2)
                        return
        finally:
            sel.close()
        raise RuntimeError(f"agent did not become ready within {timeout} s; see {self.log_path}: "
                           + self.tail_log())

    def tail_log(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.proc.stdout and not self.proc.stdout.closed:
            self.proc.stdout.close()
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> "AgentProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
