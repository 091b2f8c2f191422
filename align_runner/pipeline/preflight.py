"""``pipeline.dry_run=true``: the plan — stages, keys, cache state, world size, backend — and an estimate
of training memory per device, with no weights loaded.

The parameter count comes from the model's ``config.json`` (``AutoConfig`` + a model built on the meta
device, which allocates nothing), or from ``model.num_params`` when the config cannot be read offline.

Memory model (bytes per device; P parameters, T trainable, N processes, w bytes per weight element):

- weights: P*w, divided by N under ZeRO-3 and FSDP2 (4-bit / 8-bit quantized bases: 0.5 / 1 byte);
- gradients: T*w, divided by N under ZeRO-2/3 and FSDP2;
- optimizer (AdamW, two moments): DDP keeps them in the weight dtype (2*T*w); DeepSpeed keeps an fp32
  master copy and fp32 moments, 12*T/N (on the CPU with offload_optimizer); FSDP2's fp32 shards are the
  masters, so 8*T/N;
- activations of one micro-batch of B sequences of S = data.max_length tokens, hidden size H, L layers,
  vocabulary V, a bytes per activation: B*S*H*a*17 per layer (Korthikanti et al. 2022: 34*s*b*h bytes
  at 2 bytes per element, with fused attention), or B*S*H*a per layer plus one layer's 17 when
  recomputed (gradient checkpointing); plus, for a policy, the counted-token LM head's fp32 logits:
  2*C*V*4 for one chunk of C = min(B*S, train.logits_chunk_tokens) rows and its softmax or gradient
  (``algos.logprobs``; the full (B, S, V) logits never exist). A scorer's scalar head has none;
- models a stage holds beside the trained one (``registry.HeldModels``), each at the input model's
  size: a frozen copy (reference, reward model) whole on every device, P*w; a trained one (PPO's
  critic) like the policy, without the logits.

w is the backend's weight dtype: fp32 master weights under bf16/fp16 autocast for DDP and FSDP2 (pure
bf16 only with model.dtype=bfloat16); DeepSpeed holds weights in the compute precision beside its fp32
master copy.
Transient buffers (gathered layers, communication buckets, the allocator's slack) are not counted.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from align_runner.config import stage_train
from align_runner.pipeline.runner import plan
from align_runner.pipeline.store import StageStore
from align_runner.registry import HeldModels, get_stage

log = logging.getLogger("align_runner")

GIB = 2**30
# activation elements stored per token and hidden unit in one decoder layer (see module docstring)
ACT_ELEMENTS_PER_LAYER = 17
_WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_QUANT_BYTES = {"4bit": 0.5, "8bit": 1.0}


@dataclass
class ModelShape:
    num_params: int
    hidden_size: int | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    # (module name, in_features, out_features) of every nn.Linear, for counting LoRA parameters
    linears: list[tuple[str, int, int]] = field(default_factory=list)
    # config.model_type: peft's default LoRA targets depend on it
    model_type: str | None = None


@dataclass
class MemoryEstimate:
    """Bytes per device."""

    weights: float
    gradients: float
    optimizer: float
    activations: float | None
    trainable: int
    num_params: int
    # the other models the stage holds (module docstring)
    held: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + (self.activations or 0.0) + self.held


def lora_trainable(
    linears: list[tuple[str, int, int]], *, r: int, target_modules: Any, use_dora: bool, model_type: str | None = None
) -> int:
    """Adapter parameters: r*(in+out) per targeted Linear (A: r x in, B: out x r), plus the DoRA
    magnitude (out). "all-linear" targets every Linear but the output head; names match by suffix;
    None is peft's default for ``model_type`` (e.g. q_proj, v_proj for Llama)."""
    if target_modules is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        target_modules = DEFAULTS.get(model_type or "", [])
    total = 0
    for name, fan_in, fan_out in linears:
        if isinstance(target_modules, str) and target_modules == "all-linear":
            hit = name.split(".")[-1] != "lm_head"
        else:
            targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            total += r * (fan_in + fan_out) + (fan_out if use_dora else 0)
    return total


def activation_bytes(
    *,
    micro_batch: int,
    seq_len: int,
    hidden: int,
    layers: int,
    act_bytes: int,
    checkpointing: bool,
    vocab: int = 0,
    logits_chunk: int = 0,
) -> int:
    """Activations kept for backward in one micro-batch, plus the LM head's logits of ``logits_chunk``
    tokens at a time over ``vocab`` (0 for a scorer) (module docstring)."""
    tokens = micro_batch * seq_len
    per_layer = tokens * hidden * act_bytes
    body = per_layer * (layers + ACT_ELEMENTS_PER_LAYER) if checkpointing else per_layer * ACT_ELEMENTS_PER_LAYER * layers
    return body + 2 * min(tokens, logits_chunk) * vocab * 4


