"""Which interfaces mDNS uses and why, and `meshq doctor`: checks with a plain-English fix each.

`mdns_plan` is pure: it turns the agent's flags into a decision and the reason for it.
`run_doctor` performs the checks (multicast probe per interface, a TCP connect per seed); the
probe and connect functions are injected so the decision logic is testable without a network.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Callable

from ._discovery import MalformedRecord, validate_endpoint

# interface-name prefixes where multicast usually does not reach other hosts
_NO_MULTICAST_HINTS = {
    "docker": "a Docker bridge: other containers may hear it, other hosts will not",
    "br-": "a Docker network bridge: other hosts will not hear mDNS on it",
    "veth": "a container's virtual link",
    "tun": "a VPN tunnel: most VPNs do not carry multicast",
    "tap": "a VPN/virtual tap device: multicast is often not carried",
    "wg": "a WireGuard tunnel: WireGuard does not carry multicast",
    "tailscale": "a Tailscale tunnel: it does not carry multicast",
    "zt": "a ZeroTier network: multicast may be limited",
}


@dataclass(frozen=True)
class MdnsPlan:
    """Whether mDNS runs, on which IPv4 addresses (None = all interfaces), and why."""

    enabled: bool
    interfaces: list[str] | None
    reason: str


def _listen_host(listen: str) -> str:
    """The host part of a tcp:// endpoint (port may be '*'); '' when it is not one."""
    if not listen.startswith("tcp://") or ":" not in listen[6:]:
        return ""
    return listen[6:].rsplit(":", 1)[0].strip("[]")


def mdns_plan(interfaces: list[str] | None, listen: str, enabled: bool = True) -> MdnsPlan:
    """Decide where mDNS runs from --interface, --listen and --no-mdns."""
    if not enabled:
        return MdnsPlan(False, [], "mDNS is off (--no-mdns): only --peer/--seed links and peer lists are used")
    if interfaces:
        return MdnsPlan(True, list(interfaces), "chosen with --interface")
    host = _listen_host(listen)
    try:
        addr = ipaddress.ip_address(host) if host not in ("", "*", "0.0.0.0") else None
    except ValueError:
        addr = None
    if host.lower() == "localhost" or (addr is not None and addr.is_loopback):
        return MdnsPlan(False, [], f"mDNS is off: the agent listens on {host} (loopback), so no other host could "
                                   "dial it; listen on tcp://0.0.0.0:PORT or a LAN address to join a LAN")
    if addr is not None and addr.version == 4:
        return MdnsPlan(True, [host], f"the agent listens on {host} only, so mDNS runs on that interface")
    return MdnsPlan(True, None, "all IPv4 interfaces (the default); restrict with --interface IP")


@dataclass
class Check:
    """One doctor check: what, whether it passed, details, and what to do when it did not."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def as_dict(self) -> dict:
        return {"check": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


@dataclass
class DoctorReport:
    """Every check; `ok` when all passed."""

    checks: list[Check] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "mdns_interfaces": self.interfaces, "mdns_reason": self.reason,
                "checks": [c.as_dict() for c in self.checks]}


def tcp_answers(endpoint: str, timeout: float = 2.0) -> str | None:
    """None if a TCP connection to a tcp://host:port endpoint succeeds, else the error text."""
    try:
        host, port = validate_endpoint(endpoint)
    except MalformedRecord as e:
        return f"not a tcp://host:port endpoint ({e})"
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or str(e)


def interface_names() -> dict[str, str]:
    """IPv4 address -> interface name, for the addresses this host has."""
    import ifaddr

    out = {}
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4:
                out[ip.ip] = adapter.nice_name
    return out


def run_doctor(interfaces: list[str] | None, seeds: list[str], listen: str, mdns: bool = True,
               probe: Callable[[str], bool] | None = None, connect: Callable[[str], str | None] = tcp_answers,
               names: Callable[[], dict[str, str]] = interface_names) -> DoctorReport:
    """Check mDNS on each interface it would use and each seed; every failure gets a fix."""
    plan = mdns_plan(interfaces, listen, mdns)
    report = DoctorReport(reason=plan.reason)
    known = names()
    if plan.enabled:
        addrs = plan.interfaces if plan.interfaces is not None else sorted(known)
        report.interfaces = list(addrs)
        if probe is None:
            from ._discovery import multicast_probe
            probe = multicast_probe
        usable = 0
        for ip in addrs:
            name = known.get(ip)
            if name is None:
                report.checks.append(Check(f"interface {ip}", False, "no interface on this host has this address",
                                           "pass --interface with one of: " + (", ".join(sorted(known)) or "(none)")))
                continue
            if ipaddress.ip_address(ip).is_loopback and plan.interfaces is None:
                continue   # 'all' includes lo; it only matters when chosen explicitly
            hint = next((h for prefix, h in _NO_MULTICAST_HINTS.items() if name.startswith(prefix)), "")
            ok = probe(ip)
            usable += ok
            detail = f"{name} ({ip}): multicast probe {'round trip works' if ok else 'FAILED'}"
            if hint:
                detail += f"; note: {hint}"
            report.checks.append(Check(f"mdns {ip}", ok, detail, "" if ok else (
                f"mDNS cannot send and hear its own announcement on {name}: check that the interface is up, "
                f"has a multicast route (ip route add 224.0.0.0/4 dev {name}), and that a firewall allows "
                "UDP 5353; where multicast cannot work (Docker, VPN, other subnets) use --seed tcp://HOST:PORT")))
        if plan.interfaces is None and not usable:
            report.checks.append(Check("mdns", False, "no interface passed the multicast probe",
                                       "run with --seed tcp://HOST:PORT of an agent you can reach, and --no-mdns"))
    elif not seeds:
        report.checks.append(Check("links", False, plan.reason + "; and no --seed is given",
                                   "give at least one --seed tcp://HOST:PORT (or --peer), or enable mDNS"))
    for seed in seeds:
        err = connect(seed)
        report.checks.append(Check(f"seed {seed}", err is None, "answers (TCP connect)" if err is None else err,
                                   "" if err is None else (
                                       f"no agent answers at {seed}: check that it runs and listens on that "
                                       "address (meshq agent --listen tcp://0.0.0.0:PORT), that a firewall "
                                       "allows the port, and that this host has a route to it")))
    return report
