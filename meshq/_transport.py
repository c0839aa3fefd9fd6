"""ZeroMQ sockets: the only module that imports zmq.

The agent side is a plain poll loop (`AgentSockets`): one ROUTER for peers (tcp), one
ROUTER for local clients (ipc by default), one DEALER per remote agent.  The client side
(`ClientChannel`) is one asyncio DEALER to the local agent.  Every socket is bounded
(HWMs, max message size), never lingers on close, and routers report unroutable
peers instead of dropping silently (ROUTER_MANDATORY).
"""

from __future__ import annotations

import math
import os
import socket
from typing import Iterable

import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator

HWM = 2000                       # multipart messages queued per peer before sends fail fast
MAX_MSG_BYTES = 256 * 1024 * 1024  # libzmq drops the connection past this; decoders bound tighter
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000
ZMTP_HEARTBEAT_IVL_MS = 1000
ZMTP_HEARTBEAT_TIMEOUT_MS = 5000

# Frames at least this large are sent without copying them.  Zero-copy costs a round trip
# through pyzmq's garbage-collector thread per frame (and the GIL it takes); for the 1 MiB
# batch frames meshq sends, copying measured faster (64 KiB bodies end to end: 210 vs
# 189 MB/s), so only frames well past that go zero-copy.
ZERO_COPY_BYTES = 8 << 20

Again = zmq.Again


def _common(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_BYTES)


def curve_keypair() -> tuple[str, str]:
    """A new CURVE key pair as Z85 text: (public, secret)."""
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def curve_public(secret: str) -> str:
    """The Z85 public key of a Z85 secret key."""
    return zmq.curve_public(secret.encode("ascii")).decode("ascii")


def _router(ctx: zmq.Context, endpoint: str, curve_secret: str | None = None) -> tuple[zmq.Socket, str]:
    sock = ctx.socket(zmq.ROUTER)
    _common(sock)
    if curve_secret is not None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve_secret.encode("ascii"))
        sock.setsockopt(zmq.ZAP_DOMAIN, b"meshq")
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_HEARTBEAT_TIMEOUT_MS)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        sock.close(0)
        raise OSError(f"cannot listen on {endpoint}: {e.strerror}") from None
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


class Dealer:
    """An outgoing link to one remote agent."""

    __slots__ = ("sock", "endpoint")

    def __init__(self, sock: zmq.Socket, endpoint: str) -> None:
        self.sock = sock
        self.endpoint = endpoint


