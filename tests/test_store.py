"""The store on a real LevelDB in a temp dir: outbox records, large ones in segment files."""

from __future__ import annotations

import os

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from meshq._errors import MeshqError
from meshq._store import Store, StreamKey

A = StreamKey("t1", "agent-b", "p")
B = StreamKey("t1", "agent-c", "g:workers")


def _segments(path: str) -> list[str]:
    return sorted(os.listdir(os.path.join(path, "blobs")))


def _records(store: Store, stream: StreamKey) -> dict[int, bytes]:
    return {seq: payload for seq, _count, payload in store.outbox_records(stream)}


def test_large_records_live_in_segments_and_survive_reopen(workdir):
    path = os.path.join(workdir, "store")
    store = Store(path, blob_min_bytes=1024)
    big = [bytes([i]) * 70_000 for i in range(5)]
    for i, payload in enumerate(big):
        store.outbox_put(A, 1 + i, 1, payload)
    store.outbox_put(A, 6, 1, b"small")
    store.commit()
    assert _records(store, A) == {1: big[0], 2: big[1], 3: big[2], 4: big[3], 5: big[4], 6: b"small"}
    assert list(store.outbox_streams()) == [(A, 6, 5 * 70_000 + 5)]
    assert list(store.outbox_record_sizes(A)) == [(seq, 1, 70_000) for seq in range(1, 6)] + [(6, 1, 5)]
    index_value = store._db.get(next(store._db.iterator(prefix=b"o\x00", include_value=False)))
    assert len(index_value) < 64, "the index keeps a reference, not the body"
    store.close()

    again = Store(path, blob_min_bytes=1024)
    assert _records(again, A)[3] == big[2]
    assert list(again.outbox_streams()) == [(A, 6, 5 * 70_000 + 5)]
    again.close()


def test_a_segment_goes_once_nothing_refers_to_it(workdir):
    path = os.path.join(workdir, "store")
    store = Store(path, blob_min_bytes=1024, segment_bytes=200_000)
    for seq in range(1, 9):
        store.outbox_put(A, seq, 1, os.urandom(60_000))
    store.commit()
    first_segments = _segments(path)
    assert len(first_segments) >= 3
    for seq in range(1, 9):
        store.outbox_delete(A, seq, 1)
    assert _segments(path) == first_segments, "nothing is removed before the deletes are committed"
    store.commit()
    assert _segments(path) == first_segments[-1:], "only the active segment is left"
    store.close()


def test_a_sparse_segment_is_copied_forward_when_the_log_rolls(workdir):
    path = os.path.join(workdir, "store")
    store = Store(path, blob_min_bytes=1024, segment_bytes=300_000)
    keep = os.urandom(50_000)
    store.outbox_put(B, 1, 1, keep)              # an offline consumer's record: it stays
    for seq in range(1, 5):
        store.outbox_put(A, seq, 1, os.urandom(60_000))
    store.commit()
    oldest = _segments(path)[0]
    for seq in range(1, 5):
        store.outbox_delete(A, seq, 1)
    store.commit()
    assert oldest in _segments(path), "still referred to by B's record"
    for seq in range(5, 15):                     # traffic rolls the log: the sparse segment is compacted
        store.outbox_put(A, seq, 1, os.urandom(60_000))
        store.outbox_delete(A, seq, 1)
        store.commit()
    assert oldest not in _segments(path)
    assert _records(store, B) == {1: keep}
    store.close()
    assert _records(reopened := Store(path, blob_min_bytes=1024), B) == {1: keep}
    reopened.close()


def _closed_store_with_one_large_record(workdir: str) -> str:
    """A store holding one 5000-byte record of stream A in a segment, closed; its path."""
    path = os.path.join(workdir, "store")
    store = Store(path, blob_min_bytes=1024)
    store.outbox_put(A, 1, 1, os.urandom(5000))
    store.commit()
    store.close()
    return path


def test_segments_without_references_are_removed_at_open(workdir):
    path = _closed_store_with_one_large_record(workdir)
    stray = os.path.join(path, "blobs", "000000000000.seg")   # e.g. appended, then a crash before the index
    with open(stray, "wb") as f:
        f.write(os.urandom(5000))
    again = Store(path, blob_min_bytes=1024)
    assert "000000000000.seg" not in _segments(path)
    assert len(_records(again, A)[1]) == 5000
    again.close()


def test_a_truncated_segment_is_a_clear_error(workdir):
    path = _closed_store_with_one_large_record(workdir)
    seg = os.path.join(path, "blobs", _segments(path)[0])
    os.truncate(seg, 100)
    again = Store(path, blob_min_bytes=1024)
    with pytest.raises(MeshqError, match="truncated"):
        _records(again, A)
    again.close()


class OutboxModel(RuleBasedStateMachine):
    """Random puts, overwrites, deletes, commits and reopenings agree with a dict."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="mq-store-")
        self.path = os.path.join(self.dir, "store")
        self.store = self._open()
        self.committed: dict[tuple[StreamKey, int], bytes] = {}
        self.staged: dict[tuple[StreamKey, int], bytes | None] = {}

    def _open(self) -> Store:
        return Store(self.path, blob_min_bytes=256, segment_bytes=4096)

    @rule(stream=st.sampled_from([A, B]), seq=st.integers(1, 12), size=st.sampled_from([10, 300, 1500, 5000]))
    def put(self, stream, seq, size):
        payload = os.urandom(size)
        self.store.outbox_put(stream, seq, 1, payload)
        self.staged[(stream, seq)] = payload

    @rule(stream=st.sampled_from([A, B]), seq=st.integers(1, 12))
    def delete(self, stream, seq):
        self.store.outbox_delete(stream, seq, 1)
        self.staged[(stream, seq)] = None

    @rule()
    def commit(self):
        self.store.commit()
        for key, value in self.staged.items():
            if value is None:
                self.committed.pop(key, None)
            else:
                self.committed[key] = value
        self.staged.clear()
        in_segments = sum(1 for v in self.committed.values() if len(v) >= 256)
        assert len(_segments(self.path)) <= in_segments + 1, "a segment nothing refers to was kept"

    @precondition(lambda self: not self.staged)
    @rule()
    def reopen(self):
        self.store.close()
        self.store = self._open()

    @invariant()
    def committed_records_read_back(self):
        for stream in (A, B):
            want = {seq: v for (s, seq), v in self.committed.items() if s == stream}
            assert _records(self.store, stream) == want

    def teardown(self):
        import shutil
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestOutboxModel = OutboxModel.TestCase
TestOutboxModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None, derandomize=True,
                                    suppress_health_check=[HealthCheck.too_slow])
