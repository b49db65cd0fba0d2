"""The fp32 fused kNN kernel across the feature dimension d, against torch.mm's fp32 rate (issue 12, item 4).

At d = 128 a packed corpus panel ([d][NR] floats) and the query block sit in L1 / L2; at d = 768 or
1024 they do not, which is what the kernel's K-blocking is for.  This sweep times, side by side in
one run, for every d and metric:

* ``tlfast``          the installed build (this checkout), or the build in ``--after DIR``;
* ``tlfast (before)`` optionally, another build of tlfast (``--before DIR``: a folder holding a
                      ``tlfast`` package, e.g. a copy of site-packages/tlfast from the previous commit);
* ``torch.mm``        the peer rate: a (10k x d) @ (d x 10k) fp32 product, all threads.

Each tlfast build runs in its own worker process (so two builds can be loaded at once) and every
round times every contender once, in rotating order, so load changes on a shared machine hit all
alike; medians of >= 5 rounds after a warm-up.  GFLOP/s = 2 * nq * n * d / t.  The result also
records whether the builds return identical indices.

    python benchmarks/bench_knn_dsweep.py --before /tmp/tlfast-before      # -> results/cpu-knn-dsweep.{json,md}
    python benchmarks/bench_knn_dsweep.py --d 128,1024 --nq 2000 --n 20000 --out /tmp
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

RESULTS = Path(__file__).resolve().parent / "results"
MM_ROWS = 10_000


def worker() -> int:
    """Serve timed kNN calls: one JSON request per stdin line, one JSON answer per stdout line."""
    import torch

    import tlfast
    from tlfast.bench.data import knn_data

    data_key, q, c = None, None, None
    print(json.dumps({"tlfast": tlfast.__file__, "isa": tlfast.backends()["cpu"].reason}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        key = (req["nq"], req["n"], req["d"])
        if key != data_key:
            q = c = None
            qa, ca = knn_data("normal", *key)
            q, c = torch.from_numpy(qa), torch.from_numpy(ca)
            data_key = key
        t, cpu = time.perf_counter(), time.process_time()
        values, idx = tlfast.knn(q, c, req["k"], req["metric"], backend="cpu")
        s, cpu_s = time.perf_counter() - t, time.process_time() - cpu
        if req.get("save"):
            np.save(req["save"] + "-idx.npy", idx.numpy())
            np.save(req["save"] + "-val.npy", values.numpy())
        print(json.dumps({"s": s, "cpu_s": cpu_s}), flush=True)
    return 0


class Worker:
    def __init__(self, pythonpath: str | None):
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        # cwd outside the checkout, so that `import tlfast` finds the build named by PYTHONPATH (or the
        # installed one), never the source tree
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=tempfile.gettempdir())
        self.info = json.loads(self.proc.stdout.readline())

    def call(self, **req) -> tuple[float, float]:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("benchmark worker died")
        out = json.loads(line)
        return out["s"], out["cpu_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def mm_peer(d: int):
    import torch

    a, b = torch.randn(MM_ROWS, d), torch.randn(d, MM_ROWS)

    def run() -> tuple[float, float]:
        t, cpu = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        return time.perf_counter() - t, time.process_time() - cpu
    return run


def run_sweep(args) -> int:
    import torch

    import tlfast
    from tlfast._persist import write_file
    from tlfast.bench.schema import cpu_model_and_flags, git_commit, ISA_FLAGS

    builds = {"tlfast": Worker(str(args.after) if args.after else None)}
    if args.before:
        builds["tlfast (before)"] = Worker(str(args.before))
    load_before = os.getloadavg()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="tlfast-dsweep-"))
    try:
        for d in args.d:
            mm = mm_peer(d)
            mm()
            for metric in args.metrics:
                req = dict(metric=metric, nq=args.nq, n=args.n, d=d, k=args.k)
                for name, w in builds.items():  # warm-up, which also keeps the answers
                    w.call(**req, save=str(tmp / f"{name}-{metric}-{d}"))
                times = {name: [] for name in builds}
                times["torch.mm"] = []
                order = list(times)
                for r in range(args.rounds):
                    for name in order[r % len(order):] + order[:r % len(order)]:
                        times[name].append(mm() if name == "torch.mm" else builds[name].call(**req))
                ref_idx = np.load(tmp / f"tlfast-{metric}-{d}-idx.npy")
                ref_val = np.load(tmp / f"tlfast-{metric}-{d}-val.npy")
                for name, ts in times.items():
                    med, med_cpu = (float(np.median([t[i] for t in ts])) for i in (0, 1))
                    flops = 2.0 * (MM_ROWS * MM_ROWS if name == "torch.mm" else args.nq * args.n) * d
                    row = {"d": d, "metric": metric, "contender": name, "median_s": med,
                           "samples_s": [t[0] for t in ts], "gflops": flops / med / 1e9, "median_cpu_s": med_cpu,
                           "samples_cpu_s": [t[1] for t in ts], "gflops_per_cpu_s": flops / med_cpu / 1e9}
                    if name == "tlfast (before)":
                        idx = np.load(tmp / f"{name}-{metric}-{d}-idx.npy")
                        val = np.load(tmp / f"{name}-{metric}-{d}-val.npy")
                        row["rows_with_identical_indices"] = float(np.mean(np.all(idx == ref_idx, axis=1)))
                        row["max_abs_value_diff"] = float(np.max(np.abs(val - ref_val)))
                    rows.append(row)
                    print(f"d={d:5d} {metric:7s} {name:16s} {med:8.3f} s {row['gflops']:7.1f} GFLOP/s "
                          f"{row['gflops_per_cpu_s']:7.1f} GFLOP per CPU-s", file=sys.stderr)
    finally:
        for w in builds.values():
            w.close()
    model, flags = cpu_model_and_flags()
    meta = {"device": model, "isa_flags": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "tlfast": tlfast.__version__,
            "commit": git_commit(), "kernels": {name: w.info for name, w in builds.items()},
            "shape": {"nq": args.nq, "n": args.n, "k": args.k, "mm": [MM_ROWS, "d", MM_ROWS]},
            "rounds": args.rounds, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    meta["labels"] = {"tlfast": args.after_label, "tlfast (before)": args.before_label}
    md = markdown(meta, rows, "tlfast (before)" in builds)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"meta": meta, "rows": rows}, indent=1).encode()
    write_file(args.out / f"{args.name}.json", lambda f: f.write(payload))
    write_file(args.out / f"{args.name}.md", lambda f: f.write(md.encode()))
    print(md)
    return 0


def markdown(meta: dict, rows: list[dict], before: bool) -> str:
    get = {(r["d"], r["metric"], r["contender"]): r for r in rows}
    sh = meta["shape"]
    lines = ["# CPU fused kNN (fp32) across d, against torch.mm", "",
             f"CPU: {meta['device']}, flags {' '.join(meta['isa_flags'])}, {meta['cores']} cores; kernels: "
             f"{meta['kernels']['tlfast']['isa']}.  Load average before / after: {meta['loadavg_before'][0]:.1f} / "
             f"{meta['loadavg_after'][0]:.1f} (shared machine).  {meta['date']}, commit {meta['commit']}.", "",
             f"kNN: {sh['nq']} queries x {sh['n']} corpus rows x d, k = {sh['k']}, fp32, `tlfast.knn(backend=\"cpu\")`; "
             f"torch.mm: ({MM_ROWS} x d) @ (d x {MM_ROWS}) fp32.  GFLOP/s = 2 n m d / t, median of "
             f"{meta['rounds']} interleaved rounds after a warm-up; each tlfast build in its own process.", ""]
    after_name, before_name = meta["labels"]["tlfast"], meta["labels"]["tlfast (before)"]
    head = "| d | metric | " + (f"{before_name} GFLOP/s | " if before else "") + f"{after_name} GFLOP/s | " \
           f"torch.mm GFLOP/s | {after_name} / torch.mm | " + \
           (f"{after_name} / {before_name} | identical indices |" if before else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for (d, metric, name), r in get.items():
        if name != "tlfast":
            continue
        mm = get[(d, metric, "torch.mm")]
        cells = [str(d), metric]
        b = get.get((d, metric, "tlfast (before)"))
        if before:
            cells.append(f"{b['gflops']:.1f}")
        cells += [f"**{r['gflops']:.1f}**", f"{mm['gflops']:.1f}", f"{r['gflops'] / mm['gflops']:.2f}x"]
        if before:
            cells += [f"{r['gflops'] / b['gflops']:.2f}x", f"{100 * b['rows_with_identical_indices']:.2f}% of rows"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The same runs by CPU time (GFLOP per CPU-second of the process, all its threads): on a "
              "shared machine a process that is descheduled loses wall time but not CPU time, so these ratios "
              "are steadier; OpenMP threads spinning at a barrier do count.", "",
              "| d | metric | " + (f"{before_name} | " if before else "") + f"{after_name} | torch.mm | "
              f"{after_name} / torch.mm | " + (f"{after_name} / {before_name} |" if before else ""),
              "|" + "---|" * (7 if before else 5)]
    for (d, metric, name), r in get.items():
        if name != "tlfast":
            continue
        mm = get[(d, metric, "torch.mm")]
        b = get.get((d, metric, "tlfast (before)"))
        cells = [str(d), metric] + ([f"{b['gflops_per_cpu_s']:.1f}"] if before else [])
        cells += [f"**{r['gflops_per_cpu_s']:.1f}**", f"{mm['gflops_per_cpu_s']:.1f}",
                  f"{r['gflops_per_cpu_s'] / mm['gflops_per_cpu_s']:.2f}x"]
        if before:
            cells.append(f"{r['gflops_per_cpu_s'] / b['gflops_per_cpu_s']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=lambda s: [int(x) for x in s.split(",")], default=[128, 256, 768, 1024])
    p.add_argument("--metrics", type=lambda s: s.split(","), default=["cosine", "l2"])
    p.add_argument("--nq", type=int, default=10_000)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--before", type=Path, help="folder holding another tlfast build to time alongside")
    p.add_argument("--after", type=Path, help="folder holding the tlfast build to time (default: the installed one)")
    p.add_argument("--before-label", default="before", help="the --before build's name in the table")
    p.add_argument("--after-label", default="tlfast", help="the timed build's name in the table")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="cpu-knn-dsweep", help="result file stem")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker()
    if args.rounds < 5:
        p.error("--rounds must be >= 5 (medians of at least 5)")
    return run_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
