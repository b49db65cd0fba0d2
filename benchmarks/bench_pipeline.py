"""Index and match benchmark: what the pipeline layer costs on top of the kernels, side by side.

* index-cosine: tlfast.knn on the raw arrays vs Index.search (in memory, float16 storage, out-of-core
  with a budget of 1/4 of the corpus, and memory-mapped from a saved index + that budget) vs faiss
  IndexFlatIP.  The out-of-core rows show what streaming costs and how much memory it saves.
* match-cosine: tlfast.match (mutual nearest neighbours from two fused kNN passes) vs the full
  similarity matrix in torch (matmul + argmax both ways, as users write it) vs scikit-learn's
  NearestNeighbors(algorithm="brute") both ways.

Each (case, contender) runs in a fresh subprocess (peak RSS is its own); median and p95 of >= 5 runs
after a warm-up (BENCHMARKS.md).

    python benchmarks/bench_pipeline.py                     # -> benchmarks/results/cpu-pipeline.{json,md}
    python benchmarks/bench_pipeline.py --quick --out /tmp  # small shapes, for a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_knn import cpu_name, git_commit, peak_rss_bytes, reset_peak_rss, rss_bytes, write_results  # noqa: E402

# name: (nq, n, d, k, contenders); match cases use nq = n (source and target of equal size).
CASES = {
    "index-cosine": (1_000, 200_000, 128, 10, ["tlfast.knn", "Index", "Index-float16", "Index-budget-1/4",
                                               "Index-mmap-budget-1/4", "faiss-flat"]),
    "match-cosine": (20_000, 20_000, 128, 1, ["tlfast.match", "torch-full-matrix", "sklearn-brute"]),
}
QUICK = {"index-cosine": (200, 20_000, 64), "match-cosine": (3_000, 3_000, 64)}


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, d)).astype(np.float32)
    return centres[rng.integers(0, 64, n)] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)


def _index_contender(name: str, q: np.ndarray, c: np.ndarray, k: int, tmp: str):
    import tlfast

    budget = c.nbytes // 4
    if name == "tlfast.knn":
        return lambda: tlfast.knn(q, c, k, "cosine")
    if name == "Index":
        index = tlfast.Index("cosine").add(c)
        return lambda: index.search(q, k)
    if name == "Index-float16":
        index = tlfast.Index("cosine", dtype="float16").add(c)
        return lambda: index.search(q, k)
    if name == "Index-budget-1/4":
        index = tlfast.Index("cosine").add(c)
        return lambda: index.search(q, k, memory_budget=budget)
    if name == "Index-mmap-budget-1/4":
        tlfast.Index("cosine").add(c).save(Path(tmp) / "ix")
        index = tlfast.Index.load(Path(tmp) / "ix", mmap=True)
        return lambda: index.search(q, k, memory_budget=budget)
    if name == "faiss-flat":
        import faiss

        index = faiss.IndexFlatIP(c.shape[1])
        index.add(c / np.linalg.norm(c, axis=1, keepdims=True))
        return lambda: index.search(q / np.linalg.norm(q, axis=1, keepdims=True), k)
    raise ValueError(name)


def _match_contender(name: str, s: np.ndarray, t: np.ndarray):
    import torch

    import tlfast

    if name == "tlfast.match":
        return lambda: tlfast.match(s, t, "cosine")
    if name == "torch-full-matrix":
        a = torch.nn.functional.normalize(torch.from_numpy(s), dim=1)
        b = torch.nn.functional.normalize(torch.from_numpy(t), dim=1)

        def run():
            sim = a @ b.T  # the n x m matrix tlfast never builds
            fwd, back = sim.argmax(1), sim.argmax(0)
            return (back[fwd] == torch.arange(len(a))).nonzero()[:, 0]

        return run
    if name == "sklearn-brute":
        from sklearn.neighbors import NearestNeighbors

        def run():
            fwd = NearestNeighbors(n_neighbors=1, algorithm="brute", metric="cosine").fit(t).kneighbors(s)[1][:, 0]
            back = NearestNeighbors(n_neighbors=1, algorithm="brute", metric="cosine").fit(s).kneighbors(t)[1][:, 0]
            return np.nonzero(back[fwd] == np.arange(len(s)))[0]

        return run
    raise ValueError(name)


def run_one(case: str, name: str, quick: bool, repeats: int) -> dict:
    import torch

    nq, n, d, k, _ = CASES[case]
    if quick:
        nq, n, d = QUICK[case]
    q, c = clustered(nq, d, 1), clustered(n, d, 2)
    with tempfile.TemporaryDirectory() as tmp:
        fn = _index_contender(name, q, c, k, tmp) if case.startswith("index") else _match_contender(name, q, c)
        fn()  # warm-up
        reset_peak_rss()
        base = rss_bytes()
        times = []
        for _ in range(max(5, repeats)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        peak = peak_rss_bytes()
    return {"op": case.split("-")[0], "case": case, "metric": "cosine", "nq": nq, "n": n, "d": d, "k": k,
            "dtype": "float32", "backend": name, "median_s": float(np.median(times)),
            "p95_s": float(np.percentile(times, 95)), "runs": len(times), "peak_extra_bytes": max(0, peak - base),
            "threads": torch.get_num_threads()}


def markdown(rows: list[dict]) -> str:
    out = ["| case | shapes (q x n x d, k) | contender | median s | p95 s | vs first row | peak extra MB |",
           "|---|---|---|---|---|---|---|"]
    first: dict[str, float] = {}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['case']} | | {r['backend']} | failed: {r['error']} | | | |")
            continue
        base = first.setdefault(r["case"], r["median_s"])
        out.append(f"| {r['case']} | {r['nq']} x {r['n']} x {r['d']}, k={r['k']} | {r['backend']} | "
                   f"{r['median_s']:.4f} | {r['p95_s']:.4f} | {r['median_s'] / base:.2f}x | "
                   f"{r['peak_extra_bytes'] / 2**20:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="cpu-pipeline", help="result file stem")
    p.add_argument("--one", nargs=2, metavar=("CASE", "CONTENDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*args.one, args.quick, args.repeats)))
        return 0

    import torch

    import tlfast

    rows = []
    for case in args.cases:
        for name in CASES[case][4]:
            cmd = [sys.executable, __file__, "--one", case, name, "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True)
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"case": case, "backend": name, "error": err})
                print(f"{case:14s} {name:22s} FAILED: {err}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{case:14s} {name:22s} {rows[-1]['median_s']:.4f} s", file=sys.stderr)
    meta = {"device": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "tlfast": tlfast.__version__,
            "commit": git_commit(), "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for r in rows:
        r.update({k: meta[k] for k in ("device", "tlfast", "commit")})
    md = f"# CPU index / match benchmark\n\n{meta}\n\n" + markdown(rows) + "\n"
    write_results(args.out, args.name, {"meta": meta, "rows": rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
