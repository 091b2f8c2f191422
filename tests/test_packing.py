"""Packing and the counted-token head: plans worked out by hand, packed == unpacked on the tiny model."""

from __future__ import annotations

import random

import pytest
import torch

from align_runner.algos.logprobs import sequence_logps, sequence_sums
from align_runner.algos.sft import sft_loss
from align_runner.data.collate import (
    collate_packed_pairs_sharing_prompts,
    collate_packed_preference,
    collate_packed_sft,
    collate_preference,
    collate_sft,
)
from align_runner.data.pack import best_fit_decreasing, split_to_count, token_budget_batches
from align_runner.models.counted_head import CountedHead, model_inputs
from align_runner.models.loading import load_causal_lm


def test_best_fit_decreasing_by_hand():
    # sorted: 6 (i1), 5 (i3), 4 (i0), 3 (i4), 2 (i2) into capacity 8:
    # 6 -> new bin A (room 2); 5 -> new B (3); 4 -> new C (4); 3 -> B (the tightest fit, room 0);
    # 2 -> A (room 2 fits exactly, tighter than C's 4)
    assert best_fit_decreasing([4, 6, 2, 5, 3], 8) == [[1, 2], [3, 4], [0]]


def test_best_fit_decreasing_rejects_a_sequence_over_capacity():
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens, more than the packing capacity of 8"):
        best_fit_decreasing([3, 9], 8)


def test_token_budget_batches_by_hand():
    # ascending: 2 (i3), 3 (i0), 3 (i2), 7 (i1), 20 (i4). Budget 9: [2, 3, 3] -> 3 rows x 3 = 9 fits;
    # adding 7 -> 4 x 7 = 28 > 9; [7] alone; 20 is over budget: alone
    assert token_budget_batches([3, 7, 3, 2, 20], 9) == [[3, 0, 2], [1], [4]]


def test_split_to_count_halves_the_largest():
    assert split_to_count([[0, 1, 2, 3], [4]], 3) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="cannot split 2 rows into 3"):
        split_to_count([[0], [1]], 3)


def test_packed_sft_layout_by_hand():
    examples = [
        {"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]},
        {"input_ids": [9, 10], "loss_mask": [1, 1]},
        {"input_ids": [11, 12, 13], "loss_mask": [1, 1, 1]},
    ]
    batch = collate_packed_sft(examples, 0, max_tokens=5)
    # BFD: 4 -> row 0 (room 1), 3 -> row 1 (room 2), 2 -> row 1 (fits exactly)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0], [11, 12, 13, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 0, -1], [2, 2, 2, 1, 1]]
    # each example's first token is never a target: the logit before it is another example's
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100], [-100, 12, 13, -100, 10]]
    assert "attention_mask" not in batch
    assert batch["num_items"] == collate_sft(examples, 0)["num_items"] == 5


def test_packed_preference_layout_by_hand():
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5], "ref_chosen_logps": -1.0},
        {"prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [9], "ref_chosen_logps": -2.0},
    ]
    batch = collate_packed_preference(examples, 0, max_tokens=6)
    # sequences: 0 [1,2,3], 1 [6,7,8], 2 [1,2,4,5], 3 [6,9]; BFD: 4 (s2) -> A, 3 (s0) -> B, 3 (s1) -> B,
    # 2 (s3) -> A
    assert batch["input_ids"].tolist() == [[1, 2, 4, 5, 6, 9], [1, 2, 3, 6, 7, 8]]
    assert batch["sequence_ids"].tolist() == [[2, 2, 2, 2, 3, 3], [0, 0, 0, 1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1]]
    assert batch["num_items"] == 2 and batch["ref_chosen_logps"].tolist() == [-1.0, -2.0]


