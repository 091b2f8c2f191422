"""PEFT: model.lora wraps the policy; the stage saves the adapter and the merged full model; later
stages load the merged model; merge_adapter reproduces it; QLoRA fails early where it cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runner import stage_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from align_runner import api
from align_runner.models.peft import apply_lora, merge_adapter, peft_lora_config
from align_runner.validate import ConfigError

LORA = ["+model/lora=default", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_lora_switches_reach_peft():
    node = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                             "use_rslora": True, "use_dora": True})
    cfg = peft_lora_config(node)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.use_dora) == (4, 8, 0.1, True, True)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}


def test_only_adapters_train(tiny_model_dir):
    from align_runner.models.loading import load_causal_lm

    model = apply_lora(load_causal_lm(tiny_model_dir), OmegaConf.create(
        {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "use_rslora": False, "use_dora": False}))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}


@pytest.fixture
def tiny_model_dir(model_cache) -> str:
    from align_runner.models.tiny import build_tiny

    return build_tiny(model_cache)


def test_lora_stage_saves_adapter_and_merged_model_that_later_stages_load(tiny, tmp_path, tiny_model_dir):
    result = api.run([*tiny, *LORA, "train.max_steps=3", "train.lr=1e-2"])
    assert [s.name for s in result.stages] == ["data_prep", "eval_before", "sft", "eval_after"]
    model_dir = Path(result.stage("sft").dir) / "model"
    adapter = load_file(str(model_dir / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert (model_dir / "adapter" / "adapter_config.json").exists()

    # the merged model is a plain HF checkpoint: W + (alpha / r) * B @ A on every targeted Linear
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.layers.0.self_attn.q_proj"
    a = next(v for k, v in adapter.items() if f"{name}.lora_A" in k)
    b = next(v for k, v in adapter.items() if f"{name}.lora_B" in k)
    expected = base.get_submodule(name).weight + (8 / 4) * b @ a
    assert torch.allclose(merged.get_submodule(name).weight, expected, atol=1e-6)
    assert not torch.allclose(expected, base.get_submodule(name).weight)  # training moved it
    # untouched modules stay the base's
    assert torch.equal(merged.lm_head.weight, base.lm_head.weight)
    # eval_after ran on the merged model like on any other
    assert "heldout_loss" in result.stage("eval_after").metrics

    out = merge_adapter(model_dir, tmp_path / "exported")
    exported = load_file(str(Path(out) / "model.safetensors"))
    saved = load_file(str(model_dir / "model.safetensors"))
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    assert (Path(out) / "tokenizer.json").exists()


def test_dora_and_rslora_run_through_the_pipeline(tiny):
    result = api.run([*tiny, *LORA, "pipeline.eval=false", "model.lora.use_dora=true", "model.lora.use_rslora=true",
                      "train.max_steps=2"])
    adapter = load_file(str(stage_dir(Path(tiny[1].split("=", 1)[1]), "sft") / "model/adapter/adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in adapter)  # DoRA's learned magnitudes
    assert result.stage("sft").metrics["loss"] > 0


def test_qlora_fails_at_validation_where_it_cannot_run():
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        api.compose(["model=tiny", "+model/lora=default", "model.quantization=4bit"])
    with pytest.raises(ConfigError, match="QLoRA.*add \\+model/lora=default"):
        api.compose(["model=tiny", "model.quantization=4bit"])
