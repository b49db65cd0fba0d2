"""Correspondences between two feature sets: mutual nearest neighbours, Lowe's ratio test, a threshold.

Two fused kNN passes (source -> target with k = 1 or 2, target -> source with k = 1) give every
test below, so memory stays O((n + m) d) and the n x m matrix never exists.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._validate import validate_pair
from .ops import knn

__all__ = ["Matches", "match"]


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


def match(source: Any, target: Any, metric: str = "cosine", *, mutual: bool = True, ratio: float | None = None,
          threshold: float | None = None, backend: str = "auto", precision: str = "exact") -> Matches:
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
        precision: "exact", "bf16" or "fp16", as in :func:`tlfast.knn` (both passes).

    Returns:
        Matches(source_idx, target_idx, scores), sorted by source index.
    """
    inp = validate_pair(source, target, metric)
    name = inp.metric.name
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
