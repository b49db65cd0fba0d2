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

Both return exactly what ``tlfast.knn`` returns on the concatenated corpus: the merge orders
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
destroy it and restart the job (as torchrun's elastic agent does).
"""
from __future__ import annotations

import datetime
import zlib
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from ._validate import as_tensor, check_domain, check_matrix, validate_k
from .backends import resolve as resolve_backend
from .metrics import METRICS, get_metric
from .ops import KnnResult

__all__ = ["PeerError", "knn", "merge_topk"]

# Index that sorts after every real global index: marks padding candidates.
PAD_INDEX = torch.iinfo(torch.int64).max
# Bytes a rank may hold in gathered candidates at once (replicated mode); queries go in chunks.
_GATHER_BYTES = 256 << 20
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
# Descriptor layout: _FIELDS int64 values, then an error message of _MSG_BYTES utf-8 bytes.
_FIELDS = ("status", "op", "dim", "metric", "k", "dtype", "rows", "queries", "sharded", "fingerprint")
_MSG_BYTES = 480
_STATUS_OK, _STATUS_VALUE, _STATUS_TYPE = 0, 1, 2
OP_KNN, OP_INDEX_SEARCH, OP_INDEX_ADD = 1, 2, 3


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


def comm_device(group, data_device: torch.device) -> torch.device:
    """Where collective buffers live: the data's GPU under NCCL, else the CPU (gloo)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        if data_device.type == "cuda":
            return data_device
        if "gloo" not in backend:
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wait(work, timeout: datetime.timedelta | None, what: str, rank: int) -> None:
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


def all_gather(t: torch.Tensor, group, timeout, what: str, rank: int, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    wait(dist.all_gather(out, t, group=group, async_op=True), timeout, what, rank)
    return out


# ---------------------------------------------------------------- the call descriptor

def exchange_descriptor(fields: dict[str, int], error: BaseException | None, *, group, timeout,
                        rank: int, world: int, device: torch.device) -> list[dict[str, int]]:
    """All-gather this rank's call descriptor; raise the same error on every rank if any rank's
    inputs were rejected or the ranks disagree on op / dim / metric / k / dtype / sharded.

    Returns every rank's fields (rows and queries per rank, in rank order).
    """
    status = _STATUS_OK
    message = ""
    if error is not None:
        status = _STATUS_TYPE if isinstance(error, TypeError) else _STATUS_VALUE
        message = str(error)
    values = [status] + [int(fields.get(name, 0)) for name in _FIELDS[1:]]
    head = np.asarray(values, dtype=np.int64).view(np.uint8)
    msg = np.zeros(_MSG_BYTES, dtype=np.uint8)
    raw = message.encode("utf-8", "replace")[:_MSG_BYTES]
    msg[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    mine = torch.from_numpy(np.concatenate([head, msg])).to(device)
    gathered = all_gather(mine, group, timeout, "the call-descriptor all-gather", rank, world)
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
            cls = TypeError if d["status"] == _STATUS_TYPE else ValueError
            raise cls(f"rank {r} rejected its inputs: {d['message']}")
    names = {"op": None, "dim": None, "metric": None, "k": None, "dtype": None, "sharded": None}
    if not fields.get("sharded", 0):
        names.update(queries=None, fingerprint=None)
    for name in names:
        seen = [d[name] for d in rows]
        if len(set(seen)) > 1:
            raise ValueError(f"ranks disagree on {_describe(name)}: {_per_rank(name, seen)}; every rank "
                             f"must make the same call{_hint(name)}")
    return rows


def _describe(name: str) -> str:
    return {"op": "the operation", "dim": "the vector dimension", "metric": "the metric",
            "k": "k", "dtype": "the corpus dtype", "sharded": "sharded_queries",
            "queries": "the number of queries", "fingerprint": "the queries (checksums differ)"}[name]


def _per_rank(name: str, seen: list[int]) -> str:
    fmt = {"metric": lambda v: next((m.name for m in METRICS.values() if m.code == v), str(v)),
           "dtype": lambda v: str(_DTYPES.get(v, v)).replace("torch.", ""),
           "op": lambda v: {OP_KNN: "knn", OP_INDEX_SEARCH: "ShardedIndex.search",
                            OP_INDEX_ADD: "ShardedIndex.add"}.get(v, str(v)),
           "sharded": lambda v: str(bool(v)),
           "fingerprint": lambda v: f"{v:08x}"}.get(name, str)
    return ", ".join(f"rank {r}: {fmt(v)}" for r, v in enumerate(seen))


def _hint(name: str) -> str:
    if name in ("queries", "fingerprint"):
        return (" (without sharded_queries every rank passes the same queries; pass "
                "sharded_queries=True to search each rank's own queries)")
    if name == "dtype":
        return " (cast every shard to one dtype)"
    return ""


def fingerprint(t: torch.Tensor) -> int:
    """CRC-32 of the bytes of ``t``: cheap evidence that replicated queries are the same everywhere."""
    a = t.detach().contiguous().cpu()
    return zlib.crc32(a.view(torch.uint8).reshape(-1).numpy()) if a.numel() else 0


# ---------------------------------------------------------------- merging candidates

def worst_value(larger_is_better: bool) -> float:
    return float("-inf") if larger_is_better else float("inf")


def merge_topk(values: torch.Tensor, indices: torch.Tensor, k: int, larger_is_better: bool):
    """The best ``k`` of (n, c) candidates per row, best first, exact ties to the smaller index.

    Equivalent to sorting each row by the key (value, index) -- value in the metric's direction --
    and keeping the first k: a stable sort by index, then a stable sort by value.  Padding
    (worst value, ``PAD_INDEX``) therefore sorts after every real candidate, even a real one with
    the worst value (+inf KL).
    """
    by_index = torch.argsort(indices, dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = torch.argsort(values, dim=1, descending=larger_is_better, stable=True)[:, :k]
    return values.gather(1, by_value), indices.gather(1, by_value)


def local_candidates(search: Callable[[int], tuple[torch.Tensor, torch.Tensor]], n: int, rows: int,
                     offset: int, k: int, larger_is_better: bool, device: torch.device):
    """(n, k) candidates from one shard with global indices, padded when the shard has < k rows.

    ``search(kk)`` returns the shard's (values, local indices) for its best ``kk = min(k, rows)``.
    """
    values = torch.full((n, k), worst_value(larger_is_better), dtype=torch.float32, device=device)
    indices = torch.full((n, k), PAD_INDEX, dtype=torch.int64, device=device)
    kk = min(k, rows)
    if kk and n:
        v, i = search(kk)
        values[:, :kk] = v.to(device)
        indices[:, :kk] = i.to(device) + offset
    return values, indices


def gather_and_merge(values: torch.Tensor, indices: torch.Tensor, k: int, larger_is_better: bool, *,
                     group, timeout, rank: int, world: int, device: torch.device):
    """All-gather every rank's (n, k) candidates and merge them into the global best k.

    One collective per call: value (4 bytes) and index (8 bytes) travel packed in a (n, 12k) byte
    tensor, the ``world * k * 12`` bytes per query of the cost model (benchmarks/SCALING.md).
    """
    n = values.shape[0]
    packed = torch.cat([values.contiguous().view(torch.uint8), indices.contiguous().view(torch.uint8)],
                       dim=1).to(device)
    parts = all_gather(packed, group, timeout, "the candidate all-gather", rank, world)
    both = torch.cat(parts, dim=1).reshape(n, world, 12 * k).to(values.device)
    all_values = both[:, :, :4 * k].contiguous().view(torch.float32).reshape(n, world * k)
    all_indices = both[:, :, 4 * k:].contiguous().view(torch.int64).reshape(n, world * k)
    return merge_topk(all_values, all_indices, k, larger_is_better)


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
    check_domain(q, "queries", m)
    check_domain(c, "local_corpus", m)
    return q, c, m, q_np


def _check_rows(t: torch.Tensor, name: str, allow_empty: bool) -> None:
    if allow_empty and t.dim() == 2 and t.shape[0] == 0 and t.shape[1] > 0:
        return
    check_matrix(t, name)


def knn(queries: Any, local_corpus: Any, k: int, metric: str = "cosine", *, sharded_queries: bool = False,
        group=None, timeout: float | datetime.timedelta | None = None, backend: str = "auto") -> KnnResult:
    """Exact kNN against a corpus sharded across the ranks of ``group``; call it on every rank.

    Args:
        queries: (n, d) array or tensor.  Without ``sharded_queries``: the same on every rank (checked
            by a CRC-32), and every rank gets the same answer.  With it: this rank's own queries
            (may be empty), answered against the whole corpus.
        local_corpus: (m_r, d) this rank's shard (may be empty); rank order defines global indices.
        k: neighbours per query, 1 <= k <= total corpus rows; the same on every rank.
        metric: as in :func:`tlfast.knn`; the same on every rank.
        sharded_queries: pass corpus blocks round a ring instead of gathering candidates.
        group: a ``torch.distributed`` process group (default: the world).
        timeout: seconds (or timedelta) each collective may take before :class:`PeerError`.
        backend: the local kNN backend, as in :func:`tlfast.knn`.

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
    fields: dict[str, int] = {"op": OP_KNN, "sharded": int(bool(sharded_queries))}
    device = torch.device("cpu")
    try:
        q, c, m, is_numpy = _validate_local(queries, local_corpus, metric, bool(sharded_queries))
        device = q.device
        fields.update(dim=q.shape[1], metric=m.code, k=k if isinstance(k, int) else -1,
                      dtype=_DTYPE_CODES[c.dtype], rows=c.shape[0], queries=q.shape[0],
                      fingerprint=0 if sharded_queries else fingerprint(q))
    except (ValueError, TypeError) as exc:
        error = exc
    cdev = comm_device(group, device)
    rows = exchange_descriptor(fields, error, group=group, timeout=limit, rank=rank, world=world,
                               device=cdev)
    sizes = [d["rows"] for d in rows]
    k = validate_k(k, sum(sizes), False, q.shape[0])  # the same k and sizes everywhere: all agree
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    impl = resolve_backend(backend, device)
    search = _ring if sharded_queries else _replicated
    values, indices = search(q, c, k, m, impl, sizes=sizes, offsets=offsets, group=group,
                             timeout=limit, rank=rank, world=world, cdev=cdev)
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
    for start in range(0, n, chunk):
        qc = q[start:start + chunk]
        v, i = local_candidates(lambda kk: impl.knn(qc, c, kk, m, False), qc.shape[0], sizes[rank],
                                offsets[rank], k, m.larger_is_better, q.device)
        v, i = gather_and_merge(v, i, k, m.larger_is_better, group=group, timeout=timeout, rank=rank,
                                world=world, device=cdev)
        out_v[start:start + chunk], out_i[start:start + chunk] = v, i
    return out_v, out_i


def _ring(q, c, k, m, impl, *, sizes, offsets, group, timeout, rank, world, cdev):
    """Each rank searches its own queries against every shard as the shards pass round the ring.

    Step s: this rank holds the shard of rank (rank - s) mod world; it sends that block to rank + 1
    and receives the next from rank - 1 while searching it, then merges the block's top-k (with
    global indices) into its running top-k.  Blocks travel as raw bytes, so every dtype (bfloat16
    included) crosses gloo and NCCL unchanged.
    """
    n, d = q.shape
    dtype = c.dtype
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    best_v = torch.full((n, k), worst_value(m.larger_is_better), dtype=torch.float32, device=q.device)
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
            v, i = local_candidates(lambda kk: impl.knn(q, shard, kk, m, False), n, sizes[src],
                                    offsets[src], k, m.larger_is_better, q.device)
            best_v, best_i = merge_topk(torch.cat([best_v, v], 1), torch.cat([best_i, i], 1), k,
                                        m.larger_is_better)
        for w in works:
            wait(w, timeout, f"ring step {step + 1} of {world} (send to rank {(rank + 1) % world}, "
                             f"receive from rank {(rank - 1) % world})", rank)
        block, src = incoming, nsrc
    return best_v, best_i
