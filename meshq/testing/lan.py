"""A LAN on one machine: network namespaces joined by a bridge, for tests, benchmarks and demos.

Layout (everything below lives inside one throw-away "outer" network namespace that has only
``lo``, created by a single holder process; killing the holder tears the whole LAN down)::

    outer netns (lo only) + private mount ns with a tmpfs on /run (for /run/netns)
      ├── netns "br":  bridge br0 (stp off, forward delay 0, multicast snooping off)
      │                 ports port0 .. portN-1 (veth ends), nftables table "bridge meshq"
      └── netns "h<i>": eth0 (other end of port<i>), 10.77.0.<i+1>/24, lo up,
                        route 224.0.0.0/4 dev eth0 (multicast)

No veth end ever lives in the root namespace, so test traffic (mDNS included) can never reach a
real interface. Processes started with :meth:`VirtualLan.spawn` enter only the host's *network*
namespace: they share the caller's filesystem, so ``/tmp`` and ``ipc://`` socket files in a
temporary directory are visible from the root namespace and from every host.
"""

from __future__ import annotations

import atexit
import ctypes
import ipaddress
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = ["Host", "LanError", "VirtualLan", "lan_available"]

_PR_SET_PDEATHSIG = 1
_IFACE = "eth0"
_BRIDGE_NS = "br"
_BRIDGE = "br0"
_NFT_TABLE = "meshq"


class LanError(RuntimeError):
    """The virtual LAN could not be built or changed (missing tool, no privileges, bad host)."""


@dataclass(frozen=True)
class Host:
    """One host of the virtual LAN: its index, netns name, IPv4 address and interface name."""

    index: int
    name: str
    ip: str
    iface: str = _IFACE


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # pragma: no cover - best effort only
        pass