def test_pairs_sharing_prompts_layout_by_hand():
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5], "margin": 0.5},
        {"prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [9], "margin": 1.0},
    ]
    batch = collate_packed_pairs_sharing_prompts(examples, 0, max_tokens=6)
    # units: 0 [1,2 | 3 | 4,5] (5 tokens), 1 [6 | 7,8 | 9] (4): BFD puts each in a row of its own
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    # the rejected response continues from the prompt's end, as in its own sequence
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3], [0, 1, 2, 1, 0]]
    # chosen i is sequence i, rejected i is B + i; prompts and padding belong to neither
    assert batch["sequence_ids"].tolist() == [[-1, -1, 0, 2, 2], [-1, 1, 1, 3, -1]]
    T, F = True, False
    assert batch["attention_mask"][0, 0].tolist() == [
        [T, F, F, F, F],
        [T, T, F, F, F],
        [T, T, T, F, F],  # chosen: the prompt and itself
        [T, T, F, T, F],  # rejected: the prompt and itself, never the chosen token
        [T, T, F, T, T],
    ]
    assert batch["attention_mask"][1, 0].tolist() == [
        [T, F, F, F, F],
        [T, T, F, F, F],
        [T, T, T, F, F],
        [T, F, F, T, F],
        [F, F, F, F, T],  # padding sees itself only
    ]
    # every response token counts; rejected 0's first token (column 3) is predicted from the prompt's
    # last column (1), not from the chosen token before it; the rest from the column before them
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]]
    assert batch["predicted_from"].tolist() == [[0, 0, 1, 1, 3], [0, 0, 1, 0, 3]]
    assert batch["num_items"] == 2 and batch["margin"].tolist() == [0.5, 1.0]
    # with an empty prompt nothing predicts a response's first token: it is not scored (as when padded)
    empty = collate_packed_pairs_sharing_prompts([{"prompt_ids": [], "chosen_ids": [3, 4], "rejected_ids": [5]}], 0, max_tokens=3)
    assert empty["loss_mask"].tolist() == [[0, 1, 0]]
    # several units share a row when they fit
    assert collate_packed_pairs_sharing_prompts(examples, 0, max_tokens=9)["input_ids"].shape == (1, 9)


def _sft_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(5, 20)
        prompt = rng.randint(1, length - 2)
        rows.append({"input_ids": [rng.randint(3, 500) for _ in range(length)], "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return rows


def _grads(model) -> list[torch.Tensor]:
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_counted_head_and_packing_equal_the_plain_sft_loss_and_gradients(tiny_dir):
    torch.manual_seed(0)
    model = load_causal_lm(tiny_dir)
    rows = _sft_rows(6)
    padded = collate_sft(rows, 0)
    plain = sft_loss(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits, padded["labels"])
    plain.loss.backward()
    reference = _grads(model)
    assert max(g.abs().max().item() for g in reference) > 1e-4  # the comparisons below are not vacuous

    head = CountedHead(model, chunk_size=7)  # 31 targets: 5 chunks, each recomputed in backward
    packed = collate_packed_sft(rows, 0, max_tokens=40)
    assert packed["input_ids"].shape[0] < len(rows)  # several examples share a row
    for batch in (padded, packed):
        out = sft_loss(head.target_logps(model, batch, batch["labels"] != -100), None)
        out.loss.backward()
        assert out.loss.item() == pytest.approx(plain.loss.item(), abs=1e-5)
        assert int(out.metrics["num_tokens"]) == int(plain.metrics["num_tokens"]) == 31
        assert float(out.metrics["mean_token_accuracy"]) == float(plain.metrics["mean_token_accuracy"])
        assert _max_diff(_grads(model), reference) < 1e-6


def test_packed_attention_stays_inside_each_example(tiny_dir):
    """Per-example logits of a packed row equal the example's logits alone (no attention across)."""
    model = load_causal_lm(tiny_dir).eval()
    a, b = [5, 6, 7, 8], [9, 10, 11]
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([s])).logits[0] for s in (a, b)]
        batch = collate_packed_sft([{"input_ids": a, "loss_mask": [1] * 4}, {"input_ids": b, "loss_mask": [1] * 3}], 0, max_tokens=7)
        packed = model(**model_inputs(batch)).logits[0]
    torch.testing.assert_close(packed[:4], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[4:], alone[1], atol=1e-5, rtol=0)


def _random_pairs(n: int, *, seed: int, longest_prompt: int) -> list[dict]:
    """``n`` tokenized pairs: prompts of 1..longest_prompt tokens, responses of 1..8."""
    rng = random.Random(seed)

    def ids(longest: int) -> list[int]:
        return [rng.randint(3, 500) for _ in range(rng.randint(1, longest))]

    return [{"prompt_ids": ids(longest_prompt), "chosen_ids": ids(8), "rejected_ids": ids(8)} for _ in range(n)]

def test_counted_head_and_packing_equal_plain_sequence_logps(tiny_dir):
    torch.manual_seed(0)
    model = load_causal_lm(tiny_dir)
    pairs = _random_pairs(4, seed=1, longest_prompt=6)
    padded = collate_preference(pairs, 0)
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    plain, counts = sequence_logps(logits, padded["input_ids"], padded["loss_mask"])
    plain.sum().backward()
    reference = _grads(model)

    head = CountedHead(model, chunk_size=5)
    shared = collate_packed_pairs_sharing_prompts(pairs, 0, max_tokens=32)
    assert shared["input_ids"].shape[0] < 4 and (shared["input_ids"] != 0).sum() < (padded["input_ids"] != 0).sum()
    for batch in (padded, collate_packed_preference(pairs, 0, max_tokens=32), shared):
        picked = head.target_logps(model, batch, batch["loss_mask"])
        logps = sequence_sums(picked.logps, picked.sequence, 8)
        torch.testing.assert_close(logps, plain, atol=1e-5, rtol=0)
        assert torch.bincount(picked.sequence, minlength=8).tolist() == counts.tolist()
        logps.sum().backward()
        assert _max_diff(_grads(model), reference) < 1e-5


