"""The dpo and ref_logps stages on the tiny model: the graph pipeline=auto builds, what the reference
key depends on, that DPO learns (the margin grows, held-out pairs are ranked right), that the
reference artifact holds the reference's log-probs, and that any configured loss runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run

from align_runner.algos.logprobs import sequence_logps
from align_runner.api import compose
from align_runner.data.collate import collate_preference
from align_runner.data.prepared import load_prepared
from align_runner.models.loading import load_causal_lm, load_tokenizer
from align_runner.models.reference import (
    ReferenceMismatchError,
    attach_reference,
    load_reference_logps,
)
from align_runner.pipeline.graph import PipelineConfigError, build_graph
from align_runner.pipeline.runner import plan
from align_runner.pipeline.store import StageStore
from align_runner.stages.dpo import batch_logps

# DPO's config sets a learning rate for real models; the tiny one needs a much larger one to move in a few steps
FAST_DPO = ["algorithm=dpo", "algorithm.train.lr=1e-3"]
# skip SFT and eval: DPO straight from the base model, data prep and the reference only
DPO_ONLY = ["algorithm.stages=[data_prep,dpo]", "pipeline.eval=false", "data.preference.eval.limit=16"]


def metric_rows(stage_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(stage_dir) / "metrics.jsonl").read_text().splitlines()]


def test_auto_pipeline_inserts_the_reference_stage_before_dpo():
    specs = build_graph(compose(["algorithm=dpo", "model=tiny"]))
    assert [(s.name, s.kind, s.model_from) for s in specs] == [
        ("data_prep", "data_prep", None),
        ("sft", "sft", None),
        ("eval_before", "eval", "sft"),
        ("ref_logps", "ref_logps", "sft"),
        ("dpo", "dpo", "sft"),
        ("eval_after", "eval", "dpo"),
    ]
    assert next(s for s in specs if s.kind == "ref_logps").config == "algorithm.reference"


def test_dpo_without_its_reference_stage_is_a_config_error():
    explicit = (
        "pipeline.stages=[{name:data_prep,kind:data_prep,config:data},{name:dpo,kind:dpo,config:algorithm}]"
    )
    with pytest.raises(PipelineConfigError, match="reads reference log-probs from stage 'ref_logps'"):
        compose(["algorithm=dpo", "model=tiny", explicit])


def _keys(overrides: list[str], tmp_path: Path) -> dict[str, str]:
    cfg = compose(["algorithm=dpo", "model=tiny", f"paths.outputs={tmp_path}", *overrides])
    return {p.spec.name: p.key for p in plan(cfg, StageStore(cfg.paths.store))}


def test_reference_key_follows_model_data_and_batch_but_not_the_loss(tmp_path):
    base = _keys([], tmp_path)
    for loss_only in (
        ["algorithm.loss.beta=0.05"],
        ["algorithm.loss.label_smoothing=0.1"],
        ["algorithm.train.lr=1e-4"],
    ):
        keys = _keys(loss_only, tmp_path)
        assert keys["ref_logps"] == base["ref_logps"] and keys["sft"] == base["sft"], loss_only
        assert keys["dpo"] != base["dpo"], loss_only
    for changes_reference in (
        ["algorithm.reference.batch_size=4"],  # batch shapes change the sums' low bits
        ["data.preference.train.limit=32"],  # other data
        ["+upstream.sft.train.lr=1e-4"],  # another reference model (the SFT output)
        ["hardware.precision=bf16"],  # other numerics
    ):
        keys = _keys(changes_reference, tmp_path)
        assert keys["ref_logps"] != base["ref_logps"], changes_reference
        assert keys["dpo"] != base["dpo"], changes_reference


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, model_cache):
    """The default DPO pipeline (data_prep, sft, eval_before, ref_logps, dpo, eval_after), once."""
    out = tmp_path_factory.mktemp("dpo")
    overrides = [
        "model=tiny",
        f"paths.outputs={out}",
        f"paths.cache={model_cache}",
        "train.progress=false",
        "data.sft.train.limit=64",
        "data.preference.train.limit=64",
        "data.prompt.eval.limit=8",
        "eval.limit=8",
        "eval.max_new_tokens=4",
        "train.max_steps=4",
        "train.lr=1e-3",
        *FAST_DPO,
        "+algorithm.train.max_steps=8",
        "+algorithm.train.eval_every=2",
    ]
    return run(overrides)


def test_dpo_margin_grows_over_training(dpo_run):
    assert [s.name for s in dpo_run.stages] == [
        "data_prep",
        "sft",
        "eval_before",
        "ref_logps",
        "dpo",
        "eval_after",
    ]
    train = [r for r in metric_rows(dpo_run.stage("dpo").dir) if "rewards/margins" in r]
    assert len(train) == 8
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert all(key in r for r in train), key
    # step 1 is computed before any update: the policy IS the reference, so every implicit reward is 0
    # (up to the float noise of other batch shapes), and the loss is -log sigmoid(0) = log 2
    assert abs(train[0]["rewards/margins"]) < 1e-4
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert train[-1]["rewards/margins"] > 0.5
    assert train[-1]["loss"] < 0.5


def test_dpo_ranks_held_out_pairs_by_implicit_reward(dpo_run):
    evals = [r for r in metric_rows(dpo_run.stage("dpo").dir) if "eval/rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    # Before DPO the implicit reward beta * log(pi / pi_ref) is 0 for every response, so no held-out
    # pair is ranked right; after it, clearly more than chance are (the demo's chatty rejections are
    # learnable; its off-by-one numbers are not, for a model this small).
    final = dpo_run.stage("dpo").metrics
    assert final["eval/rewards/accuracies"] > 0.6
    assert final["eval/rewards/margins"] > evals[0]["eval/rewards/margins"] > 0


def test_reference_artifact_holds_the_sft_models_log_probs(dpo_run):
    ref_dir = Path(dpo_run.stage("ref_logps").dir)
    data_dir = Path(dpo_run.stage("data_prep").dir)
    rows = load_prepared(data_dir, "preference", "eval")
    refs = load_reference_logps(ref_dir, "eval")
    assert len(refs) == len(rows) == 64
    sft_model = str(Path(dpo_run.stage("sft").dir) / "model")
    model, tokenizer = load_causal_lm(sft_model).eval(), load_tokenizer(sft_model)
    with torch.no_grad():  # one pair at a time: no padding at all; all logits, as a plain computation does
        for i in (0, 5, 63):
            batch = collate_preference([rows[i]], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logps, _ = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
            assert refs[i]["ref_chosen_logps"] == pytest.approx(float(logps[0]), abs=1e-4)
            assert refs[i]["ref_rejected_logps"] == pytest.approx(float(logps[1]), abs=1e-4)


def test_reference_rows_must_line_up_with_the_data(dpo_run):
    ref_dir = Path(dpo_run.stage("ref_logps").dir)
    rows = load_prepared(Path(dpo_run.stage("data_prep").dir), "preference", "eval")
    assert (
        attach_reference(rows, ref_dir, "eval")[3]["ref_chosen_logps"]
        == load_reference_logps(ref_dir, "eval")[3]["ref_chosen_logps"]
    )
    with pytest.raises(ReferenceMismatchError, match="has 64 rows but the 'eval' preference split has 63"):
        attach_reference(rows[:-1], ref_dir, "eval")


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> str:
    """One stage store for the loss variants: data prep and the reference are computed once for all."""
    return str(tmp_path_factory.mktemp("store"))


# (overrides, the step-1 loss worked out by hand where the policy equals the reference (h = 0), a metric
# only this loss logs)
LOSS_VARIANTS = {
    # IPO: (h - 1/(2 beta))^2 = (0 - 1/(2 * 0.1))^2 = 25
    "ipo": (["algorithm=ipo"], 25.0, "rewards/margins"),
    # sigmoid + 0.5 * BCO: log 2 + 0.5 * (2 log 2) = 2 log 2
    "mixture": (
        [
            "algorithm.loss._target_=align_runner.algos.dpo.mixture_loss",
            "~algorithm.loss.beta",
            "~algorithm.loss.label_smoothing",
            "+algorithm.loss.losses=[{_target_:align_runner.algos.dpo.sigmoid_loss,_partial_:true,beta:0.1},"
            "{_target_:align_runner.algos.dpo.bco_pair_loss,_partial_:true,beta:0.1}]",
            "+algorithm.loss.weights=[1.0,0.5]",
        ],
        2 * math.log(2),
        "bco_pair_loss/rewards/margins",
    ),
    # RPO: log 2 + alpha * NLL of the chosen response (checked > log 2 below)
    "rpo": (
        [
            "algorithm.loss._target_=align_runner.algos.dpo.rpo_loss",
            "~algorithm.loss.label_smoothing",
            "+algorithm.loss.alpha=1.0",
        ],
        None,
        "nll_loss",
    ),
}


@pytest.mark.parametrize("variant", sorted(LOSS_VARIANTS))
def test_loss_selected_by_target_runs_through_the_stage(variant, tiny, shared_store):
    overrides, first_loss, own_metric = LOSS_VARIANTS[variant]
    result = run(
        [*tiny, *FAST_DPO, *DPO_ONLY, f"paths.store={shared_store}", "train.max_steps=2", *overrides]
    )
    rows = [r for r in metric_rows(result.stage("dpo").dir) if "loss" in r and "lr" in r]
    assert own_metric in rows[0]
    if first_loss is not None:
        assert rows[0]["loss"] == pytest.approx(first_loss, rel=1e-4)
    else:
        assert rows[0]["loss"] > math.log(2) + 0.1 and rows[0]["nll_loss"] > 0.1
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_standard_implicit_prompt_file_runs_through_dpo(tiny, tmp_path):
    # standard (plain-text) pairs without a prompt column: the prompt is their shared start
    def pair(a: int, b: int) -> dict:
        q = f"Q: What is {a} + {b}? A:"
        return {"chosen": f"{q} {a + b}", "rejected": f"{q} {a + b + 1 + a % 3}"}

    for split, offset in (("train", 0), ("eval", 1)):
        rows = [pair(i + offset, 2 * i) for i in range(16)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(
        [
            *tiny,
            *FAST_DPO,
            *DPO_ONLY,
            "train.max_steps=2",
            f"data.preference.train.path={tmp_path / 'train.jsonl'}",
            f"data.preference.eval.path={tmp_path / 'eval.jsonl'}",
        ]
    )
    prep = result.stage("data_prep").metrics
    assert prep["preference/train/kept"] == 16 and prep["preference/eval/kept"] == 16
    prepared = load_prepared(Path(result.stage("data_prep").dir), "preference", "train")
    tokenizer = load_tokenizer(str(Path(result.stage("dpo").dir) / "model"))
    # the extracted prompt is the pair's shared start; prompt + response is the whole original text
    first = prepared[1]
    assert tokenizer.decode(first["prompt_ids"]).startswith("Q: What is 1 + 2? A:")
    assert (
        tokenizer.decode(first["prompt_ids"] + first["chosen_ids"], skip_special_tokens=True)
        == "Q: What is 1 + 2? A: 3"
    )
    assert (
        tokenizer.decode(first["prompt_ids"] + first["rejected_ids"], skip_special_tokens=True)
        == "Q: What is 1 + 2? A: 5"
    )
    metrics = result.stage("dpo").metrics
    assert math.isfinite(metrics["loss"]) and "eval/rewards/accuracies" in metrics


def test_batch_logps_splits_chosen_first_and_length_normalises_the_nll():
    # 2 pairs: rows 0-1 chosen, rows 2-3 rejected (collate_preference's layout)
    logps, tokens = torch.tensor([-2.0, -6.0, -1.0, -3.0]), torch.tensor([2, 3, 1, 3])
    batch = {"ref_chosen_logps": torch.tensor([-2.5, -5.0]), "ref_rejected_logps": torch.tensor([-1.0, -4.0])}
    out = batch_logps(logps, tokens, batch)
    assert out.policy_chosen.tolist() == [-2.0, -6.0] and out.policy_rejected.tolist() == [-1.0, -3.0]
    assert out.ref_chosen.tolist() == [-2.5, -5.0] and out.ref_rejected.tolist() == [-1.0, -4.0]
    assert out.chosen_nll.tolist() == [1.0, 2.0]  # -(-2)/2, -(-6)/3
    assert out.chosen_tokens.tolist() == [2, 3] and out.rejected_tokens.tolist() == [1, 3]


def test_lora_dpo_reference_is_the_adapter_free_input_model(tiny, shared_store):
    # the reference artifact comes from the plain input model; the LoRA policy starts equal to it
    # (B = 0), so step 1's implicit rewards are 0, and they move once the adapters train
    lora = ["+model/lora=default", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0"]
    result = run([*tiny, *FAST_DPO, *DPO_ONLY, f"paths.store={shared_store}", *lora])
    train = [r for r in metric_rows(result.stage("dpo").dir) if "rewards/margins" in r]
    assert abs(train[0]["rewards/margins"]) < 1e-4
    assert (
        train[-1]["rewards/margins"] > 0.01 and result.stage("dpo").metrics["eval/rewards/accuracies"] > 0.6
    )
    assert (Path(result.stage("dpo").dir) / "model" / "adapter" / "adapter_config.json").exists()
