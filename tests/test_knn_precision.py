"""precision= modes of tlfast.knn on every backend, and exact mode's low-precision screening.

Exact mode with screening forced on (tlfast.precision.SCREEN) must return *identical* indices and
values to the float64 oracle (tlfast.reference.knn), including on data built to defeat the
screen: exact duplicates, values one ulp apart, and large-norm outliers, where it must fall back
rather than guess.  The Triton backend runs under TRITON_INTERPRET=1 with fp16 screens (the
interpreter's bf16 tl.dot is wrong).
"""
from __future__ import annotations

import os

import pytest
import torch
from conftest import HAS_CUDA, TOL, make_inputs

import tlfast
from tlfast import precision as P
from tlfast import reference as ref
from tlfast.backends import resolve
from tlfast.metrics import METRICS

_SET_INTERPRET = not HAS_CUDA and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    from tlfast.triton import fused_knn as _triton_kernels  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
if _SET_INTERPRET:
    del os.environ["TRITON_INTERPRET"]

SCREENED = ["ip", "cosine", "l2", "kl"]
BACKENDS = ["reference", "cpu"] + (["triton"] if HAS_TRITON else [])
triton_only = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if _SET_INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def screen(monkeypatch):
    """Force exact mode's screening with a given dtype for the duration of a test."""
    def force(dtype_name):
        monkeypatch.setattr(P, "SCREEN", dtype_name)
    return force


def screen_dtype(backend):
    return "fp16" if backend == "triton" else "bf16"


def assert_identical(got, want):
    """Same indices; same float32 values, up to the oracle's own float64 evaluation order (its
    GEMM's summation order decides the last float32 bit of values that are the residue of a
    cancellation, such as a kl of 1e-7 between near-identical rows: 1e-12 absolute)."""
    gv, gi = (torch.as_tensor(x) for x in got)
    wv, wi = want
    assert torch.equal(gi, wi), f"indices differ in {int((gi != wi).any(1).sum())} rows"
    torch.testing.assert_close(gv, wv, rtol=0, atol=1e-12)


