"""`tlfast bench` as a product: timing, the schema, reports, compare, and the suites on tiny shapes.

Speed is never asserted here (benchmarks show it); these check that the numbers are measured and
recorded as promised: warm-ups run, samples are kept, ratios name their peer, a slowed run is
flagged by `compare`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import tlfast
from tlfast.bench import compare, report, schema, timing
from tlfast.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def test_measure_warms_up_and_keeps_every_sample():
    calls = []
    s = timing.measure(lambda: calls.append(time.perf_counter()), repeats=6, warmup=2)
    assert len(calls) == 8 and len(s.seconds) == 6 and s.warmup == 2 and s.threads >= 1
    summary = s.summary()
    assert summary["samples_s"] == s.seconds and summary["runs"] == 6
    assert summary["min_s"] <= summary["median_s"] <= summary["p99_s"] <= summary["p99_9_s"]
    with pytest.raises(ValueError, match="repeats"):
        timing.measure(lambda: None, repeats=0)


def test_interleaved_rounds_alternate_contenders():
    order = []
    out = timing.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert [len(out[n].seconds) for n in "ab"] == [3, 3]


def test_concurrent_latency_counts_calls_and_raises_errors():
    seen = []
    s, per_s = timing.concurrent_latency(lambda i: (seen.append(i), time.sleep(0.001)), callers=3,
                                         calls_per_caller=5, warmup=2)
    assert len(s.seconds) == 15 and sorted(seen[2:]) == list(range(15)) and per_s > 0
    assert min(s.seconds) >= 0.001 and s.extra["callers"] == 3

    def boom(i):
        raise RuntimeError("caller failed")

    with pytest.raises(RuntimeError, match="caller failed"):
        timing.concurrent_latency(boom, callers=2, calls_per_caller=2, warmup=0)


def _knn_args(out, *extra):
    return ["bench", "knn", "--n", "3000", "--nq", "64", "--d", "24", "-k", "5", "--rounds", "5",
            "--contenders", "tlfast,torch-mm-topk", "--quick", "--out", str(out), *extra]


def test_knn_suite_writes_schema_markdown_png_and_compare_flags_a_slowed_run(tmp_path, monkeypatch, capsys):
    assert main(_knn_args(tmp_path / "base")) == 0
    doc = schema.load(tmp_path / "base" / "knn.json")
    assert doc["schema"] == schema.SCHEMA and doc["software"]["tlfast"] and doc["software"]["torch"]
    m = doc["machine"]
    assert m["cpu_model"] and isinstance(m["isa_flags"], list) and m["threads"] >= 1 and "load_avg_end" in m
    ours = next(r for r in doc["cases"] if r["contender"] == "tlfast")
    peer = next(r for r in doc["cases"] if r["peer_of"] == "tlfast")
    assert peer["contender"].startswith("torch mm + topk") and len(ours["samples_s"]) == 5
    assert ours["params"] == {"metric": "cosine", "nq": 64, "n": 3000, "d": 24, "k": 5, "dtype": "float32",
                              "data": "normal"}
    md = (tmp_path / "base" / "knn.md").read_text()
    assert "tlfast is" in md and "than torch mm + topk (float32)" in md and m["cpu_model"] in md
    assert (tmp_path / "base" / "knn.png").read_bytes()[:8] == PNG

    assert main(["bench", "compare", str(tmp_path / "base" / "knn.json"), str(tmp_path / "base" / "knn.json")]) == 0
    assert "0 regression(s)" in capsys.readouterr().out
    # A deliberately slowed tlfast: every search sleeps 50 ms longer.
    real = tlfast.knn
    monkeypatch.setattr(tlfast, "knn", lambda *a, **kw: (time.sleep(0.05), real(*a, **kw))[1])
    assert main(_knn_args(tmp_path / "slow")) == 0
    monkeypatch.setattr(tlfast, "knn", real)
    capsys.readouterr()
    assert main(["bench", "compare", str(tmp_path / "base" / "knn.json"), str(tmp_path / "slow" / "knn.json")]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "| tlfast |" in ln)
    assert "REGRESSION" in line and "0 regression(s)" not in out  # (the peer may also move with load)
    # Past a large threshold it is let through.
    assert main(["bench", "compare", str(tmp_path / "base" / "knn.json"), str(tmp_path / "slow" / "knn.json"),
                 "--threshold", "1000"]) == 0


def test_knn_suite_on_user_files_and_bfloat16(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "q.npy", rng.standard_normal((20, 16)).astype(np.float32))
    np.save(tmp_path / "c.npy", rng.standard_normal((500, 16)).astype(np.float32))
    corpus_arg = tmp_path / "c.npy"
    assert main(["bench", "knn", "--queries", str(tmp_path / "q.npy"), "--corpus", str(corpus_arg), "--dtype", "bf16",
                 "--rounds", "2", "--contenders", "tlfast,torch-mm-topk", "--quick", "--out", str(tmp_path / "o")]) == 0
    doc = schema.load(tmp_path / "o" / "knn.json")
    assert {r["params"]["dtype"] for r in doc["cases"]} == {"bfloat16"}
    assert doc["cases"][0]["params"]["data"] == "user files" and doc["cases"][0]["params"]["n"] == 500


def test_latency_suite_reports_percentiles_per_kind_and_callers(tmp_path):
    assert main(["bench", "latency", "--n", "3000", "--d", "16", "--kinds", "flat,flat-out-of-core,ivf",
                 "--batch", "1,4", "--callers", "1,2", "--calls", "16", "--no-text", "--out", str(tmp_path)]) == 0
    doc = schema.load(tmp_path / "latency.json")
    got = {(r["params"]["kind"], r["params"]["batch"], r["params"]["callers"]) for r in doc["cases"]}
    assert got == {(k, b, c) for k in ("flat", "flat-out-of-core", "ivf") for b in (1, 4) for c in (1, 2)}
    for r in doc["cases"]:
        assert r["median_s"] <= r["p90_s"] <= r["p99_s"] <= r["p99_9_s"] and r["metrics"]["throughput_per_s"] > 0
        assert len(r["samples_s"]) == 16
    ivf = next(r for r in doc["cases"] if r["params"]["kind"] == "ivf")
    assert "nprobe" in ivf["params"]  # the latency of the setting tuned to recall 0.95
    assert "p99.9" in (tmp_path / "latency.md").read_text() and (tmp_path / "latency.png").read_bytes()[:8] == PNG


def test_tune_suite_table_and_recall_qps_chart(tmp_path):
    assert main(["bench", "tune", "--families", "dirichlet-kl", "--n", "3000", "--nq", "100", "--rounds", "1",
                 "--out", str(tmp_path)]) == 0
    doc = schema.load(tmp_path / "tune.json")
    tuned = [r for r in doc["cases"] if r["case"] == "tune/dirichlet-kl" and not r["peer_of"]]
    # tuned twice on one build: from the corpus alone, and on a held-out set disjoint from the fresh queries
    assert [r["metrics"]["tuned_on"] for r in tuned] == ["corpus", "held-out queries"]
    assert tuned[0]["metrics"]["tune_queries_from"] == "corpus rows (exclude_self)"
    assert tuned[1]["metrics"]["tune_queries_from"] == "given" and tuned[1]["metrics"]["tune_queries"] == 1000
    for r in tuned:
        assert r["metrics"]["tuned"]["nprobe"] >= 1 and 0 < r["metrics"]["recall_at_k"] <= 1
    assert any(r["case"] == "sweep/dirichlet-kl" for r in doc["cases"])
    assert "fresh-query recall" in (tmp_path / "tune.md").read_text()
    assert (tmp_path / "tune.png").read_bytes()[:8] == PNG


def test_schema_and_compare_reject_bad_files(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="not a tlfast bench result"):
        schema.load(tmp_path / "x.json")
    a = schema.new_result("knn", [])
    a["cases"] = [schema.case_row("c", "tlfast", {"n": 1}, samples=timing.Samples([1.0, 1.1], 1, 1, (0, 0, 0), (0, 0, 0)))]
    b = json.loads(json.dumps(a))
    b["suite"] = "latency"
    for name, doc in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="one suite"):
        compare.compare_files(tmp_path / "a.json", tmp_path / "b.json")
    with pytest.raises(ValueError, match="threshold"):
        compare.compare(a, a, threshold=-1)
    # A noisy sample does not fail a build: the new run's fastest quarter must be slower too.
    c = json.loads(json.dumps(a))
    c["cases"][0].update(median_s=1.5, samples_s=[0.9, 1.0, 1.5, 2.0, 2.1])
    rows, _ = compare.compare(a, c, threshold=0.1)
    assert rows[0]["verdict"] == "same"
    assert "|" in report.markdown(schema.finish(a))


def test_bench_runs_from_an_empty_folder_as_installed(tmp_path):
    """The console entry point outside any checkout: no benchmarks/ folder is needed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-c", "import sys; from tlfast.cli import main; sys.exit(main())",
                           "bench", "knn", "--quick", "--cases", "knn-kl", "--rounds", "2",
                           "--contenders", "tlfast,torch-gemm-form"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in (tmp_path / "tlfast-bench-out").iterdir()} == {"knn.json", "knn.md", "knn.png"}
