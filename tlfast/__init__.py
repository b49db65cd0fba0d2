"""tlfast: fast, exact feature matching for transfer learning.

    import tlfast
    res = tlfast.knn(queries, corpus, k=10, metric="cosine")   # KnnResult(values, indices)
    d = tlfast.pairwise(x, y, metric="l2")
    tlfast.backends()                                            # what runs here, and why not
"""
from . import _threads

_threads.configure()  # before anything imports torch: libgomp reads its wait policy once, on load

from . import distributed  # torch.distributed is imported by torch itself: no extra cost
from . import domain
from . import ot
from .backends import BackendInfo
from .extract import Extractor
from .index import Index
from .match import Matches, match
from .metrics import METRICS, Metric
from .ops import KnnResult, backends, knn, pairwise
from .store import FeatureStore
from . import transferability
from .transferability import rank_sources

__version__ = "0.1.0"

__all__ = ["BackendInfo", "Extractor", "FeatureStore", "KnnResult", "METRICS", "Metric", "backends", "knn",
           "pairwise", "__version__", "Index", "KNNClassifier", "LinearProbe", "Matches", "distributed", "domain", "ot",
           "match", "transfer", "KNNRegressor", "RidgeProbe", "transferability", "rank_sources"]

# The training stage needs scikit-learn (the `train` extra): imported on first use, so that
# `import tlfast` works without it.
_TRAIN = ("KNNClassifier", "KNNRegressor", "LinearProbe", "RidgeProbe", "transfer")


def __getattr__(name: str):
    if name in _TRAIN:
        try:
            from . import train
        except ImportError as exc:
            raise ImportError(f"tlfast.{name} needs scikit-learn: pip install 'tlfast[train]' ({exc})") from exc
        return getattr(train, name)
    raise AttributeError(f"module 'tlfast' has no attribute {name!r}")
