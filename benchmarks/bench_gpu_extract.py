"""GPU extraction case for benchmarks/gpu_check.sh: a MiniLM-shaped BERT with random weights.

The real MiniLM weights do not travel to the GPU machine, so the model is transformers'
``BertModel`` built from a ``BertConfig`` of all-MiniLM-L6-v2's shape (6 layers, hidden 384,
12 heads, FFN 1536) with seeded random weights; inputs are random token ids with lengths
uniform in 4..128 (the CPU benchmark's spread).  Contenders, side by side in one run,
interleaved rounds, medians, cosine to the fp32 Hugging Face embeddings beside every time:

  hf-fp32 / hf-fp16     plain ``AutoModel`` use: batches of 128 in input order, padded to the
                        longest, masked mean pooling in torch (fp16: the weights cast)
  tlfast-fp32 / -fp16 / -bf16
                        ``tlfast.Extractor.from_module(model, precision=...)``: length-sorted
                        token-budget batches, pinned host memory, fused Triton pooling
  unpadded-fp16         the same fp16 weights run on the packed (unpadded) tokens: every
                        linear / LayerNorm / FFN on ``sum(lengths)`` rows instead of
                        ``batch * longest``, attention by SDPA on nested (jagged) tensors

    OUT=/tmp/gpu python benchmarks/bench_gpu_extract.py --out $OUT   # gpu-extract.{json,md}
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512, hidden_act="gelu")


def build_model(device: str) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(**CONFIG, attn_implementation="sdpa"), add_pooling_layer=False)
    return model.eval().to(device)


def token_sequences(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[101] + rng.integers(1000, 30000, int(rng.integers(2, 127))).tolist() + [102] for _ in range(n)]


def _pad(seqs: list[list[int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, seqs))
    ids = torch.zeros(len(seqs), longest, dtype=torch.int64)
    mask = torch.zeros(len(seqs), longest, dtype=torch.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    v = (hidden * m).sum(1).float() / m.sum(1).float().clamp_min(1e-9)
    return torch.nn.functional.normalize(v, dim=-1)


def hf_plain(model: torch.nn.Module, seqs: list[list[int]], device: str, batch: int = 128) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for s in range(0, len(seqs), batch):
            ids, mask = _pad(seqs[s:s + batch], device)
            out.append(_mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask))
    return torch.cat(out)


def unpadded_forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BERT on the packed tokens of a padded batch; returns mean-pooled, normalised (batch, hidden)."""
    lengths = mask.sum(1)
    keep = mask.bool()
    emb = model.embeddings(input_ids=ids)[keep]  # (total, hidden): positions were added per row
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = lengths.cumsum(0)
    heads = model.config.num_attention_heads
    x = emb
    for layer in model.encoder.layer:
        att = layer.attention.self
        head_dim = att.attention_head_size

        def split(t: torch.Tensor) -> torch.Tensor:  # (total, hidden) -> jagged (batch, heads, len, dim)
            nt = torch.nested.nested_tensor_from_jagged(t.view(-1, heads, head_dim), offsets)
            return nt.transpose(1, 2)

        q, k, v = split(att.query(x)), split(att.key(x)), split(att.value(x))
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        ctx = ctx.transpose(1, 2).values().reshape(-1, heads * head_dim)
        x = layer.attention.output(ctx, x)
        x = layer.output(layer.intermediate(x), x)
    sums = torch.zeros(len(lengths), x.shape[1], dtype=torch.float32, device=x.device)
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
    sums.index_add_(0, rows, x.float())
    return torch.nn.functional.normalize(sums / lengths[:, None].float(), dim=-1)


def unpadded(model: torch.nn.Module, seqs: list[list[int]], device: str, max_tokens: int = 16384) -> torch.Tensor:
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = torch.empty(len(seqs), CONFIG["hidden_size"], device=device)
    with torch.inference_mode():
        s = 0
        while s < len(order):
            size = max(1, max_tokens // len(seqs[order[s]]))
            part = order[s:s + size]
            ids, mask = _pad([seqs[i] for i in part], device)
            out[torch.tensor(part, device=device)] = unpadded_forward(model, ids, mask)
            s += size
    return out


def contenders(device: str):
    import tlfast

    fp32 = build_model(device)
    fp16 = build_model(device).half()
    fns = {"hf-fp32": lambda x: hf_plain(fp32, x, device), "hf-fp16": lambda x: hf_plain(fp16, x, device)}
    for precision in ("fp32", "fp16", "bf16"):
        ext = tlfast.Extractor.from_module(build_model(device), device=device, precision=precision,
                                           normalize=True, name=f"minilm-shaped-{precision}")
        fns[f"tlfast-{precision}"] = lambda x, e=ext: e.extract(x, progress=False)
    fns["unpadded-fp16"] = lambda x: unpadded(fp16, x, device)
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".", help="folder for gpu-extract.{json,md}")
    ap.add_argument("--n", type=int, default=8192, help="token sequences per timed call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = args.device
    seqs = token_sequences(args.n)
    fns = contenders(device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    reference = fns["hf-fp32"](seqs).float().cpu()
    times: dict[str, list[float]] = {name: [] for name in fns}
    quality: dict[str, dict] = {}
    for name, fn in fns.items():  # warm-up (kernel selection, Triton compiles) and quality
        got = fn(seqs[:512])
        sync()
        cos = (torch.nn.functional.normalize(fn(seqs).float().cpu(), dim=1) * reference).sum(1)
        quality[name] = {"mean_cos": float(cos.mean()), "min_cos": float(cos.min())}
        del got
    names = list(fns)
    for r in range(args.rounds):  # interleaved, rotating order
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t = time.perf_counter()
            fns[name](seqs)
            sync()
            times[name].append(time.perf_counter() - t)
    tokens = sum(map(len, seqs))
    base = float(np.median(times["hf-fp32"]))
    rows = []
    for name in names:
        med = float(np.median(times[name]))
        rows.append({"case": "extract-minilm-shaped", "contender": name, "median_s": med,
                     "p95_s": float(np.percentile(times[name], 95)), "items_per_s": args.n / med,
                     "tokens_per_s": tokens / med, "speedup_vs_hf_fp32": base / med, **quality[name]})
    dev = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    meta = {"device": dev, "torch": torch.__version__, "n": args.n, "tokens": tokens, "rounds": args.rounds,
            "config": CONFIG, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-extract.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# GPU extraction, MiniLM-shaped BERT, random weights ({dev}, {args.n} sequences, "
             f"{tokens} tokens)", "", "| contender | median s | seq/s | vs hf-fp32 | mean cos | min cos |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['contender']} | {r['median_s']:.4f} | {r['items_per_s']:.0f} | {r['speedup_vs_hf_fp32']:.2f}x "
              f"| {r['mean_cos']:.6f} | {r['min_cos']:.6f} |" for r in rows]
    md = "\n".join(lines) + "\n"
    (out / "gpu-extract.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
