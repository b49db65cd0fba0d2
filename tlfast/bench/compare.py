"""``tlfast bench compare old.json new.json``: ratios per case, and a verdict for CI.

Cases match by (suite, case, contender, params).  The ratio is new median / old median of the
case's time per call (> 1: slower).  A case regresses when the ratio exceeds 1 + threshold and the
two sample sets do not overlap much — the new run's fastest quarter is slower than the old run's
median — so one noisy sample on a shared machine does not fail a build.  Recall (approximate search)
regresses when it falls by more than ``recall_drop``.
"""
from __future__ import annotations

import numpy as np

from .schema import case_key, load


def compare(old: dict, new: dict, threshold: float = 0.10, recall_drop: float = 0.01) -> tuple[list[dict], list[str]]:
    """(rows of the comparison table, notes on unmatched cases)."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (a fraction, e.g. 0.1 = 10% slower), got {threshold}")
    olds = {case_key(old["suite"], r): r for r in old["cases"]}
    news = {case_key(new["suite"], r): r for r in new["cases"]}
    rows, notes = [], []
    for key, n in news.items():
        o = olds.get(key)
        if o is None:
            notes.append(f"new case {key[1]} / {key[2]}: not in the old run")
            continue
        if o.get("error") or n.get("error") or not o.get("median_s") or not n.get("median_s"):
            rows.append({"case": key[1], "contender": key[2], "old_s": o.get("median_s"), "new_s": n.get("median_s"),
                         "ratio": None, "verdict": "error" if n.get("error") else "n/a"})
            continue
        ratio = n["median_s"] / o["median_s"]
        q25_new = float(np.percentile(n.get("samples_s") or [n["median_s"]], 25))
        slower = ratio > 1 + threshold and q25_new > o["median_s"]
        faster = ratio < 1 / (1 + threshold)
        verdict = "REGRESSION" if slower else "faster" if faster else "same"
        ro, rn = o["metrics"].get("recall_at_k"), n["metrics"].get("recall_at_k")
        if ro is not None and rn is not None and rn < ro - recall_drop:
            verdict = "REGRESSION (recall)"
        rows.append({"case": key[1], "contender": key[2], "old_s": o["median_s"], "new_s": n["median_s"],
                     "ratio": ratio, "verdict": verdict, "recall_old": ro, "recall_new": rn})
    for key in olds.keys() - news.keys():
        notes.append(f"case {key[1]} / {key[2]} is missing from the new run")
    return rows, notes


def table(rows: list[dict], old_name: str, new_name: str, threshold: float) -> str:
    out = [f"new = {new_name}, old = {old_name}; ratio = new / old time per call (> 1: slower); "
           f"regression threshold +{100 * threshold:g}%", "",
           "| case | contender | old | new | new/old | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        old = "-" if r["old_s"] is None else f"{r['old_s']:.4g} s"
        new = "-" if r["new_s"] is None else f"{r['new_s']:.4g} s"
        rec = ""
        if r.get("recall_new") is not None:
            rec = f" (recall {r['recall_old']:.4f} -> {r['recall_new']:.4f})"
        out.append(f"| {r['case']} | {r['contender']} | {old} | {new} | {ratio} | {r['verdict']}{rec} |")
    return "\n".join(out)


def compare_files(old_path, new_path, threshold: float = 0.10) -> tuple[str, bool]:
    """(printable report, whether any case regressed)."""
    old, new = load(old_path), load(new_path)
    if old["suite"] != new["suite"]:
        raise ValueError(f"{old_path} is suite {old['suite']!r}, {new_path} is {new['suite']!r}: "
                         f"compare runs of one suite")
    rows, notes = compare(old, new, threshold)
    if not rows:
        raise ValueError(f"no case of {new_path} matches one of {old_path} (same case, contender and params)")
    mo, mn = old["machine"], new["machine"]
    text = table(rows, str(old_path), str(new_path), threshold)
    if (mo.get("cpu_model"), mo.get("threads")) != (mn.get("cpu_model"), mn.get("threads")):
        notes.append(f"the runs are from different machines ({mo.get('cpu_model')}, {mo.get('threads')} threads vs "
                     f"{mn.get('cpu_model')}, {mn.get('threads')} threads): ratios compare machines too")
    if notes:
        text += "\n\n" + "\n".join(f"* {n}" for n in notes)
    bad = [r for r in rows if r["verdict"].startswith("REGRESSION") or r["verdict"] == "error"]
    text += f"\n\n{len(bad)} regression(s) of {len(rows)} matched case(s)"
    return text, bool(bad)
