"""The peer table and mesh liveness (pure, sans-IO): who we know, how we found them, who is dead.

Theory of operation
-------------------
Discovery (mDNS, seeds, other agents' peer lists, the store) only says where an agent *might*
be.  Whether it is alive comes from the mesh: every frame heard from a peer (heartbeats every
``heartbeat_interval``, data, acks) calls `PeerLiveness.heard`.

States, with hysteresis:

* **alive** — heard directly within ``suspect_after``.
* **suspect** — silent for ``suspect_after``.  Every ``probe_interval`` the table asks up to
  ``probe_fanout`` other alive peers whether *they* still hear it (PROBE → PROBE_ACK carrying
  "last heard N s ago").  A fresh answer counts as indirect evidence of life.
* **dead** — no direct or indirect evidence for ``dead_after``, and at least one probe round
  was given ``probe_wait`` to answer (when there was anyone to ask); or no direct contact for
  ``max_suspect`` whatever others say.  Dead is latched: a stray frame does not revive a
  peer; only a new handshake (`PeerTable.linked`) does.  A peer that comes back with the same
  instance it had when it was declared dead was never dead: that is a *flap*, counted.

A paused observer does not accuse others: when the gap between two ticks exceeds
``max_pause`` (our own loop was stalled: GC, a slow fsync, CPU starvation), every peer's last
contact is moved forward by the gap before deciding.

Nothing here reads a clock or touches a socket.  `PeerTable.tick` returns actions
(`Probe`, `Died`) for the agent to carry out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from ._discovery import MalformedRecord, _AGENT_ID_RE, _PUBKEY_RE, MAX_PUBKEY_CHARS, validate_endpoint
from ._errors import RemoteProtocolError

SOURCES = ("mdns", "seed", "peer", "static", "store")
MAX_PEER_LIST = 1024        # entries accepted in one PEERS frame
NEVER = -math.inf


@dataclass(frozen=True)
class LivenessSettings:
    """Timing of failure detection (seconds)."""

    heartbeat_interval: float = 0.5
    suspect_after: float = 1.0
    dead_after: float = 2.0
    probe_interval: float = 0.5
    probe_wait: float = 0.3
    probe_fanout: int = 2
    max_suspect: float = 15.0
    max_pause: float = 0.75


@dataclass(frozen=True)
class Probe:
    """Ask agent `via` whether it still hears agent `target`."""

    via: str
    target: str


@dataclass(frozen=True)
class Died:
    """`agent_id` is now considered dead."""

    agent_id: str


class PeerLiveness:
    """One peer's liveness; `heard`/`state`/`last_heard` are compatible with `_protocol.Liveness`."""

    def __init__(self, now: float, settings: LivenessSettings) -> None:
        self.settings = settings
        self.last_heard = now
        self.vouched = NEVER          # latest time (our clock) another agent heard it directly
        self.dead = False
        self.dead_instance = ""
        self.first_probe = NEVER      # when the current suspicion's first probe round went out
        self.last_probe = NEVER
        self.said_bye = False         # a clean BYE: dead without asking anyone

    def heard(self, now: float) -> None:
        """Direct contact (any frame from the peer)."""
        if now > self.last_heard:
            self.last_heard = now

    def silence(self, now: float) -> float:
        """Seconds since the last direct contact."""
        return now - self.last_heard

    def state(self, now: float) -> str:
        """'alive', 'suspect' or 'dead' (dead only once the table decided so)."""
        if self.dead:
            return "dead"
        return "alive" if self.silence(now) < self.settings.suspect_after else "suspect"


@dataclass
class PeerRecord:
    """What the table knows of one agent besides liveness."""

    agent_id: str
    endpoints: list[str] = field(default_factory=list)   # most recent first
    sources: list[str] = field(default_factory=list)     # how it was found, first first
    pubkey: str = ""
    instance: str = ""
    liveness: PeerLiveness | None = None
    flaps: int = 0
    deaths: int = 0


