"""KNNClassifier / LinearProbe against scikit-learn, sklearn's estimator checks, and transfer()."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV, train_test_split  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import tlfast  # noqa: E402
from tlfast import KNNClassifier, LinearProbe, transfer  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


def _linear_shift(x, seed=1):
    """A target domain: every feature rescaled and mixed with the others, then offset."""
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    return x @ (np.diag(rng.uniform(0.3, 3, d)) + 0.2 * rng.standard_normal((d, d))) + 5


# Both estimators, with a non-default metric / weighting too.  On scikit-learn 1.9 every check
# passes except check_array_api_input, which sklearn skips unless SCIPY_ARRAY_API=1 (these
# estimators do not claim array-API support; they take numpy and torch CPU arrays).
@parametrize_with_checks([KNNClassifier(), KNNClassifier(k=3, metric="l2", weights="distance"), LinearProbe()])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("metric,sk_metric", [("cosine", "cosine"), ("l2", "euclidean")])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_knn_agrees_with_sklearn_brute_on_digits(digits, metric, sk_metric, weights):
    Xtr, Xte, ytr, yte = digits
    ours = KNNClassifier(k=5, metric=metric, weights=weights).fit(Xtr, ytr)
    theirs = KNeighborsClassifier(5, algorithm="brute", metric=sk_metric, weights=weights).fit(Xtr, ytr)
    pred = ours.predict(Xte)
    assert (pred == theirs.predict(Xte)).mean() >= 0.99
    # Probabilities differ only where an exact distance tie picks a different 5th neighbour.
    same = np.isclose(ours.predict_proba(Xte), theirs.predict_proba(Xte), atol=1e-6).all(axis=1)
    assert same.mean() >= 0.99
    assert ours.score(Xte, yte) >= 0.97


def test_knn_neighbours_equal_sklearn(digits):
    Xtr, Xte, ytr, _ = digits
    values, idx = KNNClassifier(k=4, metric="l2").fit(Xtr, ytr).kneighbors(Xte[:50])
    dist, sk_idx = KNeighborsClassifier(4, algorithm="brute").fit(Xtr, ytr).kneighbors(Xte[:50])
    np.testing.assert_allclose(np.sqrt(values), dist, rtol=1e-4, atol=1e-3)
    assert (idx == sk_idx).mean() >= 0.98  # the rest are exact ties in a different order


def test_knn_distance_weights_give_exact_matches_all_the_weight():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    clf = KNNClassifier(k=3, metric="l2", weights="distance").fit(X, ["a", "b", "b"])
    np.testing.assert_array_equal(clf.predict_proba(X[:1]), [[1.0, 0.0]])
    assert clf.predict([[0.9, 0.1]])[0] == "a"


def test_knn_cosine_handles_zero_rows_as_sklearn_does():
    X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    clf = KNNClassifier(k=1).fit(X, [0, 1, 2])
    assert clf.predict([[2.0, 0.1]])[0] == 1
    assert clf.predict([[0.0, 0.0]])[0] == KNeighborsClassifier(1, metric="cosine").fit(X, [0, 1, 2]).predict(
        [[0.0, 0.0]])[0]


def test_linear_probe_on_digits(digits):
    Xtr, Xte, ytr, yte = digits
    probe = LinearProbe().fit(Xtr, ytr)
    acc = probe.score(Xte, yte)
    assert acc >= 0.93
    # The same objective as LogisticRegression on standardised inputs: nearly the same classifier.
    sk = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(Xtr, ytr)
    assert (probe.predict(Xte) == sk.predict(Xte)).mean() >= 0.97
    assert probe.coef_.shape == (10, 64) and probe.intercept_.shape == (10,)
    np.testing.assert_allclose(probe.predict_proba(Xte).sum(1), 1, rtol=1e-6)


def test_linear_probe_binary_follows_sklearn_decision_convention():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-1, 1, (50, 3)), rng.normal(1, 1, (50, 3))])
    y = np.array(["neg"] * 50 + ["pos"] * 50)
    probe = LinearProbe().fit(X, y)
    scores = probe.decision_function(X)
    assert scores.shape == (100,)
    np.testing.assert_array_equal(probe.predict(X), np.where(scores > 0, "pos", "neg"))
    assert probe.score(X, y) > 0.85


def test_not_fitted_pipeline_and_grid_search(digits):
    Xtr, Xte, ytr, yte = digits
    for est in (KNNClassifier(), LinearProbe()):
        with pytest.raises(NotFittedError):
            est.predict(Xte)
    pipe = make_pipeline(StandardScaler(), KNNClassifier())
    search = GridSearchCV(pipe, {"knnclassifier__k": [1, 3], "knnclassifier__metric": ["cosine", "l2"]}, cv=3)
    search.fit(Xtr, ytr)
    assert search.best_score_ > 0.95 and search.score(Xte, yte) > 0.95
    assert search.best_estimator_[-1].get_params()["k"] in (1, 3)


def test_parameter_errors():
    X, y = np.eye(4), [0, 1, 0, 1]
    with pytest.raises(ValueError, match="metric"):
        KNNClassifier(metric="hamming").fit(X, y)
    with pytest.raises(ValueError, match="'ip' has none"):
        KNNClassifier(metric="ip", weights="distance").fit(X, y)
    with pytest.raises(ValueError, match="'k'"):
        KNNClassifier(k=0).fit(X, y)
    with pytest.raises(ValueError, match="'C'"):
        LinearProbe(C=-1).fit(X, y)
    with pytest.raises(ValueError, match="one class"):
        LinearProbe().fit(X, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="method"):
        transfer(X, y, X, method="svm")
    with pytest.raises(ValueError, match="align"):
        transfer(X, y, X, align="dann")


@pytest.mark.parametrize("method,kwargs", [("knn", {"metric": "l2"}), ("knn", {"metric": "cosine"}), ("probe", {})])
def test_coral_raises_target_accuracy_under_a_linear_shift(digits, method, kwargs):
    Xtr, Xte, ytr, yte = digits
    target = _linear_shift(Xte)
    plain = (transfer(Xtr, ytr, target, method=method, **kwargs) == yte).mean()
    aligned = (transfer(Xtr, ytr, target, method=method, align="coral", **kwargs) == yte).mean()
    assert aligned >= plain + 0.1, (plain, aligned)
    assert aligned >= 0.8


def test_transfer_takes_torch_features(digits):
    Xtr, Xte, ytr, yte = digits
    pred = transfer(torch.from_numpy(Xtr).float(), ytr, torch.from_numpy(Xte).float(), align="coral")
    assert isinstance(pred, np.ndarray) and (pred == yte).mean() > 0.9


def test_lazy_export_names_the_extra(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "tlfast.train", raising=False)
    monkeypatch.delattr(tlfast, "train", raising=False)
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if scikit-learn were not installed
    with pytest.raises(ImportError, match=r"tlfast\[train\]"):
        tlfast.__getattr__("LinearProbe")
