"""LogME: tlfast.transferability.logme against the numpy implementation of the same algorithm in
thuml's Transfer-Learning-Library form (tests/transferability_numpy.py: one SVD of FᵀF, then a
fixed-point loop per class whose steps multiply the whole feature matrix by a vector).

Standard case: n = 100,000 features of d = 1,024, 100 classes, float32 (the numpy form converts to
float64, as tllib does).  Both contenders run in one process, in interleaved rounds (ABBA order:
each follows the other as often as itself) after one warm-up each; the median of the rounds is
reported with p95, the peak extra resident memory of each call (VmHWM reset before it), the
machine's torch.mm rate (the roofline of the FᵀF product, 2·n·d² flops) and the load average
before and after.

    python benchmarks/bench_transferability.py                 # -> results/transferability-cpu.{json,md}
    python benchmarks/bench_transferability.py --quick --out /tmp/bt
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the numpy peer lives once, beside the tests

from transferability_numpy import logme_tllib  # noqa: E402

CASE = {"n": 100_000, "d": 1024, "classes": 100}
QUICK = {"n": 20_000, "d": 256, "classes": 20}


def make_data(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features with class structure: a random centre per class plus unit noise (float32)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, d), dtype=np.float32) * 0.3
    f = rng.standard_normal((n, d), dtype=np.float32)
    f += centres[y]
    return f, y


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_name_and_flags() -> tuple[str, list[str]]:
    name, flags = platform.processor() or "cpu", []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
                         if f in have]
    except OSError:
        pass
    return name, flags


def tlfast_stages(f, y, repeats: int = 3) -> dict[str, float]:
    """Where tlfast's time goes: the one pass of moments (FᵀF and the class sums), the spectral sums'
    setup (tridiagonal form, eigenvalues, projections), and the maximisation over λ; medians of
    ``repeats`` runs each.  Returns them and how the spectral sums were formed."""
    import tlfast.transferability as T
    from tlfast.bench.timing import measure

    codes, classes = T._labels(y, f.shape[0], f.device)
    mom = T._moments(f, codes, classes)
    moments = measure(lambda: T._moments(f, codes, classes), repeats=repeats, warmup=0).median
    eig = measure(lambda: T._resolvent_forms(mom.gram, mom.cross), repeats=repeats, warmup=0).median
    forms = T._resolvent_forms(mom.gram, mom.cross)
    newton = measure(lambda: T._maximise_evidence(mom, forms, 1000, 1e-12), repeats=repeats, warmup=0).median
    how = ("LAPACK dsytrd + dormqr + dsterf, then LDLᵀ recurrences in T (csrc/cpu/tridiag.cpp)"
           if isinstance(forms, T._TridiagonalForms) else
           "LAPACK dsytrd + dstevd + dormqr" if T._dsytrd is not None else "torch.linalg.eigh")
    return {"moments (FᵀF, class sums)": moments, "spectral setup": eig, "λ maximisation": newton}, how


def mm_rate(n: int, d: int) -> float:
    """torch.mm float32 GFLOP/s on a (d x chunk) @ (chunk x d) product, the shape of FᵀF's chunks."""
    import torch

    a = torch.randn(8192, d)
    a.T @ a
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a.T @ a
        times.append(time.perf_counter() - t)
    return 2.0 * 8192 * d * d / float(np.median(times)) / 1e9


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds, in ABBA order (default 8)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="transferability-cpu", help="result file stem")
    args = p.parse_args(argv)

    import torch

    import tlfast
    from tlfast.transferability import logme

    shape = QUICK if args.quick else CASE
    n, d, classes = shape["n"], shape["d"], shape["classes"]
    load_before = os.getloadavg()
    f, y = make_data(n, d, classes)
    contenders = {"tlfast": lambda: logme(f, y), "numpy (tllib form)": lambda: logme_tllib(f, y)}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    peaks: dict[str, int] = {k: 0 for k in contenders}
    scores: dict[str, float] = {}
    for name, fn in contenders.items():  # warm-up
        scores[name] = fn()
    # Rounds in ABBA order (tlfast, numpy, numpy, tlfast, ...), so that each contender follows the
    # other as often as itself: the host lowers its clock under sustained load, and in a fixed order
    # tlfast would always start right after the numpy form's ~10 s of full load.
    order = list(contenders)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            fn = contenders[name]
            reset_peak_rss()
            base = rss_bytes()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
            peaks[name] = max(peaks[name], peak_rss_bytes() - base)
        print(f"round: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), file=sys.stderr)
    load_after = os.getloadavg()
    stages, spectral = tlfast_stages(torch.from_numpy(f), torch.from_numpy(y))
    gemm = 2.0 * n * d * d
    cpu, flags = cpu_name_and_flags()
    meta = {"device": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "numpy": np.__version__, "tlfast": tlfast.__version__,
            "commit": git_commit(), "loadavg_before": load_before, "loadavg_after": load_after,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "mm_gflops": mm_rate(n, d),
            "tlfast_path": ("FᵀF: tlfast's Gram kernel (upper register tiles, csrc/cpu/gram_kernel.h)"
                            if tlfast.transferability._native_gram(torch.zeros(1))
                            else "FᵀF: torch GEMMs on the upper block triangle") + "; spectral sums: " + spectral}
    rows = []
    for name in contenders:
        med = float(np.median(times[name]))
        rows.append({"op": "logme", "case": f"logme-{n}x{d}-{classes}c", "n": n, "d": d, "classes": classes,
                     "dtype": "float32", "backend": name, "median_s": med,
                     "p95_s": float(np.percentile(times[name], 95)), "runs": len(times[name]), "times_s": times[name],
                     "gflops_ftf": gemm / med / 1e9, "peak_extra_bytes": peaks[name], "score": scores[name],
                     "input_bytes": f.nbytes, "device": cpu, "tlfast": tlfast.__version__, "commit": meta["commit"]})
    speedup = rows[1]["median_s"] / rows[0]["median_s"]
    rel = abs(scores["tlfast"] - scores["numpy (tllib form)"]) / abs(scores["numpy (tllib form)"])
    md = [f"# LogME: tlfast vs numpy (tllib form), {n:,} x {d} float32, {classes} classes", "",
          f"* CPU: {cpu}, {os.cpu_count()} cores, flags {' '.join(flags)}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), numpy {np.__version__}",
          f"* load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
          f"{tuple(round(x, 2) for x in load_after)} (a shared machine)",
          f"* torch.mm float32 rate for FᵀF chunks: {meta['mm_gflops']:.1f} GFLOP/s; features {f.nbytes / 2**20:.0f} MiB",
          f"* commit {meta['commit']}, {meta['date']}; median of {args.rounds} interleaved rounds (ABBA order) after a warm-up",
          f"* tlfast path: {meta['tlfast_path']}",
          "* tlfast by stage (median of 3, after the rounds): " + ", ".join(f"{k} {v:.3f} s" for k, v in stages.items()),
          "",
          "| contender | median s | p95 s | FᵀF GFLOP/s (2nd²/t) | peak extra memory | LogME |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['backend']} | {r['median_s']:.3f} | {r['p95_s']:.3f} | {r['gflops_ftf']:.1f} | "
                  f"{r['peak_extra_bytes'] / 2**20:.0f} MiB | {r['score']:.6f} |")
    md += ["", f"**tlfast is {speedup:.1f}x faster**; scores differ by {rel:.1e} relative (tllib stops its "
           "fixed point at a 1% change of α/β and adds 1e-5 to its denominators; tlfast iterates to 1e-12).",
           f"Peak extra memory, n·d·4 = {f.nbytes / 2**20:.0f} MiB of float32 features, "
           f"d² · 8 = {d * d * 8 / 2**20:.0f} MiB per float64 d x d matrix."]
    text = "\n".join(md) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, body in ((".json", json.dumps({"meta": meta, "speedup": speedup, "score_rel_diff": rel, "tlfast_stages_s": stages,
                                               "rows": rows}, indent=1)), (".md", text)):
        dst = args.out / f"{args.name}{suffix}"
        tmp = dst.with_suffix(suffix + ".tmp")
        tmp.write_text(body)
        tmp.replace(dst)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
