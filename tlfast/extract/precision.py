"""Which precisions and backends this machine runs natively, and what ``"auto"`` resolves to.

Detected once per process.  The rule for ``precision="auto"`` is: the fastest precision whose
quality class (see :mod:`tlfast.extract.quality`) is "equivalent" to fp32 -- bf16 weights on a CPU
with bf16 matrix instructions (AMX-BF16 or AVX512-BF16) and on a GPU with native bf16, fp16 on a
GPU without it, fp32 everywhere else.  Emulated bf16 (AVX2 or plain AVX-512 CPUs) is never picked:
oneDNN converts every operand and it runs ~100x slower than fp32.  int8 is a different quality
class and is used only when asked for.

``backend="auto"`` picks, per CPU class, the runtime that was fastest for that class in the
committed measurements (``benchmarks/results/extract-cpu.md`` and issue 10's Xeon figures).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["PRECISIONS", "Capability", "capability", "resolve_precision", "resolve_backend", "usable_cores"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The fastest fp32 text runtime measured per CPU class (MiniLM, 1,024 mixed-length sentences):
# * avx2 (AMD EPYC, AVX2+FMA, 2 cores): ONNX Runtime with the transformer fusions is fastest
#   (benchmarks/results/extract-cpu.md);
# * avx512 (AMD EPYC with AVX-512): ONNX Runtime was the fast path (issue 10);
# * avx512_bf16 / amx (Intel Xeon): torch (8.5 s) beat the unfused ONNX Runtime graph (17.4 s),
#   and bf16 weights in torch (~3.0 s) beat both (issue 10) -- bf16 runs in torch only.
_FASTEST_FP32 = {"avx2": "onnxruntime", "avx512": "onnxruntime", "avx512_bf16": "torch", "amx": "torch",
                 "other": "torch"}


@dataclass(frozen=True)
class Capability:
    """What the hardware runs natively.  ``cpu_class`` is one of avx2, avx512, avx512_bf16, amx, other."""

    cpu_model: str
    cpu_isa: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    cpu_flags: tuple[str, ...]  # the matrix-relevant /proc/cpuinfo flags present
    cpu_bf16: bool  # AMX-BF16 or AVX512-BF16: bf16 GEMMs in hardware
    cpu_fp16: bool  # AVX512-FP16 or AMX-FP16
    cpu_int8: str  # the best int8 dot-product instructions: amx_int8, avx512_vnni, avx_vnni, avx2, none
    cpu_class: str
    cuda: tuple[tuple[str, bool], ...]  # (device name, native bf16) per visible GPU

    def summary(self) -> str:
        """One line for `tlfast info` and ``repr(extractor)``."""
        gpus = "; ".join(f"{n} ({'bf16' if b else 'fp16'})" for n, b in self.cuda) or "no GPU"
        bf16 = "native bf16" if self.cpu_bf16 else "no native bf16"
        return f"{self.cpu_class} ({self.cpu_isa}, {bf16}, int8 via {self.cpu_int8}); {gpus}"


_MATRIX_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                 "amx_bf16", "amx_int8", "amx_fp16", "amx_tile")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if flags and model != "unknown CPU":
                    break
    except OSError:  # not Linux: torch's capability string still says AVX2 / AVX512
        pass
    return model, flags


@functools.lru_cache(maxsize=1)
def capability() -> Capability:
    model, flags = _cpuinfo()
    isa = str(torch.backends.cpu.get_cpu_capability())
    bf16 = bool({"amx_bf16", "avx512_bf16"} & flags)
    fp16 = bool({"avx512_fp16", "amx_fp16"} & flags)
    int8 = next((f for f in ("amx_int8", "avx512_vnni", "avx_vnni", "avx2") if f in flags),
                "avx2" if "AVX2" in isa or "AVX512" in isa else "none")
    if "amx_bf16" in flags:
        cls = "amx"
    elif "avx512_bf16" in flags:
        cls = "avx512_bf16"
    elif "avx512f" in flags or "AVX512" in isa:
        cls = "avx512"
    elif "avx2" in flags or "AVX2" in isa:
        cls = "avx2"
    else:
        cls = "other"
    cuda: tuple[tuple[str, bool], ...] = ()
    if torch.cuda.is_available():
        cuda = tuple((torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i) >= (8, 0))
                     for i in range(torch.cuda.device_count()))
    return Capability(model, isa, tuple(f for f in _MATRIX_FLAGS if f in flags), bf16, fp16, int8, cls, cuda)


def check_precision(precision: object) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return str(precision)


def resolve_precision(precision: str, device: torch.device, kind: str = "text") -> str:
    """The concrete precision (fp32, bf16, fp16 or int8) ``precision`` means on ``device`` for a
    ``kind`` of model ("text", "image" or "module").

    Images stay fp32 on CPU: EfficientNet-Lite0 with bf16 weights changed the top-1 class of one
    of four scikit-image photos (astronaut: 450 -> 560, a low-margin image), below the >= 99%
    top-1 agreement gate; the rounding is the same whether bf16 is native or emulated, so this
    holds on AMX CPUs too.  (GPU fp16 keeps 3 more mantissa bits; not measured here.)"""
    precision = check_precision(precision)
    if precision != "auto":
        return precision
    cap = capability()
    if kind == "image" and device.type == "cpu":
        return "fp32"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return "bf16" if cap.cuda and cap.cuda[index][1] else "fp16"
    return "bf16" if cap.cpu_bf16 else "fp32"


def resolve_backend(backend: str, precision: str, device: torch.device) -> str:
    """``"torch"`` or ``"onnxruntime"`` for a concrete ``precision``: int8 is ONNX Runtime's dynamic
    quantisation, bf16 / fp16 run in torch, fp32 takes the fastest runtime measured for this CPU
    class (on GPU: torch, whose SDPA kernels ONNX Runtime's CPU wheel does not have)."""
    if backend != "auto":
        return backend
    if precision == "int8":
        return "onnxruntime"
    if precision in ("bf16", "fp16") or device.type == "cuda":
        return "torch"
    return _FASTEST_FP32[capability().cpu_class]


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which a container or ``taskset``
    narrows), not the machine's count: every thread pool is sized against this."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
