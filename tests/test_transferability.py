"""tlfast.transferability against direct computations: LogME against the numerically maximised
Bayesian evidence, the other scores against tllib-form numpy ports, and rank_sources."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tlfast import transferability as tr
from transferability_numpy import (hscore_tllib, leep_naive, log_evidence, logme_tllib, nce_naive,
                                   regularized_hscore_tllib, transrate_tllib)

scipy_optimize = pytest.importorskip("scipy.optimize")


def _problem(n=83, d=7, classes=4, seed=0, informative=1.0):
    """Features with class structure of a given strength (odd sizes on purpose)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, d)) * informative
    return (centres[y] + rng.standard_normal((n, d))).astype(np.float64), y


def _max_evidence(f, target):
    """max over (α, β) of the direct log evidence, by Nelder-Mead then L-BFGS on (log α, log β)."""
    def neg(p):
        return -log_evidence(f, target, np.exp(p[0]), np.exp(p[1]))

    best = scipy_optimize.minimize(neg, [0.0, 0.0], method="Nelder-Mead",
                                   options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 5000})
    assert best.success, best.message
    polished = scipy_optimize.minimize(neg, best.x, method="L-BFGS-B")
    return -min(best.fun, polished.fun)


def test_log_evidence_formula_equals_the_gaussian_marginal():
    from scipy.stats import multivariate_normal

    f, y = _problem(n=30, d=5)
    t = (y == 1).astype(np.float64)
    alpha, beta = 0.7, 2.3
    cov = np.eye(30) / beta + f @ f.T / alpha
    assert log_evidence(f, t, alpha, beta) == pytest.approx(multivariate_normal(np.zeros(30), cov).logpdf(t),
                                                            rel=1e-12)


@pytest.mark.parametrize("n,d,classes,informative", [(83, 7, 4, 1.0), (40, 61, 3, 0.5), (200, 12, 2, 3.0), (300, 40, 3, 0.0)])
def test_logme_equals_the_numerically_maximised_evidence(n, d, classes, informative):
    f, y = _problem(n, d, classes, informative=informative)
    expected = np.mean([_max_evidence(f, (y == c).astype(np.float64)) for c in range(classes)]) / n
    assert tr.logme(f, y) == pytest.approx(expected, rel=1e-6)


def test_logme_regression_equals_the_maximised_evidence_per_target():
    rng = np.random.default_rng(5)
    f = rng.standard_normal((57, 9))
    targets = np.stack([f @ rng.standard_normal(9) + 0.3 * rng.standard_normal(57),
                        np.sin(f[:, 0]) + rng.standard_normal(57)], 1)
    expected = np.mean([_max_evidence(f, targets[:, j]) for j in range(2)]) / 57
    assert tr.logme(f, targets, regression=True) == pytest.approx(expected, rel=1e-6)
    single = _max_evidence(f, targets[:, 0]) / 57
    assert tr.logme(f, targets[:, 0], regression=True) == pytest.approx(single, rel=1e-6)


def test_logme_close_to_tllib_and_ranks_informative_features_higher():
    f, y = _problem(500, 16, 5, informative=2.0)
    ours = tr.logme(f, y)
    # tllib stops at a 1% change of α/β and adds 1e-5 to denominators: close, not equal.
    assert ours == pytest.approx(logme_tllib(f, y), rel=1e-3)
    weak, _ = _problem(500, 16, 5, seed=0, informative=0.2)
    assert tr.logme(weak, y) < ours


def test_logme_chunked_float32_and_torch_inputs(monkeypatch):
    f, y = _problem(1001, 13, 6)
    expected = tr.logme(f, y)
    monkeypatch.setattr(tr, "_CHUNK", 97)  # many chunks, a ragged last one
    assert tr.logme(f, y) == pytest.approx(expected, rel=1e-12)
    assert tr.logme(f.astype(np.float32), y) == pytest.approx(expected, rel=1e-5)
    assert tr.logme(torch.from_numpy(f).float(), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-5)
    labels = np.array(list("abcdef"))[y]  # any label type: classes by np.unique
    assert tr.logme(f, labels) == pytest.approx(expected, rel=1e-12)


