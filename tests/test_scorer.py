"""RewardModelScorer: a saved num_labels=1 classifier scores prompt_ids + completion_ids as one forward
of each unpadded sequence would, whatever the batching; missing ids get a clear error."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig

from align_runner.algos.rewards import call_reward, score_completions
from align_runner.models.scorer import RewardModelScorer

PAD = 0  # also EOS, as in the tiny models (pad = eos)
VOCAB = 40


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> str:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         num_labels=1, pad_token_id=PAD, eos_token_id=PAD)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    stage_dir = tmp_path_factory.mktemp("reward-stage")
    model.save_pretrained(stage_dir / "model")  # the reward stage's layout: <stage_dir>/model
    return str(stage_dir)


def _direct(model, seq: list[int]) -> float:
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([seq])).logits[0, 0])


def test_scores_equal_a_direct_forward_of_each_sequence(reward_dir):
    prompt_ids = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15], [3, 4, 5]]
    # responses end with EOS (= pad here) or not (truncated), and differ in length
    completion_ids = [[20, 21, PAD], [22, 23, 24, 25, 26, 27], [28], [29, 30, 31, 32, PAD], [33]]
    scorer = RewardModelScorer(reward_dir, batch_size=2)
    assert scorer.__name__ == "reward_model"
    model = AutoModelForSequenceClassification.from_pretrained(f"{reward_dir}/model")
    expected = [_direct(model, p + c) for p, c in zip(prompt_ids, completion_ids)]
    got = scorer(prompts=["x"] * 5, completions=["y"] * 5, completion_ids=completion_ids, prompt_ids=prompt_ids)
    assert got == pytest.approx(expected, abs=1e-5)
    one_batch = RewardModelScorer(reward_dir, batch_size=16)(completion_ids=completion_ids, prompt_ids=prompt_ids)
    assert one_batch == pytest.approx(expected, abs=1e-5)
    # through the reward-function path: prompt_ids arrives as a dataset column
    scores = score_completions({"reward_model": scorer}, weights=None, prompts=["x"] * 5, completions=["y"] * 5,
                               completion_ids=completion_ids, columns={"prompt_ids": prompt_ids, "answer": [1] * 5})
    assert scores.total.tolist() == pytest.approx(expected, abs=1e-5)


def test_missing_ids_and_bad_ids_are_clear_errors(reward_dir):
    scorer = RewardModelScorer(reward_dir)
    with pytest.raises(ValueError, match=r"without \['prompt_ids'\]"):
        call_reward(scorer, prompts=["x"], completions=["y"], completion_ids=[[1]])
    with pytest.raises(ValueError, match=r"without \['prompt_ids', 'completion_ids'\]"):
        scorer(prompts=["x"], completions=["y"])
    with pytest.raises(ValueError, match="outside the reward model's vocabulary"):
        scorer(prompt_ids=[[1]], completion_ids=[[VOCAB]])
    with pytest.raises(ValueError, match="differs from the reward model's pad_token_id"):
        RewardModelScorer(reward_dir, pad_id=3)
