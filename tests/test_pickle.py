"""Copies and pickles (docs/design/concurrency.md): every public object pickles, deep-copies and
round-trips through joblib into an equal, independent, working object — or raises a TypeError
that says to use save().  "Working" is checked by using the copy (search, predict, read rows)
and comparing with the original.
"""
from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch

import tlfast
from tlfast import Index
from tlfast.distributed import ShardedIndex

joblib = pytest.importorskip("joblib")


def _roundtrips(obj):
    """(how, copy) for pickle, deepcopy and joblib."""
    buf = io.BytesIO()
    joblib.dump(obj, buf)
    buf.seek(0)
    return [("pickle", pickle.loads(pickle.dumps(obj))), ("deepcopy", copy.deepcopy(obj)),
            ("joblib", joblib.load(buf))]


def _data(n=1000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((7, d)).astype(np.float32)


INDEXES = [
    ("flat", "cosine", {}),
    ("flat", "l2", {"dtype": "float16"}),
    ("flat", "ip", {"dtype": "bfloat16"}),
    ("ivf", "l2", {"engine": "tlfast", "nlist": 8}),  # FusedIVF: the binding used to reject unpickled arrays
    ("ivf", "kl", {"nlist": 8}),
    ("ivf", "cosine", {"nlist": 8}),  # faiss-backed
    ("ivfpq", "l2", {"nlist": 8, "m": 4, "nbits": 4}),
    ("hnsw", "ip", {}),
]


@pytest.mark.parametrize("kind,metric,params", INDEXES, ids=[f"{k}-{m}-{list(p.values())[:1]}" for k, m, p in INDEXES])
def test_index_pickles_copies_and_joblibs(kind, metric, params):
    if kind != "flat" and params.get("engine") != "tlfast" and metric != "kl":
        pytest.importorskip("faiss")
    x, q = _data()
    if metric == "kl":
        x, q = np.abs(x) + 0.1, np.abs(q) + 0.1
        x, q = x / x.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    index = Index(metric, kind=kind, **params).add(x[:800], ids=np.arange(800) * 3)
    ref = index.search(q, 5)
    for how, dup in _roundtrips(index):
        got = dup.search(q, 5)
        np.testing.assert_array_equal(got.indices, ref.indices, err_msg=how)
        np.testing.assert_allclose(got.values, ref.values, rtol=1e-6, err_msg=how)
        dup.add(x[800:], ids=np.arange(800, 1000) * 3)  # independent: the original keeps 800 rows
        assert len(dup) == 1000 and len(index) == 800, how
    np.testing.assert_array_equal(index.search(q, 5).indices, ref.indices)


def test_untrained_approximate_index_pickles():
    x, q = _data(100)
    index = Index("l2", kind="ivf", engine="tlfast").add(x)  # below the auto-train size: exact
    for how, dup in _roundtrips(index):
        np.testing.assert_array_equal(dup.search(q, 3).indices, tlfast.knn(q, x, 3, "l2").indices, err_msg=how)


def test_memory_mapped_index_pickles_into_memory(tmp_path):
    x, q = _data(300)
    Index("l2").add(x).save(tmp_path / "i")
    mapped = Index.load(tmp_path / "i", mmap=True)
    ref = mapped.search(q, 4)
    for how, dup in _roundtrips(mapped):
        assert not dup._mapped, how
        np.testing.assert_array_equal(dup.search(q, 4).indices, ref.indices, err_msg=how)


def test_results_pickle():
    x, q = _data(50)
    res = tlfast.knn(q, x, 3)
    tres = tlfast.knn(torch.from_numpy(q), torch.from_numpy(x), 3)
    m = tlfast.match(q, x)
    for how, dup in _roundtrips(res) + _roundtrips(tres) + _roundtrips(m):
        assert type(dup).__name__ in ("KnnResult", "Matches"), how
    for (_, a), (_, b) in zip(_roundtrips(res), _roundtrips(m)):
        np.testing.assert_array_equal(a.indices, res.indices)
        for field_a, field_b in zip(b, m):
            np.testing.assert_array_equal(np.asarray(field_a), np.asarray(field_b))


def test_estimators_pickle():
    pytest.importorskip("sklearn")
    x, q = _data(120)
    y = np.arange(120) % 3
    for est in (tlfast.KNNClassifier(k=3).fit(x, y), tlfast.LinearProbe(max_iter=5).fit(x, y)):
        ref = est.predict(q)
        for how, dup in _roundtrips(est):
            np.testing.assert_array_equal(dup.predict(q), ref, err_msg=f"{type(est).__name__} {how}")
    from sklearn.base import clone
    assert clone(tlfast.KNNClassifier(k=4)).k == 4


def test_feature_store_pickles_as_a_reference_to_its_folder(tmp_path):
    from test_store import _data as token_data, _extractor

    ext = _extractor()
    store = ext.extract_to(tmp_path / "s", token_data(), shard_size=5)
    rows = np.asarray(store)
    blob = pickle.dumps(store)
    assert len(blob) < rows.nbytes + 1000 or rows.nbytes < 2000  # no rows inside: only the manifest
    for how, dup in _roundtrips(store):
        np.testing.assert_array_equal(np.asarray(dup), rows, err_msg=how)
        assert isinstance(dup.shard(0), np.memmap), how  # reopened from the folder, not a copy
    for how, dup in _roundtrips(ext):
        torch.testing.assert_close(dup.extract(token_data(4)), ext.extract(token_data(4)), msg=how)


def test_sharded_index_copies_and_refuses_to_pickle_its_group():
    x, _ = _data(20)
    index = ShardedIndex("l2").add(x[:10], ids=np.arange(10) + 7)
    for how, dup in _roundtrips(index):
        dup.add(x[10:], ids=np.arange(10) + 100)
        assert len(dup) == 20 and len(index) == 10, how
    bound = ShardedIndex("l2", group=object()).add(x[:3])
    with pytest.raises(TypeError, match="save"):
        pickle.dumps(bound)
    dup = copy.deepcopy(bound)  # same process: the copy shares the group
    assert dup.group is bound.group and len(dup) == 3
