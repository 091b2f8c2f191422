"""align_runner.trl: TRL's README quick-starts run with only the import changed (local stand-ins for hub
names), on the pipeline: stage keys, cache, run.json; output_dir loads with from_pretrained."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from align_runner import api
from align_runner.pipeline.runner import plan
from align_runner.pipeline.store import StageStore
from align_runner.validate import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread", "outputs_here")


def capybara(n: int = 16) -> Dataset:
    """trl-lib/Capybara's schema: conversations under `messages`."""
    return Dataset.from_list([{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                            {"role": "assistant", "content": f"{2 * i}"}]} for i in range(n)])


def ultrafeedback(n: int = 8) -> Dataset:
    """trl-lib/ultrafeedback_binarized's schema: conversational chosen / rejected, implicit prompt."""
    def turn(i, answer):
        return [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": answer}]

    return Dataset.from_list([{"chosen": turn(i, str(i + 1)), "rejected": turn(i, "no idea"), "score_chosen": 9.0,
                               "score_rejected": 1.0} for i in range(n)])


def stage_keys(overrides: list[str]) -> dict[str, str]:
    """name -> key of each stage these overrides plan (nothing runs)."""
    cfg = api.compose(overrides)
    return {p.spec.name: p.key for p in plan(cfg, StageStore(cfg.paths.store))}


def fast(config_cls, output_dir: str, **kw):
    return config_cls(output_dir=output_dir, max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                      gradient_checkpointing=False, disable_tqdm=True, **kw)


# ------------------------------------------------------------------------------- TRL's quick-starts
def test_sft_quickstart_runs_and_a_second_train_is_a_cache_hit(tiny_dir, count_optimizer_steps):
    from align_runner.trl import SFTTrainer

    dataset = capybara(16)  # stands in for load_dataset("trl-lib/Capybara", split="train")

    trainer = SFTTrainer(
        model=tiny_dir,
        train_dataset=dataset,
    )
    out = trainer.train()

    # TRL's defaults: 3 epochs of 16 rows in batches of 8 = 6 optimizer steps, output_dir "<model>-SFT"
    assert out.global_step == 6 and count_optimizer_steps["n"] == 6
    assert trainer.args.output_dir == f"{Path(tiny_dir).name}-SFT"
    stage = trainer.run_result.stage("sft")
    run = json.loads((trainer.run_result.run_dir / "run.json").read_text())
    assert [s["name"] for s in run["stages"]] == ["data_prep", "sft"] and not stage.cache_hit
    loaded = AutoModelForCausalLM.from_pretrained(trainer.args.output_dir)
    stored = AutoModelForCausalLM.from_pretrained(Path(stage.dir) / "model")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(loaded(ids).logits, stored(ids).logits)
    assert not torch.equal(loaded(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits)

    again = SFTTrainer(model=tiny_dir, train_dataset=dataset).train()
    assert count_optimizer_steps["n"] == 6  # nothing trained the second time
    assert again.global_step == 6


def test_dpo_quickstart_with_a_pretrained_model_and_processing_class(tiny_dir):
    from align_runner.trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    dataset = ultrafeedback(8)  # stands in for load_dataset("trl-lib/ultrafeedback_binarized", split="train")

    trainer = DPOTrainer(model=model, args=fast(DPOConfig, "dpo-out", learning_rate=1e-3), train_dataset=dataset,
                         processing_class=tokenizer)
    out = trainer.train()

    assert out.global_step == 2 and [s.name for s in trainer.run_result.stages] == ["data_prep", "ref_logps", "dpo"]
    assert trainer.model is not model  # the trained model, loaded from the stage
    reloaded = AutoModelForCausalLM.from_pretrained("dpo-out")
    assert any(not torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    assert trainer.save_model("again") and (Path("again") / "model.safetensors").exists()


def test_grpo_quickstart_with_accuracy_reward(tiny_dir):
    from align_runner.trl import GRPOConfig, GRPOTrainer
    from align_runner.trl.rewards import accuracy_reward

    # trl-lib/DeepMath-103K's schema: a conversational prompt and a `solution`
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "solution": str(2 * i)}
                                 for i in range(4)])

    trainer = GRPOTrainer(
        model=tiny_dir,
        reward_funcs=accuracy_reward,
        args=GRPOConfig(output_dir="grpo-out", max_steps=2, max_completion_length=8, gradient_checkpointing=False,
                        disable_tqdm=True),
        train_dataset=dataset,
    )
    assert "+algorithm.rewards.accuracy_reward={_target_:align_runner.trl.rewards.accuracy_reward,_partial_:true}" in trainer.overrides
    out = trainer.train()

    # per_device 8 = G 8 completions a step: one prompt per rollout, one step per rollout, 2 rollouts
    assert out.global_step == 2 and "rewards/accuracy_reward/mean" in out.metrics
    assert AutoModelForCausalLM.from_pretrained("grpo-out").config.vocab_size == 512


