"""Wire encoding of messages and control frames (pure; bounded, typed decoding).

Theory of operation
-------------------
Every ZeroMQ message meshq sends is a multipart message ``[kind, header, *payload]``:

* ``kind`` is one byte naming the frame (see `Kind`);
* ``header`` is a small msgpack value whose shape depends on the kind;
* data-carrying kinds (PUB, DELIVER, MSG) have one payload frame: a msgpack array of
  *items*, one per message.  An item is ``[id, subject, headers, created_ms, expires_ms,
  body]``: ``id`` 16 bytes, time-ordered; ``headers`` a str→str map or nil; ``expires_ms``
  an absolute expiry or nil; ``body`` the application bytes, carried verbatim as a msgpack
  ``bin`` (never decoded or re-encoded as structure).

What is *not* in an item is deliberate: the tenant, the producing agent and the attempt
number belong to the link and the batch, and a receiver takes them from the authenticated
link and the batch header, never from anything the sender wrote per message.

Batching is the point: the agent handles, stores and acknowledges a whole payload at a
time, so per-message cost is one C-level unpack plus a few type checks.

Decoding never trusts its input: sizes are checked before unpacking, msgpack limits are
set, ``strict_map_key`` is on, and every shape error becomes `RemoteProtocolError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import msgpack

from ._errors import LocalProtocolError, RemoteProtocolError

PROTOCOL_VERSION = 1

MAX_HEADER_BYTES = 64 * 1024          # a control header
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024  # one batch payload frame
MAX_BODY_BYTES = 8 * 1024 * 1024      # one message body (tenants may set less)
MAX_HEADERS = 64
MAX_HEADER_FIELD = 4096
MAX_BATCH_ITEMS = 100_000


class Kind:
    """One-byte frame kinds."""

    HELLO = b"H"
    WELCOME = b"W"
    HEARTBEAT = b"h"
    ERROR = b"E"
    # client -> agent
    PUB = b"P"
    SUB = b"S"
    UNSUB = b"U"
    ACK = b"A"
    NACK = b"N"
    STATUS = b"T"
    BYE = b"B"
    IN_PROGRESS = b"I"  # [[first_tag, last_tag], ...]: still working on these, extend their ack wait
    DLQ = b"Z"          # [req_id, op, id]: dead-letter request (list, show, requeue, purge)
    # agent -> client
    PUBACK = b"p"
    SUBOK = b"s"
    MSG = b"M"
    STATUSOK = b"t"
    EXPIRED = b"e"      # [[sid, tag, msg_id], ...]: ack wait passed; these tags are void, the ids come again
    DLQOK = b"z"        # [req_id, result, error]: answer to a DLQ request
    # agent <-> agent
    DIR = b"D"
    PROOF = b"R"
    MARKS = b"K"
    DELIVER = b"X"
    DACK = b"a"
    DNACK = b"n"
    PEERS = b"L"        # [[agent_id, endpoint, pubkey], ...]: the agents the sender is linked to
    PROBE = b"Q"        # {target}: do you still hear this agent?
    PROBE_ACK = b"q"    # {target, ago}: seconds since I last heard it (nil: I do not)
    # directory sync and request/reply (see _dirsync, _requests)
    # DIR (agent -> agent): [DIR, {"t": tenant, "op": "ask"|"delta"}, bulk(versions map | directory segments)]
    REQ = b"Y"          # client -> agent: [REQ, [req_id, timeout_ms], items(one item)]
    RESPOND = b"y"      # client -> agent: [RESPOND, {"to": reply address}, items(one item)]
    REPLY = b"o"        # agent -> client: [REPLY, [req_id], items(one item)]
    PEER_REPLY = b"O"   # agent -> agent: [PEER_REPLY, [tenant, session_hex, req_id], items(one item)]
    DIRQ = b"G"         # client -> agent: [DIRQ, {}]
    DIRQOK = b"g"       # agent -> client: [DIRQOK, {}, bulk(listing)]


_packer = msgpack.Packer(use_bin_type=True)


def pack(obj: Any) -> bytes:
    """msgpack-encode a control header or payload."""
    try:
        return _packer.pack(obj)
    except (TypeError, ValueError, OverflowError) as e:
        raise LocalProtocolError(f"cannot encode {type(obj).__name__}: {e}") from None


def unpack_header(data: bytes) -> Any:
    """Decode a control header, bounded; malformed input raises RemoteProtocolError."""
    if len(data) > MAX_HEADER_BYTES:
        raise RemoteProtocolError(f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_array_len=MAX_BATCH_ITEMS, max_map_len=4096,
        )
    except Exception as e:  # msgpack raises a zoo of types for bad input
        raise RemoteProtocolError(f"malformed header: {type(e).__name__}") from None


MAX_BULK_BYTES = 16 * 1024 * 1024   # a directory snapshot or listing


def unpack_bulk(data: bytes, limit: int = MAX_BULK_BYTES) -> Any:
    """Decode a bulk control frame (directory sync, listings), bounded; malformed input raises RemoteProtocolError."""
    if len(data) > limit:
        raise RemoteProtocolError(f"bulk frame of {len(data)} bytes exceeds {limit}")
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_array_len=MAX_BATCH_ITEMS, max_map_len=MAX_BATCH_ITEMS,
        )
    except Exception as e:
        raise RemoteProtocolError(f"malformed bulk frame: {type(e).__name__}") from None


def unpack_items(payload: bytes) -> list:
    """Decode a batch payload into a list of validated items (see module doc)."""
    n = len(payload)
    if n > MAX_PAYLOAD_BYTES:
        raise RemoteProtocolError(f"payload of {n} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        items = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, use_list=True,
            max_array_len=MAX_BATCH_ITEMS, max_map_len=MAX_HEADERS,
        )
    except Exception as e:
        raise RemoteProtocolError(f"malformed payload: {type(e).__name__}") from None
    if type(items) is not list:
        raise RemoteProtocolError("payload is not an array of items")
    for item in items:
        # the common shape checked inline; anything else (or headers) gets the full check,
        # which raises with a precise message or accepts
        if type(item) is not list or len(item) != 6:
            check_item(item)
        mid, subject, headers, created, expires, body = item
        if (type(mid) is not bytes or len(mid) != 16 or type(subject) is not str or not subject
                or len(subject) > 1024 or type(body) is not bytes or type(created) is not int
                or headers is not None or (expires is not None and type(expires) is not int)):
            check_item(item)
    return items


def check_item(item: Any) -> None:
    """Raise RemoteProtocolError unless `item` has the shape of a message item."""
    if type(item) is not list or len(item) != 6:
        raise RemoteProtocolError("item is not a 6-element array")
    mid, subject, headers, created, expires, body = item
    if type(mid) is not bytes or len(mid) != 16:
        raise RemoteProtocolError("item id is not 16 bytes")
    if type(subject) is not str or not subject or len(subject) > 1024:
        raise RemoteProtocolError("item subject is not a string of 1..1024 characters")
    if type(body) is not bytes:
        raise RemoteProtocolError("item body is not bytes")
    if type(created) is not int:
        raise RemoteProtocolError("item created time is not an integer")
    if expires is not None and type(expires) is not int:
        raise RemoteProtocolError("item expiry is not an integer or nil")
    if headers is not None:
        if type(headers) is not dict:
            raise RemoteProtocolError("item headers are not a map")
        for k, v in headers.items():
            if type(v) is not str or len(k) > MAX_HEADER_FIELD or len(v) > MAX_HEADER_FIELD:
                raise RemoteProtocolError("item header is not a bounded str→str pair")


def make_item(
    msg_id: bytes, subject: str, headers: Mapping[str, str] | None,
    created_ms: int, expires_ms: int | None, body: bytes,
) -> list:
    """Build an item, checking what a local caller passed (LocalProtocolError on misuse)."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(f"message data must be bytes, not {type(body).__name__}")
    if headers:
        if len(headers) > MAX_HEADERS:
            raise LocalProtocolError(f"at most {MAX_HEADERS} headers per message")
        for k, v in headers.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise LocalProtocolError("header names and values must be str")
            if len(k) > MAX_HEADER_FIELD or len(v) > MAX_HEADER_FIELD:
                raise LocalProtocolError(f"header fields are limited to {MAX_HEADER_FIELD} characters")
        headers = dict(headers)
    else:
        headers = None
    return [msg_id, subject, headers, created_ms, expires_ms, bytes(body)]


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message with its link-level context, as handed between the parts of an agent."""

    msg_id: bytes
    subject: str
    headers: Mapping[str, str] | None
    created_ms: int
    expires_ms: int | None
    body: bytes
    tenant: str = ""
    producer: str = ""
    attempt: int = 1

    @classmethod
    def from_item(cls, item: list, tenant: str = "", producer: str = "", attempt: int = 1) -> "Envelope":
        """Wrap a validated item."""
        return cls(item[0], item[1], item[2], item[3], item[4], item[5], tenant, producer, attempt)

    def to_item(self) -> list:
        """The wire item for this envelope."""
        return [self.msg_id, self.subject, self.headers, self.created_ms, self.expires_ms, self.body]


def header_field(header: Any, key: str, typ: type | tuple, default: Any = ...) -> Any:
    """Fetch `key` from a decoded map header with a type check (RemoteProtocolError if wrong)."""
    if type(header) is not dict:
        raise RemoteProtocolError("header is not a map")
    if key not in header:
        if default is ...:
            raise RemoteProtocolError(f"header lacks {key!r}")
        return default
    value = header[key]
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
        raise RemoteProtocolError(f"header field {key!r} has the wrong type")
    return value
