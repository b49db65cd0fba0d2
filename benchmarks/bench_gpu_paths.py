"""GPU paths beyond the fused kNN cases, for benchmarks/gpu_check.sh: the out-of-core Index
(corpus streamed under a memory budget) and tlfast.distributed over NCCL with one process.  Each
checks its result against an in-memory tlfast.knn on the same device and times the call (median
of 5 after a warm-up); a failure is a row with the error, not a crash.  Writes
gpu-paths-<device>.json / .md to --out.

    python benchmarks/bench_gpu_paths.py index --out /tmp/gpu
    python benchmarks/bench_gpu_paths.py distributed --out /tmp/gpu
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

import tlfast


def timed(fn, repeats: int = 5) -> tuple[object, float]:
    out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def same(a, b) -> bool:
    return bool(torch.equal(torch.as_tensor(a.indices).cpu(), torch.as_tensor(b.indices).cpu()))


def case_index(nq: int, n: int, d: int, k: int) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    corpus = torch.randn(n, d, device="cuda", generator=g).half()
    q = torch.randn(nq, d, device="cuda", generator=g).half()
    want = tlfast.knn(q, corpus, k, "cosine")
    for budget in (None, "64MB"):
        base = dict(path="index", metric="cosine", nq=nq, n=n, d=d, k=k, dtype="float16", memory_budget=budget)
        try:
            index = tlfast.Index("cosine", dtype="float16", device="cuda").add(corpus.cpu())
            got, med = timed(lambda: index.search(q, k, memory_budget=budget))
            rows.append(dict(base, median_s=med, matches_knn=same(got, want)))
        except Exception as exc:  # noqa: BLE001 - reported as a result row
            rows.append(dict(base, error=f"{type(exc).__name__}: {exc}"[:300]))
    return rows


def case_distributed(nq: int, n: int, d: int, k: int) -> list[dict]:
    import torch.distributed as dist
    from tlfast import distributed
    base = dict(path="distributed-nccl-1proc", metric="cosine", nq=nq, n=n, d=d, k=k, dtype="float16")
    try:
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
        g = torch.Generator(device="cuda").manual_seed(1)
        corpus = torch.randn(n, d, device="cuda", generator=g).half()
        q = torch.randn(nq, d, device="cuda", generator=g).half()
        want = tlfast.knn(q, corpus, k, "cosine")
        got, med = timed(lambda: distributed.knn(q, corpus, k, "cosine"))
        return [dict(base, median_s=med, matches_knn=same(got, want))]
    except Exception as exc:  # noqa: BLE001
        return [dict(base, error=f"{type(exc).__name__}: {exc}"[:300])]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", choices=("index", "distributed"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    shape = (256, 20000, 64, 10) if args.quick else (8192, 1 << 20, 128, 10)
    rows = (case_index if args.path == "index" else case_distributed)(*shape)
    device = torch.cuda.get_device_name()
    for r in rows:
        r["device"] = device
        print(json.dumps(r), flush=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-paths-{args.path}-{slug}"
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [f"# GPU paths on {device}", "", "| path | case | memory budget | median s | matches knn | error |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['nq']}x{r['n']}x{r['d']} k={r['k']} {r['dtype']} | {r.get('memory_budget') or '-'} | "
              f"{r.get('median_s', float('nan')):.4f} | {r.get('matches_knn', '')} | {r.get('error', '')} |" for r in rows]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
