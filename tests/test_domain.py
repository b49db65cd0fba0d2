"""domain.coral (the DESIGN.md definition, spelt out in numpy) and domain.mmd (a naive float64 oracle)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tlfast import domain


def _sqrtm(a, power):
    w, v = np.linalg.eigh(a)
    return (v * w ** power) @ v.T


def _coral_oracle(s, t, lam=1.0):
    s, t = s.astype(np.float64), t.astype(np.float64)
    eye = lam * np.eye(s.shape[1])
    cs, ct = np.cov(s, rowvar=False) + eye, np.cov(t, rowvar=False) + eye
    return (s - s.mean(0)) @ _sqrtm(cs, -0.5) @ _sqrtm(ct, 0.5) + t.mean(0)


def _mmd_oracle(x, y, sigma):
    x, y = x.astype(np.float64), y.astype(np.float64)

    def k(a, b):
        return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * sigma**2))

    m, n = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * k(x, y).mean())


def _shifted(seed=0, n=400, d=6):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    t = rng.standard_normal((n + 37, d)) @ rng.standard_normal((d, d)) + 3.0
    return s.astype(np.float32), t.astype(np.float32)


# n > d (covariance path) and n < d (few samples of wide features: the Gram-matrix path).
@pytest.mark.parametrize("n,d", [(400, 6), (37, 91), (120, 120)])
@pytest.mark.parametrize("lam", [1.0, 0.01])
def test_coral_matches_definition(lam, n, d):
    s, t = _shifted(n=n, d=d)
    out = domain.coral(s, t, lam=lam)
    assert out.shape == s.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, _coral_oracle(s, t, lam), rtol=1e-4, atol=1e-4)


def test_coral_aligns_second_moments_when_lam_is_small():
    s, t = _shifted(1, n=2000)
    out = domain.coral(torch.from_numpy(s).double(), torch.from_numpy(t).double(), lam=1e-6)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.mean(0).numpy(), t.mean(0), atol=1e-5)
    np.testing.assert_allclose(np.cov(out.numpy(), rowvar=False), np.cov(t.astype(np.float64), rowvar=False),
                               rtol=1e-3, atol=1e-3)


def test_coral_errors():
    s, t = _shifted()
    with pytest.raises(ValueError, match="dimension mismatch"):
        domain.coral(s, t[:, :3])
    with pytest.raises(ValueError, match="at least 2 rows"):
        domain.coral(s[:1], t)
    with pytest.raises(ValueError, match="lam"):
        domain.coral(s, t, lam=0)
    with pytest.raises(ValueError, match="same kind"):
        domain.coral(s, torch.from_numpy(t))
    with pytest.raises(ValueError, match="NaN"):
        domain.coral(np.full_like(s, np.nan), t)


def test_mmd_matches_oracle_with_tiles_smaller_than_the_samples():
    s, t = _shifted(2, n=150)
    pooled = np.concatenate([s, t]).astype(np.float64)
    dist = np.sqrt(((pooled[:, None] - pooled[None]) ** 2).sum(-1))
    median = np.median(dist[np.triu_indices(len(pooled), 1)])
    for tile in (16, 41, 4096):
        assert domain.mmd(s, t, tile=tile) == pytest.approx(_mmd_oracle(s, t, median), rel=1e-4, abs=1e-6)
    assert domain.mmd(s, t, sigma=1.7, tile=33) == pytest.approx(_mmd_oracle(s, t, 1.7), rel=1e-4, abs=1e-6)


def test_mmd_separates_same_from_shifted_distributions():
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((300, 5)).astype(np.float32) for _ in range(2))
    same = domain.mmd(a, b)
    assert abs(same) < 0.01  # unbiased: near zero, either sign
    assert domain.mmd(a, b + 0.5) > 10 * max(abs(same), 1e-3)


def test_mmd_errors():
    x = np.ones((5, 3), np.float32)
    with pytest.raises(ValueError, match="kernel"):
        domain.mmd(x, x, kernel="laplace")
    with pytest.raises(ValueError, match="sigma = 0"):
        domain.mmd(x, x)
    with pytest.raises(ValueError, match="sigma"):
        domain.mmd(x, x, sigma=-1.0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        domain.mmd(x[:1], x)
