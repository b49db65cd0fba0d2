"""Jensen-Shannon tile: the one part of js that is not a matrix product.

    JS(q, c) = 1/2 (sum q log q + sum c log c) - 1/2 sum s log(s / 2),   s = q + c
             = -1/2 sum s log s + t(q) + t(c),       t(x) = 1/2 (sum x log x + ln 2 sum x)

The row terms t are computed once per row (``fused_knn.row_terms``); per (pair, dim) the kernel
spends one add, one log and one multiply-add.  The log is taken in base 2 (the GPU's native
``lg2``) and the sum rescaled by ln 2 once per pair.
"""
from __future__ import annotations

import triton
import triton.language as tl

LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def js_slog2s(q, c):
    """q: [M, D] and c: [N, D] float32 blocks -> [M, N] sum over D of s log2 s, s = q + c (0 log 0 = 0)."""
    s = q[:, None, :] + c[None, :, :]
    return tl.sum(s * tl.log2(tl.where(s > 0.0, s, 1.0)), 2)


@triton.jit
def js_epilogue(slog2s, qterm, cterm):
    """[M, N] sum s log2 s plus the row terms [M] and [N] -> JS values, clamped at 0 (rounding)."""
    value = -0.5 * LN2 * slog2s + qterm[:, None] + cterm[None, :]
    return tl.maximum(value, 0.0)
