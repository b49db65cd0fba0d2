"""Fused pooling and preprocessing ops used by the extractors, with their plain-PyTorch forms.

Each op has a ``*_reference`` (what it means, in plain torch; what the kernels are tested against)
and a dispatcher that picks the fastest kernel for the tensor's device: C++/OpenMP on CPU
(``csrc/cpu/pool.cpp``, ``csrc/cpu/preprocess.cpp``), Triton (pooling) and CUDA C++
(preprocessing) on GPU.  A missing kernel (no compiled extension, no Triton) falls back to the
reference, so results never depend on what was built, only speed does.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .._native import _C

__all__ = ["masked_mean_pool", "masked_mean_pool_reference", "image_preprocess", "image_preprocess_reference",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def masked_mean_pool_reference(x: torch.Tensor, mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Mean of ``x`` (B, T, D) over the steps where ``mask`` (B, T) is non-zero, then L2-normalised.

    ``v = sum_t m[b,t] x[b,t] / max(sum_t m[b,t], 1e-9)``; ``out = v / max(||v||, 1e-12)``: the
    sentence-transformers pooling, so an all-padding row gives zeros, not NaN.  float32 result.
    """
    m = (mask != 0).to(torch.float32).unsqueeze(-1)
    v = (x.float() * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(v, dim=-1, eps=1e-12) if normalize else v


@functools.lru_cache(maxsize=1)
def _triton_pool():
    try:
        from ..triton.masked_mean_pool import masked_mean_pool as kernel
    except Exception:  # no Triton here (or an unusable one): the reference runs instead
        return None
    return kernel


def masked_mean_pool(x: torch.Tensor, mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Fused :func:`masked_mean_pool_reference`: C++ on CPU float32, Triton on CUDA."""
    if x.dim() != 3 or mask.shape != x.shape[:2]:
        raise ValueError(f"x must be (batch, steps, dim) and mask (batch, steps); got {tuple(x.shape)} "
                         f"and {tuple(mask.shape)}")
    if torch.is_grad_enabled() and x.requires_grad:
        return masked_mean_pool_reference(x, mask, normalize)  # the kernels have no backward
    if x.device.type == "cpu" and _C is not None and x.dtype == torch.float32:
        out = _C.masked_mean_pool_cpu(x.contiguous().numpy(), mask.to(torch.int64).contiguous().numpy(),
                                      bool(normalize), torch.get_num_threads())
        return torch.from_numpy(out)
    if x.device.type == "cuda" and _triton_pool() is not None:
        return _triton_pool()(x, mask, normalize)
    return masked_mean_pool_reference(x, mask, normalize)


def image_preprocess_reference(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                               std: Sequence[float] = IMAGENET_STD, channels_last: bool = True) -> torch.Tensor:
    """uint8 images (NHWC if ``channels_last`` else NCHW) -> float32 NCHW ``(x / 255 - mean) / std``."""
    if channels_last:
        x = x.permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return ((x.float() / 255.0 - m) / s).contiguous()


def _affine(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    # (x / 255 - mean) / std = x * (1 / (255 std)) + (-mean / std): one fused multiply-add a pixel.
    return [1.0 / (255.0 * s) for s in std], [-m / s for m, s in zip(mean, std)]


def image_preprocess(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     channels_last: bool = True) -> torch.Tensor:
    """Fused :func:`image_preprocess_reference`: C++ on CPU, CUDA C++ on GPU (one pass, no temporaries)."""
    if x.dim() != 4 or x.dtype != torch.uint8:
        raise ValueError(f"x must be a 4-D uint8 tensor, got {tuple(x.shape)} {x.dtype}")
    channels = x.shape[3] if channels_last else x.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} values (one per channel), got {len(mean)} and {len(std)}")
    scale, shift = _affine(mean, std)
    if x.device.type == "cpu" and _C is not None:
        return torch.from_numpy(_C.image_preprocess_cpu(x.numpy(), channels_last, scale, shift,
                                                        torch.get_num_threads()))
    if x.device.type == "cuda" and _C is not None and hasattr(_C, "image_preprocess_cuda") and channels <= 4:
        n, h, w, c = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]) if channels_last else \
            (x.shape[0], x.shape[2], x.shape[3], x.shape[1])
        sn, sh, sw, sc = x.stride() if channels_last else (x.stride(0), x.stride(2), x.stride(3), x.stride(1))
        out = torch.empty(n, c, h, w, dtype=torch.float32, device=x.device)
        if out.numel():
            with torch.cuda.device(x.device):
                _C.image_preprocess_cuda(x.data_ptr(), n, h, w, c, sn, sh, sw, sc, scale, shift,
                                         torch.cuda.current_stream(x.device).cuda_stream, out.data_ptr())
        return out
    return image_preprocess_reference(x, mean, std, channels_last)
