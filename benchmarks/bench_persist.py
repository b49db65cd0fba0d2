"""Persistence benchmark: what durability costs (docs/design/durability.md), side by side.

* save: ``Index.save`` (staging folder, plain writes hashed as written, fsync of every file and
  folder, one atomic exchange, old version removed) vs ``np.save`` of the vectors and ids and
  ``faiss.write_index`` of an IndexFlatL2 holding the same vectors -- neither checksums, fsyncs or
  replaces atomically, so they are the floor, not equivalents: the gap is what durability costs.
* load: ``Index.load`` (schema, listing, size + sha256 on the fd used, domain scan, id check) and
  ``Index.load(verify=False)`` and ``mmap=True`` vs ``np.load`` vs ``faiss.read_index``.

Interleaved rounds (every contender once per round), median and p95 of the timed rounds after one
warm-up round; the machine load is recorded because the machine is shared.

    python benchmarks/bench_persist.py                     # -> benchmarks/results/persist-cpu.{json,md}
    python benchmarks/bench_persist.py --quick --out /tmp  # small shapes, for a smoke run
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import cpu_name, git_commit, write_results  # noqa: E402


def cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        flags = next(line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return []
    return [f for f in wanted if f in flags]


def contenders(folder: Path, x: np.ndarray, ids: np.ndarray):
    import tlfast

    index = tlfast.Index("l2").add(x, ids=ids)
    ix, npd, fx = folder / "ix", folder / "np", folder / "faiss.index"
    npd.mkdir()
    out = {
        ("save", "tlfast Index.save"): lambda: index.save(ix, overwrite=True),
        ("save", "np.save (no checksum, not atomic)"): lambda: (np.save(npd / "v.npy", x), np.save(npd / "i.npy", ids)),
        ("load", "tlfast Index.load"): lambda: tlfast.Index.load(ix),
        ("load", "tlfast Index.load(verify=False)"): lambda: tlfast.Index.load(ix, verify=False),
        ("load", "tlfast Index.load(mmap=True)"): lambda: tlfast.Index.load(ix, mmap=True),
        ("load", "np.load"): lambda: (np.load(npd / "v.npy"), np.load(npd / "i.npy")),
    }
    try:
        import faiss

        flat = faiss.IndexFlatL2(x.shape[1])
        flat.add(x)
        out[("save", "faiss.write_index")] = lambda: faiss.write_index(flat, str(fx))
        out[("load", "faiss.read_index")] = lambda: faiss.read_index(str(fx))
    except ImportError:
        pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    n, d = (20_000, 64) if args.quick else (500_000, 128)
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64) * 7
    folder = Path(tempfile.mkdtemp(prefix="tlfast-bench-persist-", dir=args.out if os.path.isdir(args.out) else None))
    times: dict[tuple[str, str], list[float]] = {}
    loads = []
    try:
        calls = contenders(folder, x, ids)
        for (op, name), fn in calls.items():  # every file exists before the first timed load
            if op == "save":
                fn()
        for r in range(args.rounds + 1):
            loads.append(os.getloadavg()[0])
            for key, fn in calls.items():
                t = time.perf_counter()
                fn()
                dt = time.perf_counter() - t
                if r:  # round 0 is the warm-up
                    times.setdefault(key, []).append(dt)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    import tlfast

    mb = (x.nbytes + ids.nbytes) / 2**20
    rows = [{"op": op, "contender": name, "n": n, "d": d, "megabytes": round(mb, 1),
             "median_s": float(np.median(v)), "p95_s": float(np.percentile(v, 95)),
             "mb_per_s": mb / float(np.median(v)), "rounds": len(v)} for (op, name), v in times.items()]
    machine = {"cpu": cpu_name(), "flags": cpu_flags(), "loadavg_during": [min(loads), max(loads)],
               "tlfast": tlfast.__version__, "commit": git_commit()}
    md = [f"# Persistence: {n:,} x {d} float32 + int64 ids ({mb:.0f} MB)", "",
          f"CPU {machine['cpu']} ({', '.join(machine['flags'])}); 1-min load average during the run "
          f"{min(loads):.1f}-{max(loads):.1f} on 2 cores (shared machine); median of {args.rounds} "
          f"interleaved rounds after a warm-up; commit {machine['commit']}.", "",
          "| op | contender | median s | p95 s | MB/s |", "|---|---|---|---|---|"]
    md += [f"| {r['op']} | {r['contender']} | {r['median_s']:.3f} | {r['p95_s']:.3f} | {r['mb_per_s']:.0f} |"
           for r in rows]
    text = "\n".join(md) + "\n"
    print(text)
    write_results(Path(args.out), "persist-cpu" + ("-quick" if args.quick else ""),
                  {"machine": machine, "rows": rows}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
