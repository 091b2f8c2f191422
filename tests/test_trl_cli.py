"""`align-runner sft|dpo|reward|grpo` with TRL's flags: the same training as Hydra overrides and the
Python API (one stage key), a --config recipe under the flags, named errors, and the README table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from align_runner import api
from align_runner.pipeline.runner import plan
from align_runner.pipeline.store import StageStore
from align_runner.trl import cli

pytestmark = pytest.mark.usefixtures("one_thread", "outputs_here")
REPO = Path(__file__).resolve().parents[1]


ROWS = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(12)]


def test_hydra_overrides_flags_and_the_python_api_give_one_stage_key(tiny_dir, tmp_path, outputs_here):
    from align_runner.trl import SFTConfig, SFTTrainer
    from align_runner.trl.inputs import jsonl_bytes

    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl_bytes(ROWS))
    # the native form, written out by hand: TRL's SFT defaults with lr 1e-3, 2 steps of 4 rows
    hydra = [
        "algorithm=sft", "algorithm.stages=[data_prep,sft]", "pipeline.eval=false", "model=local",
        f"model.source.name_or_path={tiny_dir}", "data=local", f"data.train.path={data}", "data.max_length=1024",
        "data.assistant_only_loss=false", "algorithm.train.lr=1e-3", "algorithm.train.micro_batch_size=4",
        "algorithm.train.max_steps=2", "algorithm.train.epochs=3", "algorithm.train.scheduler=linear",
        "algorithm.train.warmup_ratio=0", "algorithm.train.weight_decay=0", "seed=42", "model.gradient_checkpointing=false",
    ]
    flags = ["sft", "--model_name_or_path", tiny_dir, "--dataset_name", str(data), "--learning_rate", "1e-3",
             "--per_device_train_batch_size", "4", "--max_steps", "2", "--gradient_checkpointing", "false",
             "--output_dir", "cli-out", "--logging_steps", "1", "algorithm.train.progress=false"]
    python = SFTTrainer(model=tiny_dir, train_dataset=Dataset.from_list(ROWS), args=SFTConfig(
        output_dir="api-out", learning_rate=1e-3, per_device_train_batch_size=4, max_steps=2, gradient_checkpointing=False))

    assert cli.main(flags) == 0
    run = json.loads(next(outputs_here.glob("*/*/sft-*/run.json")).read_text())
    key = {s["name"]: s["key"] for s in run["stages"]}["sft"]
    cfg = api.compose(hydra)
    assert {p.spec.name: p.key for p in plan(cfg, StageStore(cfg.paths.store))}["sft"] == key
    result = api.run(python.overrides)
    assert result.stage("sft").key == key and result.stage("sft").cache_hit  # the CLI's run, reused
    out = AutoModelForCausalLM.from_pretrained("cli-out")
    stored = AutoModelForCausalLM.from_pretrained(Path(result.stage("sft").dir) / "model")
    assert torch.equal(out.lm_head.weight, stored.lm_head.weight)


def test_a_recipe_file_sets_fields_and_flags_win(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 3.0e-4\nnum_train_epochs: 2\nmodel_name_or_path: org/model\n")
    kind, values, native = cli.parse(["dpo", "--config", str(recipe), "--learning_rate", "1e-5", "--beta", "0.3", "seed=7"])
    assert (kind, native) == ("dpo", ["seed=7"])
    assert values == {"learning_rate": 1e-5, "num_train_epochs": 2, "model_name_or_path": "org/model", "beta": 0.3}
    built = cli.overrides(kind, {**values, "dataset_name": "org/data"}, native)
    assert "algorithm.train.lr=1e-05" in built and "algorithm.loss.beta=0.3" in built and built[-1] == "seed=7"
    assert "data.train.path=org/data" in built and "algorithm.train.epochs=2" in built


def test_unknown_flags_and_recipe_keys_are_named_with_exit_code_2(tmp_path, capsys):
    assert cli.main(["sft", "--model_name_or_path", "org/m", "--dataset_name", "org/d", "--learnin_rate", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown flag(s) --learnin_rate" in err and "Did you mean --learning_rate?" in err and len(err.splitlines()) == 1
    recipe = tmp_path / "r.yaml"
    recipe.write_text("neftune_noise_alpha: 5\n")
    assert cli.main(["sft", "--config", str(recipe)]) == 2
    assert "--config: neftune_noise_alpha is not supported" in capsys.readouterr().err
    assert cli.main(["dpo", "--model_name_or_path", "org/m", "--dataset_name", "org/d", "--loss_type", "kto"]) == 2
    assert "loss_type=['kto']: expected one of sigmoid" in capsys.readouterr().err


def test_help_lists_each_flag_with_its_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["grpo", "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "--num_generations" in text and "-> algorithm.num_generations (default 8)" in text
    assert "--lora_r" in text and "-> model.lora.r" in text


def test_grpo_flags_name_reward_functions_and_size_rollouts():
    built = cli.overrides("grpo", {"model_name_or_path": "org/m", "dataset_name": "org/d", "reward_funcs": ["accuracy_reward"],
                                   "max_steps": 10, "per_device_train_batch_size": 4, "num_generations": 4,
                                   "gradient_accumulation_steps": 2, "steps_per_generation": 4}, [])
    # 4 per device x 4 steps = 16 completions a rollout = 4 prompts of 4; a step takes 4 x 2 = 8: 2 steps a rollout
    assert {"algorithm.prompts_per_rollout=4", "algorithm.steps_per_rollout=2", "algorithm.rollouts=5"} <= set(built)
    assert "+algorithm.rewards.accuracy_reward={_target_:align_runner.trl.rewards.accuracy_reward,_partial_:true}" in built


def test_readme_field_table_is_the_field_table():
    from align_runner.trl.fields import markdown_table

    assert markdown_table() in (REPO / "README.md").read_text()
