"""Tiny SFT on the shipped demo data learns: loss falls well below its start and the answer format is learnt."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run


def test_tiny_sft_drives_loss_down_and_learns_the_format(tiny):
    result = run([*tiny, "train.max_steps=60", "train.lr=3e-3", "data.sft.train.limit=256"])
    rows = [json.loads(line) for line in (Path(result.stage("sft").dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    # start: ~ln(512) = 6.2 nats/token for a random 512-token vocab
    assert train[0]["loss"] > 5.5
    assert result.stage("sft").metrics["eval/loss"] < 2.5
    before, after = result.stage("eval_before").metrics, result.stage("eval_after").metrics
    assert before["heldout_loss"] > 5.5 and after["heldout_loss"] < 2.5
    # replies become bare numbers ("format" checker) although the tiny model cannot add yet
    assert before["format"] == 0.0 and after["format"] >= 0.8
