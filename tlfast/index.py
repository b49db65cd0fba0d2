"""A searchable collection of vectors: exact (flat) or approximate, in memory or memory-mapped.

    index = tlfast.Index("cosine", dtype="float16")
    index.add(features, ids=doc_ids)
    res = index.search(queries, k=10)                         # KnnResult, indices are ids
    res = index.search(queries, 10, memory_budget="2GB")      # out-of-core: block by block
    index.save("my-index");  tlfast.Index.load("my-index", mmap=True)

Storage is a list of segments (each added batch, each shard of a FeatureStore, or the one
memory-mapped file of a loaded index), so that a corpus larger than memory is never copied: an
exact search runs the fused kernel over one block at a time and merges the per-block top-k.

Merging is exact.  Every block returns its top-k best first with ties toward the smaller
position, and every position of a block is larger than every position seen before it, so a
stable sort of [running top-k, block top-k] by value keeps exact ties in position order - the
same answer the kernel gives over the whole corpus at once.
"""
from __future__ import annotations

import copy
import functools
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from . import _persist
from .backends import resolve as _resolve_backend
from ._rwlock import Mutex, RWLock
from ._validate import (SAFE_LOG2, RowRange, abs_max, as_tensor, check_domain, check_matrix, problem_scale,
                        rescale_rows, scale_by_power_of_two, scale_values)
from .metrics import METRICS, get_metric
from .precision import WithPrecision, check_precision
from .ops import KnnResult

__all__ = ["Index", "parse_bytes"]

FORMAT = "tlfast.index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_VECTORS = "vectors.npy"
_IDS = "ids.npy"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# numpy has no bfloat16: its bits are stored as uint16 and viewed back on load.
_NPY_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
# Block size when no budget was given but a block must be copied anyway: host-resident vectors
# travelling to a GPU, or half-precision storage that the CPU kernel reads as float32 (so float16
# storage keeps its memory saving during search too).
_DEFAULT_BLOCK_BUDGET = 64 * 2**20
# Rows per block when saving and when scanning loaded vectors for the metric's domain.
_IO_ROWS = 65536


def parse_bytes(value: Any, name: str = "memory_budget") -> int:
    """Bytes in ``value``: an int, or a string such as "2GB", "512 MiB", "1.5g" (binary units)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a byte count or a string such as '2GB', got {value!r}")
    if isinstance(value, (int, np.integer)):
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}={value!r} is not a size; write e.g. '2GB', '512MB' or a byte count")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise TypeError(f"{name} must be a byte count or a string such as '2GB', got {type(value).__name__}")
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return n


def _as_ids(ids: Any, n: int) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers, got dtype {arr.dtype}; pass e.g. np.arange(n)")
    if arr.shape != (n,):
        raise ValueError(f"ids must have shape ({n},) (one per row of x), got {arr.shape}")
    arr = arr.astype(np.int64)
    if n and arr.min() < 0:
        raise ValueError("ids must be >= 0 (-1 marks 'no neighbour' in results)")
    return arr


def _merge_topk(best: tuple[torch.Tensor, torch.Tensor] | None, values: torch.Tensor, positions: torch.Tensor,
                k: int, larger_is_better: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the running best and one block's top-k (block positions all larger): see module doc."""
    if best is not None:
        values = torch.cat([best[0], values], dim=1)
        positions = torch.cat([best[1], positions], dim=1)
    key = -values if larger_is_better else values
    order = torch.sort(key, dim=1, stable=True).indices[:, :k]
    return values.gather(1, order), positions.gather(1, order)



def _reader(method):
    """Run ``method`` holding the index's lock shared: concurrent with other readers, never with a writer."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock.read():
            return method(self, *args, **kwargs)
    return locked


def _writer(method):
    """Run ``method`` holding the index's lock exclusively (no search or save runs meanwhile)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock.write():
            return method(self, *args, **kwargs)
    return locked


