"""Transferability estimation: score how well a source model's features will transfer to a labelled
target task, before paying for fine-tuning (or for extracting the whole corpus).

    tlfast.transferability.logme(features, y)                 # LogME (You et al., ICML 2021)
    tlfast.transferability.hscore(features, y)                # H-score (Bao et al., ICIP 2019)
    tlfast.transferability.hscore(features, y, shrinkage=True)  # regularised H-score (Ibrahim et al., 2022)
    tlfast.transferability.transrate(features, y)             # TransRate (Huang et al., ICML 2022)
    tlfast.transferability.nce(source_probs, y)               # NCE (Tran et al., ICCV 2019)
    tlfast.transferability.leep(source_probs, y)              # LEEP (Nguyen et al., ICML 2020)

Larger is better for every score.  Everything runs in torch on the features' device (CPU or GPU).
The feature-based scores need only the sufficient statistics of one pass over the rows in chunks —
FᵀF (d x d), Fᵀ1, the per-class sums FᵀY (C x d) and the class counts — so memory is O(d² + C·d)
beyond the features themselves, whatever n is (memory-mapped arrays are read chunk by chunk).
Chunk products run in float32 (float64 for float64 input) and are summed in float64; the
eigendecompositions and fixed points are float64.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from ._native import _C
from ._validate import as_tensor

__all__ = ["SourceScore", "hscore", "leep", "logme", "nce", "rank_sources", "transrate"]

# Rows per chunk: big enough for BLAS to run at full rate, small enough that the float32 partial
# products (summed over at most this many rows before the float64 accumulation) stay accurate.
_CHUNK = 8192


# ----------------------------------------------------------------------------------- inputs
def _features(x: Any, name: str = "features") -> torch.Tensor:
    t, _ = as_tensor(x, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, dim), got shape {tuple(t.shape)}")
    if t.shape[0] < 2 or t.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 rows and 1 column, got shape {tuple(t.shape)}")
    return t


def _labels(y: Any, n: int, device: torch.device, name: str = "y") -> tuple[torch.Tensor, int]:
    """(class codes 0..C-1 as int64 on ``device``, C) for any 1-D label array."""
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D class labels, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} labels but the features have {n} rows")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    _, codes = np.unique(arr, return_inverse=True)
    n_classes = int(codes.max()) + 1
    if n_classes < 2:
        raise ValueError(f"{name} has a single class; transferability needs at least 2")
    return torch.from_numpy(codes.reshape(-1)).to(device), n_classes


def _targets(y: Any, n: int, device: torch.device) -> torch.Tensor:
    """Regression targets as a float64 (n, t) tensor."""
    t = torch.as_tensor(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y))
    if not (t.dtype.is_floating_point or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"y must be numeric regression targets, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] != n:
        raise ValueError(f"y must have shape ({n},) or ({n}, n_targets), got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("y contains NaN or inf")
    return t.to(device)


def _work_dtype(t: torch.Tensor, precise: bool = False) -> torch.dtype:
    return torch.float64 if precise or t.dtype == torch.float64 else torch.float32


# FᵀF on CPU for float32 rows: tlfast's own kernel (csrc/cpu/gram_kernel.h), the upper register
# tiles only, float32 sums over 512-row slices then float64 - about half the flops of torch's full
# product at its rate (docs/design/training.md).  Elsewhere (float64, GPU, no native module) the
# upper block triangle as torch GEMMs: for d = 1024, 10 of 16 blocks, each a full-rate GEMM (256
# measured faster than 128 on the 2-core EPYC: narrower blocks' GEMMs lose more rate than they save).
_GRAM_BLOCK = 256


def _native_gram(c: torch.Tensor) -> bool:
    return _C is not None and c.device.type == "cpu" and c.dtype == torch.float32


try:  # the LAPACK tridiagonal eigensolver, through scipy (its OpenBLAS)
    from scipy.linalg.lapack import dormqr as _dormqr, dsterf as _dsterf, dstevd as _dstevd, dsytrd as _dsytrd
except ImportError:  # pragma: no cover - scipy comes with the train / test extras
    _dormqr = _dsterf = _dstevd = _dsytrd = None

try:  # ... on one BLAS thread: see _resolvent_forms
    from threadpoolctl import threadpool_limits as _threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn and the train extra
    _threadpool_limits = None


def _chunks(f: torch.Tensor, precise: bool = False):
    """(start, rows as the working float dtype) over ``f``."""
    work = _work_dtype(f, precise)
    for i in range(0, f.shape[0], _CHUNK):
        yield i, f[i:i + _CHUNK].to(work)


def _upper_gram(c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """cᵀc's upper block triangle, in c's dtype, written into ``out`` (d, d) when given.

    Below the diagonal blocks ``out`` keeps what it held, and inside them the lower half is cᵀc's
    too: callers read the upper triangle only (``_symmetrise``).  Each block is one GEMM written
    in place through the strided view (``addmm_`` with beta = 0), so no product is allocated and
    copied."""
    d = c.shape[1]
    if out is None:
        out = torch.zeros(d, d, dtype=c.dtype, device=c.device)
    for j in range(0, d, _GRAM_BLOCK):
        out[j:j + _GRAM_BLOCK, j:].addmm_(c[:, j:j + _GRAM_BLOCK].T, c[:, j:], beta=0)
    return out


def _bad_rows(name: str, first_row: int, c: torch.Tensor) -> ValueError:
    return ValueError(f"{name} contains NaN or inf (in rows {first_row}..{first_row + c.shape[0] - 1}, or values "
                      f"too large to square in {c.dtype}); clean or drop them")


def _add_gram(gram: torch.Tensor, c: torch.Tensor, first_row: int, name: str,
              scratch: torch.Tensor | None = None) -> torch.Tensor | None:
    """gram += the upper triangle of cᵀc (float64); NaN / inf rows show on its diagonal.

    ``scratch`` (d, d) in c's dtype is reused across chunks by the torch path; the one it used is
    returned (None from the native kernel, which adds into ``gram`` itself)."""
    if _native_gram(c) and gram.is_contiguous():
        _C.gram_upper_add_cpu(c.contiguous().numpy(), gram.numpy(), torch.get_num_threads())
    else:
        scratch = _upper_gram(c, scratch if scratch is not None and scratch.dtype == c.dtype else None)
        gram += scratch  # one float64 pass: in-place add promotes the float32 operand
    if not bool(torch.isfinite(torch.diagonal(gram)).all()):
        raise _bad_rows(name, first_row, c)
    return scratch


# The kernel's class sums keep threads x C x d float32 partial sums; past this, index_add by chunks.
_KERNEL_SUMS_BYTES = 64 << 20


def _whole_gram(f: torch.Tensor, a: torch.Tensor | None, name: str, codes: torch.Tensor | None = None,
                sums: torch.Tensor | None = None) -> tuple[torch.Tensor | None, bool]:
    """(the upper triangle of (f - a)ᵀ(f - a) in float64, whether ``sums`` got the class sums) by one
    call of the native kernel over all the rows, for contiguous float32 rows on CPU ((None, False)
    otherwise: the caller adds chunk by chunk).  One call, so the kernel keeps its float64 sums in its
    cache-friendly strips for the whole pass (gram_kernel.h); the shift is subtracted in float32 as
    the rows are packed, as ``c - a`` would.  With ``codes``, ``sums`` (C, d) float64 += the class
    sums of the shifted rows, taken from the rows as they are packed (no second read of the
    features), when the kernel's per-thread float32 sums fit in _KERNEL_SUMS_BYTES."""
    if not (_native_gram(f) and f.is_contiguous()) or f.requires_grad:
        return None, False
    n, d = f.shape
    threads = torch.get_num_threads()
    with_sums = (codes is not None and sums is not None and sums.is_contiguous()
                 and threads * sums.shape[0] * d * 4 <= _KERNEL_SUMS_BYTES)
    shift = None if a is None else a.contiguous().numpy()
    gram = torch.zeros(d, d, dtype=torch.float64)
    _C.gram_upper_add_cpu(f.numpy(), gram.numpy(), threads, shift,
                          codes.contiguous().numpy() if with_sums else None, sums.numpy() if with_sums else None)
    if not bool(torch.isfinite(torch.diagonal(gram)).all()):
        # Name the first chunk that does it: the chunked path, which raises there.
        for i, c in _chunks(f):
            _add_gram(torch.zeros(d, d, dtype=torch.float64), c if a is None else c - a, i, name)
        raise _bad_rows(name, 0, f)  # pragma: no cover - some chunk overflows when the whole does
    return gram, with_sums


