"""Append-only segment files that hold the bodies of large outbox records.

LevelDB copies every value several times (write batch, log, memtable, level files, compactions),
which caps large messages far below the disk's bandwidth.  Records above a size threshold
therefore go to the end of the current segment file, one ``os.write`` each, and the index in
LevelDB keeps only a reference (segment, offset, length).  The store makes the order of
writes safe: a commit fdatasyncs the segments before it writes the index that points into
them, so a reference never outlives a crash while its bytes do not.  Segments are
reclaimed whole, by the store, once no reference points into them.
"""

from __future__ import annotations

import os

from ._errors import MeshqError

SEGMENT_BYTES = 64 << 20          # a segment is closed once it is this large
MAX_OPEN = 64                     # segment files kept open for reading at once
_SUFFIX = ".seg"


class BlobLog:
    """Numbered segment files in one directory: append to the newest, read from any."""

    def __init__(self, path: str, segment_bytes: int = SEGMENT_BYTES) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.segment_bytes = segment_bytes
        self._fds: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        for name in os.listdir(path):
            if name.endswith(_SUFFIX) and name[:-len(_SUFFIX)].isdigit():
                seg = int(name[:-len(_SUFFIX)])
                self._sizes[seg] = os.path.getsize(self._file(seg))
        self._unsynced: set[int] = set()
        self._dir_unsynced = False
        self.active = -1
        self._open_new(max(self._sizes, default=0) + 1)

    def _file(self, seg: int) -> str:
        return os.path.join(self.path, f"{seg:012d}{_SUFFIX}")

    def _open_new(self, seg: int) -> None:
        self._fds[seg] = os.open(self._file(seg), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._sizes[seg] = 0
        self.active = seg
        self._dir_unsynced = True

    def _fd(self, seg: int) -> int:
        fd = self._fds.get(seg)
        if fd is None:
            if len(self._fds) >= MAX_OPEN:
                for old in [s for s in self._fds if s != self.active and s not in self._unsynced][:MAX_OPEN // 2]:
                    self._close_fd(old)
            try:
                fd = self._fds[seg] = os.open(self._file(seg), os.O_RDONLY)
            except FileNotFoundError:
                raise MeshqError(f"outbox segment {self._file(seg)} is missing") from None
        return fd

    def append(self, data: bytes) -> tuple[int, int]:
        """Write `data` at the end of the active segment (rolling over when full); (segment, offset)."""
        if self._sizes[self.active] and self._sizes[self.active] + len(data) > self.segment_bytes:
            self._unsynced.add(self.active)
            self._open_new(self.active + 1)
        seg = self.active
        offset = self._sizes[seg]
        view = memoryview(data)
        while view:
            view = view[os.write(self._fds[seg], view):]
        self._sizes[seg] = offset + len(data)
        self._unsynced.add(seg)
        return seg, offset

    def read(self, seg: int, offset: int, length: int) -> bytes:
        """The `length` bytes at `offset` of segment `seg`."""
        data = os.pread(self._fd(seg), length, offset)
        if len(data) != length:
            raise MeshqError(f"outbox segment {self._file(seg)} is truncated: "
                             f"{length} bytes at {offset} asked for, {len(data)} there")
        return data

    @property
    def dirty(self) -> bool:
        """True when bytes were appended since the last `sync`."""
        return bool(self._unsynced)

    def sync(self, durable: bool) -> None:
        """Make appended bytes survive a crash (fdatasync when `durable`), before an index points at them."""
        if durable:
            for seg in self._unsynced:
                fd = self._fds.get(seg)
                if fd is not None:
                    os.fdatasync(fd)
            if self._dir_unsynced:
                dfd = os.open(self.path, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
                self._dir_unsynced = False
        self._unsynced.clear()

    def segments(self) -> list[int]:
        """Every segment on disk, oldest first (the active one last)."""
        return sorted(self._sizes)

    def size(self, seg: int) -> int:
        return self._sizes.get(seg, 0)

    def remove(self, seg: int) -> None:
        """Delete a segment that nothing refers to any more (never the active one)."""
        if seg == self.active:
            raise MeshqError("the active outbox segment cannot be removed")
        self._close_fd(seg)
        self._sizes.pop(seg, None)
        self._unsynced.discard(seg)
        try:
            os.unlink(self._file(seg))
        except FileNotFoundError:
            pass

    def _close_fd(self, seg: int) -> None:
        fd = self._fds.pop(seg, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Close every file; idempotent."""
        for seg in list(self._fds):
            self._close_fd(seg)