def test_hscore_matches_tllib_form():
    f, y = _problem(300, 10, 4)
    assert tr.hscore(f, y) == pytest.approx(hscore_tllib(f, y), rel=1e-8)
    assert tr.hscore(f, y, shrinkage=True) == pytest.approx(regularized_hscore_tllib(f, y), rel=1e-8)


def test_regularised_hscore_stays_finite_when_d_exceeds_n(monkeypatch):
    f, y = _problem(30, 80, 3)
    monkeypatch.setattr(tr, "_CHUNK", 7)
    assert tr.hscore(f, y, shrinkage=True) == pytest.approx(regularized_hscore_tllib(f, y), rel=1e-8)


def test_transrate_matches_tllib_form(monkeypatch):
    f, y = _problem(250, 9, 5)
    monkeypatch.setattr(tr, "_CHUNK", 31)
    assert tr.transrate(f, y) == pytest.approx(transrate_tllib(f, y), rel=1e-8)
    assert tr.transrate(f, y, eps=0.1) == pytest.approx(transrate_tllib(f, y, eps=0.1), rel=1e-8)


def test_nce_and_leep_match_naive_counting():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((211, 6)) * 2
    theta = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = (theta.argmax(1) + (rng.random(211) < 0.3) * rng.integers(0, 4, 211)) % 4
    assert tr.leep(theta, y) == pytest.approx(leep_naive(theta, y), rel=1e-10)
    assert tr.nce(theta, y) == pytest.approx(nce_naive(theta.argmax(1), y), rel=1e-10)
    assert tr.nce(theta.argmax(1), y) == tr.nce(theta, y)
    # A source model whose labels determine the target's perfectly: NCE = 0, its maximum.
    assert tr.nce(y, y) == 0.0
    assert tr.leep(torch.from_numpy(theta), torch.from_numpy(y)) == pytest.approx(leep_naive(theta, y), rel=1e-10)


