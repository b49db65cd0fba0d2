"""tlfast.distributed on two real gloo processes (torch.multiprocessing spawn, localhost).

Each scenario spawns the ranks once and runs many small calls in them; the parent process computes
the single-process answer with ``tlfast.knn`` on the concatenated corpus and compares.  Nothing
here can hang: the ranks run under a join deadline and are killed past it.
"""
from __future__ import annotations

import datetime
import json
import importlib
import os
import socket
import tempfile
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tlfast
from conftest import make_inputs
from tlfast import distributed as tld

METRICS = ("ip", "cosine", "l2", "kl", "js")
# 41 corpus rows split 23 / 18 (uneven; k = 20 exceeds rank 1's shard), 13 queries split 7 / 6.
N, NQ, D, SPLIT, QSPLIT = 41, 13, 19, 23, 7
JOIN_S = 90  # hard limit on one scenario, spawn included


# ---------------------------------------------------------------- harness

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, outdir, fn, args, group_timeout_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the ranks share this machine's cores
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=group_timeout_s))
        result = ("ok", fn(rank, world, *args))
    except BaseException as exc:  # reported to the parent, which asserts on it
        result = ("error", type(exc).__name__, str(exc), traceback.format_exc())
    path = os.path.join(outdir, f"rank{rank}.pt")
    torch.save(result, path + ".tmp")
    os.replace(path + ".tmp", path)
    # Skip process-group teardown: it waits for peers, which in the failure tests are gone.
    os._exit(0)