def test_reward_quickstart_then_its_model_scores_grpo(tiny_dir):
    from transformers import AutoModelForSequenceClassification

    from align_runner.trl import GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer

    RewardTrainer(model=tiny_dir, args=fast(RewardConfig, "rm-out"), train_dataset=ultrafeedback(8)).train()
    assert AutoModelForSequenceClassification.from_pretrained("rm-out").config.num_labels == 1

    trainer = GRPOTrainer(model=tiny_dir, reward_funcs="rm-out", train_dataset=[{"prompt": f"{i} + 1 ="} for i in range(4)],
                          args=GRPOConfig(output_dir="g-out", max_steps=1, max_completion_length=4,
                                          gradient_checkpointing=False, disable_tqdm=True))
    out = trainer.train()
    assert out.global_step == 1 and out.metrics["rewards/rm_out/std"] > 0  # the model's scores differ per completion


# --------------------------------------------------------------------------------------- inputs
def test_a_pretrained_model_and_its_saved_dir_give_the_same_keys(tiny_dir, tmp_path):
    from align_runner.trl import SFTConfig, SFTTrainer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    saved = tmp_path / "my-model"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    args = fast(SFTConfig, "out")
    in_memory = SFTTrainer(model=model, args=args, train_dataset=capybara(), processing_class=tokenizer)
    on_disk = SFTTrainer(model=str(saved), args=args, train_dataset=capybara())

    assert in_memory.overrides != on_disk.overrides  # two paths...
    assert stage_keys(in_memory.overrides) == stage_keys(on_disk.overrides)  # ...one content, one key
    model.lm_head.weight.data[0, 0] += 1.0
    changed = SFTTrainer(model=model, args=args, train_dataset=capybara(), processing_class=tokenizer)
    assert stage_keys(changed.overrides)["sft"] != stage_keys(on_disk.overrides)["sft"]


def test_a_list_of_dicts_and_a_dataset_give_one_data_key_and_no_rows_in_the_config(tiny_dir):
    from align_runner.trl import SFTConfig, SFTTrainer

    rows = capybara(4).to_list()
    from_list = SFTTrainer(model=tiny_dir, args=fast(SFTConfig, "out"), train_dataset=rows)
    from_dataset = SFTTrainer(model=tiny_dir, args=fast(SFTConfig, "out"), train_dataset=Dataset.from_list(rows))

    assert stage_keys(from_list.overrides)["data_prep"] == stage_keys(from_dataset.overrides)["data_prep"]
    assert not any("What is" in o for o in from_list.overrides)
    path = next(o.split("=", 1)[1] for o in from_list.overrides if o.startswith("data.train.path="))
    assert [json.loads(line) for line in Path(path).read_text().splitlines()] == rows
    other = SFTTrainer(model=tiny_dir, args=fast(SFTConfig, "out"), train_dataset=rows[:3])
    assert stage_keys(other.overrides)["data_prep"] != stage_keys(from_list.overrides)["data_prep"]


