"""Precision and memory switches: precision follows the hardware; model.gradient_checkpointing really
recomputes activations (each decoder layer runs forward again during backward)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from cli_runner import single_thread

from align_runner import api
from align_runner.engine.backend import get_backend
from align_runner.models.tiny import build_tiny
from align_runner.stages.context import StageContext, StageSpec


def _policy(tmp_path, model_cache, *overrides: str):
    cfg = api.compose(["model=tiny", f"paths.cache={model_cache}", *overrides])
    ctx = StageContext(
        cfg=cfg,
        spec=StageSpec("sft", "sft", config="algorithm"),
        key="k",
        out_dir=tmp_path,
        backend=get_backend(cfg.hardware),
        base_model=build_tiny(model_cache),
    )
    return ctx.load_policy()


def _layer_forwards(model) -> int:
    """Calls of decoder layer 0's first module during one forward + backward. (transformers checkpoints
    the layer's ``forward``, so the layer's own hooks run once; a pre-hook on its first submodule sees
    the recomputation, which torch may stop before the layer's end.)"""
    calls = {"n": 0}
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.input_layernorm"))
    handle = layer.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    model.train()
    ids = torch.randint(3, 500, (2, 16))
    with single_thread():
        model(input_ids=ids, labels=ids).loss.backward()
    handle.remove()
    return calls["n"]


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_switch_recomputes_activations(tmp_path, model_cache, lora):
    extra = ["+model/lora=default", "model.lora.r=4"] if lora else []
    plain = _policy(tmp_path, model_cache, *extra)
    checkpointed = _policy(tmp_path, model_cache, "model.gradient_checkpointing=true", *extra)
    assert not plain.is_gradient_checkpointing
    assert checkpointed.is_gradient_checkpointing
    assert _layer_forwards(plain) == 1
    assert _layer_forwards(checkpointed) == 2  # forward, then again in backward


def test_precision_follows_the_hardware(monkeypatch):
    from align_runner.engine.backend import effective_precision, model_dtype

    cpu = SimpleNamespace(device="cpu", precision="bf16", backend="ddp")
    assert effective_precision(cpu) == "fp32" and model_dtype(cpu) == torch.float32
    gpu = SimpleNamespace(device="cuda", precision="bf16", backend="ddp")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert effective_precision(gpu) == "bf16" and model_dtype(gpu) == torch.bfloat16
    assert model_dtype(SimpleNamespace(device="cuda", precision="bf16", backend="fsdp2")) == torch.float32  # fp32 shards
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert effective_precision(gpu) == "fp16" and model_dtype(gpu) == torch.float32  # fp16 AMP keeps fp32 masters
    assert model_dtype(gpu, "bfloat16") == torch.bfloat16  # model.dtype wins