def run_ranks(fn, *args, world=2, group_timeout_s=60, wait_for=None):
    """Run ``fn(rank, world, *args)`` on ``world`` spawned gloo ranks; per-rank results.

    A result is ("ok", value) or ("error", type name, message, traceback), or None for a rank that
    wrote nothing (it died).  Returns once the ranks in ``wait_for`` (default: all) have reported or
    exited; ranks still running then (a deliberately stuck one) are killed.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, outdir, fn, args, group_timeout_s),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        waited = range(world) if wait_for is None else wait_for
        paths = [os.path.join(outdir, f"rank{r}.pt") for r in range(world)]
        deadline = time.monotonic() + JOIN_S
        try:
            while time.monotonic() < deadline:
                if all(os.path.exists(paths[r]) or not procs[r].is_alive() for r in waited):
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"ranks did not finish within {JOIN_S} s")
        finally:
            for p in procs:
                p.join(timeout=2)
                if p.is_alive():
                    p.kill()
                    p.join()
        return [torch.load(p, weights_only=False) if os.path.exists(p) else None for p in paths]


def ok(result):
    assert result is not None, "rank produced no result"
    assert result[0] == "ok", f"rank raised {result[1]}: {result[2]}\n{result[3]}"
    return result[1]


def all_ok(results):
    """Every rank's value; on failure, every rank's report (the root cause is often on a peer)."""
    failed = [(r, res) for r, res in enumerate(results) if res is None or res[0] != "ok"]
    if failed:
        pytest.fail("\n".join(f"rank {r}: " + ("no result" if res is None else f"{res[1]}: {res[3]}")
                              for r, res in failed))
    return [res[1] for res in results]


# ---------------------------------------------------------------- data

def tie_inputs(metric: str):
    """Inputs full of exact ties: few distinct rows, repeated within and across the shards."""
    rng = np.random.default_rng(7)
    if metric in ("kl", "js"):
        base = rng.dirichlet(np.ones(6), 5)
    else:
        base = rng.integers(-1, 2, (5, 6)).astype(np.float64)
        base[(base == 0).all(1), 0] = 1.0  # no zero rows (cosine)
    c = base[rng.integers(0, 5, N)]
    q = base[rng.integers(0, 5, NQ)]
    return torch.from_numpy(q).float(), torch.from_numpy(c).float()


def knn_cases():
    """(name, metric, dtype, k, kind, split, sharded, ties) for every checked call."""
    cases = []
    for metric in METRICS:
        for k in (1, 5, 20, N):
            cases.append((f"{metric}-k{k}", metric, torch.float32, k, "torch", SPLIT, False, False))
        for k in (1, 20, N):
            cases.append((f"{metric}-sharded-k{k}", metric, torch.float32, k, "torch", SPLIT, True, False))
        cases.append((f"{metric}-ties", metric, torch.float32, 9, "torch", SPLIT, False, True))
        cases.append((f"{metric}-ties-sharded", metric, torch.float32, 9, "torch", SPLIT, True, True))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        name = str(dtype).replace("torch.", "")
        cases.append((f"cosine-{name}", "cosine", dtype, 6, "torch", SPLIT, False, False))
        if dtype != torch.bfloat16:  # bfloat16 rounding breaks the 1e-3 row-sum rule of kl / js
            cases.append((f"kl-{name}-sharded", "kl", dtype, 6, "torch", SPLIT, True, False))
    for metric in ("ip", "kl"):  # candidates gathered in chunks of 2 queries (see knn_program)
        cases.append((f"{metric}-chunked", metric, torch.float32, 8, "torch", SPLIT, False, False))
    cases.append(("l2-numpy", "l2", torch.float32, 4, "numpy", SPLIT, False, False))
    cases.append(("js-numpy-sharded", "js", torch.float32, 4, "numpy", SPLIT, True, False))
    # Rank 1 holds no corpus rows; with sharded queries, rank 1 also has no queries.
    cases.append(("ip-empty-shard", "ip", torch.float32, 7, "torch", N, False, False))
    cases.append(("l2-empty-shard-sharded", "l2", torch.float32, 7, "torch", N, True, False))
    cases.append(("cosine-no-queries-sharded", "cosine", torch.float32, 3, "torch", SPLIT, True, False))
    # kNN graph: each rank's queries are its own shard, exclude_self drops (i, i); k up to n - 1.
    for metric in METRICS:
        cases.append((f"{metric}-graph", metric, torch.float32, 6, "torch", SPLIT, True, False))
    cases.append(("l2-graph-ties", "l2", torch.float32, 9, "torch", SPLIT, True, True))
    cases.append(("ip-graph-k-max", "ip", torch.float32, N - 1, "torch", SPLIT, True, False))
    return cases


def is_graph(name: str) -> bool:
    return "-graph" in name


def case_inputs(metric, dtype, ties):
    q, c = tie_inputs(metric) if ties else make_inputs(metric, NQ, N, D, seed=3)
    return q.to(dtype), c.to(dtype)


def shard(x: torch.Tensor, split: int, rank: int) -> torch.Tensor:
    return x[:split] if rank == 0 else x[split:]


def query_split(name: str) -> int:
    if is_graph(name):
        return SPLIT
    return NQ if name.startswith("cosine-no-queries") else QSPLIT


# ---------------------------------------------------------------- rank programs

def knn_program(rank, world):
    out = {}
    for name, metric, dtype, k, kind, split, sharded, ties in knn_cases():
        q, c = case_inputs(metric, dtype, ties)
        c = shard(c, split, rank)
        if sharded:
            q = c if is_graph(name) else shard(q, query_split(name), rank)
        if kind == "numpy":
            q, c = q.numpy(), c.numpy()
        # Chunks of 2 queries: 7 all-gathers, each in flight while the next chunk is searched.
        tld._GATHER_BYTES = 2 * world * k * 12 if name.endswith("chunked") else (256 << 20)
        res = tld.knn(q, c, k, metric, sharded_queries=sharded, exclude_self=is_graph(name), timeout=30)
        out[name] = (torch.as_tensor(res.values), torch.as_tensor(res.indices), type(res.values).__name__)
    out["errors"] = error_program(rank)
    # The group is still healthy after all those rejected calls.
    q, c = make_inputs("ip", 4, 10, 3)
    out["after-errors"] = tuple(tld.knn(q, shard(c, 5, rank), 2, "ip", timeout=30))
    return out


def error_program(rank):
    """Calls that every rank must reject with the same clear error; returns {name: (type, message)}."""
    q, c = make_inputs("ip", 4, 10, 3)
    c = shard(c, 5, rank)
    other = rank == 1
    calls = {
        "dim": lambda: tld.knn(q[:, :2] if other else q, c[:, :2] if other else c, 2, "ip",
                               sharded_queries=True),
        "metric": lambda: tld.knn(q, c, 2, "l2" if other else "ip"),
        "k": lambda: tld.knn(q, c, 3 if other else 2, "ip"),
        "dtype": lambda: tld.knn(q.double() if other else q, c.double() if other else c, 2, "ip"),
        "queries": lambda: tld.knn(q + 1 if other else q, c, 2, "ip"),
        "mode": lambda: tld.knn(q, c, 2, "ip", sharded_queries=other),
        "nan": lambda: tld.knn(q, torch.where(c > 1e9, c, torch.nan) if other else c, 2, "ip"),
        "int-dtype": lambda: tld.knn(q, c.long() if other else c, 2, "ip"),
        "k-too-large": lambda: tld.knn(q, c, 11, "ip"),
        "exclude-self-replicated": lambda: tld.knn(q, c, 2, "ip", exclude_self=True),
        "k-numpy-int": lambda: tld.knn(q, c, np.int64(2) if other else 2, "ip"),  # the same k: fine
        "exclude-self-k": lambda: tld.knn(c, c, 10, "ip", sharded_queries=True, exclude_self=True),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = ("returned", "")
        except Exception as exc:
            out[name] = (type(exc).__name__, str(exc))
    return out


def dying_program(rank, world, sharded, mode):
    """Rank 1 dies after the descriptor exchange, before its data reaches rank 0 (replicated: in
    its local search; ring: as it starts passing its shard), or never calls at all; rank 0 reports
    the error it got and how long it took to get it.  (A rank that dies after sending its shard
    round the ring has already given rank 0 everything it needs: rank 0 then rightly succeeds.)"""
    q, c = make_inputs("l2", 8, 30, 5)
    if rank == 1 and mode == "die":
        if sharded:
            dist.batch_isend_irecv = lambda ops: os._exit(1)
        else:
            importlib.import_module("tlfast.backends.cpu").knn = lambda *a, **kw: os._exit(1)
    if rank == 1 and mode == "stuck":
        time.sleep(600)
    start = time.monotonic()
    try:
        tld.knn(q, shard(c, 15, rank), 3, "l2", sharded_queries=sharded, timeout=5)
    except Exception as exc:
        return type(exc).__name__, isinstance(exc, RuntimeError), str(exc), time.monotonic() - start
    return "returned", False, "", time.monotonic() - start


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def knn_results():
    return all_ok(run_ranks(knn_program))


@pytest.mark.parametrize("case", knn_cases(), ids=lambda c: c[0])
def test_two_ranks_match_single_process(knn_results, case):
    name, metric, dtype, k, kind, split, sharded, ties = case
    q, c = case_inputs(metric, dtype, ties)
    if kind == "numpy":
        q, c = q.numpy(), c.numpy()
    if is_graph(name):
        expected = tlfast.knn(c, c, k, metric, exclude_self=True)
        q = c
    else:
        expected = tlfast.knn(q, c, k, metric)
    want_v, want_i = torch.as_tensor(expected.values), torch.as_tensor(expected.indices)
    per_rank = [r[name] for r in knn_results]
    assert all(kind_name == type(expected.values).__name__ for _, _, kind_name in per_rank)
    if sharded:
        qs = query_split(name)
        got_v = torch.cat([per_rank[0][0], per_rank[1][0]])
        got_i = torch.cat([per_rank[0][1], per_rank[1][1]])
        assert per_rank[0][1].shape == (qs, k) and per_rank[1][1].shape == (len(q) - qs, k)
        answers = [(got_v, got_i)]
    else:
        answers = [(v, i) for v, i, _ in per_rank]
    for got_v, got_i in answers:
        # The local kernel computes each pair's value independently of where the row sits in the
        # corpus, so the sharded answer is bit-identical, not merely close.
        assert torch.equal(got_i, want_i), f"{name}: indices differ from single-process tlfast.knn"
        assert torch.equal(got_v, want_v), f"{name}: values differ from single-process tlfast.knn"


ERRORS = {  # name -> (exception type, text every rank's message contains), or ("returned", "")
    "dim": ("ValueError", "vector dimension"),
    "metric": ("ValueError", "rank 0: ip, rank 1: l2"),
    "k": ("ValueError", "disagree on k"),
    "dtype": ("ValueError", "rank 0: float32, rank 1: float64"),
    "queries": ("ValueError", "checksums differ"),
    "mode": ("ValueError", "sharded_queries"),
    "nan": ("ValueError", "NaN"),
    "int-dtype": ("TypeError", "floating"),
    "k-too-large": ("ValueError", "k must be between 1 and 10"),
    "exclude-self-replicated": ("ValueError", "needs sharded_queries=True"),
    "exclude-self-k": ("ValueError", "k must be between 1 and 9"),
    "k-numpy-int": ("returned", ""),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_mismatch_raises_on_every_rank(knn_results, name):
    want_type, text = ERRORS[name]
    for rank, r in enumerate(knn_results):
        got_type, message = r["errors"][name]
        assert got_type == want_type and text in message, f"rank {rank}: {got_type}: {message}"
    if name in ("nan", "int-dtype"):  # the peer names the rank whose inputs were bad
        assert "rank 1 failed: " in knn_results[0]["errors"][name][1]


def test_group_usable_after_rejected_calls(knn_results):
    q, c = make_inputs("ip", 4, 10, 3)
    expected = tlfast.knn(q, c, 2, "ip")
    for r in knn_results:
        assert torch.equal(r["after-errors"][1], expected.indices)


@pytest.mark.parametrize("sharded,mode", [(False, "die"), (True, "die"), (False, "stuck")],
                         ids=["die-replicated", "die-ring", "stuck-replicated"])
def test_failed_peer_raises_within_timeout(sharded, mode):
    # Rank 0 waits on a collective that rank 1 never joins; the group default (60 s) is far above
    # the per-call timeout (5 s), so a pass shows the per-call timeout is what bounds the wait.
    results = run_ranks(dying_program, sharded, mode, wait_for=(0,))
    name, is_runtime, message, elapsed = ok(results[0])
    assert name == "PeerError" and is_runtime, f"rank 0 got {name}: {message}"
    assert "a peer rank died" in message and "rank 0" in message
    assert elapsed < 5 + 5, f"rank 0 waited {elapsed:.1f} s, more than the 5 s timeout allows"
    if mode == "stuck":
        assert elapsed >= 4.5, f"rank 0 gave up after {elapsed:.1f} s, before the 5 s timeout"
    assert results[1] is None  # rank 1 died (or was killed while stuck) without reporting


def test_knn_without_process_group_is_a_clear_error():
    q, c = make_inputs("ip", 3, 5, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        tld.knn(q, c, 2, "ip")


def test_merge_topk_pads_sort_after_real_worst_values():
    # KL can be +inf for real pairs; padding (+inf, PAD_INDEX) must still come after them.
    inf = float("inf")
    values = torch.tensor([[inf, 0.5, inf, inf]])
    indices = torch.tensor([[tld.PAD_INDEX, 7, 9, 3]])
    v, i = tld.merge_topk(values, indices, 3, larger_is_better=False)
    assert i.tolist() == [[7, 3, 9]] and v.tolist() == [[0.5, inf, inf]]


# ---------------------------------------------------------------- ShardedIndex

def ids_for(n: int) -> np.ndarray:
    # Decreasing ids: a merge that broke exact ties by id instead of by position would be caught.
    return np.arange(5000, 5000 - 3 * n, -3, dtype=np.int64)


def index_cases():
    """(name, metric, k, ids, ties, storage dtype, rank 1 empty)."""
    cases = [(f"{m}-k{k}", m, k, False, False, "float32", False) for m in METRICS for k in (1, 20, N)]
    cases += [(f"{m}-ties-ids", m, 9, True, True, "float32", False) for m in ("ip", "l2", "kl")]
    cases += [("cosine-float16", "cosine", 7, False, False, "float16", False),
              ("l2-ids-empty-rank", "l2", 6, True, False, "float32", True)]
    return cases


def build_sharded(rank, name, metric, ids, ties, dtype, empty):
    q, c = case_inputs(metric, torch.float32, ties)
    split = N if empty else SPLIT
    index = tld.ShardedIndex(metric, dtype=dtype, timeout=30)
    lo, hi = (0, split) if rank == 0 else (split, N)
    all_ids = ids_for(N)
    for a, b in ((lo, min(lo + 6, hi)), (min(lo + 6, hi), hi)):  # two adds per rank
        if b > a:
            index.add(c[a:b], ids=all_ids[a:b] if ids else None)
    return index, q


def index_program(rank, world, outdir):
    out = {}
    for name, metric, k, ids, ties, dtype, empty in index_cases():
        index, q = build_sharded(rank, name, metric, ids, ties, dtype, empty)
        res = index.search(q, k)
        saved = index.save(os.path.join(outdir, name))
        loaded = tld.ShardedIndex.load(saved, timeout=30, mmap=name.endswith("k20"))
        again = loaded.search(q.numpy(), k)
        out[name] = (res.values, res.indices, torch.from_numpy(again.values), torch.from_numpy(again.indices))
    out["errors"] = index_error_program(rank, outdir)
    return out


def index_error_program(rank, outdir):
    q, c = make_inputs("ip", 4, 10, 3)
    path = os.path.join(outdir, "errors")
    index = tld.ShardedIndex("ip", timeout=30).add(c[:5] if rank == 0 else c[5:])
    index.save(path)

    def corrupt():
        if rank == 1:  # flip a byte of rank 1's vectors: sizes still match, the sha256 does not
            f = os.path.join(path, "shard-00001", "vectors.npy")
            data = bytearray(open(f, "rb").read())
            data[-1] ^= 0xFF
            open(f, "wb").write(bytes(data))
        return tld.ShardedIndex.load(path, timeout=30)

    calls = {
        "save-exists": lambda: index.save(path),
        "metric": lambda: tld.ShardedIndex("l2" if rank else "ip", timeout=30).add(c).search(q, 2),
        "empty": lambda: tld.ShardedIndex("ip", timeout=30).search(q, 2),
        "k-too-large": lambda: index.search(q, 11),
        "corrupt": corrupt,
        "op": lambda: index.search(q, 2) if rank else tld.knn(q, c[:5], 2, "ip", timeout=30),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = ("returned", "")
        except Exception as exc:
            out[name] = (type(exc).__name__, str(exc))
    solo = dist.new_group([0])  # every rank creates it; only rank 0 loads into a 1-rank world
    if rank == 0:
        try:
            tld.ShardedIndex.load(os.path.join(outdir, "ip-k1"), group=solo, timeout=30)
            out["world-size"] = ("returned", "")
        except Exception as exc:
            out["world-size"] = (type(exc).__name__, str(exc))
    return out


@pytest.fixture(scope="module")
def index_results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("sharded"))
    return all_ok(run_ranks(index_program, outdir)), outdir


@pytest.mark.parametrize("case", index_cases(), ids=lambda c: c[0])
def test_sharded_index_matches_one_index_and_survives_save_load(index_results, case):
    results, outdir = index_results
    name, metric, k, ids, ties, dtype, empty = case
    q, c = case_inputs(metric, torch.float32, ties)
    expected = tlfast.Index(metric, dtype=dtype).add(c, ids=ids_for(N) if ids else None).search(q, k)
    for rank, r in enumerate(results):
        values, indices, loaded_values, loaded_indices = r[name]
        assert torch.equal(indices, expected.indices), f"rank {rank}: {name} differs from one Index"
        assert torch.equal(values, expected.values)
        assert torch.equal(loaded_indices, expected.indices), f"rank {rank}: {name} after save/load"
        assert torch.equal(loaded_values, expected.values)
    manifest = json.loads(open(os.path.join(outdir, name, "manifest.json")).read())
    assert manifest["world_size"] == 2 and manifest["count"] == N and manifest["ids"] == ids
    assert manifest["counts"] == ([N, 0] if empty else [SPLIT, N - SPLIT])


INDEX_ERRORS = {
    "save-exists": ("FileExistsError", "overwrite=True"),
    "metric": ("ValueError", "rank 0: ip, rank 1: l2"),
    "empty": ("ValueError", "empty on every rank"),
    "k-too-large": ("ValueError", "k must be between 1 and 10"),
    "corrupt": ("ValueError", "sha256"),
    "op": ("ValueError", "rank 0: knn, rank 1: ShardedIndex.search"),
}


@pytest.mark.parametrize("name", sorted(INDEX_ERRORS))
def test_sharded_index_errors_raise_on_every_rank(index_results, name):
    want_type, text = INDEX_ERRORS[name]
    for rank, r in enumerate(index_results[0]):
        got_type, message = r["errors"][name]
        assert got_type == want_type and text in message, f"rank {rank}: {got_type}: {message}"
    if name == "corrupt":
        assert "rank 1 failed: " in index_results[0][0]["errors"][name][1]


def test_sharded_index_load_needs_the_saving_world_size(index_results):
    got_type, message = index_results[0][0]["errors"]["world-size"]
    assert got_type == "ValueError" and "saved by 2 ranks and is loaded by 1" in message


def test_sharded_index_add_rules():
    index = tld.ShardedIndex("ip").add(np.ones((3, 2), np.float32), ids=[4, 5, 6])
    with pytest.raises(ValueError, match="give ids to every add"):
        index.add(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="ids repeat"):
        index.add(np.ones((2, 2), np.float32), ids=[6, 7])
    assert len(index) == 3
    with pytest.raises(RuntimeError, match="init_process_group"):
        index.search(np.ones((1, 2), np.float32), 1)


# ---------------------------------------------------------------- data-parallel extraction

def tiny_images(n: int = 11) -> np.ndarray:
    """uint8 NHWC images whose first pixel is the row number, so a rank's share is visible."""
    imgs = np.random.default_rng(5).integers(0, 255, (n, 9, 9, 3), dtype=np.uint8)
    imgs[:, 0, 0, 0] = np.arange(n)
    return imgs


