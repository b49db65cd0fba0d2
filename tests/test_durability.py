"""Durability of everything tlfast persists (issue 11, classes 2-5; docs/design/durability.md).

2. crash windows: a writer killed at every step of a save (and by SIGKILL at random times) leaves
   the old or the new version, loadable; stale temporaries go away; a full disk is an OSError.
3. overwrite replaces only an artefact of the same kind; CLI outputs never replace their inputs
   or device nodes.
4. a FeatureStore knows what it holds: other data, weights or precision are refused on resume.
5. loading trusts nothing: schema, confined paths, listed files, domain, truncated maps.

Writers that must die run in forked children (``_in_child``), so a crash of the code under test
never takes the test runner down with it.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import resource
import shutil
import signal
import stat
import time

import numpy as np
import pytest
import torch
from torch import nn

import tlfast
from tlfast import _persist
from tlfast.cli import main as cli
from tlfast.index import Index

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="crash tests fork the writer")


def _in_child(fn, *args):
    """Run ``fn(*args)`` in a forked child: (exit code, or -signal; ("ok", value) or ("raised", (type
    name, message, filename)), or None when the child died before answering)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            torch.set_num_threads(1)
            out = ("ok", fn(*args))
        except BaseException as exc:
            out = ("raised", (type(exc).__name__, str(exc), getattr(exc, "filename", None)))
        with os.fdopen(w, "wb") as f:
            pickle.dump(out, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), (pickle.loads(data) if data else None)


def _vectors(seed, n=200, d=8):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _index(seed, n=200, d=8):
    return Index("l2").add(_vectors(seed, n, d), ids=np.arange(n) * 3 + seed)


def _content(path, **kw):
    ix = Index.load(path, **kw)
    return np.asarray(ix._segments[0]).copy(), np.concatenate(ix._ids)


def _which(path, versions):
    """Which of ``versions`` (seeds) the index at ``path`` is; fails if it is none of them."""
    vec, ids = _content(path)
    for seed in versions:
        if np.array_equal(vec, _vectors(seed, *vec.shape)) and np.array_equal(ids, np.arange(len(vec)) * 3 + seed):
            return seed
    raise AssertionError(f"{path} holds neither version {versions}")


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if ".tlfast-" in n)


# ============================================================== 2. crash windows in writes
_PRIMITIVES = [(os, "rename"), (os, "replace"), (os, "mkdir"), (os, "fsync"), (os, "unlink"), (shutil, "rmtree"),
               (_persist, "_exchange"), (_persist.HashingWriter, "write")]


def _dying_at(step, exchange, fn, *args):
    """Run ``fn(*args)``, the process exiting at the ``step``-th file-system primitive it calls
    (0: never); returns how many it called."""
    count = [0]

    def dying(call):
        def wrapper(*a, **k):
            count[0] += 1
            if count[0] == step:
                os._exit(77)
            return call(*a, **k)
        return wrapper

    if not exchange:
        _persist._exchange = lambda a, b: False  # a file system without RENAME_EXCHANGE: two renames
    for owner, name in _PRIMITIVES:
        setattr(owner, name, dying(getattr(owner, name)))
    fn(*args)
    return count[0]


def _save_dying_at(step, path, seed, exchange):
    return _dying_at(step, exchange, lambda: _index(seed).save(path, overwrite=True))


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_save_killed_at_every_step_leaves_old_or_new(tmp_path, exchange):
    path = tmp_path / "ix"
    _index(1).save(path)
    rc, (_, steps) = _in_child(_save_dying_at, 0, path, 2, exchange)
    assert rc == 0 and steps > 5 and _which(path, [2]) == 2
    seen = set()
    for step in range(1, steps + 1):
        old = 1 + step % 2  # alternate the version on disk so every step replaces a real old one
        shutil.rmtree(path)
        _index(old).save(path)
        rc, _ = _in_child(_save_dying_at, step, path, 3 - old, exchange)
        assert rc == 77
        got = _which(path, [old, 3 - old])  # load recovers a half-finished two-rename commit
        seen.add(got == old)
        assert _leftovers(tmp_path) == [], f"step {step}: load left {_leftovers(tmp_path)}"
    assert seen == {True, False}  # early deaths keep the old version, late ones already show the new


