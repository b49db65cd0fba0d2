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
from dataclasses import dataclass
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

__all__ = ["KINDS", "make_index", "load_index", "tune", "TuneReport", "FaissIndex", "FusedIVF"]

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


# The CPU kernel's kl conventions (csrc/cpu/knn.h): log 0 = -2^126; values above 2^24 are +inf.
_KL_ZERO_LOG = np.float32(2.0 ** 126)
_KL_INF_THRESHOLD = 2.0 ** 24


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

    # -- recall tuning (see ``tune``) ---------------------------------------------------------------
    @property
    def search_param(self) -> str:
        """The one search-time knob trading speed for recall: nprobe (IVF) or ef_search (HNSW)."""
        return _SEARCH_PARAMS[self.kind][0]

    def stored_rows(self) -> np.ndarray:
        """All rows in position order, as the index holds them (cosine: L2-normalised for faiss),
        for exact ground truth.  Kinds that keep only compressed codes raise ValueError."""
        raise ValueError(f"kind={self.kind!r} keeps compressed codes, not the vectors: recall against "
                         f"exact search cannot be measured from the index alone; tune kind='ivf' or 'hnsw'")

    def search_param_ladder(self, k: int) -> list[int]:
        """Candidate values of ``search_param``, cheapest first, ~20-25% apart (recall rises and
        speed falls along the ladder)."""
        if self.kind == "hnsw":
            # faiss searches with max(ef_search, k): values below k are the same setting as k.
            # Beyond the row count the beam holds the whole graph, so more buys nothing.
            low = k
            top = max(k, min(4096, self._ntotal()))
        else:
            top, low = self.nlist or 1, 1
        ladder, v = [], low
        while v < top:
            ladder.append(v)
            v = max(v + 1, int(round(v * 1.25)))
        return ladder + [top]

    def set_search_param(self, value: int) -> None:
        setattr(self, self.search_param, _positive_int(value, self.search_param, allow_none=False))


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

    def stored_rows(self) -> np.ndarray:
        if self.kind == "ivfpq" or not self.is_trained:
            return super().stored_rows() if self.kind == "ivfpq" else np.concatenate(self._pending)
        faiss, n = self._faiss, self._ntotal()
        if self.kind == "hnsw":  # IndexHNSWFlat keeps the rows in a flat storage index, in order
            codes = faiss.vector_to_array(faiss.downcast_index(self.index.storage).codes)
            return codes.view(np.float32).reshape(n, self.dim)
        # IndexIVFFlat: each inverted list holds raw float rows and their ids (= positions).
        invlists, rows = self.index.invlists, np.empty((n, self.dim), dtype=np.float32)
        for lst in range(self.nlist):
            size = invlists.list_size(lst)
            if size:
                ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size)
                codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * self.dim * 4)
                rows[np.array(ids, dtype=np.int64)] = np.frombuffer(codes, dtype=np.float32).reshape(size, self.dim)
        return rows

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
    # Lists per √n, by input domain.  ip / l2 / cosine: faiss's 4·√n (on 500k x 128 clustered
    # cosine, 2828 lists gave recall@10 0.952 at 12.4x exact vs 0.939 at 10.8x with 707;
    # benchmarks/results/ann-cpu.md).  kl / js: √n — each probed list costs one kernel call with
    # a fixed cost of tens of µs, and 32-d probability rows scan so cheaply that the call count
    # dominates (500k x 32 Dirichlet: 707 lists, nprobe 4 -> recall@10 0.978 at 13x; 2828 lists
    # needed nprobe 16 for 0.996 at ~4x).
    lists_per_sqrt_n = {"any": 4.0, "nonzero": 4.0, "simplex": 1.0}
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
        """Exact kNN of a few queries in one list (``rows`` as ``_lists`` stores them, in the
        metric ``_scan_metric``): the fused kernel on one thread (waking a thread pool costs more
        than the whole scan of a list of ~n / nlist rows)."""
        metric = self._scan_metric()
        if _C is not None:
            return _C.knn_cpu(q, rows, k, metric.code, False, 1)
        v, i = _exact_backend().knn(torch.from_numpy(q), torch.from_numpy(rows), k, metric, False)
        return v.numpy(), i.numpy()

    def _scan_metric(self) -> Metric:
        """kl and cosine lists are scanned as inner products over precomputed rows (log c; unit
        rows), so that no kernel call recomputes a log or a norm per list row: a list is scanned
        once for every ~nq·nprobe/nlist queries probing it, and with ~√n rows per list those
        per-row terms were half of the scan's cost."""
        return get_metric("ip") if self.metric.name in ("kl", "cosine") else self.metric

    def _scan_rows(self, rows: np.ndarray) -> np.ndarray:
        if self.metric.name == "kl":
            # KL(q‖c) = Σ q log q − ⟨q, log c⟩, with the exact kernel's log 0 = -2^126 (csrc/cpu/knn.h:
            # a term q > 0 against c = 0 adds q·2^126, reported as +inf; q = 0 adds 0 = 0·log 0).
            with np.errstate(divide="ignore"):
                return np.where(rows > 0, np.log(rows), -_KL_ZERO_LOG).astype(np.float32)
        if self.metric.name == "cosine":
            return rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return rows

    def _exact_values(self, q: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The metric's value of each (query, found position): KL with 0·log 0 = 0 and +inf where
        q > 0 = c, as the exact kernels define it (DESIGN.md metric table)."""
        rows = self._rows_and_lists()[0]
        c = rows[np.maximum(positions, 0)]  # (nq, k, d)
        qq = q[:, None, :]
        if self.metric.name == "kl":  # the exact kernel's GEMM form and its +inf rule (csrc/cpu/knn.h)
            with np.errstate(divide="ignore"):
                log_c = np.where(c > 0, np.log(c), -_KL_ZERO_LOG)
            v = (q * np.log(np.where(q > 0, q, 1))).sum(1)[:, None] - (qq * log_c).sum(-1)
            v = np.where(v > _KL_INF_THRESHOLD, np.inf, v)
        else:  # cosine
            v = (qq * c).sum(-1) / (np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(c, axis=-1))
        return np.where(positions < 0, np.nan, v).astype(np.float32)

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
        nlist = self.nlist = self.nlist or default_nlist(len(x), self.lists_per_sqrt_n[self.metric.domain])
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
                    scan = np.ascontiguousarray(self._scan_rows(rows[order]), dtype=np.float32)
                    self._csr = (scan, order.astype(np.int64), offsets)
                csr = self._csr
        return csr

    def _search(self, q: np.ndarray, k: int, nprobe: int | None = None):
        rows, positions, offsets = self._lists()
        nprobe = min(nprobe or self.nprobe or _DEFAULT_NPROBE["simplex" if self.metric.domain == "simplex" else "tlfast"], len(self.centroids))
        probes = self._nearest(q, self.centroids, nprobe)[1]  # (nq, nprobe) lists, best first
        q_scan = np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True)) if self.metric.name == "cosine" else q
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
                v, i = self._list_knn(q_scan[qi], rows[lo:hi], kk)
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
        if self.metric.name == "kl":  # inner products <q, log c>, larger first; then exact KL, smaller first
            values, pos = sort_best_first(cand_v, cand_p, True)
            return sort_best_first(self._exact_values(q, pos[:, :k]), pos[:, :k], False)
        values, pos = sort_best_first(cand_v, cand_p, self.metric.larger_is_better)
        if self.metric.name == "cosine":
            return self._exact_values(q, pos[:, :k]), pos[:, :k]
        return values[:, :k], pos[:, :k]

    def stored_rows(self) -> np.ndarray:
        if not self.is_trained:
            return np.concatenate(self._pending)
        return self._rows_and_lists()[0]

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


@dataclass(frozen=True)
class TuneReport:
    """What :func:`tune` chose and why.

    ``params``: the chosen search parameter, e.g. ``{"nprobe": 12}``.  ``recall``: mean recall@k of
    the tuning queries at that setting, with ``recall_ci`` its Wilson interval at ``confidence``
    (counted per query, see ``tune``); the setting is the cheapest whose lower bound reaches
    ``target_recall``.  ``speedup``: queries/s over tlfast's exact search of the same queries on
    the same rows (medians of ``timing_runs``).  ``curve``: (value, recall, lower bound) of every
    setting tried, cheapest first.
    """

    params: dict
    target_recall: float
    reached: bool
    recall: float
    recall_ci: tuple[float, float]
    confidence: float
    k: int
    n_queries: int
    queries_from: str  # "given", "corpus rows (exclude_self)" or "corpus neighbour steps x_i + x_a - x_b"
    exact_qps: float
    approx_qps: float
    speedup: float
    timing_runs: int
    curve: tuple[tuple[int, float, float], ...]

    def __str__(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params.items())
        state = "reached" if self.reached else "NOT reached (best setting kept)"
        return (f"{p}: recall@{self.k} {self.recall:.4f} ({100 * self.confidence:g}% CI "
                f"{self.recall_ci[0]:.4f}-{self.recall_ci[1]:.4f}, {self.n_queries} queries from "
                f"{self.queries_from}); target {self.target_recall} {state}; {self.speedup:.1f}x exact "
                f"({self.approx_qps:.0f} vs {self.exact_qps:.0f} queries/s)")


def recall_per_query(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|found_i ∩ exact_i| / k per query (positions; -1 padding never matches)."""
    hit = (found[:, :, None] == exact[:, None, :]) & (found[:, :, None] >= 0)
    return hit.any(-1).sum(1) / exact.shape[1]


def _drop_self(positions: np.ndarray, self_pos: np.ndarray, k: int) -> np.ndarray:
    """The k best of k + 1 results once each query's own row is removed (the last one where the
    row itself was not found)."""
    is_self = positions == self_pos[:, None]
    drop = np.where(is_self.any(1), is_self.argmax(1), positions.shape[1] - 1)
    keep = np.ones(positions.shape, dtype=bool)
    keep[np.arange(len(positions)), drop] = False
    return positions[keep].reshape(len(positions), -1)[:, :k]


def _neighbour_step_queries(rows: np.ndarray, self_pos: np.ndarray, neighbours: np.ndarray,
                            rng: np.random.Generator) -> np.ndarray:
    """q_i = x_i + (x_a − x_b) for two distinct neighbours a, b among x_i's nearest rows: points
    near the data but not rows of the index (tune of a graph index, queries=None).

    Why not the rows themselves: a row is a node of the graph, linked to (nearly) its own k nearest
    neighbours by construction, so a greedy search from it reaches the answer through its own
    edges; a new query has no such node.  Why this step: differences of nearby rows lie along the
    data's local directions (on its manifold, not off it as isotropic noise, which shifts every
    squared distance by the same amount and leaves the neighbour ranking — and so the shortcut —
    unchanged), and a step of |x_a − x_b| ≈ the nearest-neighbour spacing puts q about as far from
    its nearest row as a new query drawn from the data is.  Measured against fresh queries and
    against rows held out of the graph (docs/design/bench.md, "honest estimates").
    """
    m, kn = neighbours.shape
    first = rng.integers(0, kn, m)
    second = (first + rng.integers(1, kn, m)) % kn  # a different slot
    rows_i = rows[self_pos]
    q = rows_i + (rows[neighbours[np.arange(m), first]] - rows[neighbours[np.arange(m), second]])
    zero = ~np.any(q != 0, axis=1)  # x_i = x_b - x_a exactly: keep the row (cosine rejects zeros)
    q[zero] = rows_i[zero]
    return np.ascontiguousarray(q, dtype=np.float32)


def _median_time(fn, runs: int) -> float:
    import time

    fn()  # warm-up: lazy list layout, thread pools
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def tune(obj: "_ApproximateIndex", target_recall: float = 0.95, queries: np.ndarray | None = None, *, k: int = 10,
         sample: int = 1000, confidence: float = 0.95, seed: int = 0, timing_runs: int = 3,
         store: bool = True) -> TuneReport:
    """Pick the cheapest ``search_param`` (nprobe / ef_search) whose recall@k reaches ``target_recall``
    with confidence, measured against exact search.

    Queries: ``queries`` when given (validated rows; at most ``sample`` of them), else built from
    ``sample`` corpus rows drawn at random:

    * IVF kinds: the rows themselves, each searched with exclude_self (k + 1 results, its own row
      dropped).  A row's recall depends only on the lists it probes, chosen by its distance to the
      centroids as a new query's are, and its own entry in its list helps find no other row:
      measured, its recall is within 0.004 of fresh queries' where they cross 0.95 (at most
      +0.019, at nprobe <= 8 on a Gaussian mixture, where recall is below 0.9).
    * HNSW: ``x_i + (x_a − x_b)`` for two of x_i's k nearest rows (:func:`_neighbour_step_queries`),
      not rows of the index.  A row itself is a node linked to its own neighbours, which
      overestimated recall by up to 0.05 (ef_search 10: 0.967 on rows, 0.916 fresh).

    Ground truth: tlfast's exact kernel over the index's stored rows.  The ladder of settings is
    walked cheapest first; recall rises along it, so the first setting whose Wilson lower bound
    reaches the target is the fastest that does (the point estimate alone is not enough).

    Why per query: the k neighbours of one query are found or missed together (they share probed
    lists / graph paths), so the nq·k neighbour hits are not independent trials.  Per-query
    recalls r_i lie in [0, 1], so Var(r_i) <= p(1 - p): a Wilson interval with nq trials is
    conservative for the mean recall p.
    """
    import math

    import torch

    from .bench.timing import wilson_interval

    if isinstance(target_recall, bool) or not isinstance(target_recall, (int, float)) or \
            not 0 < float(target_recall) <= 1 or math.isnan(target_recall):
        raise ValueError(f"target_recall must be a number in (0, 1], got {target_recall!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    k = _positive_int(k, "k", allow_none=False)
    sample = _positive_int(sample, "sample", allow_none=False)
    if not obj.is_trained:
        raise ValueError(f"this {obj.kind} index is not trained yet (it holds {len(obj)} rows and searches "
                         f"them exactly until it is): add more rows or call train() before tune()")
    rows = obj.stored_rows()
    n = len(rows)
    exact_backend = _exact_backend()
    from_corpus = queries is None
    # Corpus rows searched with exclude_self (IVF), or neighbour steps that are not rows (graph).
    exclude_self = from_corpus and obj.kind != "hnsw"
    if from_corpus:
        if n < k + 2:
            raise ValueError(f"the index holds {n} rows; tuning recall@{k} needs at least {k + 2}")
        rng = np.random.default_rng(seed)
        self_pos = np.sort(rng.choice(n, min(sample, n), replace=False))
        q = np.ascontiguousarray(rows[self_pos])
        if not exclude_self:
            kn = min(max(k, 2), n - 1)  # two distinct neighbours to step between
            nbr = exact_backend.knn(torch.from_numpy(q), torch.from_numpy(rows), kn + 1, obj.metric, False)[1]
            q = _neighbour_step_queries(rows, self_pos, _drop_self(nbr.numpy(), self_pos, kn), rng)
        kk = k + 1 if exclude_self else k
    else:
        q = obj.rows(queries, "queries")
        if len(q) > sample:
            q = q[np.random.default_rng(seed).choice(len(q), sample, replace=False)]
        kk = k
    if kk > n:
        raise ValueError(f"k={k} is larger than the index ({n} rows)")

    def exact():
        return exact_backend.knn(torch.from_numpy(q), torch.from_numpy(rows), kk, obj.metric, False)[1].numpy()

    truth = exact()
    if exclude_self:
        truth = _drop_self(truth, self_pos, k)
    name, curve, chosen = obj.search_param, [], None
    for value in obj.search_param_ladder(k):
        found = obj.search(q, kk, **{name: value})[1]
        if exclude_self:
            found = _drop_self(found, self_pos, k)
        r = recall_per_query(found, truth)
        lo, hi = wilson_interval(float(r.sum()), len(r), confidence)
        curve.append((value, float(r.mean()), lo, hi))
        if lo >= target_recall:
            chosen = curve[-1]
            break
    reached = chosen is not None
    if not reached:  # the most accurate setting tried
        chosen = max(curve, key=lambda c: (c[1], -c[0]))
    value = chosen[0]
    if timing_runs:
        t_exact = _median_time(exact, timing_runs)
        t_approx = _median_time(lambda: obj.search(q, kk, **{name: value}), timing_runs)
    else:  # a one-off search(target_recall=): no timing
        t_exact = t_approx = float("nan")
    if store:
        obj.set_search_param(value)
    return TuneReport(params={name: value}, target_recall=float(target_recall), reached=reached, recall=chosen[1],
                      recall_ci=(chosen[2], chosen[3]), confidence=confidence, k=k, n_queries=len(q),
                      queries_from=("given" if not from_corpus else "corpus rows (exclude_self)" if exclude_self
                                    else "corpus neighbour steps x_i + x_a - x_b"),
                      exact_qps=len(q) / t_exact, approx_qps=len(q) / t_approx, speedup=t_exact / t_approx,
                      timing_runs=timing_runs, curve=tuple((c[0], c[1], c[2]) for c in curve))


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
