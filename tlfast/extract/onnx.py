"""ONNX export of the torch encoders and ONNX Runtime sessions tuned for inference."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._deps import require

OPSET = 18


def cache_dir() -> Path:
    """Where exported models are cached: $TLFAST_CACHE_DIR, else ~/.cache/tlfast/onnx."""
    root = os.environ.get("TLFAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tlfast")
    return Path(root) / "onnx"


def cache_key(**fields: Any) -> str:
    """A file name that changes whenever anything that shapes the exported graph changes."""
    from .. import __version__

    onnx = require("onnx", "ONNX export")
    fields.update(tlfast=__version__, torch=torch.__version__, onnx=onnx.__version__, opset=OPSET)
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24] + ".onnx"


def export(encoder: nn.Module, kind: str, path: str | os.PathLike, *, image_size: int | None = None) -> Path:
    """Export ``encoder`` (a TextEncoder, ImageEncoder or ModuleEncoder) to ``path``.

    Text graphs take int64 ``input_ids`` and ``attention_mask`` (batch, sequence) and image graphs
    float32 ``pixel_values`` (batch, 3, size, size); both return ``features`` (batch, dim) with
    pooling and normalisation inside the graph.  Batch (and sequence) axes are dynamic.  The
    dynamo exporter is used: the TorchScript one bakes the padding branch of transformers' mask
    code into the graph (outputs off by ~0.07 on unpadded batches).  Written to a temp file in
    the same folder and renamed, so a crash never leaves a truncated model behind.
    """
    require("onnxscript", "ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=65536)
    if kind == "text":
        ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 6251, 1012, 102],
                            [101, 2460, 102, 0, 0, 0, 0, 0]], dtype=torch.int64)
        args: tuple[torch.Tensor, ...] = (ids, (ids != 0).to(torch.int64))
        seq = torch.export.Dim("sequence", min=1, max=8192)
        names = ["input_ids", "attention_mask"]
        shapes: tuple[dict, ...] = ({0: batch, 1: seq}, {0: batch, 1: seq})
    elif kind == "image":
        if image_size is None:
            raise ValueError("exporting an image model needs image_size= (the square input size)")
        args = (torch.zeros(2, 3, image_size, image_size),)
        names = ["pixel_values"]
        shapes = ({0: batch},)
    else:
        raise ValueError(f"cannot export a {kind!r} extractor")
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        program = torch.onnx.export(encoder.eval(), args, dynamic_shapes=shapes, input_names=names,
                                    output_names=["features"], dynamo=True, opset_version=OPSET, verbose=False)
        program.save(tmp, external_data=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def session(path: str | os.PathLike, device: str = "cpu") -> Any:
    """An InferenceSession with all graph optimisations (attention / LayerNorm / GELU fusions, constant
    folding), one intra-op thread per core torch uses, no inter-op pool (the graph is a chain),
    and the CUDA provider on ``device="cuda"`` (needs onnxruntime-gpu)."""
    ort = require("onnxruntime", 'backend="onnxruntime"')
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("onnxruntime here has no CUDA execution provider; install onnxruntime-gpu "
                               "(and uninstall onnxruntime) or use device='cpu'")
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=providers)
    except Exception as exc:
        raise ValueError(f"onnxruntime could not load {os.fspath(path)!r} ({exc}); pass an ONNX model file") from exc
