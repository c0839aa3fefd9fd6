"""Peer discovery: mDNS/DNS-SD (``_meshq._tcp.local.``) and a static implementation for tests and seeds.

This is the only module of meshq that imports zeroconf. mDNS says where peers *might* be, never
that one is dead: a SIGKILLed peer stays in every cache for up to 75 minutes (python-zeroconf clamps
PTR TTLs to >= 1125 s), so liveness must come from the mesh (heartbeats and acks). ``PeerGone`` is
only emitted for a clean goodbye (``close()``) or a record expiring.

Both implementations share one interface::

    d.start(); poller.register(d.wakeup_fd, zmq.POLLIN); ... ; for ev in d.events(): ...; d.close()
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import logging
import os
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Union

from ._errors import MeshqError

log = logging.getLogger("meshq.discovery")

SERVICE_TYPE = "_meshq._tcp.local."
PROBE_SERVICE_TYPE = "_meshq-probe._tcp.local."
SOURCES = ("mdns", "seed", "peer", "static")

# Bounds for decoding TXT records from the network (anything outside is dropped and counted).
MAX_TXT_BYTES = 1300
MAX_NAME_CHARS = 128
MAX_ENDPOINT_CHARS = 256
MAX_PUBKEY_CHARS = 128
MAX_TAGS = 32
MAX_VERSION = 65535
WARN_INTERVAL = 30.0  # at most one warning per source per this many seconds
WARN_BURST = 10  # and at most this many warnings in total per interval

_AGENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_TAG_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PUBKEY_RE = re.compile(r"[\x21-\x7e]*")  # printable ASCII, no spaces (Z85 or hex)
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_ENDPOINT_RE = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^:/\[\]]+):([0-9]{1,5})")
_WILDCARD_HOSTS = ("0.0.0.0", "*")


class DiscoveryError(MeshqError):
    """Discovery could not start (no usable interface, bad own record, name already taken)."""


class DuplicateAgentError(DiscoveryError):
    """Another agent on the LAN already announces this agent id."""


@dataclass(frozen=True)
class PeerInfo:
    """What is known about a peer agent: its id, display name, endpoint, key and tags."""

    agent_id: str
    name: str
    endpoint: str  # like "tcp://10.77.0.2:7400"
    version: int = 1
    pubkey: str = ""
    tenant_tags: tuple[str, ...] = ()
    source: str = "mdns"  # "mdns" | "seed" | "peer" | "static"


@dataclass(frozen=True)
class PeerSeen:
    """A peer appeared or its record changed."""

    info: PeerInfo


@dataclass(frozen=True)
class PeerGone:
    """A peer said goodbye (or its record expired)."""

    agent_id: str


DiscoveryEvent = Union[PeerSeen, PeerGone]


class MalformedRecord(ValueError):
    """A TXT record (or own PeerInfo) that does not satisfy the bounds; dropped and counted."""


# --------------------------------------------------------------------------- validation


def _check_printable(s: str, what: str, limit: int) -> str:
    if len(s) > limit:
        raise MalformedRecord(f"{what} longer than {limit}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in s):
        raise MalformedRecord(f"{what} has control characters")
    return s


def validate_endpoint(ep: str) -> tuple[str, int]:
    """Return (host, port) of a ``tcp://host:port`` endpoint or raise MalformedRecord."""
    if len(ep) > MAX_ENDPOINT_CHARS:
        raise MalformedRecord("endpoint too long")
    m = _ENDPOINT_RE.fullmatch(ep)
    if not m:
        raise MalformedRecord("endpoint is not tcp://host:port")
    host, port = m.group(1), int(m.group(2))
    if not 1 <= port <= 65535:
        raise MalformedRecord("endpoint port out of range")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise MalformedRecord("endpoint has a bad IPv6 address") from None
    elif host not in _WILDCARD_HOSTS:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not _HOSTNAME_RE.fullmatch(host):
                raise MalformedRecord("endpoint host is not an address or host name") from None
    return host, port


