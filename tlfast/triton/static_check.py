"""Ahead-of-time compilation of every Triton kernel tlfast can launch, for named GPU targets, with
no GPU present: what the device will execute, read from the compiler.

Each kernel module lists what its launcher can launch (``static_specs()``: the kernel, argument
types, constexprs, num_warps / num_stages, taken from the same helpers the launcher calls), and
this module compiles each spec for sm_80 and sm_90 with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` and records per kernel:

* registers per thread, spill stores / loads, stack frame (``ptxas -v``, the log Triton's own
  ptxas call writes) and local memory (``cuobjdump -res-usage`` on the cubin);
* shared memory per block (Triton's launch size) against the target's per-block limit;
* tensor-core instructions in the PTX (``wgmma.mma_async`` on Hopper, ``mma.sync`` before it);
* the PTX ISA version, compile seconds, and blocks per SM that registers and shared memory allow.

Compilation runs in worker subprocesses with a clean environment (no ``TRITON_INTERPRET``, a
fresh Triton cache directory, so results are never reused from an earlier run) and the specs are
spread over them.  The CUDA sources (csrc/cuda/*.cu) are compiled by ``nvcc -Xptxas -v`` the same
way and their ptxas figures parsed.

    python -m tlfast.triton.static_check --out benchmarks/results      # the committed table
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = (80, 90)
# Largest shared memory one block may use (opt-in), and per SM, in bytes (CUDA programming
# guide, compute capabilities table): A100 163 KB / 164 KB, H100 227 KB / 228 KB.
SMEM_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = {80: 64, 90: 64}
# Modules whose launchers are listed; each defines static_specs().
KERNEL_MODULES = ("tlfast.triton.fused_knn", "tlfast.triton.masked_mean_pool")
CUDA_SOURCES = ("device.cu", "select_k.cu", "divergence.cu", "preprocess.cu")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One launchable specialisation: what ``kernel[grid](...)`` compiles on the device."""
    module: str            # module defining the @triton.jit function
    kernel: str            # its attribute name
    label: str             # what the launch is, for the table ("knn cosine fp16 k<=16")
    signature: tuple       # ((arg, "*fp16" | "i32" | ...), ...) for every runtime argument
    constexprs: tuple      # ((arg, value), ...)
    num_warps: int
    num_stages: int
    gemm: bool             # a matrix product: must run on tensor cores
    divisible: tuple = ()  # args the launcher passes 16-aligned / divisible by 16
    config_list: str = ""  # which of the launcher's config lists the config comes from

    def key(self) -> str:
        return f"{self.label} | {self.config()}"

    def config(self) -> str:
        c = dict(self.constexprs)
        tiles = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_T") if k in c)
        return f"{tiles} w{self.num_warps} s{self.num_stages}"


def all_specs() -> list[KernelSpec]:
    import importlib
    specs = []
    for name in KERNEL_MODULES:
        specs.extend(importlib.import_module(name).static_specs())
    return specs


_TILE_ARGS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_T", "K_PAD")


def covering_specs(specs: list[KernelSpec], configs_only: bool = False) -> list[KernelSpec]:
    """A subset in which, per kernel, every config of every config list and every value of every
    specialisation (metric, dtype, K_PAD, exclude_self, ...) occurs at least once: what CI compiles
    (the full cross product is for a many-core machine; see benchmarks/gpu_check.sh).  Greedy set
    cover, heaviest first, so each config is compiled at its heaviest specialisation.
    ``configs_only``: only every config (at its heaviest metric) and every dtype, what sm_80 gets
    in CI: its risks (mma.sync operands in registers, the smaller shared memory) follow the tile.
    """
    def features(s: KernelSpec) -> set:
        c = dict(s.constexprs)
        kind = (s.kernel, s.gemm)  # GEMM and non-GEMM specialisations of one kernel differ most
        out = {kind + ("dtype", s.signature[0][1])}
        if c.get("METRIC") == heaviest.get(kind + (s.config_list,)):  # each config at its heaviest metric
            out.add(kind + ("config", s.config(), s.config_list))
        if configs_only:
            return out
        out |= {kind + (k, str(v)) for k, v in c.items() if k not in _TILE_ARGS or k == "K_PAD"}
        if c.get("K_PAD") == max_k_pad:  # every metric with the longest list
            out.add((s.kernel, "METRIC at longest list", c.get("METRIC")))
        return out

    max_k_pad = max(dict(s.constexprs).get("K_PAD", 0) for s in specs)
    heaviest = {}
    for s in specs:
        m = dict(s.constexprs).get("METRIC")
        key = (s.kernel, s.gemm, s.config_list)
        heaviest[key] = m if m is None else max(m, heaviest.get(key, m))
    def weight(s: KernelSpec):  # longest list, then kl's two products, then fp32's three (tf32x3)
        c = dict(s.constexprs)
        return (-c.get("K_PAD", 0), -c.get("METRIC", 0), s.signature[0][1] != "*fp32")

    pending = sorted(specs, key=weight)
    todo = set().union(*(features(s) for s in specs))
    chosen = []
    while todo:
        best = max(pending, key=lambda s: len(features(s) & todo))
        chosen.append(best)
        todo -= features(best)
        pending.remove(best)
    return [s for s in specs if s in chosen]


