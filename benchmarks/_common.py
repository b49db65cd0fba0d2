"""What the standalone benchmark scripts (bench_ot, bench_persist, bench_large_k, bench_distributed)
share: machine description, peak-RSS probes, torch.mm's rate, and the atomic results writer.

The machine description comes from the package's bench schema (``tlfast.bench.schema``), so every
results file names the CPU model and ISA flags the same way ``tlfast bench`` does.
"""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import numpy as np

from tlfast.bench.schema import cpu_model_and_flags, git_commit  # noqa: F401  (re-exported)
from tlfast.cli import atomic_write


def cpu_name() -> str:
    return cpu_model_and_flags()[0]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) so that it measures from now on (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mm_rate(quick: bool) -> dict:
    """This machine's own float32 matrix-product rate (torch.mm, all threads), the roofline."""
    import torch

    m, kk, n = (1024, 128, 4096) if quick else (4096, 128, 16384)
    a, b = torch.randn(m, kk), torch.randn(kk, n)
    torch.mm(a, b)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"op": "mm", "case": "torch.mm", "shape": [m, kk, n], "dtype": "float32", "backend": "torch.mm",
            "median_s": med, "p95_s": float(np.percentile(times, 95)), "gflops": 2.0 * m * kk * n / med / 1e9}


def write_results(out_dir: Path, name: str, payload: dict, md: str) -> None:
    """<name>.json and <name>.md under out_dir, each written whole or not at all."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / f"{name}.json", lambda f: f.write(json.dumps(payload, indent=1).encode()))
    atomic_write(out_dir / f"{name}.md", lambda f: f.write(md.encode()))