# --- precision="exact" with screening: identical to the oracle ---------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", SCREENED)
def test_screened_exact_is_the_oracle(backend, metric, screen):
    screen(screen_dtype(backend))
    q, c = make_inputs(metric, 29 if backend != "triton" else 16, 203 if backend != "triton" else 90, 23, seed=3)
    for k in (1, 7) if backend != "triton" else (7,):
        stats = {}
        got = P.screened_knn(resolve(backend, q.device), q, c, k, METRICS[metric], False,
                             P.LOW_DTYPES[screen_dtype(backend)], stats=stats)
        assert_identical(got, ref.knn(q, c, k, metric))
        assert sum(v for key, v in stats.items() if key.startswith("screen")) > 0, stats
    # and through the public API, numpy in / numpy out, k = n
    got = tlfast.knn(q.numpy(), c.numpy(), c.shape[0], metric, backend=backend)
    assert_identical(got, ref.knn(q, c, c.shape[0], metric))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("metric", SCREENED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_screened_exact_every_dtype_and_exclude_self(backend, metric, dtype, screen):
    screen("bf16" if dtype != torch.float16 else "fp16")
    x, _ = make_inputs(metric, 41, 1, 17, seed=5, dtype=dtype)
    for k in (1, 40):
        got = tlfast.knn(x, x, k, metric, backend=backend, exclude_self=True)
        assert_identical(got, ref.knn(x, x, k, metric, exclude_self=True))


@triton_only
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_screened_exact_triton_exclude_self(metric, screen):
    screen("fp16")
    x, _ = make_inputs(metric, 40, 1, 16, seed=8)
    got = tlfast.knn(x, x, 5, metric, backend="triton", exclude_self=True)
    assert_identical(got, ref.knn(x, x, 5, metric, exclude_self=True))


def _adversarial(metric: str, kind: str, seed: int = 0):
    """Data that defeats a low-precision screen: the k best lie inside the rounding band."""
    g = torch.Generator().manual_seed(seed)
    d = 24
    if metric == "kl":
        base = torch.rand(1, d, generator=g) + 0.1
        base /= base.sum()
    else:
        base = torch.randn(1, d, generator=g)
    n = 1200 if kind == "duplicates" else 300
    if kind == "duplicates":  # 600 exact copies of one row among random rows: ties everywhere
        c = torch.rand(n, d, generator=g) + 0.05 if metric == "kl" else torch.randn(n, d, generator=g)
        c[torch.randperm(n, generator=g)[:600]] = base
    elif kind == "ulp":  # rows one float32 ulp apart in one coordinate
        c = base.repeat(n, 1)
        c[:, 0] = c[:, 0] * (1 + torch.arange(n, dtype=torch.float32) * 2.0 ** -23)  # ~1 ulp apart
        c = c[torch.randperm(n, generator=g)]
    else:  # "outliers": a few rows of norm 1e4 make the max-norm bound useless
        c = torch.randn(n, d, generator=g)
        c[::37] *= 1e4
        if metric == "kl":
            c = c.abs() + 1e-3
    if metric == "kl":
        c = c / c.sum(1, keepdim=True)
    q = torch.cat([base, c[:9] * 0.999 + base * 0.001, (c[10:13] + c[11:14]) / 2])
    if metric == "kl":
        q = q.abs() / q.abs().sum(1, keepdim=True)
    return q.float().contiguous(), c.float().contiguous()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("metric", SCREENED)
@pytest.mark.parametrize("kind", ["duplicates", "ulp", "outliers"])
def test_screened_exact_on_adversarial_near_ties(backend, metric, kind, screen):
    screen("bf16")
    q, c = _adversarial(metric, kind)
    for k in (1, 10):
        stats = {}
        got = P.screened_knn(resolve(backend, q.device), q, c, k, METRICS[metric], False, torch.bfloat16,
                             stats=stats)
        assert_identical(got, ref.knn(q, c, k, metric))
        if kind == "duplicates" and metric != "kl":
            # query 0 is a copy of 600 rows: no screen of k' < 600 can separate them
            assert stats["oracle"] >= 1, stats


@triton_only
def test_screened_exact_triton_adversarial(screen):
    q, c = _adversarial("cosine", "ulp")
    got = P.screened_knn(resolve("triton", q.device), q, c, 10, METRICS["cosine"], False, torch.float16)
    assert_identical(got, ref.knn(q, c, 10, "cosine"))


@pytest.mark.gpu
@pytest.mark.parametrize("screen_name", ["bf16", "fp16"])
@pytest.mark.parametrize("metric", SCREENED)
def test_screened_exact_on_cuda_is_the_oracle(metric, screen_name, screen):
    """The GPU form of exact mode: a bf16 / fp16 tensor-core screen (bf16 cannot run under the
    interpreter) plus the certified re-rank, on random and adversarial near-tie data."""
    screen(screen_name)
    for q, c in (make_inputs(metric, 64, 1000, 96, seed=21), _adversarial(metric, "duplicates")):
        for k in (1, 10):
            stats = {}
            got = P.screened_knn(resolve("triton", torch.device("cuda")), q.cuda(), c.cuda(), k, METRICS[metric],
                                 False, P.LOW_DTYPES[screen_name], stats=stats)
            assert_identical(tuple(torch.as_tensor(x).cpu() for x in got), ref.knn(q, c, k, metric))
            assert sum(v for key, v in stats.items() if key.startswith("screen")) > 0, stats


def test_the_bound_holds_pair_by_pair():
    """The per-pair bound covers every screened value against the oracle's, for every metric."""
    for metric in SCREENED:
        q, c = make_inputs(metric, 40, 300, 64, seed=11)
        if metric != "kl":
            c[::17] *= 50.0  # uneven norms
        m = METRICS[metric]
        for dtype in (torch.bfloat16, torch.float16):
            qs, cs = q.to(dtype), c.to(dtype)
            sv, si = resolve("cpu", q.device).knn(qs, cs, 300, m, False)
            sq, sc = P._row_stats(q, qs, m, True), P._row_stats(c, cs, m, False)
            oracle = ref.pairwise(q, c, m).gather(1, si)
            bound = P._bound(m, 64, {k: v[:, None] for k, v in sq.items()}, P._index_stats(sc, si))
            err = (sv.double() - oracle.double())
            if metric == "kl":  # bounds hold up to the query's common shift
                err = err - err.mean(1, keepdim=True)
                bound = 2 * bound.max(1, keepdim=True).values
            assert bool((err.abs() <= bound).all()), (metric, dtype, float((err.abs() / bound).max()))
            assert float((err.abs() / bound).max()) > 1e-3, "bound uselessly loose"  # it is not vacuous


def test_auto_does_not_screen_on_this_cpu():
    # No CPU kernel has been measured to make screening pay (tlfast/backends/cpu.py).
    q, c = make_inputs("cosine", 4, 10, 8)
    assert P._screen_dtype(resolve("cpu", q.device), q, METRICS["cosine"]) is None or P.SCREEN != "auto"
    assert P._screen_dtype(resolve("cpu", q.device), q, METRICS["js"]) is None


def test_js_is_never_screened(screen):
    screen("bf16")
    assert P._screen_dtype(resolve("cpu", torch.device("cpu")), torch.zeros(1, 2), METRICS["js"]) is None


# --- precision="bf16" / "fp16" ------------------------------------------------------------------

# The interpreter's bf16 tl.dot is wrong, so Triton's bf16 mode is checked on GPUs only.
LOW_CASES = [(b, p) for b in BACKENDS for p in ("bf16", "fp16") if not (b == "triton" and p == "bf16" and not HAS_CUDA)]


@pytest.mark.parametrize("backend,precision", LOW_CASES)
@pytest.mark.parametrize("metric", sorted(METRICS))
def test_low_precision_modes(backend, metric, precision):
    dtype = P.LOW_DTYPES[precision]
    q, c = make_inputs(metric, 23, 61, 13, seed=2)
    for k in (1, 61):
        v, i = tlfast.knn(q, c, k, metric, backend=backend, precision=precision)
        # the k best of the rounded inputs, values within the dtype's tolerance of the oracle's
        rv, ri = ref.knn(q.to(dtype), c.to(dtype), k, metric)
        torch.testing.assert_close(v, rv, **TOL[dtype])
        full = ref.pairwise(q.to(dtype), c.to(dtype), metric)
        torch.testing.assert_close(full.gather(1, i), rv, **TOL[dtype])
        assert bool((i.sort(1).values.diff(dim=1) > 0).all())
    # and the documented bound against the float32 inputs' exact values (ip, cosine)
    if metric in ("ip", "cosine"):
        exact = ref.pairwise(q, c, metric).gather(1, i).double()
        u = 2.0 ** -8 if precision == "bf16" else 2.0 ** -11
        scale = 1.0 if metric == "cosine" else (q.double().norm(dim=1)[:, None] * c.double().norm(dim=1)[i])
        lim = (4 * u if metric == "cosine" else 2 * u + u * u) * scale + 13 * 2.0 ** -23 * scale * 2
        assert bool(((v.double() - exact).abs() <= lim).all())


def _bf16_products_in_hardware(metric: str, dtype) -> bool:
    """bf16 ip / cosine / l2 on a CPU with AVX512-BF16 or AMX: multiplied in bf16 pairs, not widened."""
    from tlfast._native import _C

    return dtype == torch.bfloat16 and metric in ("ip", "cosine", "l2") and not _C.cpu_half_kernel(0).endswith("-widen")


def _assert_same_up_to_summation_order(got, want, q, c, metric, exclude_self=False):
    """bf16 pair products (vdpbf16ps, tdpbf16ps) are exact in float32 and accumulate in float32 in
    another order than the float32 kernel's (and cosine scales by the inverse norms instead of
    normalising the rows), so each value may differ from the float32 kernel's by a few gamma_d
    |q| |c| (cosine: |q| |c| = 1); a returned row must be within twice that of the float64 k-th
    best, which keeps indices equal except on near-ties."""
    d = q.shape[1]
    qd, cd = q.double(), c.double()
    scale = torch.ones(q.shape[0], c.shape[0], dtype=torch.float64)
    if metric != "cosine":
        scale = qd.norm(dim=1)[:, None] * cd.norm(dim=1)[None, :]
    tol = 4 * (d + 4) * 2.0 ** -24 * scale.max(dim=1).values
    assert bool(((got.values.double() - want[0].double()).abs() <= tol[:, None]).all())
    exact = ref.pairwise(qd, cd, metric).double()
    larger_is_better = metric in ("ip", "cosine")
    if exclude_self:
        exact.fill_diagonal_(-float("inf") if larger_is_better else float("inf"))
    k = got.indices.shape[1]
    kth = (exact.topk(k, dim=1, largest=larger_is_better).values[:, -1])
    found = exact.gather(1, got.indices)
    if larger_is_better:
        assert bool((found >= (kth - 2 * tol)[:, None]).all())
    else:
        assert bool((found <= (kth + 2 * tol)[:, None]).all())
    assert float((got.indices == want[1]).double().mean()) > 0.9  # near-ties are rare on these rows


@pytest.mark.parametrize("metric", sorted(METRICS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_consumes_half_inputs_natively(metric, dtype):
    """bf16 / fp16 inputs are widened while packing: results equal the float32 kernel's on the
    widened values bit for bit (odd shapes, several query blocks, exclude_self).  Where the CPU
    multiplies bf16 in hardware (AVX512-BF16, AMX: bf16 ip / cosine / l2), they equal them up to
    float32 summation order."""
    q, c = make_inputs(metric, 301, 157, 21, seed=4, dtype=dtype)
    cpu = resolve("cpu", q.device)  # the widened copies' row sums may miss float32's simplex tolerance
    hardware = _bf16_products_in_hardware(metric, dtype)
    for a, b, k, exclude_self in ((q, c, 1, False), (q, c, 9, False), (c, c, 3, True)):
        got = tlfast.knn(a, b, k, metric, backend="cpu", exclude_self=exclude_self)
        want = cpu.knn(a.float(), b.float(), k, METRICS[metric], exclude_self)
        if hardware:
            _assert_same_up_to_summation_order(got, want, a, b, metric, exclude_self)
        else:
            assert torch.equal(got.indices, want[1]) and torch.equal(got.values, want[0])


def test_bf16_kernel_follows_the_cpu_flags():
    """The dispatcher picks vdpbf16ps (or AMX tiles) wherever the CPU has AVX512-BF16, so on those
    CPUs the bf16 tests of this file run the hardware products, not the widening fallback."""
    from tlfast._native import _C
    from tlfast.bench.schema import cpu_model_and_flags

    flags = set(cpu_model_and_flags()[1])
    avx512 = {"avx512f", "avx512dq", "avx512bw", "avx512vl", "f16c"} <= flags
    if avx512 and "avx512_bf16" in flags:
        # AMX also needs Linux to grant the tile state (arch_prctl), which a sandbox may refuse
        assert _C.cpu_half_kernel(0) in ("avx512-bf16", "amx-bf16")
    else:
        assert _C.cpu_half_kernel(0) == _C.cpu_isa() + "-widen"
    assert _C.cpu_half_kernel(1) == _C.cpu_isa() + "-widen"  # fp16 is always widened


def test_fp16_subnormals_and_signs_widen_exactly():
    bits = torch.tensor([0x0001, 0x03ff, 0x8001, 0x3c00, 0xfbff, 0x0400, 0x0000, 0x8000], dtype=torch.int32)
    x = bits.to(torch.int16).view(torch.float16)[None, :].repeat(3, 1)
    x[1] = 1.0
    x[2, 0] = 2.0
    got = tlfast.knn(x, x, 3, "ip", backend="cpu")
    want = tlfast.knn(x.float(), x.float(), 3, "ip", backend="cpu")
    assert torch.equal(got.values, want.values) and torch.equal(got.indices, want.indices)


# --- plumbing and errors ------------------------------------------------------------------------

def test_precision_is_validated_everywhere():
    q, c = make_inputs("cosine", 5, 20, 8)
    for bad in ("fp8", "float32", None, 16):
        with pytest.raises(ValueError, match="precision"):
            tlfast.knn(q, c, 3, precision=bad)
        with pytest.raises(ValueError, match="precision"):
            tlfast.match(q, c, precision=bad)
    index = tlfast.Index("cosine")
    index.add(c)
    with pytest.raises(ValueError, match="precision"):
        index.search(q, 3, precision="tf32")
    with pytest.raises(ValueError, match="float16's range"):
        tlfast.knn(q * 1e5, c, 3, "ip", precision="fp16")


def test_index_search_and_match_take_precision(screen):
    q, c = make_inputs("cosine", 17, 90, 12, seed=9)
    index = tlfast.Index("cosine")
    index.add(c)
    for precision in ("bf16", "fp16"):
        want = tlfast.knn(q, c, 4, precision=precision)
        got = index.search(q, 4, precision=precision)
        assert torch.equal(got.indices, want.indices)
        m = tlfast.match(q, c, precision=precision)
        assert len(m.source_idx) == len(m.target_idx)
    screen("bf16")
    got = index.search(q, 4, memory_budget=12 * 6 * 30)  # blocks of 30 rows, each screened
    assert_identical(got, ref.knn(q, c, 4, "cosine"))


def test_distributed_knn_takes_precision(tmp_path):
    import torch.distributed as dist

    from tlfast import distributed as tld
    q, c = make_inputs("cosine", 9, 83, 10, seed=6)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        got = tld.knn(q, c, 6, "cosine", precision="bf16")
        with pytest.raises(ValueError, match="precision"):
            tld.knn(q, c, 6, "cosine", precision="int8")
    finally:
        dist.destroy_process_group()
    want = tlfast.knn(q, c, 6, "cosine", precision="bf16")
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
