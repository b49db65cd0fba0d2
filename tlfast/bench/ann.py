"""Approximate search suites: recall–QPS curves and tuning to a recall target.

``tune`` suite, per data family (``data.FAMILIES``) and index kind: build the index with its
defaults (chosen from n), ``Index.tune(target_recall)`` from the corpus alone (queries=None) and
again on a held-out tuning set, then on *fresh* queries (another draw, seen by neither tune)
measure recall@k against tlfast's exact search and queries/s of each, in interleaved rounds.  The sweep around the chosen setting gives the
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
              generated: bool = True, tune_queries: np.ndarray | None = None,
              log: Callable[[str], None] = print) -> list[dict]:
    """Schema rows: exact search, and per kind the tuned setting measured on fresh queries ``q``
    (+ sweep points around the default tune's setting when ``sweep``).

    Each kind is tuned twice on one build: ``tune(target)`` with queries=None (the library's own
    estimate from the corpus) and, when ``tune_queries`` is given, ``tune(target, queries=tune_queries)``
    — a held-out set drawn like ``q`` but disjoint from it, as a user with sample queries would.
    Both settings are then timed against exact search on ``q`` in the same interleaved rounds.
    """
    import tlfast

    rows: list[dict] = []
    base = {"family": family, "metric": metric, "n": len(x), "d": x.shape[1], "nq": len(q), "k": k,
            "generated_by_benchmark": generated}
    exact_fn = lambda: tlfast.knn(q, x, k, metric, backend="cpu")  # noqa: E731
    truth = exact_fn().indices
    sources = {"corpus": None} if tune_queries is None else {"corpus": None, "held-out queries": tune_queries}
    for kind, kparams in kinds or KINDS_FOR[metric]:
        try:
            t0 = time.perf_counter()
            index = tlfast.Index(metric, kind=kind, **kparams).add(x)
            build_s = time.perf_counter() - t0
            reports = {}
            for source, tq in sources.items():
                t0 = time.perf_counter()
                reports[source] = (index.tune(target, tq, k=k), time.perf_counter() - t0)
        except ImportError as exc:  # faiss missing: the kind is skipped, and says why
            rows.append(case_row(f"tune/{family}", f"{kind}{kparams or ''}", base, error=f"{exc}"))
            continue
        built = index._ann.params()
        label = _label(kind, kparams, built)
        fns = {"exact": exact_fn}
        for source, (report, _) in reports.items():
            fns[source] = lambda p=report.params: index.search(q, k, **p)
        timed = interleaved(fns, rounds=rounds)
        for source, (report, tune_s) in reports.items():
            name, value = next(iter(report.params.items()))
            r = _recall(fns[source]().indices, truth)
            lo, hi = wilson_interval(float(r.sum()), len(r))
            speedup = timed["exact"].median / timed[source].median
            log(f"  {label:28s} tuned on {source} ({report.queries_from}): {name}={value}, tune-time recall "
                f"{report.recall:.4f} (lower {report.recall_ci[0]:.4f}); fresh recall@{k} {r.mean():.4f}, "
                f"{speedup:.1f}x exact (build {build_s:.1f}s, tune {tune_s:.1f}s)")
            metrics = {"recall_at_k": float(r.mean()), "recall_ci95": [lo, hi], "qps": len(q) / timed[source].median,
                       "exact_qps": len(q) / timed["exact"].median, "speedup_vs_exact": speedup,
                       "tuned": report.params, "tuned_on": source, "tune_queries_from": report.queries_from,
                       "tune_recall": report.recall, "tune_recall_ci": list(report.recall_ci),
                       "tune_speedup": report.speedup, "tune_queries": report.n_queries, "reached": report.reached,
                       "build_s": build_s, "tune_s": tune_s, "built": {kk: vv for kk, vv in built.items()
                                                                       if kk not in ("metric", "dim", "count")}}
            rows.append(case_row(f"tune/{family}", label, {**base, "target_recall": target, "tuned_on": source},
                                 peer_of=None, samples=timed[source], metrics=metrics))
        rows.append(case_row(f"tune/{family}", f"exact (vs {label})", base, peer_of=label, samples=timed["exact"],
                             metrics={"recall_at_k": 1.0, "qps": len(q) / timed["exact"].median}))
        if sweep:
            name, value = next(iter(reports["corpus"][0].params.items()))
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


TUNE_QUERIES = 1000  # the held-out tuning set: tune's default sample size


def family_data(family: str, n: int, nq: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, bool]:
    """(metric, corpus, fresh queries, held-out tuning queries, generated?): three disjoint draws
    of the family (generator seeds 0, 1, 2; MiniLM: one extraction pass split three ways)."""
    metric, gen, generated = bench_data.FAMILIES[family]
    if family == "minilm-cosine":
        emb = bench_data.minilm_embeddings(n + nq + TUNE_QUERIES, seed=0)
        return metric, emb[:n], emb[n:n + nq], emb[n + nq:], generated
    return metric, gen(n, 0), gen(nq, 1), gen(TUNE_QUERIES, 2), generated