def _store_features(path):
    return np.asarray(tlfast.FeatureStore(path)).copy()


def test_extract_overwrite_killed_at_every_step_leaves_old_or_new_store(tmp_path, exchange=True):
    """(The two-rename commit is the one ``commit`` the Index test above kills in both modes.)"""
    path, backup = tmp_path / "fs", tmp_path / "backup"
    a, b = _tokens(8, 0), _tokens(8, 1)
    old = _store_features(_gru_extractor().extract_to(path, a, shard_size=4).path)
    shutil.copytree(path, backup)
    new = _gru_extractor().extract(b).numpy()
    rerun = lambda: _gru_extractor().extract_to(path, b, shard_size=4, overwrite=True)  # noqa: E731
    shutil.rmtree(path)
    rc, (_, steps) = _in_child(_dying_at, 0, exchange, rerun)
    assert rc == 0 and steps > 10 and np.allclose(_store_features(path), new, atol=1e-6)
    seen = set()
    for step in range(1, steps + 1):
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(partial := tmp_path / ".fs.tlfast-partial", ignore_errors=True)
        shutil.copytree(backup, path)
        rc, _ = _in_child(_dying_at, step, exchange, rerun)
        got = _store_features(path)
        is_new = got.shape == new.shape and np.allclose(got, new, atol=1e-6)
        assert is_new or np.array_equal(got, old), f"step {step}: neither store"
        seen.add(is_new)
    assert seen == {True, False}
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(backup)
    np.testing.assert_allclose(_store_features(rerun().path), new, atol=1e-6)
    assert _leftovers(tmp_path) == []


def test_result_file_killed_at_every_step_is_old_or_new(tmp_path):
    out = tmp_path / "r.csv"
    write = lambda data: _persist.write_file(out, lambda f: f.write(data))  # noqa: E731
    rc, (_, steps) = _in_child(_dying_at, 0, True, write, b"new" * 1000)
    assert rc == 0 and steps >= 3
    for step in range(1, steps + 1):
        out.write_bytes(b"old")
        _in_child(_dying_at, step, True, write, b"new" * 1000)
        assert out.read_bytes() in (b"old", b"new" * 1000)
    write(b"x")
    assert _leftovers(tmp_path) == []


def _save_forever(path, ready_w):
    os.write(ready_w, b"x")
    seed = 1
    while True:
        _index(seed, n=20000, d=32).save(path, overwrite=True)
        seed = 3 - seed


def test_sigkill_at_random_times_leaves_a_loadable_index_and_no_garbage(tmp_path):
    path = tmp_path / "ix"
    _index(1, n=20000, d=32).save(path)
    rng = random.Random(0)
    for _ in range(10):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(r)
            _save_forever(path, w)
        os.close(w)
        os.read(r, 1)
        os.close(r)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert _which(path, [1, 2]) in (1, 2)
    _index(1).save(path, overwrite=True)  # the next save (and load) removes what the kills left
    assert _leftovers(tmp_path) == [] and _which(path, [1]) == 1


def test_live_writers_temporaries_are_not_removed(tmp_path):
    path = tmp_path / "ix"
    stage = tmp_path / f".ix{_persist.TMP_TAG}live"
    stage.mkdir()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - a writer holding its staging folder
        assert _persist.lock(stage) is not None  # held until this process dies
        os.write(w, b"x")
        time.sleep(30)
        os._exit(0)
    os.read(r, 1)
    try:
        _index(1).save(path)
        assert stage.is_dir()  # its owner is alive: left alone
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    Index.load(path)
    assert not stage.exists()  # owner dead: removed by the next load


def _with_file_size_limit(limit, fn, *args):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return fn(*args)


def _big_save(path):
    Index("cosine").add(_vectors(5, 20000, 32)).save(path, overwrite=True)


def _ivf_save(path):
    Index("l2", kind="ivf", engine="tlfast", nlist=8).add(_vectors(5, 4000, 32)).save(path, overwrite=True)


def _extract(path):
    _gru_extractor().extract_to(path, _tokens(80, 0), shard_size=40)  # 1088-byte shards