def _symmetrise(gram: torch.Tensor) -> torch.Tensor:
    """The full matrix from its upper triangle (the blocks below the diagonal were never written), in
    place: one d x d temporary (the mirrored triangle) instead of three (3 ms instead of 15 at d = 1024)."""
    gram.triu_()
    return gram.add_(gram.T.tril(-1))


@dataclass
class _Moments:
    """One pass of sufficient statistics (float64) of the rows f_i - a: n, Σ, the Gram matrix, and per
    column of the target matrix either the class sums / counts (classification) or the cross products
    with Y / ΣY² (regression).  The shift a is 0 (LogME models the raw features) or, for the centred
    scores, the first chunk's mean: then the later subtraction of n·μμᵀ removes a small term, not
    the bulk of a large-mean (post-ReLU) feature's second moment."""

    n: int
    shift: torch.Tensor          # (d,)     a
    total: torch.Tensor          # (d,)     Σ_i f_i
    gram: torch.Tensor           # (d, d)   FᵀF
    cross: torch.Tensor          # (C, d)   Yᵀ F: class sums, or FᵀY transposed for regression
    y_sq: torch.Tensor           # (C,)     ‖Y_c‖²: class counts for one-hot Y
    norm4: torch.Tensor | None = None   # Σ ‖f_i‖⁴         (Ledoit-Wolf only)
    norm2_f: torch.Tensor | None = None  # Σ ‖f_i‖² f_i  (d,) (Ledoit-Wolf only)


def _moments(f: torch.Tensor, codes: torch.Tensor | None, n_classes: int, targets: torch.Tensor | None = None,
             fourth: bool = False, shift: bool = False, name: str = "features", precise: bool = False) -> _Moments:
    """The statistics of one pass over ``f``: its chunks' products in float32 for float32 rows (float64
    sums), or, with ``precise`` (or float64 rows), in float64.  Regression's cross products with the
    targets are float64 either way: the targets are not rounded to float32."""
    n, d = f.shape
    dev, f64 = f.device, torch.float64
    work = _work_dtype(f, precise)
    a = f[:_CHUNK].to(work).mean(0) if shift else torch.zeros(d, dtype=work, device=dev)
    cross = torch.zeros(n_classes if targets is None else targets.shape[1], d, dtype=f64, device=dev)
    total = torch.zeros(d, dtype=f64, device=dev)
    norm4 = torch.zeros((), dtype=f64, device=dev)
    norm2_f = torch.zeros(d, dtype=f64, device=dev)
    whole, summed = (None, False) if precise else _whole_gram(f, a if shift else None, name,
                                                            codes if targets is None else None, cross)
    gram = whole if whole is not None else torch.zeros(d, d, dtype=f64, device=dev)
    scratch = None
    # The pass over the chunks, unless the kernel has done all of it (LogME's: FᵀF and the class sums).
    for i, c in (_chunks(f, precise) if whole is None or not summed or fourth else ()):
        if shift:
            c = c - a
        if whole is None:
            scratch = _add_gram(gram, c, i, name, scratch)
        rows = c.shape[0]
        if targets is None and not summed:
            # Class sums of this chunk in the working dtype (at most _CHUNK rows each), then float64.
            part = torch.zeros(n_classes, d, dtype=work, device=dev)
            cross += part.index_add_(0, codes[i:i + rows], c).to(f64)
        elif targets is not None:
            c64 = c.to(f64)
            cross += targets[i:i + rows].T @ c64
            total += c64.sum(0)
        if fourth:
            c64 = c.to(f64)
            sq = (c64 * c64).sum(1)
            norm4 += (sq * sq).sum()
            norm2_f += sq @ c64
    gram = _symmetrise(gram)
    if targets is None:
        y_sq = torch.bincount(codes, minlength=n_classes).to(f64)
        total = cross.sum(0)
    else:
        y_sq = (targets * targets).sum(0)
    return _Moments(n, a.to(f64), total, gram, cross, y_sq, norm4 if fourth else None,
                    norm2_f if fourth else None)


