"""kto: offline alignment from completions labelled desirable / undesirable (``algos.kto``).

A stage of its own rather than a loss of the dpo stage: its data (the ``unpaired`` view: one completion
and a label per row, pairs unpaired by data_prep), its batches (each row beside a mismatched KL
completion, ``data/unpaired.py``), its log-probs (``UnpairedLogps``) and its reference artifact (the
``unpaired_ref_logps`` stage) all differ from DPO's; only the forward pass is shared, by laying rows
out as pairs (completion, KL completion) for ``collate_preference``.

Each step runs one forward pass of the policy over the B completions and their B KL completions; the
reference's log-probs of both come precomputed from the cached ``unpaired_ref_logps`` stage named by
``algorithm.reference.stage``. Metrics: ``rewards/{chosen,rejected}`` (desirable / undesirable rows),
``rewards/accuracies`` (rows on their label's side of the reference point), ``kl`` (z0),
``logps/{chosen,rejected}``, and the same under ``eval/`` on the held-out split.
"""

from __future__ import annotations

from functools import partial

from hydra.utils import instantiate
from omegaconf import OmegaConf

from align_runner.algos.kto import UnpairedLogps
from align_runner.algos.types import LossOutput
from align_runner.data.collate import pair_tokens, preference_collator
from align_runner.data.unpaired import with_kl_completions
from align_runner.engine.metric_names import offline
from align_runner.models.counted_head import CountedHead
from align_runner.models.reference import UNPAIRED_FIELDS, attach_reference, preference_forward
from align_runner.registry import Input, register_stage
from align_runner.stages.context import StageContext
from align_runner.validate import require


def kto_step(model, batch: dict, *, head: CountedHead, loss_fn) -> LossOutput:
    """``loss_fn(UnpairedLogps)`` on one micro-batch of B rows (completions first, then KL completions)."""
    logps, _ = preference_forward(model, batch, head)
    policy, policy_kl = logps.chunk(2)
    return loss_fn(
        UnpairedLogps(
            policy=policy,
            ref=batch["ref_logps"].to(logps.dtype),
            policy_kl=policy_kl,
            ref_kl=batch["ref_kl_logps"].to(logps.dtype),
            desirable=batch["desirable"].to(logps.dtype),
        )
    )


def check_kto(cfg, spec) -> None:
    """Compose-time check of the loss's numbers (before any model loads)."""
    loss, where = OmegaConf.select(cfg, spec.config).loss, f"{spec.config}.loss"
    beta = loss.get("beta", 0.1)
    require(beta > 0, f"{where}.beta", "a number > 0", beta)
    for key in ("desirable_weight", "undesirable_weight"):
        require(loss.get(key, 1.0) >= 0, f"{where}.{key}", "a number >= 0", loss.get(key))


@register_stage(
    "kto",
    trains=True,
    views=("unpaired",),
    inputs={"reference": Input("unpaired_ref_logps", derived="reference", what="reference log-probs")},
    key_metrics=("loss", "rewards/accuracies", "kl", "eval/rewards/accuracies"),
    metrics=offline(*(f"{w}/{s}" for w in ("rewards", "logps") for s in ("chosen", "rejected")),
                    "rewards/accuracies", "kl"),
    check=check_kto,
)
def run_kto(ctx: StageContext) -> dict[str, float]:
    tokenizer = ctx.tokenizer()
    policy = ctx.load_policy()
    head = CountedHead(policy, int(ctx.train.logits_chunk_tokens))
    step = partial(kto_step, head=head, loss_fn=instantiate(ctx.section.loss))
    ref_dir = ctx.input_dir("reference")
    max_length = int(ctx.cfg.data.max_length)

    def prepared(rows: list[dict], split: str) -> list[dict]:
        return attach_reference(with_kl_completions(rows, max_length), ref_dir, split, UNPAIRED_FIELDS)

    train_rows, eval_rows = ctx.splits("unpaired")
    result = ctx.engine().fit(
        step,
        model=policy,
        train_data=prepared(train_rows, "train"),
        collate=preference_collator(tokenizer.pad_token_id, packing=ctx.train.packing, max_tokens=int(ctx.cfg.data.max_length)),
        eval_data=prepared(eval_rows, "eval") if eval_rows is not None else None,
        eval_step=step,
        length=pair_tokens,
    )
    ctx.save_model(policy, tokenizer)
    return result.metrics