def _knn_cli(q, c, out):
    return cli(["knn", str(q), str(c), "-k", "20", "-o", str(out)])  # a 480 kB result


@pytest.mark.parametrize("what", ["index", "ivf-index", "feature-store", "cli-output"])
def test_full_disk_is_an_oserror_naming_the_path_and_keeps_the_old_version(tmp_path, what):
    """RLIMIT_FSIZE in a child makes writes past the limit fail with EFBIG, as a full disk does
    (writing through a memory map of a sparse file would be SIGBUS instead)."""
    path = tmp_path / "out"
    if what == "index":
        _index(1).save(path)
        rc, (kind, info) = _in_child(_with_file_size_limit, 100_000, _big_save, path)
    elif what == "ivf-index":
        _index(1).save(path)
        rc, (kind, info) = _in_child(_with_file_size_limit, 100_000, _ivf_save, path)
    elif what == "feature-store":
        rc, (kind, info) = _in_child(_with_file_size_limit, 600, _extract, path)
    else:
        np.save(tmp_path / "q.npy", _vectors(1, 2000, 4))
        np.save(tmp_path / "c.npy", _vectors(2, 50, 4))
        path = tmp_path / "r.npz"
        path.write_bytes(b"old result")
        limit = (tmp_path / "q.npy").stat().st_size + 1000  # the inputs exist; the result is larger
        rc, result = _in_child(_with_file_size_limit, limit, _knn_cli, tmp_path / "q.npy", tmp_path / "c.npy", path)
        assert rc == 0 and result == ("ok", 2)  # the CLI reports the OSError as a one-line error
        assert path.read_bytes() == b"old result" and _leftovers(tmp_path) == []
        rc, (kind, info) = _in_child(_with_file_size_limit, limit, lambda: _persist.write_file(
            path, lambda f: f.write(b"x" * (limit + 1))))
    assert rc == 0, "the writer died (SIGBUS / SIGXFSZ) instead of raising"
    assert kind == "raised", info
    name, message, filename = info
    assert name == "OSError" and str(tmp_path) in message and filename and str(tmp_path) in filename, info
    assert "File too large" in message
    if what in ("index", "ivf-index"):
        assert _which(path, [1]) == 1  # the old version is untouched
    elif what == "feature-store":  # nothing at the target; the finished work waits for a resume
        assert not path.exists() and _leftovers(tmp_path) == [".out.tlfast-partial"]
        return
    assert _leftovers(tmp_path) == []


