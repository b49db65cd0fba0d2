"""``tlfast.FeatureStore``: features on disk as ``.npy`` shards plus a checksummed manifest.

Layout of a store folder::

    manifest.json        {"format": "tlfast.features/1", "model", "dim", "dtype", "count",
                          "normalize", "shard_size", "data_sha256", "model_sha256",
                          "shards": [{"file", "rows", "bytes", "sha256"}, ...]}
    shard-00000.npy ...  (rows, dim) arrays, rows in input order across shards

While an extraction runs, everything lives beside the target in ``.<name>.tlfast-partial/``:
``job.json`` (what is being extracted: model, data and precision fingerprints), ``records/``
(one record per finished shard, written after the shard's rename) and ``store/`` (the shards).
A rerun with the same job skips the finished shards; once all are there the manifest is written
and ``store/`` is committed at the target in one step (``_persist.commit``), so the target is at
every instant the previous store or the new complete one.  A rerun with a different job (other
data, model weights or precision) is refused rather than mixing the two; see
docs/design/durability.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import _persist

__all__ = ["FeatureStore", "write_store"]

FORMAT = "tlfast.features/1"
MANIFEST = _persist.MANIFEST
_PARTIAL = ".tlfast-partial"
_DTYPES = ("float32", "float16")
# The job fields that must agree for a store (or an interrupted run) to be reused.
_JOB_KEYS = ("model", "count", "shard_size", "dtype", "normalize", "data_sha256", "model_sha256")

KIND = _persist.Kind(FORMAT, "feature store", None, schema={
    "dim": _persist.is_int(1), "dtype": _persist.is_str(_DTYPES), "count": _persist.is_int(1),
    "shards": _persist.is_list(_persist.is_record({"file": _persist.check_name, "rows": _persist.is_int(1),
                                                   "sha256": _persist.is_sha256}))},
    optional={"model": _persist.is_str()},
    listed=lambda meta: [s["file"] for s in meta["shards"]])


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


def partial_path(root: Path) -> Path:
    """Where an unfinished extraction into ``root`` keeps its work."""
    root = Path(os.path.abspath(root))
    return root.parent / f".{root.name}{_PARTIAL}"


def _dist() -> tuple[int, int, Any]:
    """(rank, world_size, torch.distributed or None) of the current process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist
    return 0, 1, None


