"""Reference log-probs: one forward of the frozen reference over preference pairs, the file layout the
ref_logps stages store them in, and attaching them to the rows a preference stage trains on.

Below the stages: ``stages/ref_logps`` computes and stores them, ``stages/dpo`` and ``stages/kto`` read
them (and DPO's live reference, TR-DPO, runs ``preference_forward`` itself), none importing another.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from align_runner.algos.logprobs import sequence_sums
from align_runner.config import TrainConfig
from align_runner.data.collate import collate_preference
from align_runner.models.counted_head import CountedHead
from align_runner.models.peft import reference_mode

REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
# the same sums over each pair's shared length only (LD-DPO)
PUBLIC_FIELDS = ("ref_chosen_public_logps", "ref_rejected_public_logps")
# KTO's: each row's own completion and its mismatched KL completion
UNPAIRED_FIELDS = ("ref_logps", "ref_kl_logps")


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
    logps, tokens, _ = preference_forward_public(model, batch, head)
    return logps, tokens


def preference_forward_public(model: nn.Module, batch: dict, head: CountedHead) -> tuple[Tensor, Tensor, Tensor]:
    """``preference_forward`` plus each sequence's *public* sum: over its first min(len_chosen,
    len_rejected) response tokens, the length both responses of its pair have (LD-DPO)."""
    picked = head.target_logps(model, batch, batch["loss_mask"])
    sequences = 2 * int(batch["num_items"])
    tokens = torch.bincount(picked.sequence, minlength=sequences)
    public = picked.logps * shared_prefix(picked.sequence, tokens).to(picked.logps.dtype)
    return (
        sequence_sums(picked.logps, picked.sequence, sequences),
        tokens,
        sequence_sums(public, picked.sequence, sequences),
    )


def shared_prefix(sequence: Tensor, tokens: Tensor) -> Tensor:
    """(N,) bool: whether each token is among the first min(len_c, len_r) of its sequence, for the
    sequence index (N,) of every token (each sequence's tokens contiguous and in order, as the padded
    and the packed layouts give them) and the 2B sequences' token counts (chosen first)."""
    pairs = tokens.numel() // 2
    shared = torch.minimum(tokens[:pairs], tokens[pairs:]).repeat(2)
    index = torch.arange(sequence.numel(), device=sequence.device)
    first = torch.full_like(tokens, sequence.numel()).scatter_reduce(0, sequence, index, reduce="amin")
    return (index - first[sequence]) < shared[sequence]


@torch.no_grad()
def compute_reference_logps(
    model: nn.Module,
    rows: Sequence[dict],
    *,
    pad_id: int,
    batch_size: int,
    backend,
    chunk_size: int = TrainConfig.logits_chunk_tokens,
    collate: Callable[[Sequence[dict]], dict] | None = None,
) -> Tensor:
    """Reference log-probs of every row: (4, N) float64, [0] chosen, [1] rejected, [2] and [3] their
    public sums (``preference_forward_public``).

    ``chunk_size``: response tokens whose logits are computed at a time (``train.logits_chunk_tokens``).
    ``collate``: rows -> batch, the training stage's ``preference_collator`` (packed with
    ``train.packing``); None: padded pairs (``collate_preference``).

    Batches are dealt round-robin to the processes; each row is computed by exactly one of them, so a
    sum over processes assembles the whole table on every one.
    """
    if batch_size < 1:
        raise ValueError(f"reference.batch_size must be >= 1, got {batch_size}")
    model.eval()
    head = CountedHead(model, chunk_size)
    out = torch.zeros(4, len(rows), dtype=torch.float64)
    for start in range(backend.rank * batch_size, len(rows), batch_size * backend.world_size):
        stop = min(start + batch_size, len(rows))
        batch = collate(rows[start:stop]) if collate is not None else collate_preference(rows[start:stop], pad_id)
        batch = {k: v.to(backend.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        with reference_mode(model), backend.autocast():
            logps, _, public = preference_forward_public(model, batch, head)
        out[:, start:stop] = torch.cat([logps, public]).detach().double().cpu().view(4, -1)
    return backend.all_reduce_sum(out).cpu()


def load_reference_logps(stage_dir: Path, split: str) -> list[dict[str, float]]:
    path = ref_path(stage_dir, split)
    if not path.exists():
        raise FileNotFoundError(
            f"no reference log-probs for split {split!r} in {stage_dir} (expected {path.name})"
        )
    with path.open() as f:
        return [json.loads(line) for line in f]


def attach_reference(
    rows: Sequence[dict], stage_dir: Path, split: str, fields: Sequence[str] = REF_FIELDS
) -> list[dict]:
    """``rows`` with their reference log-probs added as ``fields`` (default ``ref_chosen_logps`` /
    ``ref_rejected_logps``)."""
    refs = load_reference_logps(stage_dir, split)
    missing = [k for k in fields if refs and k not in refs[0]]
    if missing:
        raise ReferenceMismatchError(
            f"{ref_path(stage_dir, split)} has no {missing[0]!r} (it holds {sorted(refs[0])}); it was computed "
            "by an older align_runner: recompute it with pipeline.force=[ref_logps]"
        )
    if len(refs) != len(rows):
        raise ReferenceMismatchError(
            f"{ref_path(stage_dir, split)} has {len(refs)} rows but the {split!r} preference split has "
            f"{len(rows)}; the reference log-probs were computed on other data"
        )
    return [{**row, **{k: ref[k] for k in fields}} for row, ref in zip(rows, refs)]
