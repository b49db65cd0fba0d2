"""A checkable cost model of the GPU benchmark cases (shared/BENCHMARKS.md "GPU cases").

For each case (metric, nq, n, d, k, dtype) and device (H100 SXM, H200 SXM), the fused Triton kNN
kernel's work and traffic, and the time each resource alone needs:

    tensor cores   2 nq n d FLOPs at the dense fp16/bf16 rate                 (ip, cosine, l2, kl)
    CUDA cores     per pair: the epilogue and the select pre-filter, EPILOGUE_OPS lane-instructions,
                   plus the insertion rounds (below); per (pair, dim) for js: JS_OPS
    MUFU           js only: one lg2 per (pair, dim), 16 per SM per clock
    HBM            queries once, the corpus once per wave of resident programs, the split
                   partials, the preprocessed operands (log c for kl, norms for cosine)

Insertion rounds: with random data a row's list takes about k (1 + ln(n / k)) entries in all
(the expected number of records of a random stream); a tile pays as many rounds as its busiest
row, taken as ROUND_SKEW times the mean, each round costing INSERT_OPS per tile entry.

predicted_s is max(...) (the resources overlap perfectly: a lower bound) and serial_s the sum
(no overlap: an upper bound).  The reference route (chunked mm + topk) writes and re-reads the
full score matrix: its HBM term alone is given for comparison.  Device figures are the vendors'
datasheet numbers (dense, no sparsity); clocks at boost.  Nothing here was measured on a GPU:
bench_gpu.py puts the measured time beside the prediction once a device runs it.

    python benchmarks/cost_model.py --out benchmarks/results          # gpu-cost-model.{json,md}
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

DEVICES = {
    # name: HBM bytes/s, dense fp16/bf16 tensor FLOP/s, SMs, boost clock Hz
    "H100 SXM": dict(hbm=3.35e12, tensor=989.4e12, sms=132, clock=1.98e9),
    "H200 SXM": dict(hbm=4.8e12, tensor=989.4e12, sms=132, clock=1.98e9),
}
LANES_PER_SM = 128   # FP32 lanes: 4 schedulers x 32 (one lane-instruction per clock each)
MUFU_PER_SM = 16     # lg2 / ex2 per SM per clock
# Lane-instructions per (query, corpus) pair outside the product: epilogue (cosine: 2 multiplies;
# kl: 1 subtract; l2: 3), the invalid mask (2 compares, 1 or), the pre-filter (compare with the
# row threshold, NaN compare, or, and-not, the any-reduction), counted from fused_knn / select.
EPILOGUE_OPS = {"ip": 7, "cosine": 9, "l2": 10, "kl": 8}
JS_OPS = 5           # per (pair, dim): add, select (s > 0), fma; + the pair's epilogue amortised
INSERT_OPS = 14      # per tile entry per insertion round (_insert: compares, where, reductions)
ROUND_SKEW = 1.5
CASES = [("cosine", 65536, 1 << 20, 128), ("kl", 65536, 1 << 20, 128), ("js", 8192, 262144, 64)]
KS = (10, 100)
DTYPES = ("float16", "bfloat16")
BLOCK_M = {"js": 32}  # else 64 (fused_knn._block_m)
BLOCK_N = {"js": 64}  # else 128 (the first config of each list)


def predict(metric: str, nq: int, n: int, d: int, k: int, dtype: str, device: str,
            blocks_per_sm: int = 1) -> dict:
    dev = DEVICES[device]
    elem = 2 if dtype in ("float16", "bfloat16") else 4
    pairs = float(nq) * n
    bm = BLOCK_M.get(metric, 64)
    bn = BLOCK_N.get(metric, 64 if k > 32 else 128)
    programs = math.ceil(nq / bm)
    resident = dev["sms"] * blocks_per_sm
    splits = 1 if programs >= 2 * dev["sms"] else max(1, math.ceil(2 * dev["sms"] / programs))
    waves = math.ceil(programs * splits / resident)
    lane_rate = dev["sms"] * LANES_PER_SM * dev["clock"]
    entries_per_row = min(n, k * (1.0 + math.log(max(n / k, 1.0))))
    rounds = ROUND_SKEW * entries_per_row * programs           # rounds summed over query blocks
    insert_ops = rounds * bm * bn * INSERT_OPS
    if metric == "js":
        flops = 0.0
        alu_ops = pairs * d * JS_OPS + pairs * EPILOGUE_OPS["kl"] + insert_ops
        mufu = pairs * d
    else:
        flops = 2.0 * pairs * d
        alu_ops = pairs * EPILOGUE_OPS[metric] + insert_ops
        mufu = 0.0
    prep = {"cosine": 2 * (nq + n) * d * elem, "kl": 2 * n * d * elem + nq * d * elem, "l2": (nq + n) * d * elem,
            "js": (nq + n) * d * elem}.get(metric, 0)
    bytes_ = nq * d * elem + waves * n * d * elem + splits * nq * k * 8 * 2 + prep
    times = dict(tensor_s=flops / dev["tensor"], alu_s=alu_ops / lane_rate,
                 mufu_s=mufu / (dev["sms"] * MUFU_PER_SM * dev["clock"]), hbm_s=bytes_ / dev["hbm"])
    bound = max(times, key=times.get)
    reference_hbm = 2 * pairs * elem / dev["hbm"]  # chunked mm + topk: scores written and read once
    return dict(metric=metric, nq=nq, n=n, d=d, k=k, dtype=dtype, device=device, flops=flops,
                alu_ops=alu_ops, mufu_ops=mufu, hbm_bytes=bytes_, waves=waves, **times,
                predicted_s=max(times.values()), serial_s=sum(times.values()), bound=bound.replace("_s", ""),
                reference_hbm_s=reference_hbm)


def all_predictions(blocks_per_sm: int = 1) -> list[dict]:
    return [predict(m, nq, n, d, k, dt, dev, blocks_per_sm)
            for dev in DEVICES for dt in DTYPES for m, nq, n, d in CASES for k in KS]


def markdown(rows: list[dict]) -> str:
    lines = ["# Cost model of the GPU benchmark cases (predicted, not measured)", "",
             "Fused Triton kNN; see benchmarks/cost_model.py for the terms.  predicted = max of the "
             "resource times (perfect overlap), serial = their sum; reference HBM = the score matrix "
             "written and re-read by the chunked mm + topk route.  Arithmetic from the devices' published "
             "rates, no timing on any machine (so no CPU flags enter it).", "",
             "| device | case | dtype | k | GFLOP | ALU Gops | HBM GB | tensor ms | ALU ms | MUFU ms | HBM ms | "
             "predicted ms | serial ms | bound | reference HBM ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | knn-{r['metric']} {r['nq']}x{r['n']}x{r['d']} | {r['dtype']} | {r['k']} | "
                     f"{r['flops'] / 1e9:.0f} | {r['alu_ops'] / 1e9:.0f} | {r['hbm_bytes'] / 1e9:.2f} | "
                     f"{r['tensor_s'] * 1e3:.1f} | {r['alu_s'] * 1e3:.1f} | {r['mufu_s'] * 1e3:.1f} | "
                     f"{r['hbm_s'] * 1e3:.2f} | {r['predicted_s'] * 1e3:.1f} | {r['serial_s'] * 1e3:.1f} | "
                     f"{r['bound']} | {r['reference_hbm_s'] * 1e3:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = all_predictions()
    text = markdown(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "predicted from published device rates; no timing on any machine",
                "cpu_flags": "none: arithmetic only, independent of the CPU (and of avx2/avx512/amx)",
                "devices": sorted({r["device"] for r in rows})}
        (args.out / "gpu-cost-model.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        (args.out / "gpu-cost-model.md").write_text(text)


if __name__ == "__main__":
    main()
