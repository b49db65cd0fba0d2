"""Batch planning for extraction: length-sorted token-budget batches, padding, and prefetching.

Padding is wasted work: a batch costs ``batch * longest`` token slots (more for attention), so
sorting by length and filling each batch up to a token budget keeps every batch dense.  Results
are written back by position, so the caller sees its input order.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")


def plan_batches(lengths: Sequence[int] | np.ndarray, batch_size: int, max_tokens: int | None) -> list[np.ndarray]:
    """Positions of each batch: longest first, at most ``batch_size`` items and, if ``max_tokens``
    is set, at most ``max_tokens`` padded slots (``len(batch) * longest``; an item longer than the
    budget goes alone).  Longest first makes the biggest batch the first one, so an out-of-memory
    error comes at once rather than at the end of a long run."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = max(int(lengths[order[start]]), 1)
        size = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // longest))
        batches.append(order[start:start + size])
        start += size
    return batches


def pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int64 arrays of shape (len(sequences), longest), right-padded with ``pad_id``."""
    longest = max(len(s) for s in sequences)
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask


def prefetch(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``map(fn, items)`` with ``fn`` of the next item running in a worker thread while the caller
    consumes the current result: tokenising / decoding the next batch overlaps the model (the
    tokenizer, PIL and torch all release the GIL while they work)."""
    items = list(items)
    if len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlfast-prefetch") as pool:
        future = pool.submit(fn, items[0])
        for nxt in items[1:]:
            result = future.result()
            future = pool.submit(fn, nxt)
            yield result
        yield future.result()
