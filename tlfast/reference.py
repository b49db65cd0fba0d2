"""Pure-PyTorch oracle for every op: what each metric means, computed in float64 and in tiles.

Every kernel in tlfast is tested and benchmarked against these functions.  They run on any device,
hold at most one (query chunk x corpus chunk) tile of the distance matrix at a time, and follow the
contract exactly: values float32, indices int64, best first, ties to the smaller corpus index.
They take validated torch tensors (see ``tlfast.knn`` for the checked public entry point).
"""
from __future__ import annotations

import math

import torch

from .metrics import Metric, get_metric

__all__ = ["pairwise", "knn", "pairwise_tile"]

QUERY_CHUNK = 1024
CORPUS_CHUNK = 8192
# js materialises (query chunk, corpus chunk, dim); bound that block's element count.
JS_BLOCK_ELEMENTS = 1 << 23


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.special.xlogy(x, x)  # 0 log 0 = 0


def pairwise_tile(q: torch.Tensor, c: torch.Tensor, metric: str | Metric,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The (len(q), len(c)) block of metric values, computed in ``dtype``.

    ip: q @ c.T.  cosine: normalised rows, then ip.  l2: |q|^2 + |c|^2 - 2 q.c, clamped at 0.
    kl: sum q log q - q @ log(c).T (the GEMM form), +inf where some q > 0 meets c == 0.
    js: (sum q log q + sum c log c - sum s log(s / 2)) / 2 with s = q + c (no GEMM form).
    """
    m = get_metric(metric)
    q = q.to(dtype)
    c = c.to(dtype)
    if m.name == "ip":
        return q @ c.T
    if m.name == "cosine":
        return torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(c, dim=1).T
    if m.name == "l2":
        d = (q * q).sum(1, keepdim=True) + (c * c).sum(1)[None, :] - 2.0 * (q @ c.T)
        return d.clamp_min_(0.0)
    if m.name == "kl":
        neg_entropy = _xlogx(q).sum(1, keepdim=True)
        log_c = torch.where(c > 0, torch.log(c), torch.zeros((), dtype=dtype, device=c.device))
        kl = neg_entropy - q @ log_c.T
        # q > 0 where c == 0: counted by a second product of indicator matrices.
        support_gap = (q > 0).to(dtype) @ (c == 0).to(dtype).T
        return kl.masked_fill_(support_gap > 0, math.inf)
    if m.name == "js":
        out = torch.empty(q.shape[0], c.shape[0], dtype=dtype, device=q.device)
        per_row = max(1, JS_BLOCK_ELEMENTS // max(1, c.shape[0] * q.shape[1]))
        hq = _xlogx(q).sum(1)
        hc = _xlogx(c).sum(1)
        for i in range(0, q.shape[0], per_row):
            qi = q[i:i + per_row]
            s = qi[:, None, :] + c[None, :, :]
            cross = torch.special.xlogy(s, s / 2).sum(-1)
            out[i:i + per_row] = 0.5 * (hq[i:i + per_row, None] + hc[None, :] - cross)
        return out.clamp_min_(0.0)
    raise AssertionError(m)  # get_metric rejects unknown names


def pairwise(queries: torch.Tensor, corpus: torch.Tensor, metric: str | Metric = "cosine",
             *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Full (n, m) float32 matrix, computed tile by tile in ``dtype``."""
    out = torch.empty(queries.shape[0], corpus.shape[0], dtype=torch.float32, device=queries.device)
    for i in range(0, queries.shape[0], QUERY_CHUNK):
        for j in range(0, corpus.shape[0], CORPUS_CHUNK):
            out[i:i + QUERY_CHUNK, j:j + CORPUS_CHUNK] = pairwise_tile(
                queries[i:i + QUERY_CHUNK], corpus[j:j + CORPUS_CHUNK], metric, dtype)
    return out


def knn(queries: torch.Tensor, corpus: torch.Tensor, k: int, metric: str | Metric = "cosine", *,
        exclude_self: bool = False, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest corpus rows per query: (values float32 (n, k), indices int64 (n, k)).

    Runs over corpus chunks in index order and keeps a running list per query.  Selection is a
    stable sort of "badness" (-value for larger-is-better metrics, value otherwise), so equal
    values keep index order: ties go to the smaller corpus index.  The excluded self pair gets
    badness NaN, which sorts after everything, +inf included.
    """
    m = get_metric(metric)
    sign = -1.0 if m.larger_is_better else 1.0
    nq, n = queries.shape[0], corpus.shape[0]
    dev = queries.device
    values = torch.empty(nq, k, dtype=torch.float32, device=dev)
    indices = torch.empty(nq, k, dtype=torch.int64, device=dev)
    for i in range(0, nq, QUERY_CHUNK):
        qi = queries[i:i + QUERY_CHUNK]
        rows = qi.shape[0]
        best_bad = torch.empty(rows, 0, dtype=torch.float32, device=dev)
        best_idx = torch.empty(rows, 0, dtype=torch.int64, device=dev)
        for j in range(0, n, CORPUS_CHUNK):
            # Rank on the float32 values that are returned, so that equal returned values always
            # come in index order (float64 GEMMs may differ in the last bit between equal rows).
            tile = pairwise_tile(qi, corpus[j:j + CORPUS_CHUNK], m, dtype).to(torch.float32)
            bad = tile * sign if sign < 0 else tile
            cols = torch.arange(j, j + tile.shape[1], device=dev)
            if exclude_self:
                r = torch.arange(i, i + rows, device=dev)
                hit = (r >= j) & (r < j + tile.shape[1])
                bad[hit.nonzero()[:, 0], (r[hit] - j)] = math.nan
            cand_bad = torch.cat([best_bad, bad], dim=1)
            cand_idx = torch.cat([best_idx, cols.expand(rows, -1)], dim=1)
            order = torch.sort(cand_bad, dim=1, stable=True).indices[:, :k]
            best_bad = cand_bad.gather(1, order)
            best_idx = cand_idx.gather(1, order)
        values[i:i + rows] = best_bad * sign if sign < 0 else best_bad
        indices[i:i + rows] = best_idx
    return values, indices
