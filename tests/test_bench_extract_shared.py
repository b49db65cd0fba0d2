"""benchmarks/bench_extract_shared.py's load and its arithmetic: the burners really run while the
block runs and are gone after it; the summary's slowdown and fair share are what the docs say; and
bench_extract's --contenders refuses a name it does not know."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
shared = pytest.importorskip("bench_extract_shared")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_burners_run_during_the_block_and_are_gone_after():
    with shared.Burners(2) as b:
        procs = list(b.procs)
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
        before = [_cpu_seconds(p.pid) for p in procs]
        time.sleep(0.5)
        after = [_cpu_seconds(p.pid) for p in procs]
        assert all(a > s for a, s in zip(after, before)), "a burner is not computing"
    assert all(p.returncode is not None for p in procs), "burners outlived the block"
    with shared.Burners(0) as b:
        assert b.procs == []


def test_summary_slowdown_and_fair_share():
    rounds = [{"threads": 2, "alone": [1.0, 1.2], "loaded": [2.0, 3.0], "cpu_alone": [2.0, 2.0],
               "cpu_loaded": [4.0, 5.0], "load": 2.5}] * 3
    row = shared.summarize("x", rounds, burners=2)
    assert row["alone_s"] == pytest.approx(1.1) and row["loaded_s"] == pytest.approx(2.5)
    assert row["slowdown"] == pytest.approx(2.5 / 1.1)
    assert row["fair_slowdown"] == pytest.approx(2.0)
    assert row["cpu_loaded_s"] == pytest.approx(4.5) and row["rounds"] == 3
    md = shared.markdown([row], {"device": "d", "threads": 2, "burners": 2, "commit": "c", "args": "",
                                 "texts": 8, "rounds": 3, "cpu_flags": "f", "capability": "c",
                                 "auto_precision": "fp32", "auto_backend": "torch", "load": "l"})
    assert "| x | 1.100 | 2.500 |" in md and "2.27x | 2.00x | - | - |" in md


def test_bench_extract_contenders_filter_rejects_unknown_names():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_extract.py"), "--cases", "text-latency",
                           "--contenders", "no-such-contender"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--contenders: no-such-contender not in the cases run" in proc.stderr