class AgentSockets:
    """The agent's sockets and the poller over them.

    The peer ROUTER is a CURVE server: only clients speaking CURVE get through, and every
    message carries the sender's public key as its ZAP User-Id (see `drain_peers`), so the
    agent knows who sent a frame from the transport, not from what the frame claims.  The
    ZAP handler admits any CURVE key; which tenants a key may speak for is decided above,
    by the membership handshake.
    """

    def __init__(self, identity: bytes, peer_endpoint: str, client_endpoint: str,
                 curve_secret: str) -> None:
        self.identity = identity
        self.curve_secret = curve_secret
        self.curve_public = curve_public(curve_secret)
        self.ctx = zmq.Context()
        self._poller = zmq.Poller()
        self._closed = False
        self._auth = ThreadAuthenticator(self.ctx)
        try:
            self._auth.start()
            self._auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
            self.peers, self.peer_endpoint = _router(self.ctx, peer_endpoint, curve_secret)
            self.clients, self.client_endpoint = _router(self.ctx, client_endpoint)
        except Exception:
            self._auth.stop()
            self.ctx.destroy(0)
            raise
        self._poller.register(self.peers, zmq.POLLIN)
        self._poller.register(self.clients, zmq.POLLIN)
        self.dealers: set[Dealer] = set()
        self._by_sock: dict[zmq.Socket, Dealer] = {}

    def dial(self, endpoint: str, server_key: str) -> Dealer:
        """Open a CURVE DEALER to a remote agent's peer endpoint (connects in the background)."""
        sock = self.ctx.socket(zmq.DEALER)
        _common(sock)
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode("ascii"))
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.curve_public.encode("ascii"))
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve_secret.encode("ascii"))
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.CONNECT_TIMEOUT, 2000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a link that is not up
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as e:
            sock.close(0)
            raise OSError(f"cannot dial {endpoint}: {e.strerror}") from None
        dealer = Dealer(sock, endpoint)
        self.dealers.add(dealer)
        self._by_sock[sock] = dealer
        self._poller.register(sock, zmq.POLLIN)
        return dealer

    def hang_up(self, dealer: Dealer) -> None:
        """Close one outgoing link."""
        if dealer in self.dealers:
            self.dealers.discard(dealer)
            del self._by_sock[dealer.sock]
            self._poller.unregister(dealer.sock)
            dealer.sock.close(0)

    def watch_fd(self, fd: int) -> None:
        """Also wake the poll loop when `fd` is readable."""
        self._poller.register(fd, zmq.POLLIN)

    def poll(self, timeout: float) -> list:
        """Wait up to `timeout` seconds; returns ready objects (sockets, dealers or fds)."""
        # Poller.poll truncates float milliseconds, so round up to avoid a busy spin
        ms = max(0, math.ceil(timeout * 1000)) if timeout is not None else None
        ready = []
        for sock, _ in self._poller.poll(ms):
            ready.append(self._by_sock.get(sock, sock))
        return ready

    @staticmethod
    def drain(sock: zmq.Socket, limit: int = 256) -> list[list[bytes]]:
        """Receive up to `limit` waiting multipart messages without blocking."""
        out = []
        try:
            for _ in range(limit):
                out.append(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            pass
        return out

    def drain_peers(self, limit: int = 256) -> list[tuple[str, list[bytes]]]:
        """Receive waiting peer messages with the CURVE public key (Z85) that sent each."""
        out = []
        sock = self.peers
        try:
            for _ in range(limit):
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                user = frames[-1].get("User-Id") if len(frames) > 1 else ""
                out.append((user or "", [f.bytes for f in frames]))
        except zmq.Again:
            pass
        return out

    @staticmethod
    def send(sock: zmq.Socket, frames: Iterable[bytes]) -> bool:
        """Send without blocking; False when the peer is unknown, gone or full (the outbox resends)."""
        try:
            # only very large frames go zero-copy (see ZERO_COPY_BYTES)
            sock.send_multipart(frames, zmq.NOBLOCK, copy=len(frames[-1]) < ZERO_COPY_BYTES)
            return True
        except zmq.ZMQError:
            return False

    def close(self) -> None:
        """Close every socket and the context; idempotent."""
        if self._closed:
            return
        self._closed = True
        for dealer in list(self.dealers):
            self.hang_up(dealer)
        self.peers.close(0)
        self.clients.close(0)
        self._auth.stop()
        self.ctx.term()


def default_client_endpoint(data_dir: str) -> str:
    """The ipc endpoint of the agent serving `data_dir`."""
    return "ipc://" + os.path.join(os.path.abspath(data_dir), "agent.sock")


class ClientChannel:
    """One asyncio DEALER from a client to its local agent; reconnects by itself."""

    def __init__(self, endpoint: str, session: bytes) -> None:
        self.endpoint = endpoint
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        _common(self.sock)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # the client bounds what it sends itself
        self.sock.setsockopt(zmq.ROUTING_ID, session)
        self.sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise OSError(f"cannot connect to agent at {endpoint}: {e.strerror}") from None

    def send(self, frames: list[bytes]) -> None:
        """Queue frames for the agent (never blocks: HWM is unbounded here)."""
        self.sock.send_multipart(frames, zmq.NOBLOCK, copy=len(frames[-1]) < ZERO_COPY_BYTES)

    async def recv(self) -> list[bytes]:
        """Wait for the next multipart message from the agent."""
        return await self.sock.recv_multipart()

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


KEY_QUERY = b"MESHQ-KEY?1".ljust(160, b"\0")  # padded: an answer is never larger than the query
MAX_KEY_ANSWER = 160


def _host_port(endpoint: str) -> tuple[str, int]:
    hostport = endpoint.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


class KeyBeacon:
    """Answers "what is your CURVE public key?" over UDP on the peer port, and asks others.

    A peer given only as tcp://HOST:PORT (no key) is dialled after asking its beacon.  The
    answer is not authenticated (trust on first use); tenant membership proofs, which bind
    both CURVE keys of the link, are what defeats a man in the middle.
    """

    def __init__(self, endpoint: str, answer: bytes) -> None:
        if len(answer) > MAX_KEY_ANSWER:
            raise ValueError("key beacon answer too large")
        host, port = _host_port(endpoint)
        self.answer = answer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        try:
            self.sock.bind(("0.0.0.0" if host in ("*", "") else host, port))
        except OSError:
            self.sock.close()
            raise
        self._asked: dict[tuple[str, int], str] = {}

    def fileno(self) -> int:
        return self.sock.fileno()

    def ask(self, endpoint: str) -> None:
        """Send a key query to the agent listening at `endpoint` (answers come via `serve`)."""
        try:
            host, port = _host_port(endpoint)
            ip = socket.gethostbyname(host)
            self._asked[(ip, port)] = endpoint
            self.sock.sendto(KEY_QUERY, (ip, port))
        except (OSError, ValueError):
            pass

    def serve(self, may_answer) -> list[tuple[str, bytes]]:
        """Answer waiting queries (when `may_answer()`); return (endpoint, answer) pairs received."""
        answers = []
        for _ in range(64):
            try:
                data, addr = self.sock.recvfrom(512)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if data == KEY_QUERY:
                if may_answer():
                    try:
                        self.sock.sendto(self.answer, addr)
                    except OSError:
                        pass
            elif len(data) <= MAX_KEY_ANSWER:
                endpoint = self._asked.pop(addr[:2], None)
                if endpoint is not None:
                    answers.append((endpoint, data))
        return answers

    def close(self) -> None:
        self.sock.close()
