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
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from . import domain
from .metrics import METRICS
from .ops import knn

__all__ = ["KNNClassifier", "KNNRegressor", "LinearProbe", "RidgeProbe", "transfer"]

# Rows per chunk of RidgeProbe's float64 Gram accumulation: O(chunk * d) extra memory.
_RIDGE_CHUNK = 16384


def _distance(values: np.ndarray, metric: str) -> np.ndarray:
    """Metric values as the distances scikit-learn weights by: 1 - cos (its cosine distance),
    Euclidean for l2 (tlfast's l2 is squared), the divergence itself for kl / js."""
    if metric == "cosine":
        return np.maximum(1.0 - values, 0.0)
    if metric == "l2":
        return np.sqrt(np.maximum(values, 0.0))
    return values


def _vote_weights(values: np.ndarray, metric: str, weights: str, temperature: float) -> np.ndarray:
    """(n, k) float64 weights of the neighbours whose metric values are ``values``.

    "uniform": 1.  "distance": 1 / distance (see :func:`_distance`); where a row has neighbours at
    distance 0, those take all the weight, as in scikit-learn.  "softmax": exp(s / T) with s the
    similarity (cos or ⟨q, c⟩) or minus the metric value for the divergence-like metrics (squared
    l2, kl, js) - DINO's weighted kNN; shifted by the row maximum before exp, which the
    normalisation cancels, so no row overflows.
    """
    values = values.astype(np.float64)
    if weights == "uniform":
        return np.ones(values.shape)
    if weights == "distance":
        d = _distance(values, metric)
        zero = d == 0
        with np.errstate(divide="ignore"):
            return np.where(zero.any(axis=1, keepdims=True), zero.astype(np.float64), 1.0 / d)
    score = values if METRICS[metric].larger_is_better else -values
    return np.exp((score - score.max(axis=1, keepdims=True)) / temperature)