# ----------------------------------------------------------------------------------- LogME
def logme(features: Any, y: Any, regression: bool = False, *, max_iter: int = 1000, tol: float = 1e-12) -> float:
    """LogME: the maximised log evidence of Bayesian linear regression on the features, per sample,
    averaged over the target columns (You et al., "LogME: Practical Assessment of Pre-trained Models
    for Transfer Learning", ICML 2021).

    For one target column y (a one-hot class indicator, or a regression target) and the model
    y = F w + noise, w ~ N(0, α⁻¹I), noise ~ N(0, β⁻¹I), the log evidence is

        L(α, β) = d/2 log α + n/2 log β - n/2 log 2π - ½ log|A| - β/2 ‖y - F m‖² - α/2 ‖m‖²,
        A = αI + βFᵀF,  m = β A⁻¹ Fᵀ y,

    maximised over (α, β) by MacKay's fixed point γ = Σ βs_i / (α + βs_i), α = γ / ‖m‖²,
    β = (n - γ) / ‖y - Fm‖², with s_i the eigenvalues of FᵀF.  One eigendecomposition of FᵀF
    (d x d) serves every column; in its eigenbasis (z = VᵀFᵀy) each step is O(d) per column and
    runs for all columns at once:  ‖m‖² = Σ z²/(s+λ)²,  ‖y - Fm‖² = ‖y‖² - Σ z² (s+2λ)/(s+λ)²,
    λ = α/β.  Three such steps warm up; then Newton's method on the profile log evidence in log λ
    (β at its optimum n / E(λ), ascent steps only) runs to ``tol`` relative change in λ, or until
    L / n has less than ``tol`` left to gain by the Newton decrement (a column without signal has
    its supremum at λ -> ∞), so the value is the maximum of L.  tllib's loop instead stops after at
    most 11 steps at a 1% change, with ε = 1e-5 in the denominators.

    Float32 features have their statistics taken in float32 products, of the rows less their first
    chunk's mean (FᵀF and FᵀY then rebuilt in float64, so a common offset costs no digits).  Where
    some column's fit leaves less than 1/1000 of ‖y‖² (E(λ*) < ‖y‖² / 10³: nearly separable
    classes, regression targets with little noise), ‖y‖² - Σ z²/(s + λ) would cancel past float32's
    digits, and the statistics are taken again in float64 (docs/design/training.md, "Precision").

    Args:
        features: (n, d) numpy array (memory-mapped is fine) or torch tensor, on CPU or GPU.
        y: (n,) class labels; with ``regression=True``, (n,) or (n, t) real targets.
        regression: treat ``y`` as real targets instead of classes.
        max_iter, tol: iterations (fixed-point warm-up + Newton) and relative tolerance on λ = α/β.

    Returns:
        The mean over target columns of L(α*, β*) / n (larger is better).

    Raises:
        ValueError: naming y's column, where the features fit it to float64 rounding (E(λ*) below
            ‖y‖² / 10¹¹): its evidence grows without bound as β -> ∞, and float64 resolves no maximum.
    """
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    f = _features(features)
    n, d = f.shape
    if regression:
        targets = _targets(y, n, f.device)
        codes, n_classes = None, 0
    else:
        targets = None
        codes, n_classes = _labels(y, n, f.device)
    # Float32 products are of the rows shifted by their first chunk's mean (the kernel subtracts it
    # as it packs), and FᵀF, FᵀY are rebuilt from them in float64: a feature's common offset
    # (post-ReLU features) would otherwise enter the float32 sums at its full size.
    low = _work_dtype(f) == torch.float32
    mom = _moments(f, codes, n_classes, targets, shift=low)
    evidence, kappa = _logme_evidence(_unshifted(mom, targets) if low else mom, max_iter, tol)
    if low and not bool((kappa <= _FLOAT32_KAPPA).all()):
        # Some column is fitted so closely that E = ‖y‖² - Σ z²/(s + λ) cancels past what float32
        # products resolve (features whose classes are nearly linearly separable, regression targets
        # with little noise): the statistics again, in float64.
        evidence, kappa = _logme_evidence(_moments(f, codes, n_classes, targets, precise=True), max_iter, tol)
    bad = ~(torch.isfinite(evidence) & (kappa <= _FLOAT64_KAPPA))
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0])
        if regression:
            which = f"target column {j}"
        else:  # the codes number the sorted distinct labels
            labels = np.unique(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y))
            which = f"class {labels[j].item()!r}"
        raise ValueError(f"y: {which} is fitted by the features to within "
                         f"float64 rounding (residual {1 / float(kappa[j]):.1e} of its squared norm at the optimum), "
                         f"so its evidence has no maximum that float64 resolves: the column is (nearly) an exact "
                         f"linear function of the features")
    return float(evidence.mean())


# κ = ‖y‖² / E(λ*) for a column y: E = ‖y‖² - Σ z²/(s + λ) loses log10 κ digits to cancellation.
# Built from float32 products (summed over up to 512 rows in float32), the evidence / n was within
# ~0.03-0.5 κ·2^-24 of the float64 one in measurements (tests/test_transferability.py): past
# _FLOAT32_KAPPA (errors up to ~1e-5) LogME recomputes the statistics in float64, and past
# _FLOAT64_KAPPA (the same error class in float64) it refuses.
_FLOAT32_KAPPA = 1e3
_FLOAT64_KAPPA = 1e11


