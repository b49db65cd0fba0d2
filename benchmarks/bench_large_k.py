"""Few queries, large k: time and peak extra RSS of tlfast.knn on the CPU, for two builds side by
side (e.g. before / after the heap bound in csrc/cpu/fused_knn.h), in interleaved rounds.

    python benchmarks/bench_large_k.py --build before=/tmp/old_site --build after=installed

Each (build, threads) runs in its own subprocess (a clean peak-RSS mark), repeats the call after a
warm-up and reports the median time and the peak RSS above the pre-call mark.  Results go to
benchmarks/results/large-k-cpu.{json,md}, with the CPU model, its flags and the machine load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_name, git_commit, write_results  # noqa: E402

CHILD = textwrap.dedent("""
    import json, time, numpy as np, torch, tlfast
    torch.set_num_threads({threads})
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    rng = np.random.default_rng(0)
    q = rng.standard_normal(({nq}, {d}), dtype=np.float32)
    c = rng.standard_normal(({n}, {d}), dtype=np.float32)
    tlfast.knn(q[:2], c[:100], 1, "l2", backend="cpu")
    open("/proc/self/clear_refs", "w").write("5")
    base = hwm()
    times = []
    for _ in range({repeats} + 1):
        t = time.perf_counter()
        res = tlfast.knn(q, c, {k}, "l2", backend="cpu")
        times.append(time.perf_counter() - t)
        del res
    print(json.dumps({{"times": times[1:], "extra": hwm() - base}}))
""")


def cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in wanted if f in have]
    return []


def run(site: str, threads: int, shape: dict, repeats: int) -> dict:
    env = dict(os.environ)
    if site != "installed":
        env["PYTHONPATH"] = site
    out = subprocess.run([sys.executable, "-c", CHILD.format(threads=threads, repeats=repeats, **shape)],
                         capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=900)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="append", required=True, help="name=site-packages dir, or name=installed")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    builds = dict(b.split("=", 1) for b in args.build)
    shape = {"nq": 100, "n": 60_000, "d": 8, "k": 50_000}
    samples: dict[tuple[str, int], dict] = {}
    loads = [os.getloadavg()]
    for _ in range(args.rounds):  # interleaved: every build sees the same machine load
        for threads in args.threads:
            for name, site in builds.items():
                r = run(site, threads, shape, args.repeats)
                s = samples.setdefault((name, threads), {"times": [], "extra": []})
                s["times"] += r["times"]
                s["extra"].append(r["extra"])
        loads.append(os.getloadavg())
    rows = [{"build": name, "threads": threads, "median_s": float(np.median(s["times"])),
             "peak_extra_mib": float(np.median(s["extra"])) / 2**20, "samples": len(s["times"])}
            for (name, threads), s in samples.items()]
    payload = {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "commit": git_commit(), "shape": shape,
               "metric": "l2", "loadavg": loads, "rows": rows}
    md = [f"# tlfast.knn, few queries with a large k (nq={shape['nq']}, n={shape['n']}, d={shape['d']}, "
          f"k={shape['k']}, l2, CPU backend)", "",
          f"CPU: {payload['cpu']}, flags {' '.join(payload['cpu_flags'])}; commit {payload['commit']}; "
          f"load average during the run {min(l[0] for l in loads):.1f}-{max(l[0] for l in loads):.1f}; "
          f"{args.rounds} interleaved rounds x {args.repeats} timed calls, medians.", "",
          "| build | threads | median s | peak extra RSS MiB |", "|---|---|---|---|"]
    md += [f"| {r['build']} | {r['threads']} | {r['median_s']:.3f} | {r['peak_extra_mib']:.0f} |"
           for r in sorted(rows, key=lambda r: (r["threads"], r["build"]))]
    write_results(Path(__file__).parent / "results", "large-k-cpu", payload, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