class _KNNBase(BaseEstimator):
    """The neighbour search KNNClassifier and KNNRegressor share."""

    _parameter_constraints: dict = {
        "k": [Interval(Integral, 1, None, closed="left")],
        "metric": [StrOptions(set(METRICS))],
        "weights": [StrOptions({"uniform", "distance", "softmax"})],
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "backend": [str],
    }

    def _check_params(self) -> None:
        self._validate_params()
        if self.weights == "distance" and self.metric == "ip":
            raise ValueError("weights='distance' needs a distance and metric='ip' has none; "
                             "use weights='uniform' or 'softmax', or metric='cosine'")

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

    def _neighbour_weights(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        values, idx = self.kneighbors(X)
        return _vote_weights(values, self.metric, self.weights, self.temperature), idx


class KNNClassifier(ClassifierMixin, _KNNBase):
    """k-nearest-neighbour classifier on tlfast's fused exact kNN kernels.

    Equivalent to ``sklearn.neighbors.KNeighborsClassifier(n_neighbors=k, algorithm="brute")`` with
    the matching metric ("cosine" <-> "cosine", "l2" <-> "euclidean"); neighbours at exactly equal
    distance are ordered by training index.  ``weights="distance"`` weights votes by 1 / distance
    (1 - cos for cosine, Euclidean for l2, the divergence for kl / js); training points at distance
    0 then take all the weight, as in scikit-learn.  Uses min(k, n_samples) neighbours.

    ``weights="softmax"`` is the weighted kNN of self-supervised evaluation (Wu et al. 2018; DINO,
    Caron et al. 2021, and DINOv2 use it to score frozen features): each neighbour votes
    exp(sim / T) for its class and ``predict_proba`` is the normalised vote.  DINO's protocol is
    ``KNNClassifier(k=20, metric="cosine", weights="softmax", temperature=0.07)`` on its features
    (DINO also L2-normalises them, which cosine does).  For l2 / kl / js the vote is
    exp(-value / T) (value: squared L2 or the divergence).

    Args:
        k: neighbours per prediction (DINO: 20).
        metric: "cosine", "l2", "ip", "kl" or "js" (see ``tlfast.METRICS``).
        weights: "uniform", "distance" (not for "ip", which has no distance) or "softmax".
        temperature: T of the softmax weights (DINO: 0.07); unused by the other weightings.
        backend: as in :func:`tlfast.knn`.
    """

    def __init__(self, k: int = 5, metric: str = "cosine", weights: str = "uniform", temperature: float = 0.07,
                 backend: str = "auto"):
        self.k = k
        self.metric = metric
        self.weights = weights
        self.temperature = temperature
        self.backend = backend

    def fit(self, X: Any, y: Any) -> "KNNClassifier":
        self._check_params()
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_, self._y = np.unique(y, return_inverse=True)
        self._fit_X = self._prepare(X)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        w, idx = self._neighbour_weights(X)
        proba = np.zeros((idx.shape[0], self.classes_.size))
        np.add.at(proba, (np.arange(idx.shape[0])[:, None], self._y[idx]), w)
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        proba = self.predict_proba(X)  # checks fitted before classes_ is touched
        return self.classes_[proba.argmax(axis=1)]


class KNNRegressor(RegressorMixin, _KNNBase):
    """k-nearest-neighbour regression on tlfast's fused exact kNN kernels: the prediction is the
    weighted mean Σ w_j y_j / Σ w_j of the k nearest training targets.

    Equivalent to ``sklearn.neighbors.KNeighborsRegressor(n_neighbors=k, algorithm="brute")`` with
    the matching metric and ``weights`` "uniform" / "distance"; "softmax" weights are exp(sim / T)
    as in :class:`KNNClassifier`.  Multi-output: ``y`` may be (n,) or (n, n_targets), and
    ``predict`` returns the same rank.

    Args:
        k: neighbours per prediction.
        metric: "cosine", "l2", "ip", "kl" or "js".
        weights: "uniform", "distance" (not for "ip") or "softmax".
        temperature: T of the softmax weights.
        backend: as in :func:`tlfast.knn`.
    """

    def __init__(self, k: int = 5, metric: str = "cosine", weights: str = "uniform", temperature: float = 0.07,
                 backend: str = "auto"):
        self.k = k
        self.metric = metric
        self.weights = weights
        self.temperature = temperature
        self.backend = backend

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X: Any, y: Any) -> "KNNRegressor":
        self._check_params()
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64], multi_output=True, y_numeric=True)
        y = np.asarray(y, dtype=np.float64)
        self._y_1d = y.ndim == 1
        self._y = y.reshape(len(y), -1)
        self._fit_X = self._prepare(X)
        return self

    def predict(self, X: Any) -> np.ndarray:
        w, idx = self._neighbour_weights(X)
        pred = np.einsum("nk,nkt->nt", w, self._y[idx]) / w.sum(axis=1, keepdims=True)
        return pred[:, 0] if self._y_1d else pred


