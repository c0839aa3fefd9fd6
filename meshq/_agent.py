"""The agent: accept from clients → persist to outbox → route → deliver → collect acks → delete.

Theory of operation
-------------------
One thread runs one poll loop.  Each turn it drains every ready socket, handles the
frames, then *commits the store once* (group commit: every publish accepted in this turn
shares one fsync'ed LevelDB write), and only then acknowledges the publishes and sends
the new outbox records.  Timers (heartbeats, retries, liveness, expiry of detached
subscriptions) run at the end of each turn.

Routing happens when a publish is accepted: the subject is matched against the
directory (this agent's own subscriptions plus what every linked agent announced), and
each message is written to the outbox stream of every destination agent and lane (see
`_protocol` for streams).  The local agent is a destination like any other; its stream
is delivered in-process instead of over a socket.

On the receiving side a stream's messages are handed to the matching local
subscriptions; the stream's watermark advances only when every consumer acked, and the
watermark is what goes back to the producer as its cumulative ack.  A message whose
subscription exists but whose client is away (reconnecting, agent restarted) is *held*:
the producer is told to retry later, so it waits in the producer's outbox, not here.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import _envelope as env
from ._auth import (
    ClientGrant, MembershipHandshake, RateLimitedLog, RateLimiter, TenantSecret, load_tenant_files, verify_token,
)
from ._envelope import Kind, header_field, pack, unpack_header, unpack_items
from ._deadletter import TOMBSTONE_EXPIRY, not_before_ms
from ._dirsync import DirectoryMixin
from ._errors import AuthorizationError, BadFilterError, BadSubjectError, MeshqError, RemoteProtocolError
from ._filter import parse_filter
from ._mesh import MeshMixin
from ._protocol import InboundStream, Liveness, StreamSender
from ._requests import RequestMixin
from ._semantics import SemanticsMixin
from ._store import Store, StreamKey
from ._subject import SubjectIndex, validate_pattern, validate_subject
from ._transport import AgentSockets, Dealer, KeyBeacon, curve_keypair, default_client_endpoint

log = logging.getLogger("meshq.agent")

DEFAULT_TENANT = "default"     # the open tenant: served without credentials when no tenant file is given
SEQ_NEXT = b"n"
SEQ_WATERMARK = b"w"


@dataclass
class AgentConfig:
    """Everything an agent needs to start."""

    data_dir: str
    listen: str = "tcp://127.0.0.1:7400"
    client_endpoint: str | None = None       # default: ipc://<data_dir>/agent.sock
    peers: list[str] = field(default_factory=list)
    name: str | None = None
    advertise: str | None = None
    durability: str = "fsync"
    heartbeat_interval: float = 0.5
    dead_after: float = 2.0                  # no direct or indirect sign of life for this long: dead
    suspect_after: float = 1.0               # silent this long: suspect, ask other agents (PROBE)
    interfaces: list[str] | None = None      # mDNS interface IPs (None: decided by mdns_plan)
    seeds: list[str] = field(default_factory=list)
    mdns: bool = True
    reannounce_interval: float = 5.0
    client_timeout: float = 10.0             # a silent client is detached after this
    client_grace: float = 30.0               # a detached client's subscriptions live this long
    ack_wait: float = 5.0
    window_msgs: int = 20_000
    hold_delay: float = 0.25                 # retry delay asked of producers for held messages
    tenant_files: list[str] = field(default_factory=list)
    open_tenant: bool | None = None          # serve the credential-less "default" tenant (default: iff no tenant files)


@dataclass(frozen=True)
class SubSpec:
    """What a client asked for in SUB: the subject pattern and the delivery options."""

    pattern: str
    group: str | None = None          # queue group: one member gets each message
    durable: str | None = None        # durable name: outlives the client and agent restarts
    filter: str | None = None         # header filter, evaluated where the message is published
    ack_wait: float | None = None     # seconds before an unacked message is redelivered
    max_deliver: int | None = None    # deliveries before the message goes to the dead-letter store
    service: bool = False             # a responder (serve()): also announced as a Service in the directory

    @classmethod
    def from_header(cls, h: Any) -> "SubSpec":
        """Parse and check a SUB header (BadSubjectError / RemoteProtocolError)."""
        spec = cls(
            header_field(h, "subject", str),
            header_field(h, "group", (str, type(None)), None),
            header_field(h, "durable", (str, type(None)), None),
            header_field(h, "filter", (str, type(None)), None),
            header_field(h, "ack_wait", (int, float, type(None)), None),
            header_field(h, "max_deliver", (int, type(None)), None),
            header_field(h, "service", bool, False),
        )
        validate_pattern(spec.pattern)
        for what, name in (("queue group", spec.group), ("durable", spec.durable)):
            if name is not None and (not name or "\x00" in name or len(name) > 128):
                raise BadSubjectError(f"{what} names are 1..128 characters without NUL")
        if spec.filter is not None and len(spec.filter) > 1024:
            raise BadSubjectError("filters are limited to 1024 characters")
        if spec.filter is not None:
            parse_filter(spec.filter)         # BadFilterError names the bad clause
        if spec.ack_wait is not None and not 0.05 <= spec.ack_wait <= 86400:
            raise BadSubjectError("ack_wait must be between 0.05 s and a day")
        if spec.max_deliver is not None and not 1 <= spec.max_deliver <= 1_000_000:
            raise BadSubjectError("max_deliver must be at least 1")
        return spec

    def to_dict(self) -> dict:
        return {"subject": self.pattern, "group": self.group, "durable": self.durable, "filter": self.filter,
                "ack_wait": self.ack_wait, "max_deliver": self.max_deliver, "service": self.service}


@dataclass(eq=False)
class LocalSub:
    """A subscription of a local client (attached) or of one that is away (detached)."""

    session: bytes
    sid: int
    tenant: str
    spec: SubSpec
    conn: "ClientConn | None" = None
    detached_until: float = 0.0
    delivered: int = 0
    inflight: int = 0                 # handed to the client and not yet acked
    csid: int = 0                     # the attached client's sid for it (differs from sid for durables)

    def __post_init__(self) -> None:
        if not self.csid:
            self.csid = self.sid

    @property
    def pattern(self) -> str:
        return self.spec.pattern

    @property
    def group(self) -> str | None:
        return self.spec.group

    @property
    def key(self) -> bytes:
        return b"l\x00" + self.tenant.encode() + b"\x00" + self.session.hex().encode() + b"\x00" + str(self.sid).encode()


@dataclass(eq=False)
class ClientConn:
    """One connected client session."""

    ident: bytes
    name: str
    tenant: str
    liveness: Liveness
    grant: ClientGrant | None = None          # None: the open tenant, everything allowed
    allowed_subjects: dict = field(default_factory=dict)   # subject -> may publish (cache)
    subs: dict[int, LocalSub] = field(default_factory=dict)
    outstanding: dict[int, tuple] = field(default_factory=dict)  # tag -> (stream key, seq, counter, sub, msg id)
    extended: dict[int, float] = field(default_factory=dict)     # tag -> ack deadline pushed out by in_progress
    next_tag: int = 1


@dataclass(eq=False)
class Peer:
    """Another agent: the outgoing link (our DEALER) and what we know of it."""

    agent_id: str
    endpoint: str
    dealer: Dealer | None
    name: str = ""
    source: str = "static"
    pubkey: str = ""                 # its CURVE server key (what we dial with)
    in_key: str = ""                 # the CURVE key its connection to us authenticated with
    out_tenants: frozenset = frozenset()   # tenants it proved on our link to it: we may send these
    in_tenants: frozenset = frozenset()    # tenants it proved on its link to us: we accept these
    hs_out: MembershipHandshake | None = None
    hs_in: MembershipHandshake | None = None
    up: bool = False                 # handshake complete on the current connection
    instance: str = ""
    inbound_instance: str = ""       # its instance as last seen on our ROUTER
    liveness: Liveness | None = None
    hello_at: float = 0.0
    dir_sent: dict = field(default_factory=dict)   # tenant -> version sent on this link
    rtt: float | None = None
    ping_at: float = 0.0


class Agent(DirectoryMixin, RequestMixin, MeshMixin, SemanticsMixin):
    """A meshq agent; `run()` serves until `stop()` (thread-safe) or a signal."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.tenants: dict[str, TenantSecret] = load_tenant_files(config.tenant_files)
        self.open = (not self.tenants) if config.open_tenant is None else config.open_tenant
        if DEFAULT_TENANT in self.tenants:
            raise MeshqError(f"the tenant name {DEFAULT_TENANT!r} is reserved for the open tenant")
        os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
        self.store = Store(os.path.join(config.data_dir, "store"), config.durability)
        self.beacon: KeyBeacon | None = None
        try:
            self._load_identity()
            curve_secret = _load_or_create_key(os.path.join(config.data_dir, "agent.key"))
            client_ep = config.client_endpoint or default_client_endpoint(config.data_dir)
            self.sockets = AgentSockets(self.agent_id.encode(), config.listen, client_ep, curve_secret)
        except BaseException:
            self.store.close()
            raise
        self.pubkey = self.sockets.curve_public
        self.instance = os.urandom(8).hex()
        self.advertise = config.advertise or _advertised(self.sockets.peer_endpoint)
        self.counters: dict[str, int] = {}
        self._rng = random.Random()
        self._stopping = False
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(self._stop_r, False)
        os.set_blocking(self._stop_w, False)
        self.sockets.watch_fd(self._stop_r)
        self.ready = threading.Event()
        self.peer_log = RateLimitedLog(log, interval=10.0)
        self._limiters: dict[str, RateLimiter | None] = {t: s.quotas.rate_limiter() for t, s in self.tenants.items()}
        self.tenant_counters: dict[str, dict[str, int]] = {}
        self._tenant_outbox: dict[str, list[int]] = {}   # tenant -> [messages, bytes]
        self._key_waits: dict[str, tuple[str, float]] = {}   # endpoint -> (source, next ask)
        try:
            self.beacon = KeyBeacon(self.sockets.peer_endpoint, pack({"v": env.PROTOCOL_VERSION, "id": self.agent_id, "pk": self.pubkey}))
            self.sockets.watch_fd(self.beacon.fileno())
        except OSError as e:
            log.warning("key beacon unavailable on %s (%s): agents must be given this agent's key", self.sockets.peer_endpoint, e)
        self._beacon_limiter = RateLimiter(200.0, 400)

        self.senders: dict[StreamKey, StreamSender] = {}
        self.inbound: dict[tuple[str, str, str], InboundStream] = {}
        self.peers: dict[str, Peer] = {}
        self._dials: dict[Dealer, Peer] = {}          # dealer -> peer (agent id may be unknown yet)
        self._dealer_peers: dict[Dealer, Peer] = {}   # lookup cache for linked peers (checked on use)
        self.clients: dict[bytes, ClientConn] = {}
        self.local_subs: dict[tuple[bytes, int], LocalSub] = {}
        self._local_index: dict[str, SubjectIndex] = {}
        self._dir_dirty = False
        self._dir_init()
        self._req_init()
        self._route_cache: dict[tuple[str, str], tuple] = {}
        self._local_cache: dict[tuple[str, str, str], list] = {}
        self._pubacks: list[tuple[bytes, list]] = []
        self._acks_due: set[tuple[str, str, str]] = set()
        self._touched: set[StreamKey] = set()
        self._next_timer = 0.0
        self._mesh_init()
        self._semantics_init()
        self._load_state()

    # ------------------------------------------------------------------ setup
    def _load_identity(self) -> None:
        raw = self.store.get_meta("id")
        if raw is None:
            raw = os.urandom(8).hex().encode()
            self.store.put_meta("id", raw)
            self.store.commit()
        self.agent_id = raw.decode()
        self.name = self.config.name or (self.store.get_meta("name") or b"").decode() or f"{socket.gethostname()}-{self.agent_id[:6]}"
        self.store.put_meta("name", self.name.encode(), durable=False)

    def _load_state(self) -> None:
        now = time.monotonic()
        next_seqs = {(t, p, l): v for t, p, l, v in self.store.seqs(SEQ_NEXT)}
        for stream, msgs, size in self.store.outbox_streams():
            first = next(self.store.outbox_records(stream, 0, include_value=False))[0]
            last_end = None
            for seq, count in self.store.outbox_records(stream, 0, include_value=False):
                last_end = seq + count
            nxt = max(next_seqs.get(tuple(stream), 1), last_end or 1)
            sender = self._new_sender(stream, nxt, first - 1)
            sender.pending_msgs = msgs
            self._outbox_add(stream.tenant, msgs, size)
        for (t, p, l), v in next_seqs.items():
            stream = StreamKey(t, p, l)
            if stream not in self.senders:
                self._new_sender(stream, v, v - 1)
        for t, p, l, w in self.store.seqs(SEQ_WATERMARK):
            self.inbound[(t, p, l)] = InboundStream(w)
        for key, value in self.store.scan(b"l\x00"):
            try:
                saved = unpack_header(value)
                spec = SubSpec.from_header(saved)
                sub = LocalSub(bytes.fromhex(saved["session"]), saved["sid"], saved["tenant"], spec, None,
                               float("inf") if spec.durable else now + self.config.client_grace)
            except (RemoteProtocolError, KeyError, ValueError, TypeError):
                self._count("store_bad_subscription")
                continue
            self._add_local_sub(sub)
        self._dir_load(now)

    def _new_sender(self, stream: StreamKey, next_seq: int, acked: int) -> StreamSender:
        sender = StreamSender(next_seq, acked, window_msgs=self.config.window_msgs,
                              ack_wait=self.config.ack_wait, rng=self._rng)
        self.senders[stream] = sender
        return sender

    # ------------------------------------------------------------------ running
    def run(self, on_ready: Callable[["Agent"], None] | None = None) -> None:
        """Serve until stopped; then flush and close everything."""
        for endpoint in self.config.peers:
            self.add_peer_endpoint(endpoint)
        for _key, value in self.store.scan(b"p\x00"):
            try:
                endpoint, pubkey = unpack_header(value)
                self.add_peer_endpoint(str(endpoint), source="store", pubkey=str(pubkey))
            except (RemoteProtocolError, ValueError, TypeError):
                self._count("store_bad_peer")
        self._mesh_start()
        self.ready.set()
        if on_ready:
            on_ready(self)
        try:
            while not self._stopping:
                self._turn()
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask the loop to finish (safe from any thread or a signal handler)."""
        self._stopping = True
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the agent gracefully."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def _turn(self) -> None:
        now = time.monotonic()
        timeout = max(0.0, min(self._next_timer - now, 0.5))
        if self._pubacks or self._acks_due or self.store.dirty:
            timeout = 0.0
        ready = self.sockets.poll(timeout)
        for obj in ready:
            if obj is self.sockets.clients:
                for frames in self.sockets.drain(obj):
                    self._guard(self._on_client_frames, frames, "client")
            elif obj is self.sockets.peers:
                for user, frames in self.sockets.drain_peers():
                    self._guard(self._on_peer_frames, frames, "peer", user)
            elif isinstance(obj, Dealer):
                for frames in self.sockets.drain(obj.sock):
                    self._guard(self._on_dealer_frames, frames, "link", obj)
            elif self.beacon is not None and obj == self.beacon.fileno():
                self._on_beacon(time.monotonic())
            elif obj == self._mesh_fd:
                self._on_discovery()
            elif obj == self._stop_r:
                try:
                    os.read(self._stop_r, 64)
                except OSError:
                    pass
        self._after_turn(time.monotonic())

    def _guard(self, handler, frames, where: str, *extra) -> None:
        """Run a frame handler; malformed input is dropped and counted, never raised."""
        try:
            handler(frames, *extra)
        except (MeshqError, UnicodeDecodeError) as e:
            self._count(f"dropped_{where}_frames")
            self.peer_log.warning(f"drop-{where}", "dropped a malformed %s frame: %s", where, e)
        except Exception:  # a bug here must not take the receive loop down
            self._count("internal_errors")
            log.exception("internal error handling a %s frame (dropped)", where)

    def _after_turn(self, now: float) -> None:
        for stream in self._touched:
            self.store.put_seq(SEQ_NEXT, stream.tenant, stream.dest, stream.lane, self.senders[stream].next_seq, durable=True)
        self._touched.clear()
        self._flush_acks()
        self.store.commit()
        self._pump(now)          # deliveries first: they are what end-to-end latency waits for
        if self._pubacks:
            for ident, header in self._pubacks:
                self.sockets.send(self.sockets.clients, [ident, Kind.PUBACK, pack(header)])
            self._pubacks.clear()
        if self._dir_dirty:
            self._announce()
        if self._dir_save:
            self._dir_save_now()
        if now >= self._next_timer:
            self._timers(now)
            self._next_timer = now + min(0.1, self.config.heartbeat_interval / 2)

    def _count(self, name: str, n: int = 1, tenant: str | None = None) -> None:
        if tenant is None:
            self.counters[name] = self.counters.get(name, 0) + n
        else:
            tc = self.tenant_counters.get(tenant)
            if tc is None:
                tc = self.tenant_counters[tenant] = {}
            tc[name] = tc.get(name, 0) + n

    def _outbox_add(self, tenant: str, msgs: int, size: int) -> None:
        box = self._tenant_outbox.get(tenant)
        if box is None:
            box = self._tenant_outbox[tenant] = [0, 0]
        box[0] += msgs
        box[1] += size

    # ------------------------------------------------------------------ clients
    def _on_client_frames(self, frames: list[bytes]) -> None:
        if len(frames) < 3:
            raise RemoteProtocolError("client frame too short")
        ident, kind = frames[0], frames[1]
        conn = self.clients.get(ident)
        if kind == Kind.HELLO:
            self._client_hello(ident, unpack_header(frames[2]))
            return
        if conn is None:
            if kind != Kind.BYE:
                self.sockets.send(self.sockets.clients, [ident, Kind.ERROR, pack({"code": "hello", "message": "say HELLO first"})])
                self._count("client_frames_before_hello")
            return
        conn.liveness.heard(time.monotonic())
        if kind == Kind.PUB:
            if len(frames) != 4:
                raise RemoteProtocolError("PUB needs header and payload")
            header = unpack_header(frames[2])
            if type(header) is not list or len(header) != 1 or type(header[0]) is not int:
                raise RemoteProtocolError("PUB header must be [batch_id]")
            try:
                items = unpack_items(frames[3])
            except RemoteProtocolError as e:
                self._pubacks.append((ident, [header[0], 0, [[0, len(frames[3]), "malformed", str(e), None]]]))
                raise
            self._accept(conn, header[0], items, len(frames[3]), frames[3])
        elif kind == Kind.ACK:
            self._client_ack(conn, unpack_header(frames[2]))
        elif kind == Kind.NACK:
            self._client_nack(conn, unpack_header(frames[2]))
        elif kind == Kind.SUB:
            self._client_sub(conn, unpack_header(frames[2]))
        elif kind == Kind.UNSUB:
            h = unpack_header(frames[2])
            sid = header_field(h, "sid", int)
            sub = conn.subs.pop(sid, None)
            if sub is not None:
                if sub.spec.durable is not None and not header_field(h, "delete", bool, False):
                    self._abandon(conn, lambda t: t[3] is sub)    # a durable only detaches
                    sub.conn = None
                    self._local_cache.clear()
                else:
                    self._remove_local_sub(sub)
        elif kind == Kind.IN_PROGRESS:
            self._client_in_progress(conn, unpack_header(frames[2]))
        elif kind == Kind.DLQ:
            self._client_dlq(conn, unpack_header(frames[2]))
        elif kind == Kind.HEARTBEAT:
            self.sockets.send(self.sockets.clients, [ident, Kind.HEARTBEAT, pack({"instance": self.instance})])
        elif kind == Kind.STATUS:
            self.sockets.send(self.sockets.clients, [ident, Kind.STATUSOK, pack(self.status(conn.tenant))])
        elif kind == Kind.REQ:
            self._client_req(conn, frames)
        elif kind == Kind.RESPOND:
            self._client_respond(conn, frames)
        elif kind == Kind.DIRQ:
            self.sockets.send(self.sockets.clients, [ident, Kind.DIRQOK, pack({}), pack(self.dir_listing(conn.tenant))])
        elif kind == Kind.BYE:
            self._drop_client(conn, graceful=True)
        else:
            raise RemoteProtocolError(f"unknown client frame kind {kind!r}")

    def _client_hello(self, ident: bytes, header: Any) -> None:
        name = header_field(header, "name", str, "")[:128]
        token = header_field(header, "token", (str, type(None)), None)
        try:
            grant, tenant = self._authenticate(token)
        except AuthorizationError as e:
            self._count("client_auth_failures")
            self.peer_log.warning("client-auth", "refused a client: %s", e)
            self.sockets.send(self.sockets.clients, [ident, Kind.ERROR, pack({"code": "auth", "message": str(e)})])
            return
        old = self.clients.get(ident)
        if old is not None:
            self._drop_client(old, graceful=False)
            if old.tenant != tenant:   # a session cannot change tenant: its old subscriptions end
                for sub in [s for s in self.local_subs.values() if s.session == ident]:
                    self._remove_local_sub(sub)
        now = time.monotonic()
        self.clients[ident] = ClientConn(ident, name, tenant, Liveness(now, self.config.client_timeout / 2, self.config.client_timeout), grant)
        self.sockets.send(self.sockets.clients, [ident, Kind.WELCOME, pack({
            "v": env.PROTOCOL_VERSION, "id": self.agent_id, "name": self.name, "instance": self.instance,
        })])
        self._count("client_sessions")

    def _authenticate(self, token: str | None) -> tuple[ClientGrant | None, str]:
        """The grant and tenant of a client credential (AuthorizationError if refused)."""
        if token is None:
            if not self.open:
                raise AuthorizationError("this agent requires credentials: pass creds= / --creds / MESHQ_CREDS")
            return None, DEFAULT_TENANT
        grant = verify_token(token, self.tenants, time.time())
        return grant, grant.tenant

    def _client_sub(self, conn: ClientConn, header: Any) -> None:
        sid = header_field(header, "sid", int)
        try:
            spec = SubSpec.from_header(header)
            if conn.grant is not None:
                conn.grant.check_subscribe(spec.pattern)
        except (BadSubjectError, BadFilterError, AuthorizationError) as e:
            code = "forbidden" if isinstance(e, AuthorizationError) else "bad-filter" if isinstance(e, BadFilterError) else "bad-subject"
            self._count("subscribe_refused", tenant=conn.tenant)
            self.sockets.send(self.sockets.clients, [conn.ident, Kind.SUBOK, pack({"sid": sid, "error": str(e), "code": code})])
            return
        if spec.durable is not None:
            self._durable_sub(conn, sid, spec)
            return
        existing = self.local_subs.get((conn.ident, sid))
        if existing is not None and existing.spec == spec:
            existing.conn = conn            # a reconnecting client re-attaches
            conn.subs[sid] = existing
            self._local_cache.clear()
        else:
            if existing is not None:
                self._remove_local_sub(existing)
            sub = LocalSub(conn.ident, sid, conn.tenant, spec, conn)
            conn.subs[sid] = sub
            self._add_local_sub(sub)
            self.store.put(sub.key, pack({"session": conn.ident.hex(), "sid": sid, "tenant": sub.tenant,
                                          **spec.to_dict()}), durable=True)
        self.sockets.send(self.sockets.clients, [conn.ident, Kind.SUBOK, pack({"sid": sid})])

    def _add_local_sub(self, sub: LocalSub) -> None:
        self.local_subs[(sub.session, sub.sid)] = sub
        self._local_index.setdefault(sub.tenant, SubjectIndex()).add(sub.pattern, sub)
        self._local_cache.clear()
        self._dir_dirty = True

    def _remove_local_sub(self, sub: LocalSub) -> None:
        if self.local_subs.pop((sub.session, sub.sid), None) is None:
            return
        self._local_index[sub.tenant].remove(sub.pattern, sub)
        self.store.delete(sub.key)
        self._local_cache.clear()
        self._dir_dirty = True
        if sub.conn is not None:
            self._abandon(sub.conn, lambda t: t[3] is sub)

    def _drop_client(self, conn: ClientConn, graceful: bool) -> None:
        """A client left: cleanly (its subscriptions end) or by silence (they wait, detached)."""
        self.clients.pop(conn.ident, None)
        self._abandon(conn, lambda t: True)
        now = time.monotonic()
        for sub in list(conn.subs.values()):
            if sub.spec.durable is not None:
                if sub.conn is conn:
                    sub.conn = None           # durables outlive their clients
                sub.detached_until = float("inf")
            elif graceful:
                self._remove_local_sub(sub)
            else:
                sub.conn = None
                sub.detached_until = now + self.config.client_grace
        self._local_cache.clear()

    def _abandon(self, conn: ClientConn, which) -> None:
        """Give back unacked deliveries; their producers are asked to resend them."""
        lowest: dict[tuple, int] = {}
        for tag in [t for t, v in conn.outstanding.items() if which(v)]:
            key, seq, _counter, sub, _mid = conn.outstanding.pop(tag)
            sub.inflight -= 1
            st = self.inbound.get(key)
            if st is not None:
                st.abandon(seq)
                if seq < lowest.get(key, seq + 1):
                    lowest[key] = seq
        for (tenant, producer, lane), seq in lowest.items():
            self._send_dnack(tenant, producer, lane, seq, 0.05)

    def _client_ack(self, conn: ClientConn, header: Any) -> None:
        if type(header) is not list:
            raise RemoteProtocolError("ACK header must be a list of tag ranges")
        pop = conn.outstanding.pop
        inbound = self.inbound
        acks_due = self._acks_due
        attempts = self._attempts
        last_key = st = None
        for rng in header:
            if type(rng) is not list or len(rng) != 2 or type(rng[0]) is not int or type(rng[1]) is not int:
                raise RemoteProtocolError("ACK range must be [first, last]")
            first, last = rng
            if last - first > 1_000_000:
                raise RemoteProtocolError("ACK range too large")
            for tag in range(first, last + 1):
                entry = pop(tag, None)
                if entry is None:
                    continue
                key, seq, counter, sub, _mid = entry
                sub.inflight -= 1
                if counter is not None:
                    counter[0] -= 1
                    if counter[0] > 0:
                        continue
                if key is not last_key:       # consecutive tags nearly always share one stream
                    last_key, st = key, inbound.get(key)
                    if st is not None:
                        acks_due.add(key)
                if st is not None:
                    st.finish(seq)
                if attempts:
                    attempts.pop((key, seq), None)

    def _client_nack(self, conn: ClientConn, header: Any) -> None:
        tags = header_field(header, "tags", list)
        delay = header_field(header, "delay", (int, float), 0)
        if not 0 <= delay <= 86400:
            raise RemoteProtocolError("NACK delay must be 0..86400 s")
        wanted = set()
        for rng in tags:
            if type(rng) is not list or len(rng) != 2 or type(rng[0]) is not int or type(rng[1]) is not int:
                raise RemoteProtocolError("NACK range must be [first, last]")
            wanted.update(range(rng[0], min(rng[1], rng[0] + 100_000) + 1))
        n = self._give_back(conn, sorted(wanted), float(delay), "nack")
        self._count("client_nacks", n)

    # ------------------------------------------------------------------ publishing
    def _quota_admit(self, conn: ClientConn, items: list, payload_bytes: int) -> tuple[int, list | None]:
        """How many of a batch's messages the tenant's quotas admit now, and the refusal for the rest."""
        secret = self.tenants.get(conn.tenant)
        n = len(items)
        if secret is None:
            return n, None
        q = secret.quotas
        box = self._tenant_outbox.get(conn.tenant, (0, 0))
        if box[0] + n > q.max_outbox_messages or box[1] + payload_bytes > q.max_outbox_bytes:
            return 0, ["quota", f"tenant {conn.tenant!r} outbox is full ({box[0]} messages, {box[1]} bytes)", 1.0]
        limiter = self._limiters.get(conn.tenant)
        if limiter is None:
            return n, None
        now = time.monotonic()
        k = min(n, int(limiter.available(now)))
        if k:
            limiter.try_acquire(k, now)
        if k == n:
            return n, None
        wait = limiter.delay_for(min(n - k, limiter.burst), now)
        return k, ["quota", f"tenant {conn.tenant!r} is over its publish rate of {q.publish_rate:g} msgs/s", round(wait, 3)]

    def _accept(self, conn: ClientConn, batch_id: int, items: list, payload_bytes: int = 0,
                raw: bytes | None = None) -> None:
        """Route a client's batch into outbox streams (written at the end of this turn).

        `raw` is the client's encoded payload of `items`; a stream that takes the whole
        batch stores and forwards those bytes as they are instead of re-encoding them.
        """
        tenant = conn.tenant
        admitted, refusal = self._quota_admit(conn, items, payload_bytes)
        if refusal is not None:
            self._count("quota_refused", len(items) - admitted, tenant=tenant)
        now_ms = int(time.time() * 1000)
        per_stream: dict[StreamKey, list] = {}
        rejects = []
        cache = self._route_cache
        grant = conn.grant
        allowed = conn.allowed_subjects
        secret = self.tenants.get(tenant)
        max_body = secret.quotas.max_message_bytes if secret is not None else None
        unrouted = expired = 0
        n_items = len(items)
        if (refusal is None and max_body is None and n_items and _one_subject_no_expiry(items)
                and not self._route_has_filters(tenant, items[0][1])):
            # hot path: one subject, nothing to check per message: route the batch once
            self._route_batch(conn, items, rejects, per_stream)
            if not per_stream and not rejects:
                unrouted = n_items
            items_loop = ()
        else:
            items_loop = items
        for i, item in enumerate(items_loop):
            if i >= admitted:
                _refuse(rejects, i, *refusal)
                continue
            subject = item[1]
            if grant is not None:
                ok = allowed.get(subject)
                if ok is None:
                    try:
                        ok = grant.may_publish(subject)
                    except BadSubjectError:
                        ok = True   # reported as bad-subject below
                    if len(allowed) > 10_000:
                        allowed.clear()
                    allowed[subject] = ok
                if not ok:
                    _refuse(rejects, i, "forbidden", f"not allowed to publish to {subject!r}")
                    continue
            if max_body is not None and len(item[5]) > max_body:
                _refuse(rejects, i, "quota", f"a message body exceeds the tenant's limit of {max_body} bytes")
                continue
            if item[2] is not None and (due := not_before_ms(item[2])) is not None and due > now_ms:
                try:
                    validate_subject(subject)
                except BadSubjectError as e:
                    _refuse(rejects, i, "bad-subject", str(e))
                    continue
                self._defer(tenant, item, due)     # routed when due (SemanticsMixin)
                continue
            route = cache.get((tenant, subject))
            if route is None:
                try:
                    validate_subject(subject)
                except BadSubjectError as e:
                    _refuse(rejects, i, "bad-subject", str(e))
                    continue
                route = self._compute_route(tenant, subject)
            expires = item[4]
            if expires is not None and expires <= now_ms:
                expired += 1
                continue
            plain, groups, filt = route
            if filt:
                plain, groups = self._filtered(tenant, item, route)
                if not plain and not groups:
                    continue        # every subscriber's filter said no: counted as filtered_out
            if not plain and not groups:
                unrouted += 1
                continue
            for stream in plain:
                lst = per_stream.get(stream)
                if lst is None:
                    per_stream[stream] = [item]
                else:
                    lst.append(item)
            for group, candidates in groups:
                stream = self._pick_member(tenant, group, candidates)
                per_stream.setdefault(stream, []).append(item)
        for stream, lst in per_stream.items():
            # a stream gets each item at most once, so a full-length list is the whole batch
            self._enqueue(stream, lst, raw if raw is not None and len(lst) == n_items else None)
        accepted = len(items) - sum(r[1] - r[0] + 1 for r in rejects)
        self._count("published", accepted, tenant=tenant)
        if accepted < len(items):
            self._count("publish_refused", len(items) - accepted, tenant=tenant)
        if unrouted:
            self._count("dropped_no_subscriber", unrouted, tenant=tenant)
        if expired:
            self._count("dropped_expired", expired, tenant=tenant)
        self._pubacks.append((conn.ident, [batch_id, accepted, rejects]))

    def _enqueue(self, stream: StreamKey, items: list, payload: bytes | None = None) -> None:
        """Append items (or their already encoded `payload`) to a stream's outbox as one record."""
        sender = self.senders.get(stream) or self._new_sender(stream, 1, 0)
        if payload is None:
            payload = pack(items)
        seq = sender.append(len(items), payload)
        self.store.outbox_put(stream, seq, len(items), payload)
        self._outbox_add(stream.tenant, len(items), len(payload))
        self._touched.add(stream)

    def _route_has_filters(self, tenant: str, subject: str) -> bool:
        """True when some subscription matching `subject` filters by headers (no batch fast path then)."""
        route = self._route_cache.get((tenant, subject))
        if route is None:
            try:
                validate_subject(subject)
            except BadSubjectError:
                return False      # _route_batch reports it
            route = self._compute_route(tenant, subject)
        return bool(route[2])

    def _route_batch(self, conn: ClientConn, items: list, rejects: list, per_stream: dict) -> None:
        """Route a batch whose items share one subject and have no expiry (see `_accept`)."""
        tenant = conn.tenant
        subject = items[0][1]
        if conn.grant is not None:
            ok = conn.allowed_subjects.get(subject)
            if ok is None:
                try:
                    ok = conn.grant.may_publish(subject)
                except BadSubjectError:
                    ok = True   # reported as bad-subject below
                if len(conn.allowed_subjects) > 10_000:
                    conn.allowed_subjects.clear()
                conn.allowed_subjects[subject] = ok
            if not ok:
                rejects.append([0, len(items) - 1, "forbidden", f"not allowed to publish to {subject!r}", None])
                return
        route = self._route_cache.get((tenant, subject))
        if route is None:
            try:
                validate_subject(subject)
            except BadSubjectError as e:
                rejects.append([0, len(items) - 1, "bad-subject", str(e), None])
                return
            route = self._compute_route(tenant, subject)
        plain, groups, _filtered = route     # the caller checked there are no filters
        for stream in plain:
            per_stream[stream] = items
        for group, candidates in groups:
            per_stream[self._pick_member(tenant, group, candidates)] = items

    def _compute_route(self, tenant: str, subject: str) -> tuple:
        """(plain streams, ((group, member streams), ...), filtered) for `subject`, from the directory (cached).

        Plain subscriptions go to lane "" of their agent, durable ones to lane "d:<durable>", queue
        groups to lane "g:<group>" (or "d:<durable>") of one member.  `filtered` holds destinations
        whose every subscription has a header filter: ("s", stream, filters) and
        ("g", group, members, per-member filters or None); `_filtered` evaluates them per message.
        """
        d = self._dirs.get(tenant)
        streams: dict[StreamKey, list | None] = {}          # None: some subscription takes everything
        groups: dict[str, dict[StreamKey, list | None]] = {}
        for e in (d.subscriptions_matching(subject) if d is not None else ()):
            v = e.value
            if v.queue is None:
                target = streams
                stream = StreamKey(tenant, e.origin, "d:" + v.durable if v.durable else "")
            else:
                target = groups.setdefault(v.queue, {})
                stream = StreamKey(tenant, e.origin, "d:" + v.durable if v.durable else "g:" + v.queue)
            if v.filter is None:
                target[stream] = None
            elif stream not in target:
                target[stream] = [v.parsed_filter]
            elif target[stream] is not None:
                target[stream].append(v.parsed_filter)
        plain = tuple(s for s in sorted(streams) if streams[s] is None)
        filt = [("s", s, tuple(streams[s])) for s in sorted(streams) if streams[s] is not None]
        grouped = []
        for g, members in sorted(groups.items()):
            cands = tuple(sorted(members))
            if all(members[c] is None for c in cands):
                grouped.append((g, cands))
            else:
                filt.append(("g", g, cands, tuple(None if members[c] is None else tuple(members[c]) for c in cands)))
        route = (plain, tuple(grouped), tuple(filt))
        if len(self._route_cache) > 10_000:
            self._route_cache.clear()
        self._route_cache[(tenant, subject)] = route
        return route

    def _filtered(self, tenant: str, item: list, route: tuple, count: bool = True) -> tuple[list, list]:
        """The plain streams and groups of `route` whose header filters take `item`; counts the rest as filtered_out."""
        plain, groups, filt = route
        plain, groups = list(plain), list(groups)
        headers = item[2]
        out = 0
        for f in filt:
            if f[0] == "s":
                if any(x.matches(headers) for x in f[2]):
                    plain.append(f[1])
                else:
                    out += 1
            else:
                members = tuple(c for c, fl in zip(f[2], f[3]) if fl is None or any(x.matches(headers) for x in fl))
                if members:
                    groups.append((f[1], members))
                else:
                    out += 1
        if out and count:
            self._count("filtered_out", out, tenant=tenant)
        return plain, groups

    def _pick_member(self, tenant: str, group: str, candidates: tuple) -> StreamKey:
        """Least outstanding first among the agents that have members of the group."""
        if len(candidates) == 1:
            return candidates[0]
        best, best_load = candidates[0], None
        for stream in candidates:
            sender = self.senders.get(stream)
            load = sender.pending_msgs if sender else 0
            peer = self.peers.get(stream.dest)
            if stream.dest != self.agent_id and (peer is None or not peer.up or tenant not in peer.out_tenants):
                load += 1 << 40   # reachable members first
            if best_load is None or load < best_load:
                best, best_load = stream, load
        return best

    # ------------------------------------------------------------------ sending
    def _pump(self, now: float) -> None:
        """Send what each stream's window allows."""
        for stream, sender in self.senders.items():
            if not sender.has_unsent:
                continue
            local = stream.dest == self.agent_id
            peer = None
            if not local:
                peer = self.peers.get(stream.dest)
                if peer is None or not peer.up or peer.dealer is None or stream.tenant not in peer.out_tenants:
                    continue
            records = sender.due(now, lambda seq, n, s=stream: self._load(s, seq, n))
            for rec in records:
                if local:
                    self._on_deliver(self.agent_id, stream.tenant, stream.lane, rec.seq, rec.attempt,
                                     unpack_items(rec.payload), rec.payload)
                else:
                    ok = self.sockets.send(peer.dealer.sock, [Kind.DELIVER, pack([stream.tenant, stream.lane, rec.seq, rec.attempt]), rec.payload])
                    if not ok:
                        sender.rewind(now)
                        self._count("send_failures")
                        break
                    self._count("delivered_out", rec.count, tenant=stream.tenant)
            if records and local:
                self._flush_acks()

    def _load(self, stream: StreamKey, from_seq: int, max_msgs: int) -> list:
        out, total = [], 0
        for seq, count, payload in self.store.outbox_records(stream, from_seq):
            out.append((seq, count, payload))
            total += count
            if total >= max_msgs or len(out) >= 64:
                break
        return out

    def _on_ack(self, stream: StreamKey, through: int, now: float) -> None:
        sender = self.senders.get(stream)
        if sender is None:
            return
        before = sender.pending_msgs
        freed = 0
        for seq, count, size in sender.on_ack(through, now):
            self.store.outbox_delete(stream, seq, count)
            freed += size
        self._outbox_add(stream.tenant, sender.pending_msgs - before, -freed)

    def _ack_from_store(self, stream: StreamKey, through: int, now: float) -> None:
        """Delete every stored record a receiver's watermark covers (after a restart on either side)."""
        sender = self.senders.get(stream)
        if sender is None:
            return
        freed = 0
        for seq, count, size in self.store.outbox_record_sizes(stream):
            if seq + count - 1 > through:
                break
            self.store.outbox_delete(stream, seq, count)
            freed += size
        before = sender.pending_msgs
        sender.on_ack(through, now)
        self._outbox_add(stream.tenant, sender.pending_msgs - before, -freed)

    # ------------------------------------------------------------------ receiving
    def _on_deliver(self, producer: str, tenant: str, lane: str, first_seq: int, attempt: int, items: list,
                    raw: bytes | None = None) -> None:
        key = (tenant, producer, lane)
        st = self.inbound.get(key)
        if st is None:
            st = self.inbound[key] = InboundStream(0)
        if items and self._deliver_whole(key, st, lane, first_seq, attempt, items, raw):
            return
        now_ms = int(time.time() * 1000)
        batches: dict[LocalSub, list] = {}
        hold = None
        dups = dropped = 0
        dead = self._dead
        for i, item in enumerate(items):
            seq = first_seq + i
            if not st.is_new(seq):
                dups += 1
                continue
            if dead and (key, seq) in dead:
                self._dead_letter(key, seq, item, dead.pop((key, seq)))
                st.finish(seq)
                continue
            expires = item[4]
            if expires is not None and expires <= now_ms:
                st.finish(seq)
                if expires != TOMBSTONE_EXPIRY:
                    self._count("dropped_expired", tenant=tenant)
                continue
            targets = self._local_targets(tenant, lane, item[1])
            if targets is None:
                hold = seq
                break
            if targets and self._filters_local: targets = [t for t in targets if self._filter_accepts(t, item)]  # noqa: E701
            if not targets:
                st.finish(seq)
                dropped += 1
                continue
            st.start(seq)
            counter = [len(targets)] if len(targets) > 1 else None
            for sub in targets:
                sub.inflight += 1
                lst = batches.get(sub)
                if lst is None:
                    batches[sub] = [(seq, counter, item)]
                else:
                    lst.append((seq, counter, item))
        redelivered = attempt > 1
        now = time.monotonic()
        for sub, lst in batches.items():
            conn = sub.conn
            first_tag = conn.next_tag
            conn.next_tag += len(lst)
            out = conn.outstanding
            tag = first_tag
            for seq, counter, item in lst:
                out[tag] = (key, seq, counter, sub, item[0])
                tag += 1
            sub.delivered += len(lst)
            self._track(conn, sub, first_tag, tag - 1, now)
            self.sockets.send(self.sockets.clients, [conn.ident, Kind.MSG, pack([sub.csid, first_tag, redelivered]),
                                                     pack([x[2] for x in lst])])
        if dups:
            self._count("duplicates_dropped", dups)
        if dropped:
            self._count("dropped_no_subscriber", dropped)
        if hold is not None:
            self._count("held")
            self._send_dnack(tenant, producer, lane, hold, self._hold_delay(lane))
        self._acks_due.add(key)

    def _deliver_whole(self, key: tuple, st: InboundStream, lane: str, first_seq: int, attempt: int,
                       items: list, raw: bytes | None) -> bool:
        """Hot path of `_on_deliver`: a record of new messages, one subject, no expiry, one
        local consumer takes all of it.  Hands the record over as is (the producer's
        encoded payload when given) and returns True; False: take the per-message path."""
        n = len(items)
        seqs = range(first_seq, first_seq + n)
        if (first_seq <= st.watermark or self._dead or self._filters_local or not st.all_new(seqs)
                or not _one_subject_no_expiry(items)):
            return False
        tenant, subject = key[0], items[0][1]
        targets = self._local_targets(tenant, lane, subject)
        if not targets or len(targets) != 1 or (lane != "" and len(self._local_cache.get((tenant, lane, subject), ())) != 1):
            return False
        sub = targets[0]
        conn = sub.conn
        st.start_range(seqs)
        sub.inflight += n
        sub.delivered += n
        first_tag = conn.next_tag
        conn.next_tag += n
        conn.outstanding.update(zip(range(first_tag, first_tag + n),
                                    [(key, seq, None, sub, item[0]) for seq, item in zip(seqs, items)]))
        self._track(conn, sub, first_tag, first_tag + n - 1, time.monotonic())
        self.sockets.send(self.sockets.clients, [conn.ident, Kind.MSG, pack([sub.csid, first_tag, attempt > 1]),
                                                 raw if raw is not None else pack(items)])
        self._acks_due.add(key)
        return True

    def _local_targets(self, tenant: str, lane: str, subject: str) -> list | None:
        """Local subscriptions for a message on `lane`; None when one of them is away (hold)."""
        ck = (tenant, lane, subject)
        subs = self._local_cache.get(ck)
        if subs is None:
            index = self._local_index.get(tenant)
            matched = index.match(subject) if index is not None else set()
            if lane == "":
                subs = sorted((s for s in matched if s.group is None and s.spec.durable is None),
                              key=lambda s: (s.session, s.sid))
            elif lane.startswith("g:"):
                subs = [s for s in matched if s.group == lane[2:]]
            elif lane.startswith("d:"):
                subs = [s for s in matched if s.spec.durable == lane[2:]]
            else:
                subs = []
            if len(self._local_cache) > 10_000:
                self._local_cache.clear()
            self._local_cache[ck] = subs
        if lane == "":
            for s in subs:
                if s.conn is None:
                    return None
            return subs
        if not subs:
            return subs
        live = [s for s in subs if s.conn is not None]
        if not live:
            return None
        return [min(live, key=lambda s: s.inflight)]

    def _flush_acks(self) -> None:
        for key in self._acks_due:
            st = self.inbound.get(key)
            if st is None or not st.ack_due:
                continue
            tenant, producer, lane = key
            st.acked_sent = st.watermark
            self.store.put_seq(SEQ_WATERMARK, tenant, producer, lane, st.watermark)
            if producer == self.agent_id:
                self._on_ack(StreamKey(tenant, self.agent_id, lane), st.watermark, time.monotonic())
            else:
                self.sockets.send(self.sockets.peers, [producer.encode(), Kind.DACK, pack([tenant, lane, st.watermark])])
        self._acks_due.clear()

    def _send_dnack(self, tenant: str, producer: str, lane: str, seq: int, delay: float) -> None:
        if producer == self.agent_id:
            sender = self.senders.get(StreamKey(tenant, self.agent_id, lane))
            if sender is not None:
                sender.on_nack(seq, delay, time.monotonic())
        else:
            self.sockets.send(self.sockets.peers, [producer.encode(), Kind.DNACK, pack([tenant, lane, seq, int(delay * 1000)])])

    # ------------------------------------------------------------------ peers
    def add_peer_endpoint(self, endpoint: str, source: str = "static", pubkey: str | None = None) -> None:
        """Link to the agent at `endpoint`; without its CURVE key, ask its key beacon first."""
        if endpoint in (self.advertise, self.sockets.peer_endpoint) or pubkey == self.pubkey:
            return
        if pubkey:
            self._pubkeys[endpoint] = pubkey
        for peer in list(self.peers.values()) + list(self._dials.values()):
            if peer.endpoint == endpoint:
                return
        if not pubkey:
            self._key_waits.setdefault(endpoint, (source, 0.0))
            return
        self._key_waits.pop(endpoint, None)
        peer = Peer("", endpoint, self.sockets.dial(endpoint, pubkey), source=source, pubkey=pubkey)
        self._dials[peer.dealer] = peer
        self._send_hello(peer, time.monotonic())

    def _on_beacon(self, now: float) -> None:
        """Answer key queries (rate-limited) and dial the agents whose keys came back."""
        answers = self.beacon.serve(lambda: self._beacon_limiter.try_acquire(1, now))
        for endpoint, data in answers:
            waiting = self._key_waits.get(endpoint)
            if waiting is None:
                continue
            try:
                h = unpack_header(data)
                agent_id = header_field(h, "id", str)
                pubkey = header_field(h, "pk", str)
                if len(pubkey) != 40:
                    raise RemoteProtocolError("key beacon answered with a malformed key")
            except RemoteProtocolError:
                self._count("bad_key_answers")
                continue
            if agent_id == self.agent_id:
                self._key_waits.pop(endpoint, None)
                continue
            self.add_peer_endpoint(endpoint, waiting[0], pubkey)

    def _ask_keys(self, now: float) -> None:
        if self.beacon is None:
            return
        for endpoint, (source, next_at) in list(self._key_waits.items()):
            if now >= next_at:
                self.beacon.ask(endpoint)
                self._key_waits[endpoint] = (source, now + 0.5)

    def _send_hello(self, peer: Peer, now: float) -> None:
        """Start (or restart) the handshake on our link to `peer`."""
        peer.hello_at = now
        peer.up = False
        if peer.dealer is None:
            return
        peer.hs_out = MembershipHandshake(self.tenants, self.pubkey, peer.pubkey)
        self.sockets.send(peer.dealer.sock, [Kind.HELLO, pack({
            "v": env.PROTOCOL_VERSION, "id": self.agent_id, "name": self.name, "pk": self.pubkey,
            "endpoint": self.advertise, "instance": self.instance, "open": self.open,
            "member": peer.hs_out.start(),
        })])

    def _on_peer_frames(self, frames: list[bytes], user: str) -> None:
        """Frames another agent sent to our ROUTER over its DEALER; `user` is its CURVE key."""
        if len(frames) < 3:
            raise RemoteProtocolError("peer frame too short")
        ident, kind = frames[0], frames[1]
        origin = ident.decode("ascii")
        now = time.monotonic()
        if kind == Kind.HELLO:
            self._peer_hello(ident, user, unpack_header(frames[2]), now)
            return
        peer = self.peers.get(origin)
        if peer is None or not peer.inbound_instance:
            self.sockets.send(self.sockets.peers, [ident, Kind.ERROR, pack({"code": "hello", "message": "say HELLO first"})])
            self._count("peer_frames_before_hello")
            return
        if user != peer.in_key:
            # another key speaking under this agent's routing id: never believe what it says
            self._count("dropped_wrong_key")
            self.peer_log.warning(f"key-{origin}", "frame for agent %s from a key it did not authenticate with", origin)
            self.sockets.send(self.sockets.peers, [ident, Kind.ERROR, pack({"code": "hello", "message": "say HELLO again"})])
            return
        if peer.liveness is not None:
            peer.liveness.heard(now)
        if kind == Kind.DELIVER:
            if len(frames) != 4:
                raise RemoteProtocolError("DELIVER needs header and payload")
            h = unpack_header(frames[2])
            if (type(h) is not list or len(h) != 4 or type(h[0]) is not str or type(h[1]) is not str
                    or type(h[2]) is not int or type(h[3]) is not int or h[2] < 1):
                raise RemoteProtocolError("DELIVER header must be [tenant, lane, seq, attempt]")
            tenant, lane, seq, attempt = h
            if tenant not in peer.in_tenants:
                self._count("dropped_unproven_tenant")
                return
            items = unpack_items(frames[3])
            self._count("delivered_in", len(items), tenant=tenant)
            self._on_deliver(origin, tenant, lane, seq, attempt, items, frames[3])
        elif kind == Kind.HEARTBEAT:
            h = unpack_header(frames[2])
            self.sockets.send(self.sockets.peers, [ident, Kind.HEARTBEAT, pack({"instance": self.instance, "t": header_field(h, "t", float, 0.0)})])
        elif kind == Kind.DIR:
            if len(frames) != 4:
                raise RemoteProtocolError("DIR needs header and body")
            self._on_dir(peer, unpack_header(frames[2]), frames[3])
        elif kind == Kind.PEER_REPLY:
            self._on_peer_reply(peer, frames)
        elif kind == Kind.PROOF:
            self._peer_proof(peer, unpack_header(frames[2]), now)
        elif kind == Kind.BYE:
            peer.inbound_instance = ""
            self.peer_table.goodbye(origin)
        elif kind in (Kind.PEERS, Kind.PROBE):
            self._mesh_router_frame(ident, peer, kind, unpack_header(frames[2]), now)
        else:
            raise RemoteProtocolError(f"unknown peer frame kind {kind!r}")

    def _peer_hello(self, ident: bytes, user: str, h: Any, now: float) -> None:
        """An agent dialled us: answer its membership challenge and dial it back."""
        agent_id = header_field(h, "id", str)
        if agent_id.encode() != ident or agent_id == self.agent_id or not 0 < len(agent_id) <= 64:
            raise RemoteProtocolError("HELLO id does not match the connection's identity")
        pubkey = header_field(h, "pk", str)
        if not user or pubkey != user:
            raise RemoteProtocolError("HELLO key does not match the key the connection authenticated with")
        endpoint = header_field(h, "endpoint", str)
        instance = header_field(h, "instance", str)
        member = header_field(h, "member", dict)
        peer = self.peers.get(agent_id)
        if peer is None:
            peer = self._adopt(agent_id, endpoint, "peer", pubkey)
        peer.name = header_field(h, "name", str, "")[:128]
        peer.inbound_instance = instance
        peer.in_key = user
        peer.hs_in = MembershipHandshake(self.tenants, self.pubkey, user)
        reply, _ = peer.hs_in.receive(member, now)
        both_open = self.open and header_field(h, "open", bool, False)
        peer.in_tenants = frozenset({DEFAULT_TENANT}) if both_open else frozenset()
        if peer.liveness is None:
            peer.liveness = self.peer_table.liveness_for(agent_id, now)
        peer.liveness.heard(now)
        if (peer.endpoint != endpoint or peer.pubkey != pubkey) and peer.dealer is not None:
            # it came back on another address or key: re-dial there
            self.sockets.hang_up(peer.dealer)
            peer.endpoint, peer.pubkey = endpoint, pubkey
            peer.dealer = self.sockets.dial(endpoint, pubkey)
            self._send_hello(peer, now)
        self.sockets.send(self.sockets.peers, [ident, Kind.WELCOME, pack({
            "v": env.PROTOCOL_VERSION, "id": self.agent_id, "name": self.name,
            "instance": self.instance, "open": self.open, "member": reply,
        })])

    def _peer_proof(self, peer: Peer, h: Any, now: float) -> None:
        """The dialling agent proved its tenants: accept their traffic, tell it our watermarks."""
        if peer.hs_in is None or peer.hs_in.done:
            raise RemoteProtocolError("PROOF without a pending handshake")
        try:
            _, proven = peer.hs_in.receive(h, now)
        except AuthorizationError as e:
            self._count("membership_failures")
            self.peer_log.warning(f"member-{peer.agent_id}", "agent %s failed to prove membership: %s", peer.agent_id, e)
            peer.inbound_instance = ""
            return
        peer.in_tenants = peer.in_tenants | (proven or frozenset())
        marks = [[t, l, st.watermark] for (t, p, l), st in self.inbound.items()
                 if p == peer.agent_id and t in peer.in_tenants]
        self.sockets.send(self.sockets.peers, [peer.agent_id.encode(), Kind.MARKS, pack({"marks": marks})])

    def _adopt(self, agent_id: str, endpoint: str, source: str, pubkey: str) -> Peer:
        """Start a link to an agent that introduced itself."""
        dealer = None
        for d, p in list(self._dials.items()):
            if p.endpoint == endpoint and p.pubkey == pubkey:
                dealer = d
                del self._dials[d]
        peer = Peer(agent_id, endpoint, dealer or self.sockets.dial(endpoint, pubkey), source=source, pubkey=pubkey)
        self.peers[agent_id] = peer
        self._key_waits.pop(endpoint, None)
        self._send_hello(peer, time.monotonic())
        return peer

    def _on_dealer_frames(self, frames: list[bytes], dealer: Dealer) -> None:
        """Frames a remote agent sent back on our DEALER to it."""
        if len(frames) < 2:
            raise RemoteProtocolError("link frame too short")
        kind, h = frames[0], unpack_header(frames[1])
        now = time.monotonic()
        peer = self._dials.get(dealer)
        if peer is None:
            peer = self._dealer_peers.get(dealer)
            if peer is None or peer.dealer is not dealer or self.peers.get(peer.agent_id) is not peer:
                peer = next((p for p in self.peers.values() if p.dealer is dealer), None)
                if peer is not None:
                    if len(self._dealer_peers) > 1000:
                        self._dealer_peers.clear()
                    self._dealer_peers[dealer] = peer
        if peer is None:
            return
        if kind == Kind.WELCOME:
            self._welcomed(peer, dealer, h, now)
            return
        if peer.liveness is not None:
            peer.liveness.heard(now)
        if kind == Kind.DACK:
            if type(h) is not list or len(h) != 3 or type(h[2]) is not int:
                raise RemoteProtocolError("DACK must be [tenant, lane, through]")
            if h[0] in peer.out_tenants:
                self._on_ack(StreamKey(h[0], peer.agent_id, h[1]), h[2], now)
        elif kind == Kind.DNACK:
            if (type(h) is not list or len(h) not in (4, 5) or type(h[2]) is not int or type(h[3]) is not int
                    or (len(h) == 5 and h[4] != "elsewhere")):
                raise RemoteProtocolError("DNACK must be [tenant, lane, seq, delay_ms(, \"elsewhere\")]")
            stream = StreamKey(h[0], peer.agent_id, h[1])
            sender = self.senders.get(stream)
            if sender is not None and h[0] in peer.out_tenants:
                if len(h) == 5 and type(h[1]) is str and h[1].startswith("g:"):
                    self._reroute_one(stream, h[2], now)   # ack wait passed there: try another member's agent
                sender.on_nack(h[2], h[3] / 1000, now)
        elif kind == Kind.MARKS:
            self._linked(peer, header_field(h, "marks", list), now)
        elif kind == Kind.HEARTBEAT:
            instance = header_field(h, "instance", str)
            sent = header_field(h, "t", float, 0.0)
            if sent:
                peer.rtt = max(0.0, now - sent)
            if peer.up and instance != peer.instance:
                self._send_hello(peer, now)     # it restarted: introduce ourselves again
        elif kind == Kind.ERROR:
            if header_field(h, "code", str, "") == "hello":
                peer.up = False
                if now - peer.hello_at > 0.2:
                    self._send_hello(peer, now)
        elif kind == Kind.PROBE_ACK:
            self._mesh_probe_ack(h, now)
        else:
            raise RemoteProtocolError(f"unknown link frame kind {kind!r}")

    def _welcomed(self, peer: Peer, dealer: Dealer, h: Any, now: float) -> None:
        """The agent we dialled answered our challenge: check its proofs, send ours."""
        agent_id = header_field(h, "id", str)
        if agent_id == self.agent_id:     # dialled ourselves (e.g. a seed list with our own address)
            self._dials.pop(dealer, None)
            self.sockets.hang_up(dealer)
            return
        if not 0 < len(agent_id) <= 64 or "\x00" in agent_id:
            raise RemoteProtocolError("WELCOME carries a malformed agent id")
        if peer.hs_out is None or peer.hs_out.done:
            raise RemoteProtocolError("WELCOME without a pending handshake")
        try:
            proof, proven = peer.hs_out.receive(header_field(h, "member", dict), now)
        except AuthorizationError as e:
            self._count("membership_failures")
            self.peer_log.warning(f"member-{agent_id}", "agent %s at %s failed to prove membership: %s", agent_id, peer.endpoint, e)
            return
        if peer.agent_id == "":
            self._dials.pop(dealer, None)
            known = self.peers.get(agent_id)
            if known is not None:
                if known.dealer is not None and known.dealer is not dealer:
                    self.sockets.hang_up(known.dealer)
                known.dealer, known.endpoint, known.pubkey = dealer, peer.endpoint, peer.pubkey
                known.hs_out = peer.hs_out
                peer = known
            else:
                peer.agent_id = agent_id
                self.peers[agent_id] = peer
        both_open = self.open and header_field(h, "open", bool, False)
        peer.out_tenants = frozenset(proven or ()) | ({DEFAULT_TENANT} if both_open else frozenset())
        peer.name = header_field(h, "name", str, "")[:128]
        peer.instance = header_field(h, "instance", str)
        self.sockets.send(dealer.sock, [Kind.PROOF, pack(proof)])

    def _linked(self, peer: Peer, marks: list, now: float) -> None:
        """Handshake complete both ways: resend from the receiver's watermarks, share the directory."""
        if peer.agent_id == "" or peer.hs_out is None or not peer.hs_out.done:
            raise RemoteProtocolError("MARKS before the handshake completed")
        peer.up = True
        peer.dir_sent = {}
        self.store.put(b"p\x00" + peer.agent_id.encode(), pack([peer.endpoint, peer.pubkey]))
        if peer.liveness is None:
            peer.liveness = self.peer_table.liveness_for(peer.agent_id, now)
        peer.liveness.heard(now)
        for mark in marks[:100_000]:
            if (type(mark) is list and len(mark) == 3 and type(mark[0]) is str and type(mark[1]) is str
                    and type(mark[2]) is int and mark[0] in peer.out_tenants):
                self._ack_from_store(StreamKey(mark[0], peer.agent_id, mark[1]), mark[2], now)
        for stream, sender in self.senders.items():
            if stream.dest == peer.agent_id:
                sender.rewind(now, 0.0)
        self._route_cache.clear()
        self._dir_linked(peer)
        self._mesh_linked(peer, now)
        log.info("linked to %s (%s) at %s", peer.name, peer.agent_id, peer.endpoint)

    # ------------------------------------------------------------------ directory (see _dirsync)
    def served_tenants(self) -> set[str]:
        """The tenants this agent serves."""
        return set(self.tenants) | ({DEFAULT_TENANT} if self.open else set())

    # ------------------------------------------------------------------ timers
    def _timers(self, now: float) -> None:
        self._ask_keys(now)
        died = self._mesh_tick(now)
        hb_due = now - getattr(self, "_last_hb", 0.0) >= self.config.heartbeat_interval
        if hb_due:
            self._last_hb = now
        for peer in list(self._dials.values()) + list(self.peers.values()):
            if peer.dealer is None:
                continue
            if not peer.up:
                if now - peer.hello_at > max(0.5, self.config.heartbeat_interval):
                    self._send_hello(peer, now)
            elif hb_due:
                self.sockets.send(peer.dealer.sock, [Kind.HEARTBEAT, pack({"instance": self.instance, "t": now})])
            if peer.up and peer.liveness is not None and peer.liveness.state(now) == "dead":
                peer.up = False
                self._count("peer_deaths")
                log.warning("peer %s (%s) is not answering", peer.name, peer.agent_id)
                for stream, sender in self.senders.items():
                    if stream.dest == peer.agent_id:
                        sender.rewind(now, 0.0)
                self._route_cache.clear()
        self._mesh_dead(died, now)
        self._dir_timers(now)
        self._req_timers(now)
        for sender in self.senders.values():
            sender.check_timeout(now)
        self._ack_timers(now)
        self._release_delayed(int(time.time() * 1000))
        self._sweep_outboxes(now)
        for conn in list(self.clients.values()):
            if conn.liveness.state(now) == "dead":
                self._count("client_timeouts")
                self._drop_client(conn, graceful=False)
        for sub in [s for s in self.local_subs.values() if s.conn is None and s.detached_until < now]:
            self._remove_local_sub(sub)

    # ------------------------------------------------------------------ status and shutdown
    def outbox_depth(self) -> int:
        return sum(max(0, s.pending_msgs) for s in self.senders.values())

    def status(self, tenant: str | None = None) -> dict:
        """A snapshot of the agent for `meshq status`, as a client of `tenant` may see it."""
        now = time.monotonic()
        tenant = DEFAULT_TENANT if tenant is None else tenant
        box = self._tenant_outbox.get(tenant, (0, 0))
        return {
            "name": self.name, "id": self.agent_id, "instance": self.instance,
            "version": env.PROTOCOL_VERSION, "pubkey": self.pubkey,
            "endpoints": {"peer": self.sockets.peer_endpoint, "advertise": self.advertise,
                          "client": self.sockets.client_endpoint},
            "durability": self.store.durability,
            "peers": [{
                "id": p.agent_id, "name": p.name, "endpoint": p.endpoint, "source": p.source,
                "state": ("alive" if p.up else "connecting") if p.liveness is None or not p.up else p.liveness.state(now),
                "last_heard": None if p.liveness is None else round(now - p.liveness.last_heard, 3),
                "rtt_ms": None if p.rtt is None else round(p.rtt * 1000, 3),
                "subscriptions": self.dir_subscriptions(tenant, p.agent_id),
                "serves_tenant": tenant in p.out_tenants,
            } for p in sorted(self.peers.values(), key=lambda p: p.agent_id)],
            "tenant": tenant,
            "outbox": {"messages": max(0, box[0]), "bytes": max(0, box[1]),
                       "streams": sum(1 for k, s in self.senders.items() if s.pending_msgs > 0 and k.tenant == tenant)},
            "clients": sum(1 for c in self.clients.values() if c.tenant == tenant),
            "subscriptions": sum(1 for s in self.local_subs.values() if s.tenant == tenant),
            "counters": dict(sorted({**self.counters, **self.tenant_counters.get(tenant, {})}.items())),
            **self.mesh_status(now),
        }

    def _shutdown(self) -> None:
        """Flush and close: commit, tell peers and clients, close sockets and the store."""
        try:
            self._flush_acks()
            self.store.commit()
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and any(
                    s.has_unsent or not s.idle for k, s in self.senders.items()
                    if k.dest != self.agent_id and (p := self.peers.get(k.dest)) is not None and p.up):
                ready = self.sockets.poll(0.05)
                for obj in ready:
                    if isinstance(obj, Dealer):
                        for frames in self.sockets.drain(obj.sock):
                            self._guard(self._on_dealer_frames, frames, "link", obj)
                self.store.commit()
                self._pump(time.monotonic())
            for peer in self.peers.values():
                if peer.dealer is not None:
                    self.sockets.send(peer.dealer.sock, [Kind.BYE, pack({})])
            self.store.commit()
        finally:
            self.sockets.close()
            if self.beacon is not None:
                self.beacon.close()
            self._mesh_close()
            self.store.close()
            os.close(self._stop_r)
            os.close(self._stop_w)


