"""Optimal transport benchmark: tlfast.ot.sinkhorn (fused C++ tile pass) vs POT (numpy and torch
backends, dense M) and GeomLoss (tensorized), side by side; plus exact assignment.

Every (case, contender, round) runs in its own fresh subprocess, so peak RSS is its own; rounds are
interleaved across contenders; medians are reported with the machine load (os.getloadavg()).

    python benchmarks/bench_ot.py                      # -> benchmarks/results/ot-cpu.{json,md} (--name to rename)
    python benchmarks/bench_ot.py --quick --out /tmp   # small shapes, a smoke run

Cases:
  solve     10k x 10k x 128 unit-normalised rows, l2, reg 0.05: whole solve to marginal error tol
            (cost matrix included; ε-scaling for tlfast), transport cost, peak extra memory.
  iter      the same problem, time per iteration at fixed ε (POT with M precomputed, untimed).
  big       100k x 100k x 128: tlfast only, the whole solve measured (one round), its iterations,
            time per iteration and peak extra memory.
  assign    5k x 5k (dense, tlfast.match vs scipy linear_sum_assignment on the same cost) and
            100k x 100k x 32 sparse (perfect matching on the kNN graph, gap to the kNN lower bound).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import cpu_name, git_commit, write_results  # noqa: E402


def unit_rows(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32) + np.float32(shift)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_flags() -> list[str]:
    want = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in want if f in have]
    return []


# --- workers: one run in this process, result as JSON on stdout --------------------------------

def worker(args) -> dict:
    import torch

    xs, xt = unit_rows(args.n, args.d, 0), unit_rows(args.m, args.d, 1, shift=0.1)
    xs = xs / np.linalg.norm(xs, axis=1, keepdims=True)
    xt = xt / np.linalg.norm(xt, axis=1, keepdims=True)
    reg, tol, who = args.reg, args.tol, args.contender
    out: dict = {}
    if who.startswith("tlfast"):
        import tlfast.ot as tot

        tot.sinkhorn(xs[:500], xt[:500], "l2", reg, tol=tol)  # warm-up: threads, code paths
        base = rss_mb()
        t0 = time.perf_counter()
        if args.case == "pass":
            # One fused half-iteration (an iteration is two of these plus O(n + m) work), through the
            # same call the solver makes.
            u, v = torch.from_numpy(xs), torch.from_numpy(xt)
            beta = torch.zeros(args.m, dtype=torch.float64)
            tot._lse_cpu(u, v, 2.0 / reg, beta, -2.0, None)
            dt = time.perf_counter() - t0
            return {"seconds_per_pass": dt, "seconds_per_iteration": 2 * dt,
                    "peak_extra_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base,
                    "threads": torch.get_num_threads()}
        if args.case == "solve":
            res = tot.sinkhorn(xs, xt, "l2", reg, tol=tol, max_iter=args.max_iter)
        else:
            res = tot.sinkhorn(xs, xt, "l2", reg, tol=1e-30, max_iter=args.iters, relaxation=1.0)
        dt = time.perf_counter() - t0
        out = {"seconds": dt, "n_iter": res.n_iter, "cost": res.cost, "marginal_error": res.marginal_error,
               "relaxation": res.relaxation, "n_scaling_steps": res.n_scaling_steps}
    elif who.startswith("pot"):
        import ot

        backend_torch = who == "pot-torch"
        a, b = np.full(args.n, 1.0 / args.n), np.full(args.m, 1.0 / args.m)
        if backend_torch:
            xs_, xt_ = torch.from_numpy(xs), torch.from_numpy(xt)  # float32: POT torch's fastest
            a, b = torch.from_numpy(a).float(), torch.from_numpy(b).float()
        else:
            xs_, xt_ = xs.astype(np.float64), xt.astype(np.float64)
        ot.sinkhorn(a[:300] * args.n / 300, b[:300] * args.m / 300, ot.dist(xs_[:300], xt_[:300]), reg,
                    method="sinkhorn_log", numItermax=20)  # warm-up
        if args.case == "iter":
            M = ot.dist(xs_, xt_)
        base = rss_mb()
        t0 = time.perf_counter()
        if args.case == "solve":
            M = ot.dist(xs_, xt_)
            P, log = ot.sinkhorn(a, b, M, reg, method="sinkhorn_log", stopThr=tol, numItermax=args.max_iter,
                                 log=True)
        else:
            P, log = ot.sinkhorn(a, b, M, reg, method="sinkhorn_log", stopThr=0.0, numItermax=args.iters,
                                 log=True)
        dt = time.perf_counter() - t0
        P64 = np.asarray(P, dtype=np.float64)
        M64 = np.asarray(M, dtype=np.float64)
        out = {"seconds": dt, "n_iter": int(log.get("niter", args.iters)), "cost": float((P64 * M64).sum()),
               "marginal_error": float(np.linalg.norm(P64.sum(0) - np.asarray(b, dtype=np.float64)))}
    elif who == "geomloss":
        from geomloss import SamplesLoss

        # GeomLoss's p=2 cost is |x - y|^2 / 2 with ε = blur^2: the same problem at blur = sqrt(reg / 2).
        loss = SamplesLoss("sinkhorn", p=2, blur=(reg / 2) ** 0.5, scaling=0.9, debias=False, backend="tensorized")
        xs_, xt_ = torch.from_numpy(xs), torch.from_numpy(xt)
        loss(xs_[:300], xt_[:300])
        base = rss_mb()
        t0 = time.perf_counter()
        value = float(loss(xs_, xt_))
        dt = time.perf_counter() - t0
        out = {"seconds": dt, "n_iter": None, "entropic_value_x2": 2 * value}
    out["peak_extra_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    out["threads"] = torch.get_num_threads()
    return out


def assign_worker(args) -> dict:
    import torch
    from scipy.optimize import linear_sum_assignment

    import tlfast
    from tlfast.reference import pairwise_tile

    xs, xt = unit_rows(args.n, args.d, 2), unit_rows(args.m, args.d, 3, shift=0.1)
    base = rss_mb()
    out: dict = {}
    if args.contender == "scipy-dense":
        t0 = time.perf_counter()
        c = pairwise_tile(torch.from_numpy(xs), torch.from_numpy(xt), "l2").numpy()
        r, col = linear_sum_assignment(c)
        out = {"seconds": time.perf_counter() - t0, "cost": float(c[r, col].sum())}
    else:
        budget = 0 if args.contender == "tlfast-sparse" else 1 << 30
        t0 = time.perf_counter()
        res = tlfast.match(xs, xt, "l2", method="assignment", memory_budget=budget)
        dt = time.perf_counter() - t0
        out = {"seconds": dt, "cost": float(np.asarray(res.scores, dtype=np.float64).sum()),
               "pairs": int(len(res.source_idx)), "distinct_targets": int(len(np.unique(res.target_idx)))}
        if args.contender == "tlfast-sparse":
            fwd = tlfast.knn(xs, xt, 1, "l2").values[:, 0].astype(np.float64).sum()
            back = tlfast.knn(xt, xs, 1, "l2").values[:, 0].astype(np.float64).sum()
            lb = max(fwd, back)
            out.update(knn_lower_bound=float(lb), gap_to_lower_bound=float(out["cost"] / lb - 1))
    out["peak_extra_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return out


def run(case, contender, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--case", case, "--contender", contender]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}",
                "wall": time.time() - t0}
    return json.loads(p.stdout.strip().splitlines()[-1])


def median(rs, key):
    vals = [r[key] for r in rs if r.get(key) is not None and "error" not in r]
    return float(np.median(vals)) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--case", default="solve")
    ap.add_argument("--contender", default="tlfast")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--m", type=int, default=10_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reg", type=float, default=0.05)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=0, help="rows of the solve / iter cases (default 10k)")
    ap.add_argument("--skip", default="", help="comma-separated cases to skip: solve,iter,big,assign")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="ot-cpu", help="results file stem (split long runs: --skip and --name)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(assign_worker(args) if args.case == "assign" else worker(args)))
        return

    n = args.size or (2_000 if args.quick else 10_000)
    big = 20_000 if args.quick else 100_000
    skip = set(filter(None, args.skip.split(",")))
    loads, results = [], {}
    common = dict(n=n, m=n, d=128, reg=args.reg, tol=args.tol)
    solvers = ["tlfast", "pot-numpy", "pot-torch", "geomloss"]
    for case in ("solve", "iter"):
        if case in skip:
            continue
        rows = {c: [] for c in solvers if not (case == "iter" and c == "geomloss")}
        for _ in range(args.rounds):  # interleaved rounds
            for c in rows:
                loads.append(os.getloadavg()[0])
                rows[c].append(run(case, c, iters=args.iters, **common))
                print(case, c, rows[c][-1], flush=True)
        results[case] = {c: {"runs": rs, "median_seconds": median(rs, "seconds"),
                             "median_peak_extra_mb": median(rs, "peak_extra_mb")} for c, rs in rows.items()}
        snapshot(args, loads, results)
    if "big" not in skip:  # the whole solve, measured (one round: it takes minutes)
        loads.append(os.getloadavg()[0])
        r = run("solve", "tlfast", n=big, m=big, d=128, reg=args.reg, tol=args.tol)
        print("big", r, flush=True)
        results["big"] = {"n": big, "runs": [r]}
        snapshot(args, loads, results)
    if "assign" not in skip:
        na = 1_000 if args.quick else 5_000
        rows = {c: [] for c in ("tlfast-dense", "scipy-dense")}
        for _ in range(args.rounds):
            for c in rows:
                loads.append(os.getloadavg()[0])
                rows[c].append(run("assign", c, n=na, m=na, d=32))
                print("assign", c, rows[c][-1], flush=True)
        results["assign_dense"] = {"n": na, **{c: {"runs": rs, "median_seconds": median(rs, "seconds")}
                                              for c, rs in rows.items()}}
        snapshot(args, loads, results)
        loads.append(os.getloadavg()[0])
        r = run("assign", "tlfast-sparse", n=big, m=big, d=32)
        print("assign sparse", r, flush=True)
        results["assign_sparse"] = {"n": big, "d": 32, "runs": [r]}

    snapshot(args, loads, results)


def snapshot(args, loads, results) -> None:
    """Write what has been measured so far (the full run takes long on a shared machine)."""
    import torch
    payload = {"cpu": cpu_name(), "flags": cpu_flags(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
               "load_avg_1min": {"min": min(loads), "median": float(np.median(loads)), "max": max(loads)},
               "commit": git_commit(), "torch": torch.__version__, "rounds": args.rounds, "reg": args.reg,
               "tol": args.tol, "size": args.size or (2_000 if args.quick else 10_000), "iters": args.iters,
               "results": results}
    try:
        import ot
        payload["pot"] = ot.__version__
    except ImportError:
        pass
    write_results(Path(args.out), args.name, payload, markdown(payload))


def markdown(p: dict) -> str:
    r = p["results"]
    lines = [f"# Optimal transport on CPU ({p['cpu']}; flags {', '.join(p['flags'])}; {p['cores']} cores, "
             f"{p['threads']} threads)", "",
             f"commit {p['commit']}, torch {p['torch']}, POT {p.get('pot', '?')}; medians of {p['rounds']} "
             f"interleaved rounds, each run in a fresh process; 1-min load average during the run "
             f"{p['load_avg_1min']['min']:.1f} / {p['load_avg_1min']['median']:.1f} / "
             f"{p['load_avg_1min']['max']:.1f} (min / median / max) on a machine shared with other jobs.", ""]
    if "solve" in r:
        s = r["solve"]
        ref = s.get("pot-numpy", {}).get("runs", [{}])[0].get("cost")
        lines += [f"## Whole solve {p['size']:,} x {p['size']:,} x 128 — "
                  f"l2, unit rows, reg {p['reg']}, tol {p['tol']} (‖P1 − b‖₂)", "",
                  "| contender | median s | tlfast speed-up | iterations | transport cost | rel. diff to POT numpy | "
                  "marginal error | peak extra MB |", "|---|---|---|---|---|---|---|---|"]
        mine = s.get("tlfast", {}).get("median_seconds")
        for c, v in s.items():
            run0 = next((x for x in v["runs"] if "error" not in x), v["runs"][0])
            cost = run0.get("cost")
            rel = f"{abs(cost - ref) / ref:.1e}" if (cost is not None and ref) else "—"
            med = f"{v['median_seconds']:.2f}" if v["median_seconds"] is not None else run0.get("error", "—")
            me = run0.get("marginal_error")
            iters = run0.get("n_iter", "—")
            if run0.get("relaxation", 1.0) != 1.0:
                iters = f"{iters} (ω {run0['relaxation']:.2f})"
            up = (f"{v['median_seconds'] / mine:.2f}x" if mine and v["median_seconds"] and c != "tlfast" else "—")
            lines.append(f"| {c} | {med} | {up} | {iters} | "
                         f"{cost if cost is not None else '—'} | {rel} | {me if me is not None else '—'} | "
                         f"{v['median_peak_extra_mb'] if v['median_peak_extra_mb'] is not None else '—'} |")
        lines += ["", "GeomLoss runs its fixed ε-scaling schedule (scaling 0.9, no tolerance) on the dense "
                  "(tensorized) cost and reports the entropic objective, not <P, C>: time only.", ""]
    if "iter" in r:
        lines += [f"## Time per iteration at fixed ε, {p['size']:,} x {p['size']:,} x 128 (POT: dense M "
                  "precomputed, untimed)", "",
                  "| contender | median s / iteration | peak extra MB |", "|---|---|---|"]
        for c, v in r["iter"].items():
            it = p["iters"]  # POT's log["niter"] is the last loop index, so the count asked for is used
            sec = v["median_seconds"]
            lines.append(f"| {c} | {sec / it:.3f} | {v['median_peak_extra_mb']} |" if sec else f"| {c} | failed | |")
        lines += ["", f"tlfast (plain iterations here, relaxation=1.0) includes the one column pass that a capped "
                  f"solve adds to measure the returned state's marginal error ({2 * p['iters'] + 1} fused passes "
                  f"for {p['iters']} iterations), so it overstates the per-iteration time slightly; POT's loop "
                  "checks its error once in 10 iterations.", ""]
    if "big" in r:
        b = r["big"]["runs"][0]
        if "error" in b:
            lines += [f"## {r['big']['n']:,} x {r['big']['n']:,} x 128: failed ({b['error']})", ""]
        else:
            per = 2 * b["seconds"] / (2 * b["n_iter"] + 1)  # n_iter row passes + n_iter + 1 column passes
            lines += [f"## {r['big']['n']:,} x {r['big']['n']:,} x 128, whole solve (tlfast only; measured)", "",
                      f"**{b['seconds'] / 60:.1f} min** for the whole solve to marginal error {b['marginal_error']:.1e} "
                      f"(tol {p['tol']}): {b['n_iter']} iterations (over-relaxation ω = {b['relaxation']:.2f}), "
                      f"**{per:.1f} s per iteration**, transport cost {b['cost']:.7f}, peak extra memory "
                      f"**{b['peak_extra_mb']:.0f} MB** (POT's dense float64 M alone: "
                      f"{8 * r['big']['n'] ** 2 / 1e9:.0f} GB).", ""]
    if "assign_dense" in r and "assign_sparse" in r:
        a = r["assign_dense"]
        lines += [f"## Assignment {a['n']:,} x {a['n']:,} x 32 (l2)", "", "| contender | median s | total cost |",
                  "|---|---|---|"]
        for c in ("tlfast-dense", "scipy-dense"):
            v = a[c]
            lines.append(f"| {c} | {v['median_seconds']} | {v['runs'][0].get('cost')} |")
        sp = r["assign_sparse"]["runs"][0]
        lines += ["", f"Sparse path, {r['assign_sparse']['n']:,} x {r['assign_sparse']['n']:,} x 32: "
                  + (f"perfect matching ({sp['pairs']:,} pairs, {sp['distinct_targets']:,} distinct targets) in "
                     f"{sp['seconds']:.1f} s, cost {sp['cost']:.2f}, kNN lower bound {sp['knn_lower_bound']:.2f}: "
                     f"gap **{100 * sp['gap_to_lower_bound']:.2f}%**, peak extra {sp['peak_extra_mb']:.0f} MB."
                     if "error" not in sp else f"failed ({sp['error']})"), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
