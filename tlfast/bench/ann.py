"""Approximate search suites: recall–QPS curves and tuning to a recall target.

``tune`` suite, per data family (``data.FAMILIES``) and index kind: build the index with its
defaults (chosen from n), ``Index.tune(target_recall)`` on corpus rows (exclude_self), then on
*fresh* queries (another seed, never seen by tune) measure recall@k against tlfast's exact search
and queries/s of both, in interleaved rounds.  The sweep around the chosen setting gives the
recall–QPS curve (ann-benchmarks style) of each kind.
"""
from __future__ import annotations

import gc
import time
from typing import Callable

import numpy as np

from . import data as bench_data
from .schema import case_row
from .timing import interleaved, wilson_interval

# The kinds each metric family is tuned with: faiss IVF (its default engine for ip/l2/cosine),
# tlfast's fused IVF, faiss HNSW; kl / js have tlfast's probability-space IVF only.
KINDS_FOR = {"cosine": [("ivf", {}), ("ivf", {"engine": "tlfast"}), ("hnsw", {})],
             "l2": [("ivf", {}), ("ivf", {"engine": "tlfast"}), ("hnsw", {})],
             "ip": [("ivf", {}), ("hnsw", {})],
             "kl": [("ivf", {})], "js": [("ivf", {})]}


def _label(kind: str, params: dict, built: dict) -> str:
    engine = built.get("engine")
    extra = f" nlist={built['nlist']}" if built.get("nlist") else f" M={built['M']}" if "M" in built else ""
    return f"{kind}" + (f"[{engine}]" if engine else "") + extra


def _recall(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    from ..ann import recall_per_query

    return recall_per_query(found, exact)


def tune_case(family: str, x: np.ndarray, q: np.ndarray, metric: str, *, k: int = 10, target: float = 0.95,
              kinds: list[tuple[str, dict]] | None = None, rounds: int = 3, sweep: bool = True,
              generated: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Schema rows: exact search, and per kind the tuned setting measured on fresh queries ``q``
    (+ sweep points around it when ``sweep``)."""
    import torch

    import tlfast

    rows: list[dict] = []
    base = {"family": family, "metric": metric, "n": len(x), "d": x.shape[1], "nq": len(q), "k": k,
            "generated_by_benchmark": generated}
    exact_fn = lambda: tlfast.knn(q, x, k, metric, backend="cpu")  # noqa: E731
    truth = exact_fn().indices
    for kind, kparams in kinds or KINDS_FOR[metric]:
        try:
            t0 = time.perf_counter()
            index = tlfast.Index(metric, kind=kind, **kparams).add(x)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            report = index.tune(target, k=k)
            tune_s = time.perf_counter() - t0
        except ImportError as exc:  # faiss missing: the kind is skipped, and says why
            rows.append(case_row(f"tune/{family}", f"{kind}{kparams or ''}", base, error=f"{exc}"))
            continue
        built = index._ann.params()
        label = _label(kind, kparams, built)
        name, value = next(iter(report.params.items()))
        approx_fn = lambda: index.search(q, k)  # noqa: E731  the tuned setting, as stored
        found = approx_fn().indices
        r = _recall(found, truth)
        lo, hi = wilson_interval(float(r.sum()), len(r))
        timed = interleaved({"exact": exact_fn, "approx": approx_fn}, rounds=rounds)
        speedup = timed["exact"].median / timed["approx"].median
        log(f"  {label:28s} tuned {name}={value}: tune-time recall {report.recall:.4f} (lower "
            f"{report.recall_ci[0]:.4f}); fresh recall@{k} {r.mean():.4f}, {speedup:.1f}x exact "
            f"(build {build_s:.1f}s, tune {tune_s:.1f}s)")
        metrics = {"recall_at_k": float(r.mean()), "recall_ci95": [lo, hi], "qps": len(q) / timed["approx"].median,
                   "exact_qps": len(q) / timed["exact"].median, "speedup_vs_exact": speedup,
                   "tuned": report.params, "tune_recall": report.recall, "tune_recall_ci": list(report.recall_ci),
                   "tune_speedup": report.speedup, "tune_queries": report.n_queries, "reached": report.reached,
                   "build_s": build_s, "tune_s": tune_s, "built": {kk: vv for kk, vv in built.items()
                                                                   if kk not in ("metric", "dim", "count")}}
        rows.append(case_row(f"tune/{family}", label, {**base, "target_recall": target}, peer_of=None,
                             samples=timed["approx"], metrics=metrics))
        rows.append(case_row(f"tune/{family}", f"exact (vs {label})", base, peer_of=label, samples=timed["exact"],
                             metrics={"recall_at_k": 1.0, "qps": len(q) / timed["exact"].median}))
        if sweep:
            ladder = index._ann.search_param_ladder(k)
            i = ladder.index(value) if value in ladder else 0
            for v in ladder[max(0, i - 4):i + 4]:
                fn = lambda v=v: index.search(q, k, **{name: v})  # noqa: E731
                found = fn().indices
                s = interleaved({"a": fn}, rounds=rounds)["a"]
                rows.append(case_row(f"sweep/{family}", label, {**base, name: v}, samples=s,
                                     metrics={"recall_at_k": float(_recall(found, truth).mean()),
                                              "qps": len(q) / s.median,
                                              "speedup_vs_exact": timed["exact"].median / s.median}))
        del index
        gc.collect()
    del truth
    return rows


def family_data(family: str, n: int, nq: int) -> tuple[str, np.ndarray, np.ndarray, bool]:
    metric, gen, generated = bench_data.FAMILIES[family]
    if family == "minilm-cosine":  # one extraction pass for corpus and queries
        emb = bench_data.minilm_embeddings(n + nq, seed=0)
        return metric, emb[:n], emb[n:], generated
    return metric, gen(n, 0), gen(nq, 1), generated
