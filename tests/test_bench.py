"""scripts/bench: the FLOP count and data generation by hand; the --quick smoke runs of every case
(run.py all, align_runner side: results, units, FLOP/s, engine overhead, token counts), one case with
both sides when TRL is installed; ppo.py's time split and engine overhead."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench"
sys.path.insert(0, str(BENCH))

import chat_data  # noqa: E402
import measure  # noqa: E402

CASES = ["sft", "sft_packed", "reward", "reward_packed", "dpo", "dpo_packed", "grpo"]


def bench(args: list[str], out: Path, script: str = "run.py") -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--threads", "1", "--out", str(out)],
        cwd=out,  # the script finds the repo and writes only under --out and temp dirs
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ===================================================================================== by hand

TINY = {"num_hidden_layers": 2, "hidden_size": 4, "vocab_size": 10, "non_embedding_parameters": 100}


def test_sequence_flops_by_hand():
    # 6*100*3 (weights) + 12*2*4*3^2 (attention) + 6*4*10*2 (LM head on 2 positions)
    assert measure.sequence_flops(TINY, 3, 2) == 1800 + 864 + 480


def test_steps_flops_counts_real_tokens_and_trained_positions():
    # a padded SFT batch: rows of 3 and 2 real tokens; labels train 3 positions (the first column never counts)
    padded = {
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "labels": torch.tensor([[-100, 5, 6], [-100, 7, -100]]),
    }
    # a packed preference row: sequences 0 (2 tokens) and 1 (3 tokens), one pad; 3 response positions
    packed = {
        "sequence_ids": torch.tensor([[0, 0, 1, 1, 1, -1]]),
        "loss_mask": torch.tensor([[0, 1, 0, 1, 1, 0]]),
    }
    assert measure.batch_sequences(padded) == [3, 2] and measure.logit_positions(padded) == 3
    assert measure.batch_sequences(packed) == [2, 3] and measure.logit_positions(packed) == 3
    want = (
        measure.sequence_flops(TINY, 3, 0) + measure.sequence_flops(TINY, 2, 0) + 6 * 4 * 10 * 3
        + measure.sequence_flops(TINY, 2, 0) + measure.sequence_flops(TINY, 3, 0) + 6 * 4 * 10 * 3
    )
    assert measure.steps_flops(TINY, [[padded], [packed]]) == want



def test_a_shared_prompt_pair_counts_its_tokens_once_and_its_attended_pairs():
    from align_runner.data.collate import collate_packed_pairs_sharing_prompts

    # prompt [1, 2], chosen [3], rejected [4, 5]: 5 real tokens, then one pad (a longer second row)
    pairs = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
             {"prompt_ids": [6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11]}]
    batch = collate_packed_pairs_sharing_prompts(pairs, 0, max_tokens=6)
    assert batch["input_ids"].shape == (2, 6)
    # attended pairs: prompt 1 + 2, chosen 3; rejected 3 + 4 = 13 in the first unit; the second: 1 + 2,
    # chosen 3 + 4, rejected 3 + 4 = 17
    assert measure.shared_prefix_work(batch) == (11, 30) and measure.batch_tokens(batch) == 11
    # a reward model scores last tokens (no LM head); DPO's LM head scores the 7 response tokens
    assert measure.batch_flops(TINY, batch, lm_head=False) == 6 * 100 * 11 + 12 * 2 * 4 * 2 * 30
    assert measure.batch_flops(TINY, batch) == 6 * 100 * 11 + 12 * 2 * 4 * 2 * 30 + 6 * 4 * 10 * 7
    assert measure.shared_prefix_work({"attention_mask": torch.ones(2, 3)}) is None

def test_alternate_reports_each_pair_and_their_median():
    calls = []
    out = measure.alternate(lambda: calls.append("engine"), lambda: calls.append("bare"), repeats=3, clock=measure.ModelClock())
    # one unmeasured call of each, then alternating
    assert calls == ["engine", "bare"] * 4
    assert out["pairs_pct"] == [100 * (a - b) / b for a, b in zip(out["engine_s"], out["bare_s"])]
    assert out["median_pct"] == sorted(out["pairs_pct"])[1]


def test_spread_covers_the_range_evenly():
    targets = chat_data.spread(5, 20, 400, random.Random(0))
    assert sorted(targets) == [20, 115, 210, 305, 400]


class WordTokenizer:
    """Stand-in tokenizer: one token per whitespace-separated piece of the rendered chat."""

    def apply_chat_template(self, messages, tokenize=False):
        return " ".join(f"<{m['role']}> {m['content']} </s>" for m in messages)

    def encode(self, text, add_special_tokens=False):
        return text.split()


def test_generated_rows_reach_their_target_lengths():
    tok = WordTokenizer()
    rows, lengths = chat_data.sft_rows(tok, 8, 20, 100, seed=0)
    # 4 template tokens + the words: every target is reachable exactly
    assert sorted(lengths) == sorted(chat_data.spread(8, 20, 100, random.Random(0)))
    assert [chat_data.conversation_tokens(tok)(r["prompt"] + r["completion"]) for r in rows] == lengths
    pairs, pair_lengths = chat_data.preference_rows(tok, 8, 20, 100, seed=0)
    for row, (chosen, rejected) in zip(pairs, pair_lengths):
        assert chosen != rejected and set(row) == {"prompt", "chosen", "rejected"}
        assert chat_data.conversation_tokens(tok)(row["prompt"] + row["rejected"]) == rejected


# ===================================================================================== smoke runs


def test_direct_overhead_is_the_time_a_loop_spends_outside_the_model():
    """A loop that does the model's work plus 10 ms of its own per call, against one that does the model's
    work only: the direct estimate finds the 10 ms over the bare loop's time, whatever the model's own
    time does, and Tensor.backward is itself again afterwards."""
    clock = measure.ModelClock()
    backward = torch.Tensor.backward
    w = torch.ones(3, requires_grad=True)
    model_s = iter([0.05, 0.02, 0.08, 0.03, 0.04, 0.06])  # the model's time swings from pass to pass

    def step():  # the forward + loss
        time.sleep(next(model_s, 0.03))
        return (w * 2).sum()

    timed, bookkeeping = clock.wrap(step), 0.01

    def engine():
        timed().backward()
        time.sleep(bookkeeping)

    out = measure.alternate(engine, lambda: timed().backward(), repeats=2, clock=clock)
    assert torch.Tensor.backward is backward
    assert len(out["engine_rest_s"]) == len(out["bare_rest_s"]) == 2
    assert all(0 <= r < t for r, t in zip(out["engine_rest_s"] + out["bare_rest_s"], out["engine_s"] + out["bare_s"]))
    assert sum(out["engine_rest_s"]) - sum(out["bare_rest_s"]) == pytest.approx(2 * bookkeeping, abs=0.012)
    assert out["direct_pct"] == pytest.approx(
        100 * (sum(out["engine_rest_s"]) - sum(out["bare_rest_s"])) / sum(out["bare_s"]))


def test_suite_quick_align_runner(tmp_path):
    bench(["all", "--quick", "--repeats", "1", "--only", "align_runner"], tmp_path)
    suite = json.loads((tmp_path / "suite-quick.json").read_text())
    assert list(suite["cases"]) == CASES and suite["matmul_peak"]["peak_flops"] > 0
    units = {"sft": "tokens", "sft_packed": "tokens", "reward": "pairs", "reward_packed": "pairs", "dpo": "pairs", "dpo_packed": "pairs", "grpo": "completions"}
    for name, row in suite["cases"].items():
        assert row["unit"] == units[name]
        assert row["ratio"] is None and row["ratio_pairs"] is None and row["peak_rss_ratio"] is None  # no TRL side
        assert row["flops_per_s"] > 0 and 0 < row["peak_share"] == pytest.approx(row["flops_per_s"] / suite["matmul_peak"]["peak_flops"])
        assert isinstance(row["overhead_pct"], float)
    md = (tmp_path / "suite-quick.md").read_text()
    assert all(f"| {name} | " in md for name in CASES)

    for name in CASES:
        res = json.loads((tmp_path / f"{name}-quick.json").read_text())
        assert (tmp_path / f"{name}-quick.md").read_text().startswith(f"# {name} (quick)")
        assert set(res["summary"]) == {"align_runner"}
        (run,) = res["runs"]
        a = res["summary"]["align_runner"]
        assert a["flops_per_s"] == pytest.approx(run["flops"] / run["seconds"]) and a["per_s"] == run["units"] / run["seconds"]
        o = a["overhead"]
        assert len(o["engine_s"]) == len(o["bare_s"]) == 2 and min(o["engine_s"] + o["bare_s"]) > 0
        assert o["median_pct"] == pytest.approx(sum(o["pairs_pct"]) / 2)
        assert all(0 <= r < t for r, t in zip(o["engine_rest_s"] + o["bare_rest_s"], o["engine_s"] + o["bare_s"]))
        data = res["data"]
        if name == "grpo":
            assert run["steps"] == 2 and run["units"] == 2 * 4 * 8  # steps x prompts per step x generations
            continue
        # the generated rows span the range, and the engine trained on each exactly once: its batches'
        # real tokens are the rendered rows' less the template's trailing newline, which align_runner drops
        assert data["min"] <= 40 and data["max"] >= 395
        fed = data["tokens"] - data["sequences"]
        if name in ("reward_packed", "dpo_packed"):  # each pair's prompt fed once
            assert fed / 2 < run["tokens_trained"] < fed
        else:
            assert run["tokens_trained"] == fed
        assert run["units"] == (data["tokens"] if units[name] == "tokens" else data["pairs"])
        assert data["sequences"] == (16 if units[name] == "tokens" else 2 * 16)  # --quick: 16 rows / pairs
        assert run["steps"] == (1 if name == "sft_packed" else 2)  # 16 rows: 2 steps of 8; packed: TRL's 1 step


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed")
def test_sft_quick_both_sides_gives_ratios(tmp_path):
    bench(["sft", "--quick", "--repeats", "1"], tmp_path)
    res = json.loads((tmp_path / "sft-quick.json").read_text())
    s = res["summary"]
    assert s["ratio"]["per_s"] == pytest.approx(s["align_runner"]["per_s"] / s["trl"]["per_s"])
    assert s["ratio"]["pairs"] == [pytest.approx(s["ratio"]["per_s"])]
    assert s["ratio"]["peak_rss_mib"] == pytest.approx(s["align_runner"]["peak_rss_mib"] / s["trl"]["peak_rss_mib"])
    trl, ar = (next(r for r in res["runs"] if r["side"] == side) for side in ("trl", "align_runner"))
    # the same rows and units on both sides; TRL feeds the rendered rows as they are
    assert trl["units"] == ar["units"] == res["data"]["tokens"] == trl["tokens_trained"]
    assert trl["steps"] == ar["steps"] == 2


def test_ppo_quick_reports_the_time_split_and_engine_overhead(tmp_path):
    bench(["--quick", "--overhead-repeats", "2"], tmp_path, script="ppo.py")
    res = json.loads((tmp_path / "ppo-quick.json").read_text())
    phases = ("generation", "scoring", "reference", "values", "update")
    assert [r["rollout"] for r in res["rollouts"]] == [1, 2]  # --quick: 2 rollouts
    for r in res["rollouts"]:
        assert min(r[k] for k in phases) > 0 and r["other"] >= 0
        assert r["total"] == pytest.approx(sum(r[k] for k in (*phases, "other")))
    # the medians leave out the first rollout (one-time costs): of one rollout, the shares add up to the whole
    assert res["split"]["rollouts"] == [2] and sum(res["split"]["median_share"].values()) == pytest.approx(1.0)
    o = res["overhead"]
    assert o["optimizer_steps"] == 2 * 2 * 2  # ppo_epochs x steps_per_rollout x (policy, critic)
    assert len(o["engine_s"]) == len(o["bare_s"]) == 2 and min(o["engine_s"] + o["bare_s"]) > 0
    assert o["pairs_pct"] == [100 * (a - b) / b for a, b in zip(o["engine_s"], o["bare_s"])]
    assert o["median_pct"] == pytest.approx(sum(o["pairs_pct"]) / 2)
    assert all(0 <= r < t for r, t in zip(o["engine_rest_s"] + o["bare_rest_s"], o["engine_s"] + o["bare_s"]))
    assert "no PPO trainer" in res["trl"]
    assert (tmp_path / "ppo-quick.md").read_text().startswith("# ppo (quick)")
