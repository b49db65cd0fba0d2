"""Approximate nearest-neighbour indexes behind ``tlfast.Index(metric, kind=...)``.

``make_index(kind, metric, dim, **params)`` returns an index object; ``tlfast.Index`` owns ids,
the manifest and checksums, and talks to these objects through one small interface:

    obj.train(x)                 # optional; otherwise the first add() large enough trains it
    obj.is_trained
    obj.add(x)                   # rows get positions len(obj), len(obj) + 1, ...
    obj.search(q, k, **search_params) -> (values float32 (nq, k), positions int64 (nq, k))
    len(obj), obj.params() -> JSON-able dict: metric, dim, count and the build parameters
    obj.save(directory) -> [file names written into directory]
    load_index(kind, directory, meta=obj.params())   # as saved; count is checked against the files

Kinds and metrics:

* ``ivf`` / ``ivfpq`` / ``hnsw`` for ``ip``, ``l2``, ``cosine``: faiss's IndexIVFFlat,
  IndexIVFPQ and IndexHNSWFlat (cosine = inner product on L2-normalised rows).  ivfpq values are
  faiss's product-quantised distance estimates, not exact distances.
* ``ivf`` with ``engine="tlfast"``: :class:`FusedIVF`, an IVF whose list scans are tlfast's fused
  kNN kernels, one GEMM-shaped call per list for all the queries probing it (faiss scans lists
  query by query).  The only engine for ``kl`` and ``js``, where it works in probability space.
  Why not faiss for kl: KL(q‖c) = Σq·log q − ⟨q, log c⟩ makes KL search an inner-product search over
  log c, but an inner-product IVF over log-corpus vectors clusters badly (recall@10 0.40 at
  nprobe 8 of 256 lists on clustered Dirichlet data; the MIPS→L2 augmentation < 0.02; DESIGN.md,
  "Approximate search notes").  KL is the Bregman divergence of negative entropy, and for any
  Bregman divergence the arithmetic mean minimises Σᵢ D(xᵢ‖μ) — so k-means with KL(x‖μ)
  assignments and mean centroids is the exact analogue of Lloyd's algorithm; lists are probed by
  KL(q‖μ) and scanned with exact KL.  Both steps run on tlfast's fused KL kNN kernels.  js uses
  the same structure (JS is not Bregman, so mean centroids are a heuristic there; recall is
  measured in benchmarks/results/ann-cpu.md).

Concurrency: these objects are not locked themselves; ``tlfast.Index`` serialises ``add`` /
``train`` against searches (docs/design/concurrency.md) and lets searches run concurrently, so
everything a search touches is read-only, except FusedIVF's lazily built list layout, which is
built under a mutex.  Copies and pickles are independent, complete indexes (faiss indexes
travel as ``faiss.serialize_index`` bytes).

Search results obey tlfast's contract within what the index returns: best first, ties toward the
smaller position, and rows padded with position -1 and value +inf (-inf for larger-is-better
metrics) where the probed lists hold fewer than k rows.  Before an index is trained its rows are
searched exactly.
"""
from __future__ import annotations

import copy
import json
import math
import os
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _persist
from .backends import info as _backend_info, resolve as _resolve_backend
from ._native import _C
from ._rwlock import Mutex
from ._validate import as_tensor, check_domain, check_matrix
from .metrics import Metric, get_metric

__all__ = ["KINDS", "make_index", "load_index", "FaissIndex", "FusedIVF"]

KINDS = ("ivf", "ivfpq", "hnsw")
# Parameters each kind takes at construction (None = chosen from the data at train time).
_BUILD_PARAMS = {
    "ivf": ("nlist", "nprobe", "engine"),
    "ivfpq": ("nlist", "nprobe", "m", "nbits"),
    "hnsw": ("M", "ef_search", "ef_construction"),
}
_SEARCH_PARAMS = {"ivf": ("nprobe",), "ivfpq": ("nprobe",), "hnsw": ("ef_search",)}
# Lloyd's k-means wants >= 39 training rows per centroid (faiss warns below that).
_ROWS_PER_CENTROID = 39
# Rows an index without an explicit nlist waits for before add() trains it by itself.
_MIN_AUTO_TRAIN = 1024
# Default probes, from benchmarks/results/ann-cpu.md (500k rows): on clustered vectors nprobe 16
# gives recall@10 ~0.96-0.97 with faiss's 4·√n lists and with FusedIVF's √n lists; on clustered
# Dirichlet data FusedIVF reaches ~0.98 at nprobe 4.
_DEFAULT_NPROBE = {"faiss": 16, "tlfast": 16, "simplex": 4}
_FILE = {"faiss": "faiss.index", "pending": "ann_pending.npy", "centroids": "ann_centroids.npy",
         "vectors": "ann_vectors.npy", "lists": "ann_lists.npy"}


