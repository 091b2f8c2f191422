"""pipeline.dry_run=true: the plan and a per-device memory estimate, checked against hand arithmetic,
with no weights loaded."""

from __future__ import annotations

import pytest
from cli_runner import run_cli, single_thread
from omegaconf import OmegaConf

from align_runner import api
from align_runner.pipeline.preflight import (
    GIB,
    activation_bytes,
    estimate_memory,
    lora_trainable,
    model_shape,
    print_plan,
    stage_estimate,
)
from align_runner.validate import CONF_DIR

B = 1_000_000_000  # a 1B-parameter model, full fine-tuning


@pytest.mark.parametrize(
    ("backend", "zero", "world", "precision", "expected"),
    [
        # DDP keeps weights, grads and both Adam moments in the weight dtype on every device
        ("ddp", 0, 1, "bf16", (2 * B, 2 * B, 4 * B)),
        ("ddp", 0, 4, "fp32", (4 * B, 4 * B, 8 * B)),
        # ZeRO-2: gradients and the fp32 master + moments (12 bytes) split 4 ways
        ("deepspeed", 2, 4, "bf16", (2 * B, 2 * B / 4, 12 * B / 4)),
        # ZeRO-3: weights split as well
        ("deepspeed", 3, 8, "bf16", (2 * B / 8, 2 * B / 8, 12 * B / 8)),
        # FSDP2: fp32 shards are the masters; moments 8 bytes; everything split 8 ways
        ("fsdp2", 0, 8, "bf16", (4 * B / 8, 4 * B / 8, 8 * B / 8)),
    ],
)
def test_memory_estimate_matches_hand_arithmetic(backend, zero, world, precision, expected):
    est = estimate_memory(num_params=B, trainable=B, backend=backend, zero_stage=zero, world_size=world, precision=precision)
    assert (est.weights, est.gradients, est.optimizer) == pytest.approx(expected)
    assert est.total == pytest.approx(sum(expected))


def test_lora_and_quantization_and_offload():
    t = 10_000_000  # adapters
    est = estimate_memory(num_params=B + t, trainable=t, backend="ddp", zero_stage=0, world_size=1, precision="bf16",
                          quantization="4bit")
    assert (est.weights, est.gradients, est.optimizer) == pytest.approx((B * 0.5 + 2 * t, 2 * t, 4 * t))
    est = estimate_memory(num_params=B, trainable=B, backend="deepspeed", zero_stage=2, world_size=2, precision="bf16",
                          offload_optimizer=True)
    assert est.optimizer == 0


def test_activation_estimate():
    # Qwen2.5-0.5B-like: H=896, L=24, V=151936; 8 x 512 tokens in bf16
    tokens = 8 * 512
    shape = dict(micro_batch=8, seq_len=512, hidden=896, layers=24, act_bytes=2)
    # the counted-token head holds one fp32 chunk of 2048 x V logits and its softmax / gradient, never
    # the (8, 512, V) logits
    logits = 2 * 2048 * 151936 * 4
    full = activation_bytes(**shape, checkpointing=False, vocab=151936, logits_chunk=2048)
    assert full == tokens * 896 * 2 * 17 * 24 + logits
    ckpt = activation_bytes(**shape, checkpointing=True, vocab=151936, logits_chunk=2048)
    assert ckpt == tokens * 896 * 2 * (24 + 17) + logits
    # a chunk larger than the micro-batch holds the micro-batch's tokens; a scorer (vocab 0) no logits
    assert activation_bytes(**shape, checkpointing=False, vocab=151936, logits_chunk=10**6) == (
        tokens * 896 * 2 * 17 * 24 + 2 * tokens * 151936 * 4)
    assert activation_bytes(**shape, checkpointing=False, logits_chunk=2048) == tokens * 896 * 2 * 17 * 24


