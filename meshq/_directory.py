"""Per-tenant replicated directory: every agent's own entries, merged by (origin, key, version) — the Clone pattern.

Model
-----
Each agent (an *origin*) is the only writer of its own entries and stamps every write (put or
remove) with the next value of its own counter, so each (origin, key) has a newest version and
merging keeps it. Removals are tombstones kept for `tombstone_ttl` seconds, then purged.

Besides entries, each replica keeps per origin a *complete* version C: "for every key of that
origin I hold the newest write with version <= C (or nothing, if that write was a removal)".
`versions()` reports these; a peer answers with `delta_since(versions)`. This makes sync safe
with dropped, duplicated and reordered messages: an item whose version is <= C for a key we do
not hold is stale and ignored (this is what stops purged tombstones from being resurrected).

Wire format (plain lists, msgpack-able)
---------------------------------------
A message (`put_local`/`remove_local` delta, `delta_since`, `snapshot`) is a list of *segments*;
lists of segments may be concatenated freely::

    segment = [origin: str, from: int, to: int, items: list, floor: int]
    item    = [key: str, version: int, kind: str, body: list]   # live entry
            | [key: str, version: int]                            # tombstone

A segment says: "`items` are all my items of `origin` with version > `from`, and I am complete
for `origin` up to `to`". `from == 0` is a full listing of the origin. `floor` says "a replica
complete only below this version may miss something no delta can carry any more" (a tombstone
purged after its ttl, or an origin reset, see below). Floors are replicated (max wins); a replica
answers a peer complete below its floor with a full listing, and a replica learning a floor above
its own completeness forgets that completeness so that it gets one. Bodies by kind::

    "sub"   [pattern, queue|None, durable|None, filter|None]
    "svc"   [name]
    "agent" [endpoint, name]

Decoding is bounded and type-checked; a malformed message raises RemoteProtocolError and
nothing of it is applied (all-or-nothing).

Own entries
-----------
Nothing received can change this agent's own entries. An agent that starts without saved state
should pass `epoch` (e.g. wall-clock microseconds) so its new versions exceed its old ones.
Seeing a version of our own origin above our counter, or an own entry we never wrote, means we
lost state (restart without persistence, or with no epoch):
the directory then *resets* its origin — the counter jumps past everything seen, the origin's
floor is raised to the jump, every own live entry is re-stamped, and full listings then drop the
stale entries everywhere.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import ClassVar, Iterator, Union

import msgpack

from ._errors import CorruptStateError, LocalProtocolError, MeshqError, RemoteProtocolError
from ._filter import Filter, parse_filter
from ._subject import MAX_SUBJECT_LENGTH, SubjectIndex, validate_pattern

MAX_ORIGIN = 256
MAX_KEY = 1024
MAX_NAME = 256
MAX_ENDPOINT = 1024
MAX_VERSION = 2**63 - 1
STATE_FORMAT = 1


def _check_name(what: str, value: object, limit: int, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or len(value) > limit:
        raise LocalProtocolError(f"{what} must be a non-empty string of at most {limit} characters")


@dataclass(frozen=True, slots=True)
class Subscription:
    """A subscription of the owning agent: pattern, optional queue group, durable name and header filter."""

    kind: ClassVar[str] = "sub"
    pattern: str
    queue: str | None = None
    durable: str | None = None
    filter: str | None = None

    def __post_init__(self) -> None:
        validate_pattern(self.pattern)
        _check_name("queue group", self.queue, MAX_NAME, True)
        _check_name("durable name", self.durable, MAX_NAME, True)
        if self.filter is not None:
            object.__setattr__(self, "filter", str(parse_filter(self.filter)))  # canonical text

    @property
    def parsed_filter(self) -> Filter | None:
        """The parsed header filter (cached), or None."""
        return None if self.filter is None else parse_filter(self.filter)

    def accepts_headers(self, headers) -> bool:
        """True when the header filter (if any) holds for `headers`."""
        return self.filter is None or parse_filter(self.filter).matches(headers)

    def body(self) -> list:
        """Wire body."""
        return [self.pattern, self.queue, self.durable, self.filter]


@dataclass(frozen=True, slots=True)
class Service:
    """A request/reply service name served by the owning agent (several agents may serve one name)."""

    kind: ClassVar[str] = "svc"
    name: str

    def __post_init__(self) -> None:
        _check_name("service name", self.name, MAX_SUBJECT_LENGTH, False)

    def body(self) -> list:
        """Wire body."""
        return [self.name]


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """Liveness/info record of the owning agent: peer endpoint and human-readable name."""

    kind: ClassVar[str] = "agent"
    endpoint: str
    name: str = ""

    def __post_init__(self) -> None:
        _check_name("endpoint", self.endpoint, MAX_ENDPOINT, False)
        if not isinstance(self.name, str) or len(self.name) > MAX_NAME:
            raise LocalProtocolError(f"agent name must be a string of at most {MAX_NAME} characters")

    def body(self) -> list:
        """Wire body."""
        return [self.endpoint, self.name]


Value = Union[Subscription, Service, AgentInfo]
_KINDS: dict[str, tuple[type, int]] = {"sub": (Subscription, 4), "svc": (Service, 1), "agent": (AgentInfo, 2)}


@dataclass(frozen=True, slots=True)
class Entry:
    """A live directory entry: `value` written by agent `origin` under `key` at `version`."""

    origin: str
    key: str
    version: int
    value: Value

    @property
    def kind(self) -> str:
        """'sub', 'svc' or 'agent'."""
        return self.value.kind


@dataclass(frozen=True, slots=True)
class Change:
    """A change of a remote live entry caused by apply/forget: old and/or new entry."""

    old: Entry | None
    new: Entry | None

    @property
    def action(self) -> str:
        """'added', 'updated' or 'removed'."""
        if self.old is None:
            return "added"
        return "removed" if self.new is None else "updated"


@dataclass(frozen=True, slots=True)
class _Tomb:
    version: int
    removed_at: float


Delta = list  # a wire message: list of segments (see module docstring)
_Slot = Union[Entry, _Tomb]


def _item(key: str, e: _Slot) -> list:
    if isinstance(e, Entry):
        return [key, e.version, e.value.kind, e.value.body()]
    return [key, e.version]


def _newer(version: int, value: Value | None, cur: _Slot) -> bool:
    """Total order on writes of one (origin, key): version, then tombstone over live, then body bytes."""
    if version != cur.version:
        return version > cur.version
    cur_value = cur.value if isinstance(cur, Entry) else None
    if value == cur_value:
        return False
    if value is None or cur_value is None:
        return value is None
    pack = msgpack.packb
    return pack([value.kind, value.body()]) > pack([cur_value.kind, cur_value.body()])


def _is_int(x: object, lo: int) -> bool:
    return type(x) is int and lo <= x <= MAX_VERSION


def _decode_value(kind: object, body: object) -> Value:
    spec = _KINDS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise RemoteProtocolError(f"unknown directory entry kind {kind!r:.40}")
    cls, arity = spec
    if not isinstance(body, (list, tuple)) or len(body) < arity:
        raise RemoteProtocolError(f"directory {kind} entry body must be a list of {arity} fields")
    try:
        return cls(*body[:arity])
    except (MeshqError, TypeError, ValueError) as e:
        raise RemoteProtocolError(f"bad directory {kind} entry: {e}") from None


class Directory:
    """One tenant's replicated directory as seen by agent `self_id` (pure: no I/O, no clock)."""

    def __init__(self, self_id: str, tombstone_ttl: float = 600.0, max_items: int = 100_000,
                 epoch: int = 0) -> None:
        """`epoch`: for an agent starting WITHOUT saved state, a number above any version an earlier run of it
        used (wall-clock microseconds is the intended choice); its versions start there and peers drop its
        older entries. With 0, stale own entries are only retracted once a peer shows a higher own version."""
        _check_name("agent id", self_id, MAX_ORIGIN, False)
        if not _is_int(epoch, 0):
            raise LocalProtocolError("epoch must be a non-negative int below 2**63")
        self.self_id = self_id
        self.tombstone_ttl = float(tombstone_ttl)
        self.max_items = max_items
        self._state: dict[str, dict[str, _Slot]] = {}
        self._by_version: dict[str, dict[int, set[str]]] = {}
        self._complete: dict[str, int] = {}
        self._floor: dict[str, int] = {}           # per origin: complete below this needs a full listing
        self._forgotten: dict[str, tuple[int, float]] = {}  # origin -> (ignore versions <= this, since)
        self._tomb_heap: list[tuple[float, str, str, int]] = []
        self._subs: SubjectIndex = SubjectIndex()
        self._services: dict[str, set[tuple[str, str]]] = {}
        self._live = 0
        self.ignored_stale = 0   # counters, for metrics
        self.resets = 0
        if epoch:
            self._complete[self_id] = epoch
            self._floor[self_id] = epoch

    # ----------------------------------------------------------------------------- local writes

    @property
    def counter(self) -> int:
        """This agent's own version counter (the version of its latest write)."""
        return self._complete.get(self.self_id, 0)

    def put_local(self, key: str, value: Value, now: float) -> Delta:
        """Add or replace this agent's entry `key`; returns the delta to send to peers."""
        _check_name("directory key", key, MAX_KEY, False)
        if not isinstance(value, (Subscription, Service, AgentInfo)):
            raise LocalProtocolError(f"directory value must be Subscription, Service or AgentInfo, not {type(value).__name__}")
        v = self._bump()
        entry = Entry(self.self_id, key, v, value)
        self._set(self.self_id, key, entry, None)
        return [[self.self_id, v - 1, v, [_item(key, entry)], self._floor.get(self.self_id, 0)]]

    def remove_local(self, key: str, now: float) -> Delta | None:
        """Tombstone this agent's entry `key`; returns the delta to send, or None if there was no such entry."""
        if not isinstance(self._state.get(self.self_id, {}).get(key), Entry):
            return None
        v = self._bump()
        tomb = _Tomb(v, now)
        self._set(self.self_id, key, tomb, None)
        return [[self.self_id, v - 1, v, [_item(key, tomb)], self._floor.get(self.self_id, 0)]]

    def _bump(self) -> int:
        v = self.counter + 1
        if v > MAX_VERSION:
            raise LocalProtocolError("directory version counter exhausted")
        self._complete[self.self_id] = v
        return v

    # ------------------------------------------------------------------------------- reading

    def get(self, origin: str, key: str) -> Entry | None:
        """The live entry (origin, key), or None."""
        e = self._state.get(origin, {}).get(key)
        return e if isinstance(e, Entry) else None

    def own(self) -> dict[str, Value]:
        """This agent's own live entries: key -> value."""
        return {k: e.value for k, e in self._state.get(self.self_id, {}).items() if isinstance(e, Entry)}

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        """Every live entry (optionally of one kind), own ones included."""
        for slots in self._state.values():
            for e in slots.values():
                if isinstance(e, Entry) and (kind is None or e.value.kind == kind):
                    yield e

    def __len__(self) -> int:
        return self._live

    def subscriptions_matching(self, subject: str) -> list[Entry]:
        """Live subscription entries whose pattern matches the literal `subject`, sorted by (origin, key)."""
        found = self._subs.match(subject)
        out = []
        for origin, key in sorted(found):
            out.append(self._state[origin][key])
        return out

    def services(self, name: str) -> list[Entry]:
        """Live service entries for `name` (one per serving agent and key), sorted by (origin, key)."""
        return [self._state[o][k] for o, k in sorted(self._services.get(name, ()))]

    def agent_info(self, origin: str) -> Entry | None:
        """The first live AgentInfo entry of `origin` (by key), or None."""
        slots = self._state.get(origin, {})
        for key in sorted(slots):
            e = slots[key]
            if isinstance(e, Entry) and e.value.kind == "agent":
                return e
        return None

    def versions(self) -> dict[str, int]:
        """Origin -> version up to which this replica is complete (what to send to a peer to ask for a delta)."""
        return {o: v for o, v in self._complete.items() if v > 0}

    def snapshot(self) -> list:
        """Full listing of every origin: all live entries and tombstones (wire segments)."""
        return self._listing({})

    def delta_since(self, versions: dict[str, int]) -> list:
        """Segments a peer that reported `versions` is missing (may reset our origin if the peer saw a newer own version)."""
        versions = self._check_versions(versions)
        own = versions.get(self.self_id, 0)
        if own > self.counter:
            self._reset(own)
        return self._listing(versions)

    def _listing(self, versions: dict[str, int]) -> list:
        out = []
        for origin in sorted(set(self._state) | set(self._complete)):
            if origin in self._forgotten:
                continue
            frm = versions.get(origin, 0)
            if frm < self._floor.get(origin, 0):
                frm = 0  # the peer may need a purged tombstone, or predates a reset: full listing
            to = self._complete.get(origin, 0)
            slots = self._state.get(origin, {})
            items = [_item(k, e) for k, e in sorted(slots.items()) if e.version > frm]
            if items or to > frm:
                out.append([origin, frm, to, items, self._floor.get(origin, 0)])
        return out

    def _check_versions(self, versions: object) -> dict[str, int]:
        if not isinstance(versions, dict) or len(versions) > self.max_items:
            raise RemoteProtocolError("versions must be a map of at most max_items origins")
        for o, v in versions.items():
            if not isinstance(o, str) or not 0 < len(o) <= MAX_ORIGIN or not _is_int(v, 0):
                raise RemoteProtocolError("versions must map origin strings to non-negative ints")
        return versions

    # ------------------------------------------------------------------------------- merging

    def apply(self, items: list, now: float) -> list[Change]:
        """Merge segments from a peer (snapshot or deltas; idempotent, order-independent); returns remote live-entry changes."""
        segments = self._decode(items)
        changes: list[Change] = []
        for origin, frm, to, decoded, floor in segments:
            if origin == self.self_id:
                self._apply_own(frm, to, decoded, floor)
            else:
                self._apply_segment(origin, frm, to, decoded, floor, now, changes)
        return changes

    def _decode(self, items: object) -> list:
        if not isinstance(items, (list, tuple)):
            raise RemoteProtocolError("directory message must be a list of segments")
        if len(items) > self.max_items:
            raise RemoteProtocolError("directory message has too many segments")
        total = 0
        out = []
        for seg in items:
            if not isinstance(seg, (list, tuple)) or len(seg) != 5:
                raise RemoteProtocolError("directory segment must be [origin, from, to, items, floor]")
            origin, frm, to, raw, floor = seg
            if not isinstance(origin, str) or not 0 < len(origin) <= MAX_ORIGIN:
                raise RemoteProtocolError("directory segment origin must be a non-empty short string")
            if not _is_int(frm, 0) or not _is_int(to, 0) or not _is_int(floor, 0):
                raise RemoteProtocolError("directory segment from/to/floor must be non-negative ints")
            if not isinstance(raw, (list, tuple)):
                raise RemoteProtocolError("directory segment items must be a list")
            total += len(raw)
            if total > self.max_items:
                raise RemoteProtocolError(f"directory message has more than {self.max_items} items")
            decoded = []
            for it in raw:
                if not isinstance(it, (list, tuple)) or len(it) not in (2, 4):
                    raise RemoteProtocolError("directory item must be [key, version] or [key, version, kind, body]")
                key, version = it[0], it[1]
                if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY:
                    raise RemoteProtocolError("directory item key must be a non-empty string")
                if not _is_int(version, 1):
                    raise RemoteProtocolError("directory item version must be a positive int")
                value = _decode_value(it[2], it[3]) if len(it) == 4 else None
                decoded.append((key, version, value))
            out.append((origin, frm, to, decoded, floor))
        return out

    def _apply_segment(self, origin: str, frm: int, to: int, decoded: list, floor: int, now: float,
                       changes: list[Change]) -> None:
        forgotten = self._forgotten.get(origin)
        if forgotten is not None:
            if max([to, floor] + [v for _, v, _ in decoded]) <= forgotten[0]:
                return
            del self._forgotten[origin]   # the origin wrote after we forgot it: it is back
        if floor > self._floor.get(origin, 0):
            self._floor[origin] = floor
            if self._complete.get(origin, 0) < floor:
                self._complete.pop(origin, None)   # we may miss a purged removal or predate a reset
        complete = self._complete.get(origin, 0)
        slots = self._state.get(origin, {})
        listed: dict[str, int] = {}
        for key, version, value in decoded:
            listed[key] = max(version, listed.get(key, 0))
            cur = slots.get(key)
            if version <= complete and (cur is None or cur.version < version):
                # complete to `complete`, we hold the newest write up to it: this one was superseded
                # (e.g. by the full listing of an origin that restarted without its state)
                self.ignored_stale += 1
                continue
            if cur is not None and not _newer(version, value, cur):
                continue
            new = Entry(origin, key, version, value) if value is not None else _Tomb(version, now)
            self._set(origin, key, new, changes)
            slots = self._state.get(origin, {})
        if to > frm and slots:
            self._prune(origin, frm, to, listed, changes)
        if complete >= frm and to > complete:
            self._complete[origin] = to

    def _prune(self, origin: str, frm: int, to: int, listed: dict[str, int], changes: list[Change]) -> None:
        """Drop live entries with frm < version <= to that the sender (complete to `to`) does not have.

        A key the sender lists at an older version counts as not had: complete to `to`, it holds
        the newest write up to `to`, so ours was superseded (an origin that restarted without
        its state lists only what it has now).
        """
        slots = self._state[origin]
        by_version = self._by_version[origin]
        if to - frm <= len(by_version):
            candidates = [k for v in range(frm + 1, to + 1) for k in by_version.get(v, ())]
        else:
            candidates = [k for k, e in slots.items() if frm < e.version <= to]
        for key in candidates:
            e = slots.get(key)
            if isinstance(e, Entry) and frm < e.version <= to and listed.get(key, 0) < e.version:
                self._set(origin, key, None, changes)

    def _apply_own(self, frm: int, to: int, decoded: list, floor: int) -> None:
        mine = self._state.get(self.self_id, {})
        seen = max([frm, to, floor] + [v for _, v, _ in decoded])
        if seen > self.counter:
            self._reset(seen)
            return
        if floor > self._floor.get(self.self_id, 0):
            self._floor[self.self_id] = floor
        for key, version, value in decoded:
            cur = mine.get(key)
            if cur is None:
                if value is None or version <= self._floor.get(self.self_id, 0):
                    continue   # a removal, or a stale copy of something we removed and purged
            elif cur.version > version:
                continue       # the peer is behind; it will catch up
            elif cur.version == version and (cur.value if isinstance(cur, Entry) else None) == value:
                continue
            self._reset(seen)  # an own write we never made: we lost state
            return

    def _reset(self, seen: int) -> None:
        """Lost-state recovery: jump the counter past `seen`, re-stamp own live entries, force full listings."""
        self.resets += 1
        me = self.self_id
        r = max(self.counter, seen) + 1
        self._complete[me] = r
        self._floor[me] = r
        live = sorted((k, e) for k, e in self._state.get(me, {}).items() if isinstance(e, Entry))
        for key in list(self._state.get(me, {})):
            self._set(me, key, None, None)
        for key, e in live:
            self._set(me, key, Entry(me, key, self._bump(), e.value), None)

    # --------------------------------------------------------------------------- bookkeeping

    def _set(self, origin: str, key: str, new: _Slot | None, changes: list[Change] | None) -> None:
        """The single mutation point: keeps indexes, counts and change lists in step."""
        slots = self._state.setdefault(origin, {})
        by_version = self._by_version.setdefault(origin, {})
        old = slots.get(key)
        if old is not None:
            keys = by_version.get(old.version)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del by_version[old.version]
        old_live = old if isinstance(old, Entry) else None
        new_live = new if isinstance(new, Entry) else None
        if old_live is not None:
            self._live -= 1
            self._unindex(old_live)
        if new is None:
            slots.pop(key, None)
            if not slots:
                del self._state[origin]
                del self._by_version[origin]
        else:
            slots[key] = new
            by_version.setdefault(new.version, set()).add(key)
            if new_live is not None:
                self._live += 1
                self._index(new_live)
            else:
                heapq.heappush(self._tomb_heap, (new.removed_at, origin, key, new.version))
        if changes is not None and origin != self.self_id and old_live != new_live:
            changes.append(Change(old_live, new_live))

    def _index(self, e: Entry) -> None:
        v = e.value
        if isinstance(v, Subscription):
            self._subs.add(v.pattern, (e.origin, e.key))
        elif isinstance(v, Service):
            self._services.setdefault(v.name, set()).add((e.origin, e.key))

    def _unindex(self, e: Entry) -> None:
        v = e.value
        if isinstance(v, Subscription):
            self._subs.remove(v.pattern, (e.origin, e.key))
        elif isinstance(v, Service):
            s = self._services.get(v.name)
            if s is not None:
                s.discard((e.origin, e.key))
                if not s:
                    del self._services[v.name]

    def expire(self, now: float) -> int:
        """Purge tombstones (and forgotten-origin markers) older than tombstone_ttl; returns how many tombstones went."""
        purged = 0
        heap = self._tomb_heap
        limit = now - self.tombstone_ttl
        while heap and heap[0][0] <= limit:
            removed_at, origin, key, version = heapq.heappop(heap)
            cur = self._state.get(origin, {}).get(key)
            if isinstance(cur, _Tomb) and cur.version == version and cur.removed_at == removed_at:
                self._set(origin, key, None, None)
                self._floor[origin] = max(self._floor.get(origin, 0), version)
                purged += 1
        for origin, (_, since) in list(self._forgotten.items()):
            if since <= limit:
                del self._forgotten[origin]
        return purged

    def forget_origin(self, origin: str, now: float) -> list[Change]:
        """Drop every entry of `origin` (declared gone for good) and ignore stale copies for tombstone_ttl; local only."""
        if origin == self.self_id:
            raise LocalProtocolError("an agent cannot forget itself")
        changes: list[Change] = []
        slots = self._state.get(origin, {})
        highest = max([self._complete.get(origin, 0)] + [e.version for e in slots.values()])
        for key in list(slots):
            self._set(origin, key, None, changes)
        self._complete.pop(origin, None)
        self._floor.pop(origin, None)
        self._forgotten[origin] = (highest, now)
        return changes

    # --------------------------------------------------------------------------- persistence

    def to_state(self) -> bytes:
        """Serialize everything (msgpack) so a restarted agent keeps its entries and its counter monotonic."""
        entries = [[o] + _item(k, e) for o, slots in sorted(self._state.items()) for k, e in sorted(slots.items())]
        return msgpack.packb({
            "format": STATE_FORMAT,
            "self": self.self_id,
            "ttl": self.tombstone_ttl,
            "complete": self._complete,
            "floor": self._floor,
            "forgotten": {o: v for o, (v, _) in self._forgotten.items()},
            "entries": entries,
        })

    @classmethod
    def from_state(cls, data: bytes, self_id: str, now: float = 0.0, tombstone_ttl: float | None = None,
                   max_items: int = 100_000) -> "Directory":
        """Restore a directory saved by to_state; tombstone and forget timers restart at `now`."""
        try:
            st = msgpack.unpackb(data, raw=False, strict_map_key=True)
            if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
                raise CorruptStateError("directory state has an unknown format")
            ttl = st["ttl"] if tombstone_ttl is None else tombstone_ttl
            d = cls(self_id, tombstone_ttl=ttl, max_items=max(max_items, len(st["entries"])))
            for origin, v in st["forgotten"].items():
                d._forgotten[origin] = (v, now)
            segs: dict[str, list] = {}
            for row in st["entries"]:
                segs.setdefault(row[0], []).append(list(row[1:]))
            decoded = d._decode([[o, 0, 0, its, 0] for o, its in segs.items()])
            for origin, _, _, items, _ in decoded:
                for key, version, value in items:
                    new = Entry(origin, key, version, value) if value is not None else _Tomb(version, now)
                    d._set(origin, key, new, None)
            for origin, v in st["complete"].items():
                if not isinstance(origin, str) or not _is_int(v, 0):
                    raise CorruptStateError("bad version in directory state")
                d._complete[origin] = v
            for origin, v in st["floor"].items():
                if not isinstance(origin, str) or not _is_int(v, 0):
                    raise CorruptStateError("bad floor in directory state")
                d._floor[origin] = v
        except CorruptStateError:
            raise
        except (MeshqError, KeyError, TypeError, ValueError, AttributeError, IndexError,
                msgpack.UnpackException) as e:
            raise CorruptStateError(f"directory state could not be decoded: {e}") from None
        # never reuse an own version, even if the saved counter lags the saved entries
        own = [e.version for e in d._state.get(self_id, {}).values()]
        d._complete[self_id] = max([d.counter] + own)
        return d

