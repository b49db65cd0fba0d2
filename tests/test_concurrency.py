"""Concurrent mutation (docs/design/concurrency.md): searches run concurrently with each other,
add / train wait for them, so every search sees the index after some prefix of the adds; copies
are independent; add copies its input.

Real threads hammer one index; each test asserts invariants that a torn read breaks: len() is a
whole number of batches, every search sees exactly a prefix of the batches (query j is found at
distance 0 iff row j is visible, and no neighbour lies beyond that prefix), and a save after the
adds loads back exactly what was added.
"""
from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

import tlfast
from tlfast import Index
from tlfast._rwlock import RWLock

BATCH, BATCHES, DIM = 20, 15, 8


def _rows(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((BATCH * BATCHES, DIM)).astype(np.float32)


def _run_threads(*targets):
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # reported to the test, not lost in the thread
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def _hammer(index: Index, rows: np.ndarray, ids: np.ndarray | None, searches_per_reader=25, readers=2):
    """One writer adds BATCHES batches while ``readers`` threads search; checks the prefix invariant."""
    done = threading.Event()
    seen_prefixes: list[int] = []
    id_of = np.arange(len(rows)) if ids is None else ids

    def writer():
        for b in range(BATCHES):
            sl = slice(b * BATCH, (b + 1) * BATCH)
            index.add(rows[sl], ids=None if ids is None else ids[sl])
        done.set()

    def reader():
        count = 0
        while count < searches_per_reader or not done.is_set():
            n = len(index)
            assert n % BATCH == 0, f"len() = {n} is not a whole number of added batches"
            if n == 0:
                continue
            res = index.search(rows, 3)
            found = res.indices[:, 0] == id_of  # query j found itself
            prefix = int(found.sum())
            assert prefix % BATCH == 0 and found[:prefix].all() and not found[prefix:].any(), \
                "a search saw a set of rows that is not a prefix of the adds"
            visible = set(id_of[:prefix].tolist())
            assert set(res.indices.ravel().tolist()) <= visible, "a neighbour from beyond the visible prefix"
            if index.dtype == "float32":
                np.testing.assert_allclose(res.values[:prefix, 0], 0.0, atol=1e-4)
            seen_prefixes.append(prefix)
            count += 1

    _run_threads(writer, *[reader] * readers)
    assert len(index) == len(rows)
    return seen_prefixes


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_add_while_searching_sees_a_prefix(dtype):
    rows = _rows()
    _hammer(Index("l2", dtype=dtype), rows, None)


def test_add_with_ids_while_searching_maps_ids_consistently():
    rows = _rows(1)
    ids = (np.arange(len(rows)) * 7 + 3).astype(np.int64)  # ids differ from positions
    index = Index("l2")
    _hammer(index, rows, ids)
    res = index.search(rows, 1)
    np.testing.assert_array_equal(res.indices[:, 0], ids)


def test_cosine_concurrent_searches_compact_safely():
    """Concurrent readers each try to join the segment list: the join must happen once, correctly."""
    rows = _rows(2)
    index = Index("cosine")
    for b in range(BATCHES):
        index.add(rows[b * BATCH:(b + 1) * BATCH])
    ref = tlfast.knn(rows, rows, 4, "cosine")
    results = []
    barrier = threading.Barrier(4)

    def reader():
        barrier.wait()
        results.append(index.search(rows, 4))

    _run_threads(*[reader] * 4)
    for r in results:
        np.testing.assert_array_equal(r.indices, ref.indices)


def test_save_after_concurrent_adds_loads_exactly(tmp_path):
    rows = _rows(3)
    index = Index("l2")
    parts = np.array_split(np.arange(len(rows)), 6)

    def adder(part):
        return lambda: [index.add(rows[p:p + 1], ids=np.array([p])) for p in part]

    def saver():
        for i in range(3):
            index.save(tmp_path / f"mid{i}", overwrite=True)

    _run_threads(*[adder(p) for p in parts], saver)
    for i in range(3):  # every intermediate save is internally consistent
        mid = Index.load(tmp_path / f"mid{i}")
        found = mid.search(rows, 1).indices[:, 0] == np.arange(len(rows))  # row p has id p
        assert found.sum() == len(mid), "a save wrote rows and ids that do not match its count"
    index.save(tmp_path / "final")
    back = Index.load(tmp_path / "final")
    assert len(back) == len(rows)
    res = back.search(rows, 1)
    np.testing.assert_array_equal(res.indices[:, 0], np.arange(len(rows)))
    np.testing.assert_allclose(res.values[:, 0], 0, atol=1e-4)


def test_approximate_index_add_while_searching():
    rows = _rows(4)
    index = Index("l2", kind="ivf", engine="tlfast", nlist=4)
    _hammer(index, rows, None, searches_per_reader=10)
    assert index._ann.is_trained


def test_copy_is_independent():
    rows = _rows(5)
    index = Index("cosine").add(rows[:100])
    for dup in (copy.copy(index), copy.deepcopy(index)):
        dup.add(rows[100:150])
        assert len(index) == 100 and len(dup) == 150
        assert index.search(rows[100:150], 1).indices.max() < 100
    with_ids = Index("l2").add(rows[:10], ids=np.arange(10) + 100)
    dup = copy.copy(with_ids).add(rows[10:20], ids=np.arange(10) + 500)
    assert len(with_ids._ids[0]) == 10 and sorted(dup.search(rows[10:20], 1).indices[:, 0]) == list(range(500, 510))


def test_copy_of_approximate_index_is_independent():
    pytest.importorskip("faiss")
    rows = _rows(6)
    index = Index("l2", kind="hnsw").add(rows[:150])
    for dup in (copy.copy(index), copy.deepcopy(index)):
        dup.add(rows[150:300])
        assert len(index) == 150 and len(index._ann) == 150 and len(dup) == 300
        assert index.search(rows[150:], 1).indices.max() < 150


def test_add_copies_the_callers_buffer():
    """A reused batch buffer (a common loading loop) must not rewrite earlier rows."""
    buf = np.ones((4, DIM), dtype=np.float32)
    t = torch.ones(4, DIM)
    for idx, b in ((Index("l2"), buf), (Index("l2"), t), (Index("l2", kind="ivf", engine="tlfast", nlist=2), buf)):
        idx.add(b)
        b[:] = 5.0
        res = idx.search(np.ones((1, DIM), dtype=np.float32), 1)
        assert float(res.values[0, 0]) == 0.0
        b[:] = 1.0


def test_rwlock_writer_is_not_starved_and_excludes_readers():
    lock, state = RWLock(), {"readers": 0, "writer_ran": False, "overlap": False}
    counter = threading.Lock()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            with lock.read():
                with counter:
                    state["readers"] += 1
                with counter:
                    state["readers"] -= 1

    def writer():
        for _ in range(50):
            with lock.write():
                if state["readers"]:
                    state["overlap"] = True
        state["writer_ran"] = True
        stop.set()

    _run_threads(reader, reader, writer)
    assert state["writer_ran"] and not state["overlap"]
