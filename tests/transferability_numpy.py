"""Plain-numpy transferability scores in the form of thuml's Transfer-Learning-Library (tllib.ranking):
the peers of tlfast.transferability in tests/test_transferability.py and benchmarks/bench_transferability.py.

Written from the papers' definitions in tllib's loop structure (float64, one class at a time); kept
here once so that the tests and the benchmark share it.
"""
from __future__ import annotations

import numpy as np


def logme_tllib(features: np.ndarray, labels: np.ndarray, max_iter: int = 11, tol: float = 0.01,
                epsilon: float = 1e-5) -> float:
    """LogME as tllib computes it: one SVD of FᵀF, then for each class a fixed-point loop whose every
    step multiplies the (n, d) features by a vector (F m) for the residual.  ``max_iter=11``,
    ``tol=0.01`` and ``epsilon`` are tllib's settings."""
    f = features.astype(np.float64)
    fh = f
    f = f.T
    d, n = f.shape
    v, s, vh = np.linalg.svd(f @ fh, full_matrices=True)
    evidences = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        alpha, beta = 1.0, 1.0
        lam = alpha / beta
        tmp = vh @ (f @ y)
        for _ in range(max_iter):
            gamma = (s / (s + lam)).sum()
            m = v @ (tmp * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            alpha = gamma / (alpha_de + epsilon)
            beta_de = ((y - fh @ m) ** 2).sum()
            beta = (n - gamma) / (beta_de + epsilon)
            new_lam = alpha / beta
            if np.abs(new_lam - lam) / lam < tol:
                break
            lam = new_lam
        evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * s))
                    - beta / 2.0 * (beta_de + epsilon) - alpha / 2.0 * (alpha_de + epsilon)
                    - n / 2.0 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def log_evidence(features: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y; 0, β⁻¹I + α⁻¹FFᵀ), the marginal likelihood of Bayesian linear regression, written in
    its d x d form (matrix determinant lemma + Woodbury) with slogdet and solve, no eigenvectors:
    log|C| = -n log β - d log α + log|A|,  yᵀC⁻¹y = β yᵀy - β² yᵀF A⁻¹ Fᵀy,  A = αI + βFᵀF."""
    f = features.astype(np.float64)
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    fty = f.T @ y
    _, logdet_a = np.linalg.slogdet(a)
    logdet_c = -n * np.log(beta) - d * np.log(alpha) + logdet_a
    quad = beta * y @ y - beta ** 2 * fty @ np.linalg.solve(a, fty)
    return float(-0.5 * (n * np.log(2 * np.pi) + logdet_c + quad))


def hscore_tllib(features: np.ndarray, labels: np.ndarray) -> float:
    f = features.astype(np.float64)
    covf = np.cov(f, rowvar=False)
    g = np.zeros_like(f)
    for c in np.unique(labels):
        g[labels == c] = f[labels == c].mean(0)
    covg = np.cov(g, rowvar=False)
    return float(np.trace(np.linalg.pinv(covf, rcond=1e-15) @ covg))


def regularized_hscore_tllib(features: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.covariance import LedoitWolf

    f = features.astype(np.float64)
    f = f - f.mean(0, keepdims=True)
    est = LedoitWolf(assume_centered=False).fit(f)
    alpha, covf_alpha = est.shrinkage_, est.covariance_
    g = np.zeros_like(f)
    for c in np.unique(labels):
        g[labels == c] = f[labels == c].mean(0)
    covg = np.cov(g, rowvar=False)
    return float(np.trace(np.linalg.pinv(covf_alpha, rcond=1e-15) @ ((1 - alpha) * covg)))


def transrate_tllib(features: np.ndarray, labels: np.ndarray, eps: float = 1e-4) -> float:
    def coding_rate(z):
        n, d = z.shape
        return 0.5 * np.linalg.slogdet(np.eye(d) + 1 / (n * eps) * z.T @ z)[1]

    f = features.astype(np.float64)
    f = f - f.mean(0, keepdims=True)
    classes = np.unique(labels)
    return float(coding_rate(f) - sum(coding_rate(f[labels == c]) for c in classes) / len(classes))


def nce_naive(source_labels: np.ndarray, target_labels: np.ndarray) -> float:
    """-H(Y | Z) by counting pairs in a Python loop."""
    n = len(source_labels)
    joint: dict = {}
    for z, y in zip(source_labels.tolist(), target_labels.tolist()):
        joint[(z, y)] = joint.get((z, y), 0) + 1
    pz: dict = {}
    for (z, _), c in joint.items():
        pz[z] = pz.get(z, 0) + c
    return float(sum(c / n * np.log(c / pz[z]) for (z, _), c in joint.items()))


def leep_naive(theta: np.ndarray, labels: np.ndarray) -> float:
    classes = np.unique(labels)
    n = len(labels)
    joint = np.stack([theta[labels == c].sum(0) for c in classes]) / n   # (C, K)
    cond = joint / joint.sum(0, keepdims=True)
    rows = np.searchsorted(classes, labels)
    return float(np.mean(np.log([theta[i] @ cond[rows[i]] for i in range(n)])))
