"""Domain alignment (CORAL, optimal transport) and the domain gap (MMD) between source and target features."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._validate import as_tensor, check_matrix
from .ops import pairwise

__all__ = ["coral", "mmd", "ot_align"]

# Rows of the pooled sample the median heuristic looks at: the median of ~2M pairwise distances
# is within a fraction of a percent of the full one, and n in the millions stays cheap.
_MEDIAN_SAMPLE = 2048


def _features(x: Any, name: str, min_rows: int) -> tuple[torch.Tensor, bool]:
    t, is_numpy = as_tensor(x, name)
    check_matrix(t, name)
    if t.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {t.shape[0]}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; clean or drop those rows")
    return t, is_numpy


def _check_pair(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dimension mismatch: {na} has dim {a.shape[1]}, {nb} has dim {b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"{na} is on {a.device} but {nb} is on {b.device}; move both to one device")


def _ridge_power(xc: torch.Tensor, lam: float, power: float):
    """``v -> v @ (Cov + lam I)^power`` for the centred rows ``xc`` (n, d), Cov = xcᵀxc / (n - 1).

    With Cov = U diag(w) Uᵀ (U: the r non-null eigenvectors), (Cov + lam I)^p = U diag((w + lam)^p -
    lam^p) Uᵀ + lam^p I, exactly.  When n <= d (few samples of wide features, the usual case for
    transfer learning) U comes from the n x n Gram matrix instead of the d x d covariance, so the cost
    is O(n² d) rather than O(d³).
    """
    n, d = xc.shape
    if n <= d:
        w, v = torch.linalg.eigh(xc @ xc.T / (n - 1))
        keep = w > w.max().clamp(min=0) * (n * torch.finfo(w.dtype).eps)
        w, v = w[keep], v[:, keep]
        u = (xc.T @ v) / torch.sqrt(w * (n - 1))  # unit eigenvectors of Cov
    else:
        w, u = torch.linalg.eigh(xc.T @ xc / (n - 1))
        w = w.clamp(min=0)
    coef = (w + lam).pow(power) - lam ** power
    return lambda vec: (vec @ u) * coef @ u.T + lam ** power * vec


def coral(source: Any, target: Any, *, lam: float = 1.0) -> Any:
    """CORrelation ALignment (Sun, Feng & Saenko, 2016) with re-centring.

    Returns ``(source - mean_s) @ (Cov_s + lam I)^-1/2 @ (Cov_t + lam I)^1/2 + mean_t``: the source
    features whitened, re-coloured with the target covariance and moved to the target mean, so that
    a model fitted on them applies to target features.  ``lam`` (1 in the paper's "+ eye") keeps the
    whitening well-conditioned.  Computed in float64; returned with the source's shape, kind, dtype
    and device.
    """
    s, is_numpy = _features(source, "source", 2)
    t, t_np = _features(target, "target", 2)
    if is_numpy != t_np:
        raise ValueError("source and target must be the same kind of array (both numpy or both torch)")
    _check_pair(s, t, "source", "target")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam > 0 or not np.isfinite(lam):
        raise ValueError(f"lam must be a positive number (the ridge added to both covariances), got {lam!r}")
    s64, t64 = s.double(), t.double()
    mean_t = t64.mean(0)
    sc = s64 - s64.mean(0)
    whiten = _ridge_power(sc, float(lam), -0.5)
    colour = _ridge_power(t64 - mean_t, float(lam), 0.5)
    out = (colour(whiten(sc)) + mean_t).to(s.dtype)
    return out.numpy() if is_numpy else out


def ot_align(source: Any, target: Any, *, reg: float = 1.0, metric: str = "l2", max_iter: int = 1000,
             tol: float = 1e-6, backend: str = "auto") -> Any:
    """Optimal-transport domain adaptation: the source rows moved onto the target distribution.

    Solves entropic OT from the source to the target rows (:func:`tlfast.ot.sinkhorn`, cost =
    ``metric``, ε = ``reg`` in cost units, uniform weights) and returns the barycentric map
    T(s_i) = Σ_j P_ij t_j / Σ_j P_ij — POT's ``ot.da.SinkhornTransport(reg_e=reg).fit(Xs=source,
    Xt=target).transform(Xs=source)`` — computed in tiles, never forming the plan.  A model fitted
    on the mapped source features applies to target features.  Same shape, kind and dtype as the
    source.
    """
    from . import ot

    return ot.sinkhorn(source, target, metric, reg, max_iter=max_iter, tol=tol, backend=backend).transport()


def _rbf_sum(a: torch.Tensor, b: torch.Tensor, gamma: float, tile: int, same: bool) -> float:
    """Σ_{i,j} exp(-gamma ‖a_i - b_j‖²) over tiles (i != j when ``same``), accumulated in float64."""
    total = 0.0
    for i in range(0, a.shape[0], tile):
        ai = a[i:i + tile]
        for j in range(i if same else 0, b.shape[0], tile):
            kern = torch.exp(-gamma * pairwise(ai, b[j:j + tile], "l2").double())
            if same and j == i:
                total += float(kern.sum() - kern.diagonal().sum())
            else:
                # Off-diagonal tiles of a symmetric sum appear twice (i, j) and (j, i).
                total += float(kern.sum()) * (2 if same else 1)
    return total


def mmd(x: Any, y: Any, kernel: str = "rbf", sigma: float | None = None, *, tile: int = 2048) -> float:
    """Unbiased squared Maximum Mean Discrepancy between samples ``x`` (m, d) and ``y`` (n, d).

    MMD² = Σ_{i≠j} k(x_i, x_j) / (m(m-1)) + Σ_{i≠j} k(y_i, y_j) / (n(n-1)) - 2 Σ_{i,j} k(x_i, y_j) / (mn)
    with the Gaussian kernel k(a, b) = exp(-‖a - b‖² / (2 sigma²)) (Gretton et al., 2012).  ``sigma``
    defaults to the median heuristic: the median Euclidean distance between distinct rows of the
    pooled sample (of an evenly spaced subsample of 2048 rows when larger).  Kernel sums run over
    ``tile`` x ``tile`` blocks of tlfast's fused l2 kernel, so memory is O(tile²) whatever m and n.
    The estimate is unbiased, so it can be slightly negative when the distributions are equal.
    """
    if kernel != "rbf":
        raise ValueError(f"kernel must be 'rbf' (Gaussian), got {kernel!r}")
    a, a_np = _features(x, "x", 2)
    b, b_np = _features(y, "y", 2)
    if a_np != b_np:
        raise ValueError("x and y must be the same kind of array (both numpy or both torch)")
    _check_pair(a, b, "x", "y")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int, got {tile!r}")
    a, b = a.float(), b.float()
    if sigma is None:
        pooled = torch.cat([a, b])
        if pooled.shape[0] > _MEDIAN_SAMPLE:
            pooled = pooled[torch.linspace(0, pooled.shape[0] - 1, _MEDIAN_SAMPLE).long()]
        d2 = pairwise(pooled, pooled, "l2")
        iu = torch.triu_indices(d2.shape[0], d2.shape[0], offset=1)
        sigma = float(d2[iu[0], iu[1]].clamp(min=0).sqrt().median())
        if sigma == 0:
            raise ValueError("every pooled row is identical, so the median heuristic gives sigma = 0; pass sigma")
    elif isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"sigma must be a positive number or None (median heuristic), got {sigma!r}")
    gamma = 1.0 / (2.0 * float(sigma) ** 2)
    m, n = a.shape[0], b.shape[0]
    kxx = _rbf_sum(a, a, gamma, tile, True) / (m * (m - 1))
    kyy = _rbf_sum(b, b, gamma, tile, True) / (n * (n - 1))
    kxy = _rbf_sum(a, b, gamma, tile, False) / (m * n)
    return kxx + kyy - 2 * kxy
