"""Which tune(queries=None) recall estimate matches fresh-query recall? (docs/design/bench.md,
"Honest estimates without queries").

Per family and kind: recall@10 along the search-parameter ladder for 2,000 fresh queries (another
draw of the family) and for 1,000 estimate queries of each candidate construction: corpus rows
with exclude_self ("self"), midpoints of a row and a neighbour ("mid"), neighbour steps
x_i + s·(x_a − x_b) ("diff" s=0.5, "diff1.0", "diff1.5", "diff2.0"), isotropic noise of 0.5 / 1
nearest-neighbour distance ("noise0.5", "noise1"), and for hnsw rows held out of a second graph
built without them ("heldout").  Recall only (no timing), so it needs no benchmark lock.

    python benchmarks/tune_estimates.py gaussian-mixture-l2 100000 hnsw,ivf
    # -> prints the curves; /tmp/tune-estimates-<family>-<kinds>.json
"""
import json
import os
import sys
import time

import numpy as np
import torch

import tlfast
from tlfast import ann
from tlfast.bench import data as bd

fam = sys.argv[1]
n = int(sys.argv[2])
kinds = sys.argv[3].split(",") if len(sys.argv) > 3 else ["hnsw"]
k, m, nq = 10, 1000, 2000
metric, gen, _ = bd.FAMILIES[fam]
if fam == "minilm-cosine":
    emb = bd.minilm_embeddings(n + nq, seed=0)
    x, fresh = emb[:n], emb[n:]
else:
    x, fresh = gen(n, 0), gen(nq, 1)
print(fam, x.shape, metric, "load", os.getloadavg(), flush=True)
out = {"family": fam, "n": n, "load_start": os.getloadavg(), "kinds": {}}
for kind in kinds:
    params = {"engine": "tlfast"} if kind == "ivf-tlfast" else {}
    t0 = time.time()
    index = tlfast.Index(metric, kind="ivf" if kind.startswith("ivf") else kind, **params).add(x)
    obj = index._ann
    rows = obj.stored_rows()
    print(kind, "build", round(time.time() - t0, 1), flush=True)
    rng = np.random.default_rng(0)
    pos = np.sort(rng.choice(n, m, replace=False))
    be = ann._exact_backend()
    nnv, nn = be.knn(torch.from_numpy(rows[pos]), torch.from_numpy(rows), k + 1, obj.metric, False)
    nn = ann._drop_self(nn.numpy(), pos, k)
    xi = rows[pos]
    d1 = np.linalg.norm(rows[nn[:, 0]] - xi, axis=1, keepdims=True)
    j = rows[nn[np.arange(m), rng.integers(0, k, m)]]
    a = rows[nn[np.arange(m), rng.integers(0, k, m)]]
    b = rows[nn[np.arange(m), rng.integers(0, k, m)]]
    g = rng.standard_normal(xi.shape).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)

    def proj(q):
        if metric == "kl":
            q = np.clip(q, 1e-12, None)
            return (q / q.sum(1, keepdims=True)).astype(np.float32)
        return q.astype(np.float32)

    sets = {"fresh": (fresh, False), "self": (xi, True),
            "mid": (proj((xi + j) / 2), False),
            "diff": (proj(xi + 0.5 * (a - b)), False)}
    # a and b drawn independently (a = b in 1 of k cases); tlfast.ann draws two distinct slots
    for sc in (1.0, 1.5, 2.0):
        c = rows[nn[np.arange(m), rng.integers(0, k, m)]]
        e = rows[nn[np.arange(m), rng.integers(0, k, m)]]
        sets[f"diff{sc}"] = (proj(xi + sc * (c - e)), False)
    if metric != "kl":
        sets["noise0.5"] = (proj(xi + 0.5 * d1 * g), False)
        sets["noise1"] = (proj(xi + d1 * g), False)
    if kind == "hnsw":
        hold = np.ones(n, bool); hold[pos] = False
        hidx = tlfast.Index(metric, kind="hnsw").add(x[hold])
        hrows = hidx._ann.stored_rows()
    curves = {}
    ladder = obj.search_param_ladder(k)
    if kind == "hnsw":
        ladder = [v for v in ladder if v <= 400]
    else:
        ladder = [v for v in ladder if v <= 64]
    for name, (q, excl) in sets.items():
        kk = k + 1 if excl else k
        truth = be.knn(torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(rows), kk, obj.metric, False)[1].numpy()
        if excl:
            truth = ann._drop_self(truth, pos, k)
        cur = []
        nd = be.knn(torch.from_numpy(np.ascontiguousarray(obj.rows(q, "q"))), torch.from_numpy(rows), kk, obj.metric, False)[0].numpy()[:, kk - k]
        print("   ", name, "median NN value", float(np.median(nd)), flush=True)
        for v in ladder:
            f = obj.search(q, kk, **{obj.search_param: v})[1]
            if excl:
                f = ann._drop_self(f, pos, k)
            cur.append(float(ann.recall_per_query(f, truth).mean()))
        curves[name] = cur
    if kind == "hnsw":
        ht = be.knn(torch.from_numpy(rows[pos]), torch.from_numpy(hrows), k, obj.metric, False)[1].numpy()
        curves["heldout"] = [float(ann.recall_per_query(hidx._ann.search(rows[pos], k, ef_search=v)[1], ht).mean()) for v in ladder]
        del hidx
    print(kind, "ladder", ladder)
    for name, cur in curves.items():
        dev = [c - f for c, f in zip(cur, curves["fresh"])]
        band = [d for d, f in zip(dev, curves["fresh"]) if 0.8 <= f <= 0.995]
        print(f"  {name:9s}", " ".join(f"{c:.3f}" for c in cur),
              f"| max|dev| in band {max(map(abs, band)) if band else float('nan'):.3f} mean dev {np.mean(band) if band else float('nan'):+.3f}",
              flush=True)
    out["kinds"][kind] = {"ladder": ladder, "curves": curves}
    del index, obj
out["load_end"] = os.getloadavg()
with open(f"/tmp/tune-estimates-{fam}-{'-'.join(kinds)}.json", "w") as fh:
    json.dump(out, fh)
