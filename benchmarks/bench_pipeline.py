"""Index and match benchmark: what the pipeline layer costs on top of the kernels, side by side.

A thin caller of ``tlfast bench pipeline`` (``tlfast/bench/knn.py``, ``run_pipeline_case``):

* index-cosine: tlfast.knn on the raw arrays vs Index.search (in memory, float16 storage, out-of-core
  with a budget of 1/4 of the corpus, and memory-mapped from a saved index + that budget) vs faiss
  IndexFlatIP.
* match-cosine: tlfast.match (mutual nearest neighbours from two fused kNN passes) vs the full
  similarity matrix in torch (matmul + argmax both ways) vs scikit-learn brute force both ways.

    python benchmarks/bench_pipeline.py                     # -> benchmarks/results/cpu-pipeline.{json,md,png}
    python benchmarks/bench_pipeline.py --quick --out /tmp  # small shapes, for a smoke run
"""
from __future__ import annotations

import sys
from pathlib import Path

from tlfast.cli import main as tlfast_main

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = [] if "--out" in argv else ["--out", str(RESULTS)]
    defaults += [] if "--name" in argv else ["--name", "cpu-pipeline"]
    return tlfast_main(["bench", "pipeline", *defaults, *argv])


if __name__ == "__main__":
    sys.exit(main())
