"""GPU benchmark cases (shared/BENCHMARKS.md "GPU device checks"), side by side in one process.

For each case: tlfast ``triton`` and ``cuda`` backends (the whole public call: validation,
dispatch, output), the plain torch route (chunked ``mm`` + ``topk`` in the input dtype; for js the
naive elementwise form), and the device's own ``torch.mm`` rate for the same dtype and inner
dimension.  Medians of >= 5 timed runs after a warm-up (which includes Triton autotuning);
peak GPU memory (``torch.cuda.max_memory_allocated``) above the inputs.  Writes
``gpu-<device>.json`` and ``.md`` to --out (temp file, then rename) and prints the table.

    python benchmarks/bench_gpu.py --out benchmarks/results            # the standard cases
    python benchmarks/bench_gpu.py --quick --out /tmp/b                # small shapes, smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import tlfast
from tlfast import reference as ref

from cost_model import DEVICES, predict

# (metric, nq, n, d): the standard GPU cases; k in (10, 100), dtypes fp16 and bf16.
CASES = [("cosine", 65536, 1 << 20, 128), ("kl", 65536, 1 << 20, 128), ("js", 8192, 262144, 64)]
QUICK_CASES = [("cosine", 100, 3000, 32), ("kl", 100, 3000, 32), ("js", 50, 2000, 16)]
KS = (10, 100)
DTYPES = (torch.float16, torch.bfloat16)
# The naive js form takes minutes on the full case; it is timed on this many queries and the
# time scaled by nq / NAIVE_JS_QUERIES (reported as such in the row).
NAIVE_JS_QUERIES = 512


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up: compilation, autotuning, allocator
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def make_inputs(metric: str, nq: int, n: int, d: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    if metric in ("kl", "js"):  # Dirichlet(1) rows: normalised exponentials
        q = -torch.log(torch.rand(nq, d, generator=g, device=device))
        c = -torch.log(torch.rand(n, d, generator=g, device=device))
        q, c = q / q.sum(1, keepdim=True), c / c.sum(1, keepdim=True)
        return _round_simplex(q, dtype), _round_simplex(c, dtype)
    q = torch.randn(nq, d, generator=g, device=device)
    c = torch.randn(n, d, generator=g, device=device)
    return q.to(dtype), c.to(dtype)


def _round_simplex(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round probability rows to dtype and move each row's rounding residue onto its smallest entry
    that can absorb it (small entries round finely), so bf16 rows still sum to 1 within 1e-3."""
    r = x.to(dtype).double()
    resid = 1.0 - r.sum(1, keepdim=True)
    target = torch.where(r >= 2 * resid.abs(), r, math.inf).argmin(1, keepdim=True)
    r.scatter_add_(1, target, resid)
    return r.to(dtype)


def torch_chunked_knn(q: torch.Tensor, c: torch.Tensor, k: int, metric: str, chunk: int = 2048):
    """The plain torch route a user writes today: mm per query chunk in the input dtype, then topk.
    kl uses the GEMM form with log c and the query entropy."""
    values, indices = [], []
    if metric == "cosine":
        cn = torch.nn.functional.normalize(c.float(), dim=1).to(c.dtype)
    elif metric == "kl":
        logc = torch.log(c.float().clamp_min(1e-30)).to(c.dtype)
    for i in range(0, q.shape[0], chunk):
        qi = q[i:i + chunk]
        if metric == "cosine":
            s = torch.nn.functional.normalize(qi.float(), dim=1).to(q.dtype) @ cn.T
            v, ix = torch.topk(s, k, dim=1)
        else:
            neg_entropy = torch.special.xlogy(qi.float(), qi.float()).sum(1, keepdim=True)
            s = neg_entropy - (qi @ logc.T).float()
            v, ix = torch.topk(s, k, dim=1, largest=False)
        values.append(v.float())
        indices.append(ix)
    return torch.cat(values), torch.cat(indices)


def naive_js_knn(q: torch.Tensor, c: torch.Tensor, k: int):
    """The naive torch js: the reference formula in float32, materialising (q, c, d) blocks."""
    return ref.knn(q, c, k, "js", dtype=torch.float32)


