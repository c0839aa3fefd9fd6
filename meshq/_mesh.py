"""The agent's mesh glue: discovery (mDNS, seeds, peer lists), liveness hooks, dead-peer handling.

`MeshMixin` is mixed into `Agent`; the agent calls its hooks from a few places (start,
the poll loop, handshakes, timers, status, shutdown).  Decisions come from the pure
`_peers.PeerTable`; this module only carries them out on the agent's sockets and store.

* Discovery runs on its own threads inside `MdnsDiscovery`; its ``wakeup_fd`` is watched by
  the agent's poller, and registration (~1.7 s) happens on a starter thread, never in the loop.
* PeerSeen: dial the agent unless known; a known agent at a new endpoint is re-linked there
  (`should_relink`).  PeerGone is a hint only: liveness comes from the mesh.
* PEERS frames: after a link comes up and whenever the set of live links changes (at most
  every 0.5 s, and every 10 s anyway) each agent tells its links which agents it is linked
  to, so one seed is enough to join.
* Dead peers: plain streams wait in the outbox; records in a dead agent's queue-group
  streams are moved to another live member of the group (the old records are rewritten as
  already-expired tombstones, so the stream keeps no gap if the agent comes back).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from . import _envelope as env
from ._discovery import DiscoveryError, MdnsDiscovery, PeerGone, PeerInfo, PeerSeen, _RateLimitedLog
from ._auth import tenant_tag
from ._doctor import mdns_plan
from ._envelope import Kind, pack, unpack_items
from ._errors import RemoteProtocolError
from ._peers import (
    Died, LivenessSettings, PeerTable, Probe, decode_peer_list, decode_probe, decode_probe_ack, encode_peer_list,
    should_relink,
)
from ._store import StreamKey

log = logging.getLogger("meshq.agent")

PEERS_MIN_INTERVAL = 0.5
PEERS_REFRESH = 10.0
REANNOUNCE_MIN_INTERVAL = 1.0


class MeshMixin:
    """Discovery, peer lists and liveness for `Agent` (see module doc)."""

    # ------------------------------------------------------------------ lifecycle
    def _mesh_init(self) -> None:
        cfg = self.config
        self.peer_table = PeerTable(self.agent_id, LivenessSettings(
            heartbeat_interval=cfg.heartbeat_interval, suspect_after=cfg.suspect_after, dead_after=cfg.dead_after))
        self.discovery: MdnsDiscovery | None = None
        self._mesh_fd: int | None = None
        self._mdns_state = "off"
        self._mdns_error = ""
        self._mdns_plan = mdns_plan(cfg.interfaces, cfg.listen, cfg.mdns)
        self._mdns_thread: threading.Thread | None = None
        self._pubkeys: dict[str, str] = {}
        self._peers_dirty = False
        self._peers_sent_at = 0.0
        self._reannounced_at = 0.0
        self._mesh_warn = _RateLimitedLog(log)
        self.counters["peer_flaps"] = 0
        self.counters["peer_deaths"] = 0

    def _mesh_start(self) -> None:
        """Dial the seeds and start mDNS (registration on a thread)."""
        for endpoint in self.config.seeds:
            self.add_peer_endpoint(endpoint, source="seed")
        plan = self._mdns_plan
        if not plan.enabled:
            log.info("%s", plan.reason)
            return
        host, _, port = self.advertise.rpartition(":")
        if plan.interfaces and ("0.0.0.0" in host or host.endswith("*")) and self.config.advertise is None:
            self.advertise = f"tcp://{plan.interfaces[0]}:{port}"
        me = PeerInfo(self.agent_id, _printable(self.name), self.advertise, version=env.PROTOCOL_VERSION,
                      pubkey=self.pubkey, tenant_tags=tuple(sorted(tenant_tag(t, self.agent_id) for t in self.tenants.values())))
        try:
            self.discovery = MdnsDiscovery(me, plan.interfaces, self.config.reannounce_interval)
        except DiscoveryError as e:
            self._mdns_state, self._mdns_error = "failed", str(e)
            log.error("mDNS discovery disabled: %s", e)
            return
        self._mesh_fd = self.discovery.wakeup_fd
        self.sockets.watch_fd(self._mesh_fd)
        self._mdns_state = "starting"
        log.info("mDNS on %s: %s", plan.interfaces or "all interfaces", plan.reason)
        self._mdns_thread = threading.Thread(target=self._mdns_start_thread, name="meshq-mdns-start", daemon=True)
        self._mdns_thread.start()

    def _mdns_start_thread(self) -> None:
        d = self.discovery
        try:
            d.start()
            self._mdns_state = "running"
        except Exception as e:  # DiscoveryError, DuplicateAgentError, OSError from sockets
            self._mdns_state, self._mdns_error = "failed", str(e)
            if not self._stopping:
                log.error("mDNS discovery failed to start: %s", e)

    def _mesh_close(self) -> None:
        """Say goodbye on mDNS and stop discovery."""
        if self.discovery is not None:
            if self._mdns_thread is not None:
                self._mdns_thread.join(5)
            self.discovery.close()

    # ------------------------------------------------------------------ discovery
    def _on_discovery(self) -> None:
        if self.discovery is None:
            return
        for ev in self.discovery.events():
            if isinstance(ev, PeerSeen) and ev.info.agent_id:
                if ev.info.version != env.PROTOCOL_VERSION:
                    self._count("mdns_other_version")
                    continue
                self._count("mdns_seen")
                self._learn_peer(ev.info.agent_id, ev.info.endpoint, "mdns", ev.info.pubkey)
            elif isinstance(ev, PeerGone):
                self._count("mdns_goodbyes")   # a hint only: liveness comes from the mesh

    def _learn_peer(self, agent_id: str, endpoint: str, source: str, pubkey: str = "") -> None:
        """Someone told us where `agent_id` is: dial it, or re-link a known agent that moved."""
        if agent_id == self.agent_id or endpoint in (self.advertise, self.sockets.peer_endpoint):
            return
        self.peer_table.learn(agent_id, endpoint, source, pubkey)
        try:
            self._link_learned(agent_id, endpoint, source, pubkey)
        except OSError as e:     # zmq refused the endpoint (e.g. an unresolvable host name)
            self._count("dial_failures")
            self._mesh_warn.warning(endpoint[:80], "cannot dial %s (from %s): %s", endpoint[:80], source, e)

    def _link_learned(self, agent_id: str, endpoint: str, source: str, pubkey: str) -> None:
        peer = self.peers.get(agent_id)
        if peer is None:
            self.add_peer_endpoint(endpoint, source, pubkey or None)
            return
        lv = peer.liveness
        link_alive = lv is None or not lv.dead   # second-hand news only replaces a link we consider dead
        if peer.dealer is not None and should_relink(peer.endpoint, link_alive, endpoint, source):
            self._mesh_warn.warning("relink:" + agent_id, "agent %s (%s) moved to %s (via %s): re-linking",
                                    peer.name, agent_id, endpoint, source)
            self._count("relinks")
            dealer = self.sockets.dial(endpoint, pubkey or peer.pubkey)     # first: it may refuse the endpoint
            self.sockets.hang_up(peer.dealer)
            peer.endpoint = endpoint
            peer.dealer = dealer
            peer.up = False
            self._send_hello(peer, time.monotonic())

    def _reannounce_soon(self, now: float) -> None:
        d = self.discovery
        if d is None or self._mdns_state != "running" or now - self._reannounced_at < REANNOUNCE_MIN_INTERVAL:
            return
        self._reannounced_at = now
        threading.Thread(target=d.reannounce, name="meshq-mdns-reannounce", daemon=True).start()

    # ------------------------------------------------------------------ frames
    def _mesh_router_frame(self, ident: bytes, peer: Any, kind: bytes, h: Any, now: float) -> None:
        """PEERS or PROBE from a linked agent (on our ROUTER)."""
        if kind == Kind.PROBE:
            target = decode_probe(h)
            ago = self.peer_table.heard_ago(target, now)
            self.sockets.send(self.sockets.peers, [ident, Kind.PROBE_ACK, pack({"target": target, "ago": ago})])
            self._count("probes_answered")
            return
        entries = decode_peer_list(h)
        source = "seed" if peer.source == "seed" else "peer"
        for agent_id, endpoint, pubkey in entries:
            self._learn_peer(agent_id, endpoint, source, pubkey)

    def _mesh_probe_ack(self, h: Any, now: float) -> None:
        target, ago = decode_probe_ack(h)
        self.peer_table.probe_answer(target, ago, now)

    def _mesh_linked(self, peer: Any, now: float) -> None:
        """Our HELLO was welcomed: revive, count flaps, spread the news, re-announce."""
        self.peer_table.learn(peer.agent_id, peer.endpoint, peer.source, self._pubkeys.get(peer.endpoint, ""))
        if self.peer_table.linked(peer.agent_id, peer.instance, now):
            self._count("peer_flaps")
            log.warning("peer %s (%s) was declared dead but is alive (flap)", peer.name, peer.agent_id)
        self._peers_dirty = True
        self._reannounce_soon(now)

    # ------------------------------------------------------------------ timers
    def _mesh_tick(self, now: float) -> list[str]:
        """Probe suspects, latch deaths (the agent's timer then takes the links down); send peer lists."""
        alive = [a for a, p in self.peers.items() if p.up and p.dealer is not None]
        died = []
        for act in self.peer_table.tick(now, alive):
            if isinstance(act, Probe):
                via = self.peers.get(act.via)
                if via is not None and via.dealer is not None:
                    self.sockets.send(via.dealer.sock, [Kind.PROBE, pack({"target": act.target})])
                    self._count("probes_sent")
            elif isinstance(act, Died):
                died.append(act.agent_id)
        if died:
            self._peers_dirty = True
        if (self._peers_dirty and now - self._peers_sent_at >= PEERS_MIN_INTERVAL) or (
                alive and now - self._peers_sent_at >= PEERS_REFRESH):
            self._send_peer_lists(now)
        return died

    def _send_peer_lists(self, now: float) -> None:
        self._peers_dirty = False
        self._peers_sent_at = now
        linked = [(a, p.endpoint, self.peer_table.record(a).pubkey) for a, p in self.peers.items()
                  if p.up and p.liveness is not None and not p.liveness.dead]
        for agent_id, _ep, _pk in linked:
            peer = self.peers[agent_id]
            entries = encode_peer_list(e for e in linked if e[0] != agent_id)
            self.sockets.send(peer.dealer.sock, [Kind.PEERS, pack(entries)])

    def _mesh_dead(self, died: list[str], now: float) -> None:
        """After the agent took the dead links down: move their queue-group backlog to live members."""
        for agent_id in died:
            peer = self.peers.get(agent_id)
            if peer is not None and peer.up:        # not yet taken down by the agent's timer
                peer.up = False
            moved = self._reroute_groups(agent_id, now)
            if moved:
                log.info("moved %d queued messages of dead agent %s to other group members", moved, agent_id)

    def _reroute_groups(self, dead: str, now: float) -> int:
        """Re-route the records of `dead`'s queue-group streams to live members; returns messages moved."""
        moved = 0
        for stream, sender in list(self.senders.items()):
            if stream.dest != dead or not stream.lane.startswith("g:") or sender.pending_msgs <= 0:
                continue
            group = stream.lane[2:]
            for seq, count, payload in list(self.store.outbox_records(stream, sender.acked_through + 1)):
                try:
                    items = unpack_items(payload)
                except RemoteProtocolError:
                    continue
                acked = max(0, sender.acked_through + 1 - seq)     # a record's head may be acknowledged already
                live_items = [i for i in items[acked:] if i[4] != 1]
                targets = [self._live_member(stream.tenant, group, item[1], dead) for item in live_items]
                if not live_items or any(t is None for t in targets):
                    continue   # no live member for some message (or already moved): it waits
                per_stream: dict[StreamKey, list] = {}
                for item, target in zip(live_items, targets):
                    per_stream.setdefault(target, []).append(item)
                for target, lst in per_stream.items():
                    self._enqueue(target, lst)
                tomb = pack([[i[0], i[1], None, i[3], 1, b""] for i in items])
                self.store.outbox_put(stream, seq, count, tomb)
                moved += len(live_items)
            sender.drop_cache()
        if moved:
            self._count("rerouted_from_dead", moved)
        return moved

    def _live_member(self, tenant: str, group: str, subject: str, dead: str) -> StreamKey | None:
        """The stream of a live member of `group` for `subject` other than `dead`, or None."""
        _plain, groups, filt = self._compute_route(tenant, subject)
        candidates = next((c for g, c in groups if g == group), ()) or next(
            (f[2] for f in filt if f[0] == "g" and f[1] == group), ())
        live = tuple(c for c in candidates if c.dest != dead and (
            c.dest == self.agent_id or ((p := self.peers.get(c.dest)) is not None and p.up)))
        if not live:
            return None
        return self._pick_member(tenant, group, live)

    # ------------------------------------------------------------------ status
    def mesh_status(self, now: float) -> dict:
        """`mesh` (every known agent, for `meshq peers`) and `discovery` for the status reply."""
        rows = []
        for p in sorted(self.peers.values(), key=lambda p: p.agent_id):
            rec = self.peer_table.records.get(p.agent_id)
            lv = p.liveness
            if lv is None:
                state = "connecting"
            elif lv.dead:
                state = "dead"
            elif not p.up:
                state = "connecting"
            else:
                state = lv.state(now)
            eps = list(rec.endpoints) if rec and rec.endpoints else []
            if p.endpoint in eps:
                eps.remove(p.endpoint)
            rows.append({
                "id": p.agent_id, "name": p.name, "endpoint": p.endpoint, "endpoints": [p.endpoint] + eps,
                "state": state, "link": "up" if p.up else "down",
                "last_heard_s": None if lv is None or lv.last_heard == float("-inf") else round(now - lv.last_heard, 3),
                "rtt_ms": None if p.rtt is None else round(p.rtt * 1000, 3),
                "found_by": (list(rec.sources) if rec and rec.sources else [p.source]),
                "flaps": rec.flaps if rec else 0, "deaths": rec.deaths if rec else 0,
            })
        for p in self._dials.values():
            rows.append({"id": None, "name": "", "endpoint": p.endpoint, "endpoints": [p.endpoint],
                         "state": "connecting", "link": "down", "last_heard_s": None, "rtt_ms": None,
                         "found_by": [p.source], "flaps": 0, "deaths": 0})
        plan = self._mdns_plan
        return {"mesh": rows, "discovery": {
            "mdns": self._mdns_state, "error": self._mdns_error,
            "interfaces": plan.interfaces if plan.interfaces is not None else "all",
            "reason": plan.reason, "seeds": list(self.config.seeds),
            "dropped_records": getattr(self.discovery, "dropped", 0),
        }}


def _printable(name: str) -> str:
    return "".join(c for c in name if 0x20 <= ord(c) != 0x7F)[:128] or "agent"
