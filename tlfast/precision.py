"""Precision modes of kNN, and exact answers from a low-precision screening pass.

``precision="exact"`` (the default) returns what it always has.  ``"bf16"`` / ``"fp16"`` round
the inputs to that format and multiply them with float32 accumulation: values are approximate,
within the bound of docs/design/low-precision.md (cosine, bf16: about 2 * 2^-8 + d * 2^-23).

Exact mode may also *screen* in low precision (``screened_knn``): a bf16 / fp16 kNN of k' > k
candidates, a rigorous per-pair bound B on |screened value - float32 oracle value| built from
row norms and the unit roundoffs, and a certificate that no row outside the k' can reach the
k best; the certified candidates are then re-ranked with exactly the values
``tlfast.reference.knn`` computes (float64, rounded to float32, ties to the smaller index), so
the indices *and* values equal the oracle's.  Queries that cannot be certified (near-ties: more
than k' rows inside the error band) get a wider screen, then the oracle itself; nothing is
guessed.  The proof is in docs/design/low-precision.md.

Screening costs an extra pass, so it pays only where low-precision products are much faster
than float32 ones (AMX, tensor cores).  ``SCREEN`` decides: ``"auto"`` asks the backend
(``screen_pays``; no backend claims it before a measurement shows it), ``"never"``, ``"always"``
(the backend's ``SCREEN_DTYPE``), or ``"bf16"`` / ``"fp16"`` to force a screening dtype (tests).
The environment variable ``TLFAST_SCREEN`` sets the initial value.
"""
from __future__ import annotations

import math
import os

import torch

from . import reference as ref
from ._validate import check_domain
from .metrics import Metric

__all__ = ["PRECISIONS", "SCREEN", "check_precision", "knn", "screened_knn", "LOW_DTYPES", "WithPrecision"]

PRECISIONS = ("exact", "bf16", "fp16")
LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SCREEN = os.environ.get("TLFAST_SCREEN", "auto")
_SCREEN_CHOICES = ("auto", "never", "always", "bf16", "fp16")

U32 = 2.0 ** -24          # unit roundoff of float32
TINY = 2.0 ** -126        # smallest normal float32 (FTZ / DAZ hardware flushes below it)
FP16_MAX = 65504.0
_UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: U32, torch.float64: 2.0 ** -53}
# Entries of kl queries below this are not screened: the kernels' c == 0 sentinel
# (csrc/cpu/knn.h, kKlZeroLog) turns q * log 0 into +inf only for q >= 2^-102.
KL_MIN_Q = 2.0 ** -100
# Rows of the O(n d) float64 statistics per step, and elements of one re-rank gather.
_ROWS = 16384
_GATHER_ELEMENTS = 1 << 22


def check_precision(precision: object) -> str:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def _gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u): the classic bound on n rounding errors of unit roundoff u."""
    return n * u / (1.0 - n * u)


def _round_to(x: torch.Tensor, dtype: torch.dtype, name: str, metric: Metric) -> torch.Tensor:
    """x rounded to a low-precision format for precision="bf16"/"fp16", checked afterwards."""
    if x.dtype == dtype:
        return x
    if dtype == torch.float16 and x.numel() and float(x.abs().max()) >= FP16_MAX:
        raise ValueError(f"{name} has entries of magnitude >= {FP16_MAX:g}, beyond float16's range; "
                         f"use precision='bf16' or 'exact'")
    out = x.to(dtype)
    check_domain(out, f"{name} (rounded to {str(dtype).replace('torch.', '')})", metric)
    return out


def knn(impl, q: torch.Tensor, c: torch.Tensor, k: int, metric: Metric, exclude_self: bool,
        precision: str = "exact"):
    """Backend ``impl``'s kNN in the requested precision mode (inputs validated)."""
    if precision != "exact":
        dtype = LOW_DTYPES[precision]
        ql = _round_to(q, dtype, "queries", metric)
        cl = ql if c is q else _round_to(c, dtype, "corpus", metric)
        return impl.knn(ql, cl, k, metric, exclude_self)
    dtype = _screen_dtype(impl, q, metric)
    if dtype is not None:
        return screened_knn(impl, q, c, k, metric, exclude_self, dtype)
    return impl.knn(q, c, k, metric, exclude_self)


