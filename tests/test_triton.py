"""The ``triton`` backend against tlfast.reference: every metric, odd shapes, k = 1 .. n, ties,
exclude_self, split-corpus merging, the two-stage large-k path, numpy and torch inputs.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 is set
only while the kernels are imported and while these tests run, so other test modules never see
the interpreter backend).  bf16 runs on GPU only (the interpreter's bf16 tl.dot is wrong).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import HAS_CUDA, TOL, make_inputs

_SET_INTERPRET = not HAS_CUDA and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
from tlfast.triton import fused_knn  # noqa: E402
from tlfast.triton.select import pack_words_torch, unpack_words  # noqa: E402

if _SET_INTERPRET:
    del os.environ["TRITON_INTERPRET"]

import tlfast  # noqa: E402
from tlfast import reference as ref  # noqa: E402
from tlfast.metrics import METRICS  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
ALL = sorted(METRICS)
DTYPES = [torch.float16, torch.float32, torch.float64]
NQ, N, D = 37, 411, 19


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if _SET_INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def inputs(metric, nq=NQ, n=N, d=D, dtype=torch.float32, seed=0):
    q, c = make_inputs(metric, nq, n, d, seed=seed, dtype=dtype)
    return q.to(DEVICE), c.to(DEVICE)


def assert_knn(q, c, k, metric, values, indices, exclude_self=False):
    """Values match the reference's within the dtype's tolerance; each returned index carries its
    returned value (so only near-ties may swap); indices are distinct and the self pair is absent."""
    tol = TOL[q.dtype]
    rv, _ = ref.knn(q, c, k, metric, exclude_self=exclude_self)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == indices.shape == (q.shape[0], k)
    torch.testing.assert_close(values.cpu(), rv.cpu(), **tol)
    full = ref.pairwise(q, c, metric)
    torch.testing.assert_close(full.gather(1, indices).cpu(), values.cpu(), **tol)
    idx = indices.cpu()
    assert bool((idx.sort(1).values.diff(dim=1) > 0).all()), "an index repeats within a row"
    if exclude_self:
        assert not bool((idx == torch.arange(q.shape[0])[:, None]).any())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ALL)
def test_knn_matches_reference(metric, dtype):
    q, c = inputs(metric, dtype=dtype)
    for k in (1, 7, N):  # k = n runs the two-stage path (k > FUSED_MAX_K)
        values, indices = fused_knn.knn(q, c, k, METRICS[metric])
        assert_knn(q, c, k, metric, values, indices)


@pytest.mark.parametrize("metric", ALL)
def test_pairwise_matches_reference(metric):
    for dtype in DTYPES:
        q, c = inputs(metric, dtype=dtype, seed=1)
        out = fused_knn.pairwise(q, c, METRICS[metric])
        assert out.dtype == torch.float32 and out.shape == (NQ, N)
        torch.testing.assert_close(out.cpu(), ref.pairwise(q, c, metric).cpu(), **TOL[dtype])


@pytest.mark.parametrize("metric", ALL)
def test_exclude_self(metric):
    x, _ = inputs(metric, nq=150, n=1, seed=2)
    for k in (3, 149):  # the fused kernel and the two-stage path
        values, indices = fused_knn.knn(x, x, k, METRICS[metric], exclude_self=True)
        assert_knn(x, x, k, metric, values, indices, exclude_self=True)


@pytest.mark.parametrize("metric", ALL)
def test_ties_go_to_the_smaller_index(metric):
    # Every corpus row appears three times, so each value occurs at least three times and the
    # reference's stable order is the only right answer.  Values must be exact for that: ip / l2
    # use small integers (which also tie between different rows); cosine and kl one-hot queries
    # (a product with one non-zero term has no rounding to differ between tile columns); js is
    # elementwise per (pair, dim), so duplicates agree bit for bit anyway.  300 corpus rows span
    # several tiles and two corpus splits are tried, so tied rows meet across tiles and partials.
    rng = np.random.default_rng(3)
    if metric in ("ip", "l2"):
        base = rng.integers(-2, 3, (100, D)).astype(np.float64)
    elif metric == "cosine":
        base = rng.standard_normal((100, D))
    else:
        base = rng.dirichlet(np.ones(D), 100)
    c = torch.from_numpy(base[rng.permutation(np.repeat(np.arange(100), 3))]).float().to(DEVICE)
    q = c[:NQ].clone()
    if metric in ("cosine", "kl"):
        q = torch.eye(D, device=DEVICE)[torch.arange(NQ) % D]
    for k, splits in ((1, 1), (10, 2), (120, 1), (200, None)):  # 200: the two-stage path
        values, indices = fused_knn.knn(q, c, k, METRICS[metric], splits=splits)
        rv, ri = ref.knn(q, c, k, metric)
        torch.testing.assert_close(values.cpu(), rv.cpu(), **TOL[torch.float32])
        assert torch.equal(indices.cpu(), ri.cpu())


@pytest.mark.parametrize("metric", ["cosine", "kl", "js"])
def test_split_corpus_merge_is_exact(metric):
    # Forced corpus splits (as with few queries on a big GPU) must give the same words as one split.
    q, c = inputs(metric, nq=5, n=700, seed=4)
    one = fused_knn.knn(q, c, 9, METRICS[metric], splits=1)
    three = fused_knn.knn(q, c, 9, METRICS[metric], splits=3)
    assert torch.equal(one[1], three[1]) and torch.equal(one[0], three[0])
    assert_knn(q, c, 9, metric, *three)


def test_kl_zero_support_gives_inf():
    q, c = inputs("kl", nq=6, n=300, seed=5)
    c[::7, 3] = 0.0  # corpus rows with a zero where every query is positive: KL = +inf
    c = c / c.sum(1, keepdim=True)
    q[0, 3] = 0.0  # ... except query 0, for which those rows stay finite
    q = q / q.sum(1, keepdim=True)
    values, indices = fused_knn.knn(q, c, 300, METRICS["kl"])
    assert_knn(q, c, 300, "kl", values, indices)
    assert int(torch.isinf(values[1:]).sum(1).min()) == len(range(0, 300, 7))
    assert bool(torch.isfinite(values[0]).all())
    few = fused_knn.knn(q, c, 5, METRICS["kl"])
    assert_knn(q, c, 5, "kl", *few)


def test_packed_words_order_like_the_contract():
    values = torch.tensor([[1.0, -0.0, 0.0, float("inf"), float("-inf"), float("nan"), -3.0, 1.0]])
    cols = torch.arange(8)
    words = pack_words_torch(values, cols, smaller_is_better=False)
    order = torch.argsort(words[0], descending=True)
    # inf, then 1.0 at index 0 before index 7, then the two zeros by index, -3, then -inf and NaN
    # (NaN counts as -inf, and ties go to the smaller index).
    assert order.tolist() == [3, 0, 7, 1, 2, 6, 4, 5]
    v, i = unpack_words(words, smaller_is_better=False)
    assert torch.equal(i[0], cols)
    assert v[0, :5].tolist() == [1.0, 0.0, 0.0, float("inf"), float("-inf")]


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_public_api(kind):
    q, c = make_inputs("cosine", 23, 150, 13, seed=6)
    qa, ca = (q.numpy(), c.numpy()) if kind == "numpy" else (q, c)
    res = tlfast.knn(qa, ca, 4, "cosine", backend="triton")
    assert isinstance(res.values, np.ndarray if kind == "numpy" else torch.Tensor)
    assert_knn(q, c, 4, "cosine", torch.as_tensor(res.values), torch.as_tensor(res.indices))
    pw = tlfast.pairwise(qa, ca, "l2", backend="triton")
    torch.testing.assert_close(torch.as_tensor(pw), ref.pairwise(q, c, "l2"), **TOL[torch.float32])
    assert tlfast.backends()["triton"].available


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ALL)
def test_bfloat16_on_gpu(metric):
    q, c = inputs(metric, nq=300, n=5000, d=64, dtype=torch.bfloat16, seed=7)
    for k in (1, 100, 300):
        assert_knn(q, c, k, metric, *fused_knn.knn(q, c, k, METRICS[metric]))
    torch.testing.assert_close(fused_knn.pairwise(q, c, METRICS[metric]), ref.pairwise(q, c, metric),
                               **TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ALL)
def test_gpu_shapes_and_splits(metric):
    # Sizes where automatic corpus splits (few queries) and both k paths run on the device.
    for dtype in (torch.float16, torch.float32):
        q, c = inputs(metric, nq=70, n=20011, d=96, dtype=dtype, seed=8)
        for k in (10, 128, 1024):
            assert_knn(q, c, k, metric, *fused_knn.knn(q, c, k, METRICS[metric]))
    x = c[:3000]
    assert_knn(x, x, 10, metric, *fused_knn.knn(x, x, 10, METRICS[metric], exclude_self=True), exclude_self=True)