def default_nlist(n: int, per_sqrt_n: float = 4.0) -> int:
    """``per_sqrt_n``·√n lists (4: faiss's guideline), capped so that every list has 39 training rows."""
    return max(1, min(int(round(per_sqrt_n * math.sqrt(n))), n // _ROWS_PER_CENTROID))


def _positive_int(value: Any, name: str, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _exact_backend():
    """tlfast's fused CPU kernels (the reference backend where the extension is missing)."""
    return _resolve_backend("cpu" if _backend_info("cpu").available else "reference", torch.device("cpu"))


def _save_npy(directory: str, name: str, array: np.ndarray) -> str:
    """``array`` as ``directory/name`` (the staging folder of ``Index.save``, committed as a whole)."""
    _persist.save_npy(Path(directory) / name, array)
    return name


def _load_npy(directory: str, name: str, dtype, shape: tuple) -> np.ndarray:
    """np.load with the shape and dtype the metadata promises (None = any size on that axis)."""
    path = os.path.join(directory, name)
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"index file {path} is unreadable or corrupted ({exc}); rebuild the index") from exc
    if a.dtype != dtype or a.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, a.shape)):
        raise ValueError(f"index file {path} holds {a.dtype} {a.shape}, expected {np.dtype(dtype)} "
                         f"{tuple('*' if s is None else s for s in shape)}; the file does not belong "
                         f"to this index or is corrupted")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"index file {path} holds NaN or infinite values; it is corrupted (rebuild the index)")
    return a


def sort_best_first(values: np.ndarray, positions: np.ndarray, larger_is_better: bool):
    """Rows ordered by (padding last, value best-first, position): tlfast's tie rule."""
    pad = positions < 0
    values = np.where(pad, -np.inf if larger_is_better else np.inf, values).astype(np.float32)
    key = -values if larger_is_better else values
    order = np.lexsort((positions, key, pad), axis=1)
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(positions, order, axis=1)


