"""Train on transferred features: kNN label transfer and a linear probe, as scikit-learn estimators.

Both follow scikit-learn's conventions (parameters stored unchanged in ``__init__``, fitted state in
trailing-underscore attributes, ``classes_``, ``n_features_in_``, ``NotFittedError``, validation
through sklearn's helpers), so they work in ``Pipeline`` and ``GridSearchCV``.  Needs the ``train``
extra (``pip install tlfast[train]``).
"""
from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from . import domain
from .metrics import METRICS
from .ops import knn

__all__ = ["KNNClassifier", "LinearProbe", "transfer"]


def _distance(values: np.ndarray, metric: str) -> np.ndarray:
    """Metric values as the distances scikit-learn weights by: 1 - cos (its cosine distance),
    Euclidean for l2 (tlfast's l2 is squared), the divergence itself for kl / js."""
    if metric == "cosine":
        return np.maximum(1.0 - values, 0.0)
    if metric == "l2":
        return np.sqrt(np.maximum(values, 0.0))
    return values


class KNNClassifier(ClassifierMixin, BaseEstimator):
    """k-nearest-neighbour classifier on tlfast's fused exact kNN kernels.

    Equivalent to ``sklearn.neighbors.KNeighborsClassifier(n_neighbors=k, algorithm="brute")`` with
    the matching metric ("cosine" <-> "cosine", "l2" <-> "euclidean"); neighbours at exactly equal
    distance are ordered by training index.  ``weights="distance"`` weights votes by 1 / distance
    (1 - cos for cosine, Euclidean for l2, the divergence for kl / js); training points at distance
    0 then take all the weight, as in scikit-learn.  Uses min(k, n_samples) neighbours.

    Args:
        k: neighbours per prediction.
        metric: "cosine", "l2", "ip", "kl" or "js" (see ``tlfast.METRICS``).
        weights: "uniform" or "distance" (not for "ip", which has no distance).
        backend: as in :func:`tlfast.knn`.
    """

    _parameter_constraints: dict = {
        "k": [Interval(Integral, 1, None, closed="left")],
        "metric": [StrOptions(set(METRICS))],
        "weights": [StrOptions({"uniform", "distance"})],
        "backend": [str],
    }

    def __init__(self, k: int = 5, metric: str = "cosine", weights: str = "uniform", backend: str = "auto"):
        self.k = k
        self.metric = metric
        self.weights = weights
        self.backend = backend

    def fit(self, X: Any, y: Any) -> "KNNClassifier":
        self._validate_params()
        if self.weights == "distance" and self.metric == "ip":
            raise ValueError("weights='distance' needs a distance and metric='ip' has none; "
                             "use weights='uniform' or metric='cosine'")
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_, self._y = np.unique(y, return_inverse=True)
        self._fit_X = self._prepare(X)
        return self

    def _prepare(self, X: np.ndarray) -> np.ndarray:
        """float32 rows for the kernel (it computes in float32).  Cosine runs as ``ip`` on unit rows
        so that an all-zero row has cosine 0 to everything, as in scikit-learn (tlfast.knn's cosine
        rejects such rows)."""
        X = np.asarray(X, dtype=np.float32)
        if self.metric == "cosine":
            norms = np.linalg.norm(X, axis=1, keepdims=True)
            X = X / np.where(norms > 0, norms, 1)
        return np.ascontiguousarray(X)

    def kneighbors(self, X: Any, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(metric values, training indices) of the ``k`` nearest training rows, best first."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        k = min(self.k if k is None else k, self._fit_X.shape[0])
        metric = "ip" if self.metric == "cosine" else self.metric
        res = knn(self._prepare(X), self._fit_X, k, metric, backend=self.backend)
        return res.values, res.indices

    def predict_proba(self, X: Any) -> np.ndarray:
        values, idx = self.kneighbors(X)
        if self.weights == "uniform":
            w = np.ones(values.shape, dtype=np.float64)
        else:
            d = _distance(values.astype(np.float64), self.metric)
            zero = d == 0
            with np.errstate(divide="ignore"):
                w = np.where(zero.any(axis=1, keepdims=True), zero.astype(np.float64), 1.0 / d)
        proba = np.zeros((idx.shape[0], self.classes_.size))
        np.add.at(proba, (np.arange(idx.shape[0])[:, None], self._y[idx]), w)
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        proba = self.predict_proba(X)  # checks fitted before classes_ is touched
        return self.classes_[proba.argmax(axis=1)]


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression on standardised features, fitted with torch's L-BFGS.

    Minimises mean cross-entropy + ‖W‖² / (2 C n) - scikit-learn's ``LogisticRegression(C=C)``
    objective divided by C n - over the features scaled to zero mean and unit variance (constant
    features are left at scale 1).  ``coef_`` / ``intercept_`` are expressed on the raw features.

    Args:
        C: inverse regularisation strength (larger: weaker penalty).
        max_iter: L-BFGS iterations.
        tol: stop when the gradient's largest entry falls below this.
        device: torch device for fitting and prediction ("cpu", "cuda").
    """

    _parameter_constraints: dict = {
        "C": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "device": [str, torch.device],
    }

    def __init__(self, C: float = 1.0, max_iter: int = 200, tol: float = 1e-6, device: str = "cpu"):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    def fit(self, X: Any, y: Any) -> "LinearProbe":
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if self.classes_.size < 2:
            raise ValueError(f"LinearProbe needs samples of at least 2 classes; the data has only one class "
                             f"({self.classes_[0]!r})")
        dev = torch.device(self.device)
        x = torch.as_tensor(X, dtype=torch.float32, device=dev)
        target = torch.as_tensor(y_idx, dtype=torch.int64, device=dev)
        mean, scale = x.mean(0), x.std(0, unbiased=False)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        z = (x - mean) / scale
        n, d = z.shape
        w = torch.zeros(d, self.classes_.size, device=dev, requires_grad=True)
        b = torch.zeros(self.classes_.size, device=dev, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=self.tol,
                                tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")
        penalty = 1.0 / (2.0 * self.C * n)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ w + b, target) + penalty * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            coef = w / scale[:, None]
            self.coef_ = coef.T.cpu().numpy()
            self.intercept_ = (b - mean @ coef).cpu().numpy()
        self.n_iter_ = int(opt.state[w].get("n_iter", 0))  # L-BFGS keeps its state on the first parameter
        return self

    def _logits(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return np.asarray(X, dtype=np.float32) @ self.coef_.T + self.intercept_

    def decision_function(self, X: Any) -> np.ndarray:
        """Class logits (n, n_classes) for the raw features ``X``; for two classes, scikit-learn's
        convention: the (n,) log-odds of ``classes_[1]``."""
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_proba(self, X: Any) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self._logits(X).astype(np.float64)), dim=1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        logits = self._logits(X)
        return self.classes_[logits.argmax(axis=1)]


def transfer(source_x: Any, source_y: Any, target_x: Any, *, method: str = "knn", align: str | None = None,
             **params: Any) -> np.ndarray:
    """Labels for ``target_x`` from a classifier trained on the labelled source domain.

    Args:
        source_x, source_y: labelled source features (n, d) and labels (n,).
        target_x: unlabelled target features (m, d).
        method: "knn" (:class:`KNNClassifier`) or "probe" (:class:`LinearProbe`); ``params`` go to it.
        align: None, or "coral" to re-colour the source features to the target's covariance and
            mean first (:func:`tlfast.domain.coral`), or "ot" to move them onto the target by the
            optimal-transport barycentric map (:func:`tlfast.domain.ot_align`; ``ot_reg`` in
            ``params`` sets its ε, default 1.0 in squared-l2 units).

    Returns:
        Predicted labels (m,), a numpy array of the source label type.
    """
    models = {"knn": KNNClassifier, "probe": LinearProbe}
    if method not in models:
        raise ValueError(f"method must be one of {sorted(models)}, got {method!r}")
    if align not in (None, "coral", "ot"):
        raise ValueError(f"align must be None, 'coral' or 'ot', got {align!r}")
    ot_reg = params.pop("ot_reg", 1.0)
    if align == "coral":
        source_x = domain.coral(source_x, target_x)
    elif align == "ot":
        source_x = domain.ot_align(source_x, target_x, reg=ot_reg)
    return models[method](**params).fit(source_x, source_y).predict(target_x)
