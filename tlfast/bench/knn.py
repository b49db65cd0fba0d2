"""Throughput suites: exact kNN (``knn``) and the pipeline layer on top of it (``pipeline``).

Every case builds its contenders once, warms each up, then times them in interleaved rounds
(``timing.interleaved``), so a change of load on a shared machine hits all of them alike.  tlfast's
contender is named ``tlfast`` (its backend in the params); every other contender is a peer with
``peer_of="tlfast"``, and every ratio in the report names the peer it is against.

    tlfast bench knn --quick
    tlfast bench knn --n 1000000 --d 768 --k 10 --metric cosine --dtype bf16
    tlfast bench knn --queries q.npy --corpus feats/ --metric cosine
"""
from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .data import knn_data
from .schema import case_row
from .timing import interleaved

GEMM_METRICS = {"ip", "cosine", "l2", "kl"}
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class KnnCase:
    """One exact-kNN case.  ``precision`` is passed through to ``tlfast.knn`` when not None (for
    backends with reduced-precision modes); ``contenders`` names who runs (see ``contenders``)."""

    name: str
    metric: str
    nq: int
    n: int
    d: int
    k: int = 10
    data: str = "normal"  # "normal" or "dirichlet"; ignored when queries / corpus are given
    dtype: str = "float32"
    contenders: tuple[str, ...] = ("tlfast", "faiss", "torch-mm-topk", "reference")
    precision: str | None = None
    quick: tuple[int, int, int] | None = None  # (nq, n, d) for --quick
    queries: np.ndarray | None = field(default=None, repr=False, compare=False)
    corpus: np.ndarray | None = field(default=None, repr=False, compare=False)

    def params(self) -> dict:
        p = {"metric": self.metric, "nq": self.nq, "n": self.n, "d": self.d, "k": self.k, "dtype": self.dtype,
             "data": self.data if self.queries is None else "user files"}
        if self.precision is not None:
            p["precision"] = self.precision
        return p


# BENCHMARKS.md's standard CPU cases.
CASES: dict[str, KnnCase] = {c.name: c for c in (
    KnnCase("knn-cosine", "cosine", 10_000, 100_000, 128, quick=(500, 5_000, 128)),
    KnnCase("knn-l2", "l2", 10_000, 100_000, 128, quick=(500, 5_000, 128)),
    KnnCase("knn-kl", "kl", 1_000, 20_000, 64, data="dirichlet",
            contenders=("tlfast", "torch-gemm-form", "torch-naive", "reference"), quick=(100, 2_000, 64)),
    KnnCase("knn-js", "js", 1_000, 20_000, 64, data="dirichlet",
            contenders=("tlfast", "faiss", "torch-naive", "reference"), quick=(100, 2_000, 64)),
)}


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _torch_route(metric, q, c, k, chunk=1024):
    """torch as a user writes it: tiles of q @ c.T (or the metric's GEMM form) + topk, in the
    inputs' dtype (the machine's own matrix-unit rate for that dtype)."""
    import torch

    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
        c = torch.nn.functional.normalize(c, dim=1)
    cn = (c.float() ** 2).sum(1)
    logc = torch.log(c.clamp_min(1e-30)) if metric == "kl" else None

    def run():
        vals, idx = [], []
        for i in range(0, q.shape[0], chunk):
            qi = q[i:i + chunk]
            if metric in ("cosine", "ip"):
                v, j = torch.topk((qi @ c.T).float(), k, dim=1)
            elif metric == "l2":
                dist = (qi.float() ** 2).sum(1, keepdim=True) + cn[None] - 2 * (qi @ c.T).float()
                v, j = torch.topk(dist, k, dim=1, largest=False)
            else:  # kl, GEMM form
                dist = torch.special.xlogy(qi, qi).float().sum(1, keepdim=True) - (qi @ logc.T).float()
                v, j = torch.topk(dist, k, dim=1, largest=False)
            vals.append(v)
            idx.append(j)
        return torch.cat(vals), torch.cat(idx)

    return run


def _torch_naive(metric, q, c, k, block=64):
    """The divergence written out pair by pair with broadcasting (what a user writes first)."""
    import torch

    q, c = q.float(), c.float()

    def div(a, b):
        if metric == "kl":
            return torch.special.xlogy(a, a / b).sum(-1)
        m = (a + b) / 2
        return 0.5 * (torch.special.xlogy(a, a / m) + torch.special.xlogy(b, b / m)).sum(-1)

    def run():
        vals, idx = [], []
        for i in range(0, q.shape[0], block):
            v, j = torch.topk(div(q[i:i + block, None, :], c[None, :, :]), k, dim=1, largest=False)
            vals.append(v)
            idx.append(j)
        return torch.cat(vals), torch.cat(idx)

    return run