_LOGME_WARMUP = 3  # MacKay fixed-point steps before Newton


def _unshifted(mom: _Moments, targets: torch.Tensor | None) -> _Moments:
    """The moments of the rows f from those of b = f - a (``_moments(..., shift=True)``), in float64,
    in place: with t = Σ b,  FᵀF = BᵀB + a tᵀ + t aᵀ + n a aᵀ,  YᵀF = YᵀB + (Yᵀ1) aᵀ (Yᵀ1 the class
    counts for one-hot Y, which are ‖y‖²)."""
    a, t, n = mom.shift, mom.total, mom.n
    mom.gram.addr_(a, t).addr_(t, a).addr_(a, a, alpha=float(n))
    ones_y = mom.y_sq if targets is None else targets.sum(0)
    mom.cross.addr_(ones_y, a)
    mom.total = t + n * a
    mom.shift = torch.zeros_like(a)
    return mom


class _NotDefinite(Exception):
    """Some T + λI of the tridiagonal form was not numerically positive definite."""


def _null_threshold(s_max: float, d: int) -> float:
    """Eigenvalues of FᵀF (float64) at or below this are rounding: directions without variance."""
    return s_max * d * float(np.finfo(np.float64).eps)


class _EigenForms:
    """The z-weighted resolvent sums of LogME from the eigenpairs of FᵀF: s (d,) its eigenvalues and
    z (C, d) = VᵀFᵀy per column, so that Σ z²/(s + λ)^k is a (C, d) reduction."""

    def __init__(self, s: torch.Tensor, z: torch.Tensor):
        d = s.shape[0]
        self.s = s.clamp(min=0)
        # Directions with (numerically) zero variance carry no signal: Fᵀy is 0 there exactly.
        z = torch.where(self.s > _null_threshold(float(self.s.max()), d), z, torch.zeros_like(z))
        self.z2 = z * z

    def __call__(self, lam: torch.Tensor, more: bool = True):
        il = 1.0 / (self.s + lam[:, None])
        z2il = self.z2 * il
        if not more:
            return z2il.sum(1), None, None
        z2il2 = z2il * il
        return z2il.sum(1), z2il2.sum(1), (z2il2 * il).sum(1)


class _TridiagonalForms:
    """The same sums from the Householder tridiagonal form FᵀF = Q T Qᵀ, without T's eigenvectors:
    with u = QᵀFᵀy, Σ z²/(s + λ) = uᵀ(T + λI)⁻¹u, Σ z²/(s + λ)² = ‖x‖² and Σ z²/(s + λ)³ = xᵀ(T + λI)⁻¹x
    for x = (T + λI)⁻¹u, by LDLᵀ recurrences in O(d) per column (csrc/cpu/tridiag.cpp).  s are T's
    eigenvalues alone (``dsterf``), for the sums that do not involve z.  Used only where every s
    exceeds the null threshold of _EigenForms, so that it would zero no z and clamp no s: the two are
    then the same sums, to rounding (tests/test_transferability.py)."""

    def __init__(self, s: torch.Tensor, diag: np.ndarray, off: np.ndarray, u: np.ndarray):
        self.s, self.diag, self.off, self.u = s, diag, off, u

    def __call__(self, lam: torch.Tensor, more: bool = True):
        out = _C.tridiag_resolvent_forms_cpu(self.diag, self.off, self.u, lam.contiguous().numpy(), more)
        if out is None:
            raise _NotDefinite
        return tuple(None if q is None else torch.from_numpy(q) for q in out)


