"""The LM head run only where the loss looks: log-probs of the counted target tokens, in chunks.

A causal LM's forward ends with ``logits = lm_head(hidden)`` over every position, (B, T, V) — for a
135M model with a 49k vocabulary the largest tensor of the step, though SFT scores only completion
tokens and DPO only response tokens. ``CountedHead`` turns the model's own output ``Linear`` into one
that, while a request is set, picks the hidden states of the counted positions and returns their
targets' log-probs (``algos.logprobs.linear_token_logps``: (chunk, V) logits at a time).

It works INSIDE the model's forward, so a stage still makes one call of the backend-wrapped module:
DDP's hooks, DeepSpeed's ZeRO-3 gathers and FSDP2's unsharding see an ordinary forward. Only the
head's class changes (``nn.Linear`` subclass, same parameters and state-dict keys), so saving, LoRA
("all-linear" skips the output head) and deepcopy are unaffected; with no request set it is a Linear.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from align_runner.algos.logprobs import TargetLogps, linear_token_logps, next_token_targets

# config attributes of models whose forward changes the logits after the output head
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class _Request:
    # the hidden states to score: (B, T) bool, or (rows, columns) index tensors when one state scores
    # several targets (a shared prompt's last column predicts both responses' first tokens)
    positions: Tensor | tuple[Tensor, Tensor]
    targets: Tensor  # (N,) their next tokens
    chunk_size: int
    correct: Tensor | None = None


class _CountedLinear(nn.Linear):
    """The output head, answering a pending request with (N,) log-probs instead of (B, T, V) logits."""

    _request: _Request | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        request = self._request
        if request is None:
            return super().forward(hidden)
        if isinstance(request.positions, Tensor) and hidden.shape[:-1] != request.positions.shape:
            raise RuntimeError(
                f"the output head got hidden states {tuple(hidden.shape)} for positions "
                f"{tuple(request.positions.shape)}; this model slices them before its head"
            )
        logps, request.correct = linear_token_logps(
            hidden[request.positions], self.weight, request.targets, bias=self.bias, chunk_size=request.chunk_size
        )
        return logps


class CountedHead:
    """Installs the counted-token head on ``model`` (before any backend wraps it) and runs forwards
    that return ``TargetLogps``.

    chunk_size: rows of (chunk, V) logits computed at a time (``train.logits_chunk_tokens``).
    """

    def __init__(self, model: nn.Module, chunk_size: int):
        config = getattr(model, "config", None)
        changed = [k for k in _LOGIT_TRANSFORMS if getattr(config, k, None) not in (None, 1, 1.0)]
        if changed:
            # the model rescales or caps its logits after the head (Gemma-2/3, Cohere, Granite): log-probs
            # taken at the head would be silently wrong
            raise TypeError(f"the counted-token loss scores the output head's logits, but this model transforms them "
                            f"afterwards ({', '.join(f'config.{k}={getattr(config, k)}' for k in changed)}); not supported yet")
        head = model.get_output_embeddings()
        if type(head) not in (nn.Linear, _CountedLinear):
            raise TypeError(f"the counted-token loss needs an nn.Linear output head; this model has {type(head).__name__}")
        head.__class__ = _CountedLinear
        self.head: _CountedLinear = head
        self.chunk_size = chunk_size

    @contextmanager
    def _requesting(self, request: _Request) -> Iterator[_Request]:
        self.head._request = request
        try:
            yield request
        finally:
            self.head._request = None

    def target_logps(self, model: nn.Module, batch: dict, counted: Tensor) -> TargetLogps:
        """One forward of ``model`` (wrapped or not) on ``batch``; the log-probs of the tokens where
        ``counted`` (B, T) is non-zero, each scored by the logit before it.

        A packed batch (``position_ids``, ``sequence_ids``) is run without an attention mask; its
        targets are attributed to their examples, a padded batch's to its rows. A batch whose
        ``predicted_from`` names each token's predicting column (``collate_packed_pairs_sharing_prompts``)
        is scored from those columns.
        """
        input_ids = batch["input_ids"]
        positions: Tensor | tuple[Tensor, Tensor]
        if "predicted_from" in batch:
            rows, columns = (counted != 0).nonzero(as_tuple=True)
            positions = (rows, batch["predicted_from"][rows, columns])
            targets, sequence = input_ids[rows, columns], batch["sequence_ids"][rows, columns]
        else:
            positions, targets = next_token_targets(input_ids, counted)
            if "sequence_ids" in batch:
                ids = batch["sequence_ids"]
            else:
                ids = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
            sequence = ids[:, 1:][counted[:, 1:] != 0]
        with self._requesting(_Request(positions, targets, self.chunk_size)) as request:
            logps = model(**model_inputs(batch)).logits
        assert request.correct is not None, "the model's forward did not call its output head"
        return TargetLogps(logps=logps, correct=request.correct, sequence=sequence)


def model_inputs(batch: dict) -> dict:
    """The forward keywords of a padded batch (ids + attention mask) or a packed one (ids + restarting
    positions, no mask: transformers then keeps attention inside each packed sequence).

    A packed forward asks for no KV cache: transformers reads restarting positions as packed sequences
    only when there is none (with a cache they would attend across examples). A packed batch that
    brings its own 4-D mask (``collate_packed_pairs_sharing_prompts``) passes it with its positions.
    """
    if "position_ids" in batch and "attention_mask" not in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "position_ids" in batch and batch["attention_mask"].dim() == 4:
        keys = ("input_ids", "attention_mask", "position_ids")
        return {**{k: batch[k] for k in keys}, "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
