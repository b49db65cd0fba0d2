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

__all__ = ["pairwise", "knn", "pairwise_tile", "cost_tile", "sinkhorn"]

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


def cost_tile(q: torch.Tensor, c: torch.Tensor, metric: str | Metric) -> torch.Tensor:
    """The transport cost of ``metric`` in float64: l2 and kl as they are, 1 - cos for cosine,
    -<q, c> for ip (a cost is smaller-is-better)."""
    m = get_metric(metric)
    v = pairwise_tile(q, c, m)
    if m.name == "cosine":
        return 1.0 - v
    return -v if m.name == "ip" else v


def _lse_rows(x: torch.Tensor, y: torch.Tensor, metric: str | Metric, eps: float, bias: torch.Tensor,
              transpose: bool) -> torch.Tensor:
    """log Σ_j exp(bias_j - C_ij / eps) for every row i of x (C = metric(x_i, y_j)), or, with
    ``transpose``, log Σ_i exp(bias_i - C_ij / eps) for every row j of y; in float64, in tiles."""
    rows, cols = (y, x) if transpose else (x, y)
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=x.device)
    for i in range(0, rows.shape[0], QUERY_CHUNK):
        acc = torch.full((min(QUERY_CHUNK, rows.shape[0] - i),), -math.inf, dtype=torch.float64, device=x.device)
        for j in range(0, cols.shape[0], CORPUS_CHUNK):
            if transpose:
                c = cost_tile(cols[j:j + CORPUS_CHUNK], rows[i:i + QUERY_CHUNK], metric).T
            else:
                c = cost_tile(rows[i:i + QUERY_CHUNK], cols[j:j + CORPUS_CHUNK], metric)
            z = bias[j:j + CORPUS_CHUNK][None, :] - c / eps
            acc = torch.logaddexp(acc, torch.logsumexp(z, dim=1))
        out[i:i + acc.shape[0]] = acc
    return out


def sinkhorn(source: torch.Tensor, target: torch.Tensor, metric: str | Metric = "l2", reg: float = 0.05, *,
             a: torch.Tensor | None = None, b: torch.Tensor | None = None, unbalanced: float | None = None,
             max_iter: int = 1000, tol: float = 1e-6) -> dict:
    """Log-domain Sinkhorn, the oracle of ``tlfast.ot.sinkhorn``: float64, tiles of the cost only.

    The iteration is POT's ``ot.sinkhorn(a, b, M, reg, method="sinkhorn_log")`` with M the
    :func:`cost_tile` of the metric, written with the dual potentials in cost units (P_ij = a_i b_j exp((f_i + g_j - C_ij) / ε),
    so POT's log u = f / ε + log a):

        g_j = -ε log Σ_i a_i exp((f_i - C_ij) / ε)        then
        f_i = -ε log Σ_j b_j exp((g_j - C_ij) / ε)

    and it stops when the column marginal error ‖P 1 - b‖₂ (rows are exact after the f update) is
    at most ``tol``, checked every iteration.  ``unbalanced=ρ`` damps each update by ρ / (ρ + ε)
    (KL marginal penalties of weight ρ, POT's ``sinkhorn_unbalanced`` with reg_m = ρ) and stops on
    the largest change of a potential instead.  No ε-scaling: this is the plain fixed point.

    Returns a dict: f, g (float64), cost Σ P_ij C_ij, n_iter, marginal_error.
    """
    x, y = source, target
    n, m = x.shape[0], y.shape[0]
    dev = x.device
    a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=dev) if a is None else a.double()
    b = torch.full((m,), 1.0 / m, dtype=torch.float64, device=dev) if b is None else b.double()
    la, lb = a.log(), b.log()
    damp = 1.0 if unbalanced is None else unbalanced / (unbalanced + reg)
    f = torch.zeros(n, dtype=torch.float64, device=dev)
    g = torch.zeros(m, dtype=torch.float64, device=dev)
    err, it = math.inf, 0
    for it in range(1, max_iter + 1):
        g_new = -damp * reg * _lse_rows(x, y, metric, reg, la + f / reg, transpose=True)
        f_new = -damp * reg * _lse_rows(x, y, metric, reg, lb + g_new / reg, transpose=False)
        if unbalanced is None:
            col = b * torch.exp(g_new / reg + _lse_rows(x, y, metric, reg, la + f_new / reg, transpose=True))
            err = float(torch.linalg.vector_norm(col - b))
        else:
            err = float(torch.maximum((f_new - f).abs().max(), (g_new - g).abs().max()))
        f, g = f_new, g_new
        if err <= tol:
            break
    cost = 0.0
    for i in range(0, n, QUERY_CHUNK):
        for j in range(0, m, CORPUS_CHUNK):
            c = cost_tile(x[i:i + QUERY_CHUNK], y[j:j + CORPUS_CHUNK], metric)
            logp = (la[i:i + QUERY_CHUNK, None] + lb[None, j:j + CORPUS_CHUNK]
                    + (f[i:i + QUERY_CHUNK, None] + g[None, j:j + CORPUS_CHUNK] - c) / reg)
            cost += float((torch.exp(logp) * torch.nan_to_num(c, posinf=0.0)).sum())
    return {"f": f, "g": g, "cost": cost, "n_iter": it, "marginal_error": err}