def test_peft_config_trains_a_lora_adapter(tiny_dir):
    from peft import LoraConfig
    from safetensors.torch import load_file

    from align_runner.trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(model=tiny_dir, args=fast(SFTConfig, "lora-out", learning_rate=1e-2), train_dataset=capybara(8),
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    assert "model.lora.target_modules=[q_proj,v_proj]" in trainer.overrides
    trainer.train()

    weights = load_file(str(Path("lora-out") / "adapter_model.safetensors"))  # TRL's layout: the adapter
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and {re.search(r"(q_proj|v_proj)", k).group(1) for k in weights} == {"q_proj", "v_proj"}
    assert all(v.abs().sum() > 0 for v in b)  # B starts at zero: non-zero means the adapter trained


# ----------------------------------------------------------------------------- what is refused
@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"neftune_noise_alpha": 5.0}, "'neftune_noise_alpha' is not supported"),
        ({"learing_rate": 1e-3}, "Did you mean 'learning_rate'"),
        ({"push_to_hub": True}, "push_to_hub=True is not supported; align_runner accepts only False"),
        ({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type='polynomial': expected one of"),
    ],
)
def test_unsupported_config_fields_are_named(kwargs, named):
    from align_runner.trl import SFTConfig

    with pytest.raises(ConfigError, match=re.escape(named)):
        SFTConfig(**kwargs)


def test_speed_fields_map_onto_the_engine_keys():
    from align_runner.trl.overrides import build

    values = {"packing": True, "torch_compile": True, "activation_offloading": True}
    out = build("sft", values, model="m", train={"path": "d.jsonl"})
    assert {"algorithm.train.packing=true", "model.compile=true", "algorithm.train.offload_activations=true"} <= set(out)


def test_unsupported_arguments_fail_in_the_constructor_before_any_model_loads(tiny_dir, monkeypatch):
    from peft import LoraConfig

    from align_runner.trl import GRPOTrainer, SFTConfig, SFTTrainer

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("a model loaded"))
    args = SFTConfig()
    with pytest.raises(ConfigError, match="'learing_rate' is not supported"):
        args.learing_rate = 1e-3
    with pytest.raises(ConfigError, match="callbacks is not supported"):
        SFTTrainer(model=tiny_dir, args=args, train_dataset=capybara(), callbacks=[object()])
    with pytest.raises(ConfigError, match=r"peft_config.bias='all' is not supported"):
        SFTTrainer(model=tiny_dir, args=args, train_dataset=capybara(), peft_config=LoraConfig(bias="all"))
    with pytest.raises(ConfigError, match="a lambda or a nested function"):
        GRPOTrainer(model=tiny_dir, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                    train_dataset=[{"prompt": "1+1="}])
    args.push_to_hub = True  # set after construction: checked by the trainer
    with pytest.raises(ConfigError, match="push_to_hub=True is not supported"):
        SFTTrainer(model=tiny_dir, args=args, train_dataset=capybara())


# ----------------------------------------------------------------------------------- rewards
def test_accuracy_reward_compares_final_answers():
    from align_runner.trl.rewards import accuracy_reward

    completions = [[{"role": "assistant", "content": r"so the answer is \boxed{\frac{1}{2}}"}],
                   [{"role": "assistant", "content": "I get 0.5 in the end."}],
                   [{"role": "assistant", "content": r"\boxed{3}"}],
                   [{"role": "assistant", "content": "12 apples, so 1,000"}],
                   [{"role": "assistant", "content": "no number"}],
                   [{"role": "assistant", "content": "anything"}]]
    solutions = [r"$\frac{1}{2}$", r"\boxed{1/2}", "4", "1000", "7", "  "]
    assert accuracy_reward(completions, solutions) == [1.0, 1.0, 0.0, 1.0, 0.0, None]