def _one_subject_no_expiry(items: list) -> bool:
    """True when every item of a batch has the first item's subject, no expiry and no headers."""
    subject = items[0][1]
    for item in items:
        if item[1] != subject or item[4] is not None or item[2]:
            return False
    return True


def _refuse(rejects: list, index: int, code: str, text: str, retry_after: float | None = None) -> None:
    """Record that item `index` of a batch was refused; runs of the same refusal share one entry."""
    if rejects:
        last = rejects[-1]
        if last[1] == index - 1 and last[2] == code and last[3] == text:
            last[1] = index
            return
    rejects.append([index, index, code, text, retry_after])


def _load_or_create_key(path: str) -> str:
    """This agent's CURVE secret key (Z85), created on first start in a 0600 file."""
    try:
        with open(path, encoding="ascii") as f:
            secret = f.read().strip()
        if len(secret) != 40:
            raise MeshqError(f"{path} does not hold a CURVE secret key; move it away to make a new one")
        if os.stat(path).st_mode & 0o077:
            raise MeshqError(f"{path} is readable by others; run: chmod 600 {path}")
        return secret
    except FileNotFoundError:
        pass
    _public, secret = curve_keypair()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secret + "\n")
        f.flush()
        os.fsync(f.fileno())
    return secret


def _advertised(endpoint: str) -> str:
    """The endpoint others should dial: a wildcard bind becomes this host's address."""
    if "://0.0.0.0:" in endpoint or "://*:" in endpoint:
        port = endpoint.rsplit(":", 1)[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect(("10.255.255.255", 1))  # no packet is sent; this only picks a source address
                ip = s.getsockname()[0]
        except OSError:
            ip = "127.0.0.1"
        return f"tcp://{ip}:{port}"
    return endpoint
