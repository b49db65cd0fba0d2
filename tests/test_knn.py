"""tlfast.knn / tlfast.pairwise on the CPU backends against the float64 reference and naive forms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TOL, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st

import tlfast
from tlfast import reference

METRICS = ["ip", "cosine", "l2", "kl", "js"]
BACKENDS = ["reference", "cpu"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# --- naive float64 forms: the definitions written out, pair by pair --------------------------

def naive_pairwise(q: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    q = q.double()
    c = c.double()
    qq, cc = q[:, None, :], c[None, :, :]
    if metric == "ip":
        return (qq * cc).sum(-1)
    if metric == "cosine":
        return (qq * cc).sum(-1) / (q.norm(dim=1)[:, None] * c.norm(dim=1)[None, :])
    if metric == "l2":
        return ((qq - cc) ** 2).sum(-1)

    def kl(a, b):
        terms = torch.where(a > 0, a * torch.log(a / b), torch.zeros_like(a * b))
        return terms.sum(-1)

    if metric == "kl":
        return kl(qq, cc)
    if metric == "js":
        m = (qq + cc) / 2
        return 0.5 * kl(qq, m) + 0.5 * kl(cc, m)
    raise AssertionError(metric)


def check_knn(values, indices, q, c, k, metric, tol, *, exclude_self=False):
    """Values best-first and equal to the naive matrix at the returned indices, which are unique,
    in range, and are the true k best up to near-ties."""
    values = torch.as_tensor(values)
    indices = torch.as_tensor(indices)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == indices.shape == (q.shape[0], k)
    P = naive_pairwise(q, c, metric)
    if exclude_self:
        P.fill_diagonal_(math.nan)
    larger = tlfast.METRICS[metric].larger_is_better
    assert int(indices.min()) >= 0 and int(indices.max()) < c.shape[0]
    assert all(len(set(row.tolist())) == k for row in indices), "duplicate indices in a row"
    if exclude_self:
        assert not (indices == torch.arange(q.shape[0])[:, None]).any()
    at = P.gather(1, indices)
    torch.testing.assert_close(values.double(), at, **tol, check_dtype=False)
    v = values.double()
    fin = torch.isfinite(v[:, 1:]) & torch.isfinite(v[:, :-1])
    step = (v[:, :-1] - v[:, 1:]) if larger else (v[:, 1:] - v[:, :-1])
    assert bool((step[fin] >= -tol["atol"] - tol["rtol"] * v[:, 1:][fin].abs()).all()), "not best-first"
    # The k-th best true value bounds everything not returned.
    Pm = P.clone()
    Pm.scatter_(1, indices, math.nan)
    rest = Pm.nan_to_num(nan=-math.inf if larger else math.inf)
    best_rest = rest.max(1).values if larger else rest.min(1).values
    kth = at[:, -1]
    slack = tol["atol"] + tol["rtol"] * kth.abs().nan_to_num(posinf=0.0)
    if k < c.shape[0] - int(exclude_self):
        ok = (best_rest <= kth + slack) if larger else (best_rest >= kth - slack)
        assert bool(ok.all()), "a better candidate was left out"


# --- correctness on odd shapes, every metric, backend, k -----------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 7, 411])
def test_knn_matches_naive_odd_shapes(backend, metric, k):
    q, c = make_inputs(metric, 37, 411, 19, seed=k)
    res = tlfast.knn(q, c, k, metric, backend=backend)
    check_knn(res.values, res.indices, q, c, k, metric, TOL[torch.float32])


@pytest.mark.parametrize("metric", METRICS)
def test_knn_large_d(metric):
    """d = 777: a packed corpus panel deeper than L1 holds (the kernels' loops over d are longest),
    more than one query block (the block shrinks as d grows), k = 1, 9 and k = n, exclude_self."""
    q, c = make_inputs(metric, 170, 101, 777, seed=31)
    # float32 sums of 777 products of unit-variance entries: the ip / l2 values (|v| ~ 28, ~1500)
    # carry an absolute error of about sqrt(d) u sum |q_t c_t|, some 1e-4, not the small-d 2e-5
    tol = dict(TOL[torch.float32], atol=1e-3)
    for k in (1, 9, 101):
        res = tlfast.knn(q, c, k, metric, backend="cpu")
        check_knn(res.values, res.indices, q, c, k, metric, tol)
    res = tlfast.knn(c, c, 9, metric, backend="cpu", exclude_self=True)
    check_knn(res.values, res.indices, c, c, 9, metric, tol, exclude_self=True)


@pytest.mark.parametrize("metric", METRICS)
def test_cpu_equals_reference(metric):
    q, c = make_inputs(metric, 129, 1000, 33, seed=3)
    got = tlfast.knn(q, c, 10, metric, backend="cpu")
    ref = tlfast.knn(q, c, 10, metric, backend="reference")
    torch.testing.assert_close(got.values, ref.values, **TOL[torch.float32])
    # random data has no near-ties at this size: indices agree exactly
    assert torch.equal(got.indices, ref.indices)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(metric, dtype):
    q, c = make_inputs(metric, 23, 300, 24, seed=5, dtype=dtype)
    if metric in ("kl", "js") and dtype in (torch.float16, torch.bfloat16):
        # rounding moves row sums; renormalise in the low precision so they stay in the domain
        q = (q.float() / q.float().sum(1, keepdim=True)).to(dtype)
        c = (c.float() / c.float().sum(1, keepdim=True)).to(dtype)
    for backend in BACKENDS:
        res = tlfast.knn(q, c, 5, metric, backend=backend)
        assert res.values.dtype == torch.float32 and res.indices.dtype == torch.int64
        # the oracle is the naive form on the same (rounded) inputs, so only accumulation differs
        check_knn(res.values, res.indices, q, c, 5, metric, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_pairwise(backend, metric):
    q, c = make_inputs(metric, 41, 401, 17, seed=7)
    got = tlfast.pairwise(q, c, metric, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (41, 401)
    torch.testing.assert_close(got.double(), naive_pairwise(q, c, metric), **TOL[torch.float32])


def test_reference_kl_gemm_form_equals_naive():
    q, c = make_inputs("kl", 50, 70, 13, seed=11)
    c[3, 4] = 0.0  # q > 0 against c == 0: +inf
    c[3] /= c[3].sum()
    q[7, 2] = 0.0  # 0 log 0 = 0
    q[7] /= q[7].sum()
    got = reference.pairwise(q, c, "kl")
    want = naive_pairwise(q, c, "kl")
    assert torch.isinf(got[:, 3]).all() and torch.isinf(want[:, 3]).all()
    torch.testing.assert_close(got.double(), want, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_zero_entries(backend):
    q, c = make_inputs("kl", 20, 60, 8, seed=12)
    c[:10, 0] = 0.0  # rows 0-9 miss dim 0: KL = +inf for every query (all q > 0 there)
    c[:10] /= c[:10].sum(1, keepdim=True)
    q[:5, 1] = 0.0  # zero query entries contribute nothing
    q[:5] /= q[:5].sum(1, keepdim=True)
    res = tlfast.knn(q, c, 60, "kl", backend=backend)
    assert torch.isinf(res.values[:, -10:]).all() and torch.isfinite(res.values[:, :50]).all()
    # the ten +inf rows come last, tied, in index order
    assert torch.equal(res.indices[:, -10:], torch.arange(10).expand(20, 10))
    check_knn(res.values, res.indices, q, c, 60, "kl", TOL[torch.float32])


# --- ties, exclude_self, k = n, array kinds ----------------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
def test_exact_ties_break_to_smaller_index_identically(metric):
    q, base = make_inputs(metric, 9, 40, 11, seed=13)
    c = torch.cat([base, base, base[:7]])  # every row of base appears at i, i + 40 (and i + 80)
    c = c[torch.randperm(c.shape[0], generator=torch.Generator().manual_seed(0))]
    results = {b: tlfast.knn(q, c, c.shape[0], metric, backend=b) for b in BACKENDS}
    ref = results["reference"]
    for b, res in results.items():
        assert torch.equal(res.indices, ref.indices), b
        # among exactly equal values, indices ascend
        same = res.values[:, 1:] == res.values[:, :-1]
        assert bool((res.indices[:, 1:][same] > res.indices[:, :-1][same]).all()), b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_exclude_self(backend, metric):
    _, c = make_inputs(metric, 1, 203, 9, seed=17)
    for k in (1, 202):
        res = tlfast.knn(c, c, k, metric, backend=backend, exclude_self=True)
        check_knn(res.values, res.indices, c, c, k, metric, TOL[torch.float32], exclude_self=True)


@pytest.mark.parametrize("metric", METRICS)
def test_numpy_in_numpy_out(metric):
    q, c = make_inputs(metric, 12, 100, 16, seed=19)
    res_np = tlfast.knn(q.numpy(), c.numpy(), 4, metric)
    res_t = tlfast.knn(q, c, 4, metric)
    assert isinstance(res_np.values, np.ndarray) and res_np.values.dtype == np.float32
    assert isinstance(res_np.indices, np.ndarray) and res_np.indices.dtype == np.int64
    assert isinstance(res_t.values, torch.Tensor)
    np.testing.assert_array_equal(res_np.indices, res_t.indices.numpy())
    pw = tlfast.pairwise(q.numpy(), c.numpy(), metric)
    assert isinstance(pw, np.ndarray) and pw.dtype == np.float32


def test_non_contiguous_and_readonly_inputs():
    q, c = make_inputs("l2", 30, 200, 16, seed=23)
    qt = q.T.contiguous().T  # column-major view
    c_ro = c.numpy().copy()
    c_ro.flags.writeable = False
    a = tlfast.knn(qt.numpy(), c_ro, 3, "l2")
    b = tlfast.knn(q.numpy(), c.numpy(), 3, "l2")
    np.testing.assert_array_equal(a.indices, b.indices)


def test_large_k_and_multiple_segments():
    # one query against a corpus: the cpu backend splits the corpus across threads and merges
    q, c = make_inputs("cosine", 1, 5000, 32, seed=29)
    for k in (1, 100, 5000):
        res = tlfast.knn(q, c, k, "cosine", backend="cpu")
        ref = tlfast.knn(q, c, k, "cosine", backend="reference")
        torch.testing.assert_close(res.values, ref.values, **TOL[torch.float32])
        check_knn(res.values, res.indices, q, c, k, "cosine", TOL[torch.float32])


def test_env_override_and_auto(monkeypatch):
    q, c = make_inputs("ip", 5, 50, 8)
    monkeypatch.setenv("TLFAST_BACKEND", "reference")
    a = tlfast.knn(q, c, 3, "ip")
    monkeypatch.setenv("TLFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="TLFAST_BACKEND"):
        tlfast.knn(q, c, 3, "ip")
    monkeypatch.delenv("TLFAST_BACKEND")
    assert torch.equal(a.indices, tlfast.knn(q, c, 3, "ip").indices)


def test_backends_report():
    info = tlfast.backends()
    assert info["reference"].available and info["cpu"].available, info
    assert "cpu" in info["cpu"].devices


# --- properties ------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(nq=st.integers(1, 40), n=st.integers(1, 150), d=st.integers(1, 40), data=st.data(),
       metric=st.sampled_from(METRICS), seed=st.integers(0, 2**16))
def test_knn_properties(nq, n, d, data, metric, seed):
    k = data.draw(st.integers(1, n))
    q, c = make_inputs(metric, nq, n, d, seed=seed)
    res = tlfast.knn(q, c, k, metric, backend="cpu")
    check_knn(res.values, res.indices, q, c, k, metric, TOL[torch.float32])
    ref = tlfast.knn(q, c, k, metric, backend="reference")
    torch.testing.assert_close(res.values, ref.values, **TOL[torch.float32])


# --- errors ----------------------------------------------------------------------------------

def _ok(metric="cosine"):
    return make_inputs(metric, 4, 10, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, exc, match", [
    ("rank", ValueError, "queries must be 2-D"),
    ("dim", ValueError, "dimension mismatch"),
    ("empty", ValueError, "corpus is empty"),
    ("k0", ValueError, "k must be between 1 and 10"),
    ("kbig", ValueError, "k must be between 1 and 10"),
    ("kself", ValueError, "exclude_self"),
    ("kfloat", TypeError, "k must be an int"),
    ("nan", ValueError, "queries contains NaN or inf"),
    ("inf", ValueError, "corpus contains NaN or inf"),
    ("zero_row", ValueError, "corpus row 2 is all zeros"),
    ("negative", ValueError, "negative entries"),
    ("not_simplex", ValueError, r"sums to .* not 1"),
    ("metric", ValueError, "metric must be one of"),
    ("backend", ValueError, "backend must be one of"),
    ("mixed_kinds", ValueError, "same kind of array"),
    ("int_dtype", TypeError, "floating"),
    ("int_numpy", TypeError, "floating-point array"),
    ("list", TypeError, "numpy array or a torch tensor"),
])
def test_bad_input(backend, case, exc, match):
    metric = "kl" if case in ("negative", "not_simplex") else "cosine"
    q, c = _ok(metric)
    k = 3
    kw = {}
    if case == "rank":
        q = q[0]
    elif case == "dim":
        c = c[:, :2]
    elif case == "empty":
        c = c[:0]
    elif case == "k0":
        k = 0
    elif case == "kbig":
        k = 11
    elif case == "kself":
        q, k, kw = c, 10, {"exclude_self": True}
    elif case == "kfloat":
        k = 2.0
    elif case == "nan":
        q[1, 1] = math.nan
    elif case == "inf":
        c[5, 0] = math.inf
    elif case == "zero_row":
        c[2] = 0
    elif case == "negative":
        c[1, 0] = -0.1
    elif case == "not_simplex":
        q = q * 1.1
    elif case == "metric":
        metric = "hamming"
    elif case == "backend":
        backend = "gpu9000"
    elif case == "mixed_kinds":
        c = c.numpy()
    elif case == "int_dtype":
        q = q.to(torch.int32)
    elif case == "int_numpy":
        q, c = q.numpy().astype(np.int64), c.numpy()
    elif case == "list":
        q = q.tolist()
    with pytest.raises(exc, match=match):
        tlfast.knn(q, c, k, metric, backend=backend, **kw)


def test_bad_input_pairwise():
    q, c = _ok()
    with pytest.raises(ValueError, match="dimension mismatch"):
        tlfast.pairwise(q, c[:, :1])
    with pytest.raises(ValueError, match="metric must be one of"):
        tlfast.pairwise(q, c, "manhattan")


def test_native_entry_points_check_their_preconditions():
    from tlfast._native import _C

    a = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match="float32"):
        _C.knn_cpu(a.astype(np.float64), a, 1, 0, False, 1)
    with pytest.raises(ValueError, match="2-D"):
        _C.knn_cpu(np.ones(3, np.float32), a, 1, 0, False, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.knn_cpu(np.asfortranarray(np.ones((4, 3), np.float32)), a, 1, 0, False, 1)
    with pytest.raises(ValueError, match="same dim"):
        _C.knn_cpu(a, np.ones((4, 2), np.float32), 1, 0, False, 1)
    with pytest.raises(ValueError, match="k must be"):
        _C.knn_cpu(a, a, 5, 0, False, 1)
    with pytest.raises(ValueError, match="metric code"):
        _C.knn_cpu(a, a, 1, 9, False, 1)
    with pytest.raises(ValueError, match="threads"):
        _C.pairwise_cpu(a, a, 0, 0)
    with pytest.raises(ValueError, match="non-empty"):
        _C.pairwise_cpu(np.ones((0, 3), np.float32), a, 0, 1)


def test_unavailable_backend_by_name_raises_runtime_error(monkeypatch):
    import importlib

    registry = importlib.import_module("tlfast.backends")  # the package; tlfast.backends is the function
    monkeypatch.setattr(registry, "info", lambda name: registry.BackendInfo(False, "not built here", ()))
    q, c = _ok()
    with pytest.raises(RuntimeError, match="unavailable: not built here"):
        tlfast.knn(q, c, 2, backend="cpu")
