"""The ``faiss`` backend against tlfast's float64 reference: values, tie order, errors, dispatch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tlfast
from tlfast import reference
from tlfast.backends import resolve

from conftest import TOL, make_inputs

pytest.importorskip("faiss")

FAISS_METRICS = ["ip", "cosine", "l2", "js"]


def faiss_inputs(metric, nq, n, d, seed=0, dtype=torch.float32):
    if metric != "js":
        return make_inputs(metric, nq, n, d, seed=seed, dtype=dtype)
    # faiss's JS is NaN on zero entries, and bfloat16 cannot hold Dirichlet rows to the simplex
    # tolerance: rows of counts >= 1 out of 256 are exact in every dtype and never zero.
    rng = np.random.default_rng(seed)
    rows = [1 + np.stack([rng.multinomial(256 - d, p) for p in rng.dirichlet(np.ones(d), m)])
            for m in (nq, n)]
    return [torch.from_numpy(r / 256.0).to(dtype) for r in rows]


def assert_same_neighbours(res, q, c, k, metric, tol, exclude_self=False):
    """Values match the reference; each returned index really has its value; order is best-first.

    Indices are compared exactly except inside runs of reference values closer than the tolerance,
    where rounding may legitimately swap neighbours.
    """
    ref_v, ref_i = reference.knn(q, c, k, metric, exclude_self=exclude_self)
    v, i = torch.as_tensor(res.values), torch.as_tensor(res.indices)
    assert v.dtype == torch.float32 and i.dtype == torch.int64 and v.shape == (q.shape[0], k)
    torch.testing.assert_close(v, ref_v, **tol)
    full = reference.pairwise(q, c, metric)
    torch.testing.assert_close(full.gather(1, i), ref_v, **tol)
    sep = (ref_v[:, 1:] - ref_v[:, :-1]).abs() > 4 * (tol["atol"] + tol["rtol"] * ref_v[:, 1:].abs())
    clear = torch.ones_like(ref_i, dtype=torch.bool)
    clear[:, 1:] &= sep
    clear[:, :-1] &= sep
    assert torch.equal(i[clear], ref_i[clear])


@pytest.mark.parametrize("metric", FAISS_METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_flat_matches_reference_odd_shapes(metric, dtype):
    q, c = faiss_inputs(metric, 37, 411, 19, seed=3, dtype=dtype)
    tol = dict(TOL[dtype])
    if metric == "js":  # faiss computes JS term by term in float32 logs
        tol = {key: max(val, 1e-4) for key, val in tol.items()}
    for k in (1, 10, 411):
        res = tlfast.knn(q, c, k, metric, backend="faiss")
        assert_same_neighbours(res, q, c, k, metric, tol)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_flat_equals_cpu_kernel_on_numpy(metric):
    q, c = make_inputs(metric, 64, 2000, 48, seed=5)
    qn, cn = q.numpy(), c.numpy()
    got = tlfast.knn(qn, cn, 10, metric, backend="faiss")
    want = tlfast.knn(qn, cn, 10, metric, backend="cpu")
    assert isinstance(got.values, np.ndarray) and got.values.dtype == np.float32
    assert got.indices.dtype == np.int64
    np.testing.assert_allclose(got.values, want.values, atol=1e-4, rtol=1e-5)
    assert (got.indices == want.indices).mean() > 0.999


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ties_break_toward_smaller_index_like_every_backend(metric):
    # Small integers make every product exact in float32, so duplicated rows tie exactly; the
    # duplicates sit on both sides of the k-th place, where faiss's heap picks arbitrarily.
    rng = np.random.default_rng(7)
    base = rng.integers(-3, 4, size=(40, 8)).astype(np.float32)
    corpus = base[rng.integers(0, 40, size=300)]
    queries = base[rng.integers(0, 40, size=25)]
    for k in (1, 7, 50, 300):
        got = tlfast.knn(queries, corpus, k, metric, backend="faiss")
        want = tlfast.knn(queries, corpus, k, metric, backend="reference")
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_allclose(got.values, want.values, atol=1e-5)


def test_cosine_equal_values_are_in_index_order():
    # Cosine of duplicated rows is equal in exact arithmetic but sgemm may round identical columns
    # differently (1 ulp), so cross-backend index equality is not defined there; what holds is
    # the contract on faiss's own values: equal values come in increasing index order.
    rng = np.random.default_rng(7)
    base = rng.integers(1, 4, size=(40, 8)).astype(np.float32)
    corpus = base[rng.integers(0, 40, size=300)]
    queries = base[rng.integers(0, 40, size=25)]
    got = tlfast.knn(queries, corpus, 300, "cosine", backend="faiss")
    same = got.values[:, 1:] == got.values[:, :-1]
    assert same.sum() > 100  # the data does produce exact ties
    assert (got.indices[:, 1:][same] > got.indices[:, :-1][same]).all()
    assert (np.diff(got.values, axis=1) <= 0).all()


def test_exclude_self_with_duplicates():
    rng = np.random.default_rng(11)
    x = rng.integers(-2, 3, size=(60, 6)).astype(np.float32)
    x[:20] = x[20:40]  # every row of the first 40 has an exact twin
    for metric in ("l2", "ip"):  # exact in float32 on small integers, so the ties are real
        got = tlfast.knn(x, x, 5, metric, backend="faiss", exclude_self=True)
        want = tlfast.knn(x, x, 5, metric, backend="reference", exclude_self=True)
        np.testing.assert_array_equal(got.indices, want.indices)
        assert not (got.indices == np.arange(60)[:, None]).any()


@pytest.mark.parametrize("metric", FAISS_METRICS)
def test_pairwise_matches_reference(metric):
    q, c = faiss_inputs(metric, 13, 29, 11, seed=2)
    got = tlfast.pairwise(q, c, metric, backend="faiss")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference.pairwise(q, c, metric), atol=1e-4, rtol=1e-4)


def test_js_scale_is_tlfast_definition():
    # JS(p, q) for disjoint supports is log 2 in natural log (tlfast's definition; faiss agrees).
    p = torch.tensor([[0.5, 0.5, 1e-30, 1e-30]], dtype=torch.float32)
    q = torch.tensor([[1e-30, 1e-30, 0.5, 0.5]], dtype=torch.float32)
    got = tlfast.knn(p, q, 1, "js", backend="faiss").values
    assert abs(float(got) - np.log(2)) < 1e-5


def test_kl_by_name_is_a_clear_error():
    q, c = make_inputs("kl", 4, 10, 5)
    with pytest.raises(ValueError, match="faiss.*kl.*backend='cpu'"):
        tlfast.knn(q, c, 3, "kl", backend="faiss")
    with pytest.raises(ValueError, match="faiss.*kl"):
        tlfast.pairwise(q, c, "kl", backend="faiss")


def test_js_with_zero_entries_is_refused_not_nan():
    q, c = make_inputs("js", 4, 10, 5)
    q[0] = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="zero entries.*backend='cpu'"):
        tlfast.knn(q, c, 3, "js", backend="faiss")


def test_auto_never_picks_faiss_on_cpu(monkeypatch):
    monkeypatch.delenv("TLFAST_BACKEND", raising=False)
    assert resolve("auto", torch.device("cpu")).NAME != "faiss"
    monkeypatch.setenv("TLFAST_BACKEND", "faiss")
    assert resolve("auto", torch.device("cpu")).NAME == "faiss"


def test_listed_and_available():
    info = tlfast.backends()["faiss"]
    assert info.available and info.devices == ("cpu",) and "faiss" in info.reason


def test_validation_runs_before_faiss():
    q, c = make_inputs("l2", 4, 10, 5)
    q[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tlfast.knn(q, c, 3, "l2", backend="faiss")
    with pytest.raises(ValueError, match="k must be between"):
        tlfast.knn(c, c, 11, "l2", backend="faiss")


def test_missing_faiss_is_reported_not_raised(monkeypatch):
    import sys

    from tlfast.backends import info

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now fails
    got = info("faiss")
    assert not got.available and "pip install 'tlfast[faiss]'" in got.reason
    with pytest.raises(RuntimeError, match="unavailable.*tlfast\\[faiss\\]"):
        tlfast.knn(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32), 1, "l2", backend="faiss")
    from tlfast import ann

    with pytest.raises(ImportError, match="tlfast\\[faiss\\]"):
        ann.make_index("hnsw", "l2", 3)
