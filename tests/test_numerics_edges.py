"""Numerics at the edges of float32 (docs/design/concurrency.md, "Numeric range"): coordinates
near overflow or underflow, float64 inputs beyond float32's range, tiny rows in float16 storage.
Either the right answer or a clear error naming the argument, never a wrong answer; plus the
exclude_self and automatic-id rules.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tlfast
from tlfast import Index
from tlfast._validate import rescale_rows, scale_by_power_of_two

BACKENDS = ["cpu", "reference"]


def _exact(q, c, metric):
    """float64 (or exact integer-scaled) oracle for small problems."""
    q, c = np.asarray(q, np.float64), np.asarray(c, np.float64)
    if metric == "ip":
        return q @ c.T
    if metric == "l2":
        return ((q[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    qn = q / np.abs(q).max(1, keepdims=True)
    cn = c / np.abs(c).max(1, keepdims=True)
    return (qn @ cn.T) / np.linalg.norm(qn, axis=1)[:, None] / np.linalg.norm(cn, axis=1)[None, :]


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_reproducer_l2_huge_coordinates(backend):
    q = np.array([[2e19, 0]], dtype=np.float32)
    c = np.array([[3e19, 0], [1e19, 0], [2e19, 1e10]], dtype=np.float32)
    res = tlfast.knn(q, c, 1, "l2", backend=backend)
    assert res.indices[0, 0] == 2
    assert np.isfinite(res.values).all()
    res3 = tlfast.knn(q, c, 3, "l2", backend=backend)
    # the two far rows are both 1e38 away (finite in float32; the expansion may round either first)
    assert res3.indices[0, 0] == 2 and sorted(res3.indices[0, 1:]) == [0, 1]
    np.testing.assert_allclose(res3.values[0, 1:], [1e38, 1e38], rtol=1e-5)


def _assert_float32_of(got, expect):
    """got is float32's rendering of the float64 values expect: close where representable as a
    normal float32, +-inf beyond its range, (nearly) 0 below its smallest subnormal."""
    big, tiny = np.abs(expect) > 3.4e38, np.abs(expect) < 1e-45
    normal = ~big & ~tiny & (np.abs(expect) > 1.2e-38)
    np.testing.assert_allclose(got[normal], expect[normal], rtol=1e-4)
    assert np.array_equal(got[big], np.sign(expect[big]) * np.inf)
    assert (np.abs(got[tiny]) < 1e-44).all()


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_problem_equals_unscaled(metric, scale, backend):
    """Multiplying every input by a constant s changes the neighbours of none of the metrics and
    multiplies ip / l2 values by s^2 (float32 of that: inf beyond its range)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((9, 13))
    c = rng.standard_normal((41, 13))
    base = tlfast.knn(q.astype(np.float32), c.astype(np.float32), 5, metric, backend=backend)
    for dtype in (np.float32, np.float64):
        got = tlfast.knn((q * scale).astype(dtype), (c * scale).astype(dtype), 5, metric, backend=backend)
        np.testing.assert_array_equal(got.indices, base.indices, err_msg=str(dtype))
        factor = 1.0 if metric == "cosine" else scale ** 2
        _assert_float32_of(got.values, base.values.astype(np.float64) * factor)
        pw = tlfast.pairwise((q * scale).astype(dtype), (c * scale).astype(dtype), metric, backend=backend)
        ref = tlfast.pairwise(q.astype(np.float32), c.astype(np.float32), metric, backend=backend)
        _assert_float32_of(pw, ref.astype(np.float64) * factor)