class _ApproximateIndex(ABC):
    """Shared behaviour: input checks, buffering rows until trained, exact search until then."""

    kind: str

    def __init__(self, metric: Metric, dim: int):
        self.metric = metric
        self.dim = dim
        self._pending: list[np.ndarray] = []  # rows added before training, in order

    # -- subclass hooks -------------------------------------------------------------------------
    @abstractmethod
    def _train(self, x: np.ndarray) -> None: ...
    @abstractmethod
    def _add(self, x: np.ndarray) -> None: ...
    @abstractmethod
    def _search(self, q: np.ndarray, k: int, **sp) -> tuple[np.ndarray, np.ndarray]: ...
    @abstractmethod
    def _ntotal(self) -> int: ...
    @abstractmethod
    def _train_size(self) -> int: ...  # rows add() waits for (39 per centroid)
    @abstractmethod
    def _min_train_rows(self) -> int: ...  # fewer cannot be clustered at all
    @property
    @abstractmethod
    def is_trained(self) -> bool: ...

    # -- interface ------------------------------------------------------------------------------
    def rows(self, x: Any, name: str) -> np.ndarray:
        """Validated float32 (n, dim) rows in the metric's domain (DESIGN.md error contract)."""
        t, _ = as_tensor(x, name)
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}; approximate indexes run on CPU: pass {name}.cpu()")
        check_matrix(t, name)
        if t.shape[1] != self.dim:
            raise ValueError(f"dimension mismatch: the index has dim {self.dim}, {name} has dim {t.shape[1]}")
        check_domain(t, name, self.metric)
        return np.ascontiguousarray(t.to(torch.float32).numpy())

    def __len__(self) -> int:
        return self._ntotal() + sum(len(p) for p in self._pending)

    def train(self, x: Any) -> None:
        """Learn the index's structure (lists, codebooks) from a representative sample ``x``."""
        if self.is_trained:
            raise ValueError(f"this {self.kind} index is already trained; build a new index to retrain")
        x = self.rows(x, "x")
        if len(x) < self._min_train_rows():
            raise ValueError(f"x has {len(x)} rows; training this {self.kind} index needs at least "
                             f"{self._min_train_rows()} (one per centroid; {self._train_size()} for good "
                             f"centroids): lower nlist / nbits or pass more rows")
        self._train(x)
        self._flush()

    def add(self, x: Any) -> None:
        """Append rows; an untrained index keeps them and trains once it holds enough."""
        # Kept rows are our own copy: the caller may reuse its buffer.
        x = np.array(self.rows(x, "x"), copy=True)
        if self.is_trained:
            self._add(x)
            return
        self._pending.append(x)
        if sum(len(p) for p in self._pending) >= self._train_size():
            self._train(np.concatenate(self._pending))
            self._flush()

    def _flush(self) -> None:
        for p in self._pending:
            self._add(p)
        self._pending = []

    def search(self, q: Any, k: int, **search_params) -> tuple[np.ndarray, np.ndarray]:
        """(values float32 (nq, k), positions int64 (nq, k)), best first, -1 padded."""
        allowed = _SEARCH_PARAMS[self.kind]
        for name in search_params:
            if name not in allowed:
                raise ValueError(f"unknown search parameter {name!r} for kind={self.kind!r}; it takes "
                                 f"{', '.join(allowed)}")
        sp = {name: _positive_int(v, name) for name, v in search_params.items()}
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got k={k}")
        if len(self) == 0:
            raise ValueError("the index is empty; add rows before searching")
        q = self.rows(q, "queries")
        if self.is_trained:
            values, positions = self._search(q, int(k), **{n: v for n, v in sp.items() if v is not None})
        else:
            values, positions = self._search_exact(q, int(k))
        return sort_best_first(values, positions, self.metric.larger_is_better)

    def _search_exact(self, q: np.ndarray, k: int):
        rows = np.concatenate(self._pending)
        kk = min(k, len(rows))
        v, i = _exact_backend().knn(torch.from_numpy(q), torch.from_numpy(rows), kk, self.metric, False)
        values = np.full((len(q), k), np.nan, dtype=np.float32)
        positions = np.full((len(q), k), -1, dtype=np.int64)
        values[:, :kk], positions[:, :kk] = v.numpy(), i.numpy()
        return values, positions

    def params(self) -> dict:
        """What load_index needs: metric, dim, count and the build parameters (nlist filled in once
        training chose it)."""
        return {"metric": self.metric.name, "dim": self.dim, "count": len(self), **self._build_params()}

    @abstractmethod
    def _build_params(self) -> dict: ...

    def save(self, directory: str) -> list[str]:
        """Write the index's files into ``directory`` (a staging folder that ``Index.save`` commits whole)."""
        files = self._save(directory)
        if self._pending:
            files.append(_save_npy(directory, _FILE["pending"], np.concatenate(self._pending)))
        return files

    @abstractmethod
    def _save(self, directory: str) -> list[str]: ...

    @abstractmethod
    def _load(self, directory: str) -> None: ...

    def _load_pending(self, directory: str) -> None:
        if os.path.exists(os.path.join(directory, _FILE["pending"])):
            self._pending = [_load_npy(directory, _FILE["pending"], np.float32, (None, self.dim))]