# ---------------------------------------------------------------- compiling one spec (in a worker)

def _cuobjdump() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def compile_spec(spec: KernelSpec, arch: int) -> dict:
    """Compile one spec for sm_<arch>; a compile error is returned as a record, not raised."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn  # an autotuned kernel wraps the JITFunction
    names = fn.arg_names
    signature = {a: "constexpr" for a in names}
    signature.update(dict(spec.signature))
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible if a in names}
    src = triton.compiler.ASTSource(fn, signature, dict(spec.constexprs), attrs)
    rec = dict(kernel=spec.kernel, label=spec.label, config=spec.config(), arch=arch,
               num_warps=spec.num_warps, gemm=spec.gemm)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    except Exception as exc:  # noqa: BLE001 - every failure is a result row that fails the check
        rec["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
        return rec
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    ptx = compiled.asm["ptx"]
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spill = _PTXAS_SPILL.search(text)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    res = _RES_USAGE.search(usage)
    rec.update(
        registers=int(res.group(1)) if res else (int(regs.group(1)) if regs else None),
        ptxas_registers=int(regs.group(1)) if regs else None,
        stack_bytes=int(spill.group(1)) if spill else None,
        spill_store_bytes=int(spill.group(2)) if spill else None,
        spill_load_bytes=int(spill.group(3)) if spill else None,
        local_bytes=int(res.group(4)) if res else None,
        shared_bytes=int(compiled.metadata.shared) + (int(res.group(3)) if res else 0),
        wgmma=ptx.count("wgmma.mma_async."),
        mma_sync=len(re.findall(r"\bmma\.sync\.", ptx)),
        ptx_version=re.search(r"^\.version (\S+)", ptx, re.M).group(1),
        target=re.search(r"^\.target (\S+)", ptx, re.M).group(1),
    )
    rec["blocks_per_sm"] = blocks_per_sm(rec, arch)
    return rec


def blocks_per_sm(rec: dict, arch: int) -> int:
    """Resident blocks per SM that registers (allocated per warp in units of 256), shared memory
    (plus the 1 KB each block reserves) and the warp limit allow."""
    warps = rec["num_warps"]
    regs_per_warp = -(-rec["registers"] * 32 // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_smem = SMEM_PER_SM[arch] // (rec["shared_bytes"] + 1024)
    return min(by_regs, by_smem, MAX_WARPS_PER_SM[arch] // warps, 32)


def problems(rec: dict) -> list[str]:
    """Why a record fails the check (empty: it passes)."""
    if "error" in rec:
        return [f"compile error: {rec['error'][:300]}"]
    out = []
    if rec["spill_store_bytes"] is None or rec["local_bytes"] is None:
        out.append("no ptxas / cuobjdump resource figures")
    elif rec["spill_store_bytes"] or rec["spill_load_bytes"] or rec["local_bytes"]:
        out.append(f"spills: {rec['spill_store_bytes']} B stores, {rec['spill_load_bytes']} B loads, "
                   f"{rec['local_bytes']} B local")
    if rec["shared_bytes"] > SMEM_PER_BLOCK[rec["arch"]]:
        out.append(f"shared memory {rec['shared_bytes']} B > {SMEM_PER_BLOCK[rec['arch']]} B")
    if rec["gemm"]:
        if rec["arch"] >= 90 and not rec["wgmma"]:
            out.append("matrix product without wgmma on sm_90")
        if rec["arch"] < 90 and not rec["mma_sync"]:
            out.append("matrix product without mma.sync")
    return out


def _worker(payload: str) -> str:
    specs = [KernelSpec(**{k: _tuples(v) for k, v in s.items()}) for s, _ in json.loads(payload)]
    arches = [a for _, a in json.loads(payload)]
    return json.dumps([compile_spec(s, a) for s, a in zip(specs, arches)])


def _tuples(v):
    return tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v


# ---------------------------------------------------------------- the driver

def clean_env(cache_dir: str) -> dict:
    """The environment a compile worker gets: no interpreter, a private cache, ptxas -v logged."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_ALWAYS_COMPILE")}
    env.update(TRITON_CACHE_DIR=cache_dir, TRITON_DUMP_PTXAS_LOG="1", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONWARNINGS="ignore")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if _is_source_tree(root) else env.get("PYTHONPATH", "")
    return env


