"""The agent's LevelDB: the only module that imports plyvel.

Layout (all keys bytes; ``\\x00`` separates variable-length parts, which may not contain it):

* ``o\\x00<tenant>\\x00<dest>\\x00<lane>\\x00<seq:8><count:4>`` → batch payload: the outbox.
  One record holds ``count`` messages with sequence numbers ``seq .. seq+count-1`` of one
  stream; keys sort by stream then sequence, so a stream reads back in order.
* ``w\\x00<tenant>\\x00<producer>\\x00<lane>`` → ``<seq:8>``: receiver dedupe watermark.
* ``n\\x00<tenant>\\x00<dest>\\x00<lane>`` → ``<seq:8>``: a sender's next sequence number.
* ``d\\x00<tenant>\\x00<origin>`` → msgpack: directory entries learned from ``origin``.
* ``m\\x00<name>`` → agent metadata (id, keys…).
* ``x\x00<tenant>\x00<dlq id>`` → msgpack `DeadLetter`: the tenant's dead letters (id: message id hex).
* ``y\x00<due_ms:8>\x00<tenant>\x00<msg id:16>`` → item: delayed messages, in due order.
* other single-letter prefixes are reserved for later tables (retained log).

An outbox record of `blob_min_bytes` or more is kept in an append-only segment file
(`_blobs`, under ``<path>/blobs``); its LevelDB value is then a reference,
``\xc1<segment:8><offset:8><length:4>`` (``\xc1`` is never the first byte of a msgpack
payload).  A segment is deleted once no reference points into it; one left mostly empty by
a record that stays (an offline consumer's) is copied forward when the active segment rolls.

Writes go into one pending write batch; `commit()` writes it, with fsync when the
durability mode asks for it and the batch holds something that must survive a crash.
Segments are fdatasync'ed before the batch that refers to them is written.
"""

from __future__ import annotations

import itertools
import os
import struct
from typing import Iterator, NamedTuple

import plyvel

from ._blobs import SEGMENT_BYTES, BlobLog
from ._errors import MeshqError, StoreLockedError

_SEQ = struct.Struct(">QI")
_Q = struct.Struct(">Q")
_REF = struct.Struct(">BQQI")
_REF_MARK = 0xC1
_REF_PREFIX = bytes((_REF_MARK,))
BLOB_MIN_BYTES = 16 << 10         # outbox records this large go to segment files

DURABILITY_MODES = ("fsync", "none")


class StreamKey(NamedTuple):
    """One ordered delivery stream: messages of `tenant` from this agent to `dest` on `lane`."""

    tenant: str
    dest: str
    lane: str


def _part(text: str) -> bytes:
    raw = text.encode()
    if b"\x00" in raw:
        raise MeshqError(f"store key part {text!r} contains NUL")
    return raw


def _stream_prefix(stream: StreamKey) -> bytes:
    return b"o\x00" + _part(stream.tenant) + b"\x00" + _part(stream.dest) + b"\x00" + _part(stream.lane) + b"\x00"


