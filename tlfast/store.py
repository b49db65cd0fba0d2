"""``tlfast.FeatureStore``: features on disk as ``.npy`` shards plus a checksummed manifest.

Layout of a store folder::

    manifest.json        {"format": "tlfast.features/1", "model", "dim", "dtype", "count",
                          "normalize", "shard_size", "shards": [{"file", "rows", "sha256"}, ...]}
    shard-00000.npy ...  (rows, dim) arrays, rows in input order across shards
    .progress/           while writing only: the job description and one record per finished shard

Every file is written to a temp file in the same folder and renamed into place, so a reader (or a
resumed writer) sees whole files or none.  A shard counts as finished when its record exists,
and the record is written only after the shard's rename; a rerun therefore skips finished shards
and recomputes only the rest.  The manifest is written last: a folder without one is unfinished.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FeatureStore", "write_store"]

FORMAT = "tlfast.features/1"
MANIFEST = "manifest.json"
PROGRESS = ".progress"
_DTYPES = ("float32", "float16")


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


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
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            hint = (" (extraction was interrupted: rerun extract_to with the same arguments to finish it)"
                    if (self.path / PROGRESS).is_dir() else "")
            raise FileNotFoundError(f"no feature store at {os.fspath(self.path)!r}: {MANIFEST} is missing{hint}")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{manifest_path} is not valid JSON ({exc}); the store is corrupted") from exc
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} is not a tlfast feature store manifest (format "
                             f"{self.manifest.get('format')!r}, expected {FORMAT!r})")
        self.verify = verify
        self.dim = int(self.manifest["dim"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self.model = self.manifest.get("model")
        self.normalize = self.manifest.get("normalize")
        self._shards: list[dict[str, Any]] = self.manifest["shards"]
        rows = [int(s["rows"]) for s in self._shards]
        self._offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        if int(self._offsets[-1]) != int(self.manifest["count"]):
            raise ValueError(f"{manifest_path}: shard rows sum to {int(self._offsets[-1])}, not count="
                             f"{self.manifest['count']}; the manifest is corrupted")
        self._maps: dict[int, np.ndarray] = {}

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
            return self._maps[i]
        if not 0 <= i < len(self._shards):
            raise IndexError(f"shard index {i} out of range for {len(self._shards)} shards")
        rec = self._shards[i]
        file = self.path / rec["file"]
        if not file.is_file():
            raise FileNotFoundError(f"shard {rec['file']} of the feature store {os.fspath(self.path)!r} is missing; "
                                    f"re-extract the store")
        if self.verify and sha256_file(file) != rec["sha256"]:
            raise ValueError(f"shard {rec['file']} of the feature store {os.fspath(self.path)!r} is corrupted "
                             f"(sha256 does not match the manifest); delete it and rerun extract_to, or "
                             f"re-extract the store")
        try:
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"shard {rec['file']} of the feature store {os.fspath(self.path)!r} is corrupted "
                             f"({exc})") from exc
        if arr.shape != (int(rec["rows"]), self.dim) or arr.dtype != self.dtype:
            raise ValueError(f"shard {rec['file']} has shape {arr.shape} {arr.dtype}, the manifest says "
                             f"({rec['rows']}, {self.dim}) {self.dtype}; the store is corrupted")
        self._maps[i] = arr
        return arr

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
    rank, world, dist = _dist()
    job = {"format": FORMAT, "model": extractor.name, "count": count, "shard_size": shard_size, "dtype": dtype,
           "normalize": extractor.normalize, "fingerprint": _fingerprint(data)}
    progress_dir = root / PROGRESS
    if rank == 0:
        _prepare(root, progress_dir, job, overwrite)
    if dist is not None:
        dist.barrier()
    if (root / MANIFEST).is_file():  # already complete and matching (checked by _prepare)
        return FeatureStore(root)

    n_shards = math.ceil(count / shard_size)
    for i in range(rank, n_shards, world):
        record = progress_dir / f"{_shard_name(i)}.json"
        file = root / _shard_name(i)
        if record.is_file() and file.is_file():
            continue  # finished by an earlier run
        lo, hi = i * shard_size, min(count, (i + 1) * shard_size)
        feats = extractor.extract(data[lo:hi], batch_size=batch_size, max_tokens=max_tokens, progress=progress)
        arr = np.ascontiguousarray(feats.detach().cpu().numpy().astype(dtype, copy=False))
        _atomic_write(file, lambda f, a=arr: np.save(f, a, allow_pickle=False))
        _write_json(record, {"file": file.name, "rows": hi - lo, "dim": int(arr.shape[1]),
                             "sha256": sha256_file(file)})

    if dist is not None:
        dist.barrier()
    if rank == 0:
        records = []
        for i in range(n_shards):
            record = progress_dir / f"{_shard_name(i)}.json"
            if not record.is_file():
                raise RuntimeError(f"shard {_shard_name(i)} was not written (a rank failed?); rerun extract_to")
            records.append(json.loads(record.read_text()))
        dims = {r.pop("dim") for r in records}
        if len(dims) != 1:
            raise RuntimeError(f"shards disagree on the feature dimension {sorted(dims)}; rerun with overwrite=True")
        manifest = {**job, "dim": dims.pop(), "shards": records}
        _write_json(root / MANIFEST, manifest)
        shutil.rmtree(progress_dir, ignore_errors=True)
    if dist is not None:
        dist.barrier()
    return FeatureStore(root)


def _fingerprint(data: Any) -> str | None:
    """sha256 of the texts (cheap, and catches resuming with different data); None for images."""
    if isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        h = hashlib.sha256()
        for t in data:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        return h.hexdigest()
    return None


def _prepare(root: Path, progress_dir: Path, job: dict[str, Any], overwrite: bool) -> None:
    """Create the folder, or check that what is there is this job (finished or to be resumed)."""
    if overwrite and root.exists():
        for child in [root / MANIFEST, progress_dir, *root.glob("shard-*.npy")]:
            if child.is_dir():
                shutil.rmtree(child)
            elif child.exists():
                child.unlink()
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / MANIFEST
    job_file = progress_dir / "job.json"
    existing = json.loads(manifest.read_text()) if manifest.is_file() else \
        json.loads(job_file.read_text()) if job_file.is_file() else None
    if existing is not None:
        mismatch = {k: (existing.get(k), v) for k, v in job.items() if existing.get(k) != v}
        if mismatch:
            raise ValueError(f"{os.fspath(root)!r} holds a different extraction ({mismatch}: existing vs new); use "
                             f"another path or overwrite=True")
        return
    if any(root.glob("shard-*.npy")):
        raise ValueError(f"{os.fspath(root)!r} has shard files but no manifest or progress record; use another "
                         f"path or overwrite=True")
    progress_dir.mkdir(exist_ok=True)
    _write_json(job_file, job)