# What a saved index's manifest.json must hold (``_persist.read_manifest`` checks it on load and
# before ``overwrite`` replaces a folder); every file of the folder is one of ``files``.
KIND = _persist.Kind(FORMAT, "index", FORMAT_VERSION, schema={
    "metric": _persist.is_str(METRICS), "dim": _persist.is_int(1), "dtype": _persist.is_str(_DTYPES),
    "count": _persist.is_int(1), "kind": _persist.is_str(), "params": _persist.is_instance(dict),
    "files": _persist.is_files}, listed=lambda meta: meta["files"])


def _check_loaded_ids(ids: np.ndarray, count: int, where: Path) -> np.ndarray:
    """Ids read from ``where``: int64 (count,), unique, >= 0 -- as ``add`` guarantees."""
    if ids.dtype.kind not in "iu" or ids.shape != (count,):
        raise ValueError(f"{where} holds {ids.dtype} {ids.shape} ids for {count} vectors; re-save the index")
    ids = ids.astype(np.int64, copy=False)
    ordered = np.sort(ids)  # sort + neighbour compare: np.unique (numpy 2.4) is ~30x slower here
    if count and (ordered[0] < 0 or bool((ordered[1:] == ordered[:-1]).any())):
        raise ValueError(f"{where} holds negative or duplicate ids; every vector needs its own id >= 0 "
                         f"(re-save the index)")
    return ids


