"""dpo: offline preference optimisation with any loss of ``align_runner.algos.dpo`` (``algorithm.loss``).

Each step runs ONE forward pass, the policy's, over the 2B concatenated chosen + rejected rows (with
``train.packing``, each pair packed padding-free as one prompt + chosen + rejected unit, its prompt
computed once; the LM head runs on response tokens only); the
reference log-probs come precomputed from the ``ref_logps`` stage named by ``algorithm.reference.stage``
(pipeline=auto inserts it right before this stage, on the same input model). Metrics are the losses'
own: ``rewards/{chosen,rejected,accuracies,margins}`` and ``logps/{chosen,rejected}``, and the same on
the held-out preference split under ``eval/`` (``eval/rewards/accuracies`` is the implicit-reward
preference accuracy of the trained policy).

Variants the stage itself provides (``algorithm.*`` beside the loss):

* ``reference.stage: null``: no reference at all, for the reference-free losses (ORPO, SimPO, CPO, whose
  functions carry ``reference_free``); pipeline=auto then inserts no ref_logps stage.
* ``ref_sync`` (TR-DPO, Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
  Alignment"): with ``reference.stage: null``, a copy of the input model lives in memory, gives the
  reference log-probs of each batch (a second, gradient-free forward), and is moved towards the policy
  every ``ref_sync.every`` optimizer steps: ref <- alpha * policy + (1 - alpha) * ref.
* ``ld_alpha`` (LD-DPO): policy and reference log-probs with the tokens past the shorter response of
  each pair weighted by ld_alpha (``algos.dpo.length_desensitised``).
* ``use_weighting`` (WPO): each pair weighted by ``algos.dpo.wpo_weights``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from align_runner.algos.dpo import length_desensitised, needs_reference, wpo_weights
from align_runner.algos.types import LossOutput, PreferenceLogps
from align_runner.config import stage_train
from align_runner.data.collate import pair_tokens, preference_collator
from align_runner.engine.metric_names import offline
from align_runner.models.counted_head import CountedHead
from align_runner.models.loading import takes_attention_masks
from align_runner.models.reference import (
    PUBLIC_FIELDS,
    REF_FIELDS,
    attach_reference,
    preference_forward_public,
)
from align_runner.registry import HeldModels, Input, register_stage
from align_runner.stages.context import StageContext
from align_runner.validate import require


@dataclass(frozen=True)
class LogpsOptions:
    """How the stage turns sequence log-probs into a loss's ``PreferenceLogps`` (``algorithm.ld_alpha``,
    ``algorithm.use_weighting``)."""

    ld_alpha: float | None = None
    use_weighting: bool = False


def batch_logps(
    logps: Tensor, tokens: Tensor, batch: dict, public: Tensor | None = None, options: LogpsOptions = LogpsOptions()
) -> PreferenceLogps:
    """PreferenceLogps of a ``collate_preference`` batch from the policy's (2B,) sequence log-probs and
    response token counts (chosen rows first), with the reference's from the batch's ``ref_*`` fields
    (None when the batch has none: a reference-free loss).

    ``chosen_nll`` is the policy's mean per-token NLL of the chosen response (RPO's extra term);
    ``chosen_tokens`` / ``rejected_tokens`` let IPO length-average. ``public`` (2B,): the sums over each
    pair's shared length, which ``options.ld_alpha`` needs; WPO's weights come from the plain log-probs.
    """
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    n_c, n_r = (t.clamp(min=1).to(logps.dtype) for t in (chosen_tokens, rejected_tokens))
    plain_chosen, plain_rejected = logps.chunk(2)
    weights = wpo_weights(plain_chosen / n_c, plain_rejected / n_r) if options.use_weighting else None
    ref_chosen = ref_rejected = None
    if REF_FIELDS[0] in batch:
        ref_chosen, ref_rejected = (batch[k].to(logps.dtype) for k in REF_FIELDS)
    if options.ld_alpha is not None:
        assert public is not None, "ld_alpha needs the public sums"
        logps = length_desensitised(logps, public, options.ld_alpha)
        if ref_chosen is not None:
            ref_chosen, ref_rejected = (
                length_desensitised(full, batch[k].to(logps.dtype), options.ld_alpha)
                for full, k in zip((ref_chosen, ref_rejected), PUBLIC_FIELDS)
            )
    policy_chosen, policy_rejected = logps.chunk(2)
    return PreferenceLogps(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_nll=-plain_chosen / n_c,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        weights=weights,
    )


class LiveReference:
    """TR-DPO's reference model: in memory, frozen between updates, moved towards the policy.

    ``model``: the reference (a copy of the policy's input model); ``policy``: the trained module whose
    parameters it follows (the same architecture, so ``parameters()`` line up one to one).
    """

    def __init__(self, model: nn.Module, policy: nn.Module, *, every: int, alpha: float, chunk_size: int):
        self.model, self.policy, self.every, self.alpha = model, policy, every, alpha
        self.chunk_size = chunk_size
        self.head: CountedHead | None = None  # installed on the first forward
        self.steps = 0

    @torch.no_grad()
    def logps(self, batch: dict) -> dict[str, Tensor]:
        """The batch's reference fields (as the ref_logps stage writes them), from this model now."""
        if self.head is None:
            self.head = CountedHead(self.model, self.chunk_size)
        self.model.eval()
        logps, _, public = preference_forward_public(self.model, batch, self.head)
        return dict(zip((*REF_FIELDS, *PUBLIC_FIELDS), (*logps.chunk(2), *public.chunk(2))))

    def after_optimizer_step(self) -> None:
        """Count an optimizer step of the policy; every ``every``-th one, update the reference."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter (alpha = 1: a copy)."""
        for ref, pol in zip(self.model.parameters(), self.policy.parameters(), strict=True):
            ref.lerp_(pol.detach().to(ref.dtype), self.alpha)


def dpo_step(
    model, batch: dict, *, head: CountedHead, loss_fn, options: LogpsOptions = LogpsOptions(),
    live: LiveReference | None = None,
) -> LossOutput:
    """``loss_fn(PreferenceLogps)`` on one micro-batch: the mean over its B pairs."""
    if live is not None:
        batch = {**batch, **live.logps(batch)}
    logps, tokens, public = preference_forward_public(model, batch, head)
    return loss_fn(batch_logps(logps, tokens, batch, public, options))


def check_dpo(cfg, spec) -> None:
    """Compose-time check: a loss that compares with a reference has exactly one (cached or live), a
    reference-free loss runs none, and the live one (TR-DPO) runs where it can follow the policy."""
    a, where = OmegaConf.select(cfg, spec.config), spec.config
    loss = OmegaConf.to_container(a.loss, resolve=True)
    needs = needs_reference(loss)
    cached = "reference" in dict(spec.inputs)
    live = OmegaConf.select(a, "ref_sync.every") is not None
    name = str(loss.get("_target_", "")).rsplit(".", 1)[-1]
    if live:
        require(not cached, f"{where}.reference.stage", "null with ref_sync (TR-DPO's reference is live, not cached)",
                a.reference.stage)
        require(needs, f"{where}.ref_sync.every", f"null: {name} uses no reference", a.ref_sync.every)
        require(a.ref_sync.every >= 1, f"{where}.ref_sync.every", "an integer >= 1", a.ref_sync.every)
        require(0 < a.ref_sync.alpha <= 1, f"{where}.ref_sync.alpha", "a number in (0, 1]", a.ref_sync.alpha)
        # the live reference copies the policy's parameters: whole ones, of the same architecture
        require(str(cfg.hardware.backend) == "ddp", "hardware.backend", "ddp with ref_sync (sharded parameters "
                "cannot be copied into the reference)", str(cfg.hardware.backend))
        require(cfg.model.lora is None, "model.lora", "null with ref_sync (the reference follows full weights)", "set")
        # the reference's updates are not checkpointed, so a resumed run would not continue the same run
        save_every = stage_train(cfg, a).save_every
        require(save_every == 0, f"{where}.train.save_every", "0 with ref_sync (the live reference is not "
                "checkpointed, so a resumed run would start from another reference)", save_every)
    elif needs:
        require(cached, f"{where}.reference.stage", f"a ref_logps stage (or ref_sync.every): {name} compares the "
                "policy with a reference", None)
    else:
        require(not cached, f"{where}.reference.stage", f"null: {name} uses no reference, so none is computed",
                a.reference.stage)
    ld_alpha = a.get("ld_alpha")
    require(ld_alpha is None or 0 <= ld_alpha <= 1, f"{where}.ld_alpha", "null or a number in [0, 1]", ld_alpha)


@register_stage(
    "dpo",
    trains=True,
    views=("preference",),
    # not required: a reference-free loss (or ref_sync's live reference) reads none; check_dpo decides
    inputs={"reference": Input("ref_logps", required=False, derived="reference", what="reference log-probs")},
    key_metrics=("loss", "rewards/accuracies", "rewards/margins", "eval/rewards/accuracies"),
    # the losses' own (algos/dpo.py; nll_loss: RPO, ORPO, CPO, sft; log_odds_ratio: ORPO). A
    # mixture_loss's <loss>/<name> are not declared
    metrics=offline(*(f"{w}/{s}" for w in ("rewards", "logps") for s in ("chosen", "rejected")),
                    "rewards/margins", "rewards/accuracies", "nll_loss", "log_odds_ratio"),
    check=check_dpo,
    # TR-DPO's live reference: a whole copy of the policy (check_dpo)
    held=lambda cfg, spec: HeldModels(frozen=int(OmegaConf.select(cfg, f"{spec.config}.ref_sync.every") is not None)),
)
def run_dpo(ctx: StageContext) -> dict[str, float]:
    tokenizer = ctx.tokenizer()
    policy = ctx.load_policy()
    chunk = int(ctx.train.logits_chunk_tokens)
    head = CountedHead(policy, chunk)
    a = ctx.section
    options = LogpsOptions(ld_alpha=a.get("ld_alpha"), use_weighting=bool(a.get("use_weighting")))
    live = None
    if OmegaConf.select(a, "ref_sync.every") is not None:
        live = LiveReference(ctx.load_frozen_policy(), policy, every=int(a.ref_sync.every),
                             alpha=float(a.ref_sync.alpha), chunk_size=chunk)
    step = partial(dpo_step, head=head, loss_fn=instantiate(a.loss), options=options, live=live)
    train_rows, eval_rows = ctx.splits("preference")
    if ctx.has_input("reference"):
        fields = (*REF_FIELDS, *PUBLIC_FIELDS) if options.ld_alpha is not None else REF_FIELDS
        ref_dir = ctx.input_dir("reference")
        train_rows = attach_reference(train_rows, ref_dir, "train", fields)
        eval_rows = attach_reference(eval_rows, ref_dir, "eval", fields) if eval_rows is not None else None
    # TR-DPO's updates follow the optimizer's steps (every process steps in lockstep)
    hook = None
    if live is not None:
        hook = register_optimizer_step_post_hook(lambda *_: live.after_optimizer_step())
    try:
        result = ctx.engine().fit(
            step,
            model=policy,
            train_data=train_rows,
            collate=preference_collator(
                tokenizer.pad_token_id,
                packing=ctx.train.packing,
                max_tokens=int(ctx.cfg.data.max_length),
                share_prompts=takes_attention_masks(ctx.cfg.model),
            ),
            eval_data=eval_rows,
            eval_step=step,
            length=pair_tokens,
        )
    finally:
        if hook is not None:
            hook.remove()
    ctx.save_model(policy, tokenizer)
    return result.metrics
