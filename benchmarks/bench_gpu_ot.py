"""GPU case of tlfast.ot: the Triton Sinkhorn tile pass against POT's torch backend (dense M on the
GPU), fp32 and fp16 operands, in one process (called by benchmarks/gpu_check.sh).

    python benchmarks/bench_gpu_ot.py --out $OUT            # 32k x 32k x 128, reg 0.05
    python benchmarks/bench_gpu_ot.py --quick --out /tmp/b  # 4k x 4k

Reports whole-solve seconds (median of 5 after a warm-up), iterations, transport cost and its
relative difference to POT, and peak GPU memory above the inputs.  Writes gpu-ot-<device>.json/.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import tlfast.ot as tot


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    times, out = [], None
    for _ in range(reps):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out, (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reg", type=float, default=0.05)
    args = ap.parse_args()
    n = 4096 if args.quick else 32768
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = torch.nn.functional.normalize(torch.randn(n, 128, device="cuda", generator=g), dim=1)
    xt = torch.nn.functional.normalize(torch.randn(n, 128, device="cuda", generator=g) + 0.1, dim=1)
    rows = []
    for dtype in (torch.float32, torch.float16):
        sec, res, mem = timed(lambda: tot.sinkhorn(xs.to(dtype), xt.to(dtype), "l2", args.reg, tol=1e-6))
        rows.append({"contender": f"tlfast-triton-{str(dtype)[6:]}", "seconds": sec, "n_iter": res.n_iter,
                     "cost": res.cost, "peak_mb": mem})
    try:
        import ot

        a = torch.full((n,), 1.0 / n, device="cuda")

        def pot_solve():
            M = ot.dist(xs, xt)
            P = ot.sinkhorn(a, a, M, args.reg, method="sinkhorn_log", stopThr=1e-6, numItermax=1000)
            return float((P * M).sum())
        sec, cost, mem = timed(pot_solve, reps=3)
        rows.append({"contender": "pot-torch-float32", "seconds": sec, "cost": cost, "peak_mb": mem})
    except ImportError as exc:
        rows.append({"contender": "pot-torch-float32", "error": str(exc)})
    ref = next((r["cost"] for r in rows if r["contender"] == "pot-torch-float32" and "cost" in r), None)
    name = torch.cuda.get_device_name().replace(" ", "-")
    md = [f"# tlfast.ot on {torch.cuda.get_device_name()}: {n} x {n} x 128, l2, reg {args.reg}", "",
          "| contender | median s | iterations | cost | rel. diff to POT | peak MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{abs(r['cost'] - ref) / ref:.1e}" if ref and "cost" in r else "—"
        md.append(f"| {r['contender']} | {r.get('seconds', 'failed')} | {r.get('n_iter', '—')} | {r.get('cost', '—')} | "
                  f"{rel} | {r.get('peak_mb', '—')} |")
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps({"n": n, "rows": rows}, indent=1)), (".md", "\n".join(md) + "\n")):
        tmp = args.out / f"gpu-ot-{name}{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, args.out / f"gpu-ot-{name}{suffix}")
    print("\n".join(md))


if __name__ == "__main__":
    main()