def tiny_extractor():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Conv2d(6, 5, 3))
    return tlfast.Extractor.from_module(module)


def extract_program(rank, world, path):
    extractor = tiny_extractor()
    seen = []
    extract = extractor.extract

    def recording(data, **kw):  # the rows this rank extracts
        seen.extend(np.asarray(data)[:, 0, 0, 0].tolist())
        return extract(data, **kw)

    extractor.extract = recording
    store = extractor.extract_to(path, tiny_images(), shard_size=3)
    return seen, np.asarray(store[:]).copy(), store.num_shards


def test_extract_to_writes_disjoint_shards_on_two_ranks(tmp_path):
    path = str(tmp_path / "store")
    results = all_ok(run_ranks(extract_program, path))
    # 11 rows in shards of 3 -> shards 0..3; rank r writes the shards i with i % 2 == r.
    assert results[0][0] == [0, 1, 2, 6, 7, 8] and results[1][0] == [3, 4, 5, 9, 10]
    expected = tiny_extractor().extract(tiny_images()).numpy()
    for seen, features, shards in results:
        assert shards == 4
        np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    store = tlfast.FeatureStore(path, verify=True)  # rank 0's manifest; every shard's sha256 checked
    assert len(store) == 11 and store.dim == expected.shape[1]
    np.testing.assert_allclose(np.asarray(store[:]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("larger_is_better", [True, False])
def test_gathered_order_equals_the_two_sort_merge(larger_is_better):
    # Rank-after-rank candidates (4 ranks x k = 6) with heavy exact ties, -0.0 / +0.0, +-inf and
    # padding: the one-selection merge of the gather path picks the same columns as merge_topk.
    rng = np.random.default_rng(11)
    world, k, n, rows = 4, 6, 300, 50
    pool = np.array([-np.inf, -1.5, -0.0, 0.0, 0.25, 0.25, 3.0, np.inf], dtype=np.float32)
    values, indices = [], []
    for r in range(world):
        v = torch.from_numpy(rng.choice(pool, (n, k)))
        i = torch.from_numpy(rng.integers(0, rows, (n, k))) + r * rows
        order = tld._merge_order(v, i, k, larger_is_better)  # each rank's list: best first, ties by index
        v, i = v.gather(1, order), i.gather(1, order)
        pad = torch.from_numpy(rng.random((n, k)) < 0.2).cumsum(1) > 0  # padded tails
        v[pad], i[pad] = tld._worst_value(larger_is_better), tld.PAD_INDEX
        values.append(v)
        indices.append(i)
    values, indices = torch.cat(values, 1), torch.cat(indices, 1)
    # Unique global indices per row, as real candidates have.
    indices = torch.where(indices == tld.PAD_INDEX, indices,
                          indices * world * k + torch.arange(world * k))
    fast = tld._gathered_order(values, indices, k, larger_is_better)
    want_v, want_i = tld.merge_topk(values, indices, k, larger_is_better)
    assert torch.equal(indices.gather(1, fast), want_i)
    assert torch.equal(values.gather(1, fast), want_v)
