"""One JSON schema for every suite: the machine, the software, every case with its raw samples.

    {"schema": "tlfast.bench/1", "suite": "knn", "created": "...", "argv": [...],
     "machine": {cpu_model, cpu_flags, isa_flags, cores, threads, gpu, ram_bytes, load_avg_start/end},
     "software": {tlfast, torch, numpy, python, faiss, ..., commit},
     "cases": [{"case", "contender", "peer_of" (None for tlfast's own rows), "params": {...},
                "median_s", "p90_s", "p99_s", "p99_9_s", "samples_s": [...], "threads", ...,
                "metrics": {"gflops", "recall_at_10", "qps", ...}, "error": None | "message"}],
     "notes": [...]}

``compare`` matches cases across files by (suite, case, contender, params).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SCHEMA = "tlfast.bench/1"
# lscpu flags that decide which kernels run; every result names them.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_bf16", "amx_int8", "amx_tile", "neon", "asimd", "sve")
_VERSIONED = ("tlfast", "torch", "numpy", "faiss-cpu", "faiss-gpu", "sentence-transformers", "transformers",
              "onnxruntime", "triton", "matplotlib")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def _gpu() -> list[dict]:
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [{"name": torch.cuda.get_device_name(i),
                 "memory_bytes": torch.cuda.get_device_properties(i).total_memory,
                 "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
                for i in range(torch.cuda.device_count())]
    except Exception:  # a broken driver must not stop a CPU benchmark
        return []


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict:
    import torch

    model, flags = cpu_model_and_flags()
    return {"cpu_model": model, "isa_flags": [f for f in ISA_FLAGS if f in flags], "cpu_flags": flags,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": _gpu(), "ram_bytes": _ram_bytes(),
            "platform": platform.platform(), "load_avg_start": list(os.getloadavg())}


def git_commit() -> str:
    """The commit of the checkout tlfast runs from, or "unknown" for an installed wheel."""
    here = Path(__file__).resolve().parent
    for cwd in (here, Path.cwd()):
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    return "unknown"


def software_info() -> dict:
    sw: dict[str, Any] = {"python": sys.version.split()[0]}
    for dist in _VERSIONED:
        try:
            sw[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            sw[dist] = None
    try:
        from .._native import _C

        sw["native_isa"] = _C.cpu_isa() if _C is not None else None
    except Exception:
        sw["native_isa"] = None
    sw["commit"] = git_commit()
    return sw


def new_result(suite: str, argv: list[str] | None = None) -> dict:
    return {"schema": SCHEMA, "suite": suite, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "argv": list(sys.argv[1:] if argv is None else argv), "machine": machine_info(),
            "software": software_info(), "cases": [], "notes": []}


def case_row(case: str, contender: str, params: dict, *, peer_of: str | None = None, samples=None,
             metrics: dict | None = None, error: str | None = None) -> dict:
    """One contender on one case.  ``peer_of`` names the tlfast contender a peer is compared with."""
    row = {"case": case, "contender": contender, "peer_of": peer_of, "params": dict(params),
           "metrics": dict(metrics or {}), "error": error}
    if samples is not None:
        row.update(samples.summary())
    return row


def finish(result: dict) -> dict:
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    return result


def load(path: str | os.PathLike) -> dict:
    """A result file, checked against the schema (ValueError naming the file otherwise)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable JSON file ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a tlfast bench result (schema {SCHEMA!r}); "
                         f"got schema {doc.get('schema') if isinstance(doc, dict) else None!r}")
    for i, row in enumerate(doc.get("cases", [])):
        missing = [k for k in ("case", "contender", "params") if k not in row]
        if missing:
            raise ValueError(f"{path}: case {i} lacks {missing}")
    return doc


def case_key(suite: str, row: dict) -> tuple:
    return suite, row["case"], row["contender"], json.dumps(row["params"], sort_keys=True)
