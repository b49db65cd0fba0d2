"""KNNRegressor / RidgeProbe against scikit-learn, the softmax-weighted kNN classifier (DINO's
protocol), transfer(task="regression"), and CORAL against skada's CORALAdapter."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from sklearn.datasets import load_diabetes, load_digits, make_regression  # noqa: E402
from sklearn.linear_model import Ridge  # noqa: E402
from sklearn.model_selection import GridSearchCV, train_test_split  # noqa: E402
from sklearn.neighbors import KNeighborsRegressor  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from tlfast import KNNClassifier, KNNRegressor, RidgeProbe, domain, transfer  # noqa: E402


@pytest.fixture(scope="module")
def diabetes():
    X, y = load_diabetes(return_X_y=True)
    return train_test_split(X, y, test_size=0.25, random_state=0)


@pytest.fixture(scope="module")
def synthetic():
    X, y = make_regression(n_samples=601, n_features=23, n_informative=11, n_targets=3, noise=5.0, random_state=1)
    return train_test_split(X, y, test_size=0.3, random_state=0)


# Every new estimator and weighting (the distance weighting shares the classifier's code, checked
# in test_train.py).
@parametrize_with_checks([KNNRegressor(metric="l2", weights="softmax", temperature=2.0),
                          RidgeProbe(alpha=0.1, fit_intercept=False),
                          KNNClassifier(k=20, weights="softmax", temperature=0.07)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("metric,sk_metric", [("l2", "euclidean"), ("cosine", "cosine")])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_knn_regressor_equals_sklearn_on_diabetes(diabetes, metric, sk_metric, weights):
    Xtr, Xte, ytr, yte = diabetes
    ours = KNNRegressor(k=7, metric=metric, weights=weights).fit(Xtr, ytr)
    theirs = KNeighborsRegressor(7, algorithm="brute", metric=sk_metric, weights=weights).fit(Xtr, ytr)
    pred = ours.predict(Xte)
    assert pred.shape == yte.shape
    np.testing.assert_allclose(pred, theirs.predict(Xte), rtol=1e-4)
    assert ours.score(Xte, yte) == pytest.approx(theirs.score(Xte, yte), abs=1e-4)


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_knn_regressor_equals_sklearn_on_make_regression_multioutput(synthetic, weights):
    Xtr, Xte, ytr, yte = synthetic
    ours = KNNRegressor(k=5, metric="l2", weights=weights).fit(Xtr, ytr).predict(Xte)
    theirs = KNeighborsRegressor(5, algorithm="brute", weights=weights).fit(Xtr, ytr).predict(Xte)
    assert ours.shape == yte.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-3)
    # A 2-D target with one column stays 2-D, as in sklearn.
    assert KNNRegressor(k=3).fit(Xtr, ytr[:, :1]).predict(Xte).shape == (len(Xte), 1)


def test_knn_regressor_softmax_weights_by_hand():
    X = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    y = np.array([1.0, 2.0, 3.0, 4.0])
    q = np.array([[0.6, 0.8]])
    sims = (X @ q[0]) / np.linalg.norm(X, axis=1)
    top = np.argsort(-sims)[:3]
    w = np.exp(sims[top] / 0.5)
    got = KNNRegressor(k=3, weights="softmax", temperature=0.5).fit(X, y).predict(q)
    np.testing.assert_allclose(got, [(w * y[top]).sum() / w.sum()], rtol=1e-6)
    # T -> large: the uniform mean; T -> small: the nearest neighbour's target.
    np.testing.assert_allclose(KNNRegressor(k=3, weights="softmax", temperature=1e6).fit(X, y).predict(q),
                               [y[top].mean()], rtol=1e-5)
    np.testing.assert_allclose(KNNRegressor(k=3, weights="softmax", temperature=1e-4).fit(X, y).predict(q),
                               [y[top[0]]], rtol=1e-6)


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("alpha", [1.0, 1e-3, 50.0])
def test_ridge_probe_equals_sklearn_ridge(diabetes, synthetic, fit_intercept, alpha, monkeypatch):
    from tlfast import train

    monkeypatch.setattr(train, "_RIDGE_CHUNK", 53)  # several chunks, a ragged last one
    for Xtr, Xte, ytr, _ in (diabetes, synthetic):
        ours = RidgeProbe(alpha=alpha, fit_intercept=fit_intercept).fit(Xtr, ytr)
        theirs = Ridge(alpha=alpha, fit_intercept=fit_intercept, solver="cholesky").fit(Xtr, ytr)
        assert np.shape(ours.coef_) == np.shape(theirs.coef_)
        assert np.shape(ours.intercept_) == np.shape(theirs.intercept_)
        np.testing.assert_allclose(ours.coef_, theirs.coef_, rtol=1e-5, atol=1e-5 * np.abs(theirs.coef_).max())
        np.testing.assert_allclose(ours.intercept_, theirs.intercept_, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.predict(Xte), theirs.predict(Xte), rtol=1e-5, atol=1e-5)


def test_ridge_probe_dual_form_when_features_outnumber_rows():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((31, 97)), rng.standard_normal((31, 2))
    ours, theirs = RidgeProbe(alpha=0.3).fit(X, y), Ridge(alpha=0.3).fit(X, y)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(ours.intercept_, theirs.intercept_, rtol=1e-5, atol=1e-8)


def test_softmax_knn_classifier_votes_and_dino_defaults():
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    clf = KNNClassifier(k=20, weights="softmax").fit(Xtr, ytr)
    assert clf.get_params()["temperature"] == 0.07
    proba = clf.predict_proba(Xte)
    # The votes by hand: exp(cos / T) summed per class over the 20 nearest, normalised.
    xn = Xtr / np.linalg.norm(Xtr, axis=1, keepdims=True)
    qn = Xte[:40] / np.linalg.norm(Xte[:40], axis=1, keepdims=True)
    sims = qn @ xn.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :20]
    w = np.exp(np.take_along_axis(sims, top, 1) / 0.07)
    votes = np.zeros((40, 10))
    np.add.at(votes, (np.arange(40)[:, None], ytr[top]), w)
    np.testing.assert_allclose(proba[:40], votes / votes.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
    assert clf.score(Xte, yte) >= 0.97
    # Distance weighting keeps working and is a different vote.
    dist = KNNClassifier(k=20, weights="distance").fit(Xtr, ytr).predict_proba(Xte)
    assert not np.allclose(dist, proba)


def test_transfer_regression_and_parameter_errors(diabetes):
    Xtr, Xte, ytr, yte = diabetes
    knn_pred = transfer(Xtr, ytr, Xte, task="regression", k=9, metric="l2")
    np.testing.assert_allclose(knn_pred, KNNRegressor(k=9, metric="l2").fit(Xtr, ytr).predict(Xte))
    probe_pred = transfer(torch.from_numpy(Xtr), ytr, torch.from_numpy(Xte), method="probe", task="regression",
                          alpha=0.01)
    assert np.corrcoef(probe_pred, yte)[0, 1] > 0.6
    with pytest.raises(ValueError, match="task"):
        transfer(Xtr, ytr, Xte, task="ranking")
    with pytest.raises(ValueError, match="'temperature'"):
        KNNRegressor(weights="softmax", temperature=0).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="'ip' has none"):
        KNNRegressor(metric="ip", weights="distance").fit(Xtr, ytr)
    with pytest.raises(ValueError, match="'alpha'"):
        RidgeProbe(alpha=0).fit(Xtr, ytr)
    search = GridSearchCV(KNNRegressor(metric="l2"), {"k": [5, 15], "weights": ["uniform", "distance"]}, cv=3)
    assert search.fit(Xtr, ytr).best_params_["k"] in (5, 15)


def test_coral_equals_skada_coral_adapter():
    """skada's CORALAdapter(reg=r) whitens / re-colours with sklearn's shrunk covariance
    (1 - r) S + r tr(S)/d I (S: the 1/n covariance) and leaves the source centred; tlfast's coral uses
    Cov + lam I (Cov: the 1/(n - 1) covariance, DESIGN.md) and moves to the target mean.  The (1 - r)
    and n/(n - 1) factors cancel between whitening and re-colouring when both domains have the same n,
    and the ridges agree when tr(S) is the same in both: lam = r/(1 - r) tr(S)/d · n/(n - 1)."""
    skada = pytest.importorskip("skada")
    rng = np.random.default_rng(4)
    n, d = 300, 6
    s = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    t = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    t = t * np.sqrt(np.trace(np.cov(s, rowvar=False)) / np.trace(np.cov(t, rowvar=False))) + 2.0
    X = np.concatenate([s, t])
    sample_domain = np.concatenate([np.ones(n), -np.ones(n)]).astype(int)
    mu = np.trace(np.cov(s, rowvar=False, bias=True)) / d
    for reg, lam in ((None, 1e-10), (0.3, 0.3 / 0.7 * mu * n / (n - 1)), (0.02, 0.02 / 0.98 * mu * n / (n - 1))):
        adapter = skada.CORALAdapter(reg=reg).fit(X, sample_domain=sample_domain)
        theirs = adapter.transform(X, sample_domain=sample_domain, allow_source=True)[:n]
        ours = domain.coral(s, t, lam=lam) - t.mean(0)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6 * np.abs(theirs).max())