def test_errors_name_the_argument():
    f, y = _problem()
    with pytest.raises(ValueError, match="83 rows"):
        tr.logme(f, y[:-1])
    with pytest.raises(ValueError, match="single class"):
        tr.logme(f, np.zeros(83))
    with pytest.raises(ValueError, match="2-D"):
        tr.hscore(f[:, 0], y)
    with pytest.raises(TypeError, match="floating"):
        tr.logme(f.astype(np.int64), y)
    bad = f.copy()
    bad[50, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tr.logme(bad, y)
    with pytest.raises(ValueError, match="sum to 1"):
        tr.leep(np.ones((83, 3)), y)
    with pytest.raises(ValueError, match="eps"):
        tr.transrate(f, y, eps=0)
    with pytest.raises(ValueError, match="regression|y must"):
        tr.logme(f, np.ones((82, 2)), regression=True)


def test_centred_scores_keep_precision_on_large_mean_float32_features():
    f, y = _problem(400, 12, 4)
    shifted = (f + 50.0).astype(np.float32)  # post-ReLU-like: the mean dominates the second moment
    ref = shifted.astype(np.float64)
    assert tr.hscore(shifted, y) == pytest.approx(hscore_tllib(ref, y), rel=1e-4)
    assert tr.hscore(shifted, y, shrinkage=True) == pytest.approx(regularized_hscore_tllib(ref, y), rel=1e-4)
    few = shifted[:60]  # classes with fewer rows than... a coding rate that needs PSD Gram matrices
    assert tr.transrate(few, y[:60]) == pytest.approx(transrate_tllib(few.astype(np.float64), y[:60]), rel=1e-4)


def _tiny_extractor():
    """A fixed random conv net as an Extractor over uint8 images (no weights to download)."""
    import tlfast

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    return tlfast.Extractor.from_module(net, normalize=False, name="tinyconv")


def test_rank_sources_standardize_scores_the_z_scored_features():
    import tlfast

    f, y = _problem(300, 10, 3, informative=2.0)
    stretched = f * np.array([1e3] + [1.0] * 9) + 50.0  # one column on another scale, all shifted
    z = (f - f.mean(0)) / f.std(0)
    table = tlfast.rank_sources({"f": f, "stretched": stretched}, y=y, standardize=True)
    scores = {r.name: r.score for r in table}
    # Per-column standardisation makes the score blind to each feature's scale and offset ...
    assert scores["f"] == pytest.approx(scores["stretched"], rel=1e-6)
    assert scores["f"] == pytest.approx(tr.logme(z, y), rel=1e-6)
    # ... which LogME of the features as given is not (its prior on the weights is isotropic).
    assert tr.logme(stretched, y) != pytest.approx(tr.logme(f, y), rel=1e-3)
    const = np.concatenate([f, np.ones((300, 1))], 1)  # a constant column stays finite
    assert np.isfinite(tlfast.rank_sources({"c": const}, y=y, standardize=True)[0].score)


def test_rank_sources_sorts_best_first_and_extracts_only_the_sample():
    import tlfast

    f, y = _problem(300, 10, 3, informative=2.0)
    noise = np.random.default_rng(9).standard_normal((300, 10))
    images = np.random.default_rng(1).integers(0, 255, (300, 6, 6, 3), dtype=np.uint8)
    ex = _tiny_extractor()
    calls = []
    real_extract = ex.extract
    ex.extract = lambda data, **kw: calls.append(len(data)) or real_extract(data, **kw)
    table = tlfast.rank_sources({"noise": noise, "good": torch.from_numpy(f), "tinyconv": ex}, images, y,
                                sample=120)
    assert [r.name for r in table][0] == "good" and len(table) == 3
    assert [r.score for r in table] == sorted((r.score for r in table), reverse=True)
    assert {r.name: r.dims for r in table} == {"noise": 10, "good": 10, "tinyconv": 8}
    assert calls == [120] and all(r.seconds >= 0 for r in table)
    # The sample is the same rows for every candidate: scores equal scoring those rows directly.
    rows = np.sort(np.random.default_rng(0).choice(300, 120, replace=False))
    good = next(r for r in table if r.name == "good")
    assert good.score == pytest.approx(tr.logme(f[rows], y[rows]), rel=1e-9)
    by_hscore = tlfast.rank_sources({"noise": noise, "good": f}, y=y, metric="hscore_shrinkage")
    assert by_hscore[0].name == "good"
    with pytest.raises(ValueError, match="metric"):
        tlfast.rank_sources({"a": f}, y=y, metric="leep")
    with pytest.raises(ValueError, match="pass the inputs"):
        tlfast.rank_sources([ex], None, y)
    with pytest.raises(ValueError, match="rows"):
        tlfast.rank_sources({"a": f[:10]}, y=y)
    with pytest.raises(TypeError, match="mapping"):
        tlfast.rank_sources([f], y=y)


def test_cli_rank(tmp_path, capsys):
    from tlfast.cli import main

    f, y = _problem(200, 8, 3, informative=2.0)
    np.save(tmp_path / "labels.npy", y)
    np.save(tmp_path / "good.npy", f.astype(np.float32))
    np.save(tmp_path / "noise.npy", np.random.default_rng(3).standard_normal((200, 8)).astype(np.float32))
    out = tmp_path / "rank.json"
    assert main(["rank", str(tmp_path / "labels.npy"), str(tmp_path / "noise.npy"),
                 f"best={tmp_path / 'good.npy'}", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 1 | best |" in printed and "| 2 | noise |" in printed
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["best", "noise"] and rows[0]["dims"] == 8
    assert main(["rank", str(tmp_path / "labels.npy"), "efficientnet_lite0"]) == 2
    assert "--data" in capsys.readouterr().err
    # --standardize: a column scaled by 1e4 does not change the standardised ranking or scores
    np.save(tmp_path / "good_scaled.npy", (f * np.r_[1e4, np.ones(7)]).astype(np.float32))
    std = tmp_path / "rank_std.json"
    assert main(["rank", str(tmp_path / "labels.npy"), f"best={tmp_path / 'good.npy'}",
                 f"scaled={tmp_path / 'good_scaled.npy'}", "--standardize", "-o", str(std)]) == 0
    scores = {r["name"]: r["score"] for r in json.loads(std.read_text())["rows"]}
    np.testing.assert_allclose(scores["scaled"], scores["best"], rtol=1e-4)


_native = pytest.mark.skipif(tr._C is None, reason="the compiled extension is not built")


@_native
@pytest.mark.parametrize("n,d", [(1, 1), (3, 2), (255, 23), (256, 24), (257, 25), (511, 47), (512, 48), (513, 49), (1100, 97), (700, 130)])
def test_native_gram_equals_the_float64_product(n, d):
    """tlfast's Gram kernel (used for float32 rows on CPU): the upper triangle of AᵀA, summed in
    float64 over float32 slices, added to what g holds; tiles wholly below the diagonal untouched."""
    rng = np.random.default_rng(n + d)
    a = rng.standard_normal((n, d)).astype(np.float32)
    a[0] *= 1e3  # one dominant row
    ref = a.astype(np.float64).T @ a.astype(np.float64)
    mag = np.abs(a.astype(np.float64)).T @ np.abs(a.astype(np.float64))
    g = np.full((d, d), 7.0)
    tr._C.gram_upper_add_cpu(a, g, 2)
    upper = np.triu_indices(d)
    # float32 sums over at most 512 rows: |error| <= 513 u sum |a_ti a_tj| (u = 2^-24), then float64
    bound = 513 * 2.0 ** -24 * mag + 1e-12
    np.testing.assert_array_less(np.abs(g[upper] - 7.0 - ref[upper]), bound[upper])
    lower = np.tril_indices(d, -1)
    below = g[lower]
    touched = below != 7.0  # only tiles across the diagonal, with the true value
    np.testing.assert_array_less(np.abs(below[touched] - 7.0 - ref[lower][touched]), bound[lower][touched])
    if d >= 48:
        assert not touched[lower[0] - lower[1] > 48].any()


@_native
@pytest.mark.parametrize("n,d", [(300, 23), (1100, 97), (2600, 50)])
def test_native_gram_subtracts_the_shift(n, d):
    """With a shift row s the kernel adds (a - s)ᵀ(a - s), s subtracted in float32 as the rows are
    packed (what ``c - a`` gives the torch path): here a large mean, as post-ReLU features have."""
    rng = np.random.default_rng(n)
    a = (rng.standard_normal((n, d)) + 40.0).astype(np.float32)
    shift = a[:100].mean(0).astype(np.float32)
    b = (a - shift).astype(np.float64)
    ref = b.T @ b
    mag = np.abs(b).T @ np.abs(b)
    g = np.zeros((d, d))
    tr._C.gram_upper_add_cpu(a, g, 2, shift)
    upper = np.triu_indices(d)
    np.testing.assert_array_less(np.abs(g[upper] - ref[upper]), (513 * 2.0 ** -24 * mag + 1e-12)[upper])
    plain = np.zeros((d, d))
    tr._C.gram_upper_add_cpu(a, plain, 2, None)
    assert np.abs(plain[upper] - g[upper]).max() > 1e3  # the shift did something


@_native
def test_native_whole_gram_equals_the_chunked_torch_path(monkeypatch):
    """logme and the centred scores take one kernel call over all the rows (with the shift for the
    centred ones); the torch path, chunk by chunk, gives the same scores."""
    f, y = _problem(3000, 45, 5)
    f32 = (f + 5.0).astype(np.float32)
    monkeypatch.setattr(tr, "_CHUNK", 700)
    native = (tr.logme(f32, y), tr.hscore(f32, y), tr.hscore(f32, y, shrinkage=True))
    monkeypatch.setattr(tr, "_KERNEL_SUMS_BYTES", 0)  # the class sums by index_add, the Gram still native
    index_add = (tr.logme(f32, y), tr.hscore(f32, y), tr.hscore(f32, y, shrinkage=True))
    monkeypatch.setattr(tr, "_native_gram", lambda c: False)
    torch_path = (tr.logme(f32, y), tr.hscore(f32, y), tr.hscore(f32, y, shrinkage=True))
    np.testing.assert_allclose(native, torch_path, rtol=1e-6)
    np.testing.assert_allclose(index_add, torch_path, rtol=1e-6)


@_native
@pytest.mark.parametrize("n,d,classes", [(1, 3, 1), (700, 23, 5), (20000, 9, 3)])
def test_native_gram_class_sums(n, d, classes):
    """The kernel's class sums (taken from the rows as it packs them, float32 per thread over at most
    8192 rows, then float64) against float64 numpy, with and without the shift, added to what the
    sums held."""
    rng = np.random.default_rng(n + d)
    a = (rng.standard_normal((n, d)) + 2.0).astype(np.float32)
    codes = rng.integers(0, classes, n).astype(np.int64)
    for shift in (None, a[:50].mean(0).astype(np.float32)):
        b = (a if shift is None else a - shift).astype(np.float64)
        ref = np.zeros((classes, d))
        np.add.at(ref, codes, b)
        mag = np.zeros((classes, d))
        np.add.at(mag, codes, np.abs(b))
        sums = np.full((classes, d), 0.5)
        g = np.zeros((d, d))
        tr._C.gram_upper_add_cpu(a, g, 2, shift, codes, sums)
        np.testing.assert_array_less(np.abs(sums - 0.5 - ref), min(n, 8192) * 2.0 ** -24 * mag + 1e-12)
        upper = np.triu_indices(d)
        bound = 513 * 2.0 ** -24 * (np.abs(b).T @ np.abs(b)) + 1e-12
        np.testing.assert_array_less(np.abs(g - b.T @ b)[upper], bound[upper])


@_native
def test_native_gram_rejects_bad_arguments():
    a = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match="a must be a float32"):
        tr._C.gram_upper_add_cpu(a.astype(np.float64), np.zeros((3, 3)), 1)
    with pytest.raises(TypeError, match="g must be a float64"):
        tr._C.gram_upper_add_cpu(a, np.zeros((3, 3), np.float32), 1)
    with pytest.raises(ValueError, match="g must have shape"):
        tr._C.gram_upper_add_cpu(a, np.zeros((4, 4)), 1)
    with pytest.raises(ValueError, match="g must be C-contiguous"):
        tr._C.gram_upper_add_cpu(a, np.zeros((3, 6))[:, ::2], 1)
    frozen = np.zeros((3, 3))
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        tr._C.gram_upper_add_cpu(a, frozen, 1)
    with pytest.raises(ValueError, match="threads"):
        tr._C.gram_upper_add_cpu(a, np.zeros((3, 3)), 0)
    with pytest.raises(TypeError, match="shift must be a float32"):
        tr._C.gram_upper_add_cpu(a, np.zeros((3, 3)), 1, np.zeros(3))
    with pytest.raises(TypeError, match="shift must be None or a float32 array"):
        tr._C.gram_upper_add_cpu(a, np.zeros((3, 3)), 1, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="shift must have shape"):
        tr._C.gram_upper_add_cpu(a, np.zeros((3, 3)), 1, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="shift must be C-contiguous"):
        tr._C.gram_upper_add_cpu(a, np.zeros((3, 3)), 1, np.zeros(6, np.float32)[::2])
    g, codes, sums = np.zeros((3, 3)), np.zeros(4, np.int64), np.zeros((2, 3))
    with pytest.raises(ValueError, match="codes and sums must be given together"):
        tr._C.gram_upper_add_cpu(a, g, 1, None, codes, None)
    with pytest.raises(TypeError, match="codes must be an int64"):
        tr._C.gram_upper_add_cpu(a, g, 1, None, codes.astype(np.int32), sums)
    with pytest.raises(ValueError, match="codes must have shape"):
        tr._C.gram_upper_add_cpu(a, g, 1, None, np.zeros(5, np.int64), sums)
    with pytest.raises(TypeError, match="sums must be a float64"):
        tr._C.gram_upper_add_cpu(a, g, 1, None, codes, sums.astype(np.float32))
    with pytest.raises(ValueError, match="sums must have shape"):
        tr._C.gram_upper_add_cpu(a, g, 1, None, codes, np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, classes\)"):
        tr._C.gram_upper_add_cpu(a, g, 1, None, np.array([0, 1, 2, 0], np.int64), sums)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, classes\)"):
        tr._C.gram_upper_add_cpu(a, g, 1, None, np.array([0, -1, 1, 0], np.int64), sums)


@_native
def test_logme_native_gram_equals_the_torch_path(monkeypatch):
    """float32 rows on CPU take the native kernel; the torch GEMM path (float64 input, or no
    extension) gives the same statistics, and NaN rows are still reported with their chunk."""
    f, y = _problem(2000, 61, 7)
    f32 = f.astype(np.float32)
    native = tr.logme(f32, y)
    monkeypatch.setattr(tr, "_native_gram", lambda c: False)
    torch_path = tr.logme(f32, y)
    assert native == pytest.approx(torch_path, rel=1e-6)
    assert native == pytest.approx(tr.logme(f32.astype(np.float64), y), rel=1e-5)
    monkeypatch.undo()
    monkeypatch.setattr(tr, "_CHUNK", 300)
    bad = f32.copy()
    bad[1234, 5] = np.nan
    with pytest.raises(ValueError, match=r"rows 1200\.\.1499"):
        tr.logme(bad, y)


def _tridiagonal(d, seed, indefinite=False):
    """A random symmetric tridiagonal matrix, positive definite unless ``indefinite``."""
    rng = np.random.default_rng(seed)
    off = rng.standard_normal(max(d - 1, 0))
    diag = rng.random(d) * 3 + 2 * np.abs(np.concatenate([[0], off])) + 2 * np.abs(np.concatenate([off, [0]]))
    if indefinite:
        diag[d // 2] -= 1e3
    return diag, off


@_native
@pytest.mark.parametrize("d,cols", [(1, 1), (2, 3), (17, 64), (97, 65), (250, 130)])
def test_tridiagonal_resolvent_forms_equal_the_dense_solves(d, cols):
    """q1 = uᵀA⁻¹u, q2 = ‖A⁻¹u‖², q3 = (A⁻¹u)ᵀA⁻¹(A⁻¹u), A = T + λ_j I, per column (blocks of 64
    columns: 64 and 65 and 130 cross them), against numpy's dense solves."""
    diag, off = _tridiagonal(d, seed=d)
    rng = np.random.default_rng(cols)
    u = rng.standard_normal((d, cols))
    lam = np.logspace(-3, 3, cols)
    q1, q2, q3 = tr._C.tridiag_resolvent_forms_cpu(diag, off, u, lam)
    t = np.diag(diag) + np.diag(off, 1) + np.diag(off, -1)
    for j in range(cols):
        a = t + lam[j] * np.eye(d)
        x = np.linalg.solve(a, u[:, j])
        np.testing.assert_allclose([q1[j], q2[j], q3[j]], [u[:, j] @ x, x @ x, x @ np.linalg.solve(a, x)],
                                   rtol=1e-11)
    only, none2, none3 = tr._C.tridiag_resolvent_forms_cpu(diag, off, u, lam, more=False)
    assert none2 is None and none3 is None
    np.testing.assert_array_equal(only, q1)


@_native
def test_tridiagonal_resolvent_forms_refuse_what_is_not_positive_definite():
    diag, off = _tridiagonal(40, seed=1, indefinite=True)
    u = np.ones((40, 3))
    assert tr._C.tridiag_resolvent_forms_cpu(diag, off, u, np.array([1.0, 2.0, 3.0])) is None
    # ... shifted past its lowest eigenvalue, it is definite again
    low = np.linalg.eigvalsh(np.diag(diag) + np.diag(off, 1) + np.diag(off, -1))[0]
    assert tr._C.tridiag_resolvent_forms_cpu(diag, off, u, np.full(3, 1 - low)) is not None
    diag, off = _tridiagonal(40, seed=1)
    assert tr._C.tridiag_resolvent_forms_cpu(diag, off, u, np.array([1.0, np.nan, 3.0])) is None
    assert tr._C.tridiag_resolvent_forms_cpu(diag, off, u, np.array([1.0, 0.0, -np.inf])) is None


@_native
def test_tridiagonal_resolvent_forms_reject_bad_arguments():
    diag, off = _tridiagonal(5, seed=0)
    u, lam = np.ones((5, 2)), np.ones(2)
    f = tr._C.tridiag_resolvent_forms_cpu
    with pytest.raises(TypeError, match="diag must be a float64"):
        f(diag.astype(np.float32), off, u, lam)
    with pytest.raises(ValueError, match="off must have shape"):
        f(diag, off[:-1], u, lam)
    with pytest.raises(ValueError, match="u must have shape"):
        f(diag, off, np.ones((4, 2)), lam)
    with pytest.raises(ValueError, match="u must be 2-D"):
        f(diag, off, np.ones(5), lam)
    with pytest.raises(ValueError, match="u must be C-contiguous"):
        f(diag, off, np.ones((2, 5)).T, lam)
    with pytest.raises(ValueError, match="lam must have shape"):
        f(diag, off, u, np.ones(3))
    with pytest.raises(ValueError, match="diag must not be empty"):
        f(np.ones(0), np.ones(0), np.ones((0, 2)), lam)


def _logme_both_ways(f, y, regression=False):
    """(the tridiagonal-form evidence per column, the eigenbasis one, the forms used by default)."""
    f = torch.as_tensor(f)
    if regression:
        mom = tr._moments(f, None, 0, targets=tr._targets(y, f.shape[0], f.device))
    else:
        codes, classes = tr._labels(y, f.shape[0], f.device)
        mom = tr._moments(f, codes, classes)
    default = tr._resolvent_forms(mom.gram, mom.cross)
    eig = tr._resolvent_forms(mom.gram, mom.cross, tridiagonal=False)
    assert isinstance(eig, tr._EigenForms)
    return (tr._maximise_evidence(mom, default, 1000, 1e-12)[0], tr._maximise_evidence(mom, eig, 1000, 1e-12)[0],
            default)


@_native
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_logme_tridiagonal_form_equals_the_eigenbasis(scale):
    """Full-rank features take the LDLᵀ recurrences in T; every column's evidence equals the eigenbasis
    form's to rounding, on classes and on regression targets, with feature scales spread 1:scale."""
    f, y = _problem(900, 45, 6, seed=3)
    f *= np.logspace(0, np.log10(scale), 45)
    tri, eig, forms = _logme_both_ways(f, y)
    assert isinstance(forms, tr._TridiagonalForms)
    np.testing.assert_allclose(tri.numpy(), eig.numpy(), rtol=1e-11)
    rng = np.random.default_rng(0)
    targets = np.stack([f @ rng.standard_normal(45) + rng.standard_normal(900), f[:, 0] ** 2], 1)
    tri, eig, forms = _logme_both_ways(f, targets, regression=True)
    assert isinstance(forms, tr._TridiagonalForms)
    np.testing.assert_allclose(tri.numpy(), eig.numpy(), rtol=1e-11)


@_native
def test_logme_takes_the_eigenbasis_where_some_direction_is_null():
    """d > n, or a duplicated feature, leaves eigenvalues at the null threshold, whose directions the
    eigenbasis form zeroes: those features keep it."""
    f, y = _problem(40, 61, 3)
    assert isinstance(_logme_both_ways(f, y)[2], tr._EigenForms)
    f, y = _problem(300, 12, 3)
    f[:, 5] = f[:, 2]
    tri, eig, forms = _logme_both_ways(f, y)
    assert isinstance(forms, tr._EigenForms)
    np.testing.assert_array_equal(tri.numpy(), eig.numpy())


@_native
def test_logme_falls_back_to_the_eigenbasis_when_a_shifted_T_is_not_definite(monkeypatch):
    """Should rounding leave some T + λI indefinite mid-maximisation, the whole maximisation reruns
    in the eigenbasis (here forced by a kernel that refuses every call after the first few)."""
    f, y = _problem(500, 20, 4, seed=2)
    expected = tr.logme(f, y)
    real, calls = tr._C, {"n": 0}

    class Refusing:
        def __getattr__(self, name):
            return getattr(real, name)

        def tridiag_resolvent_forms_cpu(self, *args):
            calls["n"] += 1
            return real.tridiag_resolvent_forms_cpu(*args) if calls["n"] < 5 else None

    monkeypatch.setattr(tr, "_C", Refusing())
    assert tr.logme(f, y) == pytest.approx(expected, rel=1e-12)
    assert calls["n"] >= 5


def _separable(n, d, classes, sep, seed=0):
    """float32 features whose class centres are ``sep`` times the within-class noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return ((rng.standard_normal((classes, d)) * sep)[y] + rng.standard_normal((n, d))).astype(np.float32), y


@pytest.mark.parametrize("sep,offset", [(1.0, 0.0), (5.0, 0.0), (1.0, 50.0), (5.0, 50.0)])
def test_logme_float32_statistics_stay_within_their_error_class(sep, offset, monkeypatch):
    """Below _FLOAT32_KAPPA the float32 products stand: evidence / n within κ·2^-24 of the float64 one,
    also for features with a large common offset (the products are of the shifted rows: unshifted,
    an offset of 50 had put the error at 2.3e-4 with κ = 30)."""
    f, y = _separable(6000, 96, 6, sep)
    f += np.float32(offset)
    precise = []
    real = tr._moments
    monkeypatch.setattr(tr, "_moments", lambda *a, **k: precise.append(k.get("precise", False)) or real(*a, **k))
    ours = tr.logme(f, y)
    assert precise == [False]
    codes, classes = tr._labels(y, f.shape[0], torch.device("cpu"))
    exact, kappa = tr._logme_evidence(real(torch.from_numpy(f), codes, classes, precise=True), 1000, 1e-12)
    assert float(kappa.max()) <= tr._FLOAT32_KAPPA
    assert abs(ours - float(exact.mean())) <= float(kappa.max()) * 2.0 ** -24


def test_logme_recomputes_in_float64_where_the_fit_cancels_past_float32():
    """Nearly separable classes, and regression targets with little noise, cancel ‖y‖² - Σ z²/(s + λ)
    past float32's digits (errors of 1e-3 to 1 in evidence / n, measured): LogME then takes the
    statistics in float64 and equals the float64 features' score."""
    f, y = _separable(8000, 64, 5, sep=200.0)
    assert tr.logme(f, y) == pytest.approx(tr.logme(f.astype(np.float64), y), rel=1e-12)
    rng = np.random.default_rng(1)
    g = rng.standard_normal((8000, 64)).astype(np.float32)
    for noise in (1e-1, 1e-3):
        t = g.astype(np.float64) @ rng.standard_normal(64) + noise * rng.standard_normal(8000)
        assert tr.logme(g, t, regression=True) == pytest.approx(tr.logme(g.astype(np.float64), t, regression=True),
                                                               rel=1e-12)


def test_logme_regression_targets_are_not_rounded_to_float32():
    """κ ~ 300 (no float64 pass): the cross products with float64 targets are float64, so float32
    features give the float64 score to the Gram's float32 error, not the targets' rounding (which
    was 1.1e-5 relative here)."""
    rng = np.random.default_rng(2)
    g = rng.standard_normal((8000, 64)).astype(np.float32)
    t = g.astype(np.float64) @ rng.standard_normal(64) + rng.standard_normal(8000)
    assert tr.logme(g, t, regression=True) == pytest.approx(tr.logme(g.astype(np.float64), t, regression=True),
                                                           rel=2e-6)


def test_logme_refuses_a_target_the_features_fit_exactly():
    """No noise: the evidence grows without bound as β -> ∞, and what float64 gives is rounding - an
    error naming y, not a number (it was NaN)."""
    rng = np.random.default_rng(3)
    f = rng.standard_normal((500, 12))
    with pytest.raises(ValueError, match=r"y: target column 1 is fitted by the features to within float64"):
        tr.logme(f, np.stack([rng.standard_normal(500), f @ rng.standard_normal(12)], 1), regression=True)
    with pytest.raises(ValueError, match=r"y: target column 0 is fitted"):
        tr.logme(f.astype(np.float32), f.astype(np.float32).astype(np.float64) @ rng.standard_normal(12),
                 regression=True)
    # A class whose indicator the features reproduce exactly (one feature is that indicator, and
    # the classes are otherwise noise): named by its label.
    labels = np.array(["cat", "dog", "eel"])[rng.integers(0, 3, 500)]
    g = np.concatenate([f, (labels == "dog")[:, None].astype(np.float64)], 1)
    with pytest.raises(ValueError, match=r"y: class 'dog' is fitted"):
        tr.logme(g, labels)


@pytest.mark.parametrize("sep", [200.0, 1000.0])
def test_transrate_float32_keeps_the_spread_within_classes_far_apart(sep):
    """Class centres far apart (and a large common mean): the float32 products see only each class's
    spread about its own mean, so the score equals the float64 one (rows centred by the global mean
    were 1% off at 200 and not positive definite at 1000)."""
    f, y = _separable(5000, 64, 5, sep)
    f += 50
    assert tr.transrate(f, y) == pytest.approx(tr.transrate(f.astype(np.float64), y), rel=1e-7)


def test_logdet_coding_takes_rounding_negative_eigenvalues_as_zero():
    gram = torch.tensor([[4.0, 0.0], [0.0, -1e-3]], dtype=torch.float64)
    assert float(tr._logdet_coding(gram, 1e4)) == pytest.approx(np.log1p(4e4), rel=1e-12)
    spd = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    assert float(tr._logdet_coding(spd, 3.0)) == pytest.approx(np.linalg.slogdet(np.eye(2) + 3 * spd.numpy())[1],
                                                               rel=1e-12)