def _faiss(metric, q, c, k):
    import faiss

    q = np.ascontiguousarray(q.float().cpu().numpy())
    c = np.ascontiguousarray(c.float().cpu().numpy())
    d = q.shape[1]
    if metric == "cosine":
        c = c / np.linalg.norm(c, axis=1, keepdims=True)
        index, label = faiss.IndexFlatIP(d), "faiss-cpu IndexFlatIP (normalised, float32)"
    elif metric == "ip":
        index, label = faiss.IndexFlatIP(d), "faiss-cpu IndexFlatIP (float32)"
    elif metric == "l2":
        index, label = faiss.IndexFlatL2(d), "faiss-cpu IndexFlatL2 (float32)"
    elif metric == "js":
        index, label = faiss.IndexFlat(d, faiss.METRIC_JensenShannon), "faiss-cpu IndexFlat JensenShannon"
    else:
        raise ValueError(f"faiss has no flat {metric} index")
    index.add(c)

    def run():
        qq = q / np.linalg.norm(q, axis=1, keepdims=True) if metric == "cosine" else q
        return index.search(np.ascontiguousarray(qq, dtype=np.float32), k)

    return label, run


def contenders(case: KnnCase, q, c, backend: str = "auto") -> dict[str, tuple[Callable, str | None]]:
    """{label: (fn, peer_of)} for the case's contenders; a peer whose package is missing is
    reported as an error row by the caller (ImportError propagates per contender)."""
    import tlfast

    out: dict[str, tuple[Callable, str | None]] = {}
    extra = {} if case.precision is None else {"precision": case.precision}
    for name in case.contenders:
        if name == "tlfast":
            out["tlfast"] = (lambda: tlfast.knn(q, c, case.k, case.metric, backend=backend, **extra), None)
        elif name == "reference":
            out["tlfast reference (pure PyTorch, chunked)"] = (
                lambda: tlfast.knn(q, c, case.k, case.metric, backend="reference"), "tlfast")
        elif name in ("torch-mm-topk", "torch-gemm-form"):
            out[f"torch {'mm' if name == 'torch-mm-topk' else 'GEMM form'} + topk ({case.dtype})"] = (
                _torch_route(case.metric, q, c, case.k), "tlfast")
        elif name == "torch-naive":
            out["torch broadcast (naive)"] = (_torch_naive(case.metric, q, c, case.k), "tlfast")
        elif name == "faiss":
            label, fn = _faiss(case.metric, q, c, case.k)
            out[label] = (fn, "tlfast")
        else:
            raise ValueError(f"unknown contender {name!r}")
    return out


def mm_rate(dtype: str, quick: bool, device: str = "cpu") -> dict:
    """This machine's own matrix-product rate in ``dtype`` (torch.mm, all threads): the roofline."""
    import torch

    from .timing import measure

    # Half precision on a CPU without bf16 / fp16 matrix units runs at a few GFLOP/s: small shape.
    small = quick or (dtype != "float32" and not device.startswith("cuda"))
    m, kk, n = ((256, 128, 1024) if dtype != "float32" else (1024, 128, 4096)) if small else (4096, 128, 16384)
    a = torch.randn(m, kk, device=device).to(_torch_dtype(dtype))
    b = torch.randn(kk, n, device=device).to(_torch_dtype(dtype))
    s = measure(lambda: torch.mm(a, b), repeats=7, device=device)
    return {"dtype": dtype, "shape": [m, kk, n], "median_s": s.median, "gflops": 2.0 * m * kk * n / s.median / 1e9}


def run_knn_case(case: KnnCase, *, rounds: int = 5, backend: str = "auto", device: str = "cpu",
                 mm_gflops: float | None = None, tick=None) -> list[dict]:
    """Schema rows of one case: every contender timed in interleaved rounds."""
    import torch

    dt = _torch_dtype(case.dtype)
    if case.queries is not None:
        q, c = case.queries, case.corpus
    else:
        q, c = knn_data(case.data, case.nq, case.n, case.d)
    q = torch.as_tensor(q).to(device=device, dtype=dt)
    c = torch.as_tensor(c).to(device=device, dtype=dt)
    params = case.params()
    rows, fns = [], {}
    for name in case.contenders:
        try:
            fns.update(contenders(replace(case, contenders=(name,)), q, c, backend))
        except (ImportError, ValueError, RuntimeError) as exc:
            rows.append(case_row(case.name, name, params, peer_of=None if name == "tlfast" else "tlfast",
                                 error=f"{type(exc).__name__}: {exc}"))
    callables = {label: fn for label, (fn, _) in fns.items()}
    timed = interleaved(callables, rounds=rounds, device=device, progress=tick)
    flops = 2.0 * case.nq * case.n * case.d if case.metric in GEMM_METRICS else None
    for label, (_, peer_of) in fns.items():
        s = timed[label]
        metrics = {"queries_per_s": case.nq / s.median}
        if flops:
            metrics["gflops"] = flops / s.median / 1e9
            if mm_gflops:
                metrics["pct_of_torch_mm"] = 100 * metrics["gflops"] / mm_gflops
        if label == "tlfast":
            metrics["backend"] = backend
        rows.append(case_row(case.name, label, params, peer_of=peer_of, samples=s, metrics=metrics))
    del q, c, fns, callables
    gc.collect()
    return rows


