"""Quality classes of a reduced-precision extractor, measured against its fp32 form.

A precision is only worth picking automatically if it gives the same answers.  Two classes:

* ``"equivalent"``: mean cosine to the fp32 embeddings >= 0.9999 and min >= 0.999 -- downstream
  kNN / OT results cannot tell the two apart;
* ``"int8"``: mean cosine >= 0.99 and top-10 retrieval overlap with fp32 >= 0.9 -- good enough for
  retrieval, not a drop-in replacement.

Both are measured on :func:`texts`: a fixed, deterministic "multilingual-ish" set (English,
European languages with accents, Cyrillic, Greek, Arabic, CJK, Hindi, emoji, code, numbers)
whose lengths run from a single token to the 256-token limit, so that short, long, padded and
truncated batches are all exercised.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["texts", "compare", "quality_class", "EQUIVALENT", "INT8"]

# (mean cosine, min cosine, top-10 overlap) lower bounds per class.
EQUIVALENT = {"mean_cos": 0.9999, "min_cos": 0.999}
INT8 = {"mean_cos": 0.99, "top10_overlap": 0.9}

_SEEDS = (
    "The quick brown fox jumps over the lazy dog.",
    "Transfer learning reuses features learned on a large source domain for a small target task.",
    "Der schnelle braune Fuchs springt über den faulen Hund, während es draußen regnet.",
    "Le café est préparé en forçant de l'eau chaude à travers du café finement moulu.",
    "El aprendizaje por transferencia reutiliza representaciones aprendidas en otro dominio.",
    "La biblioteca dell'università è aperta fino a mezzanotte durante la sessione d'esame.",
    "O gato dorme no sofá enquanto a chuva cai lá fora.",
    "De trein naar Amsterdam vertrekt over vijf minuten van spoor drie.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο.",
    "الثعلب البني السريع يقفز فوق الكلب الكسول.",
    "敏捷的棕色狐狸跳过了懒狗。迁移学习在目标领域重用特征。",
    "素早い茶色の狐がのろまな犬を飛び越える。",
    "빠른 갈색 여우가 게으른 개를 뛰어넘는다.",
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।",
    "Hızlı kahverengi tilki tembel köpeğin üzerinden atlar.",
    "Szybki brązowy lis przeskakuje nad leniwym psem.",
    "Emojis 🙂🚀🔥 and punctuation?! «quotes» — dashes… and ümläuts.",
    "def knn(q, x, k=10): return torch.topk(q @ x.T, k).indices  # cosine on unit rows",
    "Order #48213 shipped on 2024-03-17 at 14:05 UTC, total $1,299.99 (VAT 19%).",
    "https://example.org/path?query=fused+kernel&k=10 was fetched in 12.5 ms.",
    "Espresso is brewed by forcing hot water through finely ground coffee under pressure.",
    "Neural networks approximate functions; attention mixes tokens by learned similarity.",
    "Mountains, rivers and a small museum make the valley worth a long detour in spring.",
)


def texts(n: int = 96) -> list[str]:
    """``n`` texts: a few one-token items (a letter, a digit, an emoji, a CJK character) then
    concatenations of the seed sentences whose word counts grow geometrically up to ~300 words
    (past MiniLM's 256-token limit, so truncation is exercised).  Same list on every call."""
    if n < 8:
        raise ValueError(f"n must be >= 8, got {n}")
    out = ["a", "7", "🙂", "猫"]
    rng = np.random.default_rng(1234)
    words = [w for s in _SEEDS for w in s.split()]
    remaining = n - len(out)
    for i in range(remaining):
        # lengths 1 .. ~300 words, geometric: as many short texts as long ones
        count = int(round(np.exp(np.log(300.0) * i / max(remaining - 1, 1))))
        start = int(rng.integers(len(_SEEDS)))
        pieces: list[str] = []
        j = start
        while sum(len(p.split()) for p in pieces) < count:
            pieces.append(_SEEDS[j % len(_SEEDS)])
            j += int(rng.integers(1, 5))
        text = " ".join(" ".join(pieces).split()[:count])
        out.append(text if text else words[i % len(words)])
    return out


def compare(reference: torch.Tensor, other: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Row-wise cosine of ``other`` to ``reference`` (mean, min) and the top-``k`` retrieval
    overlap: for every row as a query against all rows (itself excluded), the fraction of its
    ``k`` nearest neighbours by cosine under ``reference`` that ``other`` also returns."""
    if reference.shape != other.shape or reference.dim() != 2:
        raise ValueError(f"reference and other must be (n, dim) of one shape, got {tuple(reference.shape)} "
                         f"and {tuple(other.shape)}")
    a = torch.nn.functional.normalize(reference.double(), dim=1)
    b = torch.nn.functional.normalize(other.double(), dim=1)
    cos = (a * b).sum(1)
    k = min(k, len(a) - 1)
    overlap = float("nan")
    if k >= 1:
        eye = torch.eye(len(a), dtype=torch.bool)
        top_a = (a @ a.T).masked_fill(eye, -2).topk(k, dim=1).indices
        top_b = (b @ b.T).masked_fill(eye, -2).topk(k, dim=1).indices
        hits = (top_a.unsqueeze(2) == top_b.unsqueeze(1)).any(2).double().mean()
        overlap = float(hits)
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "top10_overlap": overlap}


def quality_class(stats: dict[str, float]) -> str:
    """``"equivalent"``, ``"int8"`` or ``"below"`` for the numbers :func:`compare` returned."""
    if stats["mean_cos"] >= EQUIVALENT["mean_cos"] and stats["min_cos"] >= EQUIVALENT["min_cos"]:
        return "equivalent"
    if stats["mean_cos"] >= INT8["mean_cos"] and stats["top10_overlap"] >= INT8["top10_overlap"]:
        return "int8"
    return "below"
