"""Extraction on a shared machine: each contender's throughput alone and beside busy processes.

An embedding service shares its machine.  A runtime whose worker threads spin-wait at every
barrier loses far more than its share when another process holds a core: a spinning thread burns
the time slice that the thread it waits for needs.  This measures each contender's slowdown under
a fixed, reproducible load, side by side in one run.

Every (contender, round) runs in a fresh subprocess (its own thread pools): load, warm up, then
four timed calls of one encode / extract of the same texts in ABBA order -- alone, loaded, loaded,
alone -- where "loaded" means ``--burners`` single-threaded processes (float32 512 x 512 products in
a loop, one BLAS thread each: another process's compute) started 1 s before the call and killed
after it.  Contenders take turns in a rotating order; medians over all rounds.

    slowdown  = loaded median / alone median (same subprocesses)
    fair      = (threads + burners) / threads: the slowdown of an even share of the cores

Contenders: sentence-transformers on every backend that installs (torch fp32, onnx, onnx-qint8,
openvino) and tlfast's torch, ONNX Runtime and int8 paths (bench_extract.py's contenders, same
texts: 3-120 MiniLM tokens).

    python benchmarks/bench_extract_shared.py          # -> benchmarks/results/extract-cpu-shared.{json,md}
    python benchmarks/bench_extract_shared.py --quick --out /tmp
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_extract as be  # noqa: E402  (the contenders, texts and exports are bench_extract's)

CONTENDERS = be.CASES["text-throughput"]
BASELINE = "sentence-transformers"
# One BLAS thread each, so that a burner is one process's worth of compute on one core.
_ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
_BURN = ("import numpy as np\n"
         "a = np.random.default_rng(0).random((512, 512), dtype=np.float32)\n"
         "while True:\n    a @ a\n")
_SETTLE_S = 1.0  # the burners are running (interpreter and numpy started) before the timed call


class Burners:
    """``n`` busy single-threaded processes while the ``with`` block runs; gone after it."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Burners":
        env = {**os.environ, **_ONE_THREAD}
        if not self.n:
            return self
        self.procs = [subprocess.Popen([sys.executable, "-c", _BURN], env=env, stdin=subprocess.DEVNULL)
                      for _ in range(self.n)]
        time.sleep(_SETTLE_S)
        dead = [p.returncode for p in self.procs if p.poll() is not None]
        if dead:
            self.__exit__()
            raise RuntimeError(f"a burner process exited at once (exit {dead[0]})")
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()
        self.procs = []


def worker(contender: str, texts_n: int, burners: int) -> dict:
    """One round of one contender: load, warm up, then alone / loaded / loaded / alone."""
    be.import_as_its_user(contender)
    import torch

    texts = be.sentences(texts_n)
    fn = be._text_fn(contender)
    fn(texts[:64])  # warm-up: thread pools, allocator, first-call paths
    fn(texts)

    def timed() -> float:
        t = time.perf_counter()
        fn(texts)
        return time.perf_counter() - t

    wall: dict[str, list[float]] = {"alone": [], "loaded": []}
    cpu: dict[str, list[float]] = {"alone": [], "loaded": []}
    for state in ("alone", "loaded", "loaded", "alone"):
        if state == "alone":
            time.sleep(0.5)  # the killed burners' cores are free again
        with Burners(burners if state == "loaded" else 0):
            c0 = time.process_time()
            wall[state].append(timed())
            cpu[state].append(time.process_time() - c0)
    return {"threads": torch.get_num_threads(), **wall, "cpu_alone": cpu["alone"], "cpu_loaded": cpu["loaded"],
            "load": os.getloadavg()[0]}


def summarize(contender: str, rounds: list[dict], burners: int) -> dict:
    alone = np.array([t for r in rounds for t in r["alone"]])
    loaded = np.array([t for r in rounds for t in r["loaded"]])
    threads = rounds[0]["threads"]
    return {"contender": contender, "rounds": len(rounds), "threads": threads, "burners": burners,
            "alone_s": float(np.median(alone)), "loaded_s": float(np.median(loaded)),
            "loaded_p95_s": float(np.percentile(loaded, 95)),
            "slowdown": float(np.median(loaded)) / float(np.median(alone)),
            "fair_slowdown": (threads + burners) / threads,
            # CPU seconds the contender's own process used in a call: threads that spin-wait while
            # the thread they wait for is descheduled show as CPU time above the alone call's.
            "cpu_alone_s": float(np.median([c for r in rounds for c in r["cpu_alone"]])),
            "cpu_loaded_s": float(np.median([c for r in rounds for c in r["cpu_loaded"]])),
            "load_1min_median": float(np.median([r["load"] for r in rounds]))}


