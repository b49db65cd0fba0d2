"""ONNX export of the torch encoders and ONNX Runtime sessions tuned for inference."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._deps import require
from .precision import usable_cores

OPSET = 18
# Names the int8 recipe in cached file names (a change of recipe must not reuse old files).
INT8_RECIPE = "gelu-fp32"


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
    pooling and normalisation inside the graph.  Batch (and sequence) axes are dynamic.

    A Hugging Face BERT-family text encoder is exported by the TorchScript exporter with eager
    attention -- the graph shape ONNX Runtime's transformer optimizer recognises (see
    :func:`optimize_text`) -- where the additive mask ``(1 - mask) * min`` is computed for every
    batch, padded or not.  Everything else goes through the dynamo exporter (the TorchScript one
    would bake the data-dependent padding branch of transformers' SDPA mask code into the graph).
    Written to a temp file in the same folder and renamed, so a crash never leaves a truncated
    model behind.
    """
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
    hf_model = _hf_bert(encoder) if kind == "text" else None
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        if hf_model is not None:
            with _eager_attention(hf_model), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python branches
                axes = {n: {0: "batch", 1: "sequence"} for n in names}
                torch.onnx.export(copy.deepcopy(encoder).eval(), args, tmp, input_names=names,
                                  output_names=["features"], dynamic_axes={**axes, "features": {0: "batch"}},
                                  opset_version=17, dynamo=False)
        else:
            require("onnxscript", "ONNX export")
            program = torch.onnx.export(encoder.eval(), args, dynamic_shapes=shapes, input_names=names,
                                        output_names=["features"], dynamo=True, opset_version=OPSET, verbose=False)
            program.save(tmp, external_data=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _hf_bert(encoder: nn.Module) -> Any:
    """The transformers BERT-family model inside a TextEncoder, or None."""
    model = getattr(encoder, "model", None)
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in _OPTIMIZER_MODEL_TYPES:
        return None
    return model


# transformers model types ONNX Runtime's optimizer fuses as model_type="bert".
_OPTIMIZER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "camembert", "electra")


@contextlib.contextmanager
def _eager_attention(model: Any):
    """Switch the model to eager attention for the export (SDPA's mask code branches on the data)."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    try:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            config._attn_implementation = "eager"
        yield
    finally:
        if before is not None:
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(before)
            else:
                config._attn_implementation = before


def optimize_text(raw: str | os.PathLike, path: str | os.PathLike, *, num_heads: int, hidden_size: int) -> Path:
    """Run ONNX Runtime's transformer optimizer (model_type="bert") over an exported text graph:
    embeddings + LayerNorm into EmbedLayerNormalization, Q/K/V + softmax into one Attention op per
    layer, residual + LayerNorm into SkipLayerNormalization, bias + GELU into BiasGelu.  Without
    these ONNX Runtime runs the graph op by op and was 2x slower than torch on an AMX Xeon."""
    optimizer = require("onnxruntime.transformers.optimizer", "ONNX Runtime graph fusions")
    path = Path(path)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        model = optimizer.optimize_model(os.fspath(raw), model_type="bert", num_heads=num_heads,
                                         hidden_size=hidden_size)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        model.save_model_to_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def quantize_int8(src: str | os.PathLike, path: str | os.PathLike, *, reduce_range: bool) -> Path:
    """ONNX Runtime dynamic int8 quantisation: MatMul weights per output channel, activations per
    batch at run time.  ``reduce_range`` (7-bit weights) avoids the u8 x s8 16-bit saturation of
    AVX2's ``vpmaddubsw`` on CPUs without VNNI.

    The MatMuls fed by a GELU stay float32: GELU outputs are one-sided with long tails, so one
    per-batch uint8 scale wastes most of its range on them.  Measured on MiniLM and the quality
    text set: quantising everything gives mean cosine 0.987 / top-10 overlap 0.91 to fp32 (below
    the int8 class); keeping those 6 of 24 MatMuls in fp32 gives 0.994 / 0.95."""
    quant = require("onnxruntime.quantization", "int8 quantisation")
    onnx = require("onnx", "int8 quantisation")
    path = Path(path)
    graph = onnx.load(os.fspath(src)).graph
    gelu_outputs = {o for n in graph.node if n.op_type in ("Gelu", "BiasGelu", "FastGelu") for o in n.output}
    keep_fp32 = [n.name for n in graph.node if n.op_type == "MatMul" and set(n.input) & gelu_outputs]
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            quant.quantize_dynamic(os.fspath(src), tmp, per_channel=True, reduce_range=reduce_range,
                                   weight_type=quant.QuantType.QInt8, op_types_to_quantize=["MatMul", "Attention"],
                                   nodes_to_exclude=keep_fp32,
                                   # the fused contrib ops (Attention, SkipLayerNorm) have no ONNX shape
                                   # inference: their outputs are float32
                                   extra_options={"DefaultTensorType": 1})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def session(path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> Any:
    """An InferenceSession with all graph optimisations (constant folding, layout transforms, the
    fusions ONNX Runtime does itself), one intra-op thread per core the process may use (its
    affinity mask, not the machine's core count), no inter-op pool (the graph is a chain), workers
    that sleep instead of spinning between ops, and the CUDA provider on ``device="cuda"`` (needs
    onnxruntime-gpu)."""
    ort = require("onnxruntime", 'backend="onnxruntime"')
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or usable_cores()
    options.inter_op_num_threads = 1
    # Spinning workers burn the cores other processes (and the prefetch thread) need: on a shared
    # machine they turn a 2x load into a much larger slowdown.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    # Memory patterns pre-plan buffers for one input shape; with a new (batch, sequence) shape per
    # batch they only grow the arena, so they are off.
    options.enable_mem_pattern = False
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
