"""Data the suites generate, and the user's own files.

Families for approximate search (``FAMILIES``): each ``family(n, seed)`` returns float32 rows;
corpus and queries of one family share their centres (fixed seeds) and differ in ``seed``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np


def blobs(n: int, d: int = 128, centres: int = 2000, seed: int = 0, spread: float = 0.35) -> np.ndarray:
    """Isotropic Gaussian blobs in all d dims: a row's neighbours are (nearly) its blob-mates, all
    about equally far, so recall mostly measures finding the blob: the easy case for IVF."""
    cen = np.random.default_rng(12345).standard_normal((centres, d), dtype=np.float32)
    rng = np.random.default_rng(seed)
    x = cen[rng.integers(0, centres, n)]
    x += spread * rng.standard_normal((n, d), dtype=np.float32)
    return x


def clustered(n: int, d: int = 128, centres: int = 2000, seed: int = 0, spread: float = 0.6,
              latent: int = 16) -> np.ndarray:
    """Gaussian blobs in a ``latent``-dim space, mapped linearly into d dims, plus small noise.

    Embeddings have low intrinsic dimension; isotropic blobs in the full 128 dims (``blobs``) make
    the neighbours inside a blob all but equidistant.  Here neighbourhoods have structure and the
    blobs overlap: the harder case.
    """
    g = np.random.default_rng(12345)  # centres and map shared by corpus and queries
    cen = g.standard_normal((centres, latent), dtype=np.float32)
    w = g.standard_normal((latent, d), dtype=np.float32) / np.float32(np.sqrt(latent))
    rng = np.random.default_rng(seed)
    z = cen[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, latent), dtype=np.float32)
    return (z @ w + 0.1 * rng.standard_normal((n, d), dtype=np.float32)).astype(np.float32)


def dirichlet_mixture(n: int, d: int = 32, centres: int = 200, seed: int = 0) -> np.ndarray:
    """DESIGN.md's KL test data: centres ~ Dirichlet(0.5·1), rows ~ Dirichlet(50·centre + 0.05)."""
    cen = np.random.default_rng(54321).dirichlet(np.full(d, 0.5), centres)
    rng = np.random.default_rng(seed)
    x = rng.gamma(50 * cen[rng.integers(0, centres, n)] + 0.05)
    return (x / x.sum(1, keepdims=True)).astype(np.float32)


def gaussian_mixture(n: int, d: int = 96, centres: int = 300, seed: int = 0) -> np.ndarray:
    """A mixture the ANN defaults were never tuned on: anisotropic components of unequal weight
    and width (Zipf-like weights, per-component scale 0.3-1.5, a random covariance factor each)."""
    g = np.random.default_rng(777)
    mean = 3.0 * g.standard_normal((centres, d)).astype(np.float32)
    scale = g.uniform(0.3, 1.5, centres).astype(np.float32)
    basis = g.standard_normal((8, d, d // 4)).astype(np.float32) / np.sqrt(d)  # 8 shared shapes
    shape = g.integers(0, 8, centres)
    weight = 1.0 / np.arange(1, centres + 1)
    rng = np.random.default_rng(seed)
    comp = rng.choice(centres, n, p=weight / weight.sum())
    z = rng.standard_normal((n, d // 4)).astype(np.float32)
    x = mean[comp] + scale[comp, None] * np.einsum("nj,ndj->nd", z, basis[shape[comp]])
    return (x + 0.05 * rng.standard_normal((n, d)).astype(np.float32)).astype(np.float32)


def sentences(n: int, seed: int = 0) -> list[str]:
    """Generated English sentences with topical structure (subject / action / object / place)."""
    rng = np.random.default_rng(seed)
    subj = ["the engineer", "a child", "my neighbour", "the committee", "an old farmer", "the robot",
            "a young doctor", "the orchestra", "our team", "the pilot", "a tired student", "the chef"]
    verb = ["repaired", "painted", "sold", "studied", "photographed", "cooked", "described", "lost",
            "designed", "cleaned", "measured", "ignored", "celebrated", "delivered"]
    obj = ["the bicycle", "a wooden boat", "the new bridge", "three apples", "the broken clock",
           "an ancient map", "the violin", "a spicy soup", "the solar panel", "a red kite",
           "the contract", "a small garden", "the server rack", "a wedding cake"]
    where = ["in the morning", "near the river", "at the station", "during the storm", "in Paris",
             "after lunch", "on the roof", "in the laboratory", "before the match", "at midnight"]
    how = ["quickly", "carefully", "reluctantly", "proudly", "quietly", "badly", "twice", "again"]
    mood = ["", "Surprisingly, ", "Yesterday ", "As usual, ", "Once more, ", "Last winter "]
    parts = [rng.integers(0, len(p), n) for p in (mood, subj, how, verb, obj, where)]
    # 1.1M combinations: a 21k sample holds few exact duplicates (which would tie).
    return [f"{mood[m]}{subj[a]} {how[h]} {verb[b]} {obj[c]} {where[e]}." for m, a, h, b, c, e in zip(*parts)]


def minilm_embeddings(n: int, seed: int = 0) -> np.ndarray:
    """Real all-MiniLM-L6-v2 embeddings of ``sentences(n, seed)`` (needs the extract extra)."""
    import tlfast

    ext = tlfast.Extractor.from_pretrained("minilm")
    return np.asarray(ext.extract(sentences(n, seed), progress=False), dtype=np.float32)


def _uniform(rng, nq, n, d):
    return rng.standard_normal((nq, d), dtype=np.float32), rng.standard_normal((n, d), dtype=np.float32)


def knn_data(kind: str, nq: int, n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(queries, corpus) for the exact kNN suite: "normal" rows or "dirichlet" probability rows."""
    rng = np.random.default_rng(seed)
    if kind == "dirichlet":
        return rng.dirichlet(np.ones(d), nq).astype(np.float32), rng.dirichlet(np.ones(d), n).astype(np.float32)
    if kind == "normal":
        return _uniform(rng, nq, n, d)
    raise ValueError(f"data kind must be 'normal' or 'dirichlet', got {kind!r}")


def load_matrix(path: str | Path, name: str) -> np.ndarray:
    """A .npy file or a tlfast FeatureStore folder, as one in-memory float array."""
    import tlfast

    path = Path(path)
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise ValueError(f"{name}={path} is a folder without manifest.json: not a tlfast feature store")
        return np.asarray(tlfast.FeatureStore(path))
    if path.suffix != ".npy":
        raise ValueError(f"{name}={path}: pass a .npy file or a feature store folder")
    if not path.is_file():
        raise FileNotFoundError(f"{name}={path} does not exist")
    a = np.load(path, allow_pickle=False)
    if a.ndim != 2:
        raise ValueError(f"{name}={path} holds an array of shape {a.shape}; expected (rows, dim)")
    return a


# name: (metric, generator(n, seed) -> rows, generated by this benchmark? (False: data the
# ANN defaults and this benchmark were not designed on))
FAMILIES: dict[str, tuple[str, Callable[[int, int], np.ndarray], bool]] = {
    "clustered-cosine": ("cosine", lambda n, seed: clustered(n, 128, seed=seed), True),
    "blobs-cosine": ("cosine", lambda n, seed: blobs(n, 128, seed=seed), True),
    "dirichlet-kl": ("kl", lambda n, seed: dirichlet_mixture(n, 32, seed=seed), True),
    "gaussian-mixture-l2": ("l2", lambda n, seed: gaussian_mixture(n, 96, seed=seed), False),
    "minilm-cosine": ("cosine", lambda n, seed: minilm_embeddings(n, seed), False),
}
