"""tlfast.match against a brute-force float64 oracle built from the full distance matrix."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tlfast
from tlfast import reference

from conftest import make_inputs


def _oracle(s, t, metric, mutual, ratio, threshold):
    """Every test spelt out on the full (n, m) float64 matrix (what match() must never build)."""
    d = reference.pairwise(torch.from_numpy(s).double(), torch.from_numpy(t).double(), metric).numpy()
    larger = tlfast.METRICS[metric].larger_is_better
    key = -d if larger else d
    fwd, back = key.argmin(1), key.argmin(0)
    out = []
    for i, j in enumerate(fwd):
        ok = not mutual or back[j] == i
        if threshold is not None:
            ok &= d[i, j] >= threshold if larger else d[i, j] <= threshold
        if ratio is not None:
            d1, d2 = np.sort(key[i])[:2]
            if metric == "l2":
                d1, d2 = np.sqrt(d1), np.sqrt(d2)
            elif metric == "cosine":
                d1, d2 = np.sqrt(2 + 2 * d1), np.sqrt(2 + 2 * d2)  # key = -cos
            ok &= d1 < ratio * d2
        if ok:
            out.append((i, int(j), d[i, j]))
    return out


CASES = [(True, None, None), (False, 0.9, None), (True, 0.95, None), (False, None, "median"), (True, 0.9, "median")]


# No ratio test for ip (it has no distance; test_errors checks the error).
@pytest.mark.parametrize("metric,mutual,ratio,threshold",
                         [(m, *c) for m in ("cosine", "ip", "l2", "kl", "js") for c in CASES
                          if not (m == "ip" and c[1] is not None)])
def test_match_equals_oracle(metric, mutual, ratio, threshold):
    s, t = (a.numpy() for a in make_inputs(metric, 53, 71, 12, seed=3))
    if threshold == "median":  # a threshold that keeps about half the forward matches
        best = tlfast.knn(s, t, 1, metric).values[:, 0]
        threshold = float(np.median(best))
    got = tlfast.match(s, t, metric, mutual=mutual, ratio=ratio, threshold=threshold)
    exp = _oracle(s, t, metric, mutual, ratio, threshold)
    assert list(zip(got.source_idx.tolist(), got.target_idx.tolist())) == [(i, j) for i, j, _ in exp]
    np.testing.assert_allclose(got.scores, [v for _, _, v in exp], rtol=1e-4, atol=1e-5)
    assert got.source_idx.dtype == np.int64 and got.scores.dtype == np.float32
    assert 0 < len(exp) < 53  # each case filters something and keeps something


def test_mutual_matches_recover_a_permutation():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((200, 32)).astype(np.float32)
    perm = rng.permutation(200)
    s = t[perm] + 0.01 * rng.standard_normal((200, 32)).astype(np.float32)
    m = tlfast.match(torch.from_numpy(s), torch.from_numpy(t), "l2", ratio=0.8)
    assert isinstance(m.source_idx, torch.Tensor)
    assert m.source_idx.tolist() == list(range(200))
    assert m.target_idx.tolist() == perm.tolist()


def test_kl_mutual_uses_the_forward_direction():
    """KL is asymmetric: the backward pass must rank sources by KL(source || target), not the reverse."""
    s, t = (a.numpy() for a in make_inputs("kl", 40, 30, 6, seed=11))
    d = reference.pairwise(torch.from_numpy(s).double(), torch.from_numpy(t).double(), "kl").numpy()
    got = tlfast.match(s, t, "kl")
    exp = [(i, j) for i, j in enumerate(d.argmin(1)) if d[:, j].argmin() == i]
    assert list(zip(got.source_idx.tolist(), got.target_idx.tolist())) == exp


def test_errors():
    s, t = (a.numpy() for a in make_inputs("cosine", 5, 6, 3))
    with pytest.raises(ValueError, match="ip"):
        tlfast.match(s, t, "ip", ratio=0.8)
    with pytest.raises(ValueError, match="ratio"):
        tlfast.match(s, t, ratio=1.5)
    with pytest.raises(ValueError, match="2 target rows"):
        tlfast.match(s, t[:1], ratio=0.8)
    with pytest.raises(ValueError, match="threshold"):
        tlfast.match(s, t, threshold="high")
    with pytest.raises(ValueError, match="dimension mismatch"):
        tlfast.match(s, t[:, :2])
    with pytest.raises(ValueError, match="metric"):
        tlfast.match(s, t, "hamming")
