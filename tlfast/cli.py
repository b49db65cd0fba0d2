"""The ``tlfast`` command line."""
from __future__ import annotations

import argparse
import sys
import time


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import tlfast
    from tlfast._native import _C

    print(f"tlfast {tlfast.__version__}  torch {torch.__version__}")
    if _C is not None:
        n, why = _C.cuda_device_count()
        print(f"native: cpu isa {_C.cpu_isa()}, built with CUDA: {_C.built_with_cuda}, "
              f"CUDA devices: {n}{'' if n else f' ({why})'}")
    for name, inf in tlfast.backends().items():
        state = "available" if inf.available else "unavailable"
        print(f"  {name:10s} {state:12s} {inf.reason}  devices={list(inf.devices)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    import tlfast

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 128)).astype(np.float32)
    corpus = (centres[rng.integers(0, 50, 100_000)] + 0.5 * rng.standard_normal((100_000, 128))).astype(np.float32)
    queries = (centres[rng.integers(0, 50, 2_000)] + 0.5 * rng.standard_normal((2_000, 128))).astype(np.float32)
    print("| metric | backend | seconds | top-1 index agreement with reference |")
    print("|---|---|---|---|")
    for metric in ("cosine", "l2", "ip"):
        t = time.perf_counter()
        res = tlfast.knn(queries, corpus, 10, metric, backend="auto")
        dt = time.perf_counter() - t
        ref = tlfast.knn(queries[:200], corpus, 10, metric, backend="reference")
        agree = float((res.indices[:200, 0] == ref.indices[:, 0]).mean())
        print(f"| {metric} | auto | {dt:.3f} | {agree:.3f} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tlfast", description="Fast transfer-learning feature pipelines.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="backends, devices, versions")
    s.set_defaults(func=_cmd_info)
    s = sub.add_parser("demo", help="the main job on built-in data")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"tlfast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
