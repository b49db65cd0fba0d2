"""``tlfast bench SUITE``: the suites as a command, runnable from any folder once tlfast is installed.

Each run writes <out>/<suite>.json (``schema``), .md and .png (``report``) and prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  tlfast bench knn --quick                                # standard cases, small shapes
  tlfast bench knn --n 1000000 --d 768 --k 10 --metric cosine --dtype bf16
  tlfast bench knn --queries q.npy --corpus feats/        # your own data (.npy or feature store)
  tlfast bench latency --quick                            # p50/p90/p99/p99.9, 1 and 4 callers
  tlfast bench tune --families clustered-cosine --n 200000   # tune(target_recall) on fresh queries
  tlfast bench pipeline --quick                           # Index / match layer vs peers
  tlfast bench extract --quick                            # Extractor vs sentence-transformers
  tlfast bench compare old/knn.json new/knn.json --threshold 0.1   # exit 1 on a regression"""


class _Progress:
    """A tqdm bar where tqdm is installed (it hides itself off a terminal), else nothing."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, disable=None)
        except ImportError:
            self._bar = None

    def __call__(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _csv(kind):
    def parse(s: str):
        try:
            return [kind(v) for v in s.split(",") if v]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {s!r}") from exc
    return parse


def add_parser(sub, formatter) -> None:
    from .data import FAMILIES
    from .knn import CASES, DTYPES

    p = sub.add_parser("bench", help="benchmarks on this machine -> JSON + Markdown + PNG; compare two runs",
                       description="benchmarks on this machine -> JSON + Markdown + PNG; compare two runs",
                       epilog=EXAMPLES, formatter_class=formatter)
    p.set_defaults(func=run)
    suites = p.add_subparsers(dest="suite", required=True, metavar="SUITE")

    def common(s):
        s.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
        s.add_argument("--out", default="tlfast-bench-out", help="output folder (default ./tlfast-bench-out)")
        s.add_argument("--name", default=None, help="result file stem (default: the suite)")
        s.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5, quick 3)")

    s = suites.add_parser("knn", help="exact kNN: tlfast vs torch mm+topk, faiss-cpu, the reference",
                          formatter_class=formatter)
    common(s)
    s.add_argument("--cases", nargs="*", choices=list(CASES), help="standard cases (default: all, unless shapes given)")
    s.add_argument("--n", type=int, help="corpus rows of a custom case")
    s.add_argument("--nq", type=int, default=None, help="queries of a custom case (default 1,000)")
    s.add_argument("--d", type=int, help="dimension of a custom case")
    s.add_argument("-k", "--k", type=int, default=10)
    s.add_argument("--metric", default="cosine", choices=["cosine", "ip", "l2", "kl", "js"])
    s.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    s.add_argument("--precision", default=None, help="passed to tlfast.knn(precision=) where supported")
    s.add_argument("--queries", help="your queries: .npy or feature store folder")
    s.add_argument("--corpus", help="your corpus: .npy or feature store folder")
    s.add_argument("--backend", default="auto", help="tlfast backend (default auto)")
    s.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    s.add_argument("--contenders", type=_csv(str), default=None,
                   help="comma list of tlfast,faiss,torch-mm-topk,torch-gemm-form,torch-naive,reference")

    s = suites.add_parser("latency", help="per-call latency percentiles of Index.search and Extractor",
                          formatter_class=formatter)
    common(s)
    s.add_argument("--n", type=int, default=None, help="corpus rows (default 200,000; quick 20,000)")
    s.add_argument("--d", type=int, default=128)
    s.add_argument("-k", "--k", type=int, default=10)
    s.add_argument("--kinds", type=_csv(str), default=["flat", "flat-out-of-core", "ivf", "hnsw"],
                   help="comma list of flat,flat-out-of-core,ivf,hnsw")
    s.add_argument("--batch", type=_csv(int), default=[1, 16], help="queries per call (default 1,16)")
    s.add_argument("--callers", type=_csv(int), default=[1, 4], help="concurrent caller threads (default 1,4)")
    s.add_argument("--calls", type=int, default=None, help="calls per setting (default 2,000; quick 200)")
    s.add_argument("--no-text", action="store_true", help="skip the Extractor single-text case")

    s = suites.add_parser("tune", help="Index.tune(target_recall) per data family: fresh-query recall, speed-up",
                          formatter_class=formatter)
    common(s)
    s.add_argument("--families", type=_csv(str), default=list(FAMILIES), help=f"comma list of {','.join(FAMILIES)}")
    s.add_argument("--n", type=int, default=None, help="corpus rows (default 200,000; quick 10,000)")
    s.add_argument("--nq", type=int, default=None, help="fresh queries (default 2,000; quick 300)")
    s.add_argument("--target", type=float, default=0.95, help="target recall@k (default 0.95)")
    s.add_argument("-k", "--k", type=int, default=10)
    s.add_argument("--kinds", type=_csv(str), default=None, help="e.g. ivf,hnsw (default: every kind for the metric)")
    s.add_argument("--no-sweep", action="store_true", help="skip the recall-QPS sweep around the tuned setting")
    s.add_argument("--no-heldout", action="store_true",
                   help="tune from the corpus only (skip the second tune on 1,000 held-out queries)")

    s = suites.add_parser("pipeline", help="Index.search / match layer vs tlfast.knn, faiss, torch, sklearn",
                          formatter_class=formatter)
    common(s)

    s = suites.add_parser("extract", help="Extractor vs sentence-transformers on mixed-length texts",
                          formatter_class=formatter)
    common(s)
    s.add_argument("--texts", type=int, default=None, help="texts (default 1,024; quick 128)")

    s = suites.add_parser("compare", help="ratios of two result files; exit 1 past the regression threshold",
                          formatter_class=formatter)
    s.add_argument("old", help="baseline result JSON")
    s.add_argument("new", help="new result JSON")
    s.add_argument("--threshold", type=float, default=0.10, help="allowed slow-down, a fraction (default 0.10)")


def _kinds(spec: list[str] | None, metric: str):
    from .ann import KINDS_FOR

    if spec is None:
        return None
    known = {"ivf": ("ivf", {}), "ivf-tlfast": ("ivf", {"engine": "tlfast"}), "hnsw": ("hnsw", {})}
    bad = [k for k in spec if k not in known]
    if bad:
        raise ValueError(f"--kinds {bad}: choose from {sorted(known)}")
    allowed = KINDS_FOR[metric]
    return [known[k] for k in spec if known[k] in allowed]


def run(args: argparse.Namespace) -> int:
    from . import report
    from .schema import finish, new_result

    if args.suite == "compare":
        from .compare import compare_files

        text, regressed = compare_files(args.old, args.new, args.threshold)
        print(text)
        return 1 if regressed else 0
    rounds = args.rounds or (3 if args.quick else 5)
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    result = new_result(args.suite, sys.argv[2:] if sys.argv[1:2] == ["bench"] else None)
    t0 = time.perf_counter()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    getattr(sys.modules[__name__], f"_run_{args.suite}")(args, result, rounds, log)
    result["total_s"] = time.perf_counter() - t0
    try:
        import resource

        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:
        pass
    finish(result)
    paths = report.write(result, args.out, args.name)
    print(report.markdown(result))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def _run_knn(args, result, rounds, log) -> None:
    from dataclasses import replace

    from .data import load_matrix
    from .knn import CASES, DTYPES, KnnCase, mm_rate, run_knn_case

    dtype = DTYPES[args.dtype]
    if (args.queries is None) != (args.corpus is None):
        raise ValueError("pass both --queries and --corpus (or neither)")
    custom = args.queries is not None or args.n is not None or args.d is not None
    if args.queries is not None:
        q, c = load_matrix(args.queries, "--queries"), load_matrix(args.corpus, "--corpus")
        if q.shape[1] != c.shape[1]:
            raise ValueError(f"--queries has dim {q.shape[1]}, --corpus has dim {c.shape[1]}")
        cases = [KnnCase(f"knn-{args.metric}-files", args.metric, len(q), len(c), q.shape[1], args.k,
                         dtype=dtype, queries=q, corpus=c)]
    elif custom:
        if args.n is None or args.d is None:
            raise ValueError("a custom case needs both --n and --d")
        nq = args.nq or 1000
        cases = [KnnCase(f"knn-{args.metric}-custom", args.metric, nq, args.n, args.d, args.k,
                         data="dirichlet" if args.metric in ("kl", "js") else "normal", dtype=dtype)]
    else:
        cases = [replace(CASES[name], dtype=dtype) for name in (args.cases or CASES)]
        if args.quick:
            cases = [replace(c, nq=c.quick[0], n=c.quick[1], d=c.quick[2]) if c.quick else c for c in cases]
    if custom and args.metric in ("kl", "js"):
        cases = [replace(c, contenders=("tlfast", "torch-gemm-form" if args.metric == "kl" else "faiss",
                                        "torch-naive", "reference")) for c in cases]
    if args.contenders:
        cases = [replace(c, contenders=tuple(args.contenders)) for c in cases]
    if args.precision is not None:
        cases = [replace(c, precision=args.precision) for c in cases]
    for c in cases:
        if not 1 <= c.k <= c.n:
            raise ValueError(f"-k must be between 1 and the corpus size {c.n}, got {c.k}")
    mm = mm_rate(dtype, args.quick, args.device)
    result["roofline"] = mm
    result["notes"].append(f"torch.mm {dtype} on this machine: {mm['gflops']:.1f} GFLOP/s (shape {mm['shape']}), "
                           f"the practical limit of the GEMM-shaped metrics")
    bar = _Progress(sum(len(c.contenders) for c in cases) * rounds, "knn")
    try:
        for c in cases:
            log(f"{c.name}: {c.nq} x {c.n} x {c.d}, k={c.k}, {c.metric}, {c.dtype}")
            rows = run_knn_case(c, rounds=rounds, backend=args.backend, device=args.device, mm_gflops=mm["gflops"],
                                tick=bar)
            result["cases"] += rows
            for r in rows:
                log(f"  {r['contender']:44s} " + (f"{r['median_s']:.4f} s" if not r.get("error") else r["error"]))
    finally:
        bar.close()


def _run_latency(args, result, rounds, log) -> None:
    from .latency import run_latency

    n = args.n or (20_000 if args.quick else 200_000)
    calls = args.calls or (200 if args.quick else 2000)
    with contextlib.suppress(Exception):
        import faiss  # noqa: F401  (hnsw / faiss ivf need it; a missing one becomes an error row)
    result["cases"] += run_latency(n=n, d=args.d, k=args.k, kinds=args.kinds, batches=args.batch,
                                   callers=args.callers, calls=calls, texts=not args.no_text, notes=result["notes"],
                                   log=log)
    result["notes"].append(f"{calls} calls per setting (split over the callers); p99.9 of fewer than 1,000 calls is "
                           f"close to the maximum")


def _run_tune(args, result, rounds, log) -> None:
    from .ann import family_data, tune_case
    from .data import FAMILIES

    bad = [f for f in args.families if f not in FAMILIES]
    if bad:
        raise ValueError(f"--families {bad}: choose from {', '.join(FAMILIES)}")
    n = args.n or (10_000 if args.quick else 200_000)
    nq = args.nq or (300 if args.quick else 2000)
    for fam in args.families:
        try:
            metric, x, q, tune_q, generated = family_data(fam, n, nq)
        except Exception as exc:  # MiniLM needs the extract extra: say so and go on
            result["notes"].append(f"{fam}: skipped ({type(exc).__name__}: {exc})")
            log(f"{fam}: skipped ({exc})")
            continue
        log(f"{fam}: {len(x)} x {x.shape[1]} {metric}, {len(q)} fresh queries, {len(tune_q)} held-out tuning queries")
        result["cases"] += tune_case(fam, x, q, metric, k=args.k, target=args.target, kinds=_kinds(args.kinds, metric),
                                     rounds=rounds, sweep=not args.no_sweep, generated=generated,
                                     tune_queries=None if args.no_heldout else tune_q, log=log)
        del x, q, tune_q


def _run_pipeline(args, result, rounds, log) -> None:
    from .knn import PIPELINE_CASES, run_pipeline_case

    for case in PIPELINE_CASES:
        log(case)
        result["cases"] += run_pipeline_case(case, args.quick, rounds=rounds)


def _run_extract(args, result, rounds, log) -> None:
    from .extract import run_extract

    result["cases"] += run_extract(args.texts or (128 if args.quick else 1024), rounds=rounds)
