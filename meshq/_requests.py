"""Request/reply in the agent: requests ride the outbox like messages, replies take a direct path.

`RequestMixin` is mixed into `Agent`.

* A client sends ``REQ [req_id, timeout_ms]`` with one message item (its ttl is the timeout).
  The agent looks the subject up in the directory: when no subscription of a *reachable* agent
  (this one, or a linked live one that proved the tenant) matches, the client is told
  ``no-responders`` at once.  Otherwise the agent stamps the reply address header
  ``_reply = <agent id>.<session hex>.<req_id>``, remembers the pending request, and accepts the
  item like a publish (outbox, routing, queue groups, filters).  Responders are subscriptions
  (usually made with ``serve()``, a queue group, so exactly one member gets each request).
* The responder's client sends ``RESPOND {"to": address}`` with one reply item.  Its agent sends
  it straight to the requesting agent (``PEER_REPLY`` on the link, only for a tenant the link
  proved) or, when local, straight to the client.  Replies are not durable: no outbox, no retry;
  a lost reply is a timeout for the requester.
* The requesting agent forwards only the first reply of a request it still has pending, and only
  to the session of the same tenant that asked; later replies and unknown ones are dropped and
  counted.  The pending entry goes when its timeout passes.
"""

from __future__ import annotations

import time
from typing import Any

from ._envelope import Kind, header_field, pack, unpack_header, unpack_items
from ._errors import BadSubjectError, RemoteProtocolError
from ._subject import validate_subject

REPLY_HEADER = "_reply"
MAX_PENDING_REQUESTS = 100_000
MAX_REQUEST_TIMEOUT_MS = 3_600_000


def reply_address(agent_id: str, session: bytes, req_id: int) -> str:
    """The reply address stamped on a request."""
    return f"{agent_id}.{session.hex()}.{req_id}"


def parse_reply_address(text: Any) -> tuple[str, str, int]:
    """(agent id, session hex, request id) of a reply address (RemoteProtocolError if malformed)."""
    if type(text) is not str or len(text) > 256:
        raise RemoteProtocolError("reply address must be a short string")
    parts = text.split(".")
    if len(parts) != 3 or not parts[0] or not parts[2].isdigit() or len(parts[2]) > 19:
        raise RemoteProtocolError("reply address must be <agent>.<session>.<request id>")
    try:
        bytes.fromhex(parts[1])
    except ValueError:
        raise RemoteProtocolError("reply address session is not hex") from None
    return parts[0], parts[1], int(parts[2])