# ============================================================== 3. overwrite deletes only what is ours
def test_overwrite_never_replaces_a_users_folder(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')")
    with pytest.raises(FileExistsError, match="not a tlfast index"):
        _index(1).save(project, overwrite=True)
    assert (project / "src" / "main.py").read_text() == "print('mine')"

    (project / "manifest.json").write_text(json.dumps({"name": "my web app", "version": 3}))
    with pytest.raises(FileExistsError, match="not a tlfast index"):
        _index(1).save(project, overwrite=True)
    assert json.loads((project / "manifest.json").read_text())["name"] == "my web app"

    saved = tmp_path / "ix"
    _index(1).save(saved)
    (saved / "notes.txt").write_text("my notes")  # a user's file inside a saved index
    with pytest.raises(FileExistsError, match="notes.txt"):
        _index(2).save(saved, overwrite=True)
    assert (saved / "notes.txt").read_text() == "my notes"

    plain = tmp_path / "data.bin"
    plain.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not a tlfast index folder"):
        _index(1).save(plain, overwrite=True)
    assert plain.read_bytes() == b"precious"

    store = _gru_extractor().extract_to(tmp_path / "fs", _tokens(12, 0), shard_size=5)
    with pytest.raises(FileExistsError, match="not a tlfast index"):
        _index(1).save(tmp_path / "fs", overwrite=True)  # a feature store is not an index
    assert len(tlfast.FeatureStore(store.path)) == 12


def test_overwrite_replaces_an_index_and_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _index(1).save(tmp_path / "empty")
    _index(1).save(tmp_path / "ix")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _index(2).save(tmp_path / "ix")
    _index(2).save(tmp_path / "ix", overwrite=True)
    assert _which(tmp_path / "ix", [1, 2]) == 2 and _which(tmp_path / "empty", [1]) == 1


def test_extract_overwrite_never_deletes_an_index_or_a_users_manifest(tmp_path):
    _index(1).save(tmp_path / "ix")
    before = (tmp_path / "ix" / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="not a tlfast feature store"):
        _gru_extractor().extract_to(tmp_path / "ix", _tokens(12, 0), shard_size=5, overwrite=True)
    assert (tmp_path / "ix" / "manifest.json").read_bytes() == before and _which(tmp_path / "ix", [1]) == 1

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text('{"app": "mine"}')
    for overwrite in (False, True):
        with pytest.raises(FileExistsError):
            _gru_extractor().extract_to(mine, _tokens(12, 0), shard_size=5, overwrite=overwrite)
    assert (mine / "manifest.json").read_text() == '{"app": "mine"}'


def test_cli_output_may_not_be_an_input_or_inside_one(tmp_path, capsys):
    q, c = tmp_path / "q.npy", tmp_path / "c.npy"
    np.save(q, _vectors(1, 10, 8))
    np.save(c, _vectors(2, 30, 8))
    q_bytes = q.read_bytes()
    _index(1, n=30).save(tmp_path / "ix")
    cases = [["knn", str(q), str(c), "-o", str(q)],
             ["knn", str(q), str(c), "-o", str(tmp_path / "." / "c.npy")],
             ["knn", str(q), str(tmp_path / "ix"), "-m", "l2", "-o", str(tmp_path / "ix" / "r.npz")],
             ["match", str(q), str(c), "-o", str(q)]]
    for argv in cases:
        assert cli(argv) == 2
        assert "write the result elsewhere" in capsys.readouterr().err
    assert q.read_bytes() == q_bytes and _which(tmp_path / "ix", [1]) == 1
    assert cli(["knn", str(q), str(tmp_path / "ix"), "-m", "l2", "-k", "2", "-o", str(tmp_path / "r.npz")]) == 0


def test_outputs_never_replace_device_nodes_or_fifos(tmp_path):
    q, c = tmp_path / "q.npy", tmp_path / "c.npy"
    np.save(q, _vectors(1, 10, 8))
    np.save(c, _vectors(2, 30, 8))
    assert cli(["knn", str(q), str(c), "-k", "2", "-o", "/dev/null"]) == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # as root, a rename would have replaced it
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert cli(["knn", str(q), str(c), "-k", "2", "-o", str(fifo)]) == 0
        data = os.read(r, 1 << 20)
    finally:
        os.close(r)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and data[:2] == b"PK"  # the .npz went down the pipe
    link = tmp_path / "link.npz"
    os.symlink(tmp_path / "real.npz", link)
    assert cli(["knn", str(q), str(c), "-k", "2", "-o", str(link)]) == 0
    assert link.is_symlink() and np.load(tmp_path / "real.npz")["indices"].shape == (10, 2)


# ============================================================== 4. a store knows what it holds
class _GRU(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(50, 8)
        self.rnn = nn.GRU(8, 6, batch_first=True)
        self.calls = 0

    def forward(self, ids):
        self.calls += 1
        if getattr(self, "fail_after", None) is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        return self.rnn(self.emb(ids))


class _CNN(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 5, 3)

    def forward(self, x):
        return self.conv(x)


class _CharTokenizer:
    def __call__(self, texts, truncation=True, max_length=256):
        return {"input_ids": [[1 + ord(ch) % 49 for ch in t][:max_length] for t in texts]}


def _gru_extractor(seed=0, **kw):
    return tlfast.Extractor.from_module(_GRU(seed), name="gru", **kw)


def _tokens(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 50, int(rng.integers(1, 9))).tolist() for _ in range(n)]


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 12, 12, 3), dtype=np.uint8)