def estimate_memory(
    *,
    num_params: int,
    trainable: int,
    backend: str,
    zero_stage: int,
    world_size: int,
    precision: str,
    offload_optimizer: bool = False,
    quantization: str | None = None,
    activations: float | None = None,
) -> MemoryEstimate:
    """Per-device bytes of weights, gradients and AdamW state under the chosen sharding (docstring)."""
    n = max(1, world_size)
    w = 4 if backend == "fsdp2" else _WEIGHT_BYTES[precision]
    frozen = num_params - trainable
    frozen_bytes = _QUANT_BYTES.get(quantization or "", w)
    weights = frozen * frozen_bytes + trainable * w
    grads = trainable * w
    if backend == "deepspeed":
        optimizer = 0.0 if offload_optimizer else 12 * trainable / n
        weights = weights / n if zero_stage >= 3 else weights
        grads = grads / n if zero_stage >= 2 else grads
    elif backend == "fsdp2":
        weights, grads, optimizer = weights / n, grads / n, 8 * trainable / n
    else:
        optimizer = 2 * trainable * w
    return MemoryEstimate(float(weights), float(grads), float(optimizer), activations, trainable, num_params)


# ------------------------------------------------------------------------------------- model shape


def _hub_config_path(source: Any, cache_dir: str) -> str:
    return str(source.name_or_path)


def _built_config_path(source: Any, cache_dir: str) -> str:
    # builds a random model from a config into the cache (about a second); no weights are loaded
    from align_runner.models.loading import resolve_source

    return resolve_source(source, cache_dir=cache_dir)


# Sources whose config.json can be found without loading or converting weights.
CONFIG_READERS = {
    "align_runner.models.loading.hub_or_local": _hub_config_path,
    "align_runner.models.tiny.build_tiny": _built_config_path,
}


def _model_config(cfg: DictConfig) -> Any:
    """The model's transformers config: its config.json where that can be read without loading or
    converting weights (a hub id in the local cache, a local dir, the tiny builder), else the shipped
    ``model.architecture``; None when neither is there."""
    from transformers import AutoConfig

    reader = CONFIG_READERS.get(str(cfg.model.source.get("_target_")))
    if reader is not None:
        try:
            return AutoConfig.from_pretrained(reader(cfg.model.source, str(cfg.paths.cache)), local_files_only=True)
        except (OSError, ValueError) as e:  # a hub id not in the local cache, an unknown architecture
            log.info("dry run: cannot read the model config (%s)", str(e).splitlines()[0])
    arch = cfg.model.get("architecture")
    if arch is None:
        return None
    fields = dict(arch)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def model_shape(cfg: DictConfig) -> ModelShape | None:
    """Parameter count and dimensions without loading weights; None when unknown."""
    hint = cfg.model.get("num_params")
    config = _model_config(cfg)
    if config is None:
        return ModelShape(int(hint)) if hint else None
    shape = _meta_shape(config.to_json_string())
    return replace(shape, num_params=int(hint)) if hint else shape