def validate_peer(info: PeerInfo) -> PeerInfo:
    """Check every field of a PeerInfo against the wire bounds; return it or raise MalformedRecord."""
    if not isinstance(info.agent_id, str) or not _AGENT_ID_RE.fullmatch(info.agent_id):
        raise MalformedRecord("agent id must be 1-63 chars of [A-Za-z0-9_-], not starting with _ or -")
    _check_printable(info.name, "name", MAX_NAME_CHARS)
    validate_endpoint(info.endpoint)
    if not isinstance(info.version, int) or not 1 <= info.version <= MAX_VERSION:
        raise MalformedRecord("version out of range")
    if len(info.pubkey) > MAX_PUBKEY_CHARS or not _PUBKEY_RE.fullmatch(info.pubkey):
        raise MalformedRecord("bad public key")
    if len(info.tenant_tags) > MAX_TAGS or not all(_TAG_RE.fullmatch(t) for t in info.tenant_tags):
        raise MalformedRecord("bad tenant tags")
    if info.source not in SOURCES:
        raise MalformedRecord("bad source")
    return info


def encode_txt(info: PeerInfo) -> dict[str, str]:
    """The TXT properties announced for info (validated first)."""
    validate_peer(info)
    return {
        "id": info.agent_id,
        "name": info.name,
        "ver": str(info.version),
        "ep": info.endpoint,
        "pk": info.pubkey,
        "tags": ",".join(info.tenant_tags),
    }


def decode_txt(
    props: dict[bytes, bytes | None], instance: str, addresses: list[str] | tuple[str, ...] = ()
) -> PeerInfo:
    """Decode TXT properties into a PeerInfo; raises MalformedRecord for anything out of bounds.

    ``instance`` is the DNS-SD instance label, which must equal the id; a wildcard endpoint host
    (0.0.0.0 or *) is replaced by the first announced IPv4 address.
    """
    if not isinstance(props, dict):
        raise MalformedRecord("TXT is not a key/value set")
    total = 0
    fields: dict[str, str] = {}
    for k, v in props.items():
        if not isinstance(k, bytes) or not (v is None or isinstance(v, bytes)):
            raise MalformedRecord("TXT entry of the wrong type")
        total += len(k) + (len(v) if v else 0) + 2
        if total > MAX_TXT_BYTES:
            raise MalformedRecord("TXT record too large")
        try:
            key = k.decode("ascii").lower()
            val = v.decode("utf-8") if v is not None else ""
        except UnicodeDecodeError:
            raise MalformedRecord("TXT entry is not valid UTF-8") from None
        if key in ("id", "name", "ver", "ep", "pk", "tags"):
            fields[key] = val
    for required in ("id", "ver", "ep"):
        if required not in fields:
            raise MalformedRecord(f"TXT lacks {required!r}")
    if fields["id"] != instance:
        raise MalformedRecord("TXT id differs from the instance name")
    ver = fields["ver"]
    if not ver.isascii() or not ver.isdigit() or len(ver) > 5:
        raise MalformedRecord("ver is not a small integer")
    ep = fields["ep"]
    host, port = validate_endpoint(ep)
    if host in _WILDCARD_HOSTS:
        v4 = [a for a in addresses if _is_ipv4(a)]
        if not v4:
            raise MalformedRecord("wildcard endpoint and no address")
        ep = f"tcp://{v4[0]}:{port}"
    tags_s = fields.get("tags", "")
    if len(tags_s) > MAX_TAGS * 65:
        raise MalformedRecord("tags too long")
    tags = tuple(t for t in tags_s.split(",") if t) if tags_s else ()
    info = PeerInfo(
        agent_id=fields["id"],
        name=fields.get("name", "") or fields["id"],
        endpoint=ep,
        version=int(ver),
        pubkey=fields.get("pk", ""),
        tenant_tags=tags,
        source="mdns",
    )
    return validate_peer(info)


def _is_ipv4(s: str) -> bool:
    try:
        ipaddress.IPv4Address(s)
        return True
    except ValueError:
        return False


