"""The virtual LAN harness (meshq.testing.lan): reachability, faults, isolation and teardown."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from meshq.testing import LanError, VirtualLan, lan_available

_REASON = lan_available()
pytestmark = [
    pytest.mark.lan,
    pytest.mark.timeout(60),
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]
needs_nft = pytest.mark.skipif(
    shutil.which("nft") is None, reason="nftables not installed (apt-get install -y nftables)"
)

ECHO_SERVER = r"""
import socket, threading
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 9999))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("0.0.0.0", 9999)); t.listen()
def tcp():
    while True:
        c, _ = t.accept(); c.sendall(c.recv(100)); c.close()
threading.Thread(target=tcp, daemon=True).start()
print("ready", flush=True)
while True:
    d, a = u.recvfrom(100); u.sendto(d, a)
"""

# argv: ip count timeout -> prints number of UDP replies; exit 0 if the TCP echo worked too
ECHO_CLIENT = r"""
import socket, sys
ip, n, to = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(to)
got = 0
for i in range(n):
    u.sendto(str(i).encode(), (ip, 9999))
    try:
        while u.recv(100) != str(i).encode():
            pass
        got += 1
    except OSError:  # timeout, or EHOSTUNREACH while ARP is failing
        pass
print(got)
try:
    c = socket.create_connection((ip, 9999), timeout=to); c.sendall(b"hi"); ok = c.recv(10) == b"hi"
except OSError:
    ok = False
sys.exit(0 if ok else 3)
"""


def start_echo(lan: VirtualLan, host: int) -> subprocess.Popen:
    p = lan.spawn(host, [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def echo(lan: VirtualLan, src: int, dst: int, n: int = 1, timeout: float = 0.3) -> tuple[int, bool]:
    """(UDP replies out of n, TCP echo worked) from host src to host dst."""
    r = lan.run(src, [sys.executable, "-c", ECHO_CLIENT, lan.hosts[dst].ip, str(n), str(timeout)])
    return int(r.stdout.strip() or 0), r.returncode == 0


def reachable(lan: VirtualLan, src: int, dst: int) -> bool:
    got, tcp_ok = echo(lan, src, dst)
    return got == 1 and tcp_ok


def test_hosts_reach_each_other():
    with VirtualLan(3) as lan:
        assert [h.ip for h in lan.hosts] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
        for h in lan.hosts:
            start_echo(lan, h.index)
        for a in range(3):
            for b in range(3):
                if a != b:
                    assert reachable(lan, a, b), (a, b)
        # each host sees only lo and its veth, with the multicast route
        links = lan.run(0, ["ip", "-o", "link"]).stdout
        assert sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()) == ["eth0", "lo"]
        assert "224.0.0.0/4 dev eth0" in lan.run(0, ["ip", "route"]).stdout


def test_custom_subnet_and_bad_arguments():
    with VirtualLan(2, subnet="10.78.5.0/28") as lan:
        assert [h.ip for h in lan.hosts] == ["10.78.5.1", "10.78.5.2"]
        with pytest.raises(LanError):
            lan.cut(5)
    with pytest.raises(LanError):
        VirtualLan(20, subnet="10.78.5.0/28")


def test_filesystem_shared_ipc_socket_visible(tmp_path):
    """Only /run/netns is private: a unix socket made inside a host is reachable from the root ns."""
    path = str(tmp_path / "agent.sock")
    server = (
        "import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen();"
        "print('ready',flush=True); c,_=s.accept(); c.sendall(c.recv(10)[::-1])"
    )
    with VirtualLan(1) as lan:
        p = lan.spawn(0, [sys.executable, "-c", server, path], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(5)
        c.connect(path)
        c.sendall(b"abc")
        assert c.recv(10) == b"cba"
        c.close()
        assert p.wait(5) == 0
        (tmp_path / "from_root").write_text("x")
        assert lan.run(0, ["cat", str(tmp_path / "from_root")]).stdout == "x"


@pytest.mark.parametrize("silent", [False, True])
def test_cut_and_heal(silent):
    with VirtualLan(3) as lan:
        start_echo(lan, 1)
        assert reachable(lan, 0, 1)
        lan.cut(1, silent=silent)
        assert not reachable(lan, 0, 1)
        link = lan.run(1, ["ip", "link", "show", "eth0"]).stdout
        if silent:
            assert "NO-CARRIER" not in link and "LOWER_UP" in link
        else:
            assert "NO-CARRIER" in link
        lan.heal(1)
        deadline = time.monotonic() + 5
        while not reachable(lan, 0, 1):
            assert time.monotonic() < deadline, "no traffic after heal"


@needs_nft
def test_block_only_that_pair():
    with VirtualLan(3) as lan:
        for h in lan.hosts:
            start_echo(lan, h.index)
        lan.block(0, 1)
        assert not reachable(lan, 0, 1)
        assert not reachable(lan, 1, 0)
        assert reachable(lan, 0, 2) and reachable(lan, 2, 0)
        assert reachable(lan, 1, 2) and reachable(lan, 2, 1)
        lan.block(1, 2)
        lan.unblock(1, 0)
        assert reachable(lan, 0, 1)
        assert not reachable(lan, 2, 1)
        lan.unblock(1, 2)
        assert reachable(lan, 2, 1)


@needs_nft
def test_loss():
    with VirtualLan(2) as lan:
        start_echo(lan, 1)
        lan.loss(1, 100)
        assert echo(lan, 0, 1, n=3, timeout=0.2)[0] == 0
        lan.loss(1, 50)  # request and reply each dropped with p=0.5: ~25% of round trips survive
        got, _ = echo(lan, 0, 1, n=100, timeout=0.04)
        assert 5 <= got <= 60, got
        lan.loss(1, 0)
        assert echo(lan, 0, 1, n=50, timeout=0.5)[0] == 50


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_teardown_leaves_nothing():
    before = _netns_list()
    run_netns_existed = os.path.exists("/run/netns")
    lan = VirtualLan(2)
    holder = lan.holder_pid
    ns_inodes = set(lan._ns_inodes)
    p = lan.spawn(0, ["sleep", "300"])
    # a daemonized grandchild in its own session, not known to the harness
    lan.run(1, ["sh", "-c", "setsid sleep 301 >/dev/null 2>&1 < /dev/null &"])
    ignores_term = lan.spawn(1, [sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('x',flush=True); time.sleep(300)"], stdout=subprocess.PIPE)
    ignores_term.stdout.readline()
    t0 = time.monotonic()
    lan.close()
    assert time.monotonic() - t0 < 5
    lan.close()  # idempotent
    assert p.poll() is not None and ignores_term.poll() is not None
    assert not _alive(holder)
    leftovers = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in ns_inodes:
                leftovers.append(entry)
    assert leftovers == []
    assert _netns_list() == before
    assert os.path.exists("/run/netns") == run_netns_existed
    with pytest.raises(LanError):
        lan.spawn(0, ["true"])


def test_context_manager_cleans_up_on_error():
    with pytest.raises(RuntimeError):
        with VirtualLan(1) as lan:
            holder = lan.holder_pid
            p = lan.spawn(0, ["sleep", "300"])
            raise RuntimeError("boom")
    assert p.poll() is not None
    assert not _alive(holder)


def test_run_timeout_kills_process():
    with VirtualLan(1) as lan:
        with pytest.raises(subprocess.TimeoutExpired):
            lan.run(0, ["sleep", "30"], timeout=0.3)
        assert lan.run(0, ["sh", "-c", "echo hi; exit 4"]).returncode == 4
        with pytest.raises(subprocess.CalledProcessError):
            lan.run(0, ["false"], check=True)
