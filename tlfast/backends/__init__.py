"""Backend registry: which backends exist, which are available here, and which one ``auto`` picks.

A backend module defines ``NAME``, ``info() -> BackendInfo``, ``supports(device) -> bool``,
``knn(q, c, k, metric, exclude_self) -> (values, indices)`` and ``pairwise(q, c, metric)`` on
validated torch tensors.  Modules are imported lazily, so a backend whose dependencies are missing
is reported unavailable (with the reason) instead of breaking ``import tlfast``.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NamedTuple

import torch

__all__ = ["BackendInfo", "available_backends", "resolve", "AUTO_ORDER", "NAMES"]


class BackendInfo(NamedTuple):
    available: bool
    reason: str
    devices: tuple[str, ...]


# Every backend name, in registry order; each lives in tlfast/backends/<name>.py.
NAMES: tuple[str, ...] = ("reference", "cpu", "triton", "cuda", "faiss")

# What `auto` tries per device type, fastest first, from benchmarks/results (cpu: the fused C++
# kernels beat the reference by 30-700x on every standard case; see benchmarks/results/cpu-*.md).
# faiss is never picked: faiss-cpu flat search is 2-7x slower than the cpu kernels (cosine
# 500k x 128: 133 vs 927 queries/s, benchmarks/results/ann-cpu.md); it stays available by name.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    # GPU order not yet measured (no GPU run so far): the fused Triton kernels first, then the
    # CUDA C++ kernels; replace with the order benchmarks/results/gpu-*.md shows.
    "cuda": ("triton", "cuda", "reference"),
}


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def info(name: str) -> BackendInfo:
    try:
        return _module(name).info()
    except Exception as exc:  # an import failure makes the backend unavailable, not tlfast
        return BackendInfo(False, f"{type(exc).__name__}: {exc}", ())


def available_backends() -> dict[str, BackendInfo]:
    return {name: info(name) for name in NAMES}


def resolve(backend: str, device: torch.device) -> ModuleType:
    """The backend module to run on ``device``: by name (RuntimeError if it cannot), or ``auto``."""
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, one of {['auto', *NAMES]}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("TLFAST_BACKEND", "auto") or "auto"
        if backend != "auto" and backend not in NAMES:
            raise ValueError(f"TLFAST_BACKEND={backend!r} is not a backend; use one of {['auto', *NAMES]}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if info(name).available:
                mod = _module(name)
                if mod.supports(device):
                    return mod
        return _module("reference")
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {['auto', *NAMES]}, got {backend!r}")
    inf = info(backend)
    if not inf.available:
        raise RuntimeError(f"backend {backend!r} is unavailable: {inf.reason}")
    mod = _module(backend)
    if not mod.supports(device):
        raise RuntimeError(f"backend {backend!r} does not run on {device} tensors (it runs on "
                           f"{', '.join(inf.devices)}); move the inputs or use backend='auto'")
    return mod