def _is_source_tree(root: str) -> bool:
    return (Path(root) / "tlfast" / "__init__.py").exists() and (Path(root) / "pyproject.toml").exists()


def compile_all(specs, archs=ARCHS, workers: int | None = None) -> list[dict]:
    """Compile every (spec, arch) in ``workers`` subprocesses; records in the order given.
    ``specs``: one list for every arch, or {arch: list}."""
    per_arch = specs if isinstance(specs, dict) else {a: specs for a in archs}
    jobs = [(dataclasses.asdict(s), a) for a in archs for s in per_arch[a]]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    # Round-robin shards: expensive kernels (long lists, js) are spread over the workers.
    shards = [jobs[i::workers] for i in range(workers)]
    order = [j for i in range(workers) for j in range(i, len(jobs), workers)]
    with tempfile.TemporaryDirectory(prefix="tlfast-triton-cache-") as cache:
        env = clean_env(cache)
        code = "import sys, tlfast.triton.static_check as s; sys.stdout.write(s._worker(sys.stdin.read()))"

        def run(shard):
            r = subprocess.run([sys.executable, "-c", code], input=json.dumps(shard), env=env,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"compile worker failed ({r.returncode}):\n{r.stderr[-4000:]}")
            return json.loads(r.stdout.strip().splitlines()[-1])

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = [rec for shard in pool.map(run, shards) for rec in shard]
    out = [None] * len(jobs)
    for i, rec in zip(order, results):
        out[i] = rec
    return out


SOURCE_CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"


