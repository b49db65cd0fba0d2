"""Correspondences between two feature sets: mutual nearest neighbours, Lowe's ratio test, a threshold;
or by linear solving: an exact one-to-one assignment, or the argmax pairs of an entropic OT plan.

Two fused kNN passes (source -> target with k = 1 or 2, target -> source with k = 1) give every
kNN test below, so memory stays O((n + m) d) and the n x m matrix never exists.  ``method=
"assignment"`` holds the dense cost only under a memory budget; above it, it solves on the union
of both directions' kNN graphs.  ``method="sinkhorn"`` uses tlfast.ot (fused, O((n + m) d)).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from ._validate import validate_pair
from .ops import knn, pairwise
from .reference import pairwise_tile

__all__ = ["Matches", "match", "METHODS", "ASSIGNMENT_DENSE_BYTES"]

METHODS = ("knn", "assignment", "sinkhorn")
# method="assignment": the dense path holds the float32 cost and scipy's float64 copy (12 bytes a
# pair); above this budget it solves on the sparse kNN graph.
ASSIGNMENT_DENSE_BYTES = 1 << 30
# Sparse assignment: k per direction starts here and doubles until a perfect matching exists.
_ASSIGN_K0, _ASSIGN_K_MAX = 8, 512


class Matches(NamedTuple):
    """Pairs ``(source_idx[i], target_idx[i])`` in increasing source order, with the metric's value
    ``scores[i]`` between them (float32; int64 indices; numpy or torch like the inputs)."""

    source_idx: Any
    target_idx: Any
    scores: Any


def _ratio_distance(values: torch.Tensor, metric: str) -> torch.Tensor:
    """The distance Lowe's ratio is taken on: Euclidean for l2 (values are squared) and for cosine
    (‖a/|a| - b/|b|‖ = sqrt(2 - 2 cos)), the divergence itself for kl / js."""
    if metric == "l2":
        return values.clamp(min=0).sqrt()
    if metric == "cosine":
        return (2 - 2 * values).clamp(min=0).sqrt()
    return values


def _kl_backward(source: torch.Tensor, target: torch.Tensor, backend: str, precision: str) -> torch.Tensor:
    """For each target row t, argmin over source rows s of KL(s ‖ t) (the forward pass's direction).

    KL(s ‖ t) = Σ s log s - Σ s log t, so for fixed t it is the largest inner product between
    [s, -Σ s log s] and [log t, 1]: one fused ip kNN.  log 0 is floored at log(float32 tiny), which
    keeps +inf divergences last without producing inf in the product.
    """
    s = source.double()
    neg_entropy = torch.special.xlogy(s, s).sum(dim=1, keepdim=True)
    log_t = target.double().clamp(min=torch.finfo(torch.float32).tiny).log()
    s_aug = torch.cat([s, -neg_entropy], dim=1).float()
    t_aug = torch.cat([log_t, torch.ones_like(log_t[:, :1])], dim=1).float()
    return knn(t_aug, s_aug, 1, "ip", backend=backend, precision=precision).indices[:, 0]


def _kl_backward_k(source: torch.Tensor, target: torch.Tensor, k: int, backend: str):
    """For each target row t, the k source rows s with the smallest KL(s ‖ t) (see _kl_backward)."""
    s = source.double()
    neg_entropy = torch.special.xlogy(s, s).sum(dim=1, keepdim=True)
    log_t = target.double().clamp(min=torch.finfo(torch.float32).tiny).log()
    s_aug = torch.cat([s, -neg_entropy], dim=1).float()
    t_aug = torch.cat([log_t, torch.ones_like(log_t[:, :1])], dim=1).float()
    return knn(t_aug, s_aug, k, "ip", backend=backend).indices


def _pair_values(s: torch.Tensor, t: torch.Tensor, metric: str) -> torch.Tensor:
    """metric(s_i, t_i) for aligned rows, float32, through the reference tile (diagonal of 256-row blocks)."""
    out = torch.empty(s.shape[0], dtype=torch.float32, device=s.device)
    for i in range(0, s.shape[0], 256):
        out[i:i + 256] = pairwise_tile(s[i:i + 256], t[i:i + 256], metric).diagonal().float()
    return out


def _assignment(s: torch.Tensor, t: torch.Tensor, metric, backend: str, dense_bytes: int):
    """One-to-one pairs of minimal total cost (maximal for cosine / ip): (source_idx, target_idx)."""
    try:
        from scipy.optimize import linear_sum_assignment
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import min_weight_full_bipartite_matching
    except ImportError as exc:  # pragma: no cover - scipy comes with the train / test extras
        raise ImportError(f"method='assignment' needs scipy: pip install 'tlfast[train]' ({exc})") from exc
    n, m = s.shape[0], t.shape[0]
    maximize = metric.larger_is_better
    if 12 * n * m <= dense_bytes:
        cost = pairwise(s, t, metric.name, backend=backend).double().cpu().numpy()
        if not np.isfinite(cost).any(axis=1 if n <= m else 0).all():
            raise ValueError("some row has +inf cost to every other row (kl with disjoint supports): "
                             "no finite assignment exists")
        cost = np.where(np.isfinite(cost), cost, 1e300)
        rows, cols = linear_sum_assignment(cost, maximize=maximize)
        return torch.as_tensor(rows, device=s.device), torch.as_tensor(cols, device=s.device)
    # Sparse: the union of each source's k nearest targets and each target's k nearest sources.
    k = min(_ASSIGN_K0, n, m)
    while True:
        fwd = knn(s, t, k, metric.name, backend=backend)
        if metric.name == "kl":
            back_idx = _kl_backward_k(s, t, k, backend)
        else:
            back_idx = knn(t, s, k, metric.name, backend=backend).indices
        ri = torch.cat([torch.arange(n).repeat_interleave(k), back_idx.reshape(-1).cpu()])
        ci = torch.cat([fwd.indices.reshape(-1).cpu(), torch.arange(m).repeat_interleave(k)])
        key = torch.unique(ri * m + ci)
        ri, ci = key // m, key % m
        val = _pair_values(s[ri.to(s.device)], t[ci.to(s.device)], metric.name).double().cpu()
        finite = torch.isfinite(val)
        ri, ci, val = ri[finite], ci[finite], val[finite]
        if val.numel() == 0:
            raise ValueError("every candidate pair has +inf cost (kl with disjoint supports): "
                             "no finite assignment exists")
        # Strictly positive weights (scipy drops explicit zeros), same optimum: a constant shift.
        w = (val.max() - val + 1.0) if maximize else (val - val.min() + 1.0)
        graph = csr_matrix((w.numpy(), (ri.numpy(), ci.numpy())), shape=(n, m))
        try:
            rows, cols = min_weight_full_bipartite_matching(graph)
            return torch.as_tensor(rows, device=s.device), torch.as_tensor(cols, device=s.device)
        except ValueError:
            if k >= min(_ASSIGN_K_MAX, n, m):
                raise ValueError(f"no perfect matching in the union of the {k}-nearest-neighbour graphs of {n} "
                                 f"source and {m} target rows; raise memory_budget so that the dense "
                                 f"assignment runs ({12 * n * m / 2**30:.1f} GiB)") from None
            k = min(2 * k, _ASSIGN_K_MAX, n, m)


def match(source: Any, target: Any, metric: str = "cosine", *, mutual: bool = True, ratio: float | None = None,
          threshold: float | None = None, backend: str = "auto", precision: str = "exact", method: str = "knn",
          reg: float = 0.05, memory_budget: int = ASSIGNMENT_DENSE_BYTES) -> Matches:
    """Match each source row to its nearest target row, keeping the pairs that pass every test.

    Args:
        source: (n, d) numpy array or torch tensor.
        target: (m, d), same kind and device.
        metric: as in :func:`tlfast.knn`; ``kl`` ranks targets by KL(source ‖ target) in both passes.
        mutual: keep (s, t) only when s is also t's nearest source row (mutual nearest neighbours).
        ratio: Lowe's ratio test, in (0, 1]: keep s only when dist(s, 1st) < ratio * dist(s, 2nd),
            with dist the Euclidean distance for l2 and cosine (sqrt(2 - 2 cos) between unit vectors)
            and the divergence for kl / js; not defined for ``ip`` (no distance).  Needs m >= 2.
        threshold: keep pairs whose score is at least this good (>= for cosine / ip, <= for l2, kl, js).
        backend: as in :func:`tlfast.knn`.
        precision: "exact", "bf16" or "fp16", as in :func:`tlfast.knn` (both passes; method="knn").
        method: "knn" (the nearest-neighbour tests above); "assignment": the one-to-one pairing of
            min(n, m) pairs with the best total metric value (scipy's ``linear_sum_assignment`` on
            the dense cost when 12 n m bytes fit ``memory_budget``; above it
            ``min_weight_full_bipartite_matching`` on the union of both directions' k-nearest-
            neighbour graphs, k doubling from 8 until a perfect matching exists — optimal within
            that graph); "sinkhorn": the argmax pairs of the entropic OT plan of
            :func:`tlfast.ot.sinkhorn` with ``reg`` (``mutual`` keeps the one-to-one ones).
            ``ratio`` is a kNN test only; ``threshold`` applies to every method.
        reg: ε of method="sinkhorn", in cost units (``metric`` is the cost; cosine as 1 - cos).
        memory_budget: bytes the dense assignment may hold.

    Returns:
        Matches(source_idx, target_idx, scores), sorted by source index.
    """
    inp = validate_pair(source, target, metric)
    name = inp.metric.name
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if method != "knn":
        if ratio is not None:
            raise ValueError(f"ratio is a test of method='knn', not of method={method!r}")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise ValueError(f"threshold must be a number, got {threshold!r}")
        s, t = inp.queries, inp.corpus
        if method == "assignment":
            if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, np.integer)) or memory_budget < 0:
                raise ValueError(f"memory_budget must be a non-negative int (bytes), got {memory_budget!r}")
            src, tgt = _assignment(s, t, inp.metric, backend, int(memory_budget))
        else:
            from . import ot

            if name == "js":
                raise ValueError("method='sinkhorn' needs a cost with an inner-product form: "
                                 "metric 'l2', 'cosine', 'ip' or 'kl'")
            ot_backend = backend if backend in ot.BACKENDS else "auto"
            pairs = ot.sinkhorn(s, t, name, reg, backend=ot_backend).assignment(mutual=mutual)
            src, tgt = torch.as_tensor(pairs.source_idx), torch.as_tensor(pairs.target_idx)
        order = torch.argsort(src)
        src, tgt = src[order].to(s.device), tgt[order].to(s.device)
        scores = _pair_values(s[src], t[tgt], name)
        if threshold is not None:
            keep = scores >= threshold if inp.metric.larger_is_better else scores <= threshold
            src, tgt, scores = src[keep], tgt[keep], scores[keep]
        return Matches(inp.output(src), inp.output(tgt), inp.output(scores))
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"ratio must be a number in (0, 1] (Lowe used 0.8), got {ratio!r}")
        if name == "ip":
            raise ValueError("ratio test needs a distance and metric 'ip' has none; use metric='cosine' or 'l2'")
        if inp.corpus.shape[0] < 2:
            raise ValueError("ratio test needs at least 2 target rows (it compares the two nearest)")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    s, t = inp.queries, inp.corpus
    fwd = knn(s, t, 2 if ratio is not None else 1, name, backend=backend, precision=precision)
    best, tgt = fwd.values[:, 0], fwd.indices[:, 0]
    keep = torch.ones_like(tgt, dtype=torch.bool)
    if ratio is not None:
        d = _ratio_distance(fwd.values, name)
        keep &= d[:, 0] < ratio * d[:, 1]
    if threshold is not None:
        keep &= best >= threshold if inp.metric.larger_is_better else best <= threshold
    if mutual:
        back = (_kl_backward(s, t, backend, precision) if name == "kl"
            else knn(t, s, 1, name, backend=backend, precision=precision).indices[:, 0])
        keep &= back[tgt] == torch.arange(s.shape[0], device=s.device)
    src = keep.nonzero()[:, 0]
    return Matches(inp.output(src), inp.output(tgt[src]), inp.output(best[src]))
