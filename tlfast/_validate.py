"""Input validation for the public functions: done once, here, so that backends can trust inputs.

Every error names the argument and says how to fix it (DESIGN.md, "Errors").
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from ._native import _C
from .metrics import SIMPLEX_TOL, Metric, get_metric

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Rows checked per step when scanning inputs, so validation memory stays O(chunk * dim).
_SCAN_ROWS = 65536


class RowRange(NamedTuple):
    """Magnitudes seen while validating: max |x| over the matrix, and the smallest non-zero row
    max |x| (inf when every row is zero).  Decide range safety without another pass."""

    abs_max: float
    min_row_abs_max: float


@dataclass(frozen=True)
class Inputs:
    """Validated inputs as torch tensors, plus how to hand results back."""

    queries: torch.Tensor
    corpus: torch.Tensor
    metric: Metric
    is_numpy: bool
    queries_range: RowRange | None = None
    corpus_range: RowRange | None = None

    @property
    def device(self) -> torch.device:
        return self.queries.device

    def output(self, t: torch.Tensor) -> Any:
        return t.numpy() if self.is_numpy else t


def as_tensor(x: Any, name: str) -> tuple[torch.Tensor, bool]:
    """(tensor, was_numpy) for a numpy array or torch tensor; TypeError for anything else."""
    if not isinstance(x, (torch.Tensor, np.ndarray)) and hasattr(x, "__array__"):
        x = np.asarray(x)  # array-likes such as memory-mapped feature stores
    if isinstance(x, torch.Tensor):
        t, is_numpy = x.detach(), False
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}; "
                            f"convert it with {name}.astype(np.float32)")
        if not x.dtype.isnative or not x.flags.aligned:
            x = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))
        with warnings.catch_warnings():  # read-only (memory-mapped) arrays: tlfast never writes inputs
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(x)
        is_numpy = True
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), "
                        f"got {t.dtype}; convert it with .float()")
    return t, is_numpy


def check_matrix(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(t.shape)}; "
                         f"use {name}.reshape(1, -1) for a single vector")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one row of dim >= 1")


def _row_chunks(t: torch.Tensor):
    for start in range(0, t.shape[0], _SCAN_ROWS):
        yield start, t[start:start + _SCAN_ROWS]


_FINITE, _NONZERO, _SIMPLEX = 1, 2, 4  # csrc/cpu/check_rows.h
_NONFINITE, _ZERO, _NEGATIVE, _SUM = 1, 2, 3, 4


def _domain_error(name: str, metric: Metric, row: int, problem: int, row_sum: float, tol: float) -> ValueError:
    if problem == _NONFINITE:
        return ValueError(f"{name} contains NaN or inf (first at row {row}); clean or drop those rows")
    if problem == _ZERO:
        return ValueError(f"{name} row {row} is all zeros: cosine is undefined for it; "
                          f"drop zero rows or use metric='ip'")
    if problem == _NEGATIVE:
        return ValueError(f"{name} row {row} has negative entries: metric '{metric.name}' "
                          f"needs probability rows (>= 0, summing to 1)")
    return ValueError(f"{name} row {row} sums to {row_sum:.6g}, not 1 (tolerance {tol:g}): metric "
                      f"'{metric.name}' needs probability rows; normalise with x / x.sum(1, keepdim=True)")


def _first_problem_torch(t: torch.Tensor, checks: int, tol: float) -> tuple[int, int, float, float, float]:
    """(row, problem, row_sum) of the first bad row, scanning in chunks of bounded memory, then
    (as check_rows) max |x| and the smallest non-zero row max |x|."""
    top, low = 0.0, math.inf
    for start, chunk in _row_chunks(t):
        c = chunk.float() if chunk.dtype in (torch.float16, torch.bfloat16) else chunk
        bad = torch.zeros(c.shape[0], dtype=torch.int8, device=c.device)
        if not bool(torch.isfinite(c.sum())):  # cheap screen; a finite sum means all entries are finite
            bad = torch.where((~torch.isfinite(c)).any(1), _NONFINITE, bad)
        sums = c.double().sum(1)
        if checks & _NONZERO:
            bad = torch.where((bad == 0) & (c == 0).all(1), _ZERO, bad)
        if checks & _SIMPLEX:
            bad = torch.where((bad == 0) & (c < 0).any(1), _NEGATIVE, bad)
            bad = torch.where((bad == 0) & ((sums - 1).abs() > tol), _SUM, bad)
        rows = bad.nonzero()
        if rows.numel():
            r = int(rows[0, 0])
            return start + r, int(bad[r]), float(sums[r]), 0.0, 0.0
        rmax = torch.linalg.vector_norm(c, ord=math.inf, dim=1)
        top = max(top, float(rmax.max()))
        nonzero = rmax[rmax > 0]
        if nonzero.numel():
            low = min(low, float(nonzero.min()))
    return -1, 0, 0.0, top, low


def check_domain(t: torch.Tensor, name: str, metric: Metric) -> RowRange:
    """Finite values everywhere; non-zero rows for cosine; probability rows for kl / js.  Returns
    the magnitudes seen on the way (for range safety, ``range_safe``)."""
    checks = _FINITE | (_NONZERO if metric.domain == "nonzero" else 0) | (_SIMPLEX if metric.domain == "simplex" else 0)
    # Low-precision inputs round every entry by up to eps/2 relative, so their row sums can only be
    # held to max(SIMPLEX_TOL, eps) (bfloat16: 0.0078).
    tol = max(SIMPLEX_TOL, torch.finfo(t.dtype).eps) if t.dtype in (torch.float16, torch.bfloat16) else SIMPLEX_TOL
    if _C is not None and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        # one fused parallel pass in C++ (csrc/cpu/check_rows.cpp)
        row, problem, row_sum, top, low = _C.check_rows(t.contiguous().numpy(), checks, tol, torch.get_num_threads())
    elif _C is not None and t.device.type == "cpu":
        # bf16 / fp16: the same pass on float32 row chunks (exact widening), 7x faster than torch's
        row, problem, row_sum, top, low = -1, 0, 0.0, 0.0, math.inf
        for start, chunk in _row_chunks(t):
            r, problem, row_sum, chunk_top, chunk_low = _C.check_rows(chunk.float().numpy(), checks, tol,
                                                                      torch.get_num_threads())
            if r >= 0:
                row = start + r
                break
            top, low = max(top, chunk_top), min(low, chunk_low)
    else:
        row, problem, row_sum, top, low = _first_problem_torch(t, checks, tol)
    if row >= 0:
        raise _domain_error(name, metric, row, problem, row_sum, tol)
    return RowRange(top, low)


def validate_pair(queries: Any, corpus: Any, metric: str | Metric) -> Inputs:
    m = get_metric(metric)
    q, q_np = as_tensor(queries, "queries")
    c, c_np = as_tensor(corpus, "corpus")
    if q_np != c_np:
        raise ValueError("queries and corpus must be the same kind of array (both numpy or both torch); "
                         "convert one with torch.from_numpy(...) or .numpy()")
    if q.device != c.device:
        raise ValueError(f"queries are on {q.device} but corpus is on {c.device}; move both to one device")
    check_matrix(q, "queries")
    check_matrix(c, "corpus")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"dimension mismatch: queries have dim {q.shape[1]}, corpus has dim {c.shape[1]}")
    q_range = check_domain(q, "queries", m)
    c_range = check_domain(c, "corpus", m) if c is not q else q_range
    return Inputs(q, c, m, q_np, q_range, c_range)


def validate_k(k: Any, n: int, exclude_self: bool, nq: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if exclude_self and nq != n:
        raise ValueError(f"exclude_self=True needs queries to be the corpus; got {nq} queries and "
                         f"{n} corpus rows")
    limit = n - 1 if exclude_self else n
    if k < 1 or k > limit:
        extra = " (exclude_self drops one candidate per query)" if exclude_self else ""
        raise ValueError(f"k must be between 1 and {limit}{extra}, got k={k}")
    return k


# ---------------------------------------------------------------------------------------------
# Range safety (docs/design/concurrency.md, "Numeric range").  Kernels accumulate in float32, so
# squares and products of coordinates overflow above ~1.8e19 and underflow below ~1e-19, and a
# float64 input beyond float32's range becomes inf when cast.  Inputs outside [2^-40, 2^40] are
# rescaled here, by exact powers of two, before any backend runs; results are scaled back.
#   cosine: each out-of-range row alone (cosine ignores a row's scale): values unchanged.
#   ip:     queries by 2^-a, corpus by 2^-b;  <q, c> = 2^(a+b) <q', c'>.
#   l2:     both by one 2^-e (distances need one frame); ||q - c||^2 = 2^(2e) ||q' - c'||^2.
# Scaling by 2^j is exact, so in-range inputs see no change at all and out-of-range ones get the
# float32 answer of the scaled problem; a value whose true size overflows float32 comes back inf.
SAFE_LOG2 = 40


def _exponent(a: float) -> int:
    """e with a * 2^-e in [1, 2) (a > 0)."""
    return math.frexp(a)[1] - 1


def _in_range(a: float) -> bool:
    return a == 0.0 or -SAFE_LOG2 <= _exponent(a) < SAFE_LOG2


def abs_max(t: torch.Tensor) -> float:
    """max |x| over ``t``, scanning in chunks of bounded memory."""
    return max((float(torch.linalg.vector_norm(c.float() if c.dtype in (torch.float16, torch.bfloat16) else c,
                                               ord=math.inf)) for _, c in _row_chunks(t)), default=0.0)


def rescale_rows(t: torch.Tensor, log2_range: tuple[int, int] | None = None,
                 seen: RowRange | None = None) -> torch.Tensor:
    """``t`` with each row whose max |x| is outside [2^lo, 2^hi) (default [2^-40, 2^40)) multiplied by
    the power of two that brings it into [1, 2) (a new tensor only where some row needs it).  For
    scale-free metrics (cosine).  ``seen`` (from check_domain) skips the scan when no row can be
    out of range."""
    lo, hi = log2_range or (-SAFE_LOG2, SAFE_LOG2)
    if seen is not None and (seen.abs_max == 0 or (
            2.0 ** lo <= seen.min_row_abs_max and seen.abs_max < 2.0 ** hi)):
        return t
    out = t
    for start, chunk in _row_chunks(t):
        c = chunk.float() if chunk.dtype in (torch.float16, torch.bfloat16) else chunk
        rmax = torch.linalg.vector_norm(c, ord=math.inf, dim=1).double()
        exp = torch.frexp(rmax).exponent - 1
        bad = (rmax > 0) & ((exp < lo) | (exp >= hi))
        if bool(bad.any()):
            if out is t:
                out = t.clone()
            exp = torch.where(bad, exp, 0)[:, None]
            half = torch.div(exp, 2, rounding_mode="floor")
            scaled = torch.ldexp(torch.ldexp(chunk.double(), -half), -(exp - half))  # two exact steps
            out[start:start + chunk.shape[0]] = scaled.to(t.dtype)
    return out


def problem_scale(metric: Metric, q_max: float, c_max: float) -> tuple[int, int, int] | None:
    """(query exponent, corpus exponent, value exponent) that bring an ip / l2 problem into float32's
    safe range: run on q·2^-a and c·2^-b, multiply values by 2^v.  None when no scaling is needed."""
    if metric.name not in ("ip", "l2") or (_in_range(q_max) and _in_range(c_max)):
        return None
    if metric.name == "ip":
        a = _exponent(q_max) if q_max else 0
        b = _exponent(c_max) if c_max else 0
        return a, b, a + b
    e = _exponent(max(q_max, c_max))
    return e, e, 2 * e


def scale_by_power_of_two(t: torch.Tensor, e: int) -> torch.Tensor:
    """t · 2^-e, exactly: in two half steps, so that neither factor nor intermediate leaves the
    dtype's range (2^-e alone overflows float32 for e < -127, e.g. subnormal inputs)."""
    if e == 0:
        return t
    h = e // 2
    return (t * 2.0 ** -h) * 2.0 ** -(e - h)