def _inputs(kind, seed, tmp_path):
    """(extractor, data) of one input kind; ``seed`` changes the data, never its length."""
    if kind == "tokens":
        return _gru_extractor(), _tokens(9, seed)
    if kind == "texts":
        return (tlfast.Extractor.from_module(_GRU(), tokenizer=_CharTokenizer(), name="gru"),
                [f"text {seed} number {i}" for i in range(9)])
    cnn = tlfast.Extractor.from_module(_CNN(), name="cnn")
    images = _images(9, seed)
    if kind == "array":
        return cnn, images
    if kind == "tensor":
        return cnn, torch.from_numpy(images)
    if kind == "list-of-arrays":
        return cnn, list(images)
    if kind == "pil":
        from PIL import Image
        return cnn, [Image.fromarray(a) for a in images]
    if kind == "paths":
        from PIL import Image
        paths = []
        for i, a in enumerate(images):
            p = tmp_path / f"img{i}.png"
            Image.fromarray(a).save(p)
            paths.append(str(p))
        return cnn, paths
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["tokens", "texts", "array", "tensor", "list-of-arrays", "pil", "paths"])
def test_same_path_other_data_is_refused_for_every_input_kind(tmp_path, kind):
    ext, a = _inputs(kind, 0, tmp_path)
    store = ext.extract_to(tmp_path / "fs", a, shard_size=4)
    want_a = np.asarray(store).copy()
    same = ext.extract_to(tmp_path / "fs", a, shard_size=4)  # same data: the finished store, reused
    np.testing.assert_array_equal(np.asarray(same), want_a)
    if kind == "paths":  # the same file names, edited in place
        from PIL import Image
        for i, p in enumerate(a):
            Image.fromarray(_images(9, 1)[i]).save(p)
            os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
        b = a
    else:
        _, b = _inputs(kind, 1, tmp_path)
    with pytest.raises(ValueError, match="different extraction.*data_sha256"):
        ext.extract_to(tmp_path / "fs", b, shard_size=4)
    got = ext.extract_to(tmp_path / "fs", b, shard_size=4, overwrite=True)
    np.testing.assert_allclose(np.asarray(got), ext.extract(b).numpy(), atol=1e-6)
    assert not np.allclose(np.asarray(got), want_a)


def test_other_weights_or_precision_under_the_same_name_are_refused(tmp_path):
    data = _tokens(9, 0)
    _gru_extractor(seed=0).extract_to(tmp_path / "fs", data, shard_size=4)
    with pytest.raises(ValueError, match="model_sha256"):
        _gru_extractor(seed=1).extract_to(tmp_path / "fs", data, shard_size=4)
    with pytest.raises(ValueError, match="model_sha256"):
        _gru_extractor(seed=0, dtype=torch.bfloat16).extract_to(tmp_path / "fs", data, shard_size=4)
    with pytest.raises(ValueError, match="dtype"):
        _gru_extractor(seed=0).extract_to(tmp_path / "fs", data, shard_size=4, dtype="float16")


def test_interrupted_run_is_not_resumed_with_other_data(tmp_path):
    path = tmp_path / "fs"
    crashing = _gru_extractor()
    crashing.encoder.module.fail_after = 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.extract_to(path, _tokens(12, 0), shard_size=4, batch_size=4)
    with pytest.raises(FileNotFoundError, match="interrupted"):
        tlfast.FeatureStore(path)
    b = _tokens(12, 1)
    with pytest.raises(ValueError, match="interrupted extraction .* different job"):
        _gru_extractor().extract_to(path, b, shard_size=4, batch_size=4)
    store = _gru_extractor().extract_to(path, b, shard_size=4, batch_size=4, overwrite=True)
    np.testing.assert_allclose(np.asarray(store), _gru_extractor().extract(b).numpy(), atol=1e-6)
    assert _leftovers(tmp_path) == []


# ============================================================== 5. loading trusts nothing
def _rewrite_manifest(path, edit, fix_checksums=False):
    meta = json.loads((path / "manifest.json").read_text())
    edit(meta)
    if fix_checksums:  # a hostile or careless editor who also recomputes the checksums
        for name in meta["files"]:
            meta["files"][name] = _persist.file_record(path / name)
    (path / "manifest.json").write_text(json.dumps(meta))


def _fresh(tmp_path, name="ix", seed=1):
    path = tmp_path / name
    shutil.rmtree(path, ignore_errors=True)
    _index(seed).save(path)
    return path