class Index:
    """Vectors to search, with ids, persistence and out-of-core search.

    Thread-safe (docs/design/concurrency.md): searches and saves run concurrently; ``add`` and
    ``train`` wait for them and run alone, so every search sees the index after some prefix of
    the adds.  ``add`` copies its input (reusing the buffer later cannot change the index), and
    ``copy.copy(index)`` is an independent index sharing the immutable stored blocks.

    Args:
        metric: "cosine" (default), "ip", "l2" (squared), "kl" or "js"; see ``tlfast.METRICS``.
        dim: vector dimension; taken from the first ``add`` when None.
        dtype: storage dtype, "float32", "float16" or "bfloat16".  Half precision halves memory;
            distances are still accumulated in float32, so only the stored vectors are rounded
            (relative error about 2^-11 for float16 and 2^-8 for bfloat16 per coordinate; neighbours
            whose values differ by less than that may swap).  float16 rejects values beyond +-65504.
        device: "cpu" or "cuda[:n]": where in-memory vectors live and where searching runs.
        kind: "flat" (exact, tlfast's kernels) or an approximate kind provided by ``tlfast.ann``
            ("ivf", "ivfpq", "hnsw", ...), which receives ``**params``.
    """

    def __init__(self, metric: str = "cosine", *, dim: int | None = None, dtype: str = "float32",
                 device: str | torch.device = "cpu", kind: str = "flat", **params: Any) -> None:
        self.metric = get_metric(metric)
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1):
            raise ValueError(f"dim must be a positive int or None, got {dim!r}")
        self.dim = None if dim is None else int(dim)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {device!r}") from exc
        if not isinstance(kind, str):
            raise ValueError(f"kind must be a string such as 'flat' or 'ivf', got {kind!r}")
        if kind != "flat" and dtype != "float32":
            raise ValueError(f"dtype={dtype!r} sets the storage of exact (flat) indexes; kind={kind!r} keeps "
                             f"its own storage (drop dtype, or use kind='flat')")
        if kind == "flat" and params:
            raise ValueError(f"kind='flat' takes no parameters, got {sorted(params)}; "
                             f"parameters such as nlist belong to approximate kinds (kind='ivf')")
        self.kind = kind
        self.params = dict(params)
        self._segments: list[torch.Tensor] = []
        self._ids: list[np.ndarray] | None = None  # None: ids are positions 0..count-1
        self._count = 0
        self._ann: Any = None
        self._mapped = False  # segments view files (memory-mapped): never concatenate them in RAM
        # Searches are readers, add/train writers.  Stored tensors are never written in place, so
        # readers may replace a segment list with its concatenation (same rows) under _compacting.
        self._lock = RWLock()
        self._compacting = Mutex()
        # max |x| of the stored rows (ip / l2 range safety), valid while _count == _abs_max_count.
        self._abs_max, self._abs_max_count = 0.0, 0
        self._mapped_files: list[_persist.MappedFile] = []  # size-checked before every block is read

    # ------------------------------------------------------------------ building
    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"Index(metric={self.metric.name!r}, dim={self.dim}, dtype={self.dtype!r}, "
                f"device={str(self.device)!r}, kind={self.kind!r}, count={self._count})")

    def _prepare(self, x: Any, name: str) -> torch.Tensor:
        t, _ = as_tensor(x, name)
        check_matrix(t, name)
        if self.dim is not None and t.shape[1] != self.dim:
            raise ValueError(f"dimension mismatch: {name} has dim {t.shape[1]}, the index has dim {self.dim}")
        return self._range_safe(t, name, check_domain(t, name, self.metric), stored=True)

    def _to_storage(self, t: torch.Tensor, name: str) -> torch.Tensor:
        dt = _DTYPES[self.dtype]
        # A copy even where no conversion is needed: the caller may reuse or overwrite its buffer.
        out = t.to(device=self.device, dtype=dt, copy=True)
        if dt != t.dtype and not bool(torch.isfinite(out).all()):
            limit = "+-65504" if dt == torch.float16 else "+-3.4e38"
            raise ValueError(f"{name} has values beyond the {self.dtype} range ({limit}) of this index's "
                             f"storage; scale the vectors down (or use Index(dtype='float32'))")
        return out

    def _range_safe(self, t: torch.Tensor, name: str, seen: RowRange, *, stored: bool) -> torch.Tensor:
        """Rows the kernels compute on without overflow or underflow (docs/design/concurrency.md).

        cosine ignores each row's scale: out-of-range rows are rescaled by a power of two (exact);
        stored float16 rows all go to max |x| in [1, 2), so that a tiny row does not round to zeros.
        Exact ip / l2 rescale the whole problem at search time (``_search_flat``); approximate
        indexes cannot, so they reject rows outside [2^-40, 2^40].
        """
        if self.metric.name == "cosine":
            return rescale_rows(t, (0, 1) if stored and self.dtype == "float16" else None, seen)
        if self.kind != "flat" and self.metric.name in ("ip", "l2"):
            a = seen.abs_max
            if a and not 2.0 ** -SAFE_LOG2 <= a < 2.0 ** SAFE_LOG2:
                raise ValueError(f"{name} has values up to |x| = {a:.3g}; kind={self.kind!r} computes "
                                 f"{self.metric.name} in float32 and needs max |x| in [2^-40, 2^40]: scale the "
                                 f"vectors by a constant, or use kind='flat' (which rescales exactly)")
        return t

    def _ann_module(self):
        try:
            from . import ann
        except ImportError as exc:
            raise ValueError(f"kind={self.kind!r} needs tlfast.ann (approximate indexes), which is not "
                             f"available here ({exc}); use kind='flat' for exact search") from exc
        return ann

    def _ids_after_add(self, ids: Any, n: int) -> list[np.ndarray] | None:
        """The id table once ``n`` rows with ``ids`` are added (validated; the index is not touched)."""
        if ids is None:
            if self._ids is None:
                return None
            # Automatic ids are the positions where free (as without ids), else the next unused
            # ids above them: never an id given before.
            used = np.concatenate(self._ids)
            free = np.arange(self._count, self._count + n + int((used >= self._count).sum()), dtype=np.int64)
            return [*self._ids, free[~np.isin(free, used)][:n]]
        new = _as_ids(ids, n)
        if np.unique(new).size != n:
            raise ValueError("ids contain duplicates; every vector needs its own id")
        old = self._ids if self._ids is not None else [np.arange(self._count, dtype=np.int64)]
        if self._count and np.isin(new, np.concatenate(old)).any():
            raise ValueError("ids repeat ids already in the index; every vector needs its own id")
        return [*old, new] if self._count else [new]

    @_writer
    def train(self, x: Any) -> "Index":
        """Train an approximate index (clustering, codebooks) on representative vectors ``x``.

        Optional: an approximate index trains itself once ``add`` has given it enough rows (and is
        searched exactly until then).  A flat index needs no training.
        """
        t = self._prepare(x, "x")
        if self.kind != "flat":
            self._ensure_ann(t.shape[1])
            self._ann.train(t.to("cpu", torch.float32).contiguous().numpy())
        return self

    def _ensure_ann(self, dim: int) -> None:
        if self._ann is None:
            self.dim = dim
            self._ann = self._ann_module().make_index(self.kind, self.metric.name, dim, **self.params)

    @_writer
    def add(self, x: Any, ids: Any = None) -> "Index":
        """Append the rows of ``x`` (n, dim), numpy or torch, with integer ``ids`` (default: positions).

        Rows are validated for the metric once, here (finite; non-zero for cosine; probability rows
        for kl / js), so searching never re-scans the corpus.
        """
        t = self._prepare(x, "x")
        n = t.shape[0]
        new_ids = self._ids_after_add(ids, n)
        if self.kind == "flat":
            stored = self._to_storage(t, "x")
            if self._abs_max_count == self._count and self.metric.name in ("ip", "l2"):
                self._abs_max, self._abs_max_count = max(self._abs_max, abs_max(stored)), self._count + n
            self._segments.append(stored)
        else:
            self._ensure_ann(t.shape[1])
            self._ann.add(t.to("cpu", torch.float32).contiguous().numpy())
        self._ids = new_ids
        self.dim = t.shape[1]
        self._count += n
        return self

    @classmethod
    def from_store(cls, store: Any, metric: str = "cosine", *, device: str | torch.device = "cpu",
                   validate: bool = True) -> "Index":
        """An exact index over a ``tlfast.FeatureStore`` (or any object with ``len`` and slicing, and
        ``shards()`` or ``num_shards`` + ``shard(i)`` giving (rows, dim) arrays), without copying:
        each memory-mapped shard becomes a segment, so the store may be larger than memory (search
        it with ``memory_budget``).

        The storage dtype is the store's (float32 / float16); ``validate`` scans the shards once
        for the metric's input domain.
        """
        if not hasattr(store, "__len__"):
            raise TypeError(f"store must be a FeatureStore-like object with len() and shards(), "
                            f"got {type(store).__name__}")
        if hasattr(store, "shards"):
            shards = store.shards()
        elif hasattr(store, "num_shards") and hasattr(store, "shard"):  # tlfast.FeatureStore
            shards = (store.shard(i) for i in range(store.num_shards))
        else:
            shards = (store[i:i + 65536] for i in range(0, len(store), 65536))
        index: Index | None = None
        for i, shard in enumerate(shards):
            t, _ = as_tensor(shard, f"store shard {i}")
            check_matrix(t, f"store shard {i}")
            if t.dtype == torch.float64:
                t = t.float()
            dtype = next(name for name, dt in _DTYPES.items() if dt == t.dtype)
            if index is None:
                index = cls(metric, dim=t.shape[1], dtype=dtype, device=device)
            if t.shape[1] != index.dim or dtype != index.dtype:
                raise ValueError(f"store shard {i} has dim {t.shape[1]} and dtype {dtype}, the first shard "
                                 f"dim {index.dim} and dtype {index.dtype}; a store holds one kind of vector")
            if validate:
                check_domain(t, f"store shard {i}", index.metric)
            index._segments.append(t if t.device.type == "cpu" else t.to(index.device))
            index._count += t.shape[0]
        if index is None or index._count == 0:
            raise ValueError("store is empty; extract some features into it first")
        index._mapped = True
        index._mapped_files = list(getattr(store, "mapped_files", list)())
        if index._count != len(store):
            raise ValueError(f"store reports {len(store)} rows but its shards hold {index._count}; "
                             f"the store is inconsistent (re-open or rebuild it)")
        return index

    # ------------------------------------------------------------------ searching
    def _positions_to_ids(self, positions: torch.Tensor) -> torch.Tensor:
        if self._ids is None:
            return positions
        with self._compacting:
            if len(self._ids) > 1:
                self._ids = [np.concatenate(self._ids)]
        table = torch.from_numpy(self._ids[0]).to(positions.device)
        out = table[positions.clamp(min=0)]
        return torch.where(positions < 0, positions, out)

    def _blocks(self, rows: int | None) -> Iterator[tuple[int, torch.Tensor]]:
        """(first position, block) over the stored vectors, each at most ``rows`` rows (None: whole)."""
        segments = self._segments
        if rows is None and len(segments) > 1 and not self._mapped:
            # In-memory batches are joined once so that one kernel call sees the whole corpus.
            with self._compacting:
                if len(self._segments) > 1:
                    self._segments = [torch.cat(self._segments)]
                segments = self._segments
        start = 0
        for seg in segments:
            step = seg.shape[0] if rows is None else rows
            for lo in range(0, seg.shape[0], step):
                for mapped in self._mapped_files:  # a truncated map would be SIGBUS: an error instead
                    mapped.check()
                yield start + lo, seg[lo:lo + step]
            start += seg.shape[0]

    def _on_device(self, blocks: Iterator[tuple[int, torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor]]:
        """Blocks moved to the index device; on CUDA the next block's host->device copy runs on a
        side stream (from pinned memory) while the current block is searched."""
        if self.device.type != "cuda":
            yield from blocks
            return
        compute = torch.cuda.current_stream(self.device)
        copier = torch.cuda.Stream(self.device)

        def start_copy(item):
            pos, blk = item
            if blk.device == self.device:
                return pos, blk, None
            with torch.cuda.stream(copier):
                dev = blk.pin_memory().to(self.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(copier)
            return pos, dev, done

        pending = None
        for item in blocks:
            nxt = start_copy(item)
            if pending is not None:
                yield _ready(pending, compute)
            pending = nxt
        if pending is not None:
            yield _ready(pending, compute)

    @_reader
    def search(self, queries: Any, k: int, *, backend: str = "auto", memory_budget: Any = None,
               precision: str = "exact", target_recall: float | None = None, **search_params: Any) -> KnnResult:
        """The ``k`` best stored vectors for each query, as ``KnnResult(values, indices)`` where
        ``indices`` are the ids given to ``add`` (-1 where an approximate index found fewer than k).

        Args:
            queries: (nq, dim) numpy array or torch tensor; results come back the same kind (torch:
                on the queries' device).
            k: 1 <= k <= len(index).
            backend: for exact search, as in ``tlfast.knn``.
            memory_budget: bytes ("2GB", "512MB" or an int) of stored vectors to hold at once;
                the corpus is then streamed block by block (memory-mapped storage is read from disk
                as it goes; on GPU, host->device copies overlap with compute) and the per-block top-k
                merged.  Results equal a search without a budget.
            precision: exact search only: "exact", "bf16" or "fp16", as in ``tlfast.knn``.
            target_recall: approximate kinds: search with the cheapest setting that reaches this
                recall@k (see :meth:`tune`; tuned once per (target, k) on a sample of the corpus and
                remembered, not stored).  Exact search meets any target and ignores it.
            **search_params: approximate kinds only (e.g. ``nprobe``, ``ef_search``).
        """
        if target_recall is not None and self.kind != "flat":
            if search_params:
                raise ValueError(f"pass target_recall or {sorted(search_params)}, not both: target_recall "
                                 f"chooses them")
            search_params = self._params_for_recall(target_recall, k)
        if self._count == 0:
            raise ValueError("the index is empty; add vectors with index.add(x) before searching")
        q, is_numpy = as_tensor(queries, "queries")
        check_matrix(q, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"dimension mismatch: queries have dim {q.shape[1]}, the index has dim {self.dim}")
        q = self._range_safe(q, "queries", check_domain(q, "queries", self.metric), stored=False)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        k = int(k)
        if not 1 <= k <= self._count:
            raise ValueError(f"k must be between 1 and {self._count} (the index size), got k={k}")
        out_device = q.device
        precision = check_precision(precision)
        if self.kind != "flat" and precision != "exact":
            raise ValueError(f"precision={precision!r} applies to exact search; kind={self.kind!r} has its "
                             f"own storage precision (drop precision)")
        if self.kind != "flat":
            if memory_budget is not None:
                raise ValueError(f"memory_budget applies to exact search; kind={self.kind!r} keeps its own "
                                 f"compressed storage (drop memory_budget)")
            values, positions = self._ann.search(q.to("cpu", torch.float32).contiguous().numpy(), k, **search_params)
            values = torch.as_tensor(np.asarray(values, dtype=np.float32))
            positions = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        else:
            if search_params:
                raise ValueError(f"unknown search parameters {sorted(search_params)}: an exact (flat) index "
                                 f"takes none; they belong to approximate kinds")
            values, positions = self._search_flat(q.to(self.device), k, backend, memory_budget, precision)
        ids = self._positions_to_ids(positions)
        values, ids = values.to(out_device), ids.to(out_device)
        return KnnResult(values.numpy(), ids.numpy()) if is_numpy else KnnResult(values, ids)

    def _search_flat(self, q: torch.Tensor, k: int, backend: str, memory_budget: Any, precision: str = "exact"):
        impl = WithPrecision(_resolve_backend(backend, self.device), precision)
        rows = None
        if memory_budget is not None:
            # Working set of one block: its stored bytes plus the float32 copy the kernel reads.
            per_row = self.dim * (4 + (0 if self.dtype == "float32" else _DTYPES[self.dtype].itemsize))
            rows = parse_bytes(memory_budget) // per_row
            if rows < 1:
                raise ValueError(f"memory_budget={memory_budget!r} is smaller than one stored row "
                                 f"({per_row} bytes); raise it")
        elif (self.device.type == "cuda" and any(s.device != self.device for s in self._segments)) or \
                (self.device.type == "cpu" and self.dtype != "float32"):
            rows = max(1, _DEFAULT_BLOCK_BUDGET // (self.dim * 4))
        scale = problem_scale(self.metric, abs_max(q), self._stored_abs_max()) \
            if self.metric.name in ("ip", "l2") else None
        if scale is not None:
            q = scale_by_power_of_two(q, scale[0])
        best = None
        for start, block in self._on_device(self._blocks(rows)):
            if scale is not None:
                block = scale_by_power_of_two(block, scale[1])
            kb = min(k, block.shape[0])
            values, pos = impl.knn(q, block, kb, self.metric, False)
            pos = pos.to(torch.int64) + start
            best = (values, pos) if best is None and kb == k else _merge_topk(best, values, pos, k,
                                                                               self.metric.larger_is_better)
        return best if scale is None else (scale_values(best[0], scale[2]), best[1])

    def _stored_abs_max(self) -> float:
        """max |x| of the stored rows: kept up to date by add; scanned once for loaded indexes."""
        with self._compacting:
            if self._abs_max_count != self._count:
                self._abs_max = max(abs_max(seg) for seg in self._segments)
                self._abs_max_count = self._count
            return self._abs_max

    # ------------------------------------------------------------------ recall tuning
    def tune(self, target_recall: float = 0.95, queries: Any = None, *, k: int = 10, sample: int = 1000,
             confidence: float = 0.95, seed: int = 0) -> Any:
        """Choose the fastest search setting (``nprobe`` for ivf, ``ef_search`` for hnsw) whose
        recall@k reaches ``target_recall`` with ``confidence``, store it (``save`` persists it) and
        return a ``tlfast.ann.TuneReport``: params, estimated recall with its Wilson interval,
        speed-up over exact search.

        Recall is measured against tlfast's exact search on ``queries`` (at most ``sample`` of
        them) or, when None, on queries built from ``sample`` corpus rows: the rows with
        exclude_self for ivf, neighbour steps x_i + (x_a − x_b) that are not graph nodes for hnsw
        (``tlfast.ann.tune``).  Use queries like the ones the index will serve when their
        distribution differs from the corpus's.
        """
        if self.kind == "flat":
            raise ValueError("a flat index searches exactly (recall 1): there is nothing to tune; "
                             "tune approximate kinds such as kind='ivf' or 'hnsw'")
        if self._ann is None or len(self) == 0:
            raise ValueError("the index is empty; add vectors before tuning")
        q = None
        if queries is not None:
            t = self._prepare(queries, "queries")
            q = t.to("cpu", torch.float32).contiguous().numpy()
        report = self._ann_module().tune(self._ann, target_recall, q, k=k, sample=sample, confidence=confidence,
                                         seed=seed)
        self.params.update(report.params)
        return report

    def _params_for_recall(self, target_recall: float, k: int) -> dict:
        cache = self.__dict__.setdefault("_recall_params", {})
        key = (float(target_recall), int(k) if isinstance(k, (int, np.integer)) else k, len(self))
        if key not in cache:
            if self._ann is None:
                raise ValueError("the index is empty; add vectors with index.add(x) before searching")
            report = self._ann_module().tune(self._ann, target_recall, None, k=k, store=False, timing_runs=0)
            cache[key] = report.params
        return dict(cache[key])

    # ------------------------------------------------------------------ persistence
    def __copy__(self) -> "Index":
        """An independent index: adding to either never changes the other.  The stored blocks are
        shared (they are immutable), the id and segment lists and any approximate index are copied."""
        with self._lock.read():
            new = object.__new__(type(self))
            new.__dict__.update(self.__dict__)
            new._lock, new._compacting = RWLock(), Mutex()
            new.params = dict(self.params)
            new._segments = list(self._segments)
            new._ids = None if self._ids is None else list(self._ids)
            new._mapped_files = list(self._mapped_files)  # the same maps, so the same size checks
            new._ann = copy.deepcopy(self._ann)
        return new

    def __getstate__(self) -> dict:
        with self._lock.read():
            for mapped in self._mapped_files:  # the pickle reads every mapped row: not from a truncated file
                mapped.check()
            state = dict(self.__dict__)
            state["_segments"] = list(self._segments)
            state["_ids"] = None if self._ids is None else list(self._ids)
            state["_mapped_files"] = []  # open file descriptors belong to this process and this object
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # Unpickled (or deep-copied) vectors are in memory, no longer views of a file.
        self._mapped = False

    def _manifest(self, files: dict[str, dict]) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "metric": self.metric.name,
                "dim": self.dim, "dtype": self.dtype, "count": self._count, "kind": self.kind,
                "params": self._ann.params() if self._ann is not None else self.params,
                "files": files}

    @_reader
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the index to the directory ``path``: ``manifest.json`` (format version, metric, dim,
        dtype, count, kind, params, sha256 and size of every file) plus ``vectors.npy`` / ``ids.npy``
        (or the approximate index's own files).

        Atomic: everything is written into a staging folder beside ``path`` and swapped into place
        in one step, so ``path`` is at every instant the old index or the new one, and what a killed
        save leaves behind is removed by the next save or load.  ``overwrite=True`` replaces only a
        saved index (a folder whose manifest says so and that holds nothing else); any other
        folder or file at ``path`` raises ``FileExistsError``.  Write failures (a full disk) are
        ``OSError``s naming the file.  See docs/design/durability.md.
        """
        path = Path(path)
        if self._count == 0:
            raise ValueError("the index is empty; add vectors before saving")
        with _persist.staging(path, KIND, overwrite=overwrite) as stage:
            files = self._write_data(stage)
            _persist.write_json(stage / MANIFEST, self._manifest(files))
        return path

    def _write_data(self, directory: Path) -> dict[str, dict]:
        """Write the data files into ``directory``; {name: {"bytes", "sha256"}}."""
        files: dict[str, dict] = {}
        if self.kind == "flat":
            def rows():  # segment by segment with plain writes: saving never needs the corpus in RAM
                for _, block in self._blocks(_IO_ROWS):
                    b = block.cpu()
                    yield (b.view(torch.uint16) if self.dtype == "bfloat16" else b).numpy()

            files[_VECTORS] = _persist.write_npy(directory / _VECTORS, rows(), _NPY_DTYPE[self.dtype],
                                                 (self._count, self.dim))
        else:
            for name in self._ann.save(str(directory)):
                _persist.check_name(name)
                files[name] = _persist.file_record(directory / name)
        if self._ids is not None:
            files[_IDS] = _persist.save_npy(directory / _IDS, np.concatenate(self._ids))
        return files

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = False, device: str | torch.device = "cpu",
             verify: bool = True) -> "Index":
        """Open an index written by :meth:`save`.

        The manifest is checked against its schema, every file it names must lie inside ``path``
        (no ``..``, absolute paths or symlinks) and the folder must hold no file it does not list;
        every file's size is checked, and its sha256 when ``verify`` (one sequential read), on the
        descriptor that is then read or mapped.  Vectors are checked for the metric's domain (no
        NaN / inf; for ``mmap`` only when ``verify``) and ids for duplicates.  Anything wrong
        raises ``ValueError`` naming the file.  ``mmap=True`` leaves exact vectors on disk
        (memory-mapped, read-only), for corpora larger than memory: search them with
        ``memory_budget``; a mapped file truncated from outside makes the next search raise
        ``ValueError`` instead of crashing.
        """
        path = Path(path)
        _persist.recover(path)
        meta = _persist.read_manifest(path, KIND)
        _persist.check_listing(path, meta["files"], "index")
        count, dim, dtype = meta["count"], meta["dim"], meta["dtype"]
        index = cls(meta["metric"], dim=dim, dtype=dtype, device=device, kind=meta["kind"])
        if index.kind == "flat" and _VECTORS not in meta["files"]:
            raise ValueError(f"{path / MANIFEST} lists no {_VECTORS!r}; the index is corrupted (re-save it)")
        fds: dict[str, int] = {}
        try:
            for name, rec in meta["files"].items():
                fds[name] = _persist.open_verified(_persist.inside(path, name), rec, verify=verify, what="index")
            if index.kind == "flat":
                arr, mapped = _persist.load_npy(fds.pop(_VECTORS), path / _VECTORS, mmap_mode=mmap)
                if arr.shape != (count, dim) or arr.dtype != _NPY_DTYPE[dtype]:
                    raise ValueError(f"index file {_VECTORS!r} in {path} holds {arr.shape} {arr.dtype}, the "
                                     f"manifest says ({count}, {dim}) {dtype}; re-save the index")
                with warnings.catch_warnings():  # memory-mapped arrays are read-only; tlfast never writes them
                    warnings.simplefilter("ignore", UserWarning)
                    t = torch.from_numpy(arr)
                if dtype == "bfloat16":
                    t = t.view(torch.bfloat16)
                if verify or not mmap:
                    for lo in range(0, count, _IO_ROWS):
                        check_domain(t[lo:lo + _IO_ROWS], f"index file {path / _VECTORS}", index.metric)
                index._segments = [t if (mmap or index.device.type == "cpu") else t.to(index.device)]
                index._mapped = mmap
                index._mapped_files = [mapped] if mapped is not None else []
            else:
                # ``params`` is the approximate index's own params() from save time, as load_index expects.
                index.params = dict(meta["params"])
                index._ann = index._ann_module().load_index(index.kind, str(path), index.params)
            if _IDS in fds:
                ids, _ = _persist.load_npy(fds.pop(_IDS), path / _IDS, mmap_mode=False)
                index._ids = [_check_loaded_ids(ids, count, path / _IDS)]
        finally:
            for fd in fds.values():
                os.close(fd)
        index._count = count
        return index


def _ready(item, compute: torch.cuda.Stream) -> tuple[int, torch.Tensor]:
    pos, blk, done = item
    if done is not None:
        compute.wait_event(done)
        blk.record_stream(compute)  # the allocator must not reuse the block before compute ends
    return pos, blk
