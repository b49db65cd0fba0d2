"""The ``cuda`` backend: CUDA C++ kernels of tlfast._C (csrc/cuda), faiss-style.

kNN walks (query chunk x corpus chunk) tiles of bounded size.  ip / cosine / l2 tiles are cuBLAS
products (``torch.mm``, fp32 output); kl / js tiles come from the direct divergence kernel
(``_C.divergence_cuda``).  Each tile is then merged into the running k best by the block select
(``_C.select_k_cuda``), which applies the cosine / l2 epilogue (inverse norms, squared norms) while
it reads the tile, so the tile is read exactly once after it is written.  k <= 2048.

All kernels run on the caller's current stream on raw device pointers: CUDA tensors are used in
place; CPU tensors (numpy inputs) are copied to the current device and the results copied back.
"""
from __future__ import annotations

import torch

from .._native import LOAD_ERROR, _C
from ..metrics import Metric
from . import BackendInfo

NAME = "cuda"

# Elements of one distance tile (128 MiB of fp32) and the corpus rows per tile.
TILE_ELEMENTS = 1 << 25
CORPUS_CHUNK = 16384
# Row chunk of the O(n d) norm computations, bounding their fp32 temporaries.
PREP_ROWS = 65536

_EPILOGUE = {"ip": 0, "cosine": 1, "l2": 2, "kl": 0, "js": 0}
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def info() -> BackendInfo:
    if _C is None:
        return BackendInfo(False, LOAD_ERROR or "tlfast._C is missing", ())
    if not _C.built_with_cuda:
        return BackendInfo(False, "tlfast._C was built without CUDA; reinstall with TLFAST_CUDA=ON and nvcc on PATH", ())
    count, why = _C.cuda_device_count()
    if count == 0:
        return BackendInfo(False, f"no CUDA device: {why}", ())
    if not torch.cuda.is_available():
        return BackendInfo(False, "this torch build has no CUDA support", ())
    return BackendInfo(True, f"CUDA C++ kernels (cuBLAS tiles + block select, k <= {_C.cuda_max_select_k}) "
                             f"on {torch.cuda.get_device_name()}", ("cuda", "cpu"))


def supports(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu")


def _operand(x: torch.Tensor) -> torch.Tensor:
    x = x if x.is_cuda else x.to("cuda", non_blocking=True)
    return (x.float() if x.dtype == torch.float64 else x).contiguous()


def _row_map(x: torch.Tensor, fn) -> torch.Tensor:
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], PREP_ROWS):
        out[i:i + PREP_ROWS] = fn(x[i:i + PREP_ROWS].float())
    return out


def _row_terms(x: torch.Tensor, metric: Metric) -> torch.Tensor | None:
    """The select epilogue's per-row term: cosine 1/|x|, l2 |x|^2; None for the other metrics."""
    if metric.name == "cosine":
        return _row_map(x, lambda t: t.norm(dim=1).reciprocal())
    if metric.name == "l2":
        return _row_map(x, lambda t: (t * t).sum(1))
    return None


def _tile(q: torch.Tensor, c: torch.Tensor, metric: Metric) -> torch.Tensor:
    """[len(q), len(c)] float32: the raw product for ip / cosine / l2, final values for kl / js."""
    if metric.name in ("kl", "js"):
        out = torch.empty(q.shape[0], c.shape[0], dtype=torch.float32, device=q.device)
        _C.divergence_cuda(q.data_ptr(), q.stride(0), q.shape[0], c.data_ptr(), c.stride(0), c.shape[0], q.shape[1],
                           _DTYPE_CODE[q.dtype], metric.code, out.data_ptr(), out.stride(0),
                           torch.cuda.current_stream(q.device).cuda_stream)
        return out
    if q.dtype == torch.float32:
        return torch.mm(q, c.T)
    return torch.mm(q, c.T, out_dtype=torch.float32)  # fp16 / bf16 products accumulated and kept in fp32


def _check_k(k: int) -> None:
    if k > _C.cuda_max_select_k:
        raise ValueError(f"k={k} is above the cuda backend's block select limit ({_C.cuda_max_select_k}); "
                         f"use backend='triton' or 'reference' for larger k")


def knn(q: torch.Tensor, c: torch.Tensor, k: int, metric: Metric, exclude_self: bool):
    _check_k(k)
    qd = _operand(q)
    cd = qd if c is q else _operand(c)
    nq, n = qd.shape[0], cd.shape[0]
    qterm = _row_terms(qd, metric)
    cterm = qterm if cd is qd else _row_terms(cd, metric)
    values = torch.empty(nq, k, dtype=torch.float32, device=qd.device)
    indices = torch.empty(nq, k, dtype=torch.int64, device=qd.device)
    stream = torch.cuda.current_stream(qd.device).cuda_stream
    c_chunk = min(n, CORPUS_CHUNK)
    q_chunk = max(1, min(nq, TILE_ELEMENTS // c_chunk))
    for i in range(0, nq, q_chunk):
        rows = min(q_chunk, nq - i)
        for j in range(0, n, c_chunk):
            cols = min(c_chunk, n - j)
            tile = _tile(qd[i:i + rows], cd[j:j + cols], metric)
            # The first tile has >= k eligible columns (k <= n, or n - 1 with exclude_self), so the
            # lists are full after it and every later tile merges into them.
            _C.select_k_cuda(tile.data_ptr(), tile.stride(0), rows, cols, j,
                             0 if qterm is None else qterm[i:].data_ptr(),
                             0 if cterm is None else cterm[j:].data_ptr(),
                             _EPILOGUE[metric.name], metric.smaller_is_better, i if exclude_self else -1,
                             j > 0, k, values[i:].data_ptr(), indices[i:].data_ptr(), stream)
    return values.to(q.device), indices.to(q.device)


def pairwise(q: torch.Tensor, c: torch.Tensor, metric: Metric) -> torch.Tensor:
    qd = _operand(q)
    cd = qd if c is q else _operand(c)
    out = _tile(qd, cd, metric)
    if metric.name == "cosine":
        out *= _row_terms(qd, metric)[:, None]
        out *= _row_terms(cd, metric)[None, :]
    elif metric.name == "l2":
        out.mul_(-2.0).add_(_row_terms(qd, metric)[:, None]).add_(_row_terms(cd, metric)[None, :]).clamp_min_(0.0)
    return out.to(q.device)
