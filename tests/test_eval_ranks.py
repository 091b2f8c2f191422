"""Eval on several processes: each rank generates a strided share of the prompts (and of the held-out
loss batches); the main process puts them back in prompt order and scores once, so metrics and samples
equal a single process's, bitwise on CPU."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from cli_runner import metrics, run_cli, single_thread, stage_dir

from align_runner.engine.shards import gather_in_order, shard, unshard
from align_runner.stages import eval as eval_stage

# ----------------------------------------------------------------------------------- the split


def test_shard_deals_items_strided():
    assert shard(5, 0, 2) == [0, 2, 4]
    assert shard(5, 1, 2) == [1, 3]
    assert shard(7, 2, 3) == [2, 5]
    assert shard(2, 2, 3) == []  # more ranks than items: the last has none
    assert shard(4, 0, 1) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        shard(4, 2, 2)


def test_unshard_puts_the_shares_back_in_item_order():
    assert unshard([["a", "c", "e"], ["b", "d"]]) == ["a", "b", "c", "d", "e"]
    assert unshard([[0, 3], [1], [2]]) == [0, 1, 2, 3]
    assert unshard([[], []]) == []
    items = [f"p{i}" for i in range(11)]
    for world in (1, 2, 3, 4, 12):
        assert unshard([[items[i] for i in shard(11, r, world)] for r in range(world)]) == items
    with pytest.raises(ValueError, match=r"share sizes \[1, 2\] are not a strided split of 3 items over 2 ranks"):
        unshard([["a"], ["b", "c"]])


class TwoRanks:
    """A stand-in for two processes run one after the other in this process: rank 1's share is kept
    for rank 0's gather_object (call rank 1's side first)."""

    def __init__(self):
        self.shares: dict[int, list] = {}

    def backend(self, rank: int):
        def gather_object(obj):
            self.shares[rank] = obj
            return [self.shares[0], self.shares[1]] if rank == 0 else None

        return SimpleNamespace(rank=rank, world_size=2, is_main=rank == 0, gather_object=gather_object)


def test_gather_in_order_on_the_main_process_only():
    ranks = TwoRanks()
    assert gather_in_order(ranks.backend(1), ["b", "d"]) is None
    assert gather_in_order(ranks.backend(0), ["a", "c", "e"]) == ["a", "b", "c", "d", "e"]


# ------------------------------------------------------------ the eval stage's generation and loss


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from align_runner.models.loading import load_causal_lm, load_tokenizer
    from align_runner.models.tiny import build_tiny

    path = build_tiny(str(tmp_path_factory.mktemp("tiny")))
    return load_causal_lm(path).eval(), load_tokenizer(path)


def _ctx(backend, **section):
    ev = {"max_new_tokens": 5, "temperature": 1.0, "batch_size": 2, **section}
    return SimpleNamespace(
        section=SimpleNamespace(**ev), backend=backend, is_main=backend.is_main, cfg=SimpleNamespace(seed=3),
        spec=SimpleNamespace(name="eval_after"),
    )


def _single():
    return SimpleNamespace(rank=0, world_size=1, is_main=True, gather_object=lambda obj: [obj])


def test_each_rank_generates_only_its_share(monkeypatch, caplog):
    calls = []

    def fake_generate(model, tokenizer, prompt_ids, *, index, **_):
        calls.append((list(prompt_ids), list(index)))
        return [[100 + i] for i in index]

    monkeypatch.setattr(eval_stage, "generate", fake_generate)
    prompts = [[10 + i] for i in range(5)]
    ranks = TwoRanks()
    with caplog.at_level("INFO", logger="align_runner"):
        assert eval_stage.generate_split(_ctx(ranks.backend(1)), None, None, prompts) is None
        merged = eval_stage.generate_split(_ctx(ranks.backend(0)), None, None, prompts)
    assert calls == [([[11], [13]], [1, 3]), ([[10], [12], [14]], [0, 2, 4])]
    assert merged == [[100], [101], [102], [103], [104]]
    assert "eval_after: rank 1 generates 2 of 5 prompts" in caplog.text
    assert "eval_after: rank 0 generates 3 of 5 prompts" in caplog.text


def test_sampled_completions_do_not_depend_on_the_number_of_processes(tiny):
    model, tok = tiny
    prompts = [tok(t)["input_ids"] for t in ("hello", "a longer prompt than the first", "x y", "the end", "one more")]
    with single_thread():
        alone = eval_stage.generate_split(_ctx(_single()), model, tok, prompts)
        ranks = TwoRanks()
        assert eval_stage.generate_split(_ctx(ranks.backend(1)), model, tok, prompts) is None
        split = eval_stage.generate_split(_ctx(ranks.backend(0)), model, tok, prompts)
    assert split == alone
    assert len({tuple(c) for c in alone}) == len(prompts)  # sampled (temperature 1), not one repeated reply


def test_heldout_loss_split_over_batches_is_bitwise_the_single_process_value(tiny):
    model, tok = tiny
    texts = ["one two", "three four five six", "seven", "eight nine ten", "eleven twelve", "a b c d e f g"]
    ids = [tok(t)["input_ids"] for t in texts]
    rows = [{"input_ids": i, "loss_mask": [0] + [1] * (len(i) - 1)} for i in ids]
    with single_thread():
        alone = eval_stage.heldout_loss(model, rows, tok.pad_token_id, 2, _single())
        ranks = TwoRanks()
        assert eval_stage.heldout_loss(model, rows, tok.pad_token_id, 2, ranks.backend(1)) is None
        split = eval_stage.heldout_loss(model, rows, tok.pad_token_id, 2, ranks.backend(0))
    assert split == alone
    # 3 batches of 2 rows: rank 0 measured batches 0 and 2, rank 1 batch 1 (rows 2 and 3); each
    # (loss sum, tokens) pair counts a row's tokens after the first
    tokens = [len(i) - 1 for i in ids]
    assert [n for _, n in ranks.shares[0]] == [tokens[0] + tokens[1], tokens[4] + tokens[5]]
    assert [n for _, n in ranks.shares[1]] == [tokens[2] + tokens[3]]


# -------------------------------------------------------------------------- 2 processes, end to end

EVAL_ONLY = [
    "model=tiny",
    "pipeline.stages=[{name:data_prep,kind:data_prep,config:data},{name:eval,kind:eval,config:eval}]",
    "pipeline.objective=eval/accuracy",
    "data.sft.train.limit=16",
    "data.sft.eval.limit=10",
    "data.preference.train.limit=16",
    "data.prompt.train.limit=16",
    "data.prompt.eval.limit=15",
    # 15 prompts: 8 on rank 0 and 7 on rank 1, two batches each; sampled, so the seeds matter
    "eval.limit=15",
    "eval.batch_size=4",
    "eval.max_new_tokens=6",
    "eval.temperature=1.0",
    "eval.samples=15",
]


def test_two_processes_eval_equals_one(tmp_path, model_cache):
    from align_runner import api

    one, two = tmp_path / "one", tmp_path / "two"
    common = [*EVAL_ONLY, f"paths.cache={model_cache}"]
    run = run_cli([*common, f"paths.outputs={two}", "hardware=cpu_ddp2"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "eval: rank 0 generates 8 of 15 prompts" in log
    assert "eval: rank 1 generates 7 of 15 prompts" in log
    with single_thread():
        result = api.run([*common, f"paths.outputs={one}"])

    ddp, single = stage_dir(two, "eval"), stage_dir(one, "eval")
    # one metrics row (rank 0's), equal to the single process's, and the same samples in prompt order
    assert metrics(ddp) == metrics(single) and len(metrics(ddp)) == 1
    samples = json.loads((ddp / "samples.json").read_text())
    assert samples == json.loads((single / "samples.json").read_text())
    assert len(samples) == 15 and len({s["completion"] for s in samples}) > 1
    manifest = json.loads((ddp / "manifest.json").read_text())
    assert manifest["metrics"] == result.stage("eval").metrics
    assert manifest["metrics"]["num_prompts"] == 15 and "heldout_loss" in manifest["metrics"]