class FaissIndex(_ApproximateIndex):
    """faiss IndexIVFFlat / IndexIVFPQ / IndexHNSWFlat for ip, l2 and cosine (normalised ip)."""

    def __init__(self, kind: str, metric: Metric, dim: int, *, nlist=None, nprobe=None, m=None,
                 nbits=None, M=None, ef_search=None, ef_construction=None, engine: str = "faiss"):
        from .backends.faiss import _faiss

        faiss = _faiss()  # optional extra; ImportError saying how to install it
        super().__init__(metric, dim)
        self.kind = kind
        self._faiss = faiss
        self._metric_code = faiss.METRIC_L2 if metric.name == "l2" else faiss.METRIC_INNER_PRODUCT
        self.nlist = _positive_int(nlist, "nlist")
        self.nprobe = _positive_int(nprobe, "nprobe")
        self.nbits = _positive_int(nbits, "nbits")
        self.m = _positive_int(m, "m")
        if kind == "ivfpq":
            self.nbits = self.nbits or 8
            if self.nbits > 16:
                raise ValueError(f"nbits must be <= 16 (codebooks of 2**nbits centroids), got {self.nbits}")
            # m sub-quantisers of d/m >= 8 dims each (16 bytes per 128-d row at 8 bits): finer
            # splits train far slower in faiss-cpu here (m=32 on 128-d: 58 s vs 6.5 s for 20k rows).
            self.m = self.m or max(s for s in range(1, max(1, dim // 8) + 1) if dim % s == 0)
            if dim % self.m:
                raise ValueError(f"m must divide the dimension {dim} (ivfpq splits rows into m equal "
                                 f"sub-vectors), got m={self.m}")
        self.M = _positive_int(M, "M") or 32
        self.ef_search = _positive_int(ef_search, "ef_search") or 64
        self.ef_construction = _positive_int(ef_construction, "ef_construction") or 40
        self.index = None
        if kind == "hnsw":  # a graph needs no training
            self.index = faiss.IndexHNSWFlat(dim, self.M, self._metric_code)
            self.index.hnsw.efConstruction = self.ef_construction

    @property
    def is_trained(self) -> bool:
        return self.index is not None and self.index.is_trained

    def _ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _train_size(self) -> int:
        lists = self.nlist * _ROWS_PER_CENTROID if self.nlist else _MIN_AUTO_TRAIN
        codes = (1 << self.nbits) * _ROWS_PER_CENTROID if self.kind == "ivfpq" else 0
        return max(lists, codes)

    def _min_train_rows(self) -> int:
        return max(self.nlist or 1, (1 << self.nbits) if self.kind == "ivfpq" else 1)

    # faiss objects and the faiss module do not pickle: the index travels as serialize_index bytes.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_faiss"]
        if self.index is not None:
            state["index"] = self._faiss.serialize_index(self.index)
        return state

    def __setstate__(self, state: dict) -> None:
        from .backends.faiss import _faiss

        self.__dict__.update(state)
        self._faiss = _faiss()
        if self.index is not None:
            self.index = self._faiss.deserialize_index(np.ascontiguousarray(self.index, dtype=np.uint8))

    def __deepcopy__(self, memo) -> "FaissIndex":
        new = object.__new__(type(self))
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        if self.metric.name == "cosine":
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _train(self, x: np.ndarray) -> None:
        faiss = self._faiss
        self.nlist = self.nlist or default_nlist(len(x))
        quantizer = faiss.IndexFlat(self.dim, self._metric_code)
        if self.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, self._metric_code)
        else:
            index = faiss.IndexIVFPQ(quantizer, self.dim, self.nlist, self.m, self.nbits, self._metric_code)
        # k-means on at most 64 rows per list (faiss's default is 256): same recall on the
        # benchmark data at a quarter of the training time (FusedIVF samples the same way).
        index.cp.max_points_per_centroid = FusedIVF.sample_per_centroid
        index.train(self._prepare(x))
        index.own_fields = True  # the IVF index frees its quantizer
        quantizer.this.disown()
        self.index = index

    def _add(self, x: np.ndarray) -> None:
        self.index.add(self._prepare(x))

    def _search(self, q: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None):
        faiss = self._faiss
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(ef_search or self.ef_search, k))
        else:
            nprobe = min(nprobe or self.nprobe or _DEFAULT_NPROBE["faiss"], self.nlist)
            params = faiss.SearchParametersIVF(nprobe=nprobe)
        values, positions = self.index.search(self._prepare(q), k, params=params)
        return values, positions

    def _build_params(self) -> dict:
        p = {"ivf": {"nlist": self.nlist, "nprobe": self.nprobe, "engine": "faiss"},
             "ivfpq": {"nlist": self.nlist, "nprobe": self.nprobe, "m": self.m, "nbits": self.nbits},
             "hnsw": {"M": self.M, "ef_search": self.ef_search, "ef_construction": self.ef_construction}}
        return p[self.kind]

    def _save(self, directory: str) -> list[str]:
        if self.index is None:
            return []
        # serialize_index + a plain write: a failed write is an OSError naming the file, not a C++ error
        data = self._faiss.serialize_index(self.index)
        _persist.write_bytes(Path(directory) / _FILE["faiss"], data)
        return [_FILE["faiss"]]

    def _load(self, directory: str) -> None:
        path = os.path.join(directory, _FILE["faiss"])
        if os.path.exists(path):
            try:
                index = self._faiss.read_index(path)
            except RuntimeError as exc:
                raise ValueError(f"index file {path} is unreadable or corrupted ({exc}); rebuild the "
                                 f"index") from exc
            expected = {"ivf": self._faiss.IndexIVFFlat, "ivfpq": self._faiss.IndexIVFPQ,
                        "hnsw": self._faiss.IndexHNSWFlat}[self.kind]
            if not isinstance(index, expected) or index.d != self.dim or index.metric_type != self._metric_code:
                raise ValueError(f"index file {path} holds a {type(index).__name__} (dim {index.d}, "
                                 f"{index.ntotal} rows) that does not match this index's metadata "
                                 f"(kind={self.kind!r}, dim {self.dim}); it is corrupted or misplaced")
            self.index = index
        self._load_pending(directory)


class FusedIVF(_ApproximateIndex):
    """Inverted lists searched with tlfast's fused kNN kernels: ``kind="ivf"`` for kl and js (in
    probability space, see the module docstring), and ``engine="tlfast"`` for ip / l2 / cosine.

    train: k-means with assignments by D(x‖μ) (tlfast's fused kNN against the centroids, k = 1)
    and mean centroids, projected back onto the metric's domain (``_project``).  search: probe the
    ``nprobe`` best lists by D(q‖μ), then exact D over their rows — one fused kNN call per probed
    list with all the queries probing it (GEMM-shaped, unlike faiss's per-query list scans),
    merged per query.
    """

    kind = "ivf"
    kmeans_iterations = 10
    # √n lists, not faiss's 4·√n: the fine step scans each list with one GEMM-shaped kernel call for
    # all the queries probing it, so long lists cost little, while the coarse step costs nlist per
    # query and every list a Python-level call.  On 500k x 32 Dirichlet data: 707 lists, nprobe 4 ->
    # recall@10 0.978 at 13x exact (benchmarks/results/ann-cpu.md); 2828 lists needed nprobe 16 for
    # 0.996 at ~4x (an earlier run).
    lists_per_sqrt_n = 1.0
    # Training sample per centroid: enough for stable means, bounded cost (faiss uses 256).
    sample_per_centroid = 64

    def __init__(self, metric: Metric, dim: int, *, nlist=None, nprobe=None, seed: int = 0, engine: str = "tlfast"):
        super().__init__(metric, dim)
        self.nlist = _positive_int(nlist, "nlist")
        self.nprobe = _positive_int(nprobe, "nprobe")
        self.seed = seed
        self.centroids: np.ndarray | None = None
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []  # (rows, list ids) per add
        self._csr: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # rows by list, positions, offsets
        self._layout = Mutex()  # concurrent searches build _csr / merge _chunks once, not racing

    @property
    def is_trained(self) -> bool:
        return self.centroids is not None

    def _ntotal(self) -> int:
        return sum(len(r) for r, _ in self._chunks)

    def _train_size(self) -> int:
        return self.nlist * _ROWS_PER_CENTROID if self.nlist else _MIN_AUTO_TRAIN

    def _min_train_rows(self) -> int:
        return self.nlist or 1

    def _nearest(self, x: np.ndarray, centroids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        v, i = _exact_backend().knn(torch.from_numpy(x), torch.from_numpy(centroids), k, self.metric, False)
        return v.numpy(), i.numpy()

    def _list_knn(self, q: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact kNN of a few queries in one list: the fused kernel on one thread (waking a thread
        pool costs more than the whole scan of a list of ~n / nlist rows)."""
        if _C is not None:
            return _C.knn_cpu(q, rows, k, self.metric.code, False, 1)
        return self._nearest(q, rows, k)

    def _project(self, means: np.ndarray) -> np.ndarray:
        """Centroids back onto the metric's domain: the simplex for kl / js, the unit sphere for
        cosine (spherical k-means); ip and l2 keep the plain mean."""
        if self.metric.domain == "simplex":
            return means / means.sum(1, keepdims=True)
        if self.metric.name == "cosine":
            return means / np.linalg.norm(means, axis=1, keepdims=True)
        return means

    def _train(self, x: np.ndarray) -> None:
        rng = np.random.default_rng(self.seed)
        nlist = self.nlist = self.nlist or default_nlist(len(x), self.lists_per_sqrt_n)
        if len(x) > self.sample_per_centroid * nlist:
            x = x[rng.choice(len(x), self.sample_per_centroid * nlist, replace=False)]
        centroids = x[rng.choice(len(x), nlist, replace=False)].copy()
        xt = torch.from_numpy(x)
        for _ in range(self.kmeans_iterations):
            assign = torch.from_numpy(self._nearest(x, centroids, 1)[1][:, 0])
            counts = torch.bincount(assign, minlength=nlist)
            sums = torch.zeros(nlist, self.dim, dtype=torch.float64).index_add_(0, assign, xt.double())
            empty = (counts == 0).numpy()
            means = (sums / counts.clamp_min(1)[:, None].double()).numpy()
            if self.metric.name == "cosine":  # a mean of opposite directions has no direction
                empty |= np.linalg.norm(means, axis=1) < 1e-12
            # An empty list restarts at a random training row (faiss splits a big cluster instead;
            # with >= 39 rows per list, empties are rare and this is as good).
            means[empty] = x[rng.choice(len(x), int(empty.sum()), replace=False)]
            centroids = self._project(means).astype(np.float32)
        self.centroids = np.ascontiguousarray(centroids)

    def _add(self, x: np.ndarray) -> None:
        self._chunks.append((x, self._nearest(x, self.centroids, 1)[1][:, 0]))
        self._csr = None

    def _rows_and_lists(self) -> tuple[np.ndarray, np.ndarray]:
        """All rows in position order and the list of each, merged into one chunk."""
        with self._layout:
            if len(self._chunks) > 1:
                self._chunks = [(np.concatenate([r for r, _ in self._chunks]),
                                 np.concatenate([a for _, a in self._chunks]))]
            return self._chunks[0]

    def _lists(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows grouped by list, their positions, list offsets), rebuilt after adds."""
        csr = self._csr
        if csr is None:
            rows, lists = self._rows_and_lists()
            with self._layout:
                if self._csr is None:
                    order = np.argsort(lists, kind="stable")
                    offsets = np.zeros(len(self.centroids) + 1, dtype=np.int64)
                    np.cumsum(np.bincount(lists, minlength=len(self.centroids)), out=offsets[1:])
                    self._csr = (np.ascontiguousarray(rows[order]), order.astype(np.int64), offsets)
                csr = self._csr
        return csr

    def _search(self, q: np.ndarray, k: int, nprobe: int | None = None):
        rows, positions, offsets = self._lists()
        nprobe = min(nprobe or self.nprobe or _DEFAULT_NPROBE["simplex" if self.metric.domain == "simplex" else "tlfast"], len(self.centroids))
        probes = self._nearest(q, self.centroids, nprobe)[1]  # (nq, nprobe) lists, best first
        # Candidates per (query, probe slot): the k best rows of that list, -1 padded.
        cand_v = np.full((len(q), nprobe, k), np.nan, dtype=np.float32)
        cand_p = np.full((len(q), nprobe, k), -1, dtype=np.int64)
        flat = probes.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(len(self.centroids) + 1))
        active = np.flatnonzero((np.diff(bounds) > 0) & (np.diff(offsets) > 0))

        def scan(lists: np.ndarray) -> None:
            for lst in lists:
                lo, hi = offsets[lst], offsets[lst + 1]
                pairs = order[bounds[lst]:bounds[lst + 1]]  # flat (query, slot) indices probing lst
                qi, slot = np.divmod(pairs, nprobe)
                kk = min(k, hi - lo)
                v, i = self._list_knn(q[qi], rows[lo:hi], kk)
                cand_v[qi, slot, :kk] = v  # each (query, slot) cell belongs to one list: no races
                cand_p[qi, slot, :kk] = positions[lo + i]

        # Lists are small (n / nlist rows, a few queries each): one kernel thread per list, and the
        # lists spread over a thread pool (the kernel releases the GIL).
        workers = max(1, min(torch.get_num_threads(), len(active) // 64))
        if workers == 1:
            scan(active)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(scan, np.array_split(active, workers)))
        cand_v = cand_v.reshape(len(q), -1)
        cand_p = cand_p.reshape(len(q), -1)
        values, pos = sort_best_first(cand_v, cand_p, self.metric.larger_is_better)
        return values[:, :k], pos[:, :k]

    def _build_params(self) -> dict:
        return {"nlist": self.nlist, "nprobe": self.nprobe, "seed": self.seed, "engine": "tlfast"}

    def _save(self, directory: str) -> list[str]:
        if self.centroids is None:
            return []
        files = [_save_npy(directory, _FILE["centroids"], self.centroids)]
        if self._chunks:
            data, lists = self._rows_and_lists()
            files.append(_save_npy(directory, _FILE["vectors"], data))
            files.append(_save_npy(directory, _FILE["lists"], lists.astype(np.int64)))
        return files

    def _load(self, directory: str) -> None:
        if os.path.exists(os.path.join(directory, _FILE["centroids"])):
            self.centroids = _load_npy(directory, _FILE["centroids"], np.float32, (self.nlist, self.dim))
            lists_file = os.path.join(directory, _FILE["lists"])
            if os.path.exists(lists_file):
                data = _load_npy(directory, _FILE["vectors"], np.float32, (None, self.dim))
                lists = _load_npy(directory, _FILE["lists"], np.int64, (len(data),))
                if len(lists) and (lists.min() < 0 or lists.max() >= self.nlist):
                    raise ValueError(f"index file {lists_file} names lists outside [0, {self.nlist}); "
                                     f"it is corrupted")
                self._chunks = [(data, lists)]
        self._load_pending(directory)


def _check_kind_metric(kind: Any, metric: str | Metric) -> Metric:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)} for an approximate index (or 'flat' "
                         f"for exact search), got {kind!r}")
    m = get_metric(metric)
    if m.domain == "simplex" and kind != "ivf":
        raise ValueError(f"metric {m.name!r} needs kind='ivf' (tlfast's probability-space IVF); "
                         f"{kind!r} runs on faiss, which has no {m.name} index")
    return m


def make_index(kind: str, metric: str | Metric, dim: int, **params) -> _ApproximateIndex:
    """A new, empty approximate index.  ``params`` with value None take defaults from the data.

    ``kind="ivf"`` takes ``engine``: "faiss" (IndexIVFFlat; the default for ip / l2 / cosine) or
    "tlfast" (:class:`FusedIVF`; the only engine for kl / js).
    """
    m = _check_kind_metric(kind, metric)
    _positive_int(dim, "dim", allow_none=False)
    engine = params.get("engine")
    if kind == "ivf":
        engine = params["engine"] = engine or ("tlfast" if m.domain == "simplex" else "faiss")
        if engine not in ("faiss", "tlfast"):
            raise ValueError(f"engine must be 'faiss' or 'tlfast', got {engine!r}")
        if engine == "faiss" and m.domain == "simplex":
            raise ValueError(f"faiss has no {m.name} index; use engine='tlfast' (the default for {m.name})")
    allowed = _BUILD_PARAMS[kind] + (("seed",) if engine == "tlfast" else ())
    unknown = [p for p in params if p not in allowed]
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for kind={kind!r}; it takes {', '.join(allowed)}")
    if engine == "tlfast":
        return FusedIVF(m, int(dim), **params)
    return FaissIndex(kind, m, int(dim), **params)


def load_index(kind: str, directory: str, meta: dict) -> _ApproximateIndex:
    """The index that ``save(directory)`` wrote.

    ``meta`` is ``obj.params()`` from save time (tlfast.Index keeps it in its manifest); its count
    is checked against the files.
    """
    try:
        build = {p: meta[p] for p in (*_BUILD_PARAMS[kind], "seed") if p in meta}
        obj = make_index(kind, meta["metric"], int(meta["dim"]), **build)
        count = int(meta["count"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"index metadata {json.dumps(meta, default=str)[:200]} is incomplete or "
                         f"malformed ({exc!r}); rebuild the index") from exc
    obj._load(directory)
    if len(obj) != count:
        raise ValueError(f"index files in {directory} hold {len(obj)} rows but the metadata says "
                         f"{count}; they are corrupted or misplaced")
    return obj
