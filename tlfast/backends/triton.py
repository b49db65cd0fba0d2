"""The ``triton`` backend: fused tensor-core distance + running top-k (tlfast/triton/fused_knn.py).

Runs on CUDA tensors in place.  CPU tensors (numpy inputs) are copied to the current CUDA device
and the results copied back.  Without a GPU, ``TRITON_INTERPRET=1`` (set before the kernels are
first imported) runs the same kernels on CPU tensors through Triton's interpreter: slow, and
meant for testing.
"""
from __future__ import annotations

import os

import torch

from ..metrics import Metric
from . import BackendInfo

NAME = "triton"


# Exact mode's screening (tlfast/precision.py) on the GPU: an fp16 tensor-core kNN of k' > k
# candidates (fp16's bound is 8x tighter than bf16's, so k' stays small), certified by the error
# bound and re-ranked exactly, instead of the 3xTF32 float32 products.  Not yet measured on a GPU
# (benchmarks/gpu_check.sh times it), so `auto` does not pick it; TLFAST_SCREEN=always does.
SCREEN_DTYPE = torch.float16


def screen_pays(device: torch.device, metric: Metric) -> bool:
    return False


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def info() -> BackendInfo:
    if not torch.cuda.is_available() and not _interpret_requested():
        return BackendInfo(False, "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU for testing)", ())
    from ..triton import fused_knn  # ImportError (no triton) -> reported unavailable by the registry

    if torch.cuda.is_available() and not fused_knn.INTERPRET:
        return BackendInfo(True, f"Triton fused kernels on {torch.cuda.get_device_name()}", ("cuda", "cpu"))
    if fused_knn.INTERPRET and _interpret_requested():
        return BackendInfo(True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1; for testing)", ("cpu",))
    return BackendInfo(False, "TRITON_INTERPRET changed after the Triton kernels were imported; "
                              "set it before importing tlfast", ())


def supports(device: torch.device) -> bool:
    from ..triton import fused_knn

    if fused_knn.INTERPRET:
        return device.type == "cpu"
    return torch.cuda.is_available() and device.type in ("cuda", "cpu")


def _on_device(x: torch.Tensor) -> torch.Tensor:
    from ..triton import fused_knn

    return x if (fused_knn.INTERPRET or x.is_cuda) else x.to("cuda", non_blocking=True)


def knn(q: torch.Tensor, c: torch.Tensor, k: int, metric: Metric, exclude_self: bool):
    from ..triton import fused_knn

    qd = _on_device(q)
    cd = qd if c is q else _on_device(c)
    values, indices = fused_knn.knn(qd, cd, k, metric, exclude_self)
    return values.to(q.device), indices.to(q.device)


def pairwise(q: torch.Tensor, c: torch.Tensor, metric: Metric) -> torch.Tensor:
    from ..triton import fused_knn

    qd = _on_device(q)
    cd = qd if c is q else _on_device(c)
    return fused_knn.pairwise(qd, cd, metric).to(q.device)
