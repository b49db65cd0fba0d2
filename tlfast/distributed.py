"""Exact kNN over a corpus sharded across processes, on torch.distributed (gloo on CPU, NCCL on GPU).

Every rank of a process group holds one shard of the corpus, in rank order: rank r's rows have
global indices ``offset[r] .. offset[r] + len(shard) - 1`` with ``offset`` the exclusive prefix sum
of the shard sizes (agreed by an all-gather).  Two ways to search it:

* ``knn(queries, shard, k)`` -- every rank passes the **same** queries and gets the same global
  answer.  Each rank runs the fused local kNN on its shard, then the ranks all-gather k candidates
  per query per rank (float32 value + int64 global index = 12 bytes each, ``world * k * 12`` bytes
  per query) and merge them.
* ``knn(queries, shard, k, sharded_queries=True)`` -- every rank passes **its own** queries and
  gets their neighbours in the whole corpus.  The shards travel round a ring (rank r sends to
  r + 1): at each of the ``world`` steps a rank searches the block it holds while passing it on,
  so communication overlaps compute; each rank moves ``(world - 1) / world`` of the corpus.

:class:`ShardedIndex` keeps one :class:`tlfast.Index` per rank under the same numbering, with
collective ``search`` / ``save`` / ``load``.

Both modes return exactly what ``tlfast.knn`` returns on the concatenated corpus: the merge orders
candidates best first and breaks exact ties toward the smaller global index, the contract's rule.
A rank whose shard has fewer than k rows (or none) pads its candidates with the metric's worst
value and an index that sorts after every real one.

Before any data moves, the ranks all-gather a small descriptor of the call (operation, dim, metric,
k, dtype, sizes and whether the local inputs passed validation), so a mismatch or bad input on one
rank raises the same clear ``ValueError`` on every rank instead of a hang or garbage.

Failure behaviour: every collective is waited on with ``timeout`` (seconds or a timedelta; None =
the group's default, set by ``init_process_group(timeout=...)``).  A rank that dies, raises before a
collective or hangs makes the other ranks raise :class:`PeerError` (a ``RuntimeError``) within
that timeout -- at once when the peer's process is gone.  The group cannot be trusted after that:
destroy it and restart the job (as torchrun's elastic agent does).  Under NCCL, PyTorch's watchdog
also aborts collectives that outlive the group's own timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING), so
keep ``timeout`` below the one given to ``init_process_group`` to get the PeerError first.
"""
from __future__ import annotations

import datetime
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from ._validate import Inputs, as_tensor, check_domain, check_matrix, safe_knn, validate_k
from .backends import resolve as resolve_backend
import copy

from . import _persist
from ._rwlock import RWLock
from .index import Index, _as_ids, _check_loaded_ids, _reader, _writer
from .metrics import METRICS, get_metric
from .ops import KnnResult
from .precision import WithPrecision, check_precision

__all__ = ["PeerError", "ShardedIndex", "knn", "merge_topk"]

# Index that sorts after every real global index: marks padding candidates.
PAD_INDEX = torch.iinfo(torch.int64).max
# Bytes a rank may hold in gathered candidates at once (replicated mode); queries go in chunks.
_GATHER_BYTES = 256 << 20
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
# Descriptor layout: _FIELDS int64 values, then an error message of _MSG_BYTES utf-8 bytes.
_FIELDS = ("status", "op", "dim", "metric", "k", "dtype", "rows", "queries", "sharded", "fingerprint", "ids",
           "exclude_self")
_MSG_BYTES = 480
# A rank's local failure travels as a status code: the peers raise the same class, naming the rank.
_STATUS_OK = 0
_ERRORS = (ValueError, TypeError, FileExistsError, FileNotFoundError, OSError, RuntimeError)
# Fields that a rank may leave unknown (-1): a rank with no rows yet knows no dim and no ids mode.
_UNKNOWN = -1
_MAY_BE_UNKNOWN = ("dim", "ids")
OP_KNN, OP_INDEX_SEARCH, OP_INDEX_SAVE, OP_INDEX_LOAD = 1, 2, 3, 4
_OP_NAMES = {OP_KNN: "knn", OP_INDEX_SEARCH: "ShardedIndex.search", OP_INDEX_SAVE: "ShardedIndex.save",
             OP_INDEX_LOAD: "ShardedIndex.load"}


class PeerError(RuntimeError):
    """A collective did not complete: a peer rank died, raised before reaching it, or hung."""


# ---------------------------------------------------------------- group plumbing

def _group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tlfast.distributed needs an initialised process group: call "
                           "torch.distributed.init_process_group('gloo' or 'nccl', ...) first "
                           "(torchrun sets the environment for it)")
    return dist.get_rank(group), dist.get_world_size(group)