def nvcc_resource_usage(src_dir: Path = SOURCE_CUDA_DIR, archs=ARCHS, nvcc: str | None = None) -> list[dict]:
    """ptxas figures of every kernel in csrc/cuda, one record per (function, arch), compiled with
    the flags of CMakeLists.txt (-O3 --use_fast_math)."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]

    def one(name):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            r = subprocess.run([nvcc, "-c", "-O3", "--use_fast_math", "-std=c++17", "-Xptxas", "-v", *gencode,
                                "-I", str(src_dir), str(src_dir / name), "-o", str(Path(tmp) / "o.o")],
                               capture_output=True, text=True)
        return name, r.returncode, r.stdout + r.stderr, time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(one, [f for f in CUDA_SOURCES if (src_dir / f).exists()]))
    records = []
    for name, rc, text, secs in outputs:
        if rc != 0:
            records.append(dict(source=name, error=text[-2000:]))
            continue
        records.extend(parse_ptxas_log(text, name))
    return records


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")


def parse_ptxas_log(text: str, source: str) -> list[dict]:
    """nvcc -Xptxas -v output -> one record per (entry function, arch)."""
    records, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = dict(source=source, function=_demangle(m.group(1)), arch=int(re.sub(r"\D", "", m.group(2))))
            records.append(cur)
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            cur.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)), spill_load_bytes=int(m.group(3)))
        m = _PTXAS_REGS.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["shared_bytes"] = int(s.group(1)) if s else 0
    return records


def _demangle(name: str) -> str:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return name
    return subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name


# ---------------------------------------------------------------- the table

def machine() -> str:
    import platform
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
        model = next(line for line in open("/proc/cpuinfo") if line.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        flags, model = [], platform.processor()
    keep = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8") if f in flags]
    return f"{model} ({' '.join(keep)}), {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"


def markdown(triton_recs: list[dict], cuda_recs: list[dict], meta: dict) -> str:
    lines = ["# Static GPU compile table (no GPU: ahead-of-time compilation)", "",
             f"Generated by `python -m tlfast.triton.static_check` with triton {meta['triton']}, "
             f"nvcc {meta['nvcc']}, on {meta['machine']}; {meta['seconds']:.0f} s; "
             f"{meta['launchable']} launchable specialisations; compiled per target (sm: count) {meta['specs']}: {meta['scope']}.",
             "Registers per thread and spills from ptxas / cuobjdump; shared memory per block (Triton's "
             "launch size); blocks/SM = resident blocks that registers, shared memory and warps allow; "
             "tensor cores = wgmma / mma.sync instructions in the PTX.", "",
             "## Triton kernels", "",
             "| kernel | launch | config | sm | regs | spill B | smem KB | blocks/SM | wgmma | mma.sync | PTX | compile s | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in triton_recs:
        bad = problems(r)
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['label']} | {r['config']} | {r['arch']} | | | | | | | | | "
                         f"FAIL: {bad[0][:120]} |")
            continue
        lines.append(f"| {r['kernel']} | {r['label']} | {r['config']} | {r['arch']} | {r['registers']} | "
                     f"{r['spill_store_bytes'] + r['spill_load_bytes']} | {r['shared_bytes'] / 1024:.1f} | "
                     f"{r['blocks_per_sm']} | {r['wgmma']} | {r['mma_sync']} | {r['ptx_version']} | "
                     f"{r['compile_s']:.1f} | {'ok' if not bad else 'FAIL: ' + '; '.join(bad)} |")
    lines += ["", "## CUDA kernels (nvcc -O3 --use_fast_math -Xptxas -v)", "",
              "| source | function | sm | regs | spill B | stack B | smem B | check |", "|---|---|---|---|---|---|---|---|"]
    for r in cuda_recs:
        if "error" in r:
            lines.append(f"| {r['source']} | | | | | | | FAIL: compile error |")
            continue
        spill = r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0)
        lines.append(f"| {r['source']} | `{r['function']}` | {r['arch']} | {r.get('registers')} | {spill} | "
                     f"{r.get('stack_bytes')} | {r.get('shared_bytes')} | {'ok' if not spill else 'FAIL: spills'} |")
    return "\n".join(lines) + "\n"


def run(out_dir: Path | None, workers: int | None = None, full: bool = False,
        cuda_dir: Path = SOURCE_CUDA_DIR, archs=ARCHS) -> tuple[list[dict], list[dict], dict]:
    import triton
    t0 = time.perf_counter()
    every = all_specs()
    specs = {a: every if full else covering_specs(every, configs_only=a < 90) for a in archs}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        nvcc_future = (pool.submit(nvcc_resource_usage, cuda_dir, archs)
                       if shutil.which("nvcc") and cuda_dir.is_dir() else None)
        triton_recs = compile_all(specs, archs, workers=workers)
        cuda_recs = nvcc_future.result() if nvcc_future else []
    nvcc_version = "none"
    if shutil.which("nvcc"):
        nvcc_version = re.search(r"release (\S+),", subprocess.run(["nvcc", "--version"], capture_output=True,
                                                                    text=True).stdout).group(1)
    meta = dict(triton=triton.__version__, nvcc=nvcc_version, machine=machine(), seconds=time.perf_counter() - t0,
                scope="every launchable specialisation" if full else "covering sets (sm_90: every config and every "
                "specialisation value per kernel; sm_80: every config and dtype)",
                specs={a: len(v) for a, v in specs.items()}, launchable=len(every))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write(out_dir / "gpu-static.json", json.dumps(dict(meta=meta, triton=triton_recs, cuda=cuda_recs), indent=1) + "\n")
        _write(out_dir / "gpu-static.md", markdown(triton_recs, cuda_recs, meta))
    return triton_recs, cuda_recs, meta


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="directory for gpu-static.md / .json")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--full", action="store_true", help="every launchable specialisation, not the covering set")
    ap.add_argument("--cuda-dir", type=Path, default=SOURCE_CUDA_DIR, help="the CUDA sources (csrc/cuda)")
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 90 or 80,90")
    args = ap.parse_args()
    archs = tuple(int(a) for a in args.archs.split(","))
    triton_recs, cuda_recs, meta = run(args.out, args.workers, args.full, args.cuda_dir, archs)
    print(markdown(triton_recs, cuda_recs, meta))
    failed = [r for r in triton_recs if problems(r)] + [r for r in cuda_recs if "error" in r or r.get("spill_store_bytes")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