class _RateLimitedLog:
    """Warnings at most once per ``interval`` per source, and ``burst`` in total per interval."""

    def __init__(self, logger: logging.Logger, interval: float = WARN_INTERVAL, burst: int = WARN_BURST,
                 max_sources: int = 1024):
        self._log = logger
        self._interval = interval
        self._burst = burst
        self._max = max_sources
        self._last: dict[str, float] = {}
        self._window_start = 0.0
        self._window_count = 0
        self.suppressed = 0
        self._lock = threading.Lock()

    def warning(self, source: str, msg: str, *args: object) -> bool:
        """Log unless rate-limited; return whether it was logged."""
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= self._interval:
                self._window_start, self._window_count = now, 0
            last = self._last.get(source)
            if (last is not None and now - last < self._interval) or self._window_count >= self._burst:
                self.suppressed += 1
                return False
            if len(self._last) >= self._max:
                self._last = {s: t for s, t in self._last.items() if now - t < self._interval}
                if len(self._last) >= self._max:
                    self._last.clear()
            self._last[source] = now
            self._window_count += 1
        self._log.warning(msg, *args)
        return True


# --------------------------------------------------------------------------- event queue


class _EventQueue:
    """Thread-safe event list with a pipe that is readable while events are pending."""

    def __init__(self) -> None:
        self._events: collections.deque[DiscoveryEvent] = collections.deque()
        self._ev_lock = threading.Lock()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._signaled = False
        self._fds_closed = False

    def _push(self, ev: DiscoveryEvent) -> None:
        with self._ev_lock:
            self._events.append(ev)
            if not self._signaled and not self._fds_closed:
                try:
                    os.write(self._wfd, b"\x01")
                    self._signaled = True
                except (BlockingIOError, OSError):
                    pass

    def events(self) -> list[DiscoveryEvent]:
        """Drain pending events (non-blocking, thread-safe) and clear wakeup_fd."""
        with self._ev_lock:
            out = list(self._events)
            self._events.clear()
            if self._signaled and not self._fds_closed:
                try:
                    while os.read(self._rfd, 64):
                        pass
                except (BlockingIOError, OSError):
                    pass
                self._signaled = False
        return out

    @property
    def wakeup_fd(self) -> int:
        """A readable fd while events are pending (for zmq.Poller / select); events() clears it."""
        return self._rfd

    def _close_fds(self) -> None:
        with self._ev_lock:
            if self._fds_closed:
                return
            self._fds_closed = True
            for fd in (self._rfd, self._wfd):
                try:
                    os.close(fd)
                except OSError:
                    pass


# --------------------------------------------------------------------------- static


class StaticDiscovery(_EventQueue):
    """Discovery from a fixed list (seeds, tests): add()/remove() push PeerSeen/PeerGone."""

    def __init__(self, me: PeerInfo | None = None, peers: "list[PeerInfo] | tuple[PeerInfo, ...]" = ()):
        """me is never reported; peers are reported as PeerSeen on start()."""
        super().__init__()
        self.me = me
        self._initial = list(peers)
        self._known: dict[str, PeerInfo] = {}
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self.dropped = 0

    def start(self) -> None:
        """Report the initial peers."""
        with self._lock:
            if self._started:
                return
            self._started = True
        for p in self._initial:
            self.add(p)

    def add(self, info: PeerInfo) -> None:
        """Report info as seen (again if it changed); ignores self and duplicates."""
        if self.me is not None and info.agent_id == self.me.agent_id:
            return
        with self._lock:
            if self._closed or self._known.get(info.agent_id) == info:
                return
            self._known[info.agent_id] = info
        self._push(PeerSeen(info))

    def remove(self, agent_id: str) -> None:
        """Report agent_id as gone (if it was known)."""
        with self._lock:
            if self._closed or self._known.pop(agent_id, None) is None:
                return
        self._push(PeerGone(agent_id))

    def peers(self) -> list[PeerInfo]:
        """Currently known peers."""
        with self._lock:
            return list(self._known.values())

    def reannounce(self) -> None:
        """No-op (nothing is announced)."""

    def interfaces_in_use(self) -> list[str]:
        """No interfaces are used."""
        return []

    def close(self) -> None:
        """Stop reporting; idempotent."""
        with self._lock:
            self._closed = True
        self._close_fds()

    def __enter__(self) -> "StaticDiscovery":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- mDNS


def default_interfaces() -> list[str]:
    """The IPv4 addresses that interfaces=None ('all', zeroconf's InterfaceChoice.All) resolves to."""
    import ifaddr

    return sorted({ip.ip for a in ifaddr.get_adapters() for ip in a.ips if ip.is_IPv4})  # type: ignore[misc]


