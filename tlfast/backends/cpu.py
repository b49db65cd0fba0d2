"""The ``cpu`` backend: fused C++/OpenMP distance + top-k kernels (csrc/cpu/fused_knn.h)."""
from __future__ import annotations

import torch

from .._native import LOAD_ERROR, _C
from ..metrics import Metric
from . import BackendInfo

NAME = "cpu"


def info() -> BackendInfo:
    if _C is None:
        return BackendInfo(False, LOAD_ERROR or "tlfast._C is missing", ())
    return BackendInfo(True, f"C++/OpenMP fused kernels ({_C.cpu_isa()})", ("cpu",))


def supports(device: torch.device) -> bool:
    return device.type == "cpu"


def _float32(x: torch.Tensor):
    # float16 / bfloat16 / float64 are converted once here; float32 contiguous input is not copied.
    return x.to(torch.float32).contiguous().numpy()


def knn(q: torch.Tensor, c: torch.Tensor, k: int, metric: Metric, exclude_self: bool):
    qa = _float32(q)
    ca = qa if c is q else _float32(c)
    values, indices = _C.knn_cpu(qa, ca, k, metric.code, exclude_self, torch.get_num_threads())
    return torch.from_numpy(values), torch.from_numpy(indices)


def pairwise(q: torch.Tensor, c: torch.Tensor, metric: Metric) -> torch.Tensor:
    qa = _float32(q)
    ca = qa if c is q else _float32(c)
    return torch.from_numpy(_C.pairwise_cpu(qa, ca, metric.code, torch.get_num_threads()))
