"""Input validation for the public functions: done once, here, so that backends can trust inputs.

Every error names the argument and says how to fix it (DESIGN.md, "Errors").
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._native import _C
from .metrics import SIMPLEX_TOL, Metric, get_metric

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Rows checked per step when scanning inputs, so validation memory stays O(chunk * dim).
_SCAN_ROWS = 65536


@dataclass(frozen=True)
class Inputs:
    """Validated inputs as torch tensors, plus how to hand results back."""

    queries: torch.Tensor
    corpus: torch.Tensor
    metric: Metric
    is_numpy: bool

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


def _first_problem_torch(t: torch.Tensor, checks: int, tol: float) -> tuple[int, int, float]:
    """(row, problem, row_sum) of the first bad row, scanning in chunks of bounded memory."""
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
            return start + r, int(bad[r]), float(sums[r])
    return -1, 0, 0.0


def check_domain(t: torch.Tensor, name: str, metric: Metric) -> None:
    """Finite values everywhere; non-zero rows for cosine; probability rows for kl / js."""
    checks = _FINITE | (_NONZERO if metric.domain == "nonzero" else 0) | (_SIMPLEX if metric.domain == "simplex" else 0)
    # Low-precision inputs round every entry by up to eps/2 relative, so their row sums can only be
    # held to max(SIMPLEX_TOL, eps) (bfloat16: 0.0078).
    tol = max(SIMPLEX_TOL, torch.finfo(t.dtype).eps) if t.dtype in (torch.float16, torch.bfloat16) else SIMPLEX_TOL
    if _C is not None and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        # one fused parallel pass in C++ (csrc/cpu/check_rows.cpp)
        row, problem, row_sum = _C.check_rows(t.contiguous().numpy(), checks, tol, torch.get_num_threads())
    elif _C is not None and t.device.type == "cpu":
        # bf16 / fp16: the same pass on float32 row chunks (exact widening), 7x faster than torch's
        row, problem, row_sum = -1, 0, 0.0
        for start, chunk in _row_chunks(t):
            r, problem, row_sum = _C.check_rows(chunk.float().numpy(), checks, tol, torch.get_num_threads())
            if r >= 0:
                row = start + r
                break
    else:
        row, problem, row_sum = _first_problem_torch(t, checks, tol)
    if row >= 0:
        raise _domain_error(name, metric, row, problem, row_sum, tol)


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
    check_domain(q, "queries", m)
    if c is not q:
        check_domain(c, "corpus", m)
    return Inputs(q, c, m, q_np)


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