class RequestMixin:
    """Requests and replies for `Agent` (see module doc)."""

    def _req_init(self) -> None:
        self._pending_reqs: dict[tuple[bytes, int], tuple[str, float]] = {}   # (session, id) -> (tenant, deadline)
        self._next_req_purge = 0.0

    def _reachable(self, tenant: str, dest: str) -> bool:
        if dest == self.agent_id:
            return True
        peer = self.peers.get(dest)
        return peer is not None and peer.up and peer.dealer is not None and tenant in peer.out_tenants

    def _client_req(self, conn, frames: list[bytes]) -> None:
        """REQ from a client: refuse at once without a reachable responder, else stamp the reply address and accept."""
        if len(frames) != 4:
            raise RemoteProtocolError("REQ needs header and payload")
        h = unpack_header(frames[2])
        if (type(h) is not list or len(h) != 2 or type(h[0]) is not int or type(h[1]) is not int
                or not 0 < h[0] < 2**62 or not 0 < h[1] <= MAX_REQUEST_TIMEOUT_MS):
            raise RemoteProtocolError("REQ header must be [req_id, timeout_ms]")
        req_id, timeout_ms = h
        items = unpack_items(frames[3])
        if len(items) != 1:
            raise RemoteProtocolError("REQ carries exactly one item")
        item = items[0]
        tenant = conn.tenant
        try:
            validate_subject(item[1])
        except BadSubjectError as e:
            self._req_refuse(conn, req_id, "bad-subject", str(e))
            return
        route = self._route_cache.get((tenant, item[1])) or self._compute_route(tenant, item[1])
        plain, groups, filt = route
        if filt:
            plain, groups = self._filtered(tenant, item, route, count=False)
        dests = [s.dest for s in plain] + [s.dest for _g, c in groups for s in c]
        if not any(self._reachable(tenant, d) for d in dests):
            self._count("requests_no_responders", tenant=tenant)
            self._req_refuse(conn, req_id, "no-responders", f"no responders for {item[1]!r}")
            return
        if len(self._pending_reqs) >= MAX_PENDING_REQUESTS:
            self._req_refuse(conn, req_id, "quota", "too many requests pending at this agent", 1.0)
            return
        headers = dict(item[2] or {})
        headers[REPLY_HEADER] = reply_address(self.agent_id, conn.ident, req_id)
        item[2] = headers
        self._pending_reqs[(conn.ident, req_id)] = (tenant, time.monotonic() + timeout_ms / 1000 + 1.0)
        self._count("requests", tenant=tenant)
        self._accept(conn, -req_id, [item], len(frames[3]))

    def _req_refuse(self, conn, req_id: int, code: str, text: str, retry_after: float | None = None) -> None:
        self.sockets.send(self.sockets.clients, [conn.ident, Kind.PUBACK, pack([-req_id, 0, [[0, 0, code, text, retry_after]]])])

    def _client_respond(self, conn, frames: list[bytes]) -> None:
        """RESPOND from a responder: send the reply straight to the requesting agent (not durable)."""
        if len(frames) != 4:
            raise RemoteProtocolError("RESPOND needs header and payload")
        agent_id, session, req_id = parse_reply_address(header_field(unpack_header(frames[2]), "to", str))
        payload = frames[3]
        if len(unpack_items(payload)) != 1:
            raise RemoteProtocolError("RESPOND carries exactly one item")
        tenant = conn.tenant
        self._count("replies_sent", tenant=tenant)
        if agent_id == self.agent_id:
            self._deliver_reply(tenant, session, req_id, payload)
            return
        peer = self.peers.get(agent_id)
        if peer is None or not peer.up or peer.dealer is None or tenant not in peer.out_tenants:
            self._count("replies_unroutable", tenant=tenant)
            return
        if not self.sockets.send(peer.dealer.sock, [Kind.PEER_REPLY, pack([tenant, session, req_id]), payload]):
            self._count("replies_unroutable", tenant=tenant)

    def _on_peer_reply(self, peer, frames: list[bytes]) -> None:
        """PEER_REPLY on our ROUTER: a reply for one of our clients' requests."""
        if len(frames) != 4:
            raise RemoteProtocolError("PEER_REPLY needs header and payload")
        h = unpack_header(frames[2])
        if (type(h) is not list or len(h) != 3 or type(h[0]) is not str or type(h[1]) is not str
                or type(h[2]) is not int):
            raise RemoteProtocolError("PEER_REPLY header must be [tenant, session, req_id]")
        if h[0] not in peer.in_tenants:
            self._count("dropped_unproven_tenant")
            return
        if len(unpack_items(frames[3])) != 1:
            raise RemoteProtocolError("PEER_REPLY carries exactly one item")
        self._deliver_reply(h[0], h[1], h[2], frames[3])

    def _deliver_reply(self, tenant: str, session_hex: str, req_id: int, payload: bytes) -> None:
        """Hand the first reply of a pending request to the client that asked (same tenant only)."""
        try:
            session = bytes.fromhex(session_hex)
        except ValueError:
            raise RemoteProtocolError("reply for a malformed session") from None
        pending = self._pending_reqs.get((session, req_id))
        conn = self.clients.get(session)
        if pending is None or pending[0] != tenant or conn is None or conn.tenant != tenant:
            self._count("replies_dropped", tenant=tenant if pending is not None else None)
            return
        del self._pending_reqs[(session, req_id)]
        self._count("replies", tenant=tenant)
        self.sockets.send(self.sockets.clients, [session, Kind.REPLY, pack([req_id]), payload])

    def _req_timers(self, now: float) -> None:
        """Forget requests whose timeout has passed."""
        if now < self._next_req_purge:
            return
        self._next_req_purge = now + 0.5
        for key in [k for k, (_t, deadline) in self._pending_reqs.items() if deadline < now]:
            del self._pending_reqs[key]