@functools.lru_cache(maxsize=8)
def _meta_shape(config_json: str) -> ModelShape:
    """The shape of the model a config builds, on the meta device (no memory); one build per config,
    since a sweep's plan or a profile-by-profile check asks for the same model many times."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads(config_json)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(
        num_params=sum(p.numel() for p in model.parameters()),
        hidden_size=getattr(text, "hidden_size", None),
        num_layers=getattr(text, "num_hidden_layers", None),
        vocab_size=getattr(text, "vocab_size", None),
        linears=linears,
        model_type=getattr(config, "model_type", None),
    )


def stage_estimate(cfg: DictConfig, shape: ModelShape, train: Any, spec: Any) -> MemoryEstimate:
    """The estimate for training stage ``spec`` with its ``train`` settings, with the models it holds."""

    from align_runner.engine.backend import PRECISION_DTYPES, effective_precision, model_dtype

    hw, m = cfg.hardware, cfg.model
    kind = get_stage(spec.kind)
    trainable = total = shape.num_params
    if m.lora is not None:  # the base stays frozen; the adapters come on top
        trainable = lora_trainable(shape.linears, r=int(m.lora.r), target_modules=m.lora.target_modules,
                                   use_dora=bool(m.lora.use_dora), model_type=shape.model_type)
        total = shape.num_params + trainable

    def activations(vocab: int) -> float | None:
        if not (shape.hidden_size and shape.num_layers and shape.vocab_size):
            return None
        return activation_bytes(
            micro_batch=int(train.micro_batch_size),
            seq_len=int(cfg.data.max_length),
            hidden=int(shape.hidden_size),
            layers=int(shape.num_layers),
            act_bytes=_WEIGHT_BYTES[effective_precision(hw)],
            checkpointing=bool(m.gradient_checkpointing),
            vocab=vocab,
            logits_chunk=int(train.logits_chunk_tokens),
        )

    # weights are stored in the backend's weight dtype: fp32 masters under bf16 autocast by default
    stored = {dtype: name for name, dtype in PRECISION_DTYPES.items()}[model_dtype(hw, str(m.dtype))]
    sharding = dict(backend=str(hw.backend), zero_stage=int(hw.zero_stage),
                    world_size=int(hw.num_processes) * int(hw.num_nodes), precision=stored,
                    offload_optimizer=bool(hw.offload_optimizer))
    held = kind.held(cfg, spec) if kind.held else HeldModels()
    held_bytes = held.frozen * shape.num_params * _WEIGHT_BYTES[stored]
    if held.trained:
        companion = estimate_memory(num_params=shape.num_params, trainable=shape.num_params,
                                    activations=activations(0), **sharding)
        held_bytes += held.trained * companion.total
    estimate = estimate_memory(num_params=total, trainable=trainable, quantization=m.quantization,
                               activations=activations(int(shape.vocab_size or 0) if kind.policy else 0), **sharding)
    return replace(estimate, held=float(held_bytes))


def _gib(x: float | None) -> str:
    return "unknown" if x is None else f"{x / GIB:.3g} GiB"


def print_plan(cfg: DictConfig) -> None:
    hw = cfg.hardware
    world = int(hw.num_processes) * int(hw.num_nodes)
    shape = model_shape(cfg)
    table = Table(title="align_runner plan (dry run: nothing loaded)", title_justify="left")
    for col in ("stage", "kind", "starts from", "key", "state", "memory/device"):
        table.add_column(col)
    warnings: list[str] = []
    details: list[str] = []
    for p in plan(cfg, StageStore(cfg.paths.store)):
        state = "forced" if p.forced else ("cached" if p.cached else "to compute")
        memory = "-"
        if get_stage(p.spec.kind).trains and not p.cached:
            if shape is None:
                memory = "unknown (set model.num_params)"
            else:
                section = OmegaConf.select(cfg, p.spec.config)
                train = stage_train(cfg, section)
                est = stage_estimate(cfg, shape, train, p.spec)
                memory = _gib(est.total)
                held = f" + held models {_gib(est.held)}" if est.held else ""
                details.append(
                    f"  {p.spec.name}: weights {_gib(est.weights)} + gradients {_gib(est.gradients)} + optimizer "
                    f"{_gib(est.optimizer)} + activations {_gib(est.activations)}{held} (micro-batch {train.micro_batch_size} x "
                    f"{cfg.data.max_length} tokens, gradient checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}); "
                    f"trainable {est.trainable:,} of {est.num_params:,} parameters"
                )
                if est.total > float(hw.device_memory_gb) * GIB:
                    warnings.append(
                        f"WARNING: stage {p.spec.name} needs about {_gib(est.total)} per device, more than "
                        f"hardware.device_memory_gb={hw.device_memory_gb} of hardware={hw.name}"
                    )
        table.add_row(p.spec.name, p.spec.kind, p.spec.model_from or "-", p.key[:12], state, memory)
    console = Console(width=200)
    console.print(table)
    sharding = {"deepspeed": f"ZeRO-{hw.zero_stage}", "fsdp2": "FSDP2 fully_shard"}.get(str(hw.backend), "replicated")
    console.print(
        f"hardware={hw.name}: world size {world} ({hw.num_processes} process(es) x {hw.num_nodes} node(s)), "
        f"backend {hw.backend} ({sharding}), {hw.device}, precision {hw.precision}"
    )
    lora = "LoRA" if cfg.model.lora is not None else "full fine-tuning"
    params = "unknown" if shape is None else f"{shape.num_params:,}"
    console.print(f"model={cfg.model.name}: {params} parameters, {lora}" + (f", {cfg.model.quantization}" if cfg.model.quantization else ""))
    if details:
        console.print("memory per device (estimate):")
        for line in details:
            console.print(line, soft_wrap=True)
    for line in warnings:
        console.print(line, style="bold red", soft_wrap=True)
