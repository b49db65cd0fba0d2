"""kNN never holds the distance matrix: peak memory stays O(tile + (n + m) d + n k)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, numpy as np, tlfast
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    rng = np.random.default_rng(0)
    q = rng.standard_normal(({nq}, {d}), dtype=np.float32)
    c = rng.standard_normal(({n}, {d}), dtype=np.float32)
    tlfast.knn(q[:2], c[:100], 1, "{metric}")            # import and warm-up outside the window
    open("/proc/self/clear_refs", "w").write("5")      # reset the peak-RSS mark
    base = hwm()
    res = tlfast.knn(q, c, {k}, "{metric}", backend="{backend}")
    print(json.dumps({{"extra": hwm() - base, "shape": list(res.indices.shape)}}))
""")


def peak_extra(**kw) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(**kw)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_knn_peak_memory_is_bounded(metric):
    nq, n, d, k = 2_000, 200_000, 64, 10
    full_matrix = nq * n * 4  # 1.6 GB
    inputs = (nq + n) * d * 4  # 52 MB
    got = peak_extra(nq=nq, n=n, d=d, k=k, metric=metric, backend="cpu")
    assert got["shape"] == [nq, k]
    # one packed copy of the corpus + per-thread tiles and heaps; far below the matrix
    assert got["extra"] < 2 * inputs + 64 * 2**20, got
    assert got["extra"] < full_matrix / 10