def _timeout(timeout) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds or a datetime.timedelta, "
                         f"got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def _comm_device(group, data_device: torch.device) -> torch.device:
    """Where collective buffers live: the data's GPU under NCCL, else the CPU (gloo)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        if data_device.type == "cuda":
            return data_device
        if "gloo" not in backend:
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _wait(work, timeout: datetime.timedelta | None, what: str, rank: int) -> None:
    """Wait for async ``work``; turn a peer failure or a timeout into a :class:`PeerError`."""
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
    except Exception as exc:  # gloo/NCCL raise bare RuntimeErrors ("Connection reset", "timed out")
        limit = f"{timeout.total_seconds():g} s" if timeout is not None else "the group's timeout"
        raise PeerError(
            f"tlfast.distributed: {what} did not complete on rank {rank} within {limit}: a peer rank "
            f"died, raised before reaching it, or is stuck (check the other ranks' logs). The process "
            f"group is unusable now; destroy it and restart the job. Cause: {exc}") from exc


def _all_gather(t: torch.Tensor, group, timeout, what: str, rank: int, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    _wait(dist.all_gather(out, t, group=group, async_op=True), timeout, what, rank)
    return out


# ---------------------------------------------------------------- the call descriptor

def _exchange_descriptor(fields: dict[str, int], error: BaseException | None, *, group, timeout,
                         rank: int, world: int, device: torch.device) -> list[dict[str, int]]:
    """All-gather this rank's call descriptor; raise the same error on every rank if any rank's
    inputs were rejected or the ranks disagree on op / dim / metric / k / dtype / sharded.

    Returns every rank's fields (rows and queries per rank, in rank order).
    """
    status = _STATUS_OK
    message = ""
    if error is not None:
        status = 1 + next((i for i, cls in enumerate(_ERRORS) if isinstance(error, cls)), len(_ERRORS) - 1)
        message = str(error)
    values = [status] + [int(fields.get(name, 0)) for name in _FIELDS[1:]]
    head = np.asarray(values, dtype=np.int64).view(np.uint8)
    msg = np.zeros(_MSG_BYTES, dtype=np.uint8)
    raw = message.encode("utf-8", "replace")[:_MSG_BYTES]
    msg[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    mine = torch.from_numpy(np.concatenate([head, msg])).to(device)
    gathered = _all_gather(mine, group, timeout, "the call-descriptor all-gather", rank, world)
    rows = []
    for r, t in enumerate(gathered):
        a = t.cpu().numpy()
        vals = a[:8 * len(_FIELDS)].view(np.int64)
        d = dict(zip(_FIELDS, (int(v) for v in vals)))
        d["message"] = bytes(a[8 * len(_FIELDS):]).rstrip(b"\0").decode("utf-8", "replace")
        rows.append(d)
    if error is not None:
        raise error
    for r, d in enumerate(rows):
        if d["status"] != _STATUS_OK:
            cls = _ERRORS[min(d["status"], len(_ERRORS)) - 1]
            raise cls(f"rank {r} failed: {d['message']}")
    names = ["op", "dim", "metric", "k", "dtype", "sharded", "ids", "exclude_self"]
    if not fields.get("sharded", 0):
        names += ["queries", "fingerprint"]
    for name in names:
        seen = [d[name] for d in rows]
        known = {v for v in seen if not (name in _MAY_BE_UNKNOWN and v == _UNKNOWN)}
        if len(known) > 1:
            raise ValueError(f"ranks disagree on {_describe(name)}: {_per_rank(name, seen)}; every rank "
                             f"must make the same call{_hint(name)}")
    return rows


def _describe(name: str) -> str:
    return {"op": "the operation", "dim": "the vector dimension", "metric": "the metric",
            "k": "k", "dtype": "the corpus dtype", "sharded": "sharded_queries",
            "queries": "the number of queries", "fingerprint": "the queries (checksums differ)",
            "ids": "whether ids were given to add", "exclude_self": "exclude_self"}[name]


def _per_rank(name: str, seen: list[int]) -> str:
    fmt = {"metric": lambda v: next((m.name for m in METRICS.values() if m.code == v), str(v)),
           "dtype": lambda v: str(_DTYPES.get(v, v)).replace("torch.", ""),
           "op": lambda v: _OP_NAMES.get(v, str(v)),
           "sharded": lambda v: str(bool(v)), "ids": lambda v: str(bool(v)),
           "exclude_self": lambda v: str(bool(v)),
           "fingerprint": lambda v: f"{v:08x}"}.get(name, str)
    return ", ".join(f"rank {r}: {fmt(v)}" for r, v in enumerate(seen))


def _hint(name: str) -> str:
    if name in ("queries", "fingerprint"):
        return (" (without sharded_queries every rank passes the same queries; pass "
                "sharded_queries=True to search each rank's own queries)")
    if name == "dtype":
        return " (cast every shard to one dtype)"
    if name == "ids":
        return " (give ids on every rank or on none)"
    return ""


def _k_field(k: Any) -> int:
    """k for the descriptor; -1 for a non-integer k, which every rank then rejects the same way."""
    return int(k) if isinstance(k, (int, np.integer)) and not isinstance(k, bool) else -1


def _fingerprint(t: torch.Tensor) -> int:
    """CRC-32 of the bytes of ``t``: cheap evidence that replicated queries are the same everywhere."""
    a = t.detach().contiguous().cpu()
    return zlib.crc32(a.view(torch.uint8).reshape(-1).numpy()) if a.numel() else 0


# ---------------------------------------------------------------- merging candidates

def _worst_value(larger_is_better: bool) -> float:
    return float("-inf") if larger_is_better else float("inf")


def _merge_order(values: torch.Tensor, indices: torch.Tensor, k: int, larger_is_better: bool) -> torch.Tensor:
    """Columns of the best ``k`` of (n, c) candidates per row: best first, exact ties to the smaller index.

    Equivalent to sorting each row by the key (value, index) -- value in the metric's direction --
    and keeping the first k: a stable sort by index, then a stable sort by value.  Padding
    (worst value, ``PAD_INDEX``) therefore sorts after every real candidate, even a real one with
    the worst value (+inf KL).
    """
    by_index = torch.argsort(indices, dim=1, stable=True)
    by_value = torch.argsort(values.gather(1, by_index), dim=1, descending=larger_is_better, stable=True)
    return by_index.gather(1, by_value[:, :k])


def _gathered_order(values: torch.Tensor, indices: torch.Tensor, k: int, larger_is_better: bool) -> torch.Tensor:
    """:func:`_merge_order` for candidates laid out rank after rank, each rank's best first: one
    top-k selection over a 64-bit key instead of two full sorts.

    In that layout the column order of real candidates is their global-index order (ranks hold
    consecutive index ranges; each rank's ties are already in index order), so the key
    (value in the metric's direction, column) orders exactly as (value, index).  The float32 value
    maps to an int32 of the same order (sign-magnitude to two's complement; -0.0 is first made
    +0.0, which compares equal to it); key = that int32 * 2^32 + column is unique per row, so the
    selection needs no stability.  Padding gets the largest key: after every real candidate.
    """
    v = (-values if larger_is_better else values) + 0.0
    bits = v.contiguous().view(torch.int32).to(torch.int64)
    magnitude = bits & 0x7FFFFFFF
    ordered = torch.where(bits < 0, -1 - magnitude, magnitude)
    column = torch.arange(values.shape[1], dtype=torch.int64, device=values.device)
    key = torch.where(indices == PAD_INDEX, PAD_INDEX, ordered * (1 << 32) + column)
    return torch.topk(key, k, dim=1, largest=False, sorted=True).indices


def merge_topk(values: torch.Tensor, indices: torch.Tensor, k: int, larger_is_better: bool):
    """(values, indices) of the best ``k`` candidates per row; see :func:`_merge_order`."""
    order = _merge_order(values, indices, k, larger_is_better)
    return values.gather(1, order), indices.gather(1, order)


def _local_candidates(search: Callable[[int], tuple[torch.Tensor, torch.Tensor]], n: int, rows: int,
                      offset: int, k: int, larger_is_better: bool, device: torch.device):
    """(n, k) candidates from one shard with global indices, padded when the shard has < k rows.

    ``search(kk)`` returns the shard's (values, local indices) for its best ``kk = min(k, rows)``.
    """
    values = torch.full((n, k), _worst_value(larger_is_better), dtype=torch.float32, device=device)
    indices = torch.full((n, k), PAD_INDEX, dtype=torch.int64, device=device)
    kk = min(k, rows)
    if kk and n:
        v, i = search(kk)
        values[:, :kk] = v.to(device)
        indices[:, :kk] = i.to(device) + offset
    return values, indices


def _gather_candidates(values: torch.Tensor, indices: torch.Tensor, k: int, larger_is_better: bool, *,
                       payload: torch.Tensor | None = None, group, timeout, rank: int, world: int,
                       device: torch.device) -> Callable[[], tuple[torch.Tensor, ...]]:
    """Start the all-gather of every rank's (n, k) candidates; returns ``finish()``, which waits for
    it and merges them into the global best k, so the caller can compute while the bytes travel.

    One collective per call: value (4 bytes) and global index (8 bytes) travel packed in a (n, 12k)
    byte tensor, the ``world * k * 12`` bytes per query of the cost model (benchmarks/SCALING.md).
    An int64 ``payload`` per candidate (a ShardedIndex's ids) rides along, 8 bytes more, and comes
    back in merged order as a third result.
    """
    n, out_device = values.shape[0], values.device
    columns = [(t.dtype, t.element_size()) for t in (values, indices, payload) if t is not None]
    packed = torch.cat([t.contiguous().view(torch.uint8) for t in (values, indices, payload) if t is not None],
                       dim=1).to(device)
    parts = [torch.empty_like(packed) for _ in range(world)]
    work = dist.all_gather(parts, packed, group=group, async_op=True)

    def finish():
        _wait(work, timeout, "the candidate all-gather", rank)
        both = torch.cat(parts, dim=1).reshape(n, world, packed.shape[1]).to(out_device)
        out, start = [], 0
        for dtype, size in columns:
            out.append(both[:, :, start:start + size * k].contiguous().view(dtype).reshape(n, world * k))
            start += size * k
        order = _gathered_order(out[0], out[1], k, larger_is_better)
        return tuple(t.gather(1, order) for t in out)

    return finish


# ---------------------------------------------------------------- knn

def _validate_local(queries, local_corpus, metric, sharded: bool):
    m = get_metric(metric)
    q, q_np = as_tensor(queries, "queries")
    c, c_np = as_tensor(local_corpus, "local_corpus")
    if q_np != c_np:
        raise ValueError("queries and local_corpus must be the same kind of array (both numpy or both "
                         "torch); convert one with torch.from_numpy(...) or .numpy()")
    if q.device != c.device:
        raise ValueError(f"queries are on {q.device} but local_corpus is on {c.device}; move both to "
                         f"one device")
    # A shard may be empty (an uneven split), and so may a rank's own queries in sharded mode.
    _check_rows(c, "local_corpus", allow_empty=True)
    _check_rows(q, "queries", allow_empty=sharded)
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"dimension mismatch: queries have dim {q.shape[1]}, local_corpus has dim "
                         f"{c.shape[1]}")
    for t, name in ((q, "queries"), (c, "local_corpus")):
        if t.shape[0]:  # the native row check rejects empty input; an empty shard has no bad rows
            check_domain(t, name, m)
    return q, c, m, q_np


def _check_rows(t: torch.Tensor, name: str, allow_empty: bool) -> None:
    if allow_empty and t.dim() == 2 and t.shape[0] == 0 and t.shape[1] > 0:
        return
    check_matrix(t, name)


def knn(queries: Any, local_corpus: Any, k: int, metric: str = "cosine", *, sharded_queries: bool = False,
        exclude_self: bool = False, group=None, timeout: float | datetime.timedelta | None = None,
        backend: str = "auto", precision: str = "exact") -> KnnResult:
    """Exact kNN against a corpus sharded across the ranks of ``group``; call it on every rank.

    Args:
        queries: (n, d) array or tensor.  Without ``sharded_queries``: the same on every rank (checked
            by a CRC-32), and every rank gets the same answer.  With it: this rank's own queries
            (may be empty), answered against the whole corpus.
        local_corpus: (m_r, d) this rank's shard (may be empty); rank order defines global indices.
        k: neighbours per query, 1 <= k <= total corpus rows; the same on every rank.
        metric: as in :func:`tlfast.knn`; the same on every rank.
        sharded_queries: pass corpus blocks round a ring instead of gathering candidates.
        exclude_self: with ``sharded_queries``, each rank's queries are its own shard and the pair of
            a row with itself is dropped: the kNN graph of the distributed corpus, equal to
            ``tlfast.knn(corpus, corpus, k, exclude_self=True)`` (k <= total rows - 1).
        group: a ``torch.distributed`` process group (default: the world).
        timeout: seconds (or timedelta) each collective may take before :class:`PeerError`.
        backend: the local kNN backend, as in :func:`tlfast.knn`.
        precision: "exact", "bf16" or "fp16" for the local searches, as in :func:`tlfast.knn`; pass
            the same on every rank.

    Returns:
        KnnResult(values float32 (n, k), indices int64 (n, k)) with global corpus indices: exactly
        ``tlfast.knn(queries, concatenated_corpus, k, metric)``.

    Raises:
        ValueError / TypeError on every rank when any rank's inputs are invalid or the ranks
        disagree on dim, metric, k, dtype or mode; :class:`PeerError` when a peer fails.
    """
    rank, world = _group_info(group)
    limit = _timeout(timeout)
    error, q, c, m = None, None, None, None
    fields: dict[str, int] = {"op": OP_KNN, "sharded": int(bool(sharded_queries)),
                              "exclude_self": int(bool(exclude_self))}
    device = torch.device("cpu")
    try:
        precision = check_precision(precision)
        q, c, m, is_numpy = _validate_local(queries, local_corpus, metric, bool(sharded_queries))
        device = q.device
        if exclude_self and not sharded_queries:
            raise ValueError("exclude_self=True needs sharded_queries=True, with each rank passing its own "
                             "shard as queries (the kNN graph of the distributed corpus)")
        if exclude_self and q.shape[0] != c.shape[0]:
            raise ValueError(f"exclude_self=True needs queries to be this rank's local_corpus; got "
                             f"{q.shape[0]} queries and {c.shape[0]} local_corpus rows")
        fields.update(dim=q.shape[1], metric=m.code, k=_k_field(k),
                      dtype=_DTYPE_CODES[c.dtype], rows=c.shape[0], queries=q.shape[0],
                      fingerprint=0 if sharded_queries else _fingerprint(q))
    except (ValueError, TypeError) as exc:
        error = exc
    cdev = _comm_device(group, device)
    rows = _exchange_descriptor(fields, error, group=group, timeout=limit, rank=rank, world=world,
                                device=cdev)
    sizes = [d["rows"] for d in rows]
    total = sum(sizes)  # the same k and sizes everywhere: every rank reaches the same verdict on k
    k = validate_k(k, total, bool(exclude_self), total if exclude_self else q.shape[0])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    impl = WithPrecision(resolve_backend(backend, device), precision)
    common = dict(sizes=sizes, offsets=offsets, group=group, timeout=limit, rank=rank, world=world, cdev=cdev)
    if sharded_queries:
        values, indices = _ring(q, c, k, m, impl, exclude_self=bool(exclude_self), **common)
    else:
        values, indices = _replicated(q, c, k, m, impl, **common)
    if is_numpy:
        return KnnResult(values.numpy(), indices.numpy())
    return KnnResult(values, indices)


def _replicated(q, c, k, m, impl, *, sizes, offsets, group, timeout, rank, world, cdev):
    """Local top-k per chunk of queries, all-gathered and merged; the gather of one chunk is in
    flight while the next chunk is searched."""
    n = q.shape[0]
    chunk = max(1, _GATHER_BYTES // (world * k * 12))
    out_v = torch.empty((n, k), dtype=torch.float32, device=q.device)
    out_i = torch.empty((n, k), dtype=torch.int64, device=q.device)

    def store(start, finish):
        out_v[start:start + chunk], out_i[start:start + chunk] = finish()

    in_flight = None  # (first row, finish) of the chunk whose candidates are travelling
    for start in range(0, n, chunk):
        qc = q[start:start + chunk]
        v, i = _local_candidates(lambda kk: safe_knn(impl, Inputs(qc, c, m, False), kk, False), qc.shape[0],
                                 sizes[rank], offsets[rank], k, m.larger_is_better, q.device)
        started = (start, _gather_candidates(v, i, k, m.larger_is_better, group=group, timeout=timeout,
                                             rank=rank, world=world, device=cdev))
        if in_flight is not None:
            store(*in_flight)
        in_flight = started
    store(*in_flight)
    return out_v, out_i


def _ring(q, c, k, m, impl, *, exclude_self, sizes, offsets, group, timeout, rank, world, cdev):
    """Each rank searches its own queries against every shard as the shards pass round the ring.

    Step s: this rank holds the shard of rank (rank - s) mod world; it sends that block to rank + 1
    and receives the next from rank - 1 while searching it, then merges the block's top-k (with
    global indices) into its running top-k.  Blocks travel as raw bytes, so every dtype (bfloat16
    included) crosses gloo and NCCL unchanged.  Memory: the own shard plus two shard-sized buffers
    (the block being searched and the one arriving).
    """
    n, d = q.shape
    dtype = c.dtype
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    best_v = torch.full((n, k), _worst_value(m.larger_is_better), dtype=torch.float32, device=q.device)
    best_i = torch.full((n, k), PAD_INDEX, dtype=torch.int64, device=q.device)
    block = c.contiguous().to(cdev).view(torch.uint8) if c.shape[0] else None
    src = rank
    for step in range(world):
        works, incoming, nsrc = [], None, (rank - step - 1) % world
        if step < world - 1:
            ops = []
            if block is not None:
                ops.append(dist.P2POp(dist.isend, block, nxt, group))
            if sizes[nsrc]:
                incoming = torch.empty((sizes[nsrc], d * c.element_size()), dtype=torch.uint8, device=cdev)
                ops.append(dist.P2POp(dist.irecv, incoming, prv, group))
            works = dist.batch_isend_irecv(ops) if ops else []
        if block is not None and n:
            shard = block.view(dtype).to(q.device)
            # exclude_self: the pair (i, i) lies in this rank's own shard, searched at step 0.
            own = exclude_self and src == rank
            v, i = _local_candidates(lambda kk: safe_knn(impl, Inputs(q, shard, m, False), kk, own), n,
                                     sizes[src] - own, offsets[src], k, m.larger_is_better, q.device)
            best_v, best_i = merge_topk(torch.cat([best_v, v], 1), torch.cat([best_i, i], 1), k,
                                        m.larger_is_better)
        for w in works:
            _wait(w, timeout, f"ring step {step + 1} of {world} (send to rank {(rank + 1) % world}, "
                             f"receive from rank {(rank - 1) % world})", rank)
        block, src = incoming, nsrc
    return best_v, best_i


# ---------------------------------------------------------------- ShardedIndex

SHARDED_FORMAT = "tlfast.sharded_index"
SHARDED_FORMAT_VERSION = 1
MANIFEST = _persist.MANIFEST


def _shard_name(rank: int) -> str:
    return f"shard-{rank:05d}"


def _is_optional(check: Callable[[Any], None]) -> Callable[[Any], None]:
    return lambda v: None if v is None else check(v)


# manifest.json of the folder, and each rank's shard-<rank>.json (same format string).
SHARDED_KIND = _persist.Kind(SHARDED_FORMAT, "sharded index", SHARDED_FORMAT_VERSION, schema={
    "world_size": _persist.is_int(1), "metric": _persist.is_str(METRICS), "dim": _is_optional(_persist.is_int(1)),
    "dtype": _persist.is_str(("float32", "float16", "bfloat16")), "ids": _persist.is_instance(bool),
    "count": _persist.is_int(0), "counts": _persist.is_list(_persist.is_int(0)),
    "shards": _persist.is_list(_persist.check_name)},
    listed=lambda meta: [n for s in meta["shards"] for n in (s, f"{s}.json", f"{s}-ids.npy")])
SHARD_RECORD_KIND = _persist.Kind(SHARDED_FORMAT, "sharded index (rank shard manifest)", SHARDED_FORMAT_VERSION,
                                  schema={"rank": _persist.is_int(0), "count": _persist.is_int(0),
                                          "index": _is_optional(_persist.check_name),
                                          "ids": _is_optional(_persist.is_record({"file": _persist.check_name,
                                                                                  "bytes": _persist.is_int(0),
                                                                                  "sha256": _persist.is_sha256}))},
                                  listed=lambda meta: ())


def _staging_path(path: Path) -> Path:
    """The staging folder of a collective save: one name every rank derives (rank 0 holds its lock)."""
    path = Path(os.path.abspath(path))
    return path.parent / f".{path.name}{_persist.TMP_TAG}sharded"


class ShardedIndex:
    """One exact :class:`tlfast.Index` per rank of a process group, searched as one corpus.

        index = ShardedIndex("cosine", dtype="float16")    # on every rank
        index.add(my_rows)                                  # local: each rank adds its own rows
        res = index.search(queries, k=10)                   # collective: same queries on every rank
        index.save("/shared/idx")                           # collective: a shard per rank + manifest
        index = ShardedIndex.load("/shared/idx")            # collective, same world size

    Rows are numbered as in :func:`knn`: rank order, then the order of ``add`` on each rank, so
    without ids ``search`` returns global positions -- exactly ``Index.search`` on one index holding
    every rank's rows in that order.  With ids (give them on every rank's ``add`` or on none),
    ``search`` returns ids; exact ties still break toward the smaller global position, and ids
    are unique within a rank (checked) and across ranks (the caller's promise: not checked, it
    would cost a collective per ``add``).

    ``add`` and ``len`` are local; ``search``, ``save`` and ``load`` are collective (every rank
    calls them) and follow :func:`knn`'s rules on agreement, errors and ``timeout``.
    ``save`` writes, under ``path`` (a directory every rank can reach, e.g. a shared filesystem):
    ``shard-<rank>/`` (that rank's ``Index.save``, checksummed), ``shard-<rank>-ids.npy`` and
    ``shard-<rank>.json`` (the rank's own manifest: count, file sizes and sha256), and, from rank 0
    once every rank has written its shard, ``manifest.json`` (world size, metric, dim, dtype,
    per-rank counts).  Every file is written to a temporary name and renamed.
    """

    def __init__(self, metric: str = "cosine", *, dim: int | None = None, dtype: str = "float32",
                 device: str | torch.device = "cpu", group=None,
                 timeout: float | datetime.timedelta | None = None) -> None:
        self.local = Index(metric, dim=dim, dtype=dtype, device=device)
        self.group = group
        self.timeout = _timeout(timeout)
        self._ids: list[np.ndarray] = []
        self._ids_given: bool | None = None  # decided by the first add
        self._lock = RWLock()  # as Index: add exclusive; search / save shared (rows and ids agree)

    def __getstate__(self) -> dict:
        if self.group is not None:
            raise TypeError("a ShardedIndex bound to a process group does not pickle (a group belongs to "
                            "one process); save it with index.save(path) on every rank and reopen it with "
                            "ShardedIndex.load(path)")
        return dict(self.__dict__)

    def __deepcopy__(self, memo) -> "ShardedIndex":
        """An independent copy of this rank's shard, in the same process group."""
        new = object.__new__(type(self))
        with self._lock.read():
            state = {k: v for k, v in self.__dict__.items() if k != "group"}
            new.__dict__.update(copy.deepcopy(state, memo))
        new.group = self.group
        return new

    @property
    def metric(self):
        return self.local.metric

    @property
    def dim(self) -> int | None:
        return self.local.dim

    def __len__(self) -> int:
        """Rows on this rank (the global size needs a collective: see ``search``'s descriptor)."""
        return len(self.local)

    def __repr__(self) -> str:
        return (f"ShardedIndex(metric={self.metric.name!r}, dim={self.dim}, dtype={self.local.dtype!r}, "
                f"local_count={len(self)})")

    @_writer
    def add(self, x: Any, ids: Any = None) -> "ShardedIndex":
        """Append rows to this rank's shard (no communication); ``ids`` as in ``Index.add``."""
        given = ids is not None
        if self._ids_given is not None and given != self._ids_given:
            raise ValueError("ids were given to some add() calls and not others; give ids to every "
                             "add() or to none")
        new = None
        if given:
            t, _ = as_tensor(x, "x")
            check_matrix(t, "x")
            new = _as_ids(ids, t.shape[0])
            seen = np.concatenate([*self._ids, new])
            if np.unique(seen).size != seen.size:
                raise ValueError("ids repeat within this rank's shard; every vector needs its own id")
        self.local.add(x)
        if new is not None:
            self._ids = [np.concatenate([*self._ids, new])]
        self._ids_given = given
        return self

    def _fields(self, op: int) -> dict[str, int]:
        return {"op": op, "dim": self.dim if self.dim is not None else _UNKNOWN, "metric": self.metric.code,
                "dtype": _DTYPE_CODES[getattr(torch, self.local.dtype)],
                "rows": len(self), "ids": _UNKNOWN if self._ids_given is None else int(self._ids_given)}

    @_reader
    def search(self, queries: Any, k: int, *, backend: str = "auto", memory_budget: Any = None) -> KnnResult:
        """The ``k`` best rows of the whole sharded corpus for each query (collective).

        Every rank passes the same ``queries`` and gets the same answer: ``KnnResult(values, ids)``
        with ids (or global positions), as ``Index.search`` on the concatenated corpus.
        ``backend`` and ``memory_budget`` apply to each rank's local search.
        """
        rank, world = _group_info(self.group)
        fields, error = self._fields(OP_INDEX_SEARCH), None
        q, is_numpy = None, False
        try:
            q, is_numpy = as_tensor(queries, "queries")
            check_matrix(q, "queries")
            if self.dim is not None and q.shape[1] != self.dim:
                raise ValueError(f"dimension mismatch: queries have dim {q.shape[1]}, the index has dim "
                                 f"{self.dim}")
            check_domain(q, "queries", self.metric)
            fields.update(dim=q.shape[1], k=_k_field(k), queries=q.shape[0],
                          fingerprint=_fingerprint(q))
        except (ValueError, TypeError) as exc:
            error = exc
        cdev = _comm_device(self.group, q.device if q is not None else torch.device("cpu"))
        rows = _exchange_descriptor(fields, error, group=self.group, timeout=self.timeout, rank=rank,
                                    world=world, device=cdev)
        sizes = [d["rows"] for d in rows]
        if sum(sizes) == 0:
            raise ValueError("the sharded index is empty on every rank; add vectors before searching")
        k = validate_k(k, sum(sizes), False, q.shape[0])
        offset = sum(sizes[:rank])
        larger = self.metric.larger_is_better

        def local(kk):
            res = self.local.search(q, kk, backend=backend, memory_budget=memory_budget)
            return res.values, res.indices

        values, positions = _local_candidates(local, q.shape[0], len(self), offset, k, larger, q.device)
        if any(d["ids"] == 1 for d in rows):  # agreed mode: a rank with no rows still sends ids
            ids = torch.full_like(positions, PAD_INDEX)
            if len(self):
                table = torch.from_numpy(self._ids[0]).to(q.device)
                real = positions != PAD_INDEX
                ids = torch.where(real, table[torch.where(real, positions - offset, 0)], ids)
            values, _, out = _gather_candidates(values, positions, k, larger, payload=ids, group=self.group,
                                                timeout=self.timeout, rank=rank, world=world, device=cdev)()
        else:
            values, out = _gather_candidates(values, positions, k, larger, group=self.group,
                                             timeout=self.timeout, rank=rank, world=world, device=cdev)()
        return KnnResult(values.numpy(), out.numpy()) if is_numpy else KnnResult(values, out)

    @_reader
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write every rank's shard and rank 0's manifest under ``path`` (collective; see class doc).

        Atomic as ``Index.save``: rank 0 creates a staging folder beside ``path``, every rank writes
        its shard into it, and rank 0 commits it in one step once all have succeeded, so ``path``
        is at every instant the old sharded index or the new one.  ``overwrite=True`` replaces only
        a sharded index (recognised by its manifest, holding nothing else)."""
        rank, world = _group_info(self.group)
        path = Path(path)
        stage = _staging_path(path)
        name = _shard_name(rank)
        cdev = _comm_device(self.group, self.local.device)
        common = dict(group=self.group, timeout=self.timeout, rank=rank, world=world, device=cdev)
        error, lock = None, None
        if rank == 0:
            try:
                _persist.recover(path)
                _persist.check_replaceable(path, SHARDED_KIND, overwrite)
                with _persist.naming(stage, "creating"):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    stage.mkdir()
                lock = _persist.lock(stage)
            except Exception as exc:
                error = exc
        try:
            rows = _exchange_descriptor(self._fields(OP_INDEX_SAVE), error, **common)
            error = None
            try:  # this rank's files; then every rank learns whether all of them succeeded
                record = {"format": SHARDED_FORMAT, "format_version": SHARDED_FORMAT_VERSION, "rank": rank,
                          "count": len(self), "index": None, "ids": None}
                if len(self):
                    self.local.save(stage / name)
                    record["index"] = name
                if self._ids_given and len(self):
                    ids_name = f"{name}-ids.npy"
                    record["ids"] = {"file": ids_name,
                                     **_persist.save_npy(stage / ids_name, np.concatenate(self._ids))}
                _persist.write_json(stage / f"{name}.json", record)
            except Exception as exc:  # disk full, permissions, ...: reported to every rank
                error = exc
            _exchange_descriptor({"op": OP_INDEX_SAVE}, error, **common)
            error = None
            if rank == 0:
                try:
                    dims = {d["dim"] for d in rows} - {_UNKNOWN}
                    _persist.write_json(stage / MANIFEST, {
                        "format": SHARDED_FORMAT, "format_version": SHARDED_FORMAT_VERSION, "world_size": world,
                        "metric": self.metric.name, "dim": dims.pop() if dims else None,
                        "dtype": self.local.dtype, "ids": any(d["ids"] == 1 for d in rows),
                        "count": sum(d["rows"] for d in rows), "counts": [d["rows"] for d in rows],
                        "shards": [_shard_name(r) for r in range(world)]})
                    _persist.check_replaceable(path, SHARDED_KIND, overwrite)
                    _persist.commit(stage, path)
                except Exception as exc:
                    error = exc
            _exchange_descriptor({"op": OP_INDEX_SAVE}, error, **common)  # nobody returns before the commit
        finally:
            if rank == 0:
                if stage.exists():  # not committed: a failure on some rank
                    shutil.rmtree(stage, ignore_errors=True)
                if lock is not None:
                    os.close(lock)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, group=None, timeout: float | datetime.timedelta | None = None,
             mmap: bool = False, device: str | torch.device = "cpu", verify: bool = True) -> "ShardedIndex":
        """Open an index written by :meth:`save`, each rank its own shard (collective).

        The world size must equal the one that saved it (resharding is not supported).  Sizes are
        always checked and sha256 sums when ``verify``; ``mmap`` and ``device`` as in ``Index.load``.
        """
        rank, world = _group_info(group)
        path = Path(path)
        limit = _timeout(timeout)
        error, index = None, None
        fields: dict[str, int] = {"op": OP_INDEX_LOAD}
        dev = torch.device("cpu")
        try:
            _persist.recover(path)
            meta = _persist.read_manifest(path, SHARDED_KIND)
            _persist.check_listing(path, SHARDED_KIND.listed(meta), "sharded index")
            if meta["world_size"] != world:
                raise ValueError(f"{path} was saved by {meta['world_size']} ranks and is loaded by {world}; "
                                 f"load it with the same world size (resharding is not supported)")
            if len(meta["counts"]) != world or len(meta["shards"]) != world:
                raise ValueError(f"{path / MANIFEST} lists {len(meta['shards'])} shards for {world} ranks; "
                                 f"the manifest is corrupted (re-save the index)")
            record = _persist.read_manifest(path, SHARD_RECORD_KIND, f"{meta['shards'][rank]}.json")
            index = cls(meta["metric"], dim=meta["dim"], dtype=meta["dtype"], device=device, group=group,
                        timeout=timeout)
            if record["count"] != meta["counts"][rank]:
                raise ValueError(f"{path}: rank {rank}'s shard holds {record['count']} rows, the manifest says "
                                 f"{meta['counts'][rank]}; re-save the index")
            if record["index"] is not None:
                index.local = Index.load(_persist.inside(path, record["index"]), mmap=mmap, device=device,
                                         verify=verify)
                if len(index.local) != record["count"]:
                    raise ValueError(f"{path / record['index']} holds {len(index.local)} rows, expected "
                                     f"{record['count']}; re-save the index")
            index._ids_given = bool(meta["ids"]) if record["count"] else None
            if record["ids"] is not None:
                ids_path = _persist.inside(path, record["ids"]["file"])
                fd = _persist.open_verified(ids_path, record["ids"], verify=verify, what="sharded index")
                ids, _ = _persist.load_npy(fd, ids_path, mmap_mode=False)
                index._ids = [_check_loaded_ids(ids, record["count"], ids_path)]
            elif meta["ids"] and record["count"]:
                raise ValueError(f"{path}: rank {rank}'s shard has no ids file but the index has ids")
            fields, dev = index._fields(OP_INDEX_LOAD), index.local.device
        except Exception as exc:  # a missing or corrupted shard on one rank fails the load on all
            error = exc
        _exchange_descriptor(fields, error, group=group, timeout=limit, rank=rank, world=world,
                             device=_comm_device(group, dev))
        return index
