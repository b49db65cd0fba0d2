"""The fused Sinkhorn tile pass in Triton: row log-sum-exps of scale <u_i, v_j> + beta_j.

One program owns BLOCK_M rows of u and walks all of v in tiles of BLOCK_N rows: the tile of dot
products comes from ``tl.dot`` (tensor cores in the operand dtype, fp32 accumulation), and the
epilogue folds it into a running maximum and sum per row (the online log-sum-exp of
FlashAttention / FlashSinkhorn), so the (n, m) matrix never reaches global memory.  With
``cost_col`` the same pass accumulates Σ_j exp(z_ij - lse_i) (alpha <u_i, v_j> + cost_col_j), the
mean cost per row that gives the transport cost.  Same maths as csrc/cpu/sinkhorn_kernel.h; the
caller (tlfast/ot.py) swaps u and v for the column pass.

Under ``TRITON_INTERPRET=1`` it runs on CPU tensors (fixed blocks; bf16 operands widened to fp32
because the interpreter's bf16 ``tl.dot`` is wrong).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["lse_rows", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# A finite start for the running maximum, so that exp(old - new) never sees -inf - (-inf).
_NEG_BIG: tl.constexpr = tl.constexpr(-1e30)


@triton.jit
def _lse_kernel(u_ptr, v_ptr, beta_ptr, cost_ptr, out_lse_ptr, out_cost_ptr, n, m, d, stride_u, stride_v,
                scale, alpha, WITH_COST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    top = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG_BIG
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    c = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, m, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < m
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < d
            ut = tl.load(u_ptr + rows[:, None] * stride_u + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            vt = tl.load(v_ptr + cols[:, None] * stride_v + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc = tl.dot(ut, tl.trans(vt), acc, input_precision=PRECISION)
        beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0)
        z = tl.where(col_ok[None, :], acc * scale + beta[None, :], float("-inf"))
        new_top = tl.maximum(top, tl.max(z, 1))
        shrink = tl.exp(top - new_top)
        e = tl.exp(z - new_top[:, None])
        s = s * shrink + tl.sum(e, 1)
        if WITH_COST:
            cc = tl.load(cost_ptr + cols, mask=col_ok, other=0.0)
            c = c * shrink + tl.sum(e * (acc * alpha + cc[None, :]), 1)
        top = new_top
    tl.store(out_lse_ptr + rows, top + tl.log(s), mask=row_ok)
    if WITH_COST:
        tl.store(out_cost_ptr + rows, c / s, mask=row_ok)


def lse_rows(u: torch.Tensor, v: torch.Tensor, scale: float, beta: torch.Tensor, alpha: float,
             cost_col: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(lse (n,) float32, mean cost (n,) float32 or None) for u (n, d), v (m, d) of one float dtype
    on one device, beta / cost_col (m,) float32."""
    if u.dtype != v.dtype or u.device != v.device:
        raise ValueError("u and v must share dtype and device")
    if u.shape[1] != v.shape[1] or beta.shape != (v.shape[0],):
        raise ValueError("u, v must have the same dim and beta one entry per row of v")
    if INTERPRET and u.dtype == torch.bfloat16:
        u, v = u.float(), v.float()
    u, v = u.contiguous(), v.contiguous()
    beta = beta.float().contiguous()
    n, m, d = u.shape[0], v.shape[0], u.shape[1]
    out_lse = torch.empty(n, dtype=torch.float32, device=u.device)
    with_cost = cost_col is not None
    out_cost = torch.empty(n if with_cost else 1, dtype=torch.float32, device=u.device)
    cc = cost_col.float().contiguous() if with_cost else beta
    if INTERPRET:
        bm, bn, bd, warps, stages = 32, 64, 32, 4, 1
    else:
        bm, bn, bd, warps, stages = 64, 64, 64, 4, 3
    # fp32 operands: "ieee" keeps the cost in fp32 (Sinkhorn divides it by a small ε, where TF32's
    # 10-bit mantissa would show); fp16 / bf16 run on tensor cores as given.
    precision = "ieee" if u.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(n, bm),)
    _lse_kernel[grid](u, v, beta, cc, out_lse, out_cost, n, m, d, u.stride(0), v.stride(0), float(scale),
                      float(alpha), WITH_COST=with_cost, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=precision,
                      num_warps=warps, num_stages=stages)
    return out_lse, (out_cost if with_cost else None)