def scale_values(values: torch.Tensor, e: int) -> torch.Tensor:
    """float32 values · 2^e; inf where the true value overflows float32."""
    return values if e == 0 else (values.double() * 2.0 ** e).to(torch.float32)


def range_safe(inp: Inputs) -> tuple[Inputs, int]:
    """``inp`` rescaled into float32's safe range (see above) and the value exponent to undo it."""
    if inp.metric.name == "cosine":
        q = rescale_rows(inp.queries, seen=inp.queries_range)
        c = q if inp.corpus is inp.queries else rescale_rows(inp.corpus, seen=inp.corpus_range)
        return (inp if (q is inp.queries and c is inp.corpus) else Inputs(q, c, inp.metric, inp.is_numpy)), 0
    if inp.metric.name not in ("ip", "l2"):
        return inp, 0
    def top(t: torch.Tensor, seen: RowRange | None) -> float:
        return abs_max(t) if seen is None else seen.abs_max

    scale = problem_scale(inp.metric, top(inp.queries, inp.queries_range), top(inp.corpus, inp.corpus_range))
    if scale is None:
        return inp, 0
    a, b, v = scale
    return Inputs(scale_by_power_of_two(inp.queries, a), scale_by_power_of_two(inp.corpus, b), inp.metric,
                  inp.is_numpy), v


def safe_knn(impl, inp: Inputs, k: int, exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``impl.knn`` on the range-safe form of ``inp``, values scaled back (the one call site of every
    kNN entry point: tlfast.knn and each step of tlfast.distributed.knn)."""
    safe, value_exp = range_safe(inp)
    values, indices = impl.knn(safe.queries, safe.corpus, k, safe.metric, exclude_self)
    return scale_values(values, value_exp), indices


def check_exclude_self(queries: torch.Tensor, corpus: torch.Tensor) -> None:
    """exclude_self drops the pair (i, i): only meaningful when queries *are* the corpus — the same
    memory, or (a copy) equal contents."""
    same_memory = (queries.shape == corpus.shape and queries.dtype == corpus.dtype
                   and queries.device == corpus.device and queries.data_ptr() == corpus.data_ptr()
                   and queries.stride() == corpus.stride())
    if not same_memory and not (queries.shape == corpus.shape and torch.equal(queries, corpus)):
        raise ValueError("exclude_self=True needs queries to be the corpus (the same array); these "
                         "differ. Pass exclude_self=False, or the corpus itself as queries")
