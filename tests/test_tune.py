"""Index.tune / search(target_recall=): the chosen setting keeps its recall promise on fresh queries.

Small shapes (a few thousand rows): these check the mechanism — ground truth, exclude_self,
Wilson lower bound, cheapest-setting choice, persistence, errors.  The large-n figures (1M x 128,
500k x 32 KL) are a benchmark: benchmarks/results/ann-tune-cpu.md.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import tlfast
from tlfast import ann
from tlfast.bench.data import clustered, dirichlet_mixture, gaussian_mixture
from tlfast.bench.timing import wilson_interval

HAS_FAISS = importlib.util.find_spec("faiss") is not None
needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss-cpu is not installed (the faiss extra)")


def _fresh_recall(index, x, q, metric, k=10):
    exact = tlfast.knn(q, x, k, metric, backend="cpu").indices
    return float(ann.recall_per_query(index.search(q, k).indices, exact).mean())


@pytest.mark.parametrize("metric, kind, params, data", [
    pytest.param("cosine", "ivf", {}, "clustered", marks=needs_faiss),
    ("cosine", "ivf", {"engine": "tlfast"}, "clustered"),
    pytest.param("l2", "hnsw", {"M": 12}, "mixture", marks=needs_faiss),
    ("kl", "ivf", {}, "dirichlet"),
])
def test_tune_reaches_target_on_fresh_queries(metric, kind, params, data):
    gen = {"clustered": lambda n, s: clustered(n, 32, centres=60, seed=s),
           "mixture": lambda n, s: gaussian_mixture(n, 24, centres=40, seed=s),
           "dirichlet": lambda n, s: dirichlet_mixture(n, 16, centres=40, seed=s)}[data]
    x, q = gen(6000, 0), gen(400, 1)
    index = tlfast.Index(metric, kind=kind, **params).add(x)
    report = index.tune(0.9, sample=400)
    name = "ef_search" if kind == "hnsw" else "nprobe"
    assert report.queries_from == ("corpus neighbour steps x_i + x_a - x_b" if kind == "hnsw"
                                   else "corpus rows (exclude_self)")
    assert set(report.params) == {name} and report.reached
    value = report.params[name]
    # The lower confidence bound reached the target, and the previous (cheaper) setting did not.
    assert report.recall_ci[0] >= 0.9 and report.recall >= report.recall_ci[0]
    values = [c[0] for c in report.curve]
    assert values[-1] == value and values == sorted(values)
    assert all(c[2] < 0.9 for c in report.curve[:-1])
    # Stored: the index searches with it by default, and its params say so.
    assert getattr(index._ann, name) == value and index.params[name] == value
    assert _fresh_recall(index, x, q, metric) >= 0.87
    assert report.speedup > 0 and report.exact_qps > 0 and "recall@10" in str(report)


@needs_faiss
def test_hnsw_estimate_without_queries_matches_fresh_queries():
    """tune(queries=None) on a graph must not read recall off the graph's own nodes: a row is
    linked to its own neighbours, so searching from it overestimated recall at ef_search = k by
    ~0.04 here (0.988 vs 0.948 fresh).  The neighbour-step queries track fresh recall."""
    gen = lambda n, s: gaussian_mixture(n, 48, centres=40, seed=s)  # noqa: E731
    x, q = gen(8000, 0), gen(1000, 1)
    index = tlfast.Index("l2", kind="hnsw", M=16).add(x)
    report = index.tune(0.985, sample=1000)  # walks the ladder from ef_search = k = 10
    assert report.queries_from.startswith("corpus neighbour steps") and report.n_queries == 1000
    assert report.curve[0][0] == 10 and len(report.curve) >= 2
    exact = tlfast.knn(q, x, 10, "l2", backend="cpu").indices
    for ef, estimate, lower in report.curve:
        fresh = float(ann.recall_per_query(index.search(q, 10, ef_search=ef).indices, exact).mean())
        # 1000 queries each side: a difference of 0.02 is ~4 standard errors
        assert abs(estimate - fresh) <= 0.02, (ef, estimate, fresh)
        assert lower <= estimate


@needs_faiss
def test_hnsw_ladder_starts_at_k_and_stops_at_the_row_count():
    x = gaussian_mixture(600, 16, centres=10, seed=0)
    obj = tlfast.Index("l2", kind="hnsw").add(x)._ann
    for k in (1, 10, 37):
        ladder = obj.search_param_ladder(k)
        assert ladder[0] == k and ladder[-1] == 600 and ladder == sorted(set(ladder))
    assert obj.search_param_ladder(600) == [600]


@needs_faiss
def test_tuned_setting_is_saved_and_loaded(tmp_path):
    x = clustered(5000, 32, centres=50, seed=0)
    index = tlfast.Index("cosine", kind="ivf").add(x)
    nprobe = index.tune(0.95, sample=300).params["nprobe"]
    index.save(tmp_path / "ix")
    loaded = tlfast.Index.load(tmp_path / "ix")
    assert loaded._ann.nprobe == nprobe
    q = clustered(50, 32, centres=50, seed=3)
    np.testing.assert_array_equal(loaded.search(q, 5).indices, index.search(q, 5).indices)


def test_search_target_recall_one_off_and_given_queries():
    x, q = dirichlet_mixture(5000, 16, centres=40, seed=0), dirichlet_mixture(300, 16, centres=40, seed=1)
    index = tlfast.Index("kl", kind="ivf").add(x)
    before = index._ann.nprobe
    exact = tlfast.knn(q, x, 10, "kl", backend="cpu").indices
    res = index.search(q, 10, target_recall=0.97)
    assert ann.recall_per_query(res.indices, exact).mean() >= 0.94
    assert index._ann.nprobe == before  # a one-off: nothing stored
    # Tuning on the queries themselves (no exclude_self) measures recall on exactly those.
    report = index.tune(0.9, queries=q)
    assert report.queries_from == "given" and report.n_queries == 300
    found = index.search(q, 10).indices
    assert ann.recall_per_query(found, exact).mean() == pytest.approx(report.recall)
    # A flat index is exact: any target is met, no tuning involved.
    flat = tlfast.Index("kl").add(x)
    np.testing.assert_array_equal(flat.search(q, 10, target_recall=0.99).indices, exact)


def test_tune_errors():
    x = clustered(3000, 16, centres=30, seed=0)
    index = tlfast.Index("cosine", kind="ivf", engine="tlfast").add(x)
    for bad in (0, 1.5, -0.1, float("nan"), "0.9", True):
        with pytest.raises(ValueError, match="target_recall"):
            index.tune(bad)
    with pytest.raises(ValueError, match="not both"):
        index.search(x[:3], 5, target_recall=0.9, nprobe=3)
    with pytest.raises(ValueError, match="nothing to tune"):
        tlfast.Index("cosine").add(x).tune(0.9)
    with pytest.raises(ValueError, match="dimension mismatch"):
        index.tune(0.9, queries=np.ones((4, 3), dtype=np.float32))
    small = tlfast.Index("cosine", kind="ivf", engine="tlfast").add(x[:100])  # below auto-train size
    with pytest.raises(ValueError, match="not trained"):
        small.tune(0.9)


@needs_faiss
def test_ivfpq_cannot_be_tuned_and_stored_rows_are_the_vectors():
    x = clustered(4000, 32, centres=40, seed=0)
    pq = tlfast.Index("l2", kind="ivfpq", nlist=8, nbits=4).add(x[:1000])
    with pytest.raises(ValueError, match="compressed codes"):
        pq.tune(0.9)
    for kind in ("ivf", "hnsw"):
        ix = tlfast.Index("l2", kind=kind).add(x)
        np.testing.assert_array_equal(ix._ann.stored_rows(), x)
    cos = tlfast.Index("cosine", kind="ivf").add(x)
    np.testing.assert_allclose(cos._ann.stored_rows(), x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)


def test_wilson_interval_and_helpers():
    lo, hi = wilson_interval(95, 100, 0.95)
    assert lo == pytest.approx(0.8882, abs=2e-4) and hi == pytest.approx(0.9785, abs=2e-4)
    lo, hi = wilson_interval(100, 100, 0.95)
    assert hi == 1.0 and lo == pytest.approx(0.9630, abs=2e-4)
    assert wilson_interval(950, 1000)[0] > wilson_interval(95, 100)[0]  # more queries, tighter bound
    pos = np.array([[7, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(ann._drop_self(pos, np.array([7, 9]), 2), [[1, 2], [3, 4]])
    assert ann.recall_per_query(np.array([[1, -1]]), np.array([[1, 2]])).tolist() == [0.5]
    index = ann.make_index("ivf", "kl", 8, nlist=100)
    ladder = index.search_param_ladder(10)
    assert ladder[0] == 1 and ladder[-1] == 100 and ladder == sorted(set(ladder))
    assert all(b / a <= 2 for a, b in zip(ladder, ladder[1:]))