def _server_name(agent_id: str) -> str:
    return f"mq-{hashlib.sha1(agent_id.encode()).hexdigest()[:20]}.local."


class MdnsDiscovery(_EventQueue):
    """Registers _meshq._tcp.local. (instance name = agent id, TXT: id, name, ver, ep, pk, tags) and browses."""

    def __init__(self, me: PeerInfo, interfaces: list[str] | None = None, reannounce_interval: float = 5.0):
        """interfaces: IPv4 addresses to use (None = all interfaces, the real-LAN default)."""
        super().__init__()
        try:
            self._txt = encode_txt(me)
        except MalformedRecord as e:
            raise DiscoveryError(f"cannot announce this agent: {e}") from None
        self.me = me
        self._interfaces = list(interfaces) if interfaces is not None else None
        for ip in self._interfaces or ():
            if not _is_ipv4(ip):
                raise DiscoveryError(f"interfaces must be IPv4 addresses, got {ip!r}")
        self._interval = reannounce_interval
        self._lock = threading.Lock()
        self._known: dict[str, PeerInfo] = {}
        self._work: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._zc = None
        self._browser = None
        self._info = None
        self._registered = False
        self._closed = False
        self.dropped = 0
        self.unresolved = 0
        self._warn = _RateLimitedLog(log)

    # -- lifecycle

    def start(self) -> None:
        """Start browsing, then register (blocks about 1.7 s for probing); raises DiscoveryError."""
        from zeroconf import (
            InterfaceChoice, IPVersion, NonUniqueNameException, ServiceBrowser, ServiceInfo, Zeroconf,
        )

        with self._lock:
            if self._zc is not None or self._closed:
                raise DiscoveryError("start() called twice or after close()")
            try:
                # interfaces=None is the real-LAN default (all interfaces); tests always pass explicit IPs
                ifaces = self._interfaces if self._interfaces is not None else InterfaceChoice.All
                self._zc = Zeroconf(interfaces=ifaces, ip_version=IPVersion.V4Only)
            except OSError as e:
                raise DiscoveryError(f"cannot open mDNS sockets on {self.interfaces_in_use()}: {e}") from e
        worker = threading.Thread(target=self._resolve_loop, name="meshq-mdns-resolve", daemon=True)
        worker.start()
        self._threads.append(worker)
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])
        host, port = validate_endpoint(self.me.endpoint)
        addrs = [host] if _is_ipv4(host) and host not in _WILDCARD_HOSTS else [
            a for a in self.interfaces_in_use() if not a.startswith("127.")
        ] or self.interfaces_in_use()
        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{self.me.agent_id}.{SERVICE_TYPE}",
            port=port,
            properties=self._txt,
            server=_server_name(self.me.agent_id),
            parsed_addresses=addrs,
        )
        try:
            self._zc.register_service(self._info, allow_name_change=False)
        except NonUniqueNameException:
            self.close()
            raise DuplicateAgentError(f"agent id {self.me.agent_id!r} is already announced on this LAN") from None
        except BaseException:
            self.close()
            raise
        self._registered = True
        if self._interval and self._interval > 0:
            t = threading.Thread(target=self._reannounce_loop, name="meshq-mdns-announce", daemon=True)
            t.start()
            self._threads.append(t)

    def reannounce(self) -> None:
        """Send our records again now (call after a link comes back; browsers stop asking after startup)."""
        zc, info = self._zc, self._info
        if zc is None or info is None or not self._registered or self._closed:
            return
        try:
            zc.update_service(info)
        except Exception as e:  # EventLoopBlocked, closed sockets during shutdown, no carrier...
            log.debug("re-announce failed: %r", e)

    def interfaces_in_use(self) -> list[str]:
        """The IPv4 addresses mDNS is bound to."""
        return list(self._interfaces) if self._interfaces is not None else default_interfaces()

    def peers(self) -> list[PeerInfo]:
        """Currently known peers (as last reported)."""
        with self._lock:
            return list(self._known.values())

    def close(self) -> None:
        """Unregister (goodbye), stop browsing and close the sockets; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        zc = self._zc
        if zc is not None:
            if self._registered and self._info is not None:
                try:
                    zc.unregister_service(self._info)
                except Exception as e:
                    log.debug("unregister failed: %r", e)
            if self._browser is not None:
                try:
                    self._browser.cancel()
                except Exception as e:  # pragma: no cover
                    log.debug("browser cancel failed: %r", e)
            try:
                zc.close()
            except Exception as e:  # pragma: no cover
                log.debug("zeroconf close failed: %r", e)
        self._work.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(5)
        self._close_fds()

    def __enter__(self) -> "MdnsDiscovery":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- threads

    def _reannounce_loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.reannounce()

    def _on_change(self, zeroconf: object, service_type: str, name: str, state_change: object) -> None:
        # Runs on zeroconf's browser thread: only enqueue, never block or raise.
        try:
            self._work.put((name, getattr(state_change, "name", str(state_change))))
        except Exception:  # pragma: no cover
            pass

    def _resolve_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None or self._stop.is_set():
                return
            name, change = item
            try:
                self._handle(name, change)
            except Exception as e:  # never let one record kill the worker
                self.dropped += 1
                self._warn.warning(name[:80], "meshq discovery: error handling %r: %r", name[:80], e)

    def _handle(self, name: str, change: str) -> None:
        from zeroconf import ServiceInfo

        suffix = "." + SERVICE_TYPE
        if not name.endswith(suffix):
            return
        instance = name[: -len(suffix)]
        if instance == self.me.agent_id:
            return
        if change == "Removed":
            with self._lock:
                known = self._known.pop(instance, None)
            if known is not None:
                self._push(PeerGone(instance))
            return
        zc = self._zc
        if zc is None:
            return
        info = ServiceInfo(SERVICE_TYPE, name)
        if not info.load_from_cache(zc):
            if not info.request(zc, 3000):
                self.unresolved += 1
                log.debug("could not resolve %r", name[:80])
                return
        try:
            peer = decode_txt(info.properties, instance, info.parsed_addresses())
        except MalformedRecord as e:
            self.dropped += 1
            self._warn.warning(instance[:80], "meshq discovery: ignoring malformed record %r: %s", instance[:80], e)
            return
        with self._lock:
            if self._closed or self._known.get(peer.agent_id) == peer:
                return
            self._known[peer.agent_id] = peer
        self._push(PeerSeen(peer))


# --------------------------------------------------------------------------- doctor


def multicast_probe(interface_ip: str, timeout: float = 2.0) -> bool:
    """True if mDNS works on that interface: a throw-away service registered there is seen by a browser.

    This proves the host can bind, join the group, send and receive mDNS on that interface; it
    cannot prove other hosts hear it (multicast loops back locally even on a lonely link).
    """
    from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, Zeroconf

    if not _is_ipv4(interface_ip):
        return False
    instance = f"probe-{secrets.token_hex(6)}"
    name = f"{instance}.{PROBE_SERVICE_TYPE}"
    seen = threading.Event()

    def handler(zeroconf: object, service_type: str, name: str, state_change: object) -> None:
        if name.startswith(instance + "."):
            seen.set()

    try:
        zc = Zeroconf(interfaces=[interface_ip], ip_version=IPVersion.V4Only)
    except OSError as e:
        log.info("multicast probe on %s: %s", interface_ip, e)
        return False
    try:
        browser = ServiceBrowser(zc, PROBE_SERVICE_TYPE, handlers=[handler])
        info = ServiceInfo(
            PROBE_SERVICE_TYPE, name, port=9, properties={}, server=f"{instance}.local.",
            parsed_addresses=[interface_ip], host_ttl=10, other_ttl=10,
        )
        zc.register_service(info, cooperating_responders=True)
        ok = seen.wait(timeout)
        try:
            zc.unregister_service(info)
        except Exception:  # pragma: no cover
            pass
        browser.cancel()
        return ok
    except Exception as e:
        log.info("multicast probe on %s failed: %r", interface_ip, e)
        return False
    finally:
        zc.close()


__all__ = [
    "DiscoveryError",
    "DiscoveryEvent",
    "DuplicateAgentError",
    "MalformedRecord",
    "MdnsDiscovery",
    "PeerGone",
    "PeerInfo",
    "PeerSeen",
    "StaticDiscovery",
    "decode_txt",
    "default_interfaces",
    "encode_txt",
    "multicast_probe",
    "validate_peer",
]
