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
    # fp32 master weights under bf16 autocast by default; pure bf16 weights only when asked
    assert effective_precision(gpu) == "bf16" and model_dtype(gpu) == torch.float32
    assert model_dtype(SimpleNamespace(device="cuda", precision="bf16", backend="fsdp2")) == torch.float32  # fp32 shards
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert effective_precision(gpu) == "fp16" and model_dtype(gpu) == torch.float32  # fp16 AMP keeps fp32 masters
    assert model_dtype(gpu, "bfloat16") == torch.bfloat16  # model.dtype wins




_TINY_UPDATE = r"""
import sys, torch
from omegaconf import OmegaConf
import align_runner.engine.backend as b
from align_runner.algos.types import LossOutput
from align_runner.config import HardwareConfig, TrainConfig
from align_runner.engine.loop import Engine
from align_runner.engine.trackers import Tracker

# a GPU's bf16 mixed precision, run on this CPU (autocast works there; it is only slow)
b.effective_precision = lambda hw: "bf16"
hw = OmegaConf.structured(HardwareConfig(name="gpu-like", precision="bf16"))
backend = b.DDPBackend(hw)
dtype = b.model_dtype(hw, sys.argv[1])
model = torch.nn.Sequential(torch.nn.Linear(4, 1, bias=False)).to(dtype)
with torch.no_grad():
    model[0].weight.fill_(1.0)
train = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"max_steps": 1, "lr": 1e-4, "scheduler": "constant", "progress": False})
engine = Engine(train, backend, out_dir=sys.argv[2], seed=0, tracker=Tracker(sys.argv[2], stage="t", enabled=True))
state = engine.setup(model, total_steps=1)

seen = []
model[0].register_forward_hook(lambda mod, args, out: seen.append(out.dtype))

def step(m, batch):
    return LossOutput(m(batch["x"]).float().sum(), {})

engine.train_step(state, step, [{"x": torch.ones(2, 4), "num_items": 1}])
assert seen == [torch.bfloat16], seen  # the matmul really ran under bf16 autocast
print(dtype, float((model[0].weight.float() - 1.0).abs().max()))
"""


@pytest.mark.parametrize("requested", ["auto", "bfloat16"])
def test_update_below_bf16_spacing_changes_fp32_master_weights(requested, tmp_path):
    """AdamW's first update is ~lr = 1e-4, far below bf16's spacing at 1.0 (2^-7): the default keeps
    fp32 master weights under bf16 autocast, so the update lands; pure bf16 weights (asked for with
    model.dtype=bfloat16) round it away, which is why they are not the default."""
    import subprocess
    import sys

    from cli_runner import cli_env

    out = subprocess.run(
        [sys.executable, "-c", _TINY_UPDATE, requested, str(tmp_path)], capture_output=True, text=True, env=cli_env(), timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    dtype, moved = out.stdout.split()[-2:]
    if requested == "auto":
        assert dtype == "torch.float32" and float(moved) == pytest.approx(1e-4, rel=0.05)
    else:
        assert dtype == "torch.bfloat16" and float(moved) == 0.0
