"""tlfast.ot (fused Sinkhorn), match(method="assignment" / "sinkhorn") and domain.ot_align against
POT (ot.sinkhorn method="sinkhorn_log", ot.emd, ot.da.SinkhornTransport), scipy's
linear_sum_assignment and the float64 oracle tlfast.reference.sinkhorn; the Triton tile pass under
the interpreter.  Small odd shapes only: the big runs are in benchmarks/bench_ot.py.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import HAS_CUDA, make_inputs

# The Triton tile pass runs under the interpreter without a GPU: TRITON_INTERPRET=1 only while its
# module is imported and while its tests run (as tests/test_triton.py does).
_SET_INTERPRET = not HAS_CUDA and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    from tlfast.triton import sinkhorn as triton_sinkhorn_module
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton_sinkhorn_module = None
if _SET_INTERPRET:
    del os.environ["TRITON_INTERPRET"]

import tlfast
from tlfast import ot as tot
from tlfast import reference as ref

pot = pytest.importorskip("ot")
scipy_opt = pytest.importorskip("scipy.optimize")

N, M, D = 37, 53, 7
OT_METRICS = ["l2", "cosine", "ip", "kl"]


def unit_rows(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) + shift
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def problem(metric, n=N, m=M, d=D, seed=0):
    if metric in ("kl",):
        s, t = make_inputs(metric, n, m, d, seed=seed)
        return s.numpy(), t.numpy()
    return unit_rows(n, d, seed), unit_rows(m, d, seed + 1, shift=0.3)


def dense_cost(s, t, metric):
    return ref.cost_tile(torch.from_numpy(s), torch.from_numpy(t), metric).numpy()


@pytest.mark.parametrize("metric", OT_METRICS)
def test_sinkhorn_matches_pot_log_domain(metric):
    s, t = problem(metric)
    reg = 0.05
    tol = 1e-6 if metric == "kl" else 1e-7  # float32 tiles: the error floor is ~1e-8 (kl: ~1e-7)
    res = tot.sinkhorn(s, t, metric, reg, tol=tol)
    M_ = dense_cost(s, t, metric).astype(np.float64)
    a, b = np.full(N, 1 / N), np.full(M, 1 / M)
    plan = pot.sinkhorn(a, b, M_, reg, method="sinkhorn_log", stopThr=1e-10, numItermax=20000)
    assert res.converged and res.marginal_error <= tol
    np.testing.assert_allclose(res.cost, float((plan * M_).sum()), rtol=1e-5)
    mine = res.dense_plan()
    np.testing.assert_allclose(mine, plan, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(mine.sum(1), a, rtol=1e-5)
    np.testing.assert_allclose(mine.sum(0), b, rtol=1e-4)
    # POT's log u is f / reg + log a
    assert isinstance(res.f, np.ndarray) and res.f.dtype == np.float64 and res.f.shape == (N,)


@pytest.mark.parametrize("metric", ["l2", "kl"])
def test_sinkhorn_matches_the_reference_oracle_with_weights_and_torch_inputs(metric):
    s, t = problem(metric, seed=3)
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 1.5, N)
    b = rng.uniform(0.5, 1.5, M)
    a, b = a / a.sum(), b / b.sum()
    st, tt = torch.from_numpy(s), torch.from_numpy(t)
    res = tot.sinkhorn(st, tt, metric, 0.2, a=torch.from_numpy(a), b=torch.from_numpy(b), tol=1e-7)
    oracle = tot.sinkhorn(st, tt, metric, 0.2, a=torch.from_numpy(a), b=torch.from_numpy(b), tol=1e-7,
                          backend="reference")
    assert isinstance(res.f, torch.Tensor) and oracle.backend == "reference" and res.backend == "cpu"
    np.testing.assert_allclose(res.cost, oracle.cost, rtol=1e-5)
    np.testing.assert_allclose(res.dense_plan().numpy(), oracle.dense_plan().numpy(), rtol=2e-3, atol=1e-7)
    np.testing.assert_allclose(res.dense_plan().sum(0).numpy(), b, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sinkhorn_accepts_every_float_dtype(dtype):
    s, t = problem("l2")
    s16, t16 = torch.from_numpy(s).to(dtype), torch.from_numpy(t).to(dtype)
    res = tot.sinkhorn(s16, t16, "l2", 0.05, tol=1e-8)
    exact = tot.sinkhorn(s16.double(), t16.double(), "l2", 0.05, tol=1e-8, backend="reference")
    np.testing.assert_allclose(res.cost, exact.cost, rtol=1e-5)


def test_epsilon_scaling_reaches_the_same_fixed_point():
    s, t = problem("l2", n=60, m=50, d=8, seed=5)
    with_scaling = tot.sinkhorn(s, t, "l2", 0.02, tol=1e-6, max_iter=3000, scaling=0.5, relaxation=1.0)
    plain = tot.sinkhorn(s, t, "l2", 0.02, tol=1e-6, max_iter=3000, relaxation=1.0)
    assert with_scaling.converged and plain.converged
    assert with_scaling.n_scaling_steps > 0 and plain.n_scaling_steps == 0
    np.testing.assert_allclose(with_scaling.cost, plain.cost, rtol=1e-5)


@pytest.mark.parametrize("metric, reg", [("l2", 0.02), ("cosine", 0.01), ("kl", 0.05)])
def test_over_relaxation_reaches_pots_fixed_point_in_fewer_iterations(metric, reg):
    s, t = problem(metric, n=70, m=55, d=8, seed=6)
    plain = tot.sinkhorn(s, t, metric, reg, tol=1e-7, max_iter=20000, relaxation=1.0)
    auto = tot.sinkhorn(s, t, metric, reg, tol=1e-7, max_iter=20000)
    fixed = tot.sinkhorn(s, t, metric, reg, tol=1e-7, max_iter=20000, relaxation=1.5)
    M_ = dense_cost(s, t, metric).astype(np.float64)
    a, b = np.full(len(s), 1 / len(s)), np.full(len(t), 1 / len(t))
    want = float((pot.sinkhorn(a, b, M_, reg, method="sinkhorn_log", stopThr=1e-11, numItermax=200000) * M_).sum())
    assert plain.relaxation == 1.0 and 1.0 < auto.relaxation <= 1.9 and fixed.relaxation == 1.5
    for r in (plain, auto, fixed):
        assert r.converged and r.marginal_error <= 1e-7
        np.testing.assert_allclose(r.cost, want, rtol=1e-5)
        # the last update is a plain one: rows exact, as in POT's state, up to the float32 tiles'
        # rounding of (f + g - C)/reg, ~ (max C / reg) * 2^-24 = 1.2e-5 at reg 0.02
        np.testing.assert_allclose(r.dense_plan().sum(1), a, rtol=5e-5)
    assert auto.n_iter < plain.n_iter and fixed.n_iter < plain.n_iter


def test_over_relaxation_is_validated():
    s, t = problem("l2")
    for bad in (0.5, 2.0, "fast", True, None):
        with pytest.raises(ValueError, match="relaxation"):
            tot.sinkhorn(s, t, relaxation=bad)


def test_unbalanced_matches_pot_sinkhorn_unbalanced():
    s, t = problem("l2", seed=7)
    reg, rho = 0.1, 0.5
    res = tot.sinkhorn(s, t, "l2", reg, unbalanced=rho, tol=1e-8, max_iter=2000)
    oracle = ref.sinkhorn(torch.from_numpy(s), torch.from_numpy(t), "l2", reg, unbalanced=rho, tol=1e-9,
                          max_iter=2000)
    np.testing.assert_allclose(res.cost, oracle["cost"], rtol=1e-5)
    M_ = dense_cost(s, t, "l2").astype(np.float64)
    a, b = np.full(N, 1 / N), np.full(M, 1 / M)
    plan = pot.unbalanced.sinkhorn_unbalanced(a, b, M_, reg, rho, method="sinkhorn", reg_type="kl",
                                              stopThr=1e-10, numItermax=2000)
    np.testing.assert_allclose(res.dense_plan(), plan, rtol=1e-3, atol=1e-8)
    # the marginals are relaxed, not met
    assert abs(float(res.dense_plan().sum()) - 1.0) > 1e-4


def test_plan_topk_assignment_and_transport_match_the_dense_plan():
    s, t = problem("l2", seed=11)
    res = tot.sinkhorn(s, t, "l2", 0.02, tol=1e-7)
    P = res.dense_plan().astype(np.float64)
    top = res.plan_topk(5)
    order = np.argsort(-P, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(top.indices, order)
    np.testing.assert_allclose(top.values, np.take_along_axis(P, order, 1), rtol=1e-3)
    full = res.plan_topk(M)  # k = m: the whole row
    np.testing.assert_allclose(full.values.sum(1), P.sum(1), rtol=1e-3)
    pairs = res.assignment()
    np.testing.assert_array_equal(pairs.source_idx, np.arange(N))
    np.testing.assert_array_equal(pairs.target_idx, P.argmax(1))
    mutual = res.assignment(mutual=True)
    want = [i for i in range(N) if P[:, P[i].argmax()].argmax() == i]
    np.testing.assert_array_equal(mutual.source_idx, want)
    assert len(set(mutual.target_idx.tolist())) == len(want)
    bary = (P @ t.astype(np.float64)) / P.sum(1, keepdims=True)
    np.testing.assert_allclose(res.transport(), bary, rtol=1e-4, atol=1e-5)


def test_transport_matches_pot_sinkhorn_transport_in_and_out_of_sample():
    s, t = problem("l2", seed=13)
    new = unit_rows(9, D, 99)
    da = pot.da.SinkhornTransport(reg_e=0.05, max_iter=20000, tol=1e-10, out_of_sample_map="ferradans")
    da.fit(Xs=s.astype(np.float64), Xt=t.astype(np.float64))
    mapped = tlfast.domain.ot_align(s, t, reg=0.05, tol=1e-7)
    assert mapped.shape == s.shape and mapped.dtype == s.dtype
    np.testing.assert_allclose(mapped, da.transform(Xs=s.astype(np.float64)), rtol=1e-3, atol=1e-4)
    res = tot.sinkhorn(s, t, "l2", 0.05, tol=1e-7)
    np.testing.assert_allclose(res.transport(new), da.transform(Xs=new.astype(np.float64)), rtol=1e-3, atol=1e-4)


def test_errors_name_the_argument():
    s, t = problem("l2")
    with pytest.raises(ValueError, match="reg"):
        tot.sinkhorn(s, t, reg=0)
    with pytest.raises(ValueError, match="js"):
        tot.sinkhorn(*problem("kl"), metric="js")
    with pytest.raises(ValueError, match="equal totals"):
        tot.sinkhorn(s, t, a=np.full(N, 1.0), b=np.full(M, 1.0 / M))
    with pytest.raises(ValueError, match="a must be"):
        tot.sinkhorn(s, t, a=np.ones(N + 1) / (N + 1))
    with pytest.raises(ValueError, match="backend"):
        tot.sinkhorn(s, t, backend="gpu")
    with pytest.raises(ValueError, match="scaling"):
        tot.sinkhorn(s, t, scaling=1.5)
    with pytest.raises(ValueError, match="dimension mismatch"):
        tot.sinkhorn(s, t[:, :3])
    res = tot.sinkhorn(s, t, max_iter=3)
    assert not res.converged and res.n_iter == 3
    with pytest.raises(ValueError, match="max_elements"):
        res.dense_plan(max_elements=N * M - 1)
    with pytest.raises(ValueError, match="k must"):
        res.plan_topk(M + 1)
    from tlfast._native import _C
    with pytest.raises(ValueError, match="beta"):
        _C.sinkhorn_lse_cpu(s, t, 1.0, np.zeros(M - 1, np.float32), -2.0, None, 1)
    with pytest.raises(TypeError, match="u must be a float32"):
        _C.sinkhorn_lse_cpu(s.astype(np.float64), t, 1.0, np.zeros(M, np.float32), -2.0, None, 1)


@pytest.mark.parametrize("n,m", [(40, 40), (61, 45), (45, 61)])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_assignment_equals_linear_sum_assignment_and_emd(metric, n, m):
    s, t = problem(metric, n=n, m=m, d=5, seed=n + m)
    res = tlfast.match(s, t, metric, method="assignment")
    c = ref.pairwise_tile(torch.from_numpy(s), torch.from_numpy(t), metric).numpy()
    r, col = scipy_opt.linear_sum_assignment(c, maximize=metric == "cosine")
    assert len(res.source_idx) == min(n, m) and len(set(res.target_idx.tolist())) == min(n, m)
    np.testing.assert_allclose(res.scores.sum(), c[r, col].sum(), rtol=1e-6)
    np.testing.assert_allclose(res.scores, c[res.source_idx, res.target_idx], rtol=1e-5, atol=1e-6)
    if n == m and metric == "l2":  # uniform square OT: the optimal plan is a permutation
        emd = pot.emd2(np.full(n, 1 / n), np.full(n, 1 / n), c.astype(np.float64))
        np.testing.assert_allclose(res.scores.sum() / n, emd, rtol=1e-6)


def test_sparse_assignment_is_a_perfect_matching_near_the_optimum():
    s, t = problem("l2", n=300, m=300, d=4, seed=21)
    dense = tlfast.match(s, t, "l2", method="assignment")
    sparse = tlfast.match(s, t, "l2", method="assignment", memory_budget=0)
    np.testing.assert_array_equal(np.sort(sparse.target_idx), np.arange(300))
    np.testing.assert_array_equal(sparse.source_idx, np.arange(300))
    assert sparse.scores.sum() >= dense.scores.sum() - 1e-4
    assert sparse.scores.sum() <= 1.01 * dense.scores.sum()
    with pytest.raises(ValueError, match="ratio"):
        tlfast.match(s, t, "l2", method="assignment", ratio=0.8)
    with pytest.raises(ValueError, match="method"):
        tlfast.match(s, t, "l2", method="hungarian")


def test_sparse_assignment_raises_when_no_perfect_matching_exists():
    # kl: every target has a zero where every source has mass, so no pair has a finite cost
    s = np.tile(np.array([[0.5, 0.5, 0.0]], np.float32), (20, 1))
    t = np.tile(np.array([[0.0, 0.5, 0.5]], np.float32), (20, 1))
    with pytest.raises(ValueError, match="no perfect matching|no finite assignment"):
        tlfast.match(s, t, "kl", method="assignment", memory_budget=0)
    with pytest.raises(ValueError, match="no finite assignment"):
        tlfast.match(s, t, "kl", method="assignment")


def test_match_sinkhorn_returns_the_plans_mutual_argmax_pairs():
    s, t = problem("cosine", seed=31)
    got = tlfast.match(torch.from_numpy(s), torch.from_numpy(t), "cosine", method="sinkhorn", reg=0.02)
    res = tot.sinkhorn(s, t, "cosine", 0.02)
    want = res.assignment(mutual=True)
    np.testing.assert_array_equal(got.source_idx.numpy(), want.source_idx)
    np.testing.assert_array_equal(got.target_idx.numpy(), want.target_idx)
    c = ref.pairwise_tile(torch.from_numpy(s), torch.from_numpy(t), "cosine").numpy()
    np.testing.assert_allclose(got.scores.numpy(), c[want.source_idx, want.target_idx], rtol=1e-5)


def test_transfer_with_ot_alignment_recovers_a_shifted_domain():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8)) * 3
    ys = rng.integers(0, 3, 150)
    yt = rng.integers(0, 3, 150)
    xs = (centres[ys] + rng.standard_normal((150, 8))).astype(np.float32)
    xt = (centres[yt] + rng.standard_normal((150, 8)) + 4.0).astype(np.float32)  # a shifted target
    plain = (tlfast.transfer(xs, ys, xt, method="knn", k=5) == yt).mean()
    aligned = (tlfast.transfer(xs, ys, xt, method="knn", align="ot", ot_reg=4.0, k=5) == yt).mean()
    assert aligned > 0.9 and aligned > plain + 0.2
    with pytest.raises(ValueError, match="align"):
        tlfast.transfer(xs, ys, xt, align="wasserstein")


# --- the Triton tile pass, under the interpreter on CPU (on the GPU itself with a device) ---

@pytest.fixture
def triton_sinkhorn(monkeypatch):
    if triton_sinkhorn_module is None:
        pytest.skip("triton is not installed")
    if _SET_INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return triton_sinkhorn_module


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_lse_pass_matches_float64(triton_sinkhorn, dtype):
    dev = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(0)
    u = torch.randn(45, 19, generator=g).to(dtype)
    v = torch.randn(70, 19, generator=g).to(dtype)
    beta = torch.randn(70, generator=g)
    cc = torch.randn(70, generator=g)
    lse, cost = triton_sinkhorn.lse_rows(u.to(dev), v.to(dev), 3.0, beta.to(dev), -2.0, cc.to(dev))
    acc = u.double() @ v.double().T
    z = 3.0 * acc + beta.double()
    want = torch.logsumexp(z, 1)
    want_cost = (torch.softmax(z, 1) * (-2.0 * acc + cc.double())).sum(1)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(lse.double().cpu(), want, **tol)
    torch.testing.assert_close(cost.double().cpu(), want_cost, **tol)


def test_triton_sinkhorn_matches_the_cpu_kernel(triton_sinkhorn):
    dev = "cuda" if HAS_CUDA else "cpu"
    s, t = problem("l2", n=29, m=41, d=6, seed=41)
    # a large reg converges in a few iterations: the interpreter runs every program in Python
    got = tot.sinkhorn(torch.from_numpy(s).to(dev), torch.from_numpy(t).to(dev), "l2", 0.5, tol=1e-6,
                       backend="triton", scaling=None)
    want = tot.sinkhorn(s, t, "l2", 0.5, tol=1e-6, scaling=None)
    assert got.backend == "triton"
    np.testing.assert_allclose(got.cost, want.cost, rtol=1e-5)