def mm_rate(dtype: torch.dtype, d: int, device: torch.device, repeats: int) -> float:
    """The device's own matrix-product rate (GFLOP/s) at inner dimension d, same dtype."""
    m, n = 16384, 65536
    a = torch.randn(m, d, device=device).to(dtype)
    b = torch.randn(n, d, device=device).to(dtype)
    t = statistics.median(time_call(lambda: a @ b.T, device, repeats))
    return 2.0 * m * n * d / t / 1e9


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def markdown(rows: list[dict], device_name: str) -> str:
    lines = [f"# GPU benchmarks on {device_name}", "",
             "| case | dtype | k | backend | median s | p95 s | GFLOP/s | % of torch.mm | speed-up vs torch | "
             "extra peak MiB | max abs err | predicted s (model) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key, fmt):
            v = r.get(key)
            return "" if v is None else format(v, fmt)
        lines.append(f"| knn-{r['metric']} {r['nq']}x{r['n']}x{r['d']} | {r['dtype']} | {'-' if r['k'] is None else r['k']} | {r['backend']} | "
                     f"{f('median_s', '.4f')} | {f('p95_s', '.4f')} | {f('gflops', '.0f')} | {f('pct_of_mm', '.0f')} | "
                     f"{f('speedup_vs_torch', '.2f')} | {f('extra_peak_mib', '.0f')} | {f('max_abs_err', '.2e')} | "
                     f"{f('predicted_s', '.4f')} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def model_device(device_name: str) -> str | None:
    """The cost model's device for a CUDA device name ("NVIDIA H200" -> "H200 SXM")."""
    return next((m for m in DEVICES if m.split()[0] in device_name), None)


def compare(out: Path) -> None:
    """Print predicted (benchmarks/cost_model.py) vs measured for the triton rows in out/gpu-*.json."""
    print("| device | case | dtype | k | measured ms | predicted ms (bound) | serial ms | measured / predicted |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(out.glob("gpu-*.json")):
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            continue
        for r in rows:
            if r.get("backend") != "triton" or "predicted_s" not in r:
                continue
            print(f"| {r['device']} | knn-{r['metric']} {r['nq']}x{r['n']}x{r['d']} | {r['dtype']} | {r['k']} | "
                  f"{r['median_s'] * 1e3:.1f} | {r['predicted_s'] * 1e3:.1f} ({r['bound']}) | {r['serial_s'] * 1e3:.1f} | "
                  f"{r['median_s'] / r['predicted_s']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="directory for gpu-<device>.json / .md")
    ap.add_argument("--compare", type=Path, help="print predicted vs measured from DIR/gpu-*.json and exit")
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="stop starting new cases after this many seconds (the rest are listed as skipped)")
    ap.add_argument("--metrics", default="cosine,kl,js", help="comma-separated subset of the cases")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to smoke-test under TRITON_INTERPRET=1")
    args = ap.parse_args()
    if args.compare:
        compare(args.compare)
        return
    if args.out is None:
        ap.error("--out is required")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch; use --device cpu with TRITON_INTERPRET=1 to smoke-test")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    started = time.perf_counter()
    avail = tlfast.backends()
    rows: list[dict] = []
    common = dict(device=device_name, tlfast=getattr(tlfast, "__version__", "?"), commit=git_commit(),
                  torch=torch.__version__)

    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")

    def save() -> None:  # after every case, so a run cut short still leaves its results
        write_atomic(args.out / f"gpu-{slug}.json", json.dumps(rows, indent=1, default=str) + "\n")
        write_atomic(args.out / f"gpu-{slug}.md", markdown(rows, device_name))

    # fp16 cases first: if the time budget runs out, the bf16 repeats are what is skipped.
    for dtype in DTYPES:
        for metric, nq, n, d in (QUICK_CASES if args.quick else CASES):
            if metric not in args.metrics.split(","):
                continue
            dname = str(dtype).replace("torch.", "")
            base = dict(common, op="knn", metric=metric, nq=nq, n=n, d=d, dtype=dname)
            if time.perf_counter() - started > args.budget_s:
                rows.extend(dict(base, k=k, backend="*", note="skipped: time budget") for k in KS)
                continue
            q, c = make_inputs(metric, nq, n, d, dtype, device)
            input_bytes = (q.numel() + c.numel()) * q.element_size()
            flops = 2.0 * nq * n * d
            rate = mm_rate(dtype, d, device, args.repeats) if metric != "js" else None
            if rate is not None:
                rows.append(dict(base, k=None, backend="torch.mm", gflops=rate, pct_of_mm=100.0,
                                 note=f"16384x65536x{d} product, the device's own rate"))
            check_q = q[:64]  # every route's values are also checked against the reference here
            for k in KS:
                want = ref.knn(check_q, c, k, metric)[0]
                sub = min(nq, NAIVE_JS_QUERIES)
                if metric == "js":
                    runners = [("torch naive", lambda: naive_js_knn(q[:sub], c, k), nq / sub,
                                lambda: naive_js_knn(check_q, c, k)[0])]
                else:
                    runners = [("torch mm+topk", lambda: torch_chunked_knn(q, c, k, metric), 1.0,
                                lambda: torch_chunked_knn(check_q, c, k, metric)[0])]
                torch_t = None
                for b in ("triton", "cuda"):
                    if avail[b].available:
                        runners.append((b, lambda b=b: tlfast.knn(q, c, k, metric, backend=b), 1.0,
                                        lambda b=b: tlfast.knn(check_q, c, k, metric, backend=b).values))
                    else:
                        rows.append(dict(base, k=k, backend=b, note=f"unavailable: {avail[b].reason}"))
                for label, fn, scale, check in runners:
                    note = f"timed on {sub} queries, scaled x{scale:g}" if scale != 1.0 else ""
                    sync(device)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    try:
                        times = [t * scale for t in time_call(fn, device, args.repeats)]
                    except Exception as exc:  # a failing backend is a result to report, not a crash
                        rows.append(dict(base, k=k, backend=label, note=f"error: {type(exc).__name__}: {exc}"[:300]))
                        continue
                    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                    med = statistics.median(times)
                    row = dict(base, k=k, backend=label, median_s=med, p95_s=float(np.percentile(times, 95)),
                               gflops=flops / med / 1e9, note=note,
                               max_abs_err=float((check() - want).abs().nan_to_num(0.0).max()))
                    if rate is not None:
                        row["pct_of_mm"] = 100.0 * row["gflops"] / rate
                    if peak is not None:
                        row["extra_peak_mib"] = (peak - input_bytes) / 2 ** 20
                    mdev = model_device(device_name)
                    if label == "triton" and mdev is not None:
                        p = predict(metric, nq, n, d, k, dname, mdev)
                        row.update(predicted_s=p["predicted_s"], serial_s=p["serial_s"], bound=p["bound"])
                    if label.startswith("torch"):
                        torch_t = med
                    elif torch_t is not None:
                        row["speedup_vs_torch"] = torch_t / med
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            save()

    save()
    print(markdown(rows, device_name))
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
