"""Shared test helpers: the one GPU marker, tolerances per dtype, and input generators."""
from __future__ import annotations

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# The single marker for tests that need a CUDA device, `@pytest.mark.gpu` (registered in
# pyproject.toml): such tests are skipped here when no device is visible, never at import.
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


# Absolute + relative tolerance on returned values, by input dtype (float32 accumulation always).
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float64: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def make_inputs(metric: str, nq: int, n: int, d: int, seed: int = 0, dtype=torch.float32):
    """Random (queries, corpus) in the metric's domain; Dirichlet rows for kl / js."""
    rng = np.random.default_rng(seed)
    if metric in ("kl", "js"):
        q = rng.dirichlet(np.ones(d), nq)
        c = rng.dirichlet(np.ones(d), n)
    else:
        q = rng.standard_normal((nq, d))
        c = rng.standard_normal((n, d))
    return torch.from_numpy(q).to(dtype), torch.from_numpy(c).to(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    np.random.seed(1234)
