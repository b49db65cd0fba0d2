"""Validation and loading of extraction inputs: texts, token-id sequences and images.

Everything that can be wrong with user data is reported here, before any model runs, with a
``TypeError`` / ``ValueError`` that names the offending item and says how to fix it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._deps import require

# Channel counts accepted for images: grey, RGB, RGBA (the alpha channel is dropped).
_CHANNELS = (1, 3, 4)


def _check_sized(data: Any, what: str) -> None:
    if isinstance(data, (str, bytes)):
        raise TypeError(f"data must be a list of {what}, got a single {type(data).__name__}; wrap it: [data]")
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(f"data must be a list (or other sequence) of {what}, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data is empty: pass at least one item to extract features from")


def check_texts(data: Any) -> list[str]:
    _check_sized(data, "strings")
    texts = list(data)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"data[{i}] is a {type(t).__name__}, not a str: a text extractor takes a list of "
                            f"strings; convert items with str(...) or drop them")
    return texts


def is_token_sequences(data: Any) -> bool:
    """True for a list of 1-D integer sequences (token ids for a sequence encoder)."""
    if isinstance(data, (np.ndarray, torch.Tensor)) or not len(data):
        return False
    first = data[0]
    if isinstance(first, (np.ndarray, torch.Tensor)):
        return first.ndim == 1 and not first.dtype.is_floating_point if isinstance(first, torch.Tensor) \
            else first.ndim == 1 and first.dtype.kind in "iu"
    return isinstance(first, (list, tuple)) and (len(first) == 0 or isinstance(first[0], (int, np.integer)))


def check_token_sequences(data: Any) -> list[np.ndarray]:
    _check_sized(data, "token-id sequences")
    out = []
    for i, s in enumerate(data):
        a = s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise TypeError(f"data[{i}] must be a 1-D sequence of integer token ids, got shape {a.shape} "
                            f"dtype {a.dtype}")
        if a.size == 0:
            raise ValueError(f"data[{i}] is an empty sequence; every sequence needs at least one token")
        out.append(a.astype(np.int64, copy=False))
    return out


class ImageBatchSource:
    """Images as a sequence of uint8 HWC arrays, loaded lazily (file paths are decoded only when
    their batch is built, in the prefetch thread).

    Accepts a 4-D uint8 array / tensor (NHWC, or NCHW when axis 1 holds the channels), or a list
    of PIL images, file paths, and 3-D uint8 arrays / tensors (HWC or CHW).
    """

    def __init__(self, data: Any):
        if isinstance(data, (np.ndarray, torch.Tensor)):
            if data.ndim != 4:
                raise ValueError(f"an image batch must be 4-D (N, H, W, C) or (N, C, H, W), got shape "
                                 f"{tuple(data.shape)}; for one image use x[None]")
            if len(data) == 0:
                raise ValueError("data is empty: pass at least one image")
            self._check_dtype(data, "data")
            t = data.detach().cpu() if isinstance(data, torch.Tensor) else torch.from_numpy(np.asarray(data))
            self.batch: torch.Tensor | None = self._to_nhwc(t, "data")
            self.items: list[Any] = []
        else:
            _check_sized(data, "images (PIL images, file paths or uint8 arrays)")
            self.batch = None
            self.items = list(data)
            for i, item in enumerate(self.items):
                if isinstance(item, (str, os.PathLike)):
                    if not os.path.isfile(item):
                        raise ValueError(f"data[{i}]: no image file at {os.fspath(item)!r}")
                elif isinstance(item, (np.ndarray, torch.Tensor)):
                    if item.ndim != 3:
                        raise ValueError(f"data[{i}] must be one 3-D image (H, W, C) or (C, H, W), got "
                                         f"shape {tuple(item.shape)}")
                    self._check_dtype(item, f"data[{i}]")
                elif not (hasattr(item, "convert") and hasattr(item, "size")):  # PIL.Image duck type
                    raise TypeError(f"data[{i}] is a {type(item).__name__}; images must be uint8 arrays or "
                                    f"tensors, PIL images, or file paths")

    def __len__(self) -> int:
        return len(self.batch) if self.batch is not None else len(self.items)

    @staticmethod
    def _check_dtype(x: Any, name: str) -> None:
        dtype = x.dtype
        if dtype not in (np.uint8, torch.uint8):
            raise TypeError(f"{name} has dtype {dtype}; images must be uint8 (0-255). For float images in "
                            f"[0, 1] use (x * 255).round() cast to uint8")

    @staticmethod
    def _to_nhwc(t: torch.Tensor, name: str) -> torch.Tensor:
        """A view in (N, H, W, C) order; NCHW is recognised by a channel axis at position 1."""
        if t.shape[-1] in _CHANNELS:
            return t
        if t.shape[1] in _CHANNELS:
            return t.permute(0, 2, 3, 1)
        raise ValueError(f"{name} has shape {tuple(t.shape)}: no channel axis of size 1, 3 or 4 found at "
                         f"position 1 (NCHW) or last (NHWC)")

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as an RGB uint8 (H, W, 3) array."""
        if self.batch is not None:
            return _to_rgb(self.batch[i].numpy())
        item = self.items[i]
        if isinstance(item, (np.ndarray, torch.Tensor)):
            t = item.detach().cpu() if isinstance(item, torch.Tensor) else torch.from_numpy(np.asarray(item))
            return _to_rgb(self._to_nhwc(t[None], f"data[{i}]")[0].numpy())
        if isinstance(item, (str, os.PathLike)):
            pil = require("PIL.Image", "loading images from files")
            try:
                with pil.open(item) as f:
                    return np.asarray(f.convert("RGB"))
            except Exception as exc:
                raise ValueError(f"data[{i}]: could not read an image from {os.fspath(item)!r} ({exc})") from exc
        return np.asarray(item.convert("RGB"))


    def take(self, positions: np.ndarray, size: int | None) -> torch.Tensor:
        """uint8 (len(positions), H, W, 3) batch, resized and centre-cropped to ``size`` if given.
        An RGB array batch already at ``size`` is gathered directly, without a per-image loop."""
        if self.batch is not None and self.batch.shape[-1] == 3 and (
                size is None or tuple(self.batch.shape[1:3]) == (size, size)):
            return self.batch[torch.from_numpy(np.asarray(positions, dtype=np.int64))]
        arrays = [self.load(int(i)) for i in positions]
        if size is not None:
            arrays = [resize_center_crop(a, size) for a in arrays]
        return stack_images(arrays)


def _to_rgb(a: np.ndarray) -> np.ndarray:
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    return a[..., :3]


def resize_center_crop(a: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """The ImageNet evaluation transform: scale the shorter side to ``size / crop_fraction``
    (bilinear, antialiased by PIL) and cut the central ``size x size`` square."""
    if a.shape[0] == size and a.shape[1] == size:
        return a
    pil = require("PIL.Image", "resizing images")
    im = pil.fromarray(np.ascontiguousarray(a))
    w, h = im.size
    scale = size / crop_fraction / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), pil.BILINEAR)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def stack_images(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """(N, H, W, 3) uint8 tensor from same-size HWC arrays; ValueError when sizes differ."""
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images in a batch have different sizes {sorted(shapes)[:3]}...; pass image_size= "
                         f"to from_module (or resize them) so that they can be batched")
    return torch.from_numpy(np.stack(arrays))
