"""Sharded kNN on 1 and 2 gloo processes (CPU), side by side, plus the communication it costs.

Follows ../shared/BENCHMARKS.md: medians and p95 of >= 5 timed runs after a warm-up, in one run.
Two freshly spawned gloo ranks run every contender round-robin (round after round, each contender
once, so a shared machine's drifting load falls on all alike); every timed call starts after a
barrier; one-process contenders run on rank 0 (distributed.knn on a one-rank group) while rank 1
waits; for two-rank contenders the slowest rank's time counts, round by round.

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

from _common import cpu_name, git_commit, mm_rate, peak_rss_bytes, write_results

HERE = Path(__file__).resolve().parent
CASE = {"metric": "cosine", "nq": 2_000, "n": 100_000, "d": 128, "k": 10}
QUICK = {"nq": 200, "n": 10_000}


def rank_main(rank: int, world: int, port: int, case: dict, repeats: int, out: str) -> None:
    """Every contender, round-robin: round after round each one runs once, so that the load of a
    shared machine drifting over time falls on all of them alike (round 0 is the warm-up)."""
    import tlfast
    from tlfast import distributed as tld

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    solo = dist.new_group([0])  # a one-rank group: distributed.knn on 1 process, same code path
    cores = os.cpu_count() or 1
    metric, nq, n, d, k = (case[x] for x in ("metric", "nq", "n", "d", "k"))
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(nq, d, generator=g), torch.randn(n, d, generator=g)
    bounds = np.linspace(0, n, world + 1).astype(int)
    shard = c[bounds[rank]:bounds[rank + 1]].contiguous()
    qbounds = np.linspace(0, nq, world + 1).astype(int)
    my_q = q[qbounds[rank]:qbounds[rank + 1]].contiguous()
    cand = torch.zeros(nq, 12 * k, dtype=torch.uint8)
    parts = [torch.empty_like(cand) for _ in range(world)]
    block = shard.view(torch.uint8)
    inbox = torch.empty_like(block)

    def ring_step():
        ops = [dist.P2POp(dist.isend, block, (rank + 1) % world), dist.P2POp(dist.irecv, inbox, (rank - 1) % world)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    flops = 2.0 * nq * n * d
    # (name, ranks, threads per rank, call, flop per call, bytes received per rank per call)
    contenders = [
        ("tlfast.knn (1 process)", 1, cores, lambda: tlfast.knn(q, c, k, metric), flops, 0),
        ("tlfast.knn (1 process, 1 thread)", 1, 1, lambda: tlfast.knn(q, c, k, metric), flops, 0),
        ("distributed.knn replicated", 1, cores, lambda: tld.knn(q, c, k, metric, group=solo), flops, 0),
        ("distributed.knn sharded queries (ring)", 1, cores,
         lambda: tld.knn(q, c, k, metric, sharded_queries=True, group=solo), flops, 0),
        ("distributed.knn replicated", world, 1, lambda: tld.knn(q, shard, k, metric), flops,
         (world - 1) * cand.numel()),
        ("distributed.knn sharded queries (ring)", world, 1,
         lambda: tld.knn(my_q, shard, k, metric, sharded_queries=True), flops, (world - 1) * block.numel()),
        ("local search only (one shard)", world, 1, lambda: tlfast.knn(q, shard, k, metric), flops / world, 0),
        ("candidate all-gather only", world, 1, lambda: dist.all_gather(parts, cand), None,
         (world - 1) * cand.numel()),
        ("one ring step only (shard send/recv)", world, 1, ring_step, None, block.numel()),
    ]
    times = [[] for _ in contenders]
    for rnd in range(repeats + 1):
        for i, (_, ranks, threads, call, _, _) in enumerate(contenders):
            dist.barrier()
            if ranks == 1 and rank != 0:
                continue  # one-process contenders run on rank 0 while rank 1 waits at the barrier
            torch.set_num_threads(threads)
            t = time.perf_counter()
            call()
            if rnd:
                times[i].append(time.perf_counter() - t)
    rows = []
    for (name, ranks, threads, _, fl, received), ts in zip(contenders, times):
        if ranks > 1:  # the slowest rank's time, round by round
            t = torch.tensor(ts, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ts = t.tolist()
        if rank != 0:
            continue
        med = float(np.median(ts))
        rows.append({"op": "knn", "contender": name, "world": ranks, "threads_per_rank": threads, **case,
                     "dtype": "float32", "median_s": med, "p95_s": float(np.percentile(ts, 95)),
                     "runs": len(ts), "gflops": fl / med / 1e9 if fl else None,
                     "bytes_received_per_rank": received or None,
                     "gbytes_per_s": received / med / 1e9 if received else None})
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
    busy = meta["load_avg_1_5_15"][0] > meta["cores"]
    out = ["# Sharded kNN on CPU: 1 -> 2 gloo processes\n",
           f"{meta}\n",
           f"**This machine has {meta['cores']} cores**: the 2-rank runs use 1 thread per rank on the "
           f"same cores the 1-process runs use with {base['threads_per_rank']} threads, so the best "
           f"possible ratio is 1.0x; the ratios measure the cost of sharding, not the gain of a second "
           f"machine (see SCALING.md for that).\n",
           f"Load average during the run: {meta['load_avg_1_5_15'][0]} on {meta['cores']} cores"
           + (" -- other jobs were running, so single figures carry tens of % of noise; the round-robin "
              "order spreads it over every contender alike.\n" if busy else ".\n"),
           f"torch.mm float32 on this machine: **{mm['gflops']:.1f} GFLOP/s** (all threads).\n",
           f"Case: {base['metric']}, q = {base['nq']:,}, n = {base['n']:,}, d = {base['d']}, k = {base['k']}, "
           f"float32.\n",
           "| contender | ranks x threads | median s | p95 s | GFLOP/s | time / tlfast.knn | MB in per rank | GB/s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = f"{r['gflops']:.1f}" if r.get("gflops") else "-"
        bw = f"{r['gbytes_per_s']:.2f}" if r.get("gbytes_per_s") else "-"
        mb = f"{r['bytes_received_per_rank'] / 1e6:.2f}" if r.get("bytes_received_per_rank") else "-"
        out.append(f"| {r['contender']} | {r['world']} x {r['threads_per_rank']} | {r['median_s']:.4f} | "
                   f"{r['p95_s']:.4f} | {g} | {r['median_s'] / base['median_s']:.2f}x | {mb} | {bw} |")
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
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(rank_main, args=(2, free_port(), case, max(5, args.repeats), out), nprocs=2)
        rows = json.loads(Path(out).read_text())
    meta = {"device": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "tlfast": tlfast.__version__, "commit": git_commit(), "backend": "gloo (localhost)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}  # the machine is shared
    for r in rows:
        r.update({k: meta[k] for k in ("device", "tlfast", "commit")})
    md = markdown(rows, mm, meta)
    write_results(args.out, args.name, {"meta": meta, "mm": mm, "rows": rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
