"""Rollout generation: ``Generator``, the seeded KV-cache sampler online RL (GRPO, PPO) draws its
rollouts from, and ``generate``, eval's use of it."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


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
    index: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[list[int]]:
    """Completion token ids for each prompt (prompt excluded, ending with the EOS it stopped at), for
    eval: the ``Generator`` online RL samples with, row i seeded from (seed, index[i]); ``index`` is each
    prompt's place in the whole set (default 0, 1, ...), so a process's share samples what a single
    process does. temperature 0 is greedy (what Hugging Face ``generate`` gives, test_rollout_generator)."""
    generator = Generator(
        eos_ids=eos_token_ids(model, tokenizer),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
    )
    seeds = [row_seed(seed, i) for i in (range(len(prompt_ids)) if index is None else index)]
    return [c.ids for c in generator.generate(model, prompt_ids, seeds, progress=progress, desc=desc)]


def _decode_kwargs(model) -> tuple[str, dict]:
    """The forward's name for the KV cache (``cache`` in recent transformers, ``past_key_values``
    before), and ``logits_to_keep=1`` where supported: decoding needs the last position's logits only,
    and the prefill would otherwise build (B, prompt length, vocabulary) of them."""
    inner = getattr(model, "module", model)  # DeepSpeed's engine wraps the model
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # so does PEFT
    params = inspect.signature(type(inner).forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return ("cache" if "cache" in params else "past_key_values"), extra


def eos_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end a completion: the model's generation config's (e.g. ``<|im_end|>``) and the
    tokenizer's EOS."""
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


# ------------------------------------------------------------------------------------ sampling


@dataclass(frozen=True)
class Completion:
    """One sampled completion: its token ids (ending with the EOS it stopped at, if any)."""

    ids: list[int]
    # stopped by max_new_tokens, not by an EOS
    truncated: bool


def row_seed(*parts: int) -> int:
    """A 63-bit seed from integers, e.g. (seed, iteration, prompt index, sample index).

    A completion's randomness depends only on these, never on which other rows share its batch or
    which process generates it, so a run on 2 processes samples what a run on 1 does.
    """
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Logits (B, V) with the tokens that top-k / nucleus (top-p) / min-p sampling excludes set to -inf.

    top_k 0, top_p 1 and min_p 0 switch each filter off. The most likely token always survives.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        floor = min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already cover top_p
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class Generator:
    """Samples completions with a KV cache, each row from its own seeded RNG.

    The interface a rollout needs: ``generate(model, prompts, seeds) -> list[Completion]``. This one runs
    the model's own forward step by step (prefill, then one token per step reusing the cache) and draws
    each row's token by inverse-CDF from a uniform number of that row's ``torch.Generator``, so a
    completion depends on its seed and the weights only. With ``sync`` (several processes whose model
    forward is a collective, e.g. FSDP2 / ZeRO-3 gathering weights), every process runs the same number
    of steps until all are done.
    """

    def __init__(
        self,
        *,
        eos_ids: Sequence[int],
        pad_id: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        batch_size: int = 64,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.eos_ids, self.pad_id = list(eos_ids), int(pad_id)
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.temperature, self.top_p, self.top_k, self.min_p = float(temperature), float(top_p), int(top_k), float(min_p)

    @torch.no_grad()
    def generate(
        self,
        model,
        prompts: Sequence[Sequence[int]],
        seeds: Sequence[int],
        *,
        sync: Callable[[bool], bool] | None = None,
        progress: bool = False,
        desc: str = "generate",
    ) -> list[Completion]:
        """One completion per prompt, ``seeds[i]`` seeding row i. ``sync(local_done) -> all_done`` makes
        the decode loop collective (every process calls it once per step)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        was_training = model.training
        model.eval()
        out: list[Completion] = []
        starts = range(0, len(prompts), self.batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, dynamic_ncols=True):
            out += self._batch(model, prompts[start : start + self.batch_size], seeds[start : start + self.batch_size], sync)
        model.train(was_training)
        return out

    def _batch(self, model, prompts, seeds, sync) -> list[Completion]:
        device = next(model.parameters()).device
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        # the completions of one prompt share its prefill: run each distinct prompt once, then give
        # every row a copy of its prompt's KV cache (a group of G completions costs one prompt pass)
        distinct: dict[tuple[int, ...], int] = {}
        src = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts], device=device)
        unique = list(distinct)
        width = max(len(p) for p in unique)
        ids = torch.full((len(unique), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(unique), width), dtype=torch.long)
        for i, p in enumerate(unique):  # left padding: every prompt ends at the last column
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p) :] = 1
        ids, attention = ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache_arg, extra = _decode_kwargs(model)
        out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, **extra)
        cache = out.get("cache", out.get("past_key_values"))
        cache.reorder_cache(src)
        logits, attention, positions = out.logits[:, -1][src], attention[src], positions[src]
        eos = torch.tensor(self.eos_ids, device=device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        tokens: list[torch.Tensor] = []
        for _ in range(self.max_new_tokens):
            nxt = self._sample(logits.float(), gens)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            tokens.append(nxt)
            done |= torch.isin(nxt, eos)
            local_done = bool(done.all())
            if sync(local_done) if sync is not None else local_done:
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=nxt[:, None], attention_mask=attention, position_ids=positions, use_cache=True,
                **{cache_arg: cache}, **extra,
            )
            cache = out.get("cache", out.get("past_key_values"))
            logits = out.logits[:, -1]
        rows = torch.stack(tokens, dim=1).tolist()
        eos_set = set(self.eos_ids)
        result = []
        for row in rows:
            cut = _cut_at_eos(row, eos_set)
            stopped = bool(cut) and cut[-1] in eos_set
            result.append(Completion(cut if stopped else cut[: self.max_new_tokens], truncated=not stopped))
        return result

    def _sample(self, logits: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        logits = filter_logits(logits / self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)
        cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
        u = torch.stack([torch.rand((), generator=g) for g in gens]).to(cdf.device, cdf.dtype)
        # inverse CDF; clamp guards the rounding of cdf[-1] slightly below 1
        idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
        return idx.clamp(max=logits.shape[-1] - 1)
