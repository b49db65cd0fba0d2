"""CPU kNN with low-precision inputs and exact mode's screening (issue 12), side by side in one run.

Each contender runs in its own fresh process (so peak RSS is its own), median of >= 5 runs after a
warm-up, next to torch.mm's rate per dtype on the same shape.  Shared helpers come from the
package's bench suite (``tlfast.bench``); the fp32 / faiss cases are ``benchmarks/bench_knn.py``.

    python benchmarks/bench_knn_lowp.py                    # -> benchmarks/results/cpu-knn-lowp.{json,md}
    python benchmarks/bench_knn_lowp.py --queries 1000     # fewer queries (a loaded machine)
    python benchmarks/bench_knn_lowp.py --quick --out /tmp
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import peak_rss_bytes, reset_peak_rss, rss_bytes
from tlfast._persist import write_file
from tlfast.bench.data import knn_data
from tlfast.bench.knn import _faiss
from tlfast.bench.schema import cpu_model_and_flags, git_commit

RESULTS = Path(__file__).resolve().parent / "results"
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


LOWP_SHAPE = (10_000, 100_000, 128, 10)        # cosine, k = 10 (--queries changes the 10,000)
LOWP_QUICK = (1_000, 20_000, 128, 10)
# contender: (input dtype, how it runs)
LOWP_CONTENDERS = {
    "tlfast-cpu fp32": ("float32", "exact"),
    "tlfast-cpu bf16 native": ("bfloat16", "exact"),
    "tlfast-cpu bf16 via fp32 copy": ("bfloat16", "widen-in-python"),
    "tlfast-cpu fp16 native": ("float16", "exact"),
    "tlfast-cpu fp32 exact, bf16 screen": ("float32", "screen-bf16"),
    "faiss fp32": ("float32", "faiss"),
}


def _lowp_fn(name: str, q, c, k: int):
    import torch

    import tlfast
    from tlfast import precision as tlp
    from tlfast.backends import resolve
    from tlfast.metrics import METRICS

    dtype, how = LOWP_CONTENDERS[name]
    qt, ct = torch.from_numpy(q).to(getattr(torch, dtype)), torch.from_numpy(c).to(getattr(torch, dtype))
    if how == "exact":
        return lambda: tlfast.knn(qt, ct, k, "cosine", backend="cpu")
    if how == "widen-in-python":  # what tlfast.knn did before the cpu backend took bf16 natively
        from tlfast._validate import validate_pair
        cpu = resolve("cpu", qt.device)

        def run():
            inp = validate_pair(qt, ct, "cosine")
            return cpu.knn(inp.queries.float(), inp.corpus.float(), k, METRICS["cosine"], False)
        return run
    if how == "screen-bf16":
        tlp.SCREEN = "bf16"
        return lambda: tlfast.knn(qt, ct, k, "cosine", backend="cpu")
    return _faiss("cosine", torch.from_numpy(q), torch.from_numpy(c), k)[1]


def _lowp_shape(quick: bool, queries: int | None):
    nq, n, d, k = LOWP_QUICK if quick else LOWP_SHAPE
    return (queries or nq), n, d, k


def lowp_run_one(name: str, quick: bool, repeats: int, queries: int | None = None) -> dict:
    """One low-precision contender in this (fresh) process: median of >= 5 runs after a warm-up."""
    import torch

    nq, n, d, k = _lowp_shape(quick, queries)
    q, c = knn_data("normal", nq, n, d)
    fn = _lowp_fn(name, q, c, k)
    fn()
    reset_peak_rss()
    base = rss_bytes()
    times = []
    for _ in range(max(5, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    peak = peak_rss_bytes()
    med = float(np.median(times))
    return {"op": "knn", "case": "lowp-cosine", "metric": "cosine", "nq": nq, "n": n, "d": d, "k": k,
            "dtype": LOWP_CONTENDERS[name][0], "backend": name, "median_s": med,
            "p95_s": float(np.percentile(times, 95)), "runs": len(times), "gflops": 2.0 * nq * n * d / med / 1e9,
            "peak_rss_bytes": peak, "peak_extra_bytes": max(0, peak - base), "threads": torch.get_num_threads()}


def lowp_mm_rates(quick: bool, rows: int = 1000) -> list[dict]:
    """torch.mm's rate per dtype on the kNN's own shape (a chunk of queries against the corpus)."""
    import torch

    nq, n, d, _ = LOWP_QUICK if quick else LOWP_SHAPE
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, b = torch.randn(rows, d).to(dtype), torch.randn(d, n).to(dtype)
        torch.mm(a, b)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t)
        med = float(np.median(times))
        out.append({"op": "mm", "shape": [rows, d, n], "dtype": str(dtype).replace("torch.", ""),
                    "median_s": med, "gflops": 2.0 * rows * d * n / med / 1e9})
    return out


def run_all(args) -> int:
    import torch

    import tlfast
    from tlfast._native import _C

    load_before = os.getloadavg()
    mm = lowp_mm_rates(args.quick, 1000 if args.queries is None else max(1, args.queries // 10))
    rows = []
    for name in LOWP_CONTENDERS:
        cmd = [sys.executable, __file__, "--one", name, "--repeats", str(args.repeats)]
        if args.queries:
            cmd += ["--queries", str(args.queries)]
        if args.quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"backend": name, "error": err})
            print(f"{name:36s} FAILED: {err}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name:36s} {rows[-1]['median_s']:.3f} s", file=sys.stderr)
    model, flags = cpu_model_and_flags()
    meta = {"device": model, "flags": [f for f in flags if f in ISA_FLAGS], "cores": os.cpu_count(), "torch": torch.__version__,
            "tlfast": tlfast.__version__, "commit": git_commit(), "isa": tlfast.backends()["cpu"].reason,
            "bf16_kernel": _C.cpu_half_kernel(0), "fp16_kernel": _C.cpu_half_kernel(1),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    base = next((r for r in rows if r.get("backend") == "tlfast-cpu fp32" and "error" not in r), None)
    lines = ["# CPU kNN, low-precision inputs and exact mode's screening", "",
             f"CPU: {meta['device']}, flags {' '.join(meta['flags'])}; kernels: {meta['isa']}.  "
             f"Load average before / after: {load_before[0]:.1f} / {meta['loadavg_after'][0]:.1f} "
             f"(this machine is shared). {meta['date']}, commit {meta['commit']}.", "",
             f"Cosine, {rows[0].get('nq')} queries x {rows[0].get('n')} corpus rows x d = {rows[0].get('d')}, "
             f"k = {rows[0].get('k')}; each contender in its own process, median of >= 5 runs after a warm-up.", "",
             "torch.mm on the same shape: " + ", ".join(f"{m['dtype']} **{m['gflops']:.1f} GFLOP/s**" for m in mm),
             "", "| contender | input | median s | p95 s | GFLOP/s | vs tlfast fp32 | peak extra MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | | failed: {r['error']} | | | | |")
            continue
        sp = f"{base['median_s'] / r['median_s']:.2f}x" if base else "-"
        lines.append(f"| {r['backend']} | {r['dtype']} | {r['median_s']:.3f} | {r['p95_s']:.3f} | "
                     f"{r['gflops']:.1f} | {sp} | {r['peak_extra_bytes'] / 2**20:.0f} |")
    md = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"meta": meta, "mm": mm, "rows": rows}, indent=1).encode()
    write_file(args.out / f"{args.name}.json", lambda f: f.write(payload))
    write_file(args.out / f"{args.name}.md", lambda f: f.write(md.encode()))
    print(md)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--queries", type=int, help="queries (default 10,000)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="cpu-knn-lowp", help="result file stem")
    p.add_argument("--one", metavar="CONTENDER", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(lowp_run_one(args.one, args.quick, args.repeats, args.queries)))
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
