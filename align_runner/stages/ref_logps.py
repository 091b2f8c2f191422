"""ref_logps: sequence log-probs of the frozen reference model on every preference pair, computed once.

DPO-family losses compare the policy with a fixed reference (Rafailov et al. 2023, eq. 7). The
reference never changes during training, so its log-probs are a function of (reference model, data,
numerics) alone. This stage computes them as their own cached artifact and the dpo stage reads them
with the data, so a dpo step runs one forward pass (the policy's), not two. The stage key covers the
reference model (upstream key), the data (data_prep key), ``reference.batch_size`` and the precision,
but not the loss: a beta sweep, or a rerun, does no reference forward pass.

Artifact: ``ref-<split>.jsonl`` for the preference view's ``train`` and ``eval`` splits, one line per
prepared row, in the rows' order: ``{"ref_chosen_logps": float, "ref_rejected_logps": float,
"ref_chosen_public_logps": float, "ref_rejected_public_logps": float}`` (the ``public`` sums cover the
first min(chosen, rejected) response tokens of the pair, for LD-DPO's ``ld_alpha``).

The ``unpaired_ref_logps`` kind does the same for KTO's unpaired view: each row's completion and its
mismatched KL completion (``data/unpaired.py``), as ``{"ref_logps": float, "ref_kl_logps": float}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from align_runner.data.collate import preference_collator
from align_runner.data.unpaired import with_kl_completions
from align_runner.data.views import SPLITS
from align_runner.fsutil import atomic_write_text
from align_runner.models.loading import takes_attention_masks
from align_runner.models.reference import (
    PUBLIC_FIELDS,
    REF_FIELDS,
    UNPAIRED_FIELDS,
    compute_reference_logps,
    ref_path,
)
from align_runner.registry import register_stage
from align_runner.stages.context import StageContext


@register_stage(
    "ref_logps",
    trains=False,
    views=("preference",),
    key_metrics=("train/pairs", "train/logps/chosen", "train/logps/rejected"),
    metrics=tuple(f"{split}/{name}" for split in SPLITS for name in ("pairs", "logps/chosen", "logps/rejected")),
)
def run_ref_logps(ctx: StageContext) -> dict[str, float]:
    return _reference_logps(ctx, "preference", (*REF_FIELDS, *PUBLIC_FIELDS), ("pairs", "chosen", "rejected"))


@register_stage(
    "unpaired_ref_logps",
    trains=False,
    views=("unpaired",),
    key_metrics=("train/rows", "train/logps/completion", "train/logps/kl"),
    metrics=tuple(f"{split}/{name}" for split in SPLITS for name in ("rows", "logps/completion", "logps/kl")),
)
def run_unpaired_ref_logps(ctx: StageContext) -> dict[str, float]:
    return _reference_logps(ctx, "unpaired", UNPAIRED_FIELDS, ("rows", "completion", "kl"))


def _reference_logps(ctx: StageContext, view: str, fields: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """Write ``fields`` of every row of ``view``'s splits; metrics ``<split>/<names[0]>`` (rows) and
    ``<split>/logps/<names[1]>``, ``<names[2]>`` (mean log-probs of the two sequences)."""
    tokenizer = ctx.tokenizer()
    model = ctx.backend.prepare_eval(ctx.load_policy())
    # batched as the training stage batches them (with train.packing: packed, each prompt once)
    collate = preference_collator(
        tokenizer.pad_token_id,
        packing=bool(ctx.train.packing),
        max_tokens=int(ctx.cfg.data.max_length),
        share_prompts=takes_attention_masks(ctx.cfg.model),
    )
    metrics: dict[str, float] = {}
    for split in SPLITS:
        if not ctx.has_dataset(view, split):
            continue
        rows = ctx.dataset(view, split)
        if view == "unpaired":  # the same KL pairs as the kto stage builds
            rows = with_kl_completions(rows, int(ctx.cfg.data.max_length))
        table = compute_reference_logps(
            model,
            rows,
            pad_id=tokenizer.pad_token_id,
            batch_size=int(ctx.section.batch_size),
            backend=ctx.backend,
            chunk_size=int(ctx.train.logits_chunk_tokens),
            collate=collate,
        )[: len(fields)]
        if ctx.is_main:
            lines = (json.dumps(dict(zip(fields, values))) + "\n" for values in table.t().tolist())
            atomic_write_text(ref_path(ctx.out_dir, split), "".join(lines))
        metrics[f"{split}/{names[0]}"] = float(len(rows))
        if rows:
            metrics[f"{split}/logps/{names[1]}"] = float(table[0].mean())
            metrics[f"{split}/logps/{names[2]}"] = float(table[1].mean())
    ctx.tracker.log(metrics, step=0)
    return metrics