@lru_cache(maxsize=1)
def lan_available() -> str | None:
    """Return None if a VirtualLan can be built here, else a plain-English reason (for pytest.skip)."""
    if not sys.platform.startswith("linux"):
        return "the virtual LAN needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the virtual LAN needs root (network namespaces, veth pairs, bridges)"
    for tool, pkg in (("ip", "iproute2"), ("unshare", "util-linux"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install {pkg})"
    try:
        r = subprocess.run(
            ["unshare", "--net", "--mount", "--", "ip", "link", "add", "mqprobe0", "type", "bridge"],
            capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace: {e}"
    if r.returncode != 0:
        return f"cannot create a network namespace with a bridge: {r.stderr.strip() or r.returncode}"
    return None


class VirtualLan:
    """N hosts (network namespaces) on one bridge; a context manager that tears everything down."""

    def __init__(self, hosts: int, subnet: str = "10.77.0.0/24"):
        """Build the LAN now (about 10-20 ms per host); raises LanError if it cannot."""
        reason = lan_available()
        if reason is not None:
            raise LanError(reason)
        net = ipaddress.ip_network(subnet)
        if not isinstance(net, ipaddress.IPv4Network):
            raise LanError("subnet must be IPv4")
        if hosts < 1 or hosts + 2 > net.num_addresses:
            raise LanError(f"{hosts} hosts do not fit in {subnet}")
        self.subnet = net
        self.hosts: list[Host] = [
            Host(i, f"h{i}", str(net.network_address + i + 1)) for i in range(hosts)
        ]
        self._lock = threading.RLock()
        self._closed = False
        self._procs: list[subprocess.Popen] = []
        self._blocked: set[tuple[int, int]] = set()
        self._loss: dict[int, float] = {}
        self._holder: subprocess.Popen | None = None
        self._ns_inodes: set[tuple[int, int]] = set()
        atexit.register(self.close)
        try:
            self._start_holder()
            self._build()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _start_holder(self) -> None:
        script = "mount -t tmpfs meshq-lan /run && mkdir /run/netns && echo ready && exec sleep infinity"
        self._holder = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "--", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        assert self._holder.stdout is not None
        ready, _, _ = select.select([self._holder.stdout], [], [], 10)
        line = self._holder.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            err = b""
            if self._holder.poll() is not None and self._holder.stderr is not None:
                err = self._holder.stderr.read()
            raise LanError(f"could not start the LAN holder namespace: {err.decode(errors='replace').strip()}")
        self._holder.stdout.close()
        self._holder.stderr.close()  # type: ignore[union-attr]

    def _build(self) -> None:
        lines = [
            f"ip netns add {_BRIDGE_NS}",
            f"ip -n {_BRIDGE_NS} link set lo up",
            f"ip -n {_BRIDGE_NS} link add {_BRIDGE} type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
            f"ip -n {_BRIDGE_NS} link set {_BRIDGE} up",
        ]
        plen = self.subnet.prefixlen
        for h in self.hosts:
            port = self._port(h.index)
            lines += [
                f"ip netns add {h.name}",
                f"ip -n {_BRIDGE_NS} link add {port} type veth peer name {_IFACE} netns {h.name}",
                f"ip -n {_BRIDGE_NS} link set {port} master {_BRIDGE} up",
                f"ip -n {h.name} link set lo up",
                f"ip -n {h.name} addr add {h.ip}/{plen} dev {_IFACE}",
                f"ip -n {h.name} link set {_IFACE} up",
                f"ip -n {h.name} route add 224.0.0.0/4 dev {_IFACE}",
            ]
        r = subprocess.run(
            ["nsenter", "-t", str(self._holder.pid), "-m", "-n", "--", "sh", "-ec", "\n".join(lines)],  # type: ignore[union-attr]
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        if r.returncode != 0:
            raise LanError(f"building the virtual LAN failed: {r.stderr.strip()}")
        for name in [_BRIDGE_NS] + [h.name for h in self.hosts]:
            st = os.stat(self._ns_path(name))
            self._ns_inodes.add((st.st_dev, st.st_ino))

    def _port(self, index: int) -> str:
        return f"port{index}"

    def _ns_path(self, name: str) -> str:
        assert self._holder is not None
        return f"/proc/{self._holder.pid}/root/run/netns/{name}"

    def _host(self, index: int) -> Host:
        if self._closed:
            raise LanError("the virtual LAN is closed")
        if not 0 <= index < len(self.hosts):
            raise LanError(f"no host {index} (hosts are 0..{len(self.hosts) - 1})")
        return self.hosts[index]

    def _in_ns(self, name: str, argv: list[str], input: str | None = None) -> None:
        r = subprocess.run(
            ["nsenter", f"--net={self._ns_path(name)}", "--", *argv],
            capture_output=True, text=True, timeout=30, input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if r.returncode != 0:
            raise LanError(f"{' '.join(argv)} failed in netns {name}: {r.stderr.strip()}")

    # -------------------------------------------------------------- processes

    def spawn(self, host: int, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start argv inside host's network namespace (own session/process group); kwargs go to Popen."""
        h = self._host(host)
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        if "process_group" not in popen_kwargs:
            popen_kwargs.setdefault("start_new_session", True)
        # nsenter without -p/--fork execs argv directly: Popen.pid is the program itself.
        p = subprocess.Popen(["nsenter", f"--net={self._ns_path(h.name)}", "--", *argv], **popen_kwargs)
        p._meshq_own_group = bool(  # type: ignore[attr-defined]
            popen_kwargs.get("start_new_session") or popen_kwargs.get("process_group") == 0
        )
        with self._lock:
            self._procs.append(p)
        return p

    def run(self, host: int, argv: list[str], timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess:
        """Run argv in host's netns to completion (captures text output by default; check=, input= work)."""
        check = kw.pop("check", False)
        inp = kw.pop("input", None)
        capture = kw.pop("capture_output", "stdout" not in kw and "stderr" not in kw)
        if capture:
            kw["stdout"] = kw["stderr"] = subprocess.PIPE
        if "text" not in kw and "universal_newlines" not in kw and "encoding" not in kw:
            kw["text"] = True
        if inp is not None:
            kw["stdin"] = subprocess.PIPE
        p = self.spawn(host, argv, **kw)
        try:
            out, err = p.communicate(inp, timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(p, signal.SIGKILL)
            p.communicate()
            raise
        finally:
            with self._lock:
                if p in self._procs:
                    self._procs.remove(p)
        cp = subprocess.CompletedProcess(argv, p.returncode, out, err)
        if check:
            cp.check_returncode()
        return cp

    def _kill(self, p: subprocess.Popen, sig: int) -> None:
        """Signal p's own process group if spawn() gave it one, else just p."""
        try:
            if getattr(p, "_meshq_own_group", False):
                os.killpg(p.pid, sig)
            elif p.poll() is None:
                p.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    # ---------------------------------------------------------------- faults

    def cut(self, host: int, silent: bool = False) -> None:
        """Cut host off: bridge port down (no carrier), or silent=True: detach it (carrier up, frames vanish)."""
        self._host(host)
        port = self._port(host)
        if silent:
            self._in_ns(_BRIDGE_NS, ["ip", "link", "set", port, "nomaster"])
        else:
            self._in_ns(_BRIDGE_NS, ["ip", "link", "set", port, "down"])

    def heal(self, host: int) -> None:
        """Undo cut(): re-attach host's port to the bridge and bring it up."""
        self._host(host)
        self._in_ns(_BRIDGE_NS, ["ip", "link", "set", self._port(host), "master", _BRIDGE, "up"])

    def block(self, a: int, b: int) -> None:
        """Drop every frame between hosts a and b (both directions); other pairs are unaffected."""
        self._host(a), self._host(b)
        with self._lock:
            self._blocked.add((min(a, b), max(a, b)))
            self._apply_nft()

    def unblock(self, a: int, b: int) -> None:
        """Undo block(a, b)."""
        self._host(a), self._host(b)
        with self._lock:
            self._blocked.discard((min(a, b), max(a, b)))
            self._apply_nft()

    def loss(self, host: int, percent: float) -> None:
        """Drop each non-ARP frame to or from host with probability percent/100 (nftables numgen); 0 clears."""
        self._host(host)
        if not 0 <= percent <= 100:
            raise LanError("percent must be within 0..100")
        with self._lock:
            if percent == 0:
                self._loss.pop(host, None)
            else:
                self._loss[host] = percent
            self._apply_nft()

    def _apply_nft(self) -> None:
        if shutil.which("nft") is None:
            raise LanError("`nft` not found: block()/loss() need nftables (apt-get install -y nftables)")
        rules = []
        for a, b in sorted(self._blocked):
            pa, pb = self._port(a), self._port(b)
            rules.append(f'iifname "{pa}" oifname "{pb}" drop')
            rules.append(f'iifname "{pb}" oifname "{pa}" drop')
        for h, pct in sorted(self._loss.items()):
            thr = int(round(pct * 10000))
            port = self._port(h)
            rnd = "" if thr >= 1000000 else f"numgen random mod 1000000 < {thr} "
            # ARP is spared: a lossy ARP leaves neighbours INCOMPLETE for seconds, which is not "loss"
            rules.append(f'iifname "{port}" ether type != arp {rnd}drop')
            rules.append(f'oifname "{port}" ether type != arp {rnd}drop')
        body = "\n".join("    " + r for r in rules)
        script = (
            f"table bridge {_NFT_TABLE}\n"
            f"delete table bridge {_NFT_TABLE}\n"
            f"table bridge {_NFT_TABLE} {{\n"
            f"  chain forward {{\n"
            f"    type filter hook forward priority 0; policy accept;\n"
            f"{body}\n"
            f"  }}\n"
            f"}}\n"
        )
        self._in_ns(_BRIDGE_NS, ["nft", "-f", "-"], input=script)

    # --------------------------------------------------------------- teardown

    def close(self) -> None:
        """Kill every spawned process (process group) and every process left in a host, remove the LAN; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs, self._procs = self._procs, []
        try:
            atexit.unregister(self.close)
        except Exception:  # pragma: no cover
            pass
        live = [p for p in procs if p.poll() is None]
        for p in live:
            self._kill(p, signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in live:
            if p.poll() is None:
                self._kill(p, signal.SIGKILL)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    try:
                        f.close()
                    except Exception:
                        pass
        self._sweep_namespaces()
        if self._holder is not None:
            if self._holder.poll() is None:
                try:
                    os.killpg(self._holder.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self._holder.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass

    def _sweep_namespaces(self) -> None:
        """SIGKILL any process still inside one of our namespaces (e.g. daemonized grandchildren)."""
        if not self._ns_inodes:
            return
        me = os.getpid()
        for _ in range(3):
            found = False
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) == me:
                    continue
                try:
                    st = os.stat(f"/proc/{entry}/ns/net")
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) in self._ns_inodes:
                    found = True
                    try:
                        os.kill(int(entry), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if not found:
                return
            time.sleep(0.05)

    @property
    def holder_pid(self) -> int | None:
        """Pid of the process that keeps the LAN alive (None before start)."""
        return self._holder.pid if self._holder is not None else None

    def __enter__(self) -> "VirtualLan":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VirtualLan(hosts={len(self.hosts)}, subnet={str(self.subnet)!r}, closed={self._closed})"