class RidgeProbe(RegressorMixin, BaseEstimator):
    """Ridge regression on the features, in closed form: the regression counterpart of
    :class:`LinearProbe`.

    Minimises ‖y - Xw - b‖² + alpha ‖w‖² exactly as ``sklearn.linear_model.Ridge(alpha)``: with
    ``fit_intercept`` the rows are centred, (XcᵀXc + alpha I) W = Xcᵀyc is solved by Cholesky in
    float64 (XcᵀXc accumulated over row chunks, so n may be large; when n < d the n x n dual system
    (XcXcᵀ + alpha I) C = yc, W = XcᵀC is solved instead) and b = ȳ - x̄ᵀW.  Multi-output:
    ``coef_`` is (n_features,) for 1-D ``y`` and (n_targets, n_features) for 2-D, as in sklearn.

    Args:
        alpha: L2 penalty (> 0).
        fit_intercept: fit b (else the data are taken as centred).
        device: torch device for the solve ("cpu", "cuda").
    """

    _parameter_constraints: dict = {
        "alpha": [Interval(Real, 0, None, closed="neither")],
        "fit_intercept": ["boolean"],
        "device": [str, torch.device],
    }

    def __init__(self, alpha: float = 1.0, fit_intercept: bool = True, device: str = "cpu"):
        self.alpha = alpha
        self.fit_intercept = fit_intercept
        self.device = device

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X: Any, y: Any) -> "RidgeProbe":
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], multi_output=True, y_numeric=True)
        dev = torch.device(self.device)
        x = torch.as_tensor(X, device=dev)
        t = torch.as_tensor(np.asarray(y, dtype=np.float64), device=dev)
        t2 = t.reshape(len(t), -1)
        n, d = x.shape
        f64 = torch.float64
        x_mean = torch.zeros(d, dtype=f64, device=dev)
        for i in range(0, n, _RIDGE_CHUNK):
            x_mean += x[i:i + _RIDGE_CHUNK].to(f64).sum(0)
        x_mean = x_mean / n if self.fit_intercept else x_mean.zero_()
        y_mean = t2.mean(0) if self.fit_intercept else torch.zeros(t2.shape[1], dtype=f64, device=dev)
        yc = t2 - y_mean
        if n < d:
            xc = x.to(f64) - x_mean
            gram = xc @ xc.T
            gram.diagonal().add_(self.alpha)
            coef = xc.T @ torch.cholesky_solve(yc, torch.linalg.cholesky(gram))
        else:
            gram = torch.zeros(d, d, dtype=f64, device=dev)
            xty = torch.zeros(d, t2.shape[1], dtype=f64, device=dev)
            for i in range(0, n, _RIDGE_CHUNK):
                xc = x[i:i + _RIDGE_CHUNK].to(f64) - x_mean
                gram += xc.T @ xc
                xty += xc.T @ yc[i:i + _RIDGE_CHUNK]
            gram.diagonal().add_(self.alpha)
            coef = torch.cholesky_solve(xty, torch.linalg.cholesky(gram))
        coef_np = coef.T.cpu().numpy()
        intercept_np = (y_mean - x_mean @ coef).cpu().numpy()
        self.coef_ = coef_np[0] if t.dim() == 1 else coef_np
        # sklearn's shapes: a float for 1-D y or without an intercept, else one per target.
        self.intercept_ = intercept_np if self.fit_intercept and t.dim() == 2 else float(intercept_np[0])
        return self

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return np.asarray(X, dtype=np.float64) @ self.coef_.T + self.intercept_


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
             task: str = "classification", **params: Any) -> np.ndarray:
    """Labels (or regression targets) for ``target_x`` from a model trained on the labelled source domain.

    Args:
        source_x, source_y: labelled source features (n, d) and labels (n,) or targets (n,) / (n, t).
        target_x: unlabelled target features (m, d).
        method: "knn" (:class:`KNNClassifier` / :class:`KNNRegressor`) or "probe" (:class:`LinearProbe`
            / :class:`RidgeProbe`); ``params`` go to it.
        align: None, or "coral" to re-colour the source features to the target's covariance and
            mean first (:func:`tlfast.domain.coral`), or "ot" to move them onto the target by the
            optimal-transport barycentric map (:func:`tlfast.domain.ot_align`; ``ot_reg`` in
            ``params`` sets its ε, default 1.0 in squared-l2 units).
        task: "classification" or "regression".

    Returns:
        Predictions for the target rows, a numpy array: labels of the source label type, or real
        targets of the source targets' shape.
    """
    models = {"classification": {"knn": KNNClassifier, "probe": LinearProbe},
              "regression": {"knn": KNNRegressor, "probe": RidgeProbe}}
    if task not in models:
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    if method not in models[task]:
        raise ValueError(f"method must be one of {sorted(models[task])}, got {method!r}")
    if align not in (None, "coral", "ot"):
        raise ValueError(f"align must be None, 'coral' or 'ot', got {align!r}")
    ot_reg = params.pop("ot_reg", 1.0)
    if align == "coral":
        source_x = domain.coral(source_x, target_x)
    elif align == "ot":
        source_x = domain.ot_align(source_x, target_x, reg=ot_reg)
    return models[task][method](**params).fit(source_x, source_y).predict(target_x)