def should_relink(current: str, link_alive: bool, new: str, source: str) -> bool:
    """Whether a known agent seen at a new endpoint should be re-dialled there.

    mDNS records are announced by the agent itself, so a new endpoint there wins at once;
    second-hand news (seeds, peer lists, the store) only replaces a link that is not alive.
    """
    if not new or new == current:
        return False
    return source == "mdns" or not link_alive


class PeerTable:
    """Every known agent: endpoints, sources, and the liveness decisions (see module doc)."""

    def __init__(self, self_id: str, settings: LivenessSettings | None = None) -> None:
        self.self_id = self_id
        self.settings = settings or LivenessSettings()
        self.records: dict[str, PeerRecord] = {}
        self.flaps = 0
        self._last_tick = NEVER

    def record(self, agent_id: str) -> PeerRecord:
        """The record of `agent_id`, created empty if new."""
        rec = self.records.get(agent_id)
        if rec is None:
            rec = self.records[agent_id] = PeerRecord(agent_id)
        return rec

    def learn(self, agent_id: str, endpoint: str, source: str, pubkey: str = "") -> PeerRecord | None:
        """Remember that `agent_id` was found at `endpoint` by `source`; None for ourselves."""
        if agent_id == self.self_id or not agent_id:
            return None
        rec = self.record(agent_id)
        if endpoint:
            if endpoint in rec.endpoints:
                rec.endpoints.remove(endpoint)
            rec.endpoints.insert(0, endpoint)
            del rec.endpoints[8:]
        if source not in rec.sources:
            rec.sources.append(source)
        if pubkey:
            rec.pubkey = pubkey
        return rec

    def liveness_for(self, agent_id: str, now: float) -> PeerLiveness:
        """The liveness object of `agent_id` (created alive at `now` if new)."""
        rec = self.record(agent_id)
        if rec.liveness is None:
            rec.liveness = PeerLiveness(now, self.settings)
        return rec.liveness

    def linked(self, agent_id: str, instance: str, now: float) -> bool:
        """A handshake with `agent_id` (instance `instance`) completed; True if that revived a live peer (a flap)."""
        rec = self.record(agent_id)
        lv = self.liveness_for(agent_id, now)
        flap = False
        if lv.dead:
            lv.dead = False
            if instance and instance == lv.dead_instance:
                flap = True
                rec.flaps += 1
                self.flaps += 1
        if instance:
            rec.instance = instance
        lv.said_bye = False
        lv.heard(now)
        lv.first_probe = lv.last_probe = NEVER
        return flap

    def goodbye(self, agent_id: str) -> None:
        """The peer said BYE: no need to wait or to ask anyone."""
        rec = self.records.get(agent_id)
        if rec is not None and rec.liveness is not None:
            rec.liveness.last_heard = NEVER
            rec.liveness.vouched = NEVER
            rec.liveness.first_probe = NEVER
            rec.liveness.last_probe = NEVER
            rec.liveness.said_bye = True

    def heard_ago(self, agent_id: str, now: float) -> float | None:
        """For answering a PROBE: seconds since we last heard `agent_id` directly (None: unknown/dead)."""
        rec = self.records.get(agent_id)
        if rec is None or rec.liveness is None or rec.liveness.dead or rec.liveness.last_heard == NEVER:
            return None
        return max(0.0, now - rec.liveness.last_heard)

    def probe_answer(self, target: str, ago: float | None, now: float) -> None:
        """Another agent says it heard `target` `ago` seconds ago (None: it does not hear it)."""
        rec = self.records.get(target)
        if rec is None or rec.liveness is None or ago is None or rec.liveness.dead:
            return
        if ago < self.settings.suspect_after:
            rec.liveness.vouched = max(rec.liveness.vouched, now - ago)

    def tick(self, now: float, alive_links: Iterable[str]) -> list[Probe | Died]:
        """Decide: which suspects to ask about, and who is dead.  `alive_links`: ids with a link up."""
        s = self.settings
        links = [a for a in alive_links if a != self.self_id]
        gap = now - self._last_tick
        self._last_tick = now
        if s.max_pause < gap < math.inf:
            for rec in self.records.values():   # we were stalled, not they silent
                lv = rec.liveness
                if lv is not None and not lv.dead and lv.last_heard > NEVER:
                    lv.last_heard = min(now, lv.last_heard + gap)
        actions: list[Probe | Died] = []
        witnesses = [a for a in links if (r := self.records.get(a)) is not None and r.liveness is not None
                     and r.liveness.state(now) == "alive"]
        for agent_id in links:
            rec = self.records.get(agent_id)
            lv = rec.liveness if rec is not None else None
            if lv is None or lv.dead:
                continue
            silence = lv.silence(now)
            if silence < s.suspect_after:
                lv.first_probe = lv.last_probe = NEVER
                continue
            bye = lv.said_bye
            asked = [w for w in witnesses if w != agent_id]
            if not bye and asked and now - lv.last_probe >= s.probe_interval:
                start = int(now / s.probe_interval) % len(asked)   # rotate whom we ask
                for i in range(min(s.probe_fanout, len(asked))):
                    actions.append(Probe(asked[(start + i) % len(asked)], agent_id))
                lv.last_probe = now
                if lv.first_probe == NEVER:
                    lv.first_probe = now
            evidence = max(lv.last_heard, lv.vouched)
            waited = bye or not asked or (lv.first_probe > NEVER and now - lv.first_probe >= s.probe_wait)
            if (now - evidence >= s.dead_after and waited) or silence >= s.max_suspect:
                lv.dead = True
                lv.dead_instance = rec.instance
                lv.said_bye = False
                rec.deaths += 1
                actions.append(Died(agent_id))
        return actions