def test_float64_beyond_float32_range():
    """1e39-scale float64 rows (inf once cast to float32) give correct cosine and l2 answers."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((5, 7)) * 1e39
    c = rng.standard_normal((30, 7)) * 1e39
    res = tlfast.knn(q, c, 4, "cosine")
    ref = _exact(q, c, "cosine")
    np.testing.assert_array_equal(res.indices, np.argsort(-ref, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(res.values, np.take_along_axis(ref, res.indices, 1), atol=1e-5)
    l2 = tlfast.knn(q, c, 4, "l2")
    assert np.isinf(l2.values).all()  # true distances ~1e78: beyond float32, and said so
    ref_l2 = _exact(q / 1e39, c / 1e39, "l2")
    np.testing.assert_array_equal(l2.indices, np.argsort(ref_l2, axis=1, kind="stable")[:, :4])


def test_cosine_subnormal_and_mixed_scale_rows():
    q = np.array([[1e-40, 2e-40, 0.0], [3.0, 1.0, 0.5]], dtype=np.float32)  # row 0 is subnormal
    c = np.array([[1e38, 2e38, 0.0], [1e-42, 0.0, 1e-42], [3e-20, 1e-20, 5e-21]], dtype=np.float32)
    for backend in BACKENDS:
        res = tlfast.knn(q, c, 3, "cosine", backend=backend)
        ref = _exact(q, c, "cosine")
        assert np.isfinite(res.values).all()
        np.testing.assert_array_equal(res.indices, np.argsort(-ref, axis=1, kind="stable")[:, :3])
        np.testing.assert_allclose(res.values, np.take_along_axis(ref, res.indices, 1), atol=2e-3)
    pw = tlfast.pairwise(q, c, "cosine")
    np.testing.assert_allclose(pw, _exact(q, c, "cosine"), atol=2e-3)


def test_ip_overflow_reports_inf_only_where_true_value_overflows():
    q = np.array([[1e20, 0.0], [1e10, 0.0]], dtype=np.float32)
    c = np.array([[1e19, 0.0], [1e15, 1e15]], dtype=np.float32)
    pw = tlfast.pairwise(q, c, "ip")
    # <q0, c0> = 1e39 overflows float32; every other product is representable
    assert np.isinf(pw[0, 0]) and pw[0, 0] > 0
    np.testing.assert_allclose(pw[0, 1], 1e35, rtol=1e-6)
    np.testing.assert_allclose(pw[1], [1e29, 1e25], rtol=1e-6)
    res = tlfast.knn(q, c, 2, "ip")
    np.testing.assert_array_equal(res.indices, [[0, 1], [0, 1]])


def test_in_range_inputs_are_untouched():
    """The rescaling is a no-op (same object) for ordinary data: no copies, identical results."""
    t = torch.randn(50, 8)
    assert rescale_rows(t) is t
    cases = [([3e-30, -7e25, 1.0], (-40, 0, 27)),  # every result stays a normal float32
             ([1e-42, -3e-41], (-150,)),  # subnormal inputs: 2^150 alone overflows float32
             ([3e38, -1e38], (140,))]  # results below 2^-126 / 2^-140 alone underflow
    for values, exponents in cases:
        x = torch.tensor([values], dtype=torch.float32)
        for e in exponents:
            y = scale_by_power_of_two(x, e)
            assert y.dtype == torch.float32
            np.testing.assert_array_equal(y.double().numpy(), x.double().numpy() * 2.0 ** -e)
            np.testing.assert_array_equal(scale_by_power_of_two(y, -e).numpy(), x.numpy())


def test_float16_index_keeps_tiny_cosine_rows():
    rows = np.array([[1e-8, 2e-8, 0.0], [0.0, 1e-8, 1e-8], [1.0, 0.0, 0.0]], dtype=np.float32)
    q = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 1.1]], dtype=np.float32)
    for dtype in ("float16", "bfloat16", "float32"):
        res = Index("cosine", dtype=dtype).add(rows).search(q, 1)
        np.testing.assert_array_equal(res.indices[:, 0], [0, 1], err_msg=dtype)
        assert np.isfinite(res.values).all() and (res.values > 0.99).all(), dtype
    big = Index("cosine", dtype="float16").add(rows * 1e30)  # beyond float16's 65504, fine for cosine
    np.testing.assert_array_equal(big.search(q, 1).indices[:, 0], [0, 1])


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_flat_index_rescales_like_knn(metric):
    rng = np.random.default_rng(2)
    c = (rng.standard_normal((60, 6)) * 1e-28).astype(np.float32)
    q = (rng.standard_normal((7, 6)) * 1e-28).astype(np.float32)
    index = Index(metric).add(c[:30]).add(c[30:])
    got, ref = index.search(q, 5), tlfast.knn(q, c, 5, metric)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-5, atol=0)
    ref64 = _exact(q, c, metric)
    order = np.argsort(ref64 if metric == "l2" else -ref64, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(got.indices, order)
    np.testing.assert_array_equal(index.search(q, 5, memory_budget=6 * 4 * 8).indices, got.indices)


def test_index_rejects_what_it_cannot_store_or_compute():
    with pytest.raises(ValueError, match="x has values beyond the float32 range"):
        Index("l2").add(np.array([[1e39, 0.0]]))
    with pytest.raises(ValueError, match="x has values beyond the float16 range"):
        Index("l2", dtype="float16").add(np.array([[1e6, 0.0]], dtype=np.float32))
    pytest.importorskip("faiss")
    with pytest.raises(ValueError, match=r"x has values up to .*kind='flat'"):
        Index("l2", kind="hnsw").add(np.array([[1e20, 0.0]], dtype=np.float32))
    ann = Index("ip", kind="hnsw").add(np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match="queries has values up to"):
        ann.search(np.array([[1e-30, 0.0]], dtype=np.float32), 1)


def test_exclude_self_needs_the_corpus_itself():
    rng = np.random.default_rng(3)
    c = rng.standard_normal((20, 4)).astype(np.float32)
    other = rng.standard_normal((20, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="exclude_self=True needs queries to be the corpus"):
        tlfast.knn(other, c, 3, "l2", exclude_self=True)
    with pytest.raises(ValueError, match="exclude_self"):
        tlfast.knn(torch.from_numpy(other), torch.from_numpy(c), 3, "l2", exclude_self=True)
    same = tlfast.knn(c, c, 3, "l2", exclude_self=True)
    copied = tlfast.knn(c.copy(), c, 3, "l2", exclude_self=True)  # equal contents: allowed
    np.testing.assert_array_equal(same.indices, copied.indices)
    assert (same.indices != np.arange(20)[:, None]).all()


def test_auto_ids_after_explicit_ids_never_collide():
    x = np.eye(4, dtype=np.float32)
    index = Index("ip").add(x[:2], ids=[1, 0]).add(x[2:3]).add(x[3:], ids=[10])
    index.add(np.ones((2, 4), dtype=np.float32))
    ids = np.concatenate(index._ids)
    assert len(set(ids.tolist())) == len(ids) == 6
    np.testing.assert_array_equal(ids, [1, 0, 2, 10, 4, 5])  # positions where free
    np.testing.assert_array_equal(index.search(x, 1).indices[:, 0], [1, 0, 2, 10])
    clash = Index("ip").add(x[:2], ids=[2, 3]).add(x[2:])  # positions 2, 3 are taken: next free ids
    np.testing.assert_array_equal(np.concatenate(clash._ids), [2, 3, 4, 5])
