"""Fused masked mean-pool + L2-normalise as one Triton kernel (the GPU path of sentence pooling).

Equivalent plain PyTorch (``tlfast.extract.ops.masked_mean_pool_reference``)::

    m = mask.to(x.dtype).unsqueeze(-1)                                   # (B, T, 1)
    v = (x * m).sum(1) / m.sum(1).clamp_min(1e-9)                        # (B, D)
    out = torch.nn.functional.normalize(v, dim=-1, eps=1e-12)            # if normalize

One program per batch row holds the whole pooled vector (``BLOCK_D >= D``) in registers, walks
the steps in ``BLOCK_T`` chunks accumulating in float32, and normalises before the single store,
so x is read once and nothing of size (B, T, D) is materialised.  Runs on CPU tensors under
``TRITON_INTERPRET=1`` (set before this module is imported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["masked_mean_pool"]


@triton.jit
def _masked_mean_pool_kernel(
    x_ptr,  # [B, T, D], float16 / bfloat16 / float32, contiguous
    mask_ptr,  # [B, T], any integer or float dtype, non-zero = keep
    out_ptr,  # [B, D], float32
    T,
    D,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    count = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        m = (tl.load(mask_ptr + b * T + offs_t, mask=t_ok, other=0) != 0).to(tl.float32)
        rows = tl.load(x_ptr + (b * T + offs_t)[:, None] * D + offs_d[None, :],
                       mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(rows * m[:, None], axis=0)
        count += m
    v = acc / tl.maximum(tl.sum(count, axis=0), 1e-9)
    if NORMALIZE:
        v = v / tl.maximum(tl.sqrt(tl.sum(v * v, axis=0)), 1e-12)
    tl.store(out_ptr + b * D + offs_d, v, mask=d_ok)


def _blocks(steps: int, dim: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(dim)
    # Keep the (BLOCK_T, BLOCK_D) tile at <= 8K elements: 32 registers a thread at 4 warps.
    return max(1, min(triton.next_power_of_2(max(steps, 1)), 8192 // block_d)), block_d


# Feature widths of the extractors' text backbones (MiniLM 384, BERT-base 768, BERT-large 1024).
_STATIC_DIMS = (384, 768, 1024)


def static_specs() -> list:
    """The launches of masked_mean_pool for long batches (tlfast.triton.static_check): x dtype x
    width x normalize, with an int64 attention mask."""
    from .static_check import KernelSpec
    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        for dim in _STATIC_DIMS:
            block_t, block_d = _blocks(512, dim)
            for normalize in (True, False):
                sig = (("x_ptr", "*" + dt), ("mask_ptr", "*i64"), ("out_ptr", "*fp32"), ("T", "i32"), ("D", "i32"))
                const = dict(NORMALIZE=normalize, BLOCK_T=block_t, BLOCK_D=block_d)
                specs.append(KernelSpec(__name__, "_masked_mean_pool_kernel",
                                        f"masked_mean_pool {dt} D={dim}" + ("" if normalize else " raw"), sig,
                                        tuple(const.items()), 4, 3, False, ("x_ptr", "mask_ptr", "out_ptr", "T", "D")))
    return specs


def masked_mean_pool(x: torch.Tensor, mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """(B, D) float32 masked mean of ``x`` (B, T, D) over T, L2-normalised if ``normalize``.

    Callers validate: ``x`` floating and 3-D, ``mask`` (B, T) on the same device.
    """
    x = x.contiguous()
    mask = mask.contiguous()
    batch, steps, dim = x.shape
    out = torch.empty(batch, dim, dtype=torch.float32, device=x.device)
    if batch == 0:
        return out
    block_t, block_d = _blocks(steps, dim)
    _masked_mean_pool_kernel[(batch,)](x, mask, out, steps, dim, NORMALIZE=normalize, BLOCK_T=block_t,
                                       BLOCK_D=block_d)
    return out