def encode_peer_list(entries: Iterable[tuple[str, str, str]]) -> list[list[str]]:
    """The PEERS frame header: [[agent_id, endpoint, pubkey], ...] (at most MAX_PEER_LIST)."""
    out = []
    for agent_id, endpoint, pubkey in entries:
        out.append([agent_id, endpoint, pubkey or ""])
        if len(out) >= MAX_PEER_LIST:
            break
    return out


def decode_peer_list(h: Any) -> list[tuple[str, str, str]]:
    """Validate a PEERS header; raises RemoteProtocolError for any malformed entry."""
    if type(h) is not list:
        raise RemoteProtocolError("PEERS must be a list")
    if len(h) > MAX_PEER_LIST:
        raise RemoteProtocolError(f"PEERS lists more than {MAX_PEER_LIST} agents")
    out = []
    for e in h:
        if type(e) is not list or len(e) != 3 or not all(type(x) is str for x in e):
            raise RemoteProtocolError("PEERS entry must be [agent_id, endpoint, pubkey]")
        agent_id, endpoint, pubkey = e
        if not _AGENT_ID_RE.fullmatch(agent_id):
            raise RemoteProtocolError("PEERS entry has a bad agent id")
        try:
            host, _port = validate_endpoint(endpoint)
        except MalformedRecord as err:
            raise RemoteProtocolError(f"PEERS entry has a bad endpoint: {err}") from None
        if host in ("0.0.0.0", "*"):
            raise RemoteProtocolError("PEERS entry has a wildcard endpoint")
        if len(pubkey) > MAX_PUBKEY_CHARS or not _PUBKEY_RE.fullmatch(pubkey):
            raise RemoteProtocolError("PEERS entry has a bad public key")
        out.append((agent_id, endpoint, pubkey))
    return out


def decode_probe(h: Any) -> str:
    """A PROBE header {"target": agent_id}; returns the target."""
    if type(h) is not dict or type(h.get("target")) is not str or not _AGENT_ID_RE.fullmatch(h["target"]):
        raise RemoteProtocolError("PROBE must be {target: agent_id}")
    return h["target"]


def decode_probe_ack(h: Any) -> tuple[str, float | None]:
    """A PROBE_ACK header {"target": agent_id, "ago": seconds or nil}."""
    target = decode_probe(h)
    ago = h.get("ago")
    if ago is not None and (type(ago) not in (int, float) or not 0 <= ago < 1e9):
        raise RemoteProtocolError("PROBE_ACK ago must be a non-negative number or nil")
    return target, None if ago is None else float(ago)
