"""Message ids: 16 bytes, unique, and time-ordered per producer (8-byte ns clock + 8-byte producer nonce)."""

from __future__ import annotations

import os
import struct
import time

_pack_q = struct.Struct(">Q").pack
_unpack_q = struct.Struct(">Q").unpack_from


class IdGenerator:
    """Hands out strictly increasing, globally unique 16-byte ids."""

    __slots__ = ("_last", "_suffix")

    def __init__(self, suffix: bytes | None = None) -> None:
        self._suffix = suffix if suffix is not None else os.urandom(8)
        self._last = 0

    def next(self, now_ns: int | None = None) -> bytes:
        """Return a new id; `now_ns` defaults to the wall clock."""
        t = time.time_ns() if now_ns is None else now_ns
        if t <= self._last:
            t = self._last + 1
        self._last = t
        return _pack_q(t) + self._suffix


def id_time_ns(msg_id: bytes) -> int:
    """The creation time encoded in a message id, in ns since the epoch."""
    return _unpack_q(msg_id)[0]
