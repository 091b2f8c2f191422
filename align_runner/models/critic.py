"""PPO's critic: a token-level value model, one scalar per position from a single forward.

It is a Hugging Face token classifier with ``num_labels=1`` (``AutoModelForTokenClassification``): the
backbone and a linear ``score`` head, so FSDP2 / DeepSpeed wrap and shard it like any model, and it is
saved and reloaded with ``save_pretrained`` / ``from_pretrained``. Initialised from

* the reward stage's sequence classifier (``init="reward"``): same backbone, same ``score`` weight,
  so the initial value of a prefix is the reward model's score of it;
* the policy's causal LM (``init="policy"``): its backbone, and a zero head so every initial value is 0.

The head has no bias and no dropout: a reward model's ``score`` has no bias to load, and dropout would
make the values of the rollout and of the update disagree.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForTokenClassification, PreTrainedModel

from align_runner.models.loading import _DTYPE_KWARG, revision_for

CRITIC_INITS = ("reward", "policy")


def load_critic(path: str, *, init: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The value model from the checkpoint at ``path``: a reward model (``init="reward"``), or a
    causal LM (``init="policy"``)."""
    if init not in CRITIC_INITS:
        raise ValueError(f"critic init must be one of {CRITIC_INITS}, got {init!r}")
    config = AutoConfig.from_pretrained(path, revision=revision_for(path), num_labels=1)
    # read by the token classifier's constructor, and saved in config.json so a reload builds the same head
    config.classifier_dropout = 0.0
    config.token_classification_bias = False
    model, info = AutoModelForTokenClassification.from_pretrained(
        path, revision=revision_for(path), config=config, output_loading_info=True, **{_DTYPE_KWARG: dtype}
    )
    head = [k for k in info["missing_keys"] if k.startswith("score.")]
    if init == "reward" and head:
        raise ValueError(f"{path!r} has no reward head ({', '.join(head)} missing): is it a reward stage's model?")
    if init == "policy":
        with torch.no_grad():
            model.score.weight.zero_()
    return model


def completion_values(model, batch: dict) -> torch.Tensor:
    """Values (B, C) of a ``collate_completions`` batch (not the shared-prompt layout): column c holds
    V of the state before completion token c, read at the position whose logits predict that token."""
    width = batch["completion_ids"].shape[1]
    values = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).logits
    return values[:, -width - 1 : -1, 0]
