"""GPU exact mode's fp16 screening vs the 3xTF32 fp32 path, and precision="fp16" (issue 12, item 3).

Cosine 10k x 100k x 128, k = 10 on the triton backend, same run: default exact (3xTF32 products),
exact with an fp16 tensor-core screen + certified re-rank (tlfast.precision.SCREEN = "fp16"), and
precision="fp16"; medians of 5 after a warm-up; the screened indices are checked against the float64
oracle on the first 256 queries.  Writes gpu-lowp-<device>.{json,md} under --out.

    python benchmarks/bench_gpu_lowp.py --out /tmp/gpu          # on a machine with a GPU
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import tlfast
    from tlfast import precision as tlp
    from tlfast import reference as ref

    nq, n, d, k = args.queries, 100_000, 128, 10
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(nq, d, device="cuda", generator=g)
    c = torch.randn(n, d, device="cuda", generator=g)
    rows = []

    def run(name, **kw):
        fn = lambda: tlfast.knn(q, c, k, "cosine", backend="triton", **kw)  # noqa: E731
        s = timed(fn, args.repeats)
        rows.append({"case": name, "median_s": s, "gflops": 2.0 * nq * n * d / s / 1e9})
        return fn()

    base = run("exact (3xTF32)")
    tlp.SCREEN = "fp16"
    screened = run("exact, fp16 screen + re-rank")
    tlp.SCREEN = "auto"
    run("precision=fp16", precision="fp16")
    want = ref.knn(q[:256], c, k, "cosine")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [nq, n, d, k],
            "screened_equals_oracle_first_256": bool(torch.equal(screened.indices[:256], want[1])),
            "screened_equals_fp32_path_rows": float((screened.indices == base.indices).all(1).float().mean())}
    name = meta["device"].replace(" ", "-").lower()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu-lowp-{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [f"# GPU exact mode with fp16 screening ({meta['device']})", "", str(meta), "",
          "| case | median s | GFLOP/s |", "|---|---|---|"]
    md += [f"| {r['case']} | {r['median_s']:.4f} | {r['gflops']:.0f} |" for r in rows]
    (args.out / f"gpu-lowp-{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
