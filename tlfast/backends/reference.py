"""The ``reference`` backend: tlfast.reference (pure PyTorch, float64, tiled) on any device."""
from __future__ import annotations

import torch

from .. import reference as ref
from ..metrics import Metric
from . import BackendInfo

NAME = "reference"


def info() -> BackendInfo:
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return BackendInfo(True, "pure PyTorch oracle", devices)


def supports(device: torch.device) -> bool:
    return True


def knn(q: torch.Tensor, c: torch.Tensor, k: int, metric: Metric, exclude_self: bool):
    return ref.knn(q, c, k, metric, exclude_self=exclude_self)


def pairwise(q: torch.Tensor, c: torch.Tensor, metric: Metric) -> torch.Tensor:
    return ref.pairwise(q, c, metric)
