"""A trained reward model (the ``reward`` stage's artifact) used as a reward function.

The reward stage saves a Hugging Face sequence classifier with ``num_labels=1`` and trains it on
right-padded ``prompt_ids + response_ids`` rows (``collate_preference``), each response ending with
EOS or the chat template's end-of-turn token, reading the classifier's own pooled logit: the one at
the rightmost token that is not ``pad_token_id``. :class:`RewardModelScorer` feeds it
``prompt_ids[i] + completion_ids[i]`` the same way, so a rollout is scored as training scored a
preference response. The ids must come from the reward model's tokenizer (in a pipeline, the policy
and the reward model share the SFT model's tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from align_runner.models.loading import _DTYPE_KWARG


class RewardModelScorer:
    """``scorer(prompts=..., completions=..., completion_ids=..., prompt_ids=..., **columns) -> list[float]``.

    ``path``: the model directory, or a reward stage directory holding it under ``model/``.
    ``pad_id``: the id rows are right-padded with; defaults to the model's ``pad_token_id`` (which the
    reward stage saves) and must equal it when both are set, because the classifier finds each row's
    last real token as the rightmost token that is not ``pad_token_id``.
    """

    __name__ = "reward_model"  # the metric name (rewards/reward_model/mean), as a function's __name__

    def __init__(
        self,
        path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        pad_id: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = _model_dir(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path, **{_DTYPE_KWARG: dtype})
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{self.path!r} is a classifier with {self.model.config.num_labels} labels; a reward model "
                "has num_labels=1 (as the reward stage saves it)"
            )
        self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.pad_id = _resolve_pad_id(self.model.config.get_text_config(), pad_id, self.path)

    def __call__(
        self,
        prompts: Sequence | None = None,
        completions: Sequence | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        prompt_ids: Sequence[Sequence[int]] | None = None,
        **_,
    ) -> list[float]:
        """One reward per completion: the model's score of ``prompt_ids[i] + completion_ids[i]``."""
        if prompt_ids is None or completion_ids is None:
            missing = [n for n, v in (("prompt_ids", prompt_ids), ("completion_ids", completion_ids)) if v is None]
            raise ValueError(
                f"the reward model scores token ids and was called without {missing}; pass the prompts' "
                "prompt_ids (a column of the prepared prompt rows) and the generated completion_ids"
            )
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"{len(prompt_ids)} prompt_ids for {len(completion_ids)} completion_ids")
        sequences = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        self._check_ids(sequences)
        # Similar lengths batch together (less padding); scores go back to the callers' order.
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        scores = [0.0] * len(sequences)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, score in zip(chunk, self._score([sequences[i] for i in chunk])):
                scores[i] = score
        return scores

    @torch.no_grad()
    def _score(self, sequences: list[list[int]]) -> list[float]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)).logits
        return logits.squeeze(-1).float().tolist()

    def _check_ids(self, sequences: list[list[int]]) -> None:
        vocab = self.model.get_input_embeddings().num_embeddings
        for i, seq in enumerate(sequences):
            if not seq:
                raise ValueError(f"row {i}: prompt_ids + completion_ids is empty; nothing to score")
            if min(seq) < 0 or max(seq) >= vocab:
                raise ValueError(
                    f"row {i}: token ids outside the reward model's vocabulary (0..{vocab - 1}); the ids must "
                    "come from the reward model's tokenizer"
                )


def _model_dir(path: str) -> str:
    root = Path(path)
    if not (root / "config.json").is_file() and (root / "model" / "config.json").is_file():
        return str(root / "model")  # a reward stage directory
    return str(root)


def _resolve_pad_id(config, pad_id: int | None, path: str) -> int:
    if config.pad_token_id is None and pad_id is None:
        raise ValueError(f"reward model {path!r} has no pad_token_id in its config; pass pad_id")
    if config.pad_token_id is None:
        config.pad_token_id = pad_id  # the classifier pools at the rightmost token that is not this id
    elif pad_id is not None and pad_id != config.pad_token_id:
        raise ValueError(
            f"pad_id={pad_id} differs from the reward model's pad_token_id={config.pad_token_id}; the model "
            "scores the rightmost token that is not pad_token_id, so rows must be padded with that id"
        )
    return int(config.pad_token_id)