def test_manifest_schema_errors_are_value_errors_naming_the_key(tmp_path):
    for key, value, match in [("dim", None, "'dim'"), ("count", "200", "'count'"), ("metric", "manhattan", "'metric'"),
                              ("files", [], "'files'"), ("dtype", "int8", "'dtype'"), ("params", 3, "'params'")]:
        path = _fresh(tmp_path)
        _rewrite_manifest(path, lambda m: m.pop(key) if value is None else m.__setitem__(key, value))
        with pytest.raises(ValueError, match=match):
            Index.load(path)
    path = _fresh(tmp_path)
    _rewrite_manifest(path, lambda m: m["files"]["vectors.npy"].pop("sha256"))
    with pytest.raises(ValueError, match="sha256"):
        Index.load(path)


def test_paths_are_confined_to_the_folder(tmp_path):
    outside = tmp_path / "outside.npy"
    path = _fresh(tmp_path)
    shutil.copy(path / "vectors.npy", outside)
    for name in ["../outside.npy", str(outside), "sub/../../outside.npy"]:
        path = _fresh(tmp_path)
        _rewrite_manifest(path, lambda m: m["files"].__setitem__(name, _persist.file_record(outside)))
        with pytest.raises(ValueError, match="outside the folder"):
            Index.load(path)
    path = _fresh(tmp_path)
    (path / "vectors.npy").unlink()
    os.symlink(outside, path / "vectors.npy")  # same bytes, same checksum: still refused
    with pytest.raises(ValueError, match="symlink"):
        Index.load(path)
    outside_bytes = outside.read_bytes()
    _index(2).save(path, overwrite=True)  # replacing removes the link, never what it points to
    assert outside.read_bytes() == outside_bytes and _which(path, [2]) == 2


def test_every_file_is_listed_and_checked(tmp_path):
    path = _fresh(tmp_path)
    _rewrite_manifest(path, lambda m: m["files"].pop("ids.npy"))  # would silently drop the ids
    with pytest.raises(ValueError, match="'ids.npy'.*does not list"):
        Index.load(path)
    path = _fresh(tmp_path)
    _rewrite_manifest(path, lambda m: m["files"].pop("vectors.npy"))
    with pytest.raises(ValueError, match="vectors.npy"):
        Index.load(path)


@pytest.mark.parametrize("mmap", [False, True])
def test_nan_vectors_and_duplicate_ids_are_rejected_at_load(tmp_path, mmap):
    path = _fresh(tmp_path)
    vec = np.load(path / "vectors.npy")
    vec[17, 3] = np.nan
    np.save(path / "vectors.npy", vec)
    _rewrite_manifest(path, lambda m: None, fix_checksums=True)
    with pytest.raises(ValueError, match="NaN|finite"):
        Index.load(path, mmap=mmap)
    path = _fresh(tmp_path)
    ids = np.load(path / "ids.npy")
    ids[5] = ids[6]
    np.save(path / "ids.npy", ids)
    _rewrite_manifest(path, lambda m: None, fix_checksums=True)
    with pytest.raises(ValueError, match="duplicate ids"):
        Index.load(path, mmap=mmap)


def _search_after_truncation(path, file):
    index = Index.load(path, mmap=True)
    index.search(_vectors(9, 2, 16), 3)
    os.truncate(file, 4096)
    return index.search(_vectors(9, 2, 16), 3)


def _read_store_after_truncation(path):
    store = tlfast.FeatureStore(path)
    np.asarray(store).sum()
    os.truncate(path / "shard-00001.npy", 128)
    return float(np.asarray(store).sum())


def test_a_mapped_file_truncated_from_outside_is_an_error_not_sigbus(tmp_path):
    path = tmp_path / "ix"
    Index("l2").add(_vectors(1, 5000, 16)).save(path)
    rc, (kind, (name, message, _)) = _in_child(_search_after_truncation, path, path / "vectors.npy")
    assert rc == 0, f"the search died with signal {-rc}"
    assert kind == "raised" and name == "ValueError" and "shrank" in message

    _gru_extractor().extract_to(tmp_path / "fs", _tokens(2000, 0), shard_size=500)
    rc, (kind, (name, message, _)) = _in_child(_read_store_after_truncation, tmp_path / "fs")
    assert rc == 0, f"the read died with signal {-rc}"
    assert kind == "raised" and name == "ValueError" and "shrank" in message


