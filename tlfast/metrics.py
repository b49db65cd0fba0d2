"""The metric table: what each metric means, which direction is better, and what inputs it takes.

Native kernels receive a metric by ``code`` (the order of ``csrc/cpu/knn.h``'s ``Metric``).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Metric", "METRICS", "get_metric"]


@dataclass(frozen=True)
class Metric:
    name: str
    code: int
    larger_is_better: bool
    domain: str  # "any" | "nonzero" | "simplex"
    formula: str

    @property
    def smaller_is_better(self) -> bool:
        return not self.larger_is_better


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("ip", 0, True, "any", "<q, c>"),
        Metric("cosine", 1, True, "nonzero", "<q, c> / (|q| |c|)"),
        Metric("l2", 2, False, "any", "|q - c|^2 (squared, as faiss)"),
        Metric("kl", 3, False, "simplex",
               "KL(q || c) = sum q log(q / c), natural log; 0 log 0 = 0; +inf where q > 0 and c = 0"),
        Metric("js", 4, False, "simplex",
               "JS(q, c) = KL(q || m) / 2 + KL(c || m) / 2, m = (q + c) / 2, natural log"),
    )
}

# Tolerance on row sums for the "simplex" domain (kl, js).
SIMPLEX_TOL = 1e-3


def get_metric(metric: str | Metric) -> Metric:
    if isinstance(metric, Metric):
        return metric
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    return METRICS[metric]
