"""CPU kNN benchmark: tlfast vs the reference, torch chunked mm + topk and faiss-cpu, side by side.

A thin caller of the suite that ships in the package (``tlfast/bench/knn.py``; the same as
``tlfast bench knn``): contenders in interleaved rounds, medians of >= 5 after a warm-up, GFLOP/s
next to this machine's own torch.mm rate in the case dtype, the CPU model and ISA flags, load.

    python benchmarks/bench_knn.py                     # standard cases -> benchmarks/results/cpu-knn.{json,md,png}
    python benchmarks/bench_knn.py --quick --out /tmp  # small shapes, for a smoke run
    python benchmarks/bench_knn.py --dtype bf16        # any `tlfast bench knn` option

More cases: add ``tlfast.bench.knn.KnnCase`` entries to ``CASES`` (dtype, ``precision`` passthrough).
"""
from __future__ import annotations

import sys
from pathlib import Path

from tlfast.bench.knn import CASES, KnnCase  # noqa: F401  (re-exported for case definitions)
from tlfast.cli import main as tlfast_main

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = [] if "--out" in argv else ["--out", str(RESULTS)]
    defaults += [] if "--name" in argv else ["--name", "cpu-knn"]
    return tlfast_main(["bench", "knn", *defaults, *argv])


if __name__ == "__main__":
    sys.exit(main())
