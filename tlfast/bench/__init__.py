"""Benchmarks that ship with tlfast: ``tlfast bench SUITE`` runs them on the user's machine and data.

Modules: ``timing`` (warm-up, sync, raw samples, interleaved rounds, concurrent latency, Wilson
intervals), ``schema`` (one JSON format: machine, software, cases with samples), ``data``
(generated families and the user's files), ``knn`` / ``latency`` / ``ann`` / ``extract``
(the suites), ``report`` (Markdown + one chart per suite), ``compare`` (ratios, regressions),
``cli`` (the command).  ``benchmarks/bench_*.py`` in a source checkout are thin callers of these.
"""
