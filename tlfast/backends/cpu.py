"""The ``cpu`` backend: fused C++/OpenMP distance + top-k kernels (csrc/cpu/fused_knn.h)."""
from __future__ import annotations

import numpy as np
import torch

from .._native import LOAD_ERROR, _C
from ..metrics import Metric
from . import BackendInfo

NAME = "cpu"


def info() -> BackendInfo:
    if _C is None:
        return BackendInfo(False, LOAD_ERROR or "tlfast._C is missing", ())
    return BackendInfo(True, f"C++/OpenMP fused kernels ({_C.cpu_isa()}; bf16 inputs: {_C.cpu_half_kernel(0)})",
                       ("cpu",))


def supports(device: torch.device) -> bool:
    return device.type == "cpu"


# Exact mode's low-precision screening (tlfast/precision.py) would multiply in bf16.  It pays only
# where bf16 products are much faster than float32 ones; the kernels of _C.cpu_half_kernel(0) for
# which a benchmark (benchmarks/bench_knn.py, lowp cases) measured that go here.  None so far: the
# AMX and AVX512-BF16 kernels have not yet run on a CPU that has them, and the widening kernel
# of AVX2 / AVX-512 CPUs does float32 products (screening there only adds a pass).
SCREEN_DTYPE = torch.bfloat16
SCREEN_PAYS_ON: frozenset[str] = frozenset()
_HALF = {torch.bfloat16: 0, torch.float16: 1}


def screen_pays(device: torch.device, metric: Metric) -> bool:
    return metric.name in ("ip", "cosine", "l2") and _C.cpu_half_kernel(0) in SCREEN_PAYS_ON


def _float32(x: torch.Tensor):
    # float64 (and mixed dtypes) are converted once here; float32 contiguous input is not copied.
    return x.to(torch.float32).contiguous().numpy()


def _bits(x: torch.Tensor) -> np.ndarray:
    """A bf16 / fp16 tensor's bit patterns as a uint16 array, without a copy when contiguous."""
    return x.contiguous().view(torch.int16).numpy().view(np.uint16)


def knn(q: torch.Tensor, c: torch.Tensor, k: int, metric: Metric, exclude_self: bool):
    threads = torch.get_num_threads()
    if q.dtype in _HALF and c.dtype == q.dtype:
        # consumed natively (widened while packing, or bf16 products): no float32 copy of the corpus
        qa = _bits(q)
        ca = qa if c is q else _bits(c)
        values, indices = _C.knn_cpu_half(qa, ca, k, metric.code, _HALF[q.dtype], exclude_self, threads)
    else:
        qa = _float32(q)
        ca = qa if c is q else _float32(c)
        values, indices = _C.knn_cpu(qa, ca, k, metric.code, exclude_self, threads)
    return torch.from_numpy(values), torch.from_numpy(indices)


def pairwise(q: torch.Tensor, c: torch.Tensor, metric: Metric) -> torch.Tensor:
    qa = _float32(q)
    ca = qa if c is q else _float32(c)
    return torch.from_numpy(_C.pairwise_cpu(qa, ca, metric.code, torch.get_num_threads()))
