"""CPU kNN benchmark: tlfast `cpu` vs the reference, torch chunked mm + topk and faiss-cpu, side by side.

Follows ../shared/BENCHMARKS.md: every (case, contender) runs in its own fresh subprocess (so peak
RSS is its own), median and p95 of >= 5 timed runs after a warm-up, GFLOP/s for the GEMM-shaped
metrics next to this machine's own float32 torch.mm rate measured in the same run.

    python benchmarks/bench_knn.py                     # standard cases -> benchmarks/results/cpu-knn.{json,md}
    python benchmarks/bench_knn.py --quick --out /tmp  # small shapes, for a smoke run
    python benchmarks/bench_knn.py --lowp              # bf16 / fp16 inputs -> results/cpu-knn-lowp.{json,md}
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

HERE = Path(__file__).resolve().parent

# name: (metric, nq, n, d, k, data, contenders)
CASES = {
    "knn-cosine": ("cosine", 10_000, 100_000, 128, 10, "normal", ["tlfast-cpu", "faiss", "torch-mm-topk", "reference"]),
    "knn-l2": ("l2", 10_000, 100_000, 128, 10, "normal", ["tlfast-cpu", "faiss", "torch-mm-topk", "reference"]),
    "knn-kl": ("kl", 1_000, 20_000, 64, 10, "dirichlet", ["tlfast-cpu", "torch-gemm-form", "torch-naive", "reference"]),
    "knn-js": ("js", 1_000, 20_000, 64, 10, "dirichlet", ["tlfast-cpu", "faiss", "torch-naive", "reference"]),
    "memory-cosine": ("cosine", 20_000, 200_000, 64, 10, "normal", ["tlfast-cpu"]),
}
QUICK = {"knn-cosine": (500, 5_000, 128), "knn-l2": (500, 5_000, 128), "knn-kl": (100, 2_000, 64),
         "knn-js": (100, 2_000, 64), "memory-cosine": (1_000, 10_000, 64)}
GEMM_METRICS = {"ip", "cosine", "l2", "kl"}


def make_data(kind: str, nq: int, n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "dirichlet":
        return (rng.dirichlet(np.ones(d), nq).astype(np.float32), rng.dirichlet(np.ones(d), n).astype(np.float32))
    return (rng.standard_normal((nq, d), dtype=np.float32), rng.standard_normal((n, d), dtype=np.float32))


# --- contenders: each returns a callable running the whole search a user would run -----------

def _torch_route(metric, q, c, k, chunk=1024):
    """torch as a user writes it: tiles of q @ c.T (or the metric's GEMM form) + topk."""
    import torch

    qt, ct = torch.from_numpy(q), torch.from_numpy(c)
    if metric == "cosine":
        qt = torch.nn.functional.normalize(qt, dim=1)
        ct = torch.nn.functional.normalize(ct, dim=1)
    cn = (ct * ct).sum(1)
    logc = torch.log(ct.clamp_min(1e-30)) if metric == "kl" else None

    def run():
        vals, idx = [], []
        for i in range(0, qt.shape[0], chunk):
            qi = qt[i:i + chunk]
            if metric in ("cosine", "ip"):
                v, j = torch.topk(qi @ ct.T, k, dim=1)
            elif metric == "l2":
                dist = (qi * qi).sum(1, keepdim=True) + cn[None] - 2 * (qi @ ct.T)
                v, j = torch.topk(dist, k, dim=1, largest=False)
            else:  # kl, GEMM form
                dist = torch.special.xlogy(qi, qi).sum(1, keepdim=True) - qi @ logc.T
                v, j = torch.topk(dist, k, dim=1, largest=False)
            vals.append(v)
            idx.append(j)
        return torch.cat(vals), torch.cat(idx)

    return run


def _torch_naive(metric, q, c, k, block=64):
    """The divergence written out pair by pair with broadcasting (what a user writes first)."""
    import torch

    qt, ct = torch.from_numpy(q), torch.from_numpy(c)

    def div(a, b):
        if metric == "kl":
            return torch.special.xlogy(a, a / b).sum(-1)
        m = (a + b) / 2
        return 0.5 * (torch.special.xlogy(a, a / m) + torch.special.xlogy(b, b / m)).sum(-1)

    def run():
        vals, idx = [], []
        for i in range(0, qt.shape[0], block):
            dist = div(qt[i:i + block, None, :], ct[None, :, :])
            v, j = torch.topk(dist, k, dim=1, largest=False)
            vals.append(v)
            idx.append(j)
        return torch.cat(vals), torch.cat(idx)

    return run


def _faiss(metric, q, c, k):
    import faiss

    d = q.shape[1]
    if metric == "cosine":
        c = c / np.linalg.norm(c, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(d)
    elif metric == "l2":
        index = faiss.IndexFlatL2(d)
    elif metric == "js":
        index = faiss.IndexFlat(d, faiss.METRIC_JensenShannon)
    else:
        raise ValueError(metric)
    index.add(np.ascontiguousarray(c, dtype=np.float32))

    def run():
        qq = q / np.linalg.norm(q, axis=1, keepdims=True) if metric == "cosine" else q
        return index.search(np.ascontiguousarray(qq, dtype=np.float32), k)

    return run


def contender(name, metric, q, c, k):
    import tlfast

    if name == "tlfast-cpu":
        return lambda: tlfast.knn(q, c, k, metric, backend="cpu")
    if name == "reference":
        return lambda: tlfast.knn(q, c, k, metric, backend="reference")
    if name in ("torch-mm-topk", "torch-gemm-form"):
        return _torch_route(metric, q, c, k)
    if name == "torch-naive":
        return _torch_naive(metric, q, c, k)
    if name == "faiss":
        return _faiss(metric, q, c, k)
    raise ValueError(name)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) so that it measures from now on (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(case: str, name: str, quick: bool, repeats: int) -> dict:
    """Runs one contender on one case in this (fresh) process and returns its JSON row."""
    import torch

    metric, nq, n, d, k, kind, _ = CASES[case]
    if quick:
        nq, n, d = QUICK[case]
    q, c = make_data(kind, nq, n, d)
    fn = contender(name, metric, q, c, k)
    fn()  # warm-up
    reset_peak_rss()
    base_rss = rss_bytes()
    slow = name in ("reference", "torch-naive")
    runs = max(5, repeats) if not slow else 5
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    peak = peak_rss_bytes()
    med = float(np.median(times))
    flops = 2.0 * nq * n * d if metric in GEMM_METRICS else None
    return {
        "op": "knn", "case": case, "metric": metric, "nq": nq, "n": n, "d": d, "k": k, "dtype": "float32",
        "backend": name, "median_s": med, "p95_s": float(np.percentile(times, 95)), "runs": runs,
        "gflops": flops / med / 1e9 if flops else None,
        "peak_rss_bytes": peak, "peak_extra_bytes": max(0, peak - base_rss),
        "threads": torch.get_num_threads(),
    }


def mm_rate(quick: bool) -> dict:
    """This machine's own float32 matrix-product rate (torch.mm, all threads), the roofline."""
    import torch

    m, kk, n = (1024, 128, 4096) if quick else (4096, 128, 16384)
    a, b = torch.randn(m, kk), torch.randn(kk, n)
    torch.mm(a, b)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"op": "mm", "case": "torch.mm", "shape": [m, kk, n], "dtype": "float32", "backend": "torch.mm",
            "median_s": med, "p95_s": float(np.percentile(times, 95)), "gflops": 2.0 * m * kk * n / med / 1e9}


def write_results(out_dir: Path, name: str, payload: dict, md: str) -> None:
    """<name>.json and <name>.md under out_dir, each written to a temp file and renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(payload, indent=1)), (".md", md)):
        dst = out_dir / f"{name}{suffix}"
        tmp = dst.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(dst)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def markdown(rows: list[dict], mm: dict) -> str:
    out = [f"torch.mm float32 rate on this machine: **{mm['gflops']:.1f} GFLOP/s** "
           f"(shape {mm['shape']}, median of 7)", "",
           "| case | shapes (q x n x d, k) | backend | median s | p95 s | GFLOP/s | % of torch.mm | "
           "speed-up of tlfast-cpu | peak extra MB |",
           "|---|---|---|---|---|---|---|---|---|"]
    by_case: dict[str, list[dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    for case, rs in by_case.items():
        ours = next((r for r in rs if r["backend"] == "tlfast-cpu"), None)
        for r in rs:
            if "error" in r:
                out.append(f"| {case} | | {r['backend']} | failed: {r['error']} | | | | | |")
                continue
            g = f"{r['gflops']:.1f}" if r.get("gflops") else "-"
            pct = f"{100 * r['gflops'] / mm['gflops']:.0f}%" if r.get("gflops") else "-"
            sp = f"{r['median_s'] / ours['median_s']:.2f}x" if ours else "-"
            out.append(f"| {case} | {r['nq']} x {r['n']} x {r['d']}, k={r['k']} | {r['backend']} | "
                       f"{r['median_s']:.4f} | {r['p95_s']:.4f} | {g} | {pct} | {sp} | "
                       f"{r['peak_extra_bytes'] / 2**20:.0f} |")
    return "\n".join(out)


# --- low-precision cases (issue 12): bf16 / fp16 inputs and exact mode's screening ------------------

LOWP_SHAPE = (10_000, 100_000, 128, 10)        # cosine, k = 10 (--lowp-queries changes the 10,000)
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
    return _faiss("cosine", q, c, k)


def _lowp_shape(quick: bool, queries: int | None):
    nq, n, d, k = LOWP_QUICK if quick else LOWP_SHAPE
    return (queries or nq), n, d, k


def lowp_run_one(name: str, quick: bool, repeats: int, queries: int | None = None) -> dict:
    """One low-precision contender in this (fresh) process: median of >= 5 runs after a warm-up."""
    import torch

    nq, n, d, k = _lowp_shape(quick, queries)
    q, c = make_data("normal", nq, n, d)
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


def cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def lowp_main(args) -> int:
    import torch

    import tlfast
    from tlfast._native import _C

    load_before = os.getloadavg()
    mm = lowp_mm_rates(args.quick, 1000 if args.lowp_queries is None else max(1, args.lowp_queries // 10))
    rows = []
    for name in LOWP_CONTENDERS:
        cmd = [sys.executable, __file__, "--lowp-one", name, "--repeats", str(args.repeats)]
        if args.lowp_queries:
            cmd += ["--lowp-queries", str(args.lowp_queries)]
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
    meta = {"device": cpu_name(), "flags": cpu_flags(), "cores": os.cpu_count(), "torch": torch.__version__,
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
    write_results(args.out, args.lowp_name, {"meta": meta, "mm": mm, "rows": rows}, md)
    print(md)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="cpu-knn", help="result file stem")
    p.add_argument("--one", nargs=2, metavar=("CASE", "CONTENDER"), help=argparse.SUPPRESS)
    p.add_argument("--lowp", action="store_true",
                   help="the low-precision cases instead (bf16 / fp16 inputs, exact mode's screening)")
    p.add_argument("--lowp-name", default="cpu-knn-lowp", help="result file stem of --lowp")
    p.add_argument("--lowp-queries", type=int, help="queries of the --lowp case (default 10,000)")
    p.add_argument("--lowp-one", metavar="CONTENDER", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.lowp_one:
        print(json.dumps(lowp_run_one(args.lowp_one, args.quick, args.repeats, args.lowp_queries)))
        return 0
    if args.lowp:
        return lowp_main(args)
    if args.one:
        print(json.dumps(run_one(*args.one, args.quick, args.repeats)))
        return 0

    import torch

    import tlfast

    mm = mm_rate(args.quick)
    rows = []
    for case in args.cases:
        for name in CASES[case][6]:
            cmd = [sys.executable, __file__, "--one", case, name, "--repeats", str(args.repeats)]
            if args.quick:
                cmd.append("--quick")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"case": case, "backend": name, "error": err})
                print(f"{case:14s} {name:16s} FAILED: {err}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{case:14s} {name:16s} {row['median_s']:.4f} s", file=sys.stderr)
    meta = {"device": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "tlfast": tlfast.__version__, "commit": git_commit(), "isa": tlfast.backends()["cpu"].reason,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for r in rows:
        r.update({k: meta[k] for k in ("device", "tlfast", "commit")})
    md = f"# CPU kNN benchmark\n\n{meta}\n\n" + markdown([r for r in rows], mm) + "\n"
    write_results(args.out, args.name, {"meta": meta, "mm": mm, "rows": rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
