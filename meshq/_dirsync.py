"""The agent's directory glue: one replicated `_directory.Directory` per served tenant.

`DirectoryMixin` is mixed into `Agent`.  The directory itself is pure (`_directory`); this module
decides what this agent's own entries are, carries the sync protocol over the peer links, keeps
the directory in the store, and answers `meshq dir`.

Own entries (key → value), reconciled at the end of a turn whenever local subscriptions changed:

* ``agent``            → AgentInfo(advertised endpoint, name)
* ``sub:<session>:<sid>`` → Subscription(pattern, queue group, durable name, canonical filter)
* ``svc:<session>:<sid>`` → Service(pattern), for subscriptions made with ``serve()`` (responders)

Sync (the Clone pattern), one ``DIR`` frame kind, ``{"t": tenant, "op": ...}`` plus a bulk frame:

* ``ask``: "here are my versions" — the peer answers with ``delta`` = ``delta_since(versions)``.
  Sent when our link to a peer comes up (`_dir_linked`) and every `DIR_RESYNC` seconds after,
  so a lost delta or a healed partition is repaired within a couple of seconds.
* ``delta``: segments to merge (snapshot or deltas; relayed origins included).  Every local
  change is pushed as a delta to all linked agents of the tenant at once.

Tenant rule: a DIR frame is sent only on our link to an agent that proved the tenant
(`out_tenants`) and accepted only from an agent that proved it on its link to us (`in_tenants`);
an ask that cannot be answered yet waits for our link (`_dir_linked`).

Persistence: ``d\\x00<tenant>`` holds `Directory.to_state()`, rewritten at the end of a turn
after a change; an agent restarts with its last view.  Without saved state a directory starts
with ``epoch`` = wall-clock microseconds so its new versions supersede what peers remember.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ._directory import AgentInfo, Directory, Service, Subscription
from ._envelope import Kind, header_field, pack, unpack_bulk
from ._errors import CorruptStateError, MeshqError, RemoteProtocolError

log = logging.getLogger("meshq.agent")

DIR_RESYNC = 1.0              # seconds between anti-entropy asks per linked agent
DIR_TOMBSTONE_TTL = 600.0     # seconds a removal is remembered (longer than any partition we heal by deltas)
STORE_PREFIX = b"d\x00"


class DirectoryMixin:
    """Per-tenant replicated directory for `Agent` (see module doc)."""

    # ------------------------------------------------------------------ setup
    def _dir_init(self) -> None:
        self._dirs: dict[str, Directory] = {}
        self._dir_save: set[str] = set()            # tenants whose state must be written this turn
        self._dir_asks: dict[tuple[str, str], Any] = {}   # (peer id, tenant) -> versions waiting for our link
        self._dir_next_resync = 0.0
        self._filters_local = False                 # some local subscription has a filter

    def _dir_load(self, now: float) -> None:
        """Restore every served tenant's directory from the store (fresh with an epoch otherwise)."""
        for key in list(self.store.scan(STORE_PREFIX, include_value=False)):
            if key.count(b"\x00") > 1:               # the first-form layout d\x00tenant\x00origin
                self.store.delete(key)
        for tenant in self.served_tenants():
            raw = self.store.get(STORE_PREFIX + tenant.encode())
            d = None
            if raw is not None:
                try:
                    d = Directory.from_state(raw, self.agent_id, now, tombstone_ttl=DIR_TOMBSTONE_TTL)
                except CorruptStateError as e:
                    self._count("store_bad_directory")
                    log.warning("directory of tenant %r could not be restored (%s): starting fresh", tenant, e)
            self._dirs[tenant] = d or Directory(self.agent_id, DIR_TOMBSTONE_TTL, epoch=time.time_ns() // 1000)
        self._dir_dirty = True

    def directory(self, tenant: str) -> Directory | None:
        """The directory of `tenant`, or None when this agent does not serve it."""
        return self._dirs.get(tenant)

    # ------------------------------------------------------------------ own entries
    def _own_entries(self, tenant: str) -> dict:
        want: dict = {"agent": AgentInfo(self.advertise, self.name[:256])}
        for s in self.local_subs.values():
            if s.tenant != tenant:
                continue
            spec = s.spec
            tag = f"{s.session.hex()}:{s.sid}"
            try:
                want["sub:" + tag] = Subscription(spec.pattern, spec.group, spec.durable, spec.filter)
                if getattr(spec, "service", False):
                    want["svc:" + tag] = Service(spec.pattern)
            except MeshqError as e:   # checked at SUB already; a stored one from an older version
                self._count("directory_bad_local_entry")
                log.warning("subscription %r not announced: %s", spec.pattern, e)
        return want

    def _announce(self) -> None:
        """Reconcile our own entries with the local subscriptions and push the deltas."""
        self._dir_dirty = False
        now = time.monotonic()
        self._filters_local = any(s.spec.filter for s in self.local_subs.values())
        for tenant, d in self._dirs.items():
            want = self._own_entries(tenant)
            have = d.own()
            delta: list = []
            for key in have.keys() - want.keys():
                delta += d.remove_local(key, now) or []
            for key, value in want.items():
                if have.get(key) != value:
                    delta += d.put_local(key, value, now)
            if delta:
                self._dir_changed(tenant)
                self._dir_push(tenant, delta)

    def _dir_changed(self, tenant: str) -> None:
        self._dir_save.add(tenant)
        self._route_cache.clear()

    def _dir_push(self, tenant: str, delta: list) -> None:
        """Send `delta` to every linked agent that proved `tenant`."""
        body = pack(delta)
        for peer in self.peers.values():
            if peer.up and peer.dealer is not None and tenant in peer.out_tenants:
                self._dir_send(peer, tenant, "delta", body)

    def _dir_send(self, peer, tenant: str, op: str, body: bytes) -> None:
        if self.sockets.send(peer.dealer.sock, [Kind.DIR, pack({"t": tenant, "op": op}), body]):
            self._count("dir_" + op + "_sent", tenant=tenant)
        else:
            self._count("dir_send_failures")

    def _dir_save_now(self) -> None:
        """Write the changed directories to the store (called once per turn)."""
        for tenant in self._dir_save:
            d = self._dirs.get(tenant)
            if d is not None:
                self.store.put(STORE_PREFIX + tenant.encode(), d.to_state())
        self._dir_save.clear()

    # ------------------------------------------------------------------ sync protocol
    def _dir_linked(self, peer) -> None:
        """Our link to `peer` is up: ask for what we miss, answer what it asked before."""
        for tenant in peer.out_tenants:
            d = self._dirs.get(tenant)
            if d is None:
                continue
            self._dir_send(peer, tenant, "ask", pack(d.versions()))
            versions = self._dir_asks.pop((peer.agent_id, tenant), None)
            if versions is not None:
                self._dir_answer(peer, tenant, d, versions)

    def _dir_answer(self, peer, tenant: str, d: Directory, versions: Any) -> None:
        before = d.counter
        delta = d.delta_since(versions)          # RemoteProtocolError on a malformed map
        if d.counter != before:                  # the peer saw a newer own version: we lost state and reset
            self._dir_changed(tenant)
        if delta:
            self._dir_send(peer, tenant, "delta", pack(delta))

    def _on_dir(self, peer, h: Any, body: bytes) -> None:
        """A DIR frame that arrived on our ROUTER from `peer` (bounded, typed; errors drop the frame)."""
        tenant = header_field(h, "t", str)
        op = header_field(h, "op", str)
        if op not in ("ask", "delta"):
            raise RemoteProtocolError(f"unknown directory op {op[:20]!r}")
        d = self._dirs.get(tenant)
        if d is None or tenant not in peer.in_tenants:
            self._count("dropped_unproven_tenant")
            return
        data = unpack_bulk(body)
        if op == "ask":
            if peer.up and peer.dealer is not None and tenant in peer.out_tenants:
                self._dir_answer(peer, tenant, d, data)
            else:
                d._check_versions(data)
                self._dir_asks[(peer.agent_id, tenant)] = data
            return
        before = d.counter
        changes = d.apply(data, time.monotonic())
        if changes or d.counter != before:
            self._dir_changed(tenant)
            self._count("dir_changes", len(changes), tenant=tenant)

    def _dir_timers(self, now: float) -> None:
        """Expire tombstones and send the periodic anti-entropy asks."""
        if now < self._dir_next_resync:
            return
        self._dir_next_resync = now + DIR_RESYNC
        for tenant, d in self._dirs.items():
            if d.expire(now):
                self._dir_save.add(tenant)
        for peer in self.peers.values():
            if peer.up and peer.dealer is not None:
                for tenant in peer.out_tenants:
                    d = self._dirs.get(tenant)
                    if d is not None:
                        self._dir_send(peer, tenant, "ask", pack(d.versions()))

    # ------------------------------------------------------------------ reading
    def _filter_accepts(self, sub, item: list) -> bool:
        """True when local subscription `sub` wants message `item` (its header filter holds, or it has none)."""
        f = sub.spec.filter
        if f is None:
            return True
        from ._filter import parse_filter   # cached by text
        return parse_filter(f).matches(item[2])

    def dir_subscriptions(self, tenant: str, agent_id: str) -> int:
        """How many live subscriptions `agent_id` has in `tenant`'s directory."""
        d = self._dirs.get(tenant)
        if d is None:
            return 0
        return sum(1 for e in d.entries("sub") if e.origin == agent_id)

    def dir_listing(self, tenant: str) -> dict:
        """`tenant`'s directory as this agent sees it (for `meshq dir`)."""
        d = self._dirs.get(tenant)
        if d is None:
            return {"tenant": tenant, "agent": self.agent_id, "versions": {}, "entries": []}
        now = time.monotonic()
        rows = []
        for e in sorted(d.entries(), key=lambda e: (e.origin, e.key)):
            row = {"origin": e.origin, "key": e.key, "kind": e.kind, "version": e.version}
            v = e.value
            if isinstance(v, Subscription):
                row.update(subject=v.pattern, group=v.queue, durable=v.durable, filter=v.filter)
            elif isinstance(v, Service):
                row.update(subject=v.name)
            else:
                row.update(endpoint=v.endpoint, name=v.name)
            if e.origin == self.agent_id:
                row["state"] = "self"
            else:
                p = self.peers.get(e.origin)
                dead = p is not None and p.liveness is not None and p.liveness.state(now) == "dead"
                row["state"] = "unknown" if p is None else "dead" if dead else "alive" if p.up else "connecting"
            rows.append(row)
        return {"tenant": tenant, "agent": self.agent_id, "name": self.name, "versions": d.versions(), "entries": rows}