class WithPrecision:
    """A backend whose ``knn`` runs in a given precision mode, for callers that hold a backend."""

    def __init__(self, impl, precision: str):
        self.impl, self.precision = impl, check_precision(precision)

    def knn(self, q, c, k, metric, exclude_self):
        return knn(self.impl, q, c, k, metric, exclude_self, self.precision)


def _screen_dtype(impl, q: torch.Tensor, metric: Metric) -> torch.dtype | None:
    if SCREEN not in _SCREEN_CHOICES:
        raise ValueError(f"tlfast.precision.SCREEN (TLFAST_SCREEN) must be one of {list(_SCREEN_CHOICES)}, "
                         f"got {SCREEN!r}")
    if metric.name == "js" or SCREEN == "never":  # js has no product form to bound
        return None
    if SCREEN in LOW_DTYPES:
        return LOW_DTYPES[SCREEN]
    dtype = getattr(impl, "SCREEN_DTYPE", None)
    if SCREEN == "always":
        return dtype
    pays = getattr(impl, "screen_pays", None)
    if dtype is None or pays is None or q.dtype in (torch.float16, torch.bfloat16):
        return None
    return dtype if pays(q.device, metric) else None


# --- per-row statistics of the rounding -------------------------------------------------------

def _row_stats(x: torch.Tensor, xs: torch.Tensor, metric: Metric, is_query: bool) -> dict | None:
    """Float64 statistics of rows x and their rounded copy xs, or None where screening cannot be
    bounded (a row rounded to zero for cosine; kl zero patterns changed by the rounding).

    norm: max(|x|, |xs|); err: |xs - x|; rel: err / |x|.  For kl corpus rows the same of
    g = log x (0 where x = 0), where the kernel's g~ is the float32 log of xs (error at most
    2 ulp; 8 u |g| taken), possibly rounded once more to the screening dtype (Triton keeps log c
    in the operand dtype): both are covered by err + (u_s + 8 u) |g~|.
    """
    u_s = _UNIT[xs.dtype]
    stats = {key: torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
             for key in ("norm", "err", "rel", "entropy")}
    for i in range(0, x.shape[0], _ROWS):
        a = x[i:i + _ROWS].double()
        b = xs[i:i + _ROWS].double()
        if metric.name == "kl":
            if bool(((a > 0) != (b > 0)).any()):
                return None
            if is_query and bool(((b > 0) & (b < KL_MIN_Q)).any()):
                return None
            if not is_query:
                la = torch.where(a > 0, torch.log(a.clamp_min(TINY * TINY)), 0.0)
                lb = torch.where(b > 0, torch.log(b.clamp_min(TINY * TINY)), 0.0)
                gn = lb.norm(dim=1) * (1.0 + u_s)
                stats["norm"][i:i + _ROWS] = torch.maximum(la.norm(dim=1), gn)
                stats["err"][i:i + _ROWS] = (lb - la).norm(dim=1) + (u_s + 8 * U32) * gn
                continue
            stats["entropy"][i:i + _ROWS] = torch.special.xlogy(b, b).sum(1).abs()
        na, nb = a.norm(dim=1), b.norm(dim=1)
        if metric.name == "cosine" and bool((nb == 0).any()):
            return None
        err = (b - a).norm(dim=1)
        stats["norm"][i:i + _ROWS] = torch.maximum(na, nb)
        stats["err"][i:i + _ROWS] = err
        stats["rel"][i:i + _ROWS] = err / na
    return stats


