"""Sharded kNN on 1 and 2 gloo processes (CPU), side by side, plus the communication it costs.

Follows ../shared/BENCHMARKS.md: medians and p95 of >= 5 timed runs after a warm-up, in one run.
Each world size runs in freshly spawned processes; every timed call starts after a barrier and
the slowest rank's time counts (rank 0's merged answer needs every rank's candidates anyway).

Contenders, all on the same cores:
* ``tlfast.knn`` in one process (all threads, then 1 thread): the single-process baseline;
* ``distributed.knn`` on 1 rank: the cost of the distributed layer itself;
* ``distributed.knn`` on 2 ranks, replicated queries (local top-k + all-gather + merge) and
  sharded queries (corpus blocks round a ring);
* the collectives alone on 2 ranks: the candidate all-gather (world x k x 12 bytes per query) and
  one ring step (a corpus shard through send/recv), which give the gloo bandwidth SCALING.md uses.

    python benchmarks/bench_distributed.py            # -> benchmarks/results/distributed-cpu.{json,md}
    python benchmarks/bench_distributed.py --quick --out /tmp

(with tlfast importable: installed, or PYTHONPATH=. after an in-place build)

Note: the project's machine has 2 cores, so "2 processes" means 2 ranks x 1 thread sharing the
same 2 cores that the 1-process run uses with 2 threads.  The scaling measured here is therefore
the overhead of sharding (at best 1.0x, never the 2x of two machines); the speed-up across
machines is what benchmarks/SCALING.md models.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench_knn import cpu_name, git_commit, mm_rate, peak_rss_bytes

HERE = Path(__file__).resolve().parent
CASE = {"metric": "cosine", "nq": 2_000, "n": 100_000, "d": 128, "k": 10}
QUICK = {"nq": 200, "n": 10_000}


def timed(fn, repeats: int, group_sync: bool) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if group_sync:
            dist.barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    if group_sync:  # the slowest rank's time, run by run
        t = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times = t.tolist()
    return times


def rank_main(rank: int, world: int, port: int, case: dict, repeats: int, out: str) -> None:
    import tlfast
    from tlfast import distributed as tld

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    metric, nq, n, d, k = (case[x] for x in ("metric", "nq", "n", "d", "k"))
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(nq, d, generator=g), torch.randn(n, d, generator=g)
    bounds = np.linspace(0, n, world + 1).astype(int)
    shard = c[bounds[rank]:bounds[rank + 1]].contiguous()
    qbounds = np.linspace(0, nq, world + 1).astype(int)
    my_q = q[qbounds[rank]:qbounds[rank + 1]].contiguous()
    threads = torch.get_num_threads()
    rows = []

    def row(name, times, flops=None, **extra):
        med = float(np.median(times))
        rows.append({"op": "knn", "contender": name, "world": world, "threads_per_rank": threads, **case,
                     "dtype": "float32", "median_s": med, "p95_s": float(np.percentile(times, 95)),
                     "runs": len(times), "gflops": flops / med / 1e9 if flops else None, **extra})

    flops = 2.0 * nq * n * d
    if world == 1:
        row("tlfast.knn (1 process)", timed(lambda: tlfast.knn(q, c, k, metric), repeats, False), flops)
        torch.set_num_threads(1)
        row("tlfast.knn (1 process, 1 thread)", timed(lambda: tlfast.knn(q, c, k, metric), repeats, False),
            flops, threads_per_rank=1)
        torch.set_num_threads(threads)
    row("distributed.knn replicated", timed(lambda: tld.knn(q, shard, k, metric), repeats, True), flops)
    row("distributed.knn sharded queries (ring)",
        timed(lambda: tld.knn(my_q, shard, k, metric, sharded_queries=True), repeats, True), flops)
    if world > 1:
        # Where the time goes: the local search alone, and the two collectives alone.
        row("local search only (one shard)", timed(lambda: tlfast.knn(q, shard, k, metric), repeats, True),
            flops / world)
        cand = torch.zeros(nq, 12 * k, dtype=torch.uint8)
        parts = [torch.empty_like(cand) for _ in range(world)]
        t = timed(lambda: dist.all_gather(parts, cand), repeats, True)
        row("candidate all-gather only", t, bytes_per_rank=cand.numel(),
            gbytes_per_s=cand.numel() * (world - 1) / float(np.median(t)) / 1e9)
        block = shard.view(torch.uint8)
        inbox = torch.empty_like(block)

        def ring_step():
            ops = [dist.P2POp(dist.isend, block, (rank + 1) % world),
                   dist.P2POp(dist.irecv, inbox, (rank - 1) % world)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()

        t = timed(ring_step, repeats, True)
        row("one ring step only (shard send/recv)", t, bytes_per_rank=block.numel(),
            gbytes_per_s=block.numel() / float(np.median(t)) / 1e9)
    peak = torch.tensor([peak_rss_bytes()], dtype=torch.int64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        for r in rows:
            r["peak_rss_bytes_max_rank"] = int(peak)
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def markdown(rows: list[dict], mm: dict, meta: dict) -> str:
    base = next(r for r in rows if r["contender"] == "tlfast.knn (1 process)")
    out = [f"# Sharded kNN on CPU: 1 -> 2 gloo processes\n",
           f"{meta}\n",
           f"**This machine has {meta['cores']} cores**: the 2-rank runs use 1 thread per rank on the "
           f"same cores the 1-process runs use with {base['threads_per_rank']} threads, so the best "
           f"possible ratio is 1.0x; the ratios measure the cost of sharding, not the gain of a second "
           f"machine (see SCALING.md for that).\n",
           f"torch.mm float32 on this machine: **{mm['gflops']:.1f} GFLOP/s** (all threads).\n",
           f"Case: {base['metric']}, q = {base['nq']:,}, n = {base['n']:,}, d = {base['d']}, k = {base['k']}, "
           f"float32.\n",
           "| contender | ranks x threads | median s | p95 s | GFLOP/s | time / tlfast.knn | GB/s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        g = f"{r['gflops']:.1f}" if r.get("gflops") else "-"
        bw = f"{r['gbytes_per_s']:.2f}" if r.get("gbytes_per_s") else "-"
        out.append(f"| {r['contender']} | {r['world']} x {r['threads_per_rank']} | {r['median_s']:.4f} | "
                   f"{r['p95_s']:.4f} | {g} | {r['median_s'] / base['median_s']:.2f}x | {bw} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="distributed-cpu")
    args = p.parse_args(argv)
    import tlfast

    case = {**CASE, **(QUICK if args.quick else {})}
    mm = mm_rate(args.quick)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            out = os.path.join(tmp, f"world{world}.json")
            mp.spawn(rank_main, args=(world, free_port(), case, max(5, args.repeats), out), nprocs=world)
            rows += json.loads(Path(out).read_text())
            print(f"world {world}: done", file=sys.stderr)
    meta = {"device": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "tlfast": tlfast.__version__, "commit": git_commit(), "backend": "gloo (localhost)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}  # the machine is shared
    for r in rows:
        r.update({k: meta[k] for k in ("device", "tlfast", "commit")})
    md = markdown(rows, mm, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps({"meta": meta, "mm": mm, "rows": rows}, indent=1)), (".md", md)):
        dst = args.out / f"{args.name}{suffix}"
        tmp = dst.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(dst)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
