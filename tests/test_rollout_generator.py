"""The rollout Generator: greedy equals Hugging Face generate; a sampled completion depends on its seed
only (not its batch, batch size or process); the sampling filters keep what their definitions keep."""

from __future__ import annotations

import pytest
import torch

from align_runner.engine.rollout import Generator, filter_logits, generate, row_seed
from align_runner.models.loading import load_causal_lm, load_tokenizer
from align_runner.models.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny(str(tmp_path_factory.mktemp("tiny")))
    return load_causal_lm(path), load_tokenizer(path)


def _prompts(tok):
    return [tok(t)["input_ids"] for t in ("hello", "a longer prompt than the first", "x y", "the end of it all")]


def _gen(tok, **kw):
    return Generator(eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, **{"max_new_tokens": 10, **kw})


def _hf_greedy(model, tok, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_hf_generate(tiny):
    """Batched, left-padded, grouped decoding with our KV cache gives Hugging Face's unbatched greedy."""
    model, tok = tiny
    prompts = _prompts(tok)
    ours = _gen(tok, temperature=0).generate(model, prompts, [0] * len(prompts))
    assert [c.ids for c in ours] == [_hf_greedy(model, tok, p, 10) for p in prompts]
    assert generate(model, tok, prompts, max_new_tokens=10, progress=False) == [c.ids for c in ours]  # eval's path


def test_sampled_completion_depends_on_its_seed_only(tiny):
    model, tok = tiny
    prompts = _prompts(tok)
    seeds = [row_seed(7, 3, j) for j in range(len(prompts))]
    together = _gen(tok).generate(model, prompts, seeds)
    one_by_one = _gen(tok, batch_size=1).generate(model, prompts, seeds)
    reordered = _gen(tok).generate(model, prompts[::-1], seeds[::-1])[::-1]
    assert together == one_by_one == reordered
    assert _gen(tok).generate(model, prompts, [s + 1 for s in seeds]) != together  # the seed matters
    assert len({tuple(c.ids) for c in together}) == len(prompts)


def test_row_seed_separates_its_parts():
    seeds = {row_seed(0, i, j, g) for i in range(4) for j in range(8) for g in range(8)}
    assert len(seeds) == 4 * 8 * 8 and all(0 <= s < 2**63 for s in seeds)
    assert row_seed(1, 2) != row_seed(2, 1)


def test_stops_at_eos_and_flags_truncation(tiny):
    model, tok = tiny
    prompts = _prompts(tok)
    eos_everywhere = Generator(eos_ids=list(range(512)), pad_id=tok.pad_token_id, max_new_tokens=5)
    assert all(len(c.ids) == 1 and not c.truncated for c in eos_everywhere.generate(model, prompts, [1] * 4))
    never = Generator(eos_ids=[10_000], pad_id=tok.pad_token_id, max_new_tokens=5)
    assert all(len(c.ids) == 5 and c.truncated for c in never.generate(model, prompts, [1] * 4))


def test_collective_decode_runs_until_every_process_is_done(tiny):
    """With sync, the loop goes on while another process still decodes (here: it never finishes)."""
    model, tok = tiny
    calls = []
    eos_everywhere = Generator(eos_ids=list(range(512)), pad_id=tok.pad_token_id, max_new_tokens=6)
    out = eos_everywhere.generate(model, _prompts(tok), [0] * 4, sync=lambda done: calls.append(done) or False)
    assert len(calls) == 6 and all(len(c.ids) == 1 for c in out)  # this process was done after one token


def test_filters_keep_what_their_definitions_keep():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert kept() == [True, True, True, True]
    assert kept(top_k=2) == [True, True, False, False]
    # nucleus 0.7: 0.5 alone covers < 0.7, 0.5 + 0.3 = 0.8 covers it -> the first two
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.8) == [True, True, False, False] and kept(top_p=0.81) == [True, True, True, False]
    # min_p 0.2: keep p >= 0.2 * 0.5 = 0.1
    assert kept(min_p=0.2) == [True, True, True, False]
    assert kept(top_p=0.01) == [True, False, False, False]  # the most likely token always survives


def test_a_group_shares_its_prompt_pass_and_samples_what_it_would_alone(tiny):
    model, tok = tiny
    prompts = [p for p in _prompts(tok)[:2] for _ in range(4)]  # two groups of four
    seeds = [row_seed(1, 0, j) for j in range(len(prompts))]
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append(tuple(k["input_ids"].shape)), with_kwargs=True)
    grouped = _gen(tok).generate(model, prompts, seeds)
    handle.remove()
    assert calls[0] == (2, len(prompts[4]))  # one prefill row per distinct prompt
    assert grouped == _gen(tok, batch_size=1).generate(model, prompts, seeds)
    assert len({tuple(c.ids) for c in grouped}) > 2  # the seeds, not the prompts, make them differ