def _bound(metric: Metric, d: int, sq: dict, sc: dict) -> torch.Tensor:
    """Upper bound on |screened value - oracle value| (up to a shift common to a query's row),
    for query statistics ``sq`` (each [nq, 1]) against corpus statistics ``sc`` (broadcastable).

    Every term is non-decreasing in each corpus statistic, so passing the corpus maxima bounds
    the rows the screen did not return.  See docs/design/low-precision.md for the derivation.
    """
    g = _gamma(4 * d + 16, U32)  # float32 arithmetic of the screen, 2u per addition (truncating units)
    if metric.name == "cosine":
        # |cos(q~, c~) - cos(q, c)| <= 2 |q~ - q| / |q| + 2 |c~ - c| / |c|; fp32 arithmetic <= g;
        # the oracle's float32 rounding <= 2^-23 (|v| <= 1).
        return 2.0 * (sq["rel"] + sc["rel"]) + g + 2.0 * U32 + d * TINY
    nq, nc = sq["norm"], sc["norm"]
    sub = d * TINY * (1.0 + nq) * (1.0 + nc)  # flushed subnormal products and sums
    if metric.name == "ip":
        scale = nq * nc
        return sq["err"] * nc + nq * sc["err"] + g * scale + sub + 4.0 * U32 * scale
    if metric.name == "l2":
        scale = (nq + nc) ** 2
        return 2.0 * (sq["err"] + sc["err"]) * (nq + nc) + 2.0 * g * scale + 2.0 * sub + 8.0 * U32 * scale
    if metric.name == "kl":
        # v = sum q log q - <q, log c>: the entropy is common to the query's row; it enters only
        # through the float32 roundings of the sum (4u |entropy| covers screen and oracle).
        cross = nq * nc
        return (sq["err"] * nc + nq * sc["err"] + g * cross + sub
                + 4.0 * U32 * (cross + sq["entropy"]))
    raise AssertionError(metric)


# --- the screened exact search -----------------------------------------------------------------

def _index_stats(stats: dict, idx: torch.Tensor) -> dict:
    return {key: val[idx] for key, val in stats.items()}


def _max_stats(stats: dict) -> dict:
    return {key: val.max() for key, val in stats.items()}


def _query_stats(stats: dict, rows: torch.Tensor) -> dict:
    return {key: val[rows][:, None] for key, val in stats.items()}


def _certify(values, indices, metric, d, sq_rows, sc, sc_max, k, eligible):
    """Which queries' k best are certainly among their screened candidates."""
    key = values.double() if metric.larger_is_better else -values.double()
    bound = _bound(metric, d, sq_rows, _index_stats(sc, indices))
    lower = key - bound
    kth_lower = lower.topk(k, dim=1).values[:, -1]
    ok = torch.isfinite(key[:, :k]).all(1) & torch.isfinite(kth_lower)
    if values.shape[1] < eligible:
        # Unreturned rows are no better than the last screened key (screens return best first).
        reach = key[:, -1] + _bound(metric, d, sq_rows, sc_max)[:, 0]
        ok &= reach < kth_lower
    return ok


def oracle_values(q: torch.Tensor, cand: torch.Tensor, metric: Metric) -> torch.Tensor:
    """tlfast.reference's float32 values for queries q [r, d] against their candidates
    cand [r, s, d]: the same float64 formulas (reference.pairwise_tile), row by row."""
    q = q.double()
    cand = cand.double()
    if metric.name == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
        cand = torch.nn.functional.normalize(cand, dim=2)
    if metric.name in ("ip", "cosine"):
        return torch.bmm(cand, q[:, :, None])[:, :, 0].float()
    if metric.name == "l2":
        dot = torch.bmm(cand, q[:, :, None])[:, :, 0]
        return ((q * q).sum(1, keepdim=True) + (cand * cand).sum(2) - 2.0 * dot).clamp_min_(0.0).float()
    if metric.name == "kl":
        log_c = torch.where(cand > 0, torch.log(cand), torch.zeros((), dtype=cand.dtype, device=cand.device))
        kl = torch.special.xlogy(q, q).sum(1, keepdim=True) - torch.bmm(log_c, q[:, :, None])[:, :, 0]
        gap = ((q > 0)[:, None, :] & (cand == 0)).any(2)
        return kl.masked_fill_(gap, math.inf).float()
    raise AssertionError(metric)


