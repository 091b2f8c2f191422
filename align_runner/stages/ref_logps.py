"""ref_logps: sequence log-probs of the frozen reference model on every preference pair, computed once.

DPO-family losses compare the policy with a fixed reference (Rafailov et al. 2023, eq. 7). The
reference never changes during training, so its log-probs are a function of (reference model, data,
numerics) alone. This stage computes them as their own cached artifact and the dpo stage reads them
with the data, so a dpo step runs one forward pass (the policy's), not two. The stage key covers the
reference model (upstream key), the data (data_prep key), ``reference.batch_size`` and the precision,
but not the loss: a beta sweep, or a rerun, does no reference forward pass.

Artifact: ``ref-<split>.jsonl`` for the preference view's ``train`` and ``eval`` splits, one line per
prepared row, in the rows' order: ``{"ref_chosen_logps": float, "ref_rejected_logps": float}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from align_runner.algos.logprobs import sequence_sums
from align_runner.config import TrainConfig
from align_runner.data.collate import collate_preference
from align_runner.fsutil import atomic_write_text
from align_runner.models.counted_head import CountedHead
from align_runner.models.peft import reference_mode
from align_runner.registry import register_stage
from align_runner.stages.context import StageContext

REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
SPLITS = ("train", "eval")


class ReferenceMismatchError(ValueError):
    """The reference artifact does not line up with the preference rows it should annotate."""


def ref_path(stage_dir: Path, split: str) -> Path:
    return Path(stage_dir) / f"ref-{split}.jsonl"


def preference_forward(model: nn.Module, batch: dict, head: CountedHead) -> tuple[Tensor, Tensor]:
    """One forward over a ``collate_preference`` (or packed) batch: (sequence log-probs (2B,), response
    tokens (2B,)).

    Sequences 0..B-1 are the chosen responses and B..2B-1 the rejected ones; only response tokens count,
    and only they go through the LM head (``head``, installed on ``model``).
    """
    picked = head.target_logps(model, batch, batch["loss_mask"])
    sequences = 2 * int(batch["num_items"])
    tokens = torch.bincount(picked.sequence, minlength=sequences)
    return sequence_sums(picked.logps, picked.sequence, sequences), tokens


@torch.no_grad()
def compute_reference_logps(
    model: nn.Module,
    rows: Sequence[dict],
    *,
    pad_id: int,
    batch_size: int,
    backend,
    chunk_size: int = TrainConfig.logits_chunk_tokens,
) -> Tensor:
    """Reference log-probs of every row: (2, N) float64, [0] chosen and [1] rejected.

    ``chunk_size``: response tokens whose logits are computed at a time (``train.logits_chunk_tokens``).

    Batches are dealt round-robin to the processes; each row is computed by exactly one of them, so a
    sum over processes assembles the whole table on every one.
    """
    if batch_size < 1:
        raise ValueError(f"reference.batch_size must be >= 1, got {batch_size}")
    model.eval()
    head = CountedHead(model, chunk_size)
    out = torch.zeros(2, len(rows), dtype=torch.float64)
    for start in range(backend.rank * batch_size, len(rows), batch_size * backend.world_size):
        stop = min(start + batch_size, len(rows))
        batch = collate_preference(rows[start:stop], pad_id)
        batch = {k: v.to(backend.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        with reference_mode(model), backend.autocast():
            logps, _ = preference_forward(model, batch, head)
        out[:, start:stop] = logps.detach().double().cpu().view(2, -1)
    return backend.all_reduce_sum(out).cpu()


def load_reference_logps(stage_dir: Path, split: str) -> list[dict[str, float]]:
    path = ref_path(stage_dir, split)
    if not path.exists():
        raise FileNotFoundError(
            f"no reference log-probs for split {split!r} in {stage_dir} (expected {path.name})"
        )
    with path.open() as f:
        return [json.loads(line) for line in f]


def attach_reference(rows: Sequence[dict], stage_dir: Path, split: str) -> list[dict]:
    """``rows`` with their reference log-probs added as ``ref_chosen_logps`` / ``ref_rejected_logps``."""
    refs = load_reference_logps(stage_dir, split)
    if len(refs) != len(rows):
        raise ReferenceMismatchError(
            f"{ref_path(stage_dir, split)} has {len(refs)} rows but the {split!r} preference split has "
            f"{len(rows)}; the reference log-probs were computed on other data"
        )
    return [{**row, **{k: ref[k] for k in REF_FIELDS}} for row, ref in zip(rows, refs)]


@register_stage(
    "ref_logps",
    trains=False,
    views=("preference",),
    key_metrics=("train/pairs", "train/logps/chosen", "train/logps/rejected"),
    metrics=tuple(f"{split}/{name}" for split in SPLITS for name in ("pairs", "logps/chosen", "logps/rejected")),
)
def run_ref_logps(ctx: StageContext) -> dict[str, float]:
    tokenizer = ctx.tokenizer()
    model = ctx.backend.prepare_eval(ctx.load_policy())
    metrics: dict[str, float] = {}
    for split in SPLITS:
        if not ctx.has_dataset("preference", split):
            continue
        rows = ctx.dataset("preference", split)
        table = compute_reference_logps(
            model,
            rows,
            pad_id=tokenizer.pad_token_id,
            batch_size=int(ctx.section.batch_size),
            backend=ctx.backend,
            chunk_size=int(ctx.train.logits_chunk_tokens),
        )
        if ctx.is_main:
            lines = (json.dumps(dict(zip(REF_FIELDS, pair))) + "\n" for pair in table.t().tolist())
            atomic_write_text(ref_path(ctx.out_dir, split), "".join(lines))
        metrics[f"{split}/pairs"] = float(len(rows))
        if rows:
            metrics[f"{split}/logps/chosen"] = float(table[0].mean())
            metrics[f"{split}/logps/rejected"] = float(table[1].mean())
    ctx.tracker.log(metrics, step=0)
    return metrics
