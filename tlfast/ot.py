"""Entropic optimal transport between two feature sets without the n x m cost matrix.

``sinkhorn(source, target, metric, reg)`` solves POT's ``ot.sinkhorn(a, b, M, reg)`` with
M_ij = metric(source_i, target_j), in the log domain, with two fused tile passes per iteration.
Every supported cost is affine in one inner product:

    C_ij = alpha <u_i, v_j> + p_i + q_j
    l2      u = x, v = y, alpha = -2, p = |x|², q = |y|²
    ip      u = x, v = y, alpha = -1, p = q = 0
    cosine  u = x/|x|, v = y/|y|, alpha = -1, p = 1, q = 0   (C = 1 - cos)
    kl      u = x, v = log y, alpha = -1, p = Σ x log x, q = 0

so a half-iteration is a row log-sum-exp of scale <u_i, v_j> + beta_j (scale = -alpha/ε): the
same register-blocked dot product as the fused kNN with an online log-sum-exp epilogue
(csrc/cpu/sinkhorn_kernel.h on CPU, tlfast/triton/sinkhorn.py on GPU).  The column pass swaps u and
v.  Memory is O((n + m) d); the plan is never formed unless ``OTResult.dense_plan`` is asked for.

Potentials are the dual potentials in cost units (GeomLoss's convention):
P_ij = a_i b_j exp((f_i + g_j - C_ij) / ε); POT's ``log u`` is f / ε + log a.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from . import reference
from ._native import LOAD_ERROR, _C
from ._validate import as_tensor, validate_pair
from .ops import knn

__all__ = ["OTResult", "sinkhorn", "DENSE_PLAN_LIMIT"]

# dense_plan() refuses plans with more entries than this (1 GiB of float32) unless told otherwise.
DENSE_PLAN_LIMIT = 1 << 28
# kl: log 0 is replaced by this, so a pair with x > 0 where y == 0 costs about 1e30 (the +inf of the
# metric): its plan entry is exactly 0 and 0 * cost stays finite.
_KL_LOG_ZERO = -1e30
# Rows per tile of the torch paths (transport(), the fallback pass, dense_plan()).
_ROWS, _COLS = 1024, 8192
BACKENDS = ("auto", "cpu", "triton", "reference")


class _Operands(NamedTuple):
    """The cost C_ij = alpha <u_i, v_j> + p_i + q_j in kernel form (see the module docstring)."""

    u: torch.Tensor  # (n, d) operand dtype
    v: torch.Tensor  # (m, d)
    alpha: float
    p: torch.Tensor  # (n,) float64
    q: torch.Tensor  # (m,) float64


def _operands(x: torch.Tensor, y: torch.Tensor, metric: str, dtype: torch.dtype) -> _Operands:
    x64, y64 = x.double(), y.double()
    n, m = x.shape[0], y.shape[0]
    zn = torch.zeros(n, dtype=torch.float64, device=x.device)
    zm = torch.zeros(m, dtype=torch.float64, device=x.device)
    if metric == "l2":
        return _Operands(x.to(dtype), y.to(dtype), -2.0, (x64 * x64).sum(1), (y64 * y64).sum(1))
    if metric == "ip":
        return _Operands(x.to(dtype), y.to(dtype), -1.0, zn, zm)
    if metric == "cosine":
        u = torch.nn.functional.normalize(x64, dim=1).to(dtype)
        v = torch.nn.functional.normalize(y64, dim=1).to(dtype)
        return _Operands(u, v, -1.0, zn + 1.0, zm)
    if metric == "kl":
        # log y with its -1e30 sentinel does not fit float16: the kl operands are float32.
        log_y = torch.where(y64 > 0, y64.clamp(min=1e-300).log(), torch.full_like(y64, _KL_LOG_ZERO))
        return _Operands(x64.float(), log_y.float(), -1.0, torch.special.xlogy(x64, x64).sum(1), zm)
    raise ValueError(f"metric {metric!r} has no inner-product form for optimal transport; "
                     f"use one of 'l2', 'cosine', 'ip', 'kl'")


# --- the tile pass, per backend: (rows, cols, scale, beta, alpha, cost_col) -> (lse, mean cost) ---
LsePass = Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor, float, "torch.Tensor | None"],
                   "tuple[torch.Tensor, torch.Tensor | None]"]


def _lse_cpu(rows, cols, scale, beta, alpha, cost_col):
    # beta is shifted by its maximum so that float32 keeps its low bits; the shift is added back.
    shift = float(beta.max())
    cc = None if cost_col is None else cost_col.float().contiguous().numpy()
    lse, cost = _C.sinkhorn_lse_cpu(rows.numpy(), cols.numpy(), scale, (beta - shift).float().contiguous().numpy(),
                                    alpha, cc, torch.get_num_threads())
    out = torch.from_numpy(lse).double() + shift
    return out, (None if cost_col is None else torch.from_numpy(cost).double())


def _lse_triton(rows, cols, scale, beta, alpha, cost_col):
    from .triton import sinkhorn as tsk

    shift = float(beta.max())
    lse, cost = tsk.lse_rows(rows, cols, scale, (beta - shift).float(), alpha,
                             None if cost_col is None else cost_col.float())
    return lse.double() + shift, (None if cost is None else cost.double())


def _lse_torch(rows, cols, scale, beta, alpha, cost_col):
    """The same pass in float32 torch tiles (online over column tiles): any device, no extension."""
    n = rows.shape[0]
    lse = torch.empty(n, dtype=torch.float64, device=rows.device)
    cost = None if cost_col is None else torch.empty_like(lse)
    shift = float(beta.max())
    b32 = (beta - shift).float()
    for i in range(0, n, _ROWS):
        r = rows[i:i + _ROWS].float()
        top = torch.full((r.shape[0],), -math.inf, device=rows.device)
        s = torch.zeros(r.shape[0], dtype=torch.float64, device=rows.device)
        c = torch.zeros_like(s)
        for j in range(0, cols.shape[0], _COLS):
            acc = r @ cols[j:j + _COLS].float().T
            z = acc * scale + b32[j:j + _COLS]
            new_top = torch.maximum(top, z.max(1).values)
            shrink = torch.exp((top - new_top).double())
            e = torch.exp(z - new_top[:, None])
            s = s * shrink + e.sum(1).double()
            if cost_col is not None:
                c = c * shrink + (e * (acc * alpha + cost_col[j:j + _COLS].float())).sum(1).double()
            top = new_top
        lse[i:i + r.shape[0]] = top.double() + s.log() + shift
        if cost is not None:
            cost[i:i + r.shape[0]] = c / s
    return lse, cost


def _pick_backend(backend: str, device: torch.device) -> tuple[str, LsePass]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else ("cpu" if _C is not None else "torch")
    if backend == "cpu":
        if _C is None:
            raise RuntimeError(f"backend 'cpu' is unavailable: {LOAD_ERROR}")
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpu' runs on CPU tensors, not {device}; use backend='auto'")
        return backend, _lse_cpu
    if backend == "triton":
        if device.type != "cuda":
            from .triton import sinkhorn as tsk  # the interpreter (TRITON_INTERPRET=1) runs CPU tensors
            if not tsk.INTERPRET:
                raise RuntimeError(f"backend 'triton' needs CUDA tensors, got {device}; use backend='auto'")
        return backend, _lse_triton
    return backend, _lse_torch  # "torch" (auto without the extension) and "reference" share the pass


def _weights(w: Any, n: int, name: str, device: torch.device) -> torch.Tensor:
    if w is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
    t, _ = as_tensor(w, name)
    t = t.to(device=device, dtype=torch.float64)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array of {n} weights (one per row), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or not float(t.sum()) > 0:
        raise ValueError(f"{name} must hold finite, non-negative weights with a positive sum")
    return t


def _positive(value: Any, name: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _cost_spread(x: torch.Tensor, y: torch.Tensor, metric: str) -> float:
    """max - min of the cost over an evenly spaced 512 x 512 sample: where ε-scaling starts."""
    xi = x[torch.linspace(0, x.shape[0] - 1, min(512, x.shape[0]), device=x.device).long()]
    yi = y[torch.linspace(0, y.shape[0] - 1, min(512, y.shape[0]), device=y.device).long()]
    c = reference.cost_tile(xi, yi, metric)
    c = c[torch.isfinite(c)]
    return float(c.max() - c.min()) if c.numel() else 0.0


class OTResult:
    """A solved entropic transport problem: potentials and what users take out of the plan.

    Attributes:
        f, g: dual potentials (n,), (m,) float64 in cost units (numpy or torch like the inputs);
            P_ij = a_i b_j exp((f_i + g_j - C_ij) / reg).
        cost: the transport cost Σ_ij P_ij C_ij (POT's ``ot.sinkhorn2`` value; no entropy term).
        n_iter: iterations at the target ``reg`` (ε-scaling steps not counted).
        n_scaling_steps: ε-scaling iterations run before them (0 without ``scaling``).
        marginal_error: ‖P 1 - b‖₂ at the end (rows are exact: a converged solve ends with a plain
            update; one stopped by max_iter while relaxed reports the larger of the row and column
            errors); for unbalanced problems the largest change of a potential in the last iteration.
        converged: marginal_error <= tol.
        relaxation: the over-relaxation ω the iterations ended with (1.0: plain Sinkhorn).
    """

    def __init__(self, *, ops: _Operands, la: torch.Tensor, lb: torch.Tensor, f: torch.Tensor, g: torch.Tensor,
                 reg: float, metric: str, cost: float, n_iter: int, marginal_error: float, tol: float,
                 relaxation: float, n_scaling_steps: int, source: torch.Tensor, target: torch.Tensor, is_numpy: bool, backend: str):
        self._ops, self._la, self._lb, self._f, self._g = ops, la, lb, f, g
        self._source, self._target, self._is_numpy = source, target, is_numpy
        self.reg, self.metric, self.backend = reg, metric, backend
        self.cost, self.n_iter, self.marginal_error = cost, n_iter, marginal_error
        self.converged = marginal_error <= tol
        self.relaxation, self.n_scaling_steps = relaxation, n_scaling_steps

    def _out(self, t: torch.Tensor) -> Any:
        return t.cpu().numpy() if self._is_numpy else t

    @property
    def f(self) -> Any:
        return self._out(self._f)

    @property
    def g(self) -> Any:
        return self._out(self._g)

    def __repr__(self) -> str:
        return (f"OTResult(cost={self.cost:.6g}, n_iter={self.n_iter}, marginal_error={self.marginal_error:.3g}, "
                f"reg={self.reg}, metric={self.metric!r}, backend={self.backend!r})")

    # log P_ij = row_i + (-alpha/ε) <u_i, v_j> + col_j
    def _row_col_terms(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        o, eps = self._ops, self.reg
        row = self._la + (self._f - o.p) / eps
        col = self._lb + (self._g - o.q) / eps
        return row, col, -o.alpha / eps

    def _topk(self, k: int, transpose: bool):
        row, col, scale = self._row_col_terms()
        u, v = (self._ops.v, self._ops.u) if transpose else (self._ops.u, self._ops.v)
        rterm, cterm = (col, row) if transpose else (row, col)
        # ip kNN over augmented rows: <[scale u_i, 1], [v_j, cterm_j]> ranks row i's plan entries.
        shift = float(cterm.max())
        qa = torch.cat([u.float() * scale, torch.ones_like(u[:, :1], dtype=torch.float32)], dim=1)
        ca = torch.cat([v.float(), (cterm - shift).float()[:, None]], dim=1)
        res = knn(qa, ca, k, "ip")
        values = torch.exp(res.values.double() + shift + rterm[:, None])
        return values, res.indices

    def plan_topk(self, k: int):
        """The k largest plan entries of every source row: ``KnnResult(values (n, k) float32 plan
        entries P_ij, largest first, indices (n, k) int64 target rows)`` — a fused ip kNN over the
        rows [scale u_i, 1] · [v_j, log b_j + (g_j - q_j)/ε], so the plan is never formed."""
        from .ops import KnnResult

        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self._ops.v.shape[0]:
            raise ValueError(f"k must be an int in [1, {self._ops.v.shape[0]}] (target rows), got {k!r}")
        values, idx = self._topk(int(k), transpose=False)
        return KnnResult(self._out(values.float()), self._out(idx))

    def assignment(self, mutual: bool = False):
        """Each source row's most-transported-to target: ``Matches(source_idx, target_idx, scores)``
        with scores the plan entries.  ``mutual=True`` keeps only pairs that are also the target's
        argmax source (so the pairs are one-to-one)."""
        from .match import Matches

        values, idx = self._topk(1, transpose=False)
        tgt, score = idx[:, 0], values[:, 0]
        keep = torch.ones_like(tgt, dtype=torch.bool)
        if mutual:
            back = self._topk(1, transpose=True)[1][:, 0]
            keep = back[tgt] == torch.arange(tgt.shape[0], device=tgt.device)
        src = keep.nonzero()[:, 0]
        return Matches(self._out(src), self._out(tgt[src]), self._out(score[src].float()))

    def _barycentric(self) -> torch.Tensor:
        """Σ_j P_ij y_j / Σ_j P_ij for every source row, in tiles with an online softmax."""
        row, col, scale = self._row_col_terms()
        u, v, y = self._ops.u.float(), self._ops.v.float(), self._target.float()
        shift = float(col.max())
        c32 = (col - shift).float()
        out = torch.empty(u.shape[0], y.shape[1], dtype=torch.float32, device=u.device)
        for i in range(0, u.shape[0], _ROWS):
            ui = u[i:i + _ROWS]
            top = torch.full((ui.shape[0],), -math.inf, device=u.device)
            s = torch.zeros(ui.shape[0], device=u.device)
            acc = torch.zeros(ui.shape[0], y.shape[1], device=u.device)
            for j in range(0, v.shape[0], _COLS):
                z = (ui @ v[j:j + _COLS].T) * scale + c32[j:j + _COLS]
                new_top = torch.maximum(top, z.max(1).values)
                shrink = torch.exp(top - new_top)
                e = torch.exp(z - new_top[:, None])
                s = s * shrink + e.sum(1)
                acc = acc * shrink[:, None] + e @ y[j:j + _COLS]
                top = new_top
            out[i:i + ui.shape[0]] = acc / s[:, None]
        return out

    def transport(self, x: Any = None) -> Any:
        """The barycentric map into the target space (the OT domain-adaptation transform).

        ``x=None``: the source rows mapped, T(s_i) = Σ_j P_ij t_j / Σ_j P_ij (POT's
        ``SinkhornTransport.transform(Xs)``).  ``x`` given (new rows, same dim): each row moves by the
        displacement of its nearest source row (l2), POT's out_of_sample_map="ferradans".
        Returned in the source's kind and dtype.
        """
        mapped = self._barycentric()
        dtype = self._source.dtype
        if x is None:
            return self._out(mapped.to(dtype))
        t, is_np = as_tensor(x, "x")
        if is_np != self._is_numpy:
            raise ValueError("x must be the same kind of array as the source (numpy or torch)")
        if t.dim() != 2 or t.shape[1] != self._source.shape[1]:
            raise ValueError(f"x must be 2-D with dim {self._source.shape[1]}, got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("x contains NaN or inf; clean or drop those rows")
        t = t.to(self._source.device)
        nearest = knn(t, self._source, 1, "l2").indices[:, 0]
        moved = t.float() + (mapped[nearest] - self._source[nearest].float())
        return self._out(moved.to(t.dtype))

    def dense_plan(self, max_elements: int = DENSE_PLAN_LIMIT) -> Any:
        """The full (n, m) float32 plan — only when asked, and only up to ``max_elements`` entries."""
        n, m = self._ops.u.shape[0], self._ops.v.shape[0]
        if n * m > max_elements:
            raise ValueError(f"the plan has {n} x {m} = {n * m} entries, above max_elements={max_elements}; "
                             f"use plan_topk(k), assignment() or transport(), which never form it, or raise "
                             f"max_elements if it fits in memory ({4 * n * m / 2**30:.1f} GiB)")
        row, col, scale = self._row_col_terms()
        u, v = self._ops.u.double(), self._ops.v.double()
        out = torch.empty(n, m, dtype=torch.float32, device=u.device)
        for i in range(0, n, _ROWS):
            out[i:i + _ROWS] = torch.exp(row[i:i + _ROWS, None] + col[None, :] + scale * (u[i:i + _ROWS] @ v.T))
        return self._out(out)


def sinkhorn(source: Any, target: Any, metric: str = "l2", reg: float = 0.05, *, a: Any = None, b: Any = None,
             unbalanced: float | None = None, max_iter: int = 1000, tol: float = 1e-6, scaling: float | None = None,
             relaxation: float | str = "auto", backend: str = "auto") -> OTResult:
    """Entropic optimal transport from ``source`` (n, d) to ``target`` (m, d), never forming n x m.

    Solves min_P <P, C> - reg H(P) over couplings of ``a`` and ``b`` (POT's
    ``ot.sinkhorn(a, b, M, reg, method="sinkhorn_log")`` with M_ij = metric(source_i, target_j)).

    Args:
        source, target: numpy arrays or torch tensors of the same kind and device.
        metric: the cost: "l2" (squared Euclidean), "cosine" (1 - cos), "ip" (-<x, y>) or "kl"
            (KL(source_i ‖ target_j); rows must be probability vectors).
        reg: ε, in cost units, as POT's ``reg``.
        a, b: weights of the source and target rows (default uniform); balanced problems need
            equal totals.
        unbalanced: None (exact marginals) or ρ > 0: KL marginal penalties of weight ρ (GeomLoss's
            reach^p, POT's ``sinkhorn_unbalanced`` reg_m); each update is damped by ρ / (ρ + ε).
        max_iter: iterations at the target ε.
        tol: stop when ‖P 1 - b‖₂ <= tol (POT's stopping rule; rows are exact after each update).
            Unbalanced: when no potential moved by more than tol.
        scaling: ε-scaling factor in (0, 1): one iteration at each ε = spread, spread * scaling, ...
            (spread = the sampled cost range) before the target ε; None (default) starts at the
            target ε: with over-relaxation the warm start saved fewer iterations than its steps
            cost on every problem measured (docs/design/ot.md).
        relaxation: over-relaxation ω of the balanced updates, f <- (1 - ω) f + ω T(g): 1.0 is
            plain Sinkhorn (POT's iteration); a number in [1, 2) fixes ω; "auto" (default) runs
            plain iterations until their error ratio κ settles, then ω = 2 / (1 + √(1 - κ)), capped
            at 1.8, back to 1 if the error grows tenfold.  Same fixed point, fewer iterations;
            ``OTResult.relaxation`` says which ω ran.  Unbalanced problems are not relaxed.
        backend: "auto", "cpu" (C++ fused kernel), "triton" (GPU; the interpreter on CPU under
            TRITON_INTERPRET=1) or "reference" (the float64 oracle, tlfast.reference.sinkhorn).

    Returns:
        OTResult (potentials, cost, iterations, marginal error, plan_topk / assignment / transport).
    """
    inp = validate_pair(source, target, metric)
    name = inp.metric.name
    if name == "js":
        raise ValueError("metric 'js' has no inner-product form for optimal transport; "
                         "use one of 'l2', 'cosine', 'ip', 'kl'")
    eps = _positive(reg, "reg")
    rho = _positive(unbalanced, "unbalanced", allow_none=True)
    tol = _positive(tol, "tol")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if scaling is not None and (isinstance(scaling, bool) or not isinstance(scaling, (int, float))
                                or not 0 < scaling < 1):
        raise ValueError(f"scaling must be None or a number in (0, 1), got {scaling!r}")
    if not (relaxation == "auto" if isinstance(relaxation, str) else
            not isinstance(relaxation, bool) and isinstance(relaxation, (int, float)) and 1 <= relaxation < 2):
        raise ValueError(f"relaxation must be 'auto' or a number in [1, 2), got {relaxation!r}")
    x, y = inp.queries, inp.corpus
    dev = x.device
    aw, bw = _weights(a, x.shape[0], "a", dev), _weights(b, y.shape[0], "b", dev)
    if rho is None and abs(float(aw.sum()) - float(bw.sum())) > 1e-6 * float(aw.sum()):
        raise ValueError(f"a and b must have equal totals for balanced transport (got {float(aw.sum()):.6g} and "
                         f"{float(bw.sum()):.6g}); normalise them or pass unbalanced=rho")
    la, lb = aw.log(), bw.log()
    backend_name, lse = _pick_backend(backend, dev)
    opdtype = x.dtype if (backend_name == "triton" and x.dtype in (torch.float16, torch.bfloat16)) else torch.float32
    ops = _operands(x, y, name, opdtype)
    if backend_name in ("cpu", "torch", "reference"):
        ops = ops._replace(u=ops.u.float().contiguous(), v=ops.v.float().contiguous())

    if backend_name == "reference":
        r = reference.sinkhorn(x, y, name, eps, a=aw, b=bw, unbalanced=rho, max_iter=int(max_iter), tol=tol)
        f, g, cost, n_iter, err = r["f"], r["g"], r["cost"], r["n_iter"], r["marginal_error"]
        omega, steps = 1.0, 0
    else:
        f, g, cost, n_iter, err, omega, steps = _solve(ops, la, lb, aw, bw, eps, rho, int(max_iter), tol, scaling,
                                                _cost_spread(x, y, name) if scaling else 0.0, relaxation, lse)
    return OTResult(ops=ops, la=la, lb=lb, f=f, g=g, reg=eps, metric=name, cost=cost, n_iter=n_iter,
                    marginal_error=err, tol=tol, relaxation=omega, n_scaling_steps=steps, source=x, target=y, is_numpy=inp.is_numpy, backend=backend_name)


# Over-relaxation (successive over-relaxation of the potentials, Thibault et al. 2017; Lehmann et
# al. 2021): f <- (1 - w) f + w T(g), same for g.  The fixed point is the Sinkhorn solution for any
# w in (0, 2).  Near it, plain Sinkhorn's error contracts at a rate kappa per iteration, and Young's
# SOR theory (which Lehmann et al. show applies to Sinkhorn) links kappa, w and the relaxed rate
# lam:  (lam + w - 1)^2 = lam w^2 kappa,  best at w* = 2 / (1 + sqrt(1 - kappa)) (rate w* - 1).
# "auto" reads kappa from the error ratio of plain iterations, relaxes with w*, and every few
# iterations reads kappa again from the relaxed rate by that relation: the early plain ratio
# underestimates kappa (it is still falling towards its asymptote), so w only ever moves up.
_RELAX_MAX = 1.9          # the cap on w: past w* the error oscillates at rate w - 1
_RELAX_WARMUP = (3, 12)   # plain iterations before kappa is first read: at least 3, at most 12
_RELAX_SETTLED = 0.05     # ... read once two successive error ratios agree within 5 %
_RELAX_WINDOW = 5         # relaxed iterations per re-estimate of kappa
_RELAX_DIVERGED = 10.0    # an error 10x above the best seen: back to plain (globally convergent) Sinkhorn
_RELAX_STALL = 8          # ... and 8 relaxed iterations without a new best: the float32 tiles' noise
#                           floor amplified by w, which plain iterations (exact rows) get below


def _relaxation_factor(kappa: float) -> float:
    kappa = min(max(kappa, 0.0), 0.999)
    return min(_RELAX_MAX, 2.0 / (1.0 + math.sqrt(1.0 - kappa)))


def _kappa_from_relaxed(lam: float, w: float) -> float:
    """Plain Sinkhorn's rate implied by the relaxed rate lam at factor w (Young's relation)."""
    lam = min(max(lam, 1e-12), 0.9999)
    return (lam + w - 1.0) ** 2 / (lam * w * w)


def _solve(ops: _Operands, la, lb, aw, bw, eps, rho, max_iter, tol, scaling, spread, relaxation, lse: LsePass):
    """The Sinkhorn loop: ε-scaling steps, then iterations at ε until both marginals are met.

    One iteration = the column pass (whose log-sum-exps give the column marginal error of the
    current (f, g) and the new g) and the row pass with the cost epilogue (the new f; its
    log-sum-exps give the row marginal of (f, g) at the next check, and its weighted mean cost the
    transport cost of the returned state), so the error checks and the cost need no extra pass.
    All potentials in float64.  Returns (f, g, cost, iterations, marginal error, relaxation used, ε-scaling steps).
    """
    u, v, alpha, p, q = ops
    f = torch.zeros(u.shape[0], dtype=torch.float64, device=u.device)
    g = torch.zeros(v.shape[0], dtype=torch.float64, device=u.device)
    damp = lambda e: 1.0 if rho is None else rho / (rho + e)  # noqa: E731

    def col_lse(f, e):  # L_j = log Σ_i a_i exp((f_i - C_ij)/e) + q_j/e
        return lse(v, u, -alpha / e, la + (f - p) / e, alpha, None)[0]

    def row_lse(g, e, with_cost=False):  # R_i = log Σ_j b_j exp((g_j - C_ij)/e) + p_i/e
        return lse(u, v, -alpha / e, lb + (g - q) / e, alpha, q if with_cost else None)

    schedule = []
    if scaling and spread > eps:
        e = spread
        while e > eps:
            schedule.append(e)
            e *= scaling
    for e in schedule:
        g = damp(e) * (q - e * col_lse(f, e))
        f = damp(e) * (p - e * row_lse(g, e)[0])

    auto = relaxation == "auto"
    w = 1.0 if auto else float(relaxation)
    if rho is not None:
        auto, w = False, 1.0  # the damped (unbalanced) updates are not relaxed
    omega = w  # what is reported: the ω the relaxed iterations ran with
    relaxed_from = best_at = 0
    errs: list[float] = []
    R = mean_cost = None
    err, it = math.inf, 0
    while True:
        L = col_lse(f, eps)
        if rho is None:
            err = float(torch.linalg.vector_norm(bw * torch.exp((g - q) / eps + L) - bw))
            if R is not None:  # rows of (f, g): exact after a plain update, not after a relaxed one
                err = max(err, float(torch.linalg.vector_norm(aw * torch.exp((f - p) / eps + R) - aw)))
            errs.append(err)
            if err < errs[best_at]:
                best_at = len(errs) - 1
            if it > 0 and err <= tol and w != 1.0 and it < max_iter:
                w, auto = 1.0, False  # met under relaxation: end with a plain update, so the rows are exact (POT's state)
            elif it > 0 and err <= tol or it >= max_iter:
                break
            if auto and w == 1.0 and len(errs) > _RELAX_WARMUP[0]:
                r1, r2 = errs[-1] / errs[-2], errs[-2] / errs[-3]
                if abs(r1 - r2) <= _RELAX_SETTLED * r1 or len(errs) > _RELAX_WARMUP[1]:
                    w = omega = _relaxation_factor(r1)
                    relaxed_from = len(errs) - 1
            elif auto and w != 1.0 and len(errs) - 1 - relaxed_from >= _RELAX_WINDOW and errs[-1] < errs[-1 - _RELAX_WINDOW]:
                lam = (errs[-1] / errs[-1 - _RELAX_WINDOW]) ** (1.0 / _RELAX_WINDOW)
                w_new = _relaxation_factor(_kappa_from_relaxed(lam, w))
                if w_new > w * 1.01:
                    w = omega = w_new
                relaxed_from = len(errs) - 1
            if w != 1.0 and (err > _RELAX_DIVERGED * min(errs) or len(errs) - 1 - best_at >= _RELAX_STALL):
                w, auto = 1.0, False
            g_new = damp(eps) * (q - eps * L)
        else:
            if it >= max_iter:
                break
            g_new = damp(eps) * (q - eps * L)
            dg = float((g_new - g).abs().max())
        g = g_new if w == 1.0 or it == 0 else (1.0 - w) * g + w * g_new
        R, mean_cost = row_lse(g, eps, with_cost=True)
        f_new = damp(eps) * (p - eps * R)
        if rho is not None:
            err = max(dg, float((f_new - f).abs().max()))
        f = f_new if w == 1.0 or it == 0 else (1.0 - w) * f + w * f_new
        it += 1
        if rho is not None and err <= tol:
            break
    if not (bool(torch.isfinite(f).all()) and bool(torch.isfinite(g).all())):
        raise ValueError("Sinkhorn potentials became non-finite: some row can reach no column at finite cost "
                         "(kl with disjoint supports?); check the inputs or raise reg")
    # Transport cost Σ_ij P_ij C_ij of the returned (f, g): row i's mass times its softmax-mean cost.
    mass = torch.exp(la + (f - p) / eps + R)
    cost = float((mass * (mean_cost + p)).sum())
    return f, g, cost, it, err, omega, len(schedule)