class Store:
    """One LevelDB per agent with a pending write batch and group commit."""

    def __init__(self, path: str, durability: str = "fsync", blob_min_bytes: int = BLOB_MIN_BYTES,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        if durability not in DURABILITY_MODES:
            raise MeshqError(f"durability must be one of {DURABILITY_MODES}, not {durability!r}")
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.durability = durability
        try:
            self._db = plyvel.DB(path, create_if_missing=True)
        except plyvel.IOError as e:
            if "lock" in str(e).lower():
                raise StoreLockedError(
                    f"data directory {path} is in use by another agent (LevelDB lock {os.path.join(path, 'LOCK')} is held)"
                ) from None
            raise MeshqError(f"cannot open store at {path}: {e}") from None
        self._batch = self._db.write_batch()
        self._dirty = False
        self._must_sync = False
        self.commits = 0
        self.blob_min_bytes = blob_min_bytes
        self._blobs = BlobLog(os.path.join(path, "blobs"), segment_bytes)
        self._blob_refs: dict[bytes, tuple[int, int, int]] = {}   # outbox key -> (segment, offset, length), as staged
        self._seg_keys: dict[int, set[bytes]] = {}           # segment -> outbox keys referring into it
        self._seg_live: dict[int, int] = {}                  # segment -> bytes still referred to
        self._maybe_unreferenced: set[int] = set()           # segments whose last reference went
        self._compacting = False
        self._load_blob_refs()

    # -- generic -------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        """Read a committed value."""
        return self._db.get(key)

    def put(self, key: bytes, value: bytes, durable: bool = False) -> None:
        """Stage a write; `durable` makes the next commit fsync (in fsync mode)."""
        self._batch.put(key, value)
        self._dirty = True
        self._must_sync |= durable

    def delete(self, key: bytes) -> None:
        """Stage a delete."""
        self._batch.delete(key)
        self._dirty = True

    def scan(self, prefix: bytes, include_value: bool = True) -> Iterator:
        """Iterate committed keys (and values) under a prefix, in order."""
        return self._db.iterator(prefix=prefix, include_value=include_value)

    def commit(self) -> bool:
        """Write the pending batch (group commit); returns True when something was written."""
        if not self._dirty:
            return False
        sync = self._must_sync and self.durability == "fsync"
        if self._blobs.dirty:
            self._blobs.sync(durable=self.durability == "fsync")
        batch, self._batch = self._batch, self._db.write_batch()
        self._dirty = self._must_sync = False
        # plyvel's write_batch(sync=) is fixed at creation; write via the DB for a per-commit choice
        batch.write() if not sync else self._write_sync(batch)
        self.commits += 1
        self._drop_unreferenced_segments()
        return True

    def _write_sync(self, batch) -> None:
        batch.write()
        self._db.put(b"m\x00commit", b"", sync=True)  # an fsync'ed write flushes the log before it

    @property
    def dirty(self) -> bool:
        return self._dirty

    def close(self) -> None:
        """Commit what is pending and close the database; idempotent."""
        if self._db.closed:
            return
        try:
            self.commit()
        finally:
            self._db.close()
            self._blobs.close()

    # -- metadata ------------------------------------------------------
    def get_meta(self, name: str) -> bytes | None:
        return self._db.get(b"m\x00" + _part(name))

    def put_meta(self, name: str, value: bytes, durable: bool = True) -> None:
        self.put(b"m\x00" + _part(name), value, durable)

    # -- outbox --------------------------------------------------------
    def outbox_put(self, stream: StreamKey, seq: int, count: int, payload: bytes) -> None:
        """Stage one outbox record of `count` messages starting at `seq`."""
        key = _stream_prefix(stream) + _SEQ.pack(seq, count)
        self._unref(key)
        if len(payload) >= self.blob_min_bytes:
            payload = self._append_blob(key, payload)
        self.put(key, payload, durable=True)

    def outbox_delete(self, stream: StreamKey, seq: int, count: int) -> None:
        key = _stream_prefix(stream) + _SEQ.pack(seq, count)
        self._unref(key)
        self.delete(key)

    # -- large records in segment files ----------------------------------
    def _append_blob(self, key: bytes, payload: bytes) -> bytes:
        """Write a record's payload to the segment log; its reference (the value the index keeps)."""
        before = self._blobs.active
        seg, offset = self._blobs.append(payload)
        self._ref(key, seg, offset, len(payload))
        if seg != before:
            self._compact_sparse_segment()
        return _REF.pack(_REF_MARK, seg, offset, len(payload))

    def _ref(self, key: bytes, seg: int, offset: int, length: int) -> None:
        self._blob_refs[key] = (seg, offset, length)
        self._seg_keys.setdefault(seg, set()).add(key)
        self._seg_live[seg] = self._seg_live.get(seg, 0) + length

    def _unref(self, key: bytes) -> None:
        ref = self._blob_refs.pop(key, None)
        if ref is not None:
            seg, _, length = ref
            keys = self._seg_keys[seg]
            keys.discard(key)
            self._seg_live[seg] -= length
            if not keys:
                self._maybe_unreferenced.add(seg)

    def _resolve(self, value: bytes) -> bytes:
        """A stored outbox value as its payload (read from a segment when it is a reference)."""
        if not value.startswith(_REF_PREFIX):
            return value
        _, seg, offset, length = _REF.unpack(value)
        return self._blobs.read(seg, offset, length)

    @staticmethod
    def _stored_size(value: bytes) -> int:
        return _REF.unpack(value)[3] if value.startswith(_REF_PREFIX) else len(value)

    def _load_blob_refs(self) -> None:
        """Rebuild the reference counts from the index; delete segments nothing refers to."""
        for key, value in self._db.iterator(prefix=b"o\x00"):
            if value.startswith(_REF_PREFIX):
                _, seg, offset, length = _REF.unpack(value)
                self._ref(key, seg, offset, length)
        self._maybe_unreferenced.update(self._blobs.segments())
        self._drop_unreferenced_segments()

    def _drop_unreferenced_segments(self) -> None:
        """Delete closed segments that no reference points into (only with nothing staged)."""
        if self._dirty or not self._maybe_unreferenced:
            return
        for seg in [s for s in self._maybe_unreferenced if s != self._blobs.active]:
            self._maybe_unreferenced.discard(seg)
            if not self._seg_keys.get(seg):
                self._blobs.remove(seg)
                self._seg_keys.pop(seg, None)
                self._seg_live.pop(seg, None)

    def _compact_sparse_segment(self) -> None:
        """Copy the live records of one closed, mostly dead segment forward, so that it can go."""
        if self._compacting:
            return
        for seg in self._blobs.segments():
            if seg != self._blobs.active and self._seg_keys.get(seg) \
                    and self._seg_live[seg] * 4 < self._blobs.size(seg):
                self._compacting = True
                try:
                    for key in sorted(self._seg_keys[seg]):
                        _, offset, length = self._blob_refs[key]
                        payload = self._blobs.read(seg, offset, length)
                        self._unref(key)
                        self.put(key, self._append_blob(key, payload), durable=True)
                finally:
                    self._compacting = False
                return

    def outbox_records(self, stream: StreamKey, from_seq: int = 0, include_value: bool = True) -> Iterator:
        """Yield (seq, count[, payload]) of a stream's records whose last seq >= from_seq, in order."""
        prefix = _stream_prefix(stream)
        n = len(prefix)
        end = prefix[:-1] + b"\x01"      # the prefix ends with the \x00 separator
        it = None
        if from_seq:
            # Sends resume on record boundaries, so a record usually starts exactly at from_seq:
            # a forward seek finds it without the backward step, which in LevelDB walks back
            # over the tombstones of every deleted record of the stream (O(acked records)).
            start = prefix + _SEQ.pack(from_seq, 0)
            it = self._db.iterator(start=start, stop=end, include_value=include_value)
            first = next(it, None)
            if first is not None and _SEQ.unpack_from(first[0] if include_value else first, n)[0] == from_seq:
                it = itertools.chain((first,), it)
            else:
                it = self._db.iterator(prefix=prefix, include_value=include_value)
                it.seek(start)
                try:
                    it.prev()  # step back onto the record that may span from_seq
                except StopIteration:
                    pass
        else:
            it = self._db.iterator(prefix=prefix, include_value=include_value)
        for entry in it:
            key = entry[0] if include_value else entry
            seq, count = _SEQ.unpack_from(key, n)
            if seq + count - 1 < from_seq:
                continue
            yield (seq, count, self._resolve(entry[1])) if include_value else (seq, count)

    def outbox_record_sizes(self, stream: StreamKey) -> Iterator[tuple[int, int, int]]:
        """Yield (seq, count, payload bytes) of a stream's records, in order, without reading large payloads."""
        n = len(_stream_prefix(stream))
        for key, value in self._db.iterator(prefix=_stream_prefix(stream)):
            seq, count = _SEQ.unpack_from(key, n)
            yield seq, count, self._stored_size(value)

    def outbox_streams(self) -> Iterator[tuple[StreamKey, int, int]]:
        """Yield (stream, messages, bytes) for every stream that has records."""
        current: StreamKey | None = None
        msgs = size = 0
        for key, value in self._db.iterator(prefix=b"o\x00"):
            parts = key[2:].split(b"\x00", 3)
            stream = StreamKey(parts[0].decode(), parts[1].decode(), parts[2].decode())
            _, count = _SEQ.unpack_from(parts[3])
            if stream != current:
                if current is not None:
                    yield current, msgs, size
                current, msgs, size = stream, 0, 0
            msgs += count
            size += self._stored_size(value)
        if current is not None:
            yield current, msgs, size

    # -- sequence numbers and watermarks -------------------------------
    def get_seq(self, table: bytes, tenant: str, peer: str, lane: str) -> int:
        raw = self._db.get(table + b"\x00" + _part(tenant) + b"\x00" + _part(peer) + b"\x00" + _part(lane))
        return _Q.unpack(raw)[0] if raw else 0

    def put_seq(self, table: bytes, tenant: str, peer: str, lane: str, value: int, durable: bool = False) -> None:
        self.put(table + b"\x00" + _part(tenant) + b"\x00" + _part(peer) + b"\x00" + _part(lane), _Q.pack(value), durable)

    def seqs(self, table: bytes) -> Iterator[tuple[str, str, str, int]]:
        """Yield (tenant, peer, lane, value) for every entry of a sequence table."""
        for key, value in self._db.iterator(prefix=table + b"\x00"):
            tenant, peer, lane = key[2:].split(b"\x00", 2)
            yield tenant.decode(), peer.decode(), lane.decode(), _Q.unpack(value)[0]

    # -- dead letters --------------------------------------------------
    def dlq_put(self, tenant: str, dlq_id: str, value: bytes) -> None:
        """Stage a dead letter (durable)."""
        self.put(b"x\x00" + _part(tenant) + b"\x00" + _part(dlq_id), value, durable=True)

    def dlq_get(self, tenant: str, dlq_id: str) -> bytes | None:
        return self._db.get(b"x\x00" + _part(tenant) + b"\x00" + _part(dlq_id))

    def dlq_delete(self, tenant: str, dlq_id: str) -> None:
        self.delete(b"x\x00" + _part(tenant) + b"\x00" + _part(dlq_id))

    def dlq_scan(self, tenant: str) -> Iterator[tuple[str, bytes]]:
        """Yield (dlq id, value) of a tenant's dead letters, oldest message id first."""
        prefix = b"x\x00" + _part(tenant) + b"\x00"
        for key, value in self._db.iterator(prefix=prefix):
            yield key[len(prefix):].decode(), value

    # -- delayed messages ----------------------------------------------
    @staticmethod
    def _delayed_key(due_ms: int, tenant: str, msg_id: bytes) -> bytes:
        return b"y\x00" + _Q.pack(due_ms) + b"\x00" + _part(tenant) + b"\x00" + msg_id

    def delayed_put(self, due_ms: int, tenant: str, msg_id: bytes, value: bytes) -> None:
        """Stage a delayed message (durable: it was accepted from a client)."""
        self.put(self._delayed_key(due_ms, tenant, msg_id), value, durable=True)

    def delayed_delete(self, due_ms: int, tenant: str, msg_id: bytes) -> None:
        self.delete(self._delayed_key(due_ms, tenant, msg_id))

    def delayed_due(self, now_ms: int | None = None) -> Iterator[tuple[int, str, bytes, bytes]]:
        """Yield (due_ms, tenant, msg_id, value) in due order (only those due by `now_ms` if given)."""
        for key, value in self._db.iterator(prefix=b"y\x00"):
            due = _Q.unpack_from(key, 2)[0]
            if now_ms is not None and due > now_ms:
                return
            tenant, msg_id = key[11:].split(b"\x00", 1)
            yield due, tenant.decode(), msg_id, value
