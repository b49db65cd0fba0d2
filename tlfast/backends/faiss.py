"""The ``faiss`` backend: exact (flat) search through faiss-cpu, for side-by-side runs and as the
engine under tlfast's approximate indexes (tlfast/ann.py).

Metric mapping (values returned on tlfast's definitions, see tlfast.METRICS):

* ``ip``     -> ``METRIC_INNER_PRODUCT`` (BLAS sgemm + heap).
* ``cosine`` -> rows L2-normalised in float32, then ``METRIC_INNER_PRODUCT``.
* ``l2``     -> ``METRIC_L2``, squared distances (faiss's convention is tlfast's).
* ``js``     -> ``METRIC_JensenShannon``: faiss computes ½Σ[x·log(x/m) + y·log(y/m)], m = (x+y)/2,
  natural log — the same scale as tlfast's ½KL(q‖m) + ½KL(c‖m), so no conversion is needed.
  faiss evaluates 0·log(m/0) as NaN, though, so rows with a zero entry are refused with a
  ValueError (tlfast's own kernels define 0·log0 = 0 and handle them).
* ``kl``     -> faiss has no KL metric: ValueError pointing at backend="cpu" (or "auto").

Tie order: faiss keeps a heap per query whose order among equal values is its own, and which of
several tied candidates survives at the k-th place is not specified.  This adapter restores
tlfast's contract — best first, ties toward the smaller corpus index, identical indices to the other
backends wherever values are exactly equal — by asking faiss for one candidate more than needed,
widening the request for the queries whose last candidate ties the k-th, and ordering each row by
(value, index).  "Equal" means equal in faiss's float32 values: mathematically equal
cosines of duplicated rows can differ by an ulp after sgemm, and then their order follows the
rounding (as it does between tlfast's own backends).

CPU tensors reach faiss as zero-copy numpy views (what ``faiss.contrib.torch_utils`` also does for
CPU tensors); the faiss-cpu wheel has no GPU code, so this backend runs on ``cpu`` only and ``auto``
never picks it there: tlfast's fused kernels are 2-7x faster than faiss flat search here (cosine,
500k x 128: 927 vs 133 queries/s in benchmarks/results/ann-cpu.md).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..metrics import Metric
from . import BackendInfo

NAME = "faiss"

# faiss's metric for each tlfast metric it can serve; cosine runs as ip on normalised rows.
_FAISS_METRIC = {"ip": "METRIC_INNER_PRODUCT", "cosine": "METRIC_INNER_PRODUCT",
                 "l2": "METRIC_L2", "js": "METRIC_JensenShannon"}


def _faiss():
    try:
        import faiss  # imported lazily: faiss is an optional extra
    except ImportError as exc:
        raise ImportError(f"faiss is not installed ({exc}); install it with pip install 'tlfast[faiss]'") from exc
    return faiss


def info() -> BackendInfo:
    try:
        faiss = _faiss()
    except ImportError as exc:
        return BackendInfo(False, str(exc), ())
    return BackendInfo(True, f"faiss {faiss.__version__} flat search (CPU)", ("cpu",))


def supports(device: torch.device) -> bool:
    return device.type == "cpu"


def faiss_metric(metric: Metric) -> int:
    """The faiss metric constant serving ``metric``; ValueError for metrics faiss lacks (kl)."""
    if metric.name not in _FAISS_METRIC:
        raise ValueError(f"backend 'faiss' has no '{metric.name}' metric (faiss implements ip, l2 and "
                         f"js, and tlfast adds cosine); use backend='cpu' or backend='auto' for "
                         f"metric='{metric.name}'")
    return getattr(_faiss(), _FAISS_METRIC[metric.name])


def as_float32(x: torch.Tensor, metric: Metric) -> np.ndarray:
    """Contiguous float32 numpy rows as faiss wants them: normalised for cosine; zero-free for js."""
    x = x.to(torch.float32)
    if metric.name == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    elif metric.name == "js" and bool((x == 0).any()):
        raise ValueError("backend 'faiss' cannot compute js for rows with zero entries: faiss's "
                         "METRIC_JensenShannon evaluates 0*log(m/0) as NaN; use backend='cpu' or "
                         "backend='auto' (tlfast defines 0*log(0) = 0)")
    return np.ascontiguousarray(x.contiguous().numpy())


def topk_tie_safe(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
                  queries: np.ndarray, k: int, n: int, larger_is_better: bool,
                  exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """k best of ``search`` per query, ordered by (value best-first, index), ties resolved exactly.

    ``search(rows, kk)`` returns faiss-style (values, indices) with kk candidates per row.  A row is
    final once its last candidate is strictly worse than the one the k-th answer needs (so no tie
    can straddle the cut); other rows are searched again with twice the candidates.
    """
    nq = queries.shape[0]
    want = k + 1 if exclude_self else k  # candidates before dropping the (i, i) pair
    values = np.empty((nq, k), dtype=np.float32)
    indices = np.empty((nq, k), dtype=np.int64)
    rows = np.arange(nq)
    kk = min(n, want + 1)
    while rows.size:
        d, i = search(queries[rows], kk)
        open_tie = d[:, kk - 1] == d[:, want - 1] if kk < n else np.zeros(len(rows), dtype=bool)
        done = rows[~open_tie]
        d, i = d[~open_tie], i[~open_tie]
        key = -d if larger_is_better else d
        is_self = (i == done[:, None]) if exclude_self else np.zeros(i.shape, dtype=bool)
        # lexsort: last key is primary -> (not self first, best value, smaller index).
        order = np.lexsort((i, key, is_self), axis=1)[:, :k]
        values[done] = np.take_along_axis(d, order, axis=1)
        indices[done] = np.take_along_axis(i, order, axis=1)
        rows = rows[open_tie]
        kk = min(n, 2 * kk)
    return values, indices


def knn(q: torch.Tensor, c: torch.Tensor, k: int, metric: Metric, exclude_self: bool):
    faiss = _faiss()
    fm = faiss_metric(metric)
    qa = as_float32(q, metric)
    ca = qa if c is q else as_float32(c, metric)
    values, indices = topk_tie_safe(lambda rows, kk: faiss.knn(rows, ca, kk, metric=fm), qa, k,
                                    ca.shape[0], metric.larger_is_better, exclude_self)
    return torch.from_numpy(values), torch.from_numpy(indices)


def pairwise(q: torch.Tensor, c: torch.Tensor, metric: Metric) -> torch.Tensor:
    faiss = _faiss()
    fm = faiss_metric(metric)
    qa = as_float32(q, metric)
    ca = qa if c is q else as_float32(c, metric)
    return torch.from_numpy(faiss.pairwise_distances(qa, ca, fm))
