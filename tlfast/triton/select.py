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
_LOW = 0xFFFFFFFF


_NEVER_KEY: tl.constexpr = tl.constexpr(-2 ** 31)  # below every ordered key (ordered(-inf) = -2**31 + 2**23 - 1)
_LOW_WORD: tl.constexpr = tl.constexpr(_LOW)
_NO_COL: tl.constexpr = tl.constexpr(2 ** 62)


@triton.jit
def ordered_keys(value, SMALLER_IS_BETTER: tl.constexpr):
    """value: float32 metric values -> int32 keys that order like the ranking (larger is better)."""
    if SMALLER_IS_BETTER:
        key = -value
    else:
        key = value
    key = tl.where(key == key, key, float("-inf"))
    key = tl.where(key == 0.0, 0.0, key)
    bits = key.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def merge_tile(best, thr, value, cols, invalid, SMALLER_IS_BETTER: tl.constexpr):
    """Merge a tile of metric values into each row's running list -> (best, thr).

    best:    [M, K_PAD] int64 running list of words, unordered; its minimum is the row's threshold.
             Slots that must never be replaced hold words above every real word (see knn kernels).
    thr:     [M] int64, min(best, 1): carried between tiles, so a tile that changes nothing costs
             no pass over the list;
    value:   [M, N] float32 metric values; cols: [N] int64 corpus indices;
    invalid: [M, N] bool, entries that must never be picked.

    A float pre-filter keeps most tiles to a compare per entry: an entry can only enter when its
    key is >= the row's threshold key (ties may still win on the index), or is NaN.  Only if one
    passes does the tile become int32 ordered keys (:func:`_insert`).
    """
    if SMALLER_IS_BETTER:
        key = -value
    else:
        key = value
    thr_key = (thr >> 32).to(tl.int32)
    thr_float = (thr_key ^ ((thr_key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    thr_float = tl.where(thr_key == _NEVER_KEY, float("-inf"), thr_float)  # a list not yet filled
    maybe = ((key >= thr_float[:, None]) | (key != key)) & (invalid == 0)
    if tl.max(tl.max(maybe.to(tl.int32), 1), 0) > 0:
        best, thr = _insert(best, thr, tl.where(invalid, _NEVER_KEY, ordered_keys(value, SMALLER_IS_BETTER)), cols)
    return best, thr


@triton.jit
def _insert(best, thr, keys, cols):
    """merge_tile's insertion rounds.  keys: [M, N] int32 ordered keys, _NEVER_KEY where invalid.

    The tile stays in int32 keys: a candidate's word (key << 32 | ~col) is formed only for the one
    entry per row that enters, so the tile never costs the registers of a tile of int64 words.  An
    entry beats the threshold word (thr_key, thr_col) when key > thr_key, or key == thr_key and
    col < thr_col (ties go to the smaller index).  Each round moves every row's best remaining
    candidate (largest key, then smallest col) into the slot of its current minimum, while some
    row still has a candidate: as many rounds as the busiest row has entries that enter (at most k
    per tile, and after the first tiles usually none).
    """
    thr_key = (thr >> 32).to(tl.int32)
    thr_col = _LOW_WORD - (thr & _LOW_WORD)
    cand = (keys > thr_key[:, None]) | ((keys == thr_key[:, None]) & (cols[None, :] < thr_col[:, None])
                                        & (keys != _NEVER_KEY))
    while tl.max(tl.max(cand.to(tl.int32), 1), 0) > 0:
        top_key = tl.max(tl.where(cand, keys, _NEVER_KEY), 1)
        top_col = tl.min(tl.where(cand & (keys == top_key[:, None]), cols[None, :], _NO_COL), 1)
        take = top_col != _NO_COL
        top = (top_key.to(tl.int64) << 32) | (_LOW_WORD - top_col)
        best = tl.where((best == thr[:, None]) & take[:, None], top[:, None], best)
        keys = tl.where(cols[None, :] == top_col[:, None], _NEVER_KEY, keys)
        thr = tl.min(best, 1)
        thr_key = (thr >> 32).to(tl.int32)
        thr_col = _LOW_WORD - (thr & _LOW_WORD)
        cand = (keys > thr_key[:, None]) | ((keys == thr_key[:, None]) & (cols[None, :] < thr_col[:, None])
                                            & (keys != _NEVER_KEY))
    return best, thr


def pack_words_torch(values: torch.Tensor, cols: torch.Tensor, smaller_is_better: bool) -> torch.Tensor:
    """Words of a tile (the order :func:`merge_tile` keeps, key << 32 | ~index): values [M, N] float32, cols [N] int64 -> [M, N] int64."""
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