def test_feature_store_loading_is_confined_and_checked(tmp_path):
    path = tmp_path / "fs"
    _gru_extractor().extract_to(path, _tokens(12, 0), shard_size=5)
    manifest = json.loads((path / "manifest.json").read_text())
    hostile = json.loads(json.dumps(manifest))
    hostile["shards"][0]["file"] = "../../etc/passwd"
    (path / "manifest.json").write_text(json.dumps(hostile))
    with pytest.raises(ValueError, match="outside the folder"):
        tlfast.FeatureStore(path)
    broken = {k: v for k, v in manifest.items() if k != "dim"}
    (path / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="'dim'"):
        tlfast.FeatureStore(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "shard-00009.npy").write_bytes(b"stray")
    with pytest.raises(ValueError, match="shard-00009.npy"):
        tlfast.FeatureStore(path)


# ============================================================== ShardedIndex (a one-rank gloo group)
def _sharded_cases(tmp):
    import torch.distributed as dist

    from tlfast.distributed import ShardedIndex

    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = ("returned", "")
        except Exception as exc:
            out[name] = (type(exc).__name__, str(exc))

    path = tmp / "sx"
    ShardedIndex("l2", timeout=30).add(_vectors(1), ids=np.arange(200)).save(path)
    (tmp / "user" / "src").mkdir(parents=True)
    (tmp / "user" / "src" / "main.py").write_text("mine")
    attempt("user-folder", lambda: ShardedIndex("l2", timeout=30).add(_vectors(2)).save(tmp / "user", overwrite=True))
    attempt("index-folder", lambda: ShardedIndex("l2", timeout=30).add(_vectors(2)).save(tmp / "ix", overwrite=True))
    attempt("full-disk", lambda: _with_file_size_limit(
        1000, lambda: ShardedIndex("l2", timeout=30).add(_vectors(2)).save(path, overwrite=True)))
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    out["after-full-disk"] = ShardedIndex.load(path, timeout=30).search(_vectors(1)[:3], 1).indices.tolist()
    record = json.loads((path / "shard-00000.json").read_text())
    record["index"] = "../ix"
    (path / "shard-00000.json").write_text(json.dumps(record))
    attempt("escape", lambda: ShardedIndex.load(path, timeout=30))
    meta = json.loads((path / "manifest.json").read_text())
    del meta["counts"]
    (path / "manifest.json").write_text(json.dumps(meta))
    attempt("schema", lambda: ShardedIndex.load(path, timeout=30))
    out["leftovers"] = _leftovers(tmp)
    dist.destroy_process_group()
    return out


def test_sharded_index_save_is_atomic_refuses_foreign_folders_and_confines_paths(tmp_path):
    _index(1).save(tmp_path / "ix")
    rc, (kind, out) = _in_child(_sharded_cases, tmp_path)
    assert rc == 0 and kind == "ok", out
    assert out["user-folder"][0] == "FileExistsError" and (tmp_path / "user" / "src" / "main.py").read_text() == "mine"
    assert out["index-folder"][0] == "FileExistsError" and _which(tmp_path / "ix", [1]) == 1
    assert out["full-disk"][0] == "OSError" and "File too large" in out["full-disk"][1]
    assert out["after-full-disk"] == [[0], [1], [2]]  # the old sharded index survived the failed save
    assert out["escape"][0] == "ValueError" and "outside the folder" in out["escape"][1]
    assert out["schema"][0] == "ValueError" and "'counts'" in out["schema"][1]
    assert out["leftovers"] == []


def test_saving_to_dot_and_trailing_slash_paths(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    _index(1).save(".")  # an empty current folder becomes the index
    assert _which(tmp_path / "here", [1]) == 1
    _index(2).save(str(tmp_path / "here") + "/", overwrite=True)
    assert _which(tmp_path / "here", [1, 2]) == 2 and _leftovers(tmp_path) == []