def _logme_evidence(mom: _Moments, max_iter: int, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, (the maximised log evidence / n, κ = ‖y‖² / E(λ*)), from the sufficient statistics."""
    forms = _resolvent_forms(mom.gram, mom.cross)
    try:
        return _maximise_evidence(mom, forms, max_iter, tol)
    except _NotDefinite:  # rounding made some T + λI indefinite: the eigenbasis, as everywhere else
        return _maximise_evidence(mom, _resolvent_forms(mom.gram, mom.cross, tridiagonal=False), max_iter, tol)


def _maximise_evidence(mom: _Moments, forms, max_iter: int, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The maximisation over λ = α/β of every column, given ``forms``: the eigenvalues ``forms.s`` of
    FᵀF and ``forms(λ)`` = (Σ z²/(s+λ), Σ z²/(s+λ)², Σ z²/(s+λ)³) per column, z = VᵀFᵀy.  Returns
    (the maximised log evidence / n, κ = ‖y‖² / E(λ*): how much of ‖y‖² the fit cancels) per column."""
    n = mom.n
    d = mom.gram.shape[0]
    s = forms.s
    yy = mom.y_sq
    tiny = torch.finfo(torch.float64).tiny
    # MacKay's fixed point converges linearly, and slowly where the evidence is flat in λ (it ran
    # its 1000 steps on 100k x 1024 random features without meeting 1e-12).  So it only warms up;
    # then Newton on the profile log evidence in t = log λ, β eliminated by its optimum
    # β = n / E(λ), E(λ) = ‖y‖² - Σ z²/(s + λ) = ‖y - Fm‖² + λ‖m‖²:
    #     ℓ(λ) = d/2 log λ - ½ Σ log(λ + s) - n/2 log E(λ)
    # whose stationary points are MacKay's fixed points.  Steps are capped at |Δt| <= 2 and halved
    # (per column) until ℓ does not decrease, so every step is an ascent step.  Where ℓ only approaches
    # its supremum (a column without signal: ℓ ≈ c - A e^(-t) as λ -> ∞) Newton's step is 1 and the
    # gain falls by e per step, so a column whose full step was taken, in the same direction, with a
    # Newton step of at least 1/2, doubles its step (up to 64x) - about 5 steps instead of 20 there.
    # Converged columns stand still, so that rounding in ℓ (~1e-11 of its n-sized terms) never makes
    # the line search halve the others' steps.
    # Σ z²(s + 2λ)/(s + λ)² = b1 + λ b2 with b_k = Σ z²/(s + λ)^k: the residual ‖y - Fm‖².
    lam = torch.ones_like(yy)
    for _ in range(min(_LOGME_WARMUP, max_iter)):
        gamma = (s / (s + lam[:, None])).sum(1)
        b1, m_sq, _ = forms(lam)
        resid = (yy - b1 - lam * m_sq).clamp(min=tiny)
        lam = (gamma / m_sq.clamp(min=tiny)) / ((n - gamma) / resid)
    lam = lam.clamp(min=tiny)

    def profile(t):
        lam = torch.exp(t)
        e = (yy - forms(lam, more=False)[0]).clamp(min=tiny)
        return d / 2 * t - 0.5 * torch.log(s + lam[:, None]).sum(1) - n / 2 * torch.log(e)

    t = torch.log(lam)
    base = profile(t)  # ℓ at the current t, carried from the accepted step of the line search
    boost = torch.ones_like(t)
    last = torch.zeros_like(t)  # the step each column took last
    for _ in range(max(0, max_iter - _LOGME_WARMUP)):
        lam = torch.exp(t)
        il = 1.0 / (s + lam[:, None])
        b1, b2, b3 = forms(lam)
        e = (yy - b1).clamp(min=tiny)
        g_lam = d / (2 * lam) - 0.5 * il.sum(1) - n / 2 * b2 / e
        h_lam = -d / (2 * lam * lam) + 0.5 * (il * il).sum(1) + n / 2 * (2 * b3 / e + (b2 / e) ** 2)
        g_t = lam * g_lam
        h_t = g_t + lam * lam * h_lam
        newton = torch.where(h_t < 0, -g_t / torch.where(h_t < 0, h_t, -1.0), torch.sign(g_t))
        # Converged where the Newton step is < tol, or where ℓ / n has < tol left to gain by the
        # Newton decrement g² / 2|h| (|g| where ℓ is not concave: a column without signal has its
        # supremum at λ -> ∞, w = 0).  The second test is what stops a column whose gradient is
        # float64 rounding (~1e-11 of its n-sized terms) before λ settles to 1e-12.
        gain = torch.where(h_t < 0, 0.5 * g_t * g_t / h_t.abs().clamp(min=tiny), g_t.abs())
        done = (newton.abs() <= tol) | (gain <= tol * n)
        if bool(done.all()):
            break
        proposed = torch.where(done, 0.0, (newton * boost).clamp(-2.0 * boost, 2.0 * boost))
        step = proposed
        for _ in range(30):  # halve where the step would lower ℓ
            trial = profile(t + step)
            worse = trial < base
            if not bool(worse.any()):
                break
            step = torch.where(worse, step / 2, step)
        else:
            step = torch.where(worse, 0.0, step)  # no ascent found at 2^-30 of the step: stay
            trial = torch.where(worse, base, trial)
        grow = (step == proposed) & (newton.abs() >= 0.5) & (step * last > 0)
        boost = torch.where(grow, (boost * 2).clamp(max=64.0), torch.ones_like(boost))
        last = step
        t = t + step
        base = trial
    lam = torch.exp(t)
    b1, m_sq, _ = forms(lam)
    e = yy - b1
    kappa = torch.where(e > 0, yy / e.clamp(min=tiny), math.inf)
    beta = n / e.clamp(min=tiny)
    alpha = lam * beta
    # The evidence at the final (α, β), with m and the residual recomputed for them.
    resid = (yy - b1 - lam * m_sq).clamp(min=tiny)
    evidence = (d / 2 * torch.log(alpha) + n / 2 * torch.log(beta) - n / 2 * math.log(2 * math.pi)
                - 0.5 * torch.log(alpha[:, None] + beta[:, None] * s).sum(1)
                - beta / 2 * resid - alpha / 2 * m_sq)
    return evidence / n, kappa


def _resolvent_forms(gram: torch.Tensor, cross: torch.Tensor, tridiagonal: bool = True):
    """LogME's spectral sums of the symmetric ``gram`` (FᵀF) and the C vectors ``cross`` (FᵀY, (C, d)):
    a _TridiagonalForms where it applies (CPU, LAPACK and the native kernel present, no eigenvalue
    at the null threshold, ``tridiagonal``), else an _EigenForms.

    LogME needs the eigenvectors V only through the C projections Vᵀb, never V itself.  On CPU:
    G = Q T Qᵀ (``dsytrd``, Householder reflectors, T tridiagonal) and Qᵀb by the reflectors
    (``dormqr``, O(d²C)).  Then T's eigenvalues alone (``dsterf``, O(d²)) and the resolvent forms of
    Qᵀb by LDLᵀ recurrences in T, or, where some eigenvalue is at the null threshold (rank-deficient
    features, d > n), T = W S Wᵀ (``dstevd``) and Vᵀb = Wᵀ(Qᵀb).  Either is a fraction of
    ``torch.linalg.eigh``, whose back-transformation of V alone is O(d³)."""
    if gram.device.type != "cpu" or _dsytrd is None:
        s, v = torch.linalg.eigh(gram)
        return _EigenForms(s, cross @ v)
    d = gram.shape[0]
    if d == 1:
        return _EigenForms(gram[0], cross.clone())
    # One BLAS thread: OpenBLAS's workers spin after a threaded call, and on a machine with as many
    # cores as torch threads they then slow the torch steps that follow (measured on 2 cores at
    # d = 1024: the Newton steps 0.07-0.10 s instead of 0.015 s, for 0.03 s saved in dsytrd).
    limit = _threadpool_limits(1, user_api="blas") if _threadpool_limits is not None else contextlib.nullcontext()
    with limit:
        return _lapack_resolvent_forms(gram, cross, tridiagonal and _C is not None)


def _lapack_resolvent_forms(gram: torch.Tensor, cross: torch.Tensor, tridiagonal: bool):
    d = gram.shape[0]
    refl, diag, off, tau, info = _dsytrd(gram.numpy(), lower=1, lwork=64 * d)
    if info != 0:
        raise RuntimeError(f"LAPACK dsytrd failed (info={info})")
    # With uplo="L", Q = H(1)..H(d-1) acts on rows 1..d-1 as the QR factor stored below the first
    # subdiagonal: LAPACK's dormtr is dormqr on those rows.
    qtb = np.array(cross.numpy().T, order="F")        # (d, C)
    qtb[1:], _, info = _dormqr("L", "T", refl[1:, :d - 1], tau, qtb[1:], lwork=64 * max(qtb.shape[1], 1))
    if info != 0:
        raise RuntimeError(f"LAPACK dormqr failed (info={info})")
    if tridiagonal:
        s, info = _dsterf(diag, off)
        if info != 0:
            raise RuntimeError(f"LAPACK dsterf failed (info={info})")
        if s[0] > _null_threshold(float(s[-1]), d):   # ascending: no eigenvalue at the null threshold
            return _TridiagonalForms(torch.from_numpy(s), diag, np.ascontiguousarray(off),
                                     np.ascontiguousarray(qtb))
    s, w, info = _dstevd(diag, off)
    if info != 0:
        raise RuntimeError(f"LAPACK dstevd failed (info={info})")
    return _EigenForms(torch.from_numpy(s), torch.from_numpy(np.ascontiguousarray((w.T @ qtb).T)))


# ----------------------------------------------------------------------------------- H-score
def _ledoit_wolf(mom: _Moments, cov: torch.Tensor, mean: torch.Tensor) -> float:
    """scikit-learn's Ledoit-Wolf shrinkage for the centred features, from one-pass moments.

    Needs Σ_i ‖f_i - μ‖⁴, expanded so no second pass is needed:  with a = ‖f‖², b = fᵀμ, c = ‖μ‖²,
    Σ (a - 2b + c)² = Σa² + 4Σb² + n c² - 4Σab + 2cΣa - 4cΣb,  Σb² = μᵀFᵀFμ,  Σab = (Σ a f)ᵀμ.
    """
    n, d = mom.n, cov.shape[0]
    c = mean @ mean
    sum_a = torch.diagonal(mom.gram).sum()
    sum_b = mom.total @ mean
    sum_b2 = mean @ mom.gram @ mean
    sum_ab = mom.norm2_f @ mean
    sum_x4 = mom.norm4 + 4 * sum_b2 + n * c * c - 4 * sum_ab + 2 * c * sum_a - 4 * c * sum_b
    mu = torch.trace(cov) / d
    beta_ = sum_x4                         # Σ_jk ((X²)ᵀX²)_jk = Σ_i ‖x_i‖⁴
    delta_ = (cov * cov).sum()             # ‖XᵀX / n‖²_F
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * torch.trace(cov) + d * mu * mu) / d
    beta = torch.minimum(beta, delta)
    return 0.0 if float(beta) == 0 else float(beta / delta)