def _rerank(q: torch.Tensor, c: torch.Tensor, indices: torch.Tensor, k: int, metric: Metric):
    """The k best of each query's candidates by the oracle's values, ties to the smaller index."""
    rows, s = indices.shape
    d = q.shape[1]
    out_v = torch.empty(rows, k, dtype=torch.float32, device=q.device)
    out_i = torch.empty(rows, k, dtype=torch.int64, device=q.device)
    step = max(1, _GATHER_ELEMENTS // max(1, s * d))
    for r in range(0, rows, step):
        idx = indices[r:r + step].sort(dim=1).values  # index order first, so a stable sort keeps ties by index
        vals = oracle_values(q[r:r + step], c[idx], metric)
        bad = -vals if metric.larger_is_better else vals
        order = torch.sort(bad, dim=1, stable=True).indices[:, :k]
        out_v[r:r + step] = vals.gather(1, order)
        out_i[r:r + step] = idx.gather(1, order)
    return out_v, out_i


def _without_self(search, rows: torch.Tensor, k: int, exclude_self: bool):
    """search(m) -> the m best of every corpus row for queries ``rows``; with exclude_self, the k
    best other than the query's own row: search k + 1, drop the self pair (or the last)."""
    if not exclude_self:
        return search(k)
    v, i = search(k + 1)
    keep = i != rows.to(i.device)[:, None]
    keep[keep.all(1), -1] = False  # self not among the k + 1: the k + 1-th goes instead
    return v[keep].view(-1, k), i[keep].view(-1, k)


def screened_knn(impl, q: torch.Tensor, c: torch.Tensor, k: int, metric: Metric, exclude_self: bool,
                 dtype: torch.dtype, *, stats: dict | None = None):
    """Exact kNN (identical to tlfast.reference.knn) from ``impl``'s kNN on inputs rounded to
    ``dtype``, certified by the error bound and re-ranked; uncertified queries get a 8x wider
    screen, then the oracle.  ``stats`` (optional) counts the queries settled at each stage."""
    nq, n, d = q.shape[0], c.shape[0], q.shape[1]
    eligible = n - int(exclude_self)
    same = c is q
    if dtype == torch.float16 and max(float(q.abs().max()), 0.0 if same else float(c.abs().max())) >= FP16_MAX:
        return impl.knn(q, c, k, metric, exclude_self)  # beyond float16's range: no screen possible
    qs = q.to(dtype)
    cs = qs if same else c.to(dtype)
    sq = _row_stats(q, qs, metric, True)
    sc = sq if (same and metric.name != "kl") else _row_stats(c, cs, metric, False)
    if sq is None or sc is None:
        return impl.knn(q, c, k, metric, exclude_self)
    sc_max = _max_stats(sc)
    values = torch.empty(nq, k, dtype=torch.float32, device=q.device)
    indices = torch.empty(nq, k, dtype=torch.int64, device=q.device)
    todo = torch.arange(nq, device=q.device)
    widths = [min(eligible, max(4 * k, k + 64))]
    if widths[0] < eligible:
        widths.append(min(eligible, 8 * widths[0]))
    counts = {}
    for kk in widths:
        sv, si = _without_self(lambda m: impl.knn(qs[todo], cs, m, metric, False), todo, kk, exclude_self)
        sv, si = sv.to(q.device), si.to(q.device)
        ok = _certify(sv, si, metric, d, _query_stats(sq, todo), sc, sc_max, k, eligible)
        done = todo[ok]
        if done.numel():
            values[done], indices[done] = _rerank(q[done], c, si[ok], k, metric)
        counts[f"screen_k{kk}"] = int(done.numel())
        todo = todo[~ok]
        if not todo.numel():
            break
    if todo.numel():
        # Near-ties the screen cannot separate: the oracle on those queries, never a guess.
        values[todo], indices[todo] = _without_self(lambda m: ref.knn(q[todo], c, m, metric), todo, k,
                                                    exclude_self)
    counts["oracle"] = int(todo.numel())
    if stats is not None:
        stats.update(counts)
    return values, indices