def test_stage_estimates_count_the_head_and_the_models_a_stage_holds(tmp_path, model_cache):
    from align_runner.config import stage_train
    from align_runner.pipeline.runner import plan
    from align_runner.pipeline.store import StageStore

    def estimates(*extra):
        cfg = api.compose(["experiment=ppo_tiny", f"paths.outputs={tmp_path}", f"paths.cache={model_cache}", *extra])
        shape = model_shape(cfg)
        out = {}
        for p in plan(cfg, StageStore(cfg.paths.store)):
            if p.spec.kind in ("sft", "reward", "ppo"):
                train = stage_train(cfg, OmegaConf.select(cfg, p.spec.config))
                out[p.spec.kind] = (stage_estimate(cfg, shape, train, p.spec), train.micro_batch_size)
        return out

    P = 139_584  # the tiny model (test above); fp32 on the CPU: 4 bytes a weight, 16 with grads and AdamW
    layers, hidden, vocab, length = 2, 64, 512, 256  # ppo_tiny: data.max_length 256

    def body(micro_batch):
        return micro_batch * length * hidden * 4 * 17 * layers

    est = estimates()
    sft, sft_batch = est["sft"]
    assert sft.activations == body(sft_batch) + 2 * sft_batch * length * vocab * 4  # chunk > the micro-batch
    assert sft.held == 0
    reward, reward_batch = est["reward"]
    assert reward.activations == body(reward_batch)  # a scalar score head: no vocabulary logits
    ppo, ppo_batch = est["ppo"]
    # the frozen reference and reward model, whole; the critic trained like the policy, without logits
    assert ppo.held == 2 * 4 * P + 16 * P + body(ppo_batch)
    assert ppo.total == 16 * P + ppo.activations + ppo.held
    # under LoRA the adapter-disabled policy is the reference: only the reward model is frozen beside it
    lora, _ = estimates("+model/lora=default")["ppo"]
    assert lora.held == 4 * P + 16 * P + body(ppo_batch)


def test_model_shape_of_the_tiny_model_by_hand_and_lora_count_matches_peft(model_cache):
    cfg = api.compose(["model=tiny", f"paths.cache={model_cache}"])
    shape = model_shape(cfg)
    # embeddings 512x64, untied head 64x512, final norm 64; per layer q 64x64, k and v 64x32 (2 kv heads
    # of 16), o 64x64, gate/up 64x128, down 128x64, two norms of 64
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert shape.num_params == 512 * 64 * 2 + 64 + 2 * per_layer == 139_584
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (64, 2, 512)
    # LoRA r=16 on all linear layers but the head: r * (in + out) summed over 7 Linears x 2 layers
    per_layer_lora = 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert lora_trainable(shape.linears, r=16, target_modules="all-linear", use_dora=False) == 2 * per_layer_lora

    from align_runner.models.loading import load_causal_lm
    from align_runner.models.peft import apply_lora
    from align_runner.models.tiny import build_tiny

    lora = api.compose(["model=tiny", "+model/lora=default", "model.lora.target_modules=[q_proj,v_proj]",
                        "model.lora.use_dora=true"]).model.lora
    with single_thread():
        peft_model = apply_lora(load_causal_lm(build_tiny(model_cache)), lora)
    real = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_trainable(shape.linears, r=16, target_modules=["q_proj", "v_proj"], use_dora=True) == real
    # target_modules null (TRL's lora_target_modules=None) is peft's default for Llama: q_proj and v_proj
    assert shape.model_type == "llama"
    default = lora_trainable(shape.linears, r=16, target_modules=None, use_dora=True, model_type=shape.model_type)
    assert default == real