def test_reference_logps_packed_with_shared_prompts_equal_the_padded_ones(tiny_dir):
    from functools import partial
    from types import SimpleNamespace

    from align_runner.engine.backend import Backend
    from align_runner.models.reference import compute_reference_logps

    torch.manual_seed(0)
    model = load_causal_lm(tiny_dir)
    rows = _random_pairs(7, seed=2, longest_prompt=9)
    backend = Backend(SimpleNamespace(device="cpu", precision="fp32", backend="ddp"))
    padded = compute_reference_logps(model, rows, pad_id=0, batch_size=3, backend=backend)
    shared = partial(collate_packed_pairs_sharing_prompts, pad_id=0, max_tokens=24)
    packed = compute_reference_logps(model, rows, pad_id=0, batch_size=3, backend=backend, collate=shared)
    # chosen and rejected sums, and their public (LD-DPO) sums, of all 7 pairs
    assert packed.shape == padded.shape == (4, 7) and padded.abs().min() > 0
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=0)

def test_without_a_request_the_head_is_the_plain_linear(tiny_dir):
    model = load_causal_lm(tiny_dir).eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        CountedHead(model, chunk_size=2)
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert "lm_head.weight" in model.state_dict()


def test_packed_reward_scores_equal_the_padded_ones(tiny_dir):
    from align_runner.algos.reward import bradley_terry_loss
    from align_runner.models.loading import load_sequence_classifier
    from align_runner.stages.reward import TokenScores, reward_step

    torch.manual_seed(0)
    model = load_sequence_classifier(tiny_dir)
    pairs = [
        {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
        {"prompt_ids": [11], "chosen_ids": [12, 13, 14], "rejected_ids": [15, 16]},
    ]
    scores = TokenScores(model)
    padded = reward_step(model, collate_preference(pairs, 0), loss_fn=bradley_terry_loss, token_scores=scores)
    padded.loss.backward()
    reference = _grads(model)
    for packed_batch in (
        collate_packed_preference(pairs, 0, max_tokens=9),
        # each pair's prompt once: 12 tokens instead of 18
        collate_packed_pairs_sharing_prompts(pairs, 0, max_tokens=9),
    ):
        assert packed_batch["input_ids"].shape[0] < 4
        packed = reward_step(model, packed_batch, loss_fn=bradley_terry_loss, token_scores=scores)
        packed.loss.backward()
        assert packed.loss.item() == pytest.approx(padded.loss.item(), abs=1e-6)
        for k in ("rewards/chosen_mean", "rewards/rejected_mean"):
            assert float(packed.metrics[k]) == pytest.approx(float(padded.metrics[k]), abs=1e-5)
        assert _max_diff(_grads(model), reference) < 1e-5


# ----------------------------------------------------------------------------- config keys


def test_missing_kernels_fail_at_compose_naming_the_key_and_the_install():
    from align_runner.api import compose
    from align_runner.validate import ConfigError

    with pytest.raises(ConfigError, match=r"^model.attn_implementation=flash_attention_2 needs the flash_attn package, which is not installed: pip install flash-attn"):
        compose(["model=tiny", "model.attn_implementation=flash_attention_2"])
    with pytest.raises(ConfigError, match=r"^model.liger_kernel=true needs the liger_kernel package.*pip install liger-kernel"):
        compose(["model=tiny", "model.liger_kernel=true"])
    with pytest.raises(ConfigError, match=r"train.max_tokens_per_batch=0: expected null or a token count >= 1"):
        compose(["model=tiny", "train.max_tokens_per_batch=0"])
    with pytest.raises(Exception, match=r"eager.*sdpa.*flash_attention_2"):
        compose(["model=tiny", "model.attn_implementation=flash"])
    assert str(compose(["model=tiny", "model.attn_implementation=eager"]).model.attn_implementation) == "eager"


def _sft_key_config(overrides: list[str]) -> dict:
    from align_runner.api import compose
    from align_runner.pipeline.graph import build_graph, stage_config
    from align_runner.pipeline.keys import strip_non_result

    cfg = compose(["model=tiny", *overrides])
    spec = next(s for s in build_graph(cfg) if s.kind == "sft")
    return strip_non_result(stage_config(cfg, spec, ["sft"]))


def test_speed_settings_enter_stage_keys_only_when_set():
    default = _sft_key_config([])
    # at their defaults the new settings are not hashed: the stage keys of earlier runs stay valid
    assert "packing" not in default["train"] and "max_tokens_per_batch" not in default["train"]
    assert "attn_implementation" not in default["model"] and "compile" not in default["model"]
    assert "micro_batch_size" in default["train"]  # (the stripping is not of the whole section)
    packed = _sft_key_config(["train.packing=true", "train.max_tokens_per_batch=4096", "model.attn_implementation=eager"])
    assert packed["train"]["packing"] is True and packed["train"]["max_tokens_per_batch"] == 4096
    assert packed["model"]["attn_implementation"] == "eager"


# ------------------------------------------------------------------------------ torch.compile


def test_compiled_tiny_model_trains_like_the_eager_one(tiny_dir):
    """model.compile=true on CPU: the same loss and gradients through the counted head."""
    rows = _sft_rows(4)
    batch = collate_packed_sft(rows, 0, max_tokens=40)
    results = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = load_causal_lm(tiny_dir, compile=compile)
        head = CountedHead(model, chunk_size=16)
        out = sft_loss(head.target_logps(model, batch, batch["labels"] != -100), None)
        out.loss.backward()
        results.append((out.loss.item(), _grads(model)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it really compiled
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-5)
    assert _max_diff(results[1][1], results[0][1]) < 1e-5


# ------------------------------------------------------------------------------- the sft stage


def test_sft_stage_packed_in_token_budgets_trains_on_the_same_steps(tiny):
    """train.packing + train.max_tokens_per_batch change how each step's examples are batched, not
    which examples a step trains on nor its normalisation: the same losses, and another stage key."""
    import json
    from pathlib import Path

    from conftest import run

    base = [*tiny, "algorithm.stages=[data_prep,sft]", "pipeline.eval=false", "train.max_steps=2", "data.sft.eval=null"]
    plain = run(base).stage("sft")
    packed = run([*base, "train.packing=true", "train.max_tokens_per_batch=256"]).stage("sft")
    assert packed.key != plain.key and not packed.cache_hit

    def losses(stage) -> list[float]:
        rows = [json.loads(line) for line in (Path(stage.dir) / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert len(losses(plain)) == 2
    assert losses(packed) == pytest.approx(losses(plain), abs=1e-4)



# dpo's wiring in CI; reward's scores are checked against padded ones above (its stage run is slow)
@pytest.mark.parametrize("algorithm", [pytest.param("reward", marks=pytest.mark.slow), "dpo"])
def test_preference_stages_packed_with_shared_prompts_train_on_the_same_steps(algorithm, tiny, monkeypatch):
    """train.packing in the reward and dpo stages packs each pair as prompt + chosen + rejected: the
    same losses and held-out metrics as padded pairs, in fewer positions."""
    import json
    from pathlib import Path

    from conftest import run

    import align_runner.data.collate as collate

    shared = []

    def spy(examples, pad_id, *, max_tokens):
        batch = collate_packed_pairs_sharing_prompts(examples, pad_id, max_tokens=max_tokens)
        shared.append(int((batch["input_ids"] != pad_id).sum()))
        return batch

    monkeypatch.setattr(collate, "collate_packed_pairs_sharing_prompts", spy)
    base = [*tiny, f"algorithm={algorithm}", f"algorithm.stages=[data_prep,{algorithm}]", "pipeline.eval=false",
            "train.max_steps=2"]
    plain_run = run(base)
    plain = plain_run.stage(algorithm)
    assert not shared
    packed_run = run([*base, "train.packing=true"])
    packed = packed_run.stage(algorithm)
    assert packed.key != plain.key and not packed.cache_hit and shared  # (the spy saw its batches)
    if algorithm == "dpo":  # packing is a speed setting: the reference log-probs stay cached
        assert packed_run.stage("ref_logps").key == plain_run.stage("ref_logps").key

    def rows(stage) -> list[dict]:
        return [json.loads(line) for line in (Path(stage.dir) / "metrics.jsonl").read_text().splitlines()]

    losses = [[r["loss"] for r in rows(stage) if "loss" in r] for stage in (plain, packed)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], abs=1e-4)
    accuracy = {"reward": "eval/accuracy", "dpo": "eval/rewards/accuracies"}[algorithm]
    assert packed.metrics[accuracy] == plain.metrics[accuracy]
    assert packed.metrics["eval/loss"] == pytest.approx(plain.metrics["eval/loss"], abs=1e-4)


def test_counted_head_refuses_a_model_that_transforms_its_logits_after_the_head(tiny_dir):
    # Gemma-2/3 cap their logits after the head: log-probs taken at the head would be silently wrong
    model = load_causal_lm(tiny_dir)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(TypeError, match=r"config\.final_logit_softcapping=30\.0"):
        CountedHead(model, 64)
