"""tlfast.Index: exact search equals tlfast.knn, ids, storage dtypes, out-of-core merge, persistence."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

import tlfast
from tlfast.index import Index, parse_bytes

from conftest import HAS_CUDA, TOL, make_inputs

METRICS = ["cosine", "ip", "l2", "kl", "js"]


def _np(metric, nq, n, d, seed=0):
    q, c = make_inputs(metric, nq, n, d, seed)
    return q.numpy(), c.numpy()


@pytest.mark.parametrize("metric", METRICS)
def test_search_equals_knn_over_several_adds(metric):
    q, c = _np(metric, 37, 411, 19)
    index = Index(metric)
    for lo, hi in [(0, 100), (100, 101), (101, 411)]:
        index.add(c[lo:hi])
    assert len(index) == 411
    for k in (1, 7, 411):
        got, ref = index.search(q, k), tlfast.knn(q, c, k, metric)
        np.testing.assert_array_equal(got.indices, ref.indices)
        np.testing.assert_allclose(got.values, ref.values, **TOL[torch.float32])


@pytest.mark.parametrize("metric", METRICS)
def test_out_of_core_equals_in_memory(metric):
    """A budget of 1/4 of the corpus streams >= 4 blocks; the merge must give the same answer."""
    q, c = _np(metric, 23, 1000, 16, seed=1)
    index = Index(metric).add(c)
    quarter = c.nbytes // 4
    for k in (1, 10, 1000):
        full = index.search(q, k)
        streamed = index.search(q, k, memory_budget=quarter)
        np.testing.assert_array_equal(streamed.indices, full.indices)
        np.testing.assert_array_equal(streamed.values, full.values)


def test_out_of_core_ties_break_to_smaller_id_across_blocks():
    base = np.random.default_rng(2).standard_normal((5, 8)).astype(np.float32)
    c = np.repeat(base, 40, axis=0)  # every vector appears 40 times, spread over many blocks
    index = Index("l2").add(c)
    for budget in (8 * 4 * 7, 8 * 4 * 33):
        got = index.search(base, 60, memory_budget=budget)
        np.testing.assert_array_equal(got.indices, tlfast.knn(base, c, 60, "l2").indices)
        assert np.all(np.diff(got.indices[:, :40], axis=1) == 1)  # the 40 exact ties, in id order


def test_ids_are_mapped_back_and_validated():
    q, c = _np("cosine", 11, 120, 8)
    ids = np.arange(120, dtype=np.int64) * 7 + 1000
    index = Index("cosine").add(c[:60], ids=ids[:60]).add(c[60:], ids=ids[60:])
    ref = tlfast.knn(q, c, 5, "cosine")
    np.testing.assert_array_equal(index.search(q, 5).indices, ids[ref.indices])
    np.testing.assert_array_equal(index.search(q, 5, memory_budget=8 * 4 * 13).indices, ids[ref.indices])
    with pytest.raises(ValueError, match="duplicates"):
        Index().add(c[:2], ids=[3, 3])
    with pytest.raises(ValueError, match="already in the index"):
        Index().add(c[:2], ids=[1, 2]).add(c[2:4], ids=[2, 5])
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        Index().add(c[:2], ids=[1])
    with pytest.raises(TypeError, match="integers"):
        Index().add(c[:2], ids=[1.0, 2.0])
    # Implicit ids continue from the count after explicit ones.
    mixed = Index("cosine").add(c[:3], ids=[10, 11, 12]).add(c[3:5])
    assert sorted(mixed.search(c[:5], 5).indices[0].tolist()) == [3, 4, 10, 11, 12]


def test_torch_in_torch_out_and_float64_queries():
    q, c = make_inputs("l2", 9, 50, 6, dtype=torch.float64)
    index = Index("l2").add(c)
    res = index.search(q, 4)
    assert isinstance(res.values, torch.Tensor) and res.values.dtype == torch.float32
    assert res.indices.dtype == torch.int64
    ref = tlfast.knn(q, c, 4, "l2")
    torch.testing.assert_close(res.indices, ref.indices)


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_precision_storage(dtype, torch_dtype):
    q, c = _np("cosine", 30, 300, 32, seed=3)
    index = Index("cosine", dtype=dtype).add(c)
    rounded = torch.from_numpy(c).to(torch_dtype).float().numpy()
    ref = tlfast.knn(q, rounded, 10, "cosine")  # exactly what is stored
    got = index.search(q, 10)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_allclose(got.values, tlfast.knn(q, c, 10, "cosine").values, **TOL[torch_dtype])
    np.testing.assert_array_equal(index.search(q, 10, memory_budget=c.nbytes // 4).indices, ref.indices)
    with pytest.raises(ValueError, match="float16 range"):
        Index("l2", dtype="float16").add(np.full((2, 3), 1e6, np.float32))


def test_bad_input_errors():
    c = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="metric"):
        Index("hamming")
    with pytest.raises(ValueError, match="dtype"):
        Index(dtype="int8")
    with pytest.raises(ValueError, match="flat.*takes no parameters"):
        Index(nlist=4)
    with pytest.raises(ValueError, match="empty"):
        Index().search(c, 1)
    index = Index("cosine").add(c)
    with pytest.raises(ValueError, match="dimension mismatch"):
        index.add(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="dimension mismatch"):
        index.search(np.ones((2, 5), np.float32), 1)
    with pytest.raises(ValueError, match="all zeros"):
        index.add(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="between 1 and 10"):
        index.search(c, 11)
    with pytest.raises(ValueError, match="takes none"):
        index.search(c, 1, nprobe=4)
    with pytest.raises(ValueError, match="smaller than one stored row"):
        index.search(c, 1, memory_budget=8)
    with pytest.raises(ValueError, match="not a size"):
        index.search(c, 1, memory_budget="lots")
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 4), np.nan, np.float32), 1)
    with pytest.raises(ValueError, match="backend"):
        index.search(c, 1, backend="nope")
    assert len(index) == 10  # failed adds left the index unchanged


def test_parse_bytes():
    assert parse_bytes("2GB") == 2 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes(1000) == 1000
    assert parse_bytes("1.5k") == 1536
    for bad in ("-1", "0", "2 parsecs"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    with pytest.raises(TypeError):
        parse_bytes(2.5)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_identical_search(tmp_path, dtype, mmap):
    q, c = _np("cosine", 17, 257, 12, seed=4)
    index = Index("cosine", dtype=dtype).add(c, ids=np.arange(257) + 5_000)
    before = index.search(q, 9)
    index.save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert (meta["format_version"], meta["metric"], meta["dim"], meta["dtype"], meta["count"], meta["kind"]) == \
        (1, "cosine", 12, dtype, 257, "flat")
    assert set(meta["files"]) == {"vectors.npy", "ids.npy"}
    assert all(len(f["sha256"]) == 64 for f in meta["files"].values())
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]  # no temporary directory left behind
    loaded = Index.load(tmp_path / "ix", mmap=mmap)
    assert (len(loaded), loaded.dim, loaded.dtype) == (257, 12, dtype)
    for res in (loaded.search(q, 9), loaded.search(q, 9, memory_budget=12 * 6 * 50)):
        np.testing.assert_array_equal(res.indices, before.indices)
        np.testing.assert_array_equal(res.values, before.values)
    # A memory-mapped index still takes new vectors.
    loaded.add(q[:1], ids=[1])
    assert loaded.search(q[:1], 1).indices[0, 0] == 1


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    c = np.eye(3, dtype=np.float32)
    Index("l2").add(c).save(tmp_path / "ix")
    with pytest.raises(FileExistsError):
        Index("l2").add(c).save(tmp_path / "ix")
    Index("l2").add(c[:2]).save(tmp_path / "ix", overwrite=True)
    assert len(Index.load(tmp_path / "ix")) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]


def test_corrupted_or_truncated_files_are_rejected(tmp_path):
    c = np.random.default_rng(5).standard_normal((64, 8)).astype(np.float32)
    path = Index("l2").add(c).save(tmp_path / "ix")
    vec = path / "vectors.npy"
    data = bytearray(vec.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte inside the vectors
    vec.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"'vectors.npy'.*corrupted"):
        Index.load(path)
    vec.write_bytes(bytes(data[:-40]))
    with pytest.raises(ValueError, match=r"'vectors.npy'.*truncated"):
        Index.load(path)
    vec.unlink()
    with pytest.raises(ValueError, match=r"'vectors.npy' is missing"):
        Index.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json.*corrupted"):
        Index.load(path)
    with pytest.raises(FileNotFoundError, match="not a tlfast index"):
        Index.load(tmp_path / "nowhere")


class _Store:
    """The FeatureStore duck type: len, slicing, shards() over memory-mapped .npy shards."""

    def __init__(self, paths):
        self._shards = [np.load(p, mmap_mode="r") for p in paths]

    def __len__(self):
        return sum(len(s) for s in self._shards)

    def __getitem__(self, item):
        return np.concatenate(self._shards)[item]

    def shards(self):
        return iter(self._shards)


def test_from_store_searches_memory_mapped_shards(tmp_path):
    q, c = _np("cosine", 13, 500, 10, seed=6)
    paths = []
    for i, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 500)]):
        paths.append(tmp_path / f"shard-{i}.npy")
        np.save(paths[-1], c[lo:hi])
    index = Index.from_store(_Store(paths), "cosine")
    assert len(index) == 500 and index.dim == 10
    ref = tlfast.knn(q, c, 8, "cosine")
    for budget in (None, c.nbytes // 4):
        got = index.search(q, 8, memory_budget=budget)
        np.testing.assert_array_equal(got.indices, ref.indices)
        np.testing.assert_allclose(got.values, ref.values, **TOL[torch.float32])
    with pytest.raises(ValueError, match="empty"):
        Index.from_store(_Store([]))
    with pytest.raises(TypeError, match="FeatureStore"):
        Index.from_store(object())


def test_real_feature_store_when_available(tmp_path):
    if not hasattr(tlfast, "FeatureStore"):
        pytest.skip("tlfast.FeatureStore (extraction stage) is not in this build")
    pytest.importorskip("tlfast.extract")
    from tlfast.extract.store import write_store  # noqa: F401 - exercised in test_cli too

    q, c = _np("l2", 5, 300, 8, seed=7)
    store = write_store(tmp_path / "fs", c, shard_size=64)
    index = Index.from_store(store, "l2")
    np.testing.assert_array_equal(index.search(q, 6, memory_budget=c.nbytes // 4).indices,
                                  tlfast.knn(q, c, 6, "l2").indices)


# ----------------------------------------------------------------- approximate kinds (the hook)
class _ExactANN:
    """A stand-in for a tlfast.ann index (the interface of branch issue-7), exact underneath."""

    def __init__(self, metric, dim, nlist=4):
        self.metric, self.dim, self.nlist = metric, dim, nlist
        self.is_trained = False
        self.data = np.zeros((0, dim), np.float32)

    def train(self, x):
        assert x.dtype == np.float32 and x.shape[1] == self.dim
        self.is_trained = True

    def add(self, x):
        assert self.is_trained
        self.data = np.concatenate([self.data, x])

    def search(self, q, k, nprobe=1):
        res = tlfast.knn(q, self.data, min(k, len(self.data)), self.metric)
        pad = k - res.indices.shape[1]
        return (np.pad(res.values, ((0, 0), (0, pad)), constant_values=np.nan),
                np.pad(res.indices, ((0, 0), (0, pad)), constant_values=-1))

    def __len__(self):
        return len(self.data)

    def save(self, directory):
        np.save(f"{directory}/ann.npy", self.data)
        return ["ann.npy"]

    def params(self):
        return {"nlist": self.nlist}


@pytest.fixture
def fake_ann(monkeypatch):
    mod = types.ModuleType("tlfast.ann")
    mod.make_index = lambda kind, metric, dim, **params: _ExactANN(metric, dim, **params)

    def load_index(kind, directory, meta):
        obj = _ExactANN(meta["metric"], meta["dim"], **meta["params"])
        obj.is_trained, obj.data = True, np.load(f"{directory}/ann.npy")
        return obj

    mod.load_index = load_index
    monkeypatch.setitem(sys.modules, "tlfast.ann", mod)
    monkeypatch.setattr(tlfast, "ann", mod, raising=False)
    return mod


def test_approximate_kind_delegates_and_persists(fake_ann, tmp_path):
    q, c = _np("l2", 7, 90, 5, seed=8)
    ids = np.arange(90) * 2
    index = Index("l2", kind="ivf", nlist=8).add(c, ids=ids)
    ref = tlfast.knn(q, c, 4, "l2")
    got = index.search(q, 4, nprobe=2)
    np.testing.assert_array_equal(got.indices, ids[ref.indices])
    with pytest.raises(ValueError, match="memory_budget applies to exact search"):
        index.search(q, 4, memory_budget="1MB")
    path = index.save(tmp_path / "ivf")
    meta = json.loads((path / "manifest.json").read_text())
    assert meta["kind"] == "ivf" and meta["params"] == {"nlist": 8} and set(meta["files"]) == {"ann.npy", "ids.npy"}
    loaded = Index.load(path)
    np.testing.assert_array_equal(loaded.search(q, 4).indices, got.indices)
    (path / "ann.npy").write_bytes((path / "ann.npy").read_bytes()[:-8])
    with pytest.raises(ValueError, match="'ann.npy'.*truncated"):
        Index.load(path)


def test_padding_of_approximate_results_maps_to_minus_one(fake_ann):
    index = Index("l2", kind="ivf").add(np.eye(3, dtype=np.float32), ids=[7, 8, 9])
    index._ann.data = index._ann.data[:2]  # the approximate index can return fewer than k
    res = index.search(np.eye(3, dtype=np.float32)[:1], 3)
    assert res.indices[0].tolist() == [7, 8, -1]


def test_unknown_kind_without_ann_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tlfast.ann", None)  # makes `from . import ann` fail
    with pytest.raises(ValueError, match="tlfast.ann"):
        Index("l2", kind="ivf").add(np.eye(3, dtype=np.float32))


@pytest.mark.gpu
def test_out_of_core_from_host_memory_map_on_gpu(tmp_path):
    q, c = _np("cosine", 31, 5000, 64, seed=9)
    Index("cosine").add(c).save(tmp_path / "ix")
    index = Index.load(tmp_path / "ix", mmap=True, device="cuda")
    res = index.search(torch.from_numpy(q).cuda(), 10, memory_budget=c.nbytes // 4)
    assert res.indices.is_cuda
    ref = tlfast.knn(q, c, 10, "cosine", backend="reference")
    np.testing.assert_array_equal(res.indices.cpu().numpy(), ref.indices)
