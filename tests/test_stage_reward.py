"""The reward stage on the tiny model: pipeline=auto runs data_prep -> sft -> reward, a reward model
learns a synthetic preference rule to >= 0.9 held-out accuracy, its artifact reloads as a Hugging Face
sequence classifier that scores unseen pairs right, and a per-pair margin column enters the loss."""

from __future__ import annotations

import json
import math
import random
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from align_runner.algos.reward import bradley_terry_loss
from align_runner.api import compose
from align_runner.data.collate import collate_preference
from align_runner.pipeline.graph import build_graph
from align_runner.stages.reward import reward_step

# The learnable rule: a chosen reply praises itself with words from GOOD, a rejected one with words from
# BAD. Both share the same frame and ending, so the score at the last token must come from the content.
GOOD = ["good", "kind", "clear", "helpful", "polite", "honest", "calm", "correct"]
BAD = ["bad", "rude", "vague", "useless", "sloppy", "wrong", "harsh", "lazy"]
TOPICS = [
    "the weather",
    "a recipe",
    "my homework",
    "the train times",
    "a poem",
    "the news",
    "a bug",
    "a plan",
]


def _reply(words: list[str], rng: random.Random) -> str:
    return (
        " This reply is "
        + " and ".join(rng.sample(words, rng.randint(2, 4)))
        + ", I hope it answers your question."
    )


def synthetic_preferences(n: int, seed: int) -> list[dict]:
    """Standard explicit-prompt pairs following the GOOD-over-BAD rule; other seeds give unseen pairs."""
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Tell me about {rng.choice(TOPICS)}.",
            "chosen": _reply(GOOD, rng),
            "rejected": _reply(BAD, rng),
        }
        for _ in range(n)
    ]


@pytest.fixture
def rule_data(tmp_path) -> list[str]:
    paths = {}
    for split, seed in (("train", 0), ("eval", 1)):
        paths[split] = tmp_path / f"rule-{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in synthetic_preferences(64, seed)))
    return [f"data.preference.train.path={paths['train']}", f"data.preference.eval.path={paths['eval']}"]


def test_auto_pipeline_for_reward_is_data_prep_sft_reward():
    # no generation eval around it: a reward model is a scorer, not a policy
    specs = build_graph(compose(["algorithm=reward", "model=tiny"]))
    assert [(s.name, s.model_from) for s in specs] == [("data_prep", None), ("sft", None), ("reward", "sft")]


def test_reward_model_learns_the_rule_and_reloads_as_a_scorer(tiny, rule_data):
    result = run(
        [
            *tiny,
            *rule_data,
            "algorithm=reward",
            "algorithm.stages=[data_prep,reward]",
            "algorithm.train.lr=1e-3",
            "+algorithm.train.max_steps=16",
        ]
    )
    stage_dir = Path(result.stage("reward").dir)
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "accuracy" in r]
    assert len(train) == 16
    assert {"accuracy", "margin", "rewards/chosen_mean", "rewards/rejected_mean", "rewards/std"} <= set(
        train[0]
    )
    # the random head starts with reward gaps near 0; training opens them up
    assert abs(train[0]["margin"]) < 0.2 and train[-1]["margin"] > 1.0
    assert train[-1]["accuracy"] >= 0.9
    assert result.stage("reward").metrics["eval/accuracy"] >= 0.9

    # The artifact is a plain HF sequence classifier: reload it and score held-out pairs as a user would
    assert held_out_accuracy(stage_dir / "model") >= 0.9


def held_out_accuracy(model_dir: Path) -> float:
    """Fraction of unseen rule pairs the reloaded classifier scores chosen over rejected."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    unseen = synthetic_preferences(32, seed=2)

    def score(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            return model(**batch).logits.squeeze(-1)

    chosen = score([r["prompt"] + r["chosen"] for r in unseen])
    rejected = score([r["prompt"] + r["rejected"] for r in unseen])
    assert chosen.shape == (32,)
    return float((chosen > rejected).float().mean())


def test_lora_reward_model_learns_and_saves_a_merged_classifier(tiny, rule_data):
    lora = ["+model/lora=default", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0"]
    result = run(
        [
            *tiny,
            *rule_data,
            *lora,
            "algorithm=reward",
            "algorithm.stages=[data_prep,reward]",
            "algorithm.train.lr=1e-3",
            "+algorithm.train.max_steps=16",
        ]
    )
    assert result.stage("reward").metrics["eval/accuracy"] >= 0.9
    model_dir = Path(result.stage("reward").dir) / "model"
    # adapters merged: the artifact is a whole classifier, loadable without PEFT
    assert not list(model_dir.rglob("adapter_config.json"))
    assert held_out_accuracy(model_dir) >= 0.9


class FixedScores(nn.Module):
    """A stand-in reward model returning preset scores, shape (2B, 1) like a sequence classifier."""

    def __init__(self, scores: list[float]):
        super().__init__()
        self.scores = torch.tensor(scores).unsqueeze(-1)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.scores)


ROWS = [
    {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9]},
    {"prompt_ids": [5], "chosen_ids": [7], "rejected_ids": [9]},
]


def test_margin_column_enters_the_bradley_terry_loss():
    # rewards: chosen (2, 1), rejected (1, 1) -> differences 1 and 0
    model = FixedScores([2.0, 1.0, 1.0, 1.0])
    step = partial(reward_step, loss_fn=partial(bradley_terry_loss))
    without = step(model, collate_preference(ROWS, pad_id=0))
    # mean of -log sigmoid(1) and -log sigmoid(0)
    assert float(without.loss) == pytest.approx((math.log1p(math.exp(-1)) + math.log(2)) / 2)
    with_margin = step(
        model, collate_preference([{**ROWS[0], "margin": 1.0}, {**ROWS[1], "margin": 0.5}], pad_id=0)
    )
    # each pair must win by its margin: -log sigmoid(1 - 1) and -log sigmoid(0 - 0.5)
    assert float(with_margin.loss) == pytest.approx((math.log(2) + math.log1p(math.exp(0.5))) / 2)
    assert float(with_margin.metrics["margin"]) == pytest.approx(0.5)  # the reward gap, margin not subtracted
    assert float(with_margin.metrics["accuracy"]) == pytest.approx(0.5)


def test_margin_missing_from_some_rows_is_an_error():
    step = partial(reward_step, loss_fn=partial(bradley_terry_loss))
    batch = collate_preference([{**ROWS[0], "margin": 1.0}, ROWS[1]], pad_id=0)
    with pytest.raises(ValueError, match="'margin' field must be a number in every preference row"):
        step(FixedScores([2.0, 1.0, 1.0, 1.0]), batch)