def test_dry_run_prints_the_plan_and_loads_no_weights(tiny, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def no_loading(*a, **k):
        raise AssertionError("the dry run loaded weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_loading))
    cfg = api.compose([*tiny, "hardware=cpu_zero3", "pipeline.dry_run=true", "hardware.device_memory_gb=0.0001"])
    print_plan(cfg)
    out = capsys.readouterr().out
    for stage in ("data_prep", "eval_before", "sft", "eval_after"):
        assert stage in out
    assert out.count("to compute") == 4
    assert "world size 2" in out and "backend deepspeed (ZeRO-3)" in out
    assert "trainable 139,584 of 139,584 parameters" in out
    assert "WARNING: stage sft needs about" in out and "hardware.device_memory_gb=0.0001" in out


def test_dry_run_shows_cached_stages(tiny, capsys):
    overrides = [*tiny, "pipeline.eval=false", "train.max_steps=1"]
    with single_thread():
        api.run(overrides)
    print_plan(api.compose([*overrides, "pipeline.dry_run=true"]))
    out = capsys.readouterr().out
    assert out.count("cached") == 2 and "to compute" not in out


def test_hub_model_offline_uses_the_num_params_hint(capsys, tmp_path):
    base = ["model=qwen0.5b", f"paths.outputs={tmp_path}", "pipeline.eval=false", "hardware=1xgpu", "model.architecture=null"]
    print_plan(api.compose(base))
    assert "unknown (set model.num_params)" in capsys.readouterr().out
    print_plan(api.compose([*base, "model.num_params=494032768"]))
    out = capsys.readouterr().out
    # DDP with fp32 master weights under bf16 autocast: 4 + 4 + 8 bytes per parameter; activations
    # unknown without the config
    assert "494,032,768 parameters" in out
    assert f"{494032768 * 16 / GIB:.3g} GiB" in out


@pytest.mark.slow
def test_cli_dry_run_does_not_launch_processes(tmp_path, model_cache):
    run = run_cli(["model=tiny", f"paths.outputs={tmp_path}", f"paths.cache={model_cache}", "hardware=cpu_fsdp2",
                   "pipeline.dry_run=true"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "relaunching" not in run.stderr
    assert "world size 2" in run.stdout and "FSDP2" in run.stdout
    assert not (tmp_path / "store").exists()


def test_lora_plan_counts_adapters_on_top_of_the_frozen_base(tiny, capsys):
    print_plan(api.compose([*tiny, "+model/lora=default", "pipeline.dry_run=true"]))
    # 32,768 adapter parameters (test above) on the 139,584 of the base
    assert "trainable 32,768 of 172,352 parameters" in capsys.readouterr().out


# the published parameter counts of the shipped hub models (their model cards / config.json)
SHIPPED = {"qwen0.5b": 494_032_768, "qwen1.5b": 1_543_714_304, "llama3-8b": 8_030_261_248,
           "smollm2-360m": 361_821_120, "smollm2-135m": 134_515_008, "tiny": 139_584}


@pytest.mark.parametrize("hardware", sorted(p.stem for p in (CONF_DIR / "hardware").glob("*.yaml")))
def test_every_shipped_model_and_hardware_profile_plans_offline(hardware, tmp_path, model_cache, monkeypatch, capsys):
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("weights loaded")))
    shipped = {p.stem for p in (CONF_DIR / "model").glob("*.yaml")} - {"local"}  # local: the user's path
    assert shipped == set(SHIPPED)
    for model, params in SHIPPED.items():
        cfg = api.compose([f"model={model}", f"hardware={hardware}", "algorithm=dpo", f"paths.outputs={tmp_path}",
                           f"paths.cache={model_cache}", "pipeline.dry_run=true"])
        print_plan(cfg)
        out = capsys.readouterr().out
        assert f"{params:,} parameters" in out and "unknown" not in out, (model, out)
        assert "sft: weights" in out and "activations" in out


@pytest.mark.parametrize(
    ("overrides", "kind", "frozen"),
    [
        (["experiment=dpo_tiny"], "dpo", 0),  # cached reference log-probs: no model beside the policy
        (["experiment=tr_dpo_tiny"], "dpo", 1),  # TR-DPO's live reference
        (["experiment=grpo_tiny"], "grpo", 0),  # beta 0: no reference
        (["experiment=grpo_tiny", "algorithm.loss.beta=0.04"], "grpo", 1),  # the KL term's frozen reference
        (["experiment=grpo_tiny", "algorithm.loss.beta=0.04", "+model/lora=default"], "grpo", 0),  # adapters off
    ],
)
def test_stages_declare_the_models_they_hold(overrides, kind, frozen, tmp_path, model_cache):
    from align_runner.pipeline.runner import plan
    from align_runner.pipeline.store import StageStore
    from align_runner.registry import HeldModels, get_stage

    cfg = api.compose([*overrides, f"paths.outputs={tmp_path}", f"paths.cache={model_cache}"])
    (spec,) = [p.spec for p in plan(cfg, StageStore(cfg.paths.store)) if p.spec.kind == kind]
    assert get_stage(kind).held(cfg, spec) == HeldModels(frozen=frozen)
