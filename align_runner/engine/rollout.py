"""Rollout generation shared by eval, GRPO and PPO: batched Hugging Face ``generate`` with KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generate",
) -> list[list[int]]:
    """Completion token ids for each prompt (prompt excluded, cut after the first EOS).

    Prompts are left-padded per batch so every row's last prompt token sits at the same position,
    which is what decoder-only ``generate`` needs. temperature 0 means greedy.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    g = torch.Generator(device="cpu").manual_seed(seed)
    out: list[list[int]] = []
    batches = range(0, len(prompt_ids), batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, dynamic_ncols=True):
        chunk = prompt_ids[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p) :] = 1
        sampling = temperature > 0
        if sampling:
            # generate() draws from the global RNG; seed it per batch so rollouts are reproducible.
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=None,
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
        )
        for row in generated[:, width:].tolist():
            out.append(_cut_at_eos(row, set(eos_ids)))
    model.train(was_training)
    return out


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, tok in enumerate(row):
        if tok in eos:
            return row[: i + 1]
    return row
