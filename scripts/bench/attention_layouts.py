#!/usr/bin/env python
"""How one attention layer of a packed batch is cheapest on this machine: three ways to run it.

    python scripts/bench/attention_layouts.py

The packed batch of ``profile_step.py`` (16 examples of 36-400 tokens in rows of 512), with the
SmolLM2-135M attention shape (9 query heads, 3 key/value heads of 64), in transformers' layout (the
projections viewed and transposed). Forward + backward of SDPA per layout, alternating, median of 5:

- ``mask + repeat_kv``: what transformers runs for packed rows on sdpa: a block-diagonal causal mask
  over each whole row, key/value heads repeated to the query heads;
- ``mask + enable_gqa``: the same mask, SDPA's grouped-query path instead of the repeat;
- ``per sequence``: one causal SDPA call per packed sequence (and per row tail), skipping the blocks
  between sequences that the mask computes and throws away.

Writes ``results/attention_layouts.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from common import RESULTS, SMOLLM2_135M, code_fingerprint, code_label, machine
from profile_step import packed_batch  # also puts this checkout's align_runner on sys.path

HEADS, KV_HEADS, HEAD_DIM = (SMOLLM2_135M[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    batch = packed_batch(16, 512, SMOLLM2_135M["vocab_size"], seed=0)
    seq = batch["sequence_ids"]
    rows, width = seq.shape
    # (row, start, end) of every sequence and of each row's padded tail
    spans = []
    for r in range(rows):
        ids = seq[r].tolist()
        start = 0
        for t in range(1, width + 1):
            if t == width or ids[t] != ids[start]:
                spans.append((r, start, t))
                start = t
    same = seq[:, :, None] == seq[:, None, :]
    mask = (same & torch.ones(width, width, dtype=torch.bool).tril())[:, None]
    q_proj = torch.randn(rows, width, HEADS * HEAD_DIM, requires_grad=True)
    k_proj = torch.randn(rows, width, KV_HEADS * HEAD_DIM, requires_grad=True)
    v_proj = torch.randn(rows, width, KV_HEADS * HEAD_DIM, requires_grad=True)
    group = HEADS // KV_HEADS

    def heads(x, n):
        return x.view(rows, width, n, HEAD_DIM).transpose(1, 2)

    def repeat(x):
        return x[:, :, None].expand(rows, KV_HEADS, group, width, HEAD_DIM).reshape(rows, HEADS, width, HEAD_DIM)

    def mask_repeat():
        q, k, v = heads(q_proj, HEADS), heads(k_proj, KV_HEADS), heads(v_proj, KV_HEADS)
        return F.scaled_dot_product_attention(q, repeat(k), repeat(v), attn_mask=mask).transpose(1, 2)

    def mask_gqa():
        q, k, v = heads(q_proj, HEADS), heads(k_proj, KV_HEADS), heads(v_proj, KV_HEADS)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)

    def per_sequence():
        q, k, v = heads(q_proj, HEADS), heads(k_proj, KV_HEADS), heads(v_proj, KV_HEADS)
        parts = [
            F.scaled_dot_product_attention(q[r : r + 1, :, a:b], k[r : r + 1, :, a:b], v[r : r + 1, :, a:b],
                                           is_causal=True, enable_gqa=True).transpose(1, 2)
            for r, a, b in spans
        ]
        return torch.cat(parts, 1).view(rows, width, HEADS, HEAD_DIM)

    layouts = {"mask + repeat_kv": mask_repeat, "mask + enable_gqa": mask_gqa, "per sequence": per_sequence}
    reference = mask_repeat()
    agree = {name: float((fn() - reference).abs().max()) for name, fn in layouts.items()}
    grad = torch.randn_like(reference)
    seconds = {name: [] for name in layouts}
    for fn in layouts.values():  # one unmeasured pass each
        fn().backward(grad)
    for _ in range(args.repeats):
        for name, fn in layouts.items():
            t0 = time.perf_counter()
            fn().backward(grad)
            seconds[name].append(time.perf_counter() - t0)
    result = {
        "rows": rows, "width": width, "sequences": len(spans), "threads": args.threads,
        "max_abs_difference": agree, "seconds": seconds,
        "median_s": {k: statistics.median(v) for k, v in seconds.items()},
        "code": code_fingerprint(), "machine": machine(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "attention_layouts.json").write_text(json.dumps(result, indent=2) + "\n")
    base = result["median_s"]["mask + repeat_kv"]
    md = "\n".join([
        "# attention_layouts: one attention layer of a packed batch, forward + backward",
        "",
        f"`python scripts/bench/attention_layouts.py` at {code_label(result['code'])}: {rows} rows of {width} tokens, "
        f"{len(spans)} spans (sequences and row tails), {HEADS} / {KV_HEADS} heads of {HEAD_DIM}, fp32, {args.threads} thread(s); "
        f"median of {args.repeats}, alternating.",
        "",
        "| layout | seconds (median) | vs mask + repeat_kv | max abs difference from it |",
        "|---|---:|---:|---:|",
        *(f"| {k} | {v:.4f} | {v / base:.2f}x | {agree[k]:.1e} |" for k, v in result["median_s"].items()),
        "",
    ])
    (RESULTS / "attention_layouts.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