def hscore(features: Any, y: Any, shrinkage: bool = False) -> float:
    """H-score: tr(cov(f)⁺ cov(E[f | y])) (Bao et al., "An Information-theoretic Approach to
    Transferability in Task Transfer Learning", ICIP 2019).

    cov(f) is the sample covariance (n - 1 denominator) and cov(E[f | y]) the covariance of the rows
    replaced by their class means, Σ_c n_c (μ_c - μ)(μ_c - μ)ᵀ / (n - 1); the pseudo-inverse keeps
    eigenvalues above 1e-15 of the largest, as tllib's ``np.linalg.pinv(rcond=1e-15)``.
    ``shrinkage=True`` gives the regularised H-score of Ibrahim, Ponomareva & Mazumder ("Newer is
    not always better", 2022), stable when d is large next to n: cov(f) is replaced by the
    Ledoit-Wolf estimate cov_α = (1 - α) S + α tr(S)/d I (S: the biased covariance, α: the
    Ledoit-Wolf shrinkage, as ``sklearn.covariance.LedoitWolf``) and the score is
    tr(cov_α⁻¹ (1 - α) cov(E[f | y])).
    """
    f = _features(features)
    n, d = f.shape
    codes, n_classes = _labels(y, n, f.device)
    mom = _moments(f, codes, n_classes, fourth=shrinkage, shift=True)
    mean = mom.total / n                                  # of the shifted rows: μ - a
    scatter = mom.gram - n * torch.outer(mean, mean)
    between = mom.cross / mom.y_sq[:, None] - mean       # (C, d): μ_c - μ
    if shrinkage:
        emp = scatter / n
        alpha = _ledoit_wolf(mom, emp, mean)
        cov = (1 - alpha) * emp + alpha * torch.trace(emp) / d * torch.eye(d, dtype=emp.dtype, device=emp.device)
        weight = 1 - alpha
    else:
        cov, weight = scatter / (n - 1), 1.0
    w, u = torch.linalg.eigh(cov)
    keep = w.abs() > 1e-15 * w.abs().max()
    proj = between @ u[:, keep]
    quad = (proj * proj / w[keep]).sum(1)                # (μ_c - μ)ᵀ cov⁺ (μ_c - μ)
    return float(weight * (mom.y_sq * quad).sum() / (n - 1))


