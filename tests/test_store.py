"""FeatureStore and Extractor.extract_to: shards, manifest, checksums, resume, memory-mapped reads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import tlfast
from tlfast.store import FeatureStore


class CountingGRU(nn.Module):
    """A small GRU encoder over token embeddings that counts the sequences it has encoded and can
    be told to fail after some calls (an interrupted extraction)."""

    def __init__(self, fail_after: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 8)
        self.rnn = nn.GRU(8, 6, batch_first=True)
        self.seen = 0
        self.calls = 0
        self.fail_after = fail_after

    def forward(self, ids):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        self.seen += ids.shape[0]
        return self.rnn(self.emb(ids))


def _data(n=23, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 50, int(rng.integers(1, 12))).tolist() for _ in range(n)]


def _extractor(**kw):
    return tlfast.Extractor.from_module(CountingGRU(**kw), name="gru")


def test_store_round_trip(tmp_path):
    data = _data()
    ext = _extractor()
    want = ext.extract(data).numpy()
    store = ext.extract_to(tmp_path / "s", data, shard_size=5, batch_size=3)
    assert isinstance(store, FeatureStore)
    assert len(store) == 23 and store.shape == (23, 6) and store.num_shards == 5
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["count"] == 23 and manifest["dim"] == 6 and manifest["model"] == "gru"
    assert manifest["dtype"] == "float32" and manifest["normalize"] is True
    assert [s["rows"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    assert not (tmp_path / "s" / ".progress").exists()
    assert not list((tmp_path / "s").glob("*.tmp"))
    np.testing.assert_allclose(np.asarray(store), want, atol=1e-6)
    # slicing across shard borders, steps, negative and fancy indices, columns
    np.testing.assert_allclose(store[3:17], want[3:17], atol=1e-6)
    np.testing.assert_allclose(store[1:22:4], want[1:22:4], atol=1e-6)
    np.testing.assert_allclose(store[-1], want[-1], atol=1e-6)
    np.testing.assert_allclose(store[[20, 0, 7, 7]], want[[20, 0, 7, 7]], atol=1e-6)
    np.testing.assert_allclose(store[2:9, 1:3], want[2:9, 1:3], atol=1e-6)
    assert store[5:5].shape == (0, 6)
    assert isinstance(store[0:4], np.memmap)  # inside one shard: a view of the map, no copy
    shards = list(store)
    assert [len(s) for s in shards] == [5, 5, 5, 5, 3]
    with pytest.raises(IndexError):
        store[23]


def test_store_goes_straight_into_knn(tmp_path):
    data = _data(30)
    store = _extractor().extract_to(tmp_path / "s", data, shard_size=7)
    res = tlfast.knn(store, store, k=3, exclude_self=True)
    ref = tlfast.knn(np.asarray(store).copy(), np.asarray(store).copy(), k=3, exclude_self=True)
    np.testing.assert_array_equal(res.indices, ref.indices)


def test_interrupted_run_resumes_without_recomputing(tmp_path):
    data = _data(23)
    path = tmp_path / "s"
    # batch_size=5 = shard_size: one model call per shard; the third call crashes.
    crashing = _extractor(fail_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.extract_to(path, data, shard_size=5, batch_size=5)
    assert not path.exists()  # the target only ever holds a complete store; the work waits beside it
    partial = tmp_path / ".s.tlfast-partial" / "store"
    assert sorted(p.name for p in partial.glob("shard-*.npy")) == ["shard-00000.npy", "shard-00001.npy"]
    with pytest.raises(FileNotFoundError, match="interrupted"):
        FeatureStore(path)

    fresh = _extractor()
    store = fresh.extract_to(path, data, shard_size=5, batch_size=5)
    assert fresh.encoder.module.seen == 23 - 10  # the two finished shards were not recomputed
    np.testing.assert_allclose(np.asarray(store), _extractor().extract(data).numpy(), atol=1e-6)

    again = _extractor()
    again.extract_to(path, data, shard_size=5, batch_size=5)  # complete: nothing to do
    assert again.encoder.module.seen == 0


def test_resume_refuses_a_different_job(tmp_path):
    path = tmp_path / "s"
    _extractor().extract_to(path, _data(10), shard_size=4)
    with pytest.raises(ValueError, match="different extraction"):
        _extractor().extract_to(path, _data(12), shard_size=4)
    store = _extractor().extract_to(path, _data(12), shard_size=4, overwrite=True)
    assert len(store) == 12


def test_corrupt_and_missing_shards_are_named(tmp_path):
    path = tmp_path / "s"
    _extractor().extract_to(path, _data(12), shard_size=4)
    shard = path / "shard-00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    store = FeatureStore(path)
    store[0]  # shard 0 is fine
    with pytest.raises(ValueError, match="shard-00001.npy .*corrupted"):
        store[5]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.npy"):
        FeatureStore(path)[4:6]
    assert FeatureStore(path, verify=False)[0].shape == (6,)


def test_float16_store_and_argument_errors(tmp_path):
    ext = _extractor()
    store = ext.extract_to(tmp_path / "h", _data(9), shard_size=4, dtype="float16")
    assert store.dtype == np.float16 and store[0:9].dtype == np.float16
    with pytest.raises(ValueError, match="shard_size"):
        ext.extract_to(tmp_path / "x", _data(3), shard_size=0)
    with pytest.raises(ValueError, match="dtype"):
        ext.extract_to(tmp_path / "x", _data(3), dtype="int8")
    with pytest.raises(ValueError, match="empty"):
        ext.extract_to(tmp_path / "x", [])
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        FeatureStore(tmp_path / "nowhere")


_DIST_WORKER = r"""
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_store import CountingGRU, _data
import tlfast
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + {init!r}, rank=rank, world_size=2)
model = CountingGRU()
store = tlfast.Extractor.from_module(model, name="gru").extract_to({path!r}, _data(23), shard_size=5, batch_size=5)
print(json.dumps({{"rank": rank, "seen": model.seen, "rows": len(store)}}))
dist.destroy_process_group()
"""


def test_distributed_ranks_split_the_shards(tmp_path):
    """Two gloo ranks: rank r writes shards r, r+2, ...; rank 0 writes the manifest after both finish."""
    import os
    import subprocess
    import sys

    code = _DIST_WORKER.format(tests=os.path.dirname(__file__), init=str(tmp_path / "init"),
                               path=str(tmp_path / "s"))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = sorted((json.loads(o[0].strip().splitlines()[-1]) for o in outs), key=lambda r: r["rank"])
    # 5 shards of 5, 5, 5, 5, 3 rows: rank 0 has shards 0, 2, 4 (13 rows), rank 1 shards 1, 3 (10)
    assert [r["seen"] for r in results] == [13, 10]
    assert all(r["rows"] == 23 for r in results)
    np.testing.assert_allclose(np.asarray(FeatureStore(tmp_path / "s")), _extractor().extract(_data(23)).numpy(),
                               atol=1e-6)