# ------------------------------------------------------------------------------------- pipeline
def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, d)).astype(np.float32)
    return centres[rng.integers(0, 64, n)] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)


PIPELINE_CASES = {"index-cosine": (1_000, 200_000, 128, 10), "match-cosine": (20_000, 20_000, 128, 1)}
PIPELINE_QUICK = {"index-cosine": (200, 20_000, 64), "match-cosine": (3_000, 3_000, 64)}


def run_pipeline_case(case: str, quick: bool, *, rounds: int = 5, tick=None) -> list[dict]:
    """index-cosine: tlfast.knn vs Index.search (in memory, float16 storage, out-of-core with a
    budget of 1/4 of the corpus, memory-mapped from a saved index) vs faiss IndexFlatIP;
    match-cosine: tlfast.match vs the full similarity matrix in torch vs scikit-learn brute force."""
    import torch

    import tlfast

    nq, n, d, k = PIPELINE_CASES[case]
    if quick:
        nq, n, d = PIPELINE_QUICK[case]
    q, c = _clustered(nq, d, 1), _clustered(n, d, 2)
    params = {"metric": "cosine", "nq": nq, "n": n, "d": d, "k": k}
    fns: dict[str, tuple[Callable, str | None]] = {}
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        if case == "index-cosine":
            budget = c.nbytes // 4
            fns["Index.search"] = (lambda ix=tlfast.Index("cosine").add(c): ix.search(q, k), None)
            fns["tlfast.knn"] = (lambda: tlfast.knn(q, c, k, "cosine"), "Index.search")
            fns["Index.search float16 storage"] = (
                lambda ix=tlfast.Index("cosine", dtype="float16").add(c): ix.search(q, k), "Index.search")
            fns["Index.search budget 1/4"] = (
                lambda ix=tlfast.Index("cosine").add(c): ix.search(q, k, memory_budget=budget), "Index.search")
            tlfast.Index("cosine").add(c).save(Path(tmp) / "ix")
            mm = tlfast.Index.load(Path(tmp) / "ix", mmap=True)
            fns["Index.search mmap budget 1/4"] = (lambda: mm.search(q, k, memory_budget=budget), "Index.search")
            try:
                label, fn = _faiss("cosine", torch.from_numpy(q), torch.from_numpy(c), k)
                fns[label] = (fn, "Index.search")
            except ImportError as exc:
                errors.append(("faiss-cpu IndexFlatIP", f"ImportError: {exc}"))
        else:
            fns["tlfast.match"] = (lambda: tlfast.match(q, c, "cosine"), None)
            a = torch.nn.functional.normalize(torch.from_numpy(q), dim=1)
            b = torch.nn.functional.normalize(torch.from_numpy(c), dim=1)

            def full():
                sim = a @ b.T  # the n x m matrix tlfast never builds
                fwd, back = sim.argmax(1), sim.argmax(0)
                return (back[fwd] == torch.arange(len(a))).nonzero()[:, 0]

            fns["torch full similarity matrix + argmax"] = (full, "tlfast.match")
            try:
                from sklearn.neighbors import NearestNeighbors

                def brute():
                    nn = lambda fit, ask: NearestNeighbors(n_neighbors=1, algorithm="brute",  # noqa: E731
                                                           metric="cosine").fit(fit).kneighbors(ask)[1][:, 0]
                    fwd, back = nn(c, q), nn(q, c)
                    return np.nonzero(back[fwd] == np.arange(len(q)))[0]

                fns["scikit-learn NearestNeighbors brute"] = (brute, "tlfast.match")
            except ImportError as exc:
                errors.append(("scikit-learn NearestNeighbors brute", f"ImportError: {exc}"))
        timed = interleaved({lb: fn for lb, (fn, _) in fns.items()}, rounds=rounds, progress=tick)
    rows = [case_row(case, lb, params, peer_of=peer, samples=timed[lb], metrics={"queries_per_s": nq / timed[lb].median})
            for lb, (_, peer) in fns.items()]
    rows += [case_row(case, lb, params, peer_of=next(iter(fns)), error=e) for lb, e in errors]
    return rows