# ----------------------------------------------------------------------------------- TransRate
def _logdet_coding(gram: torch.Tensor, scale: float) -> torch.Tensor:
    """log det(I + scale · gram) for a symmetric PSD gram, through its Cholesky factor; where rounding
    has left it indefinite, from gram's eigenvalues with the negative ones (rounding) taken as 0."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(eye + scale * gram)
    if int(info) == 0:
        return 2 * torch.log(torch.diagonal(chol)).sum()
    return torch.log1p(scale * torch.linalg.eigvalsh(gram).clamp(min=0)).sum()


def transrate(features: Any, y: Any, eps: float = 1e-4) -> float:
    """TransRate (Huang et al., "Frustratingly Easy Transferability Estimation", ICML 2022), in
    tllib's form: with Z the features centred by their mean and R(Z) = ½ log det(I + ZᵀZ / (n ε)),

        TransRate = R(Z) - (1/C) Σ_c R(Z_c),   Z_c the rows of class c (n_c of them, scale 1 / (n_c ε)).

    Two passes: the mean and the class means (float64), then per class Z_cᵀZ_c = B_cᵀB_c + n_c δ δᵀ,
    with B_c the class's rows centred by their own mean and δ = μ_c - μ added in float64, one class
    at a time in chunks (memory O(d²) however many classes); ZᵀZ is their sum.  So the float32
    products see only the spread within the class, never the distance between the class means
    (rows centred by the global mean lost the within-class spread to float32 rounding where the
    classes lie far apart: 1% off at centres 200 times the noise, and not positive definite at
    1000), and each Gram matrix is positive semi-definite to rounding even when the class has fewer
    rows than dimensions.
    """
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    f = _features(features)
    n, d = f.shape
    codes, n_classes = _labels(y, n, f.device)
    f64 = torch.float64
    sums = torch.zeros(n_classes, d, dtype=f64, device=f.device)
    for i, c in _chunks(f):
        c64 = c.to(f64)
        if not bool(torch.isfinite(c64.sum(0)).all()):
            raise ValueError(f"features contains NaN or inf (in rows {i}..{i + c.shape[0] - 1}); clean or drop them")
        sums.index_add_(0, codes[i:i + c.shape[0]], c64)
    counts = torch.bincount(codes, minlength=n_classes)
    class_means = sums / counts[:, None].to(f64)
    mean = sums.sum(0) / n
    order = torch.argsort(codes, stable=True)
    bounds = torch.cumsum(counts, 0).tolist()
    scatter = torch.zeros(d, d, dtype=f64, device=f.device)
    start, class_rates = 0, torch.zeros((), dtype=f64, device=f.device)
    work = _work_dtype(f)
    for c in range(n_classes):
        rows = order[start:bounds[c]]
        gram_c = torch.zeros(d, d, dtype=f64, device=f.device)
        scratch = None
        mu_c = class_means[c].to(work)
        for i in range(0, rows.shape[0], _CHUNK):
            scratch = _add_gram(gram_c, f[rows[i:i + _CHUNK]].to(work) - mu_c, i, "features", scratch)
        # B_c = Z_c - 1δᵀ is centred by m = μ_c rounded to the working dtype, δ = m - μ, so
        # Z_cᵀZ_c = B_cᵀB_c + r δᵀ + δ rᵀ + n_c δ δᵀ with r = B_cᵀ1 = Σ_c f - n_c m (float64; 0 but
        # for m's rounding, which times a large δ is not negligible against the spread).
        m = mu_c.to(f64)
        delta, r = m - mean, sums[c] - float(counts[c]) * m
        gram_c = _symmetrise(gram_c).addr_(r, delta).addr_(delta, r).addr_(delta, delta, alpha=float(counts[c]))
        scatter += gram_c
        class_rates = class_rates + 0.5 * _logdet_coding(gram_c, 1.0 / (int(counts[c]) * eps))
        start = bounds[c]
    rate = 0.5 * _logdet_coding(scatter, 1.0 / (n * eps))
    return float(rate - class_rates / n_classes)


# ----------------------------------------------------------------------------------- NCE / LEEP
def _source_probs(p: Any, n_rows: int | None = None) -> torch.Tensor:
    t, _ = as_tensor(p, "source_probs")
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"source_probs must be 2-D (n_samples, n_source_classes), got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError("source_probs must be finite and non-negative (softmax outputs of the source model)")
    if not bool(torch.allclose(t.sum(1), torch.ones((), dtype=t.dtype, device=t.device), atol=1e-3)):
        raise ValueError("source_probs rows must sum to 1 (tol 1e-3): pass softmax probabilities, not logits")
    return t


def nce(source: Any, y: Any) -> float:
    """Negative Conditional Entropy -H(Y | Z) (Tran, Nguyen & Hassner, "Transferability and Hardness of
    Supervised Classification Tasks", ICCV 2019), natural log, from the empirical joint of the source
    model's hard labels Z and the target labels Y:  NCE = Σ_{z,y} P(z, y) log P(y | z)  (≤ 0).

    ``source``: the source model's (n,) predicted labels, or its (n, K) probabilities (argmax taken).
    """
    if (isinstance(source, (np.ndarray, torch.Tensor)) and source.ndim == 2):
        z_codes = _source_probs(source).argmax(1).cpu().numpy()
    else:
        z_codes = np.asarray(source.cpu() if isinstance(source, torch.Tensor) else source)
        if z_codes.ndim != 1:
            raise ValueError(f"source must be (n,) labels or (n, K) probabilities, got shape {z_codes.shape}")
    n = z_codes.shape[0]
    y_codes, n_classes = _labels(y, n, torch.device("cpu"))
    _, z_codes = np.unique(z_codes, return_inverse=True)
    joint = torch.bincount(torch.from_numpy(z_codes.reshape(-1)) * n_classes + y_codes,
                           minlength=(int(z_codes.max()) + 1) * n_classes).view(-1, n_classes).double() / n
    cond = joint / joint.sum(1, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * torch.log(cond[nz])).sum())


def leep(source_probs: Any, y: Any) -> float:
    """Log Expected Empirical Prediction (Nguyen et al., "LEEP: A New Measure to Evaluate
    Transferability of Learned Representations", ICML 2020), natural log:

        P(y, z) = (1/n) Σ_i θ_i(z) [y_i = y],  P(y | z) = P(y, z) / P(z),
        LEEP = (1/n) Σ_i log Σ_z P(y_i | z) θ_i(z)   (≤ 0),

    with θ_i the source model's (n, K) softmax probabilities on the target inputs.
    """
    theta = _source_probs(source_probs)
    n = theta.shape[0]
    codes, n_classes = _labels(y, n, theta.device)
    joint = torch.zeros(n_classes, theta.shape[1], dtype=torch.float64, device=theta.device)
    joint.index_add_(0, codes, theta)
    joint /= n
    cond = joint / joint.sum(0).clamp(min=torch.finfo(torch.float64).tiny)   # P(y | z), (C, K)
    eep = (theta * cond[codes]).sum(1)
    return float(torch.log(eep).mean())


# ----------------------------------------------------------------------------------- choosing the source
class SourceScore(NamedTuple):
    """One row of :func:`rank_sources`' table."""

    name: str
    score: float
    dims: int
    seconds: float  # extraction (of the sample) + scoring


# The scores rank_sources can use: those computed from features and target labels alone.
RANKING_METRICS = {
    "logme": lambda f, y, regression: logme(f, y, regression=regression),
    "hscore": lambda f, y, regression: hscore(f, y),
    "hscore_shrinkage": lambda f, y, regression: hscore(f, y, shrinkage=True),
    "transrate": lambda f, y, regression: transrate(f, y),
}


def _take(data: Any, rows: np.ndarray) -> Any:
    """The sampled rows of an array, tensor, feature store (fancy-indexed) or list of inputs."""
    if isinstance(data, torch.Tensor):
        return data[torch.from_numpy(rows).to(data.device)]
    if isinstance(data, (list, tuple)):
        return [data[i] for i in rows.tolist()]
    return data[rows]


def rank_sources(candidates: Mapping[str, Any] | Sequence[Any], data: Any = None, y: Any = None, *,
                 metric: str = "logme", sample: int | None = None, regression: bool = False,
                 standardize: bool = False, seed: int = 0) -> list[SourceScore]:
    """Rank candidate source models for a labelled target task, best first, before paying for the
    extraction of the whole corpus and for training.

    Each candidate is an :class:`tlfast.Extractor` (it extracts features of ``data``) or a precomputed
    (n, d) feature array (numpy or torch) of the same n rows; pass a ``{name: candidate}`` mapping, or a
    sequence of Extractors (named by ``Extractor.name``).  Every candidate is scored on the same rows:
    all n, or ``sample`` of them drawn at random (``seed``), so that only a sample is extracted.

    Args:
        candidates: the source models or their features.
        data: the target inputs the Extractors take (images, texts); unused by precomputed features.
        y: (n,) target labels (or (n,) / (n, t) targets with ``regression=True``).
        metric: "logme" (default; also the only one for regression), "hscore", "hscore_shrinkage" or
            "transrate" (see this module).
        sample: score this many random rows instead of all n.
        standardize: score each candidate's features scaled to zero mean and unit variance per
            column (over the scored rows; constant columns left as they are).  LogME's prior on the
            weights is isotropic, so its evidence depends on each feature's scale: pass True when the
            model that will be trained standardises its inputs (:class:`tlfast.LinearProbe` does),
            so that the score is about that model.

    Returns:
        ``[SourceScore(name, score, dims, seconds), ...]`` sorted by score, best first; ``seconds`` is
        the candidate's extraction of the sample plus its scoring.
    """
    if metric not in RANKING_METRICS:
        raise ValueError(f"metric must be one of {sorted(RANKING_METRICS)}, got {metric!r}")
    if regression and metric != "logme":
        raise ValueError(f"metric={metric!r} needs class labels; for regression targets use metric='logme'")
    if isinstance(candidates, Mapping):
        items = list(candidates.items())
    elif isinstance(candidates, Sequence) and not isinstance(candidates, (str, bytes)):
        items = [(getattr(c, "name", None), c) for c in candidates]
        if any(name is None for name, _ in items):
            raise TypeError("a sequence of candidates must hold Extractors (named by .name); pass a "
                            "{name: features} mapping for precomputed features")
    else:
        raise TypeError(f"candidates must be a mapping {{name: Extractor or features}} or a sequence of "
                        f"Extractors, got {type(candidates).__name__}")
    if not items:
        raise ValueError("candidates is empty")
    if len({name for name, _ in items}) != len(items):
        raise ValueError("candidate names must be distinct")
    if y is None:
        raise ValueError("y (the target labels) is required")
    y_all = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    n = len(y_all)
    if sample is not None:
        if isinstance(sample, bool) or not isinstance(sample, int) or not 2 <= sample:
            raise ValueError(f"sample must be an int >= 2 or None, got {sample!r}")
    rows = (np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
            if sample is not None and sample < n else None)
    y_used = y_all if rows is None else y_all[rows]
    table = []
    for name, cand in items:
        t = time.perf_counter()
        if hasattr(cand, "extract"):
            if data is None:
                raise ValueError(f"candidate {name!r} is an Extractor: pass the inputs it extracts as data")
            if len(data) != n:
                raise ValueError(f"data has {len(data)} items but y has {n} labels")
            feats = cand.extract(data if rows is None else _take(data, rows), progress=False)
        elif isinstance(cand, (np.ndarray, torch.Tensor)) or hasattr(cand, "__array__"):
            if len(cand) != n:
                raise ValueError(f"candidate {name!r} has {len(cand)} rows but y has {n} labels")
            feats = cand if rows is None else _take(cand, rows)
        else:
            raise TypeError(f"candidate {name!r} must be an Extractor or a feature array, got {type(cand).__name__}")
        f = _features(feats, f"features of {name!r}")
        if standardize:
            f = f.to(_work_dtype(f))
            scale = f.std(0, unbiased=False)
            f = (f - f.mean(0)) / torch.where(scale > 0, scale, torch.ones_like(scale))
        score = RANKING_METRICS[metric](f, y_used, regression)
        table.append(SourceScore(str(name), score, int(f.shape[1]), time.perf_counter() - t))
    return sorted(table, key=lambda r: -r.score)


def ranking_table(table: Sequence[SourceScore], metric: str = "logme") -> str:
    """A Markdown table of :func:`rank_sources`' result."""
    lines = [f"| rank | source | {metric} | dims | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {r.name} | {r.score:.4f} | {r.dims} | {r.seconds:.2f} |" for i, r in enumerate(table, 1)]
    return "\n".join(lines)