class FeatureStore:
    """A memory-mapped, read-only view of a store written by :meth:`tlfast.Extractor.extract_to`.

    ``len(store)`` rows of ``store.dim`` features; ``store[i]``, ``store[a:b]``,
    ``store[[i, j]]`` and ``store[rows, cols]`` return numpy arrays (a slice inside one shard is
    a zero-copy view of the map); iterating yields one array per shard; ``np.asarray(store)`` (and
    so ``tlfast.knn(store, ...)``) gives all rows.  With ``verify=True`` (default) each shard's
    sha256 is checked against the manifest the first time it is opened.  A missing shard raises
    ``FileNotFoundError`` and a corrupted one ``ValueError``, both naming the shard file.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        self.path = Path(path)
        _persist.recover(self.path)
        if not (self.path / MANIFEST).is_file():
            hint = (" (extraction was interrupted: rerun extract_to with the same arguments to finish it)"
                    if partial_path(self.path).is_dir() else "")
            raise FileNotFoundError(f"no feature store at {os.fspath(self.path)!r}: {MANIFEST} is missing{hint}")
        self.manifest = _persist.read_manifest(self.path, KIND)
        _persist.check_listing(self.path, KIND.listed(self.manifest), "feature store")
        self.verify = verify
        self.dim = int(self.manifest["dim"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self.model = self.manifest.get("model")
        self.normalize = self.manifest.get("normalize")
        self._shards: list[dict[str, Any]] = self.manifest["shards"]
        rows = [int(s["rows"]) for s in self._shards]
        self._offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        if int(self._offsets[-1]) != int(self.manifest["count"]):
            raise ValueError(f"{self.path / MANIFEST}: shard rows sum to {int(self._offsets[-1])}, not count="
                             f"{self.manifest['count']}; the manifest is corrupted")
        self._maps: dict[int, tuple[np.ndarray, _persist.MappedFile | None]] = {}

    # A store pickles and copies as a reference to its folder: the shard maps are not carried
    # (that would copy every row into the pickle); the copy reopens (and verifies) them on use.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    # sizes ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def __repr__(self) -> str:
        return (f"FeatureStore({os.fspath(self.path)!r}, rows={len(self)}, dim={self.dim}, dtype={self.dtype}, "
                f"shards={self.num_shards}, model={self.model!r})")

    # shards ---------------------------------------------------------------------------------
    def shard(self, i: int) -> np.ndarray:
        """Shard ``i`` as a read-only memory map of shape (rows, dim)."""
        if i in self._maps:
            arr, mapped = self._maps[i]
            if mapped is not None:
                mapped.check()  # truncated from outside since it was mapped: an error, not SIGBUS
            return arr
        if not 0 <= i < len(self._shards):
            raise IndexError(f"shard index {i} out of range for {len(self._shards)} shards")
        rec = self._shards[i]
        where = f"shard {rec['file']} of the feature store {os.fspath(self.path)!r}"
        try:
            fd = _persist.open_verified(_persist.inside(self.path, rec["file"]), rec, verify=self.verify,
                                        what="feature store")
        except ValueError as exc:
            if "is missing" in str(exc):
                raise FileNotFoundError(f"{where} is missing; re-extract the store") from None
            raise ValueError(f"{where} is corrupted ({exc}); delete the store and rerun extract_to") from None
        try:
            arr, mapped = _persist.load_npy(fd, self.path / rec["file"], mmap_mode=True)
        except ValueError as exc:
            raise ValueError(f"{where} is corrupted ({exc})") from exc
        if arr.shape != (int(rec["rows"]), self.dim) or arr.dtype != self.dtype:
            raise ValueError(f"shard {rec['file']} has shape {arr.shape} {arr.dtype}, the manifest says "
                             f"({rec['rows']}, {self.dim}) {self.dtype}; the store is corrupted")
        self._maps[i] = (arr, mapped)
        return arr

    def mapped_files(self) -> list[_persist.MappedFile]:
        """The guards of the shards mapped so far (``Index.from_store`` checks them before each block)."""
        return [m for _, m in self._maps.values() if m is not None]

    def __iter__(self) -> Iterator[np.ndarray]:
        """One (rows, dim) array per shard, in order (the unit of streaming work)."""
        for i in range(len(self._shards)):
            yield self.shard(i)

    # row access -----------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> np.ndarray:
        cols: Any = slice(None)
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError(f"a feature store is 2-D; got an index with {len(key)} parts")
            key, cols = key
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} out of range for a store of {len(self)} rows")
            s = int(np.searchsorted(self._offsets, i, side="right") - 1)
            return self.shard(s)[i - self._offsets[s]][cols]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._range(start, max(start, stop))[:, cols]
            rows = np.arange(start, stop, step)
        else:
            rows = np.asarray(key)
            if rows.dtype == bool:
                if rows.shape != (len(self),):
                    raise IndexError(f"a boolean row mask must have shape ({len(self)},), got {rows.shape}")
                rows = np.flatnonzero(rows)
            elif rows.dtype.kind not in "iu":
                raise IndexError(f"rows must be an int, a slice, or an integer / boolean array, got {rows.dtype}")
            rows = np.where(rows < 0, rows + len(self), rows)
            if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
                raise IndexError(f"row index out of range for a store of {len(self)} rows")
        return self._gather(rows.reshape(-1))[:, cols]

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self._offsets, start, side="right") - 1) if start < len(self) else 0
        if stop <= start:
            return np.empty((0, self.dim), dtype=self.dtype)
        last = int(np.searchsorted(self._offsets, stop - 1, side="right") - 1)
        parts = [self.shard(s)[max(start, self._offsets[s]) - self._offsets[s]:
                                min(stop, self._offsets[s + 1]) - self._offsets[s]]
                 for s in range(first, last + 1)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), dtype=self.dtype)
        which = np.searchsorted(self._offsets, rows, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.shard(int(s))[rows[sel] - self._offsets[s]]
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self._range(0, len(self))
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            return arr.astype(dtype)
        return np.array(arr) if copy else arr


def write_store(extractor: Any, path: str | os.PathLike, data: Any, *, shard_size: int, batch_size: int | None,
                max_tokens: int | None, progress: bool | None, dtype: str, overwrite: bool) -> FeatureStore:
    """The engine of :meth:`Extractor.extract_to` (see there); returns the opened store."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    count = len(data)
    if count == 0:
        raise ValueError("data is empty: pass at least one item to extract features from")
    root = Path(path)
    partial = partial_path(root)
    rank, world, dist = _dist()
    job = {"format": FORMAT, "model": extractor.name, "count": count, "shard_size": shard_size, "dtype": dtype,
           "normalize": extractor.normalize, "data_sha256": data_fingerprint(data, _strings_are_paths(extractor)),
           "model_sha256": model_fingerprint(extractor)}
    lock = None
    try:
        if rank == 0:
            done, lock = _prepare(root, partial, job, overwrite)
        else:
            done = False
        if dist is not None:
            flag = [done]
            dist.broadcast_object_list(flag, src=0)
            done = flag[0]
        if done:  # already complete and matching (checked by _prepare)
            return FeatureStore(root)

        stage, records = partial / "store", partial / "records"
        n_shards = math.ceil(count / shard_size)
        for i in range(rank, n_shards, world):
            record, file = records / f"{_shard_name(i)}.json", stage / _shard_name(i)
            if record.is_file() and file.is_file():
                continue  # finished by an earlier run of the same job
            lo, hi = i * shard_size, min(count, (i + 1) * shard_size)
            feats = extractor.extract(data[lo:hi], batch_size=batch_size, max_tokens=max_tokens, progress=progress)
            arr = np.ascontiguousarray(feats.detach().cpu().numpy().astype(dtype, copy=False))
            _persist.write_file(file, lambda f, a=arr: np.save(f, a, allow_pickle=False))
            rec = {"file": file.name, "rows": hi - lo, "dim": int(arr.shape[1]), **_persist.file_record(file)}
            _persist.write_file(record, lambda f, r=rec: f.write(json.dumps(r).encode()))

        if dist is not None:
            dist.barrier()
        if rank == 0:
            shards = []
            for i in range(n_shards):
                record = records / f"{_shard_name(i)}.json"
                if not record.is_file():
                    raise RuntimeError(f"shard {_shard_name(i)} was not written (a rank failed?); rerun extract_to")
                shards.append(json.loads(record.read_text()))
            dims = {r.pop("dim") for r in shards}
            if len(dims) != 1:
                raise RuntimeError(f"shards disagree on the feature dimension {sorted(dims)}; rerun with "
                                   f"overwrite=True")
            manifest = {**job, "dim": dims.pop(), "shards": shards}
            _persist.write_file(stage / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
            _persist.check_replaceable(root, KIND, overwrite)
            _persist.commit(stage, root)
            shutil.rmtree(partial, ignore_errors=True)
        if dist is not None:
            dist.barrier()
    finally:
        if lock is not None:
            os.close(lock)
    return FeatureStore(root)


def _strings_are_paths(extractor: Any) -> bool:
    """Whether strings in the data name image files (their content then belongs to the fingerprint)."""
    kind = getattr(extractor, "kind", None)
    return kind == "image" or (kind == "module" and getattr(extractor, "tokenizer", None) is None)


class _Fingerprint:
    """sha256 over typed, length-prefixed fields, so that no two different inputs feed the same bytes."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def field(self, tag: str, payload: bytes | memoryview = b"") -> None:
        self.h.update(tag.encode())
        self.h.update(len(payload).to_bytes(8, "little"))
        self.h.update(payload)

    def array(self, a: Any) -> None:
        import torch

        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().contiguous()
            self.field("tensor", f"{a.dtype}{tuple(a.shape)}".encode())
            self.field("data", a.reshape(-1).view(torch.uint8).numpy().data if a.numel() else b"")
        else:
            a = np.ascontiguousarray(a)
            self.field("array", f"{a.dtype.str}{a.shape}".encode())
            self.field("data", a.reshape(-1).view(np.uint8).data if a.size else b"")

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def data_fingerprint(data: Any, strings_are_paths: bool) -> str:
    """sha256 of what is being extracted, for every input kind: texts, token-id sequences, image
    arrays / tensors (their bytes), PIL images (their pixels), image files (path, size and
    modification time: a file edited in place is a different input).  Hashing runs at GB/s, far
    faster than any model, so it is cheap next to the extraction it protects."""
    import torch

    fp = _Fingerprint()
    if isinstance(data, (np.ndarray, torch.Tensor)):
        fp.array(data)
        return fp.hexdigest()
    fp.field("sequence", str(len(data)).encode())
    for i in range(len(data)):
        item = data[i]
        if isinstance(item, str) and not strings_are_paths:
            fp.field("text", item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, (str, os.PathLike)):
            st = os.stat(item)
            fp.field("file", f"{os.path.abspath(item)}|{st.st_size}|{st.st_mtime_ns}".encode("utf-8", "surrogatepass"))
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            fp.array(_token_ids(item) if item.ndim == 1 else item)
        elif hasattr(item, "tobytes") and hasattr(item, "mode") and hasattr(item, "size"):  # PIL.Image
            fp.field("image", f"{item.mode}{item.size}".encode())
            fp.field("data", item.tobytes())
        elif isinstance(item, (list, tuple)):
            fp.array(_token_ids(item))
        else:
            raise TypeError(f"data[{i}] is a {type(item).__name__}, which a feature store cannot fingerprint "
                            f"(so it could not tell this data from other data on resume); pass texts, token "
                            f"ids, image arrays or tensors, PIL images or file paths")
    return fp.hexdigest()


def _token_ids(seq: Any) -> np.ndarray:
    """A token-id sequence as int64, so that lists, int32 arrays and tensors of one sequence agree."""
    import torch

    a = seq.detach().cpu().numpy() if isinstance(seq, torch.Tensor) else np.asarray(seq)
    return a.astype(np.int64) if a.dtype.kind in "iu" else a


def model_fingerprint(extractor: Any) -> str:
    """sha256 of what turns data into features: the extractor's settings (name, kind, precision,
    pooling, normalisation, sizes) and its weights (every parameter and buffer), or its ONNX
    model file.  Two different networks under one name are two models."""
    import torch

    fp = _Fingerprint()
    settings = {key: getattr(extractor, key, None) for key in
                ("name", "kind", "backend", "dtype", "max_length", "image_size", "mean", "std", "normalize",
                 "pooling")}
    preprocess = getattr(extractor, "preprocess", None)
    settings["preprocess"] = None if preprocess is None else getattr(preprocess, "__qualname__", repr(preprocess))
    fp.field("settings", json.dumps(settings, sort_keys=True, default=str).encode())
    encoder = getattr(extractor, "encoder", None)
    if isinstance(encoder, torch.nn.Module):
        for name, value in encoder.state_dict().items():
            fp.field("param", name.encode())
            fp.array(value)
    session = getattr(extractor, "session", None)
    model_path = getattr(session, "_model_path", None)
    if model_path and os.path.isfile(model_path):
        with open(model_path, "rb") as f:
            fp.field("onnx", hashlib.file_digest(f, "sha256").digest())
    return fp.hexdigest()


def _differences(existing: dict, job: dict) -> list[str]:
    return [k for k in _JOB_KEYS if existing.get(k) != job.get(k)]


def _prepare(root: Path, partial: Path, job: dict[str, Any], overwrite: bool) -> tuple[bool, int | None]:
    """Check what is at ``root`` and beside it; (True, None) when ``root`` already holds this job's
    store, else (False, fd holding the lock of the partial folder, ready for the shards)."""
    _persist.recover(root)
    if os.path.lexists(root):
        try:
            existing = _persist.read_manifest(root, KIND)
            _persist.check_listing(root, KIND.listed(existing), "feature store")
        except (ValueError, FileNotFoundError):
            _persist.check_replaceable(root, KIND, overwrite=True)  # empty -> fine; anything else: refused
        else:
            differ = _differences(existing, job)
            if not differ:
                shutil.rmtree(partial, ignore_errors=True)  # a run that finished but died before cleaning up
                return True, None
            if not overwrite:
                raise ValueError(f"{os.fspath(root)!r} holds a different extraction (it differs in "
                                 f"{', '.join(differ)}); use another path or overwrite=True")
    if partial.is_dir():
        lock = _persist.lock(partial)
        if lock is None:
            raise RuntimeError(f"another process is extracting into {os.fspath(root)!r} (it holds "
                               f"{os.fspath(partial)!r}); wait for it or use another path")
        try:
            previous = json.loads((partial / "job.json").read_text())
        except (OSError, ValueError):
            previous = None
        if previous is not None and not _differences(previous, job):
            return False, lock  # resume
        if previous is not None and not overwrite:
            os.close(lock)
            raise ValueError(f"an interrupted extraction into {os.fspath(root)!r} of a different job (it differs "
                             f"in {', '.join(_differences(previous, job))}) is in {os.fspath(partial)!r}; rerun "
                             f"with its data and model to finish it, or pass overwrite=True to discard it")
        os.close(lock)
        shutil.rmtree(partial)
    with _persist.naming(partial, "creating"):
        root.parent.mkdir(parents=True, exist_ok=True)
        partial.mkdir()
        (partial / "store").mkdir()
        (partial / "records").mkdir()
    lock = _persist.lock(partial)
    _persist.write_file(partial / "job.json", lambda f: f.write(json.dumps(job).encode()))
    return False, lock
