"""Fused distance + top-k in Triton: exact kNN for ip, cosine, l2, kl and js without the (n, m) matrix.

One program owns BLOCK_M queries and a range of the corpus.  It walks that range in tiles of
BLOCK_N rows, computes the (BLOCK_M, BLOCK_N) tile of metric values in registers and folds it
into a running top-k per query (``select.merge_tile``); the tile never reaches global memory.
When there are few query blocks the corpus is split across programs (split-K style) and the
partial lists are merged by ``select.top_words``.  k above ``FUSED_MAX_K`` takes a two-stage path:
the same tile kernel writes bounded (query chunk, corpus chunk) tiles that ``torch.topk`` folds
into the running list.

Every metric is a matrix product plus an epilogue (the maths of csrc/cpu/fused_knn.h):

    ip      <q, c>
    cosine  <q, c> * iq * ic                     iq, ic: inverse row norms, precomputed once
    l2      |q|^2 + |c|^2 - 2 <q, c>, clamped at 0
    kl      sum q log q - <q, log c>             log c precomputed once (0 where c == 0), and
                                                 +inf where <[q > 0], [c == 0]> > 0, a second
                                                 product run only on tiles holding a zero
    js      see tlfast/triton/js.py (one log per pair and dim, no product form)

Products run on tensor cores in the input dtype (fp16 / bf16; fp32 as 3xTF32, which keeps fp32
accuracy) with fp32 accumulation.  Equivalent to ``tlfast.reference.knn`` / ``.pairwise``.

Block sizes are autotuned on the GPU (``TLFAST_TRITON_AUTOTUNE=0``: a fixed config).  Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors with fixed block sizes, and bf16 operands
are widened to fp32 (the interpreter's bf16 ``tl.dot`` is wrong).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..metrics import Metric
from .js import js_epilogue, js_slog2s
from .select import NEVER, merge_tile, pack_words_torch, top_words, unpack_words

__all__ = ["knn", "pairwise", "FUSED_MAX_K", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Largest k kept in registers by the fused kernel; above it the two-stage path runs.
FUSED_MAX_K = 128
# Two-stage path: elements of one (query chunk x corpus chunk) tile of values (64 MiB of fp32).
TILE_ELEMENTS = 1 << 24
# Row chunk of the O(n d) preprocessing (row terms, log c), bounding its fp32 temporaries.
PREP_ROWS = 65536

IP: tl.constexpr = tl.constexpr(0)
COSINE: tl.constexpr = tl.constexpr(1)
L2: tl.constexpr = tl.constexpr(2)
KL: tl.constexpr = tl.constexpr(3)
JS: tl.constexpr = tl.constexpr(4)
_MAX_WORD: tl.constexpr = tl.constexpr(2 ** 63 - 1)
_NEVER: tl.constexpr = tl.constexpr(NEVER)


@triton.jit
def _tile_values(q_ptr,      # [nq, d] queries (operand dtype), row stride stride_q
                 c_ptr,      # [n, d] corpus operand: rows as given, or log c for kl; stride stride_c
                 craw_ptr,   # [n, d] kl only: the corpus itself, to find c == 0; stride stride_c
                 qterm_ptr,  # [nq] float32: l2 |q|^2, cosine 1/|q|, kl sum q log q, js t(q)
                 cterm_ptr,  # [n] float32: l2 |c|^2, cosine 1/|c|, js t(c)
                 czero_ptr,  # [n] int8 kl only: 1 where the corpus row has an exact zero
                 rows,       # [BLOCK_M] int64 query rows of this tile
                 cols,       # [BLOCK_N] int64 corpus rows of this tile
                 nq, n, d, stride_q, stride_c,
                 METRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32 metric values; rows/cols past the ends give unused values."""
    row_ok = rows < nq
    col_ok = cols < n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < d
        qt = tl.load(q_ptr + rows[:, None] * stride_q + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        ct = tl.load(c_ptr + cols[:, None] * stride_c + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if METRIC == JS:
            acc += js_slog2s(qt.to(tl.float32), ct.to(tl.float32))
        else:
            acc = tl.dot(qt, tl.trans(ct), acc, input_precision=PRECISION)
    if METRIC == IP:
        value = acc
    else:
        qterm = tl.load(qterm_ptr + rows, mask=row_ok, other=0.0)
        if METRIC == KL:
            value = qterm[:, None] - acc
            zero = tl.load(czero_ptr + cols, mask=col_ok, other=0)
            if tl.max(zero, 0) > 0:
                # Support gap: count dims with q > 0 and c == 0 as a product of indicators (exact
                # in fp32 accumulation), only for the rare tiles whose corpus rows have zeros.
                gap = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for d0 in range(0, d, BLOCK_D):
                    dd = d0 + tl.arange(0, BLOCK_D)
                    d_ok = dd < d
                    qt = tl.load(q_ptr + rows[:, None] * stride_q + dd[None, :],
                                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                    cr = tl.load(craw_ptr + cols[:, None] * stride_c + dd[None, :],
                                 mask=col_ok[:, None] & d_ok[None, :], other=1.0)
                    gap = tl.dot((qt > 0).to(tl.float16), tl.trans((cr == 0).to(tl.float16)), gap)
                value = tl.where(gap > 0.0, float("inf"), value)
        else:
            cterm = tl.load(cterm_ptr + cols, mask=col_ok, other=0.0)
            if METRIC == COSINE:
                value = acc * qterm[:, None] * cterm[None, :]
            elif METRIC == L2:
                value = tl.maximum(qterm[:, None] + cterm[None, :] - 2.0 * acc, 0.0)
            else:
                value = js_epilogue(acc, qterm, cterm)
    return value


@triton.jit
def _knn_kernel(q_ptr, c_ptr, craw_ptr, qterm_ptr, cterm_ptr, czero_ptr,  # as in _tile_values
                out_ptr,  # [splits, nq, k] int64 packed words: each split's k best, unordered
                nq, n, d, k, cols_per_split, stride_q, stride_c,
                METRIC: tl.constexpr, SMALLER_IS_BETTER: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.arange(0, K_PAD).to(tl.int64)
    # Slots < k start as distinct words below every real word; slots >= k hold words above every
    # real word, so they are never the minimum and the list's minimum is always the k-th best.
    init = tl.where(slot < k, _NEVER + 1 + slot, _MAX_WORD - slot)
    best = tl.zeros([BLOCK_M, K_PAD], dtype=tl.int64) + init[None, :]
    thr = tl.min(best, 1)
    col_start = split.to(tl.int64) * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n)
    for c0 in range(col_start, col_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        value = _tile_values(q_ptr, c_ptr, craw_ptr, qterm_ptr, cterm_ptr, czero_ptr, rows, cols,
                             nq, n, d, stride_q, stride_c, METRIC, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        # Padding rows are invalid too, so that they never keep the insertion loop running.
        invalid = (cols >= col_end)[None, :] | (rows >= nq)[:, None]
        if EXCLUDE_SELF:
            invalid = invalid | (rows[:, None] == cols[None, :])
        best, thr = merge_tile(best, thr, value, cols, invalid, SMALLER_IS_BETTER)
    out = out_ptr + (split.to(tl.int64) * nq + rows[:, None]) * k + slot[None, :]
    tl.store(out, best, mask=(rows[:, None] < nq) & (slot[None, :] < k))


@triton.jit
def _pairwise_kernel(q_ptr, c_ptr, craw_ptr, qterm_ptr, cterm_ptr, czero_ptr,  # as in _tile_values
                     out_ptr,  # [nq, n] float32, row stride stride_out
                     nq, n, d, stride_q, stride_c, stride_out,
                     METRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # Corpus blocks on grid axis 0 (up to 2**31 - 1; axis 1 stops at 65535).
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    value = _tile_values(q_ptr, c_ptr, craw_ptr, qterm_ptr, cterm_ptr, czero_ptr, rows, cols,
                         nq, n, d, stride_q, stride_c, METRIC, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], value,
             mask=(rows[:, None] < nq) & (cols[None, :] < n))


# Launch configurations, chosen from the static compile table (benchmarks/results/gpu-static.md,
# docs/design/gpu.md): every one compiles for sm_80 and sm_90 without spills, and every GEMM one
# runs its product on wgmma on sm_90.  BLOCK_M is 64 for the GEMM metrics whatever k (one Hopper
# warpgroup's wgmma is 64 rows tall: 32-row tiles fall back to mma.sync); js has no product and
# keeps 32 rows, whose (BLOCK_M, BLOCK_N, BLOCK_D) block of s log s is what its registers hold.
# fp32 operands (3xTF32: three products on hi/lo splits) take BLOCK_D 16 and kl (two products:
# log c and the zero-support count) BLOCK_D 32: the depths at which sm_80's mma.sync keeps its
# operands in registers without spilling (at 64 / 32 it spills).
# Keys: (family, K_PAD > SMALL_K).  The first config of each list is the one used without
# autotuning; few configs, since each is compiled and timed once per autotune key.
SMALL_K = 32
_CONFIGS = {
    ("gemm", False): [(128, 64, 8, 3), (64, 64, 4, 3)],
    ("gemm", True): [(64, 64, 8, 3), (128, 64, 8, 3)],
    ("gemm-kl", False): [(128, 32, 8, 3), (64, 32, 4, 3)],
    ("gemm-kl", True): [(64, 32, 8, 3), (128, 32, 8, 3)],
    ("gemm-tf32x3", False): [(64, 16, 8, 3)],
    ("gemm-tf32x3", True): [(64, 16, 8, 3)],
    ("js", False): [(64, 4, 4, 2)],
    ("js", True): [(64, 4, 8, 2)],
}


def _family(metric: Metric, precision: str | None) -> str:
    if metric.name == "js":
        return "js"
    return "gemm-tf32x3" if precision == "tf32x3" else ("gemm-kl" if metric.name == "kl" else "gemm")


def _gpu_configs(family: str, large_k: bool = False) -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=st)
            for bn, bd, w, st in _CONFIGS[(family, large_k)]]


def _block_m(js: bool) -> int:
    return 32 if js and not INTERPRET else 64  # the interpreter: fewer, larger programs


# TLFAST_TRITON_AUTOTUNE=0 launches the first config instead of tuning (bounded compile time, for
# tests).  The interpreter cannot autotune: it gets fixed large blocks, so that few programs and
# loop steps run.
AUTOTUNE = not INTERPRET and os.environ.get("TLFAST_TRITON_AUTOTUNE", "1") != "0"
_INTERPRET_META = {"BLOCK_N": 128, "BLOCK_D": 64}
_INTERPRET_META_JS = {"BLOCK_N": 128, "BLOCK_D": 32}


def _pairwise_configs(family: str) -> list[triton.Config]:
    # The tile writer of the two-stage path and of pairwise(): the first config only (the second
    # 4-warp kl config spills 32 B on sm_80 here), so its autotuning compiles once.
    return _gpu_configs(family)[:1]


def _tuned(kernel, configs: list[triton.Config], key: list[str]):
    return triton.autotune(configs=configs, key=key)(kernel) if AUTOTUNE else kernel


_KNN_KEY = ["d", "METRIC", "K_PAD", "EXCLUDE_SELF"]
_KNN = {key: _tuned(_knn_kernel, _gpu_configs(*key), _KNN_KEY) for key in _CONFIGS}
_PAIRWISE = {family: _tuned(_pairwise_kernel, _pairwise_configs(family), ["d", "METRIC"])
             for family, large in _CONFIGS if not large}


def _meta(metric: Metric, family: str, large_k: bool = False) -> dict:
    """Launch meta-parameters that autotuning does not supply."""
    if INTERPRET:
        return dict(_INTERPRET_META_JS if family == "js" else _INTERPRET_META)
    if AUTOTUNE:
        return {}
    cfg = _gpu_configs(family, large_k)[0]
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _k_pad(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


class _Operands:
    """Everything the kernels read, prepared once per call: the product operands in the compute
    dtype, the per-row terms of the epilogue, and kl's log-corpus and zero flags."""

    def __init__(self, q: torch.Tensor, c: torch.Tensor, metric: Metric):
        self.metric = metric
        dtype = q.dtype
        if dtype == torch.float64 or (INTERPRET and dtype == torch.bfloat16):
            dtype = torch.float32
        self.precision = "tf32x3" if dtype == torch.float32 else None
        self.q = q.to(dtype).contiguous()
        self.craw = self.q if c is q else c.to(dtype).contiguous()
        self.c = self.craw
        # Unused terms stay zero: O(nq + n) memory buys one kernel signature for every metric.
        self.qterm = torch.zeros(self.q.shape[0], dtype=torch.float32, device=q.device)
        self.cterm = torch.zeros(self.craw.shape[0], dtype=torch.float32, device=q.device)
        self.czero = torch.zeros(self.craw.shape[0], dtype=torch.int8, device=q.device)
        name = metric.name
        if name == "cosine":
            self.qterm = _row_map(self.q, lambda x: x.norm(dim=1).reciprocal())
            self.cterm = self.qterm if c is q else _row_map(self.craw, lambda x: x.norm(dim=1).reciprocal())
        elif name == "l2":
            self.qterm = _row_map(self.q, lambda x: (x * x).sum(1))
            self.cterm = self.qterm if c is q else _row_map(self.craw, lambda x: (x * x).sum(1))
        elif name == "kl":
            self.qterm = _row_map(self.q, lambda x: torch.special.xlogy(x, x).sum(1))
            self.c = torch.empty_like(self.craw)
            for i in range(0, self.craw.shape[0], PREP_ROWS):
                x = self.craw[i:i + PREP_ROWS].float()
                self.c[i:i + PREP_ROWS] = torch.where(x > 0, torch.log(x), 0.0)
                self.czero[i:i + PREP_ROWS] = (x == 0).any(1)
        elif name == "js":
            def t(x):
                return 0.5 * (torch.special.xlogy(x, x).sum(1) + math.log(2.0) * x.sum(1))
            self.qterm = _row_map(self.q, t)
            self.cterm = self.qterm if c is q else _row_map(self.craw, t)

    def pointers(self, q_rows: slice = slice(None), c_rows: slice = slice(None)):
        """The six kernel operands, restricted to a block of query rows and corpus rows."""
        return (self.q[q_rows], self.c[c_rows], self.craw[c_rows], self.qterm[q_rows],
                self.cterm[c_rows], self.czero[c_rows])


def _row_map(x: torch.Tensor, fn) -> torch.Tensor:
    """fn over fp32 row chunks of x -> [rows] float32, holding one chunk's fp32 copy at a time."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], PREP_ROWS):
        out[i:i + PREP_ROWS] = fn(x[i:i + PREP_ROWS].float())
    return out


def _auto_splits(q_blocks: int, n: int, device: torch.device) -> int:
    """Corpus splits so that the grid fills the device about twice over (1 under the interpreter)."""
    if INTERPRET or device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(n, 256), triton.cdiv(programs, q_blocks)))


def knn(q: torch.Tensor, c: torch.Tensor, k: int, metric: Metric, exclude_self: bool = False, *,
        splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k best corpus rows per query: (values float32 [nq, k], indices int64 [nq, k]), best first,
    ties to the smaller index.  ``splits`` forces the number of corpus splits (default: fill the GPU).
    Inputs are validated tensors on one device (CUDA, or CPU under the interpreter)."""
    ops = _Operands(q, c, metric)
    if k > FUSED_MAX_K:
        words = _knn_two_stage(ops, k, exclude_self)
    else:
        nq, d = ops.q.shape
        n = ops.c.shape[0]
        js = metric.name == "js"
        k_pad = _k_pad(k)
        large_k = k_pad > SMALL_K
        block_m = _block_m(js)
        q_blocks = triton.cdiv(nq, block_m)
        splits = splits or _auto_splits(q_blocks, n, q.device)
        cols_per_split = triton.cdiv(triton.cdiv(n, splits), 256) * 256
        splits = triton.cdiv(n, cols_per_split)
        partial = torch.empty(splits, nq, k, dtype=torch.int64, device=q.device)
        family = _family(metric, ops.precision)
        _KNN[(family, large_k)][(q_blocks, splits)](
            *ops.pointers(), partial, nq, n, d, k, cols_per_split, ops.q.stride(0), ops.c.stride(0),
            METRIC=metric.code, SMALLER_IS_BETTER=metric.smaller_is_better, EXCLUDE_SELF=exclude_self,
            K_PAD=k_pad, BLOCK_M=block_m, PRECISION=ops.precision, **_meta(metric, family, large_k))
        words = top_words(partial.permute(1, 0, 2).reshape(nq, splits * k), k)
    return unpack_words(words, metric.smaller_is_better)


def _launch_pairwise(ops: _Operands, out: torch.Tensor, q_rows: slice, c_rows: slice) -> None:
    q, c, craw, qterm, cterm, czero = ops.pointers(q_rows, c_rows)
    nq, d = q.shape
    n = c.shape[0]
    js = ops.metric.name == "js"
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(nq, meta["BLOCK_M"]))  # noqa: E731
    family = _family(ops.metric, ops.precision)
    _PAIRWISE[family][grid](q, c, craw, qterm, cterm, czero, out, nq, n, d, q.stride(0), c.stride(0), out.stride(0),
                            METRIC=ops.metric.code, BLOCK_M=_block_m(js), PRECISION=ops.precision,
                            **_meta(ops.metric, family))


def _knn_two_stage(ops: _Operands, k: int, exclude_self: bool) -> torch.Tensor:
    """Large k: bounded tiles of values from the tile kernel, folded into a running list of words."""
    nq, n = ops.q.shape[0], ops.c.shape[0]
    dev = ops.q.device
    c_chunk = min(n, max(k, 1 << 14))
    q_chunk = max(1, min(nq, TILE_ELEMENTS // c_chunk))
    out = torch.empty(nq, k, dtype=torch.int64, device=dev)
    tile = torch.empty(q_chunk, c_chunk, dtype=torch.float32, device=dev)
    for i in range(0, nq, q_chunk):
        rows = min(q_chunk, nq - i)
        best = torch.empty(rows, 0, dtype=torch.int64, device=dev)
        for j in range(0, n, c_chunk):
            cols = min(c_chunk, n - j)
            t = tile[:rows, :cols]
            _launch_pairwise(ops, t, slice(i, i + rows), slice(j, j + cols))
            words = pack_words_torch(t, torch.arange(j, j + cols, device=dev), ops.metric.smaller_is_better)
            if exclude_self:
                r = torch.arange(i, i + rows, device=dev)
                hit = (r >= j) & (r < j + cols)
                words[hit.nonzero()[:, 0], r[hit] - j] = NEVER
            cand = torch.cat([best, words], dim=1)
            best = top_words(cand, min(k, cand.shape[1]))
        out[i:i + rows] = best
    return out


def pairwise(q: torch.Tensor, c: torch.Tensor, metric: Metric) -> torch.Tensor:
    """The full [nq, n] float32 matrix of metric values (equivalent to tlfast.reference.pairwise)."""
    ops = _Operands(q, c, metric)
    out = torch.empty(ops.q.shape[0], ops.c.shape[0], dtype=torch.float32, device=q.device)
    _launch_pairwise(ops, out, slice(None), slice(None))
    return out


# Operand dtypes the launchers pass (float64 is computed in float32: see _Operands).
_STATIC_DTYPES = {"fp16": None, "bf16": None, "fp32": "tf32x3"}
# Arguments the launchers pass 16-aligned / divisible by 16 for the usual feature widths (d % 16 ==
# 0): the specialisation Triton compiles for them, and the one the static table describes.
_ALIGNED = ("q_ptr", "c_ptr", "craw_ptr", "qterm_ptr", "cterm_ptr", "czero_ptr", "out_ptr", "d", "stride_q",
            "stride_c", "cols_per_split", "stride_out")


def static_specs() -> list:
    """Every specialisation knn() and pairwise() can launch on a GPU: metric x operand dtype x
    K_PAD x exclude_self x each config of its autotune list (tlfast.triton.static_check)."""
    from .static_check import KernelSpec
    from ..metrics import METRICS
    specs = []
    operands = ("q_ptr", "c_ptr", "craw_ptr")
    for name, metric in sorted(METRICS.items(), key=lambda kv: kv[1].code):
        js = name == "js"
        for dt, precision in _STATIC_DTYPES.items():
            ptrs = tuple((a, "*" + dt) for a in operands) + (
                ("qterm_ptr", "*fp32"), ("cterm_ptr", "*fp32"), ("czero_ptr", "*i8"))
            base = dict(METRIC=metric.code, BLOCK_M=_block_m(js), PRECISION=precision)
            for k_pad in (16, 32, 64, FUSED_MAX_K):
                large_k = k_pad > SMALL_K
                for exclude_self in (False, True):
                    for cfg in _gpu_configs(_family(metric, precision), large_k):
                        const = dict(base, SMALLER_IS_BETTER=metric.smaller_is_better, EXCLUDE_SELF=exclude_self,
                                     K_PAD=k_pad, **cfg.kwargs)
                        sig = ptrs + (("out_ptr", "*i64"),) + tuple(
                            (a, "i32") for a in ("nq", "n", "d", "k", "cols_per_split", "stride_q", "stride_c"))
                        specs.append(KernelSpec(__name__, "_knn_kernel", f"knn {name} {dt} K_PAD={k_pad}"
                                                + (" exclude_self" if exclude_self else ""), sig,
                                                tuple(const.items()), cfg.num_warps, cfg.num_stages, not js, _ALIGNED,
                                                f"{_family(metric, precision)} large_k={large_k}"))
            for cfg in _pairwise_configs(_family(metric, precision)):
                sig = ptrs + (("out_ptr", "*fp32"),) + tuple(
                    (a, "i32") for a in ("nq", "n", "d", "stride_q", "stride_c", "stride_out"))
                specs.append(KernelSpec(__name__, "_pairwise_kernel", f"pairwise {name} {dt}", sig,
                                        tuple(dict(base, **cfg.kwargs).items()), cfg.num_warps, cfg.num_stages,
                                        not js, _ALIGNED, _family(metric, precision)))
    return specs
