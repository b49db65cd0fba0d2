"""k-selection for the Triton kernels: packed (key, index) words, the running top-k, the merge.

Every candidate is one int64 word that orders exactly like the contract's ranking::

    word = ordered(key) << 32 | (2**32 - 1 - index)        key = value or -value (larger is better)

``ordered`` maps a float32 to an int32 with the same order (flip the magnitude bits of negative
floats), so comparing words compares keys first and, for equal keys, prefers the smaller corpus
index.  Words are unique per (query, index), so "the k largest words" is the answer with ties
already resolved: no stable sort is needed anywhere, and any selection (a running list in
registers, ``torch.topk`` over split partials, a CUDA select) returns the same indices.
NaN keys become -inf (a NaN never outranks a number) and -0.0 becomes +0.0 (equal keys, equal words).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Worse than every real word (the smallest real word is ordered(-inf) << 32 ~ -2**62.99):
# marks columns that must never be picked (past the corpus end, the excluded self pair).
NEVER = -(2 ** 63 - 1)
_NEVER: tl.constexpr = tl.constexpr(NEVER)
_LOW = 0xFFFFFFFF


@triton.jit
def pack_words(value, cols, SMALLER_IS_BETTER: tl.constexpr):
    """value: [M, N] float32 metric values; cols: [N] int64 corpus indices -> [M, N] int64 words."""
    if SMALLER_IS_BETTER:
        key = -value
    else:
        key = value
    key = tl.where(key == key, key, float("-inf"))
    key = tl.where(key == 0.0, 0.0, key)
    bits = key.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - cols).to(tl.int64)[None, :]


# The smallest real word: key -inf (ordered 0x807FFFFF), index 2**32 - 1.
_LOWEST_REAL: tl.constexpr = tl.constexpr(-2139095041 * 2 ** 32)


@triton.jit
def merge_tile(best, value, cols, invalid, SMALLER_IS_BETTER: tl.constexpr):
    """Fold a tile of metric values into each row's running list (see :func:`insert_tile`).

    best: [M, K_PAD] int64 running list; value: [M, N] float32; cols: [N] int64 corpus indices;
    invalid: [M, N] bool, entries that must never be picked.

    A float pre-filter keeps most tiles to one compare per entry: an entry can only enter when its
    key is >= the key of the row's k-th best word (ties may still win on the index), or is NaN.
    Only if some entry passes is the tile packed into words and inserted.
    """
    if SMALLER_IS_BETTER:
        key = -value
    else:
        key = value
    thr = tl.min(best, 1)
    hi = (thr >> 32).to(tl.int32)
    thr_key = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    thr_key = tl.where(thr < _LOWEST_REAL, float("-inf"), thr_key)  # a not yet filled list
    maybe = ((key >= thr_key[:, None]) | (key != key)) & (invalid == 0)
    if tl.max(tl.max(maybe.to(tl.int32), 1), 0) > 0:
        best = insert_tile(best, tl.where(invalid, _NEVER, pack_words(value, cols, SMALLER_IS_BETTER)))
    return best


@triton.jit
def insert_tile(best, words):
    """Merge a tile of candidate words into each row's running list.

    best:  [M, K_PAD] int64, the running list, unordered; its minimum is the row's threshold.
           Slots that must never be replaced hold words above every real word (see knn kernels).
    words: [M, N] int64, this tile's candidates (NEVER where invalid).

    Each round moves every row's best remaining candidate into the slot of its current minimum,
    while some row still has a candidate above its threshold: as many rounds as the busiest row
    has entries that enter (at most k per tile, and after the first tiles usually none or one).
    """
    thr = tl.min(best, 1)
    cand = words > thr[:, None]
    while tl.max(tl.max(cand.to(tl.int32), 1), 0) > 0:
        top = tl.max(tl.where(cand, words, _NEVER), 1)
        take = top > thr
        best = tl.where((best == thr[:, None]) & take[:, None], top[:, None], best)
        words = tl.where(words == top[:, None], _NEVER, words)
        thr = tl.min(best, 1)
        cand = words > thr[:, None]
    return best


def pack_words_torch(values: torch.Tensor, cols: torch.Tensor, smaller_is_better: bool) -> torch.Tensor:
    """The torch twin of :func:`pack_words`: values [M, N] float32, cols [N] int64 -> [M, N] int64."""
    key = -values if smaller_is_better else values.clone()
    key = torch.where(key == key, key, float("-inf"))
    key = torch.where(key == 0, 0.0, key)
    bits = key.contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(torch.int64) << 32) | (_LOW - cols)[None, :]


def unpack_words(words: torch.Tensor, smaller_is_better: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, k] int64 words -> (values float32, indices int64)."""
    hi = (words >> 32).to(torch.int32)
    key = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).view(torch.float32)
    values = torch.where(key == 0, 0.0, -key) if smaller_is_better else key
    return values, _LOW - (words & _LOW)


def top_words(words: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest words of each row, largest first: merges split partials or tile candidates.
    Words are unique, so this is deterministic whatever algorithm torch.topk uses."""
    return torch.topk(words, k, dim=1, largest=True, sorted=True).values