def markdown(rows: list[dict], meta: dict) -> str:
    base = next((r for r in rows if r["contender"] == BASELINE), None)
    lines = [f"# Extraction on a shared machine ({meta['device']}, {meta['threads']} threads, "
             f"{meta['burners']} busy processes, commit {meta['commit']})", "",
             f"`python benchmarks/bench_extract_shared.py{meta['args']}` -- {meta['texts']} texts of 3-120 "
             f"MiniLM tokens, {meta['rounds']} rounds, every round a fresh subprocess per contender, "
             "each timing alone / loaded / loaded / alone.", "",
             f"CPU flags: {meta['cpu_flags']}; tlfast capability: {meta['capability']}; "
             f"precision='auto' -> {meta['auto_precision']}, backend='auto' -> {meta['auto_backend']}. "
             f"Machine load (1-min average, burners included) during the run: {meta['load']}.", "",
             "| contender | alone s | loaded s | loaded p95 s | slowdown | fair share | "
             "vs ST torch alone | vs ST torch loaded | CPU s alone | CPU s loaded |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_alone = f"{base['alone_s'] / r['alone_s']:.2f}x" if base else "-"
        vs_loaded = f"{base['loaded_s'] / r['loaded_s']:.2f}x" if base else "-"
        lines.append(f"| {r['contender']} | {r['alone_s']:.3f} | {r['loaded_s']:.3f} | {r['loaded_p95_s']:.3f} | "
                     f"{r['slowdown']:.2f}x | {r['fair_slowdown']:.2f}x | {vs_alone} | {vs_loaded} | "
                     f"{r['cpu_alone_s']:.2f} | {r['cpu_loaded_s']:.2f} |")
    lines += ["", "slowdown = loaded median / alone median; fair share = (threads + busy processes) / threads, "
              "the slowdown of an even share of the cores.",
              "busy process = one single-threaded numpy float32 512 x 512 product loop, started 1 s before "
              "the loaded call and killed after it.",
              "vs ST torch = sentence-transformers torch fp32's median / the contender's, alone and loaded, "
              "same run.",
              "CPU s = the contender's own process's CPU seconds in one call (median): what a loaded call "
              "spends above the alone call is threads spin-waiting for a descheduled peer.",
              "tlfast-int8 = precision='int8'; st-onnx-qint8 = export_dynamic_quantized_onnx_model(config for "
              "this CPU)."]
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[dict], loads: list[float], args: argparse.Namespace) -> None:
    import torch

    import tlfast
    from tlfast.extract import precision as prec
    from tlfast.bench.schema import cpu_model_and_flags
    from tlfast.cli import atomic_write

    cpu = torch.device("cpu")
    auto = prec.resolve_precision("auto", cpu)
    argv = " ".join(sys.argv[1:])
    meta = {"device": cpu_model_and_flags()[0], "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "burners": args.burners, "texts": args.texts, "rounds": args.rounds, "quick": args.quick,
            "tlfast": tlfast.__version__, "torch": torch.__version__, "commit": be._git_commit(),
            "args": f" {argv}" if argv else "", "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "cpu_flags": " ".join(prec.capability().cpu_flags), "capability": prec.capability().summary(),
            "auto_precision": auto, "auto_backend": prec.resolve_backend("auto", auto, cpu),
            "load": f"median {np.median(loads):.1f}, min {min(loads):.1f}, max {max(loads):.1f} on "
                    f"{os.cpu_count()} cores"}
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, meta)
    atomic_write(out / "extract-cpu-shared.json",
                 lambda f: f.write(json.dumps({"meta": meta, "rows": rows}, indent=1).encode()))
    atomic_write(out / "extract-cpu-shared.md", lambda f: f.write(md.encode()))
    print(md, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 texts, 1 round, two contenders: a smoke run")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for extract-cpu-shared.{json,md}")
    ap.add_argument("--rounds", type=int, help="rounds per contender (default 5, >= 5 for results; --quick 1)")
    ap.add_argument("--texts", type=int, help="sentences per call (default 256; --quick 64)")
    ap.add_argument("--burners", type=int, default=os.cpu_count() or 1,
                    help="busy single-threaded processes during a loaded call (default: one per core)")
    ap.add_argument("--contenders", nargs="*", choices=CONTENDERS, help="default: all of them")
    ap.add_argument("--worker", metavar="CONTENDER", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.texts is None:
        args.texts = 64 if args.quick else 256
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.texts < 1 or args.rounds < 1 or args.burners < 0:
        ap.error("--texts and --rounds must be >= 1 and --burners >= 0")
    if args.worker:
        print(json.dumps(worker(args.worker, args.texts, args.burners)))
        return
    contenders = args.contenders or (["sentence-transformers", "tlfast-onnxruntime"] if args.quick else CONTENDERS)
    exports = Path(os.environ.get("BENCH_ST_EXPORTS") or tempfile.mkdtemp(prefix="bench-st-"))
    env = {**os.environ, "BENCH_ST_EXPORTS": str(exports)}
    if any(c.startswith("st-") for c in contenders):
        os.environ["BENCH_ST_EXPORTS"] = str(exports)
        try:
            be.prepare_st_exports(exports)
        except Exception as exc:  # a backend that does not install here: run without it, say so
            print(f"sentence-transformers onnx/openvino backends unavailable ({exc}); left out", flush=True)
            contenders = [c for c in contenders if not c.startswith("st-")]
    samples: dict[str, list[dict]] = {c: [] for c in contenders}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for contender in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
            cmd = [sys.executable, __file__, "--worker", contender, "--texts", str(args.texts),
                   "--burners", str(args.burners)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            loads.append(os.getloadavg()[0])
            if proc.returncode != 0:
                sys.exit(f"{contender} failed:\n{proc.stderr[-3000:]}")
            samples[contender].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {contender}: {samples[contender][-1]}", flush=True)
        rows = [summarize(c, rs, args.burners) for c, rs in samples.items() if rs]
        write_results(Path(args.out), rows, loads, args)  # after every round: a long run keeps what it has


if __name__ == "__main__":
    main()
