"""tlfast: fast, exact feature matching for transfer learning.

    import tlfast
    res = tlfast.knn(queries, corpus, k=10, metric="cosine")   # KnnResult(values, indices)
    d = tlfast.pairwise(x, y, metric="l2")
    tlfast.backends()                                            # what runs here, and why not
"""
from .backends import BackendInfo
from .metrics import METRICS, Metric
from .ops import KnnResult, backends, knn, pairwise
from . import distributed  # torch.distributed is imported by torch itself: no extra cost

__version__ = "0.1.0"

__all__ = ["BackendInfo", "KnnResult", "METRICS", "Metric", "backends", "knn", "pairwise", "__version__",
           "distributed"]
