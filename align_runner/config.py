"""Structured config schemas.

Every group in ``align_runner/conf/`` is typed by a dataclass registered here, so Hydra rejects a misspelt key or a
value of the wrong type while composing, before any model loads. Choices that are a closed set are
Enums (OmegaConf lists the valid values in its error). Components are ``_target_`` nodes typed ``Any``;
``align_runner.validate`` checks their keyword names against the callable's signature.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

# --------------------------------------------------------------------------------------------- enums


class _StrEnum(str, Enum):
    """str() gives the value ("ddp", not "Backend.ddp") on every Python version."""

    def __str__(self) -> str:
        return str(self.value)


class Truncation(_StrEnum):
    keep_start = "keep_start"
    keep_end = "keep_end"
    drop = "drop"


class Scheduler(_StrEnum):
    # names understood by transformers.get_scheduler
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"


class Backend(_StrEnum):
    ddp = "ddp"  # one process, or DistributedDataParallel over several
    deepspeed = "deepspeed"  # ZeRO stage from hardware.zero_stage
    fsdp2 = "fsdp2"  # torch.distributed.fsdp.fully_shard


class Precision(_StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class AttnImplementation(_StrEnum):
    # names understood by from_pretrained(attn_implementation=...)
    eager = "eager"
    sdpa = "sdpa"
    flash_attention_2 = "flash_attention_2"  # needs the flash-attn package and a CUDA GPU


class Direction(_StrEnum):
    # Optuna's names (hydra.sweeper.direction)
    maximize = "maximize"
    minimize = "minimize"


class Device(_StrEnum):
    cpu = "cpu"
    cuda = "cuda"


# --------------------------------------------------------------------------------------------- model


@dataclass
class LoraConfig:
    # adapter rank
    r: int = 16
    # scale of the adapter update: alpha / r (alpha / sqrt(r) with use_rslora)
    alpha: int = 32
    dropout: float = 0.05
    # module names (suffix match, e.g. [q_proj, v_proj]), or "all-linear" (every Linear but the output head)
    target_modules: Any = "all-linear"
    # rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)
    use_rslora: bool = False
    # weight-decomposed LoRA: trains a magnitude vector too (Liu et al. 2024)
    use_dora: bool = False


@dataclass
class ModelConfig:
    # short name for run names and reports; not part of any stage key
    name: str = MISSING
    # _target_ factory returning a local dir or hub id (align_runner.models.*)
    source: Any = MISSING
    # auto: follow hardware.precision
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    lora: Optional[LoraConfig] = None
    # null, or 4bit / 8bit (QLoRA; needs CUDA + bitsandbytes and model.lora)
    quantization: Optional[str] = None
    # parameter count for the dry-run memory estimate when the model's config.json cannot be read
    # (e.g. a hub id offline); null = read it
    num_params: Optional[int] = None
    # the config.json fields that fix the model's shape ({model_type, hidden_size, num_hidden_layers,
    # vocab_size, ...}, as AutoConfig.for_model takes them), so the dry run plans offline (parameters,
    # LoRA targets, activations) without reading the hub; null = read config.json. Not part of any key.
    architecture: Optional[dict[str, Any]] = None
    # attention kernel: null = transformers' default (sdpa); flash_attention_2 runs packed rows varlen
    attn_implementation: Optional[AttnImplementation] = None
    # torch.compile the trained model's forward (first steps compile; needs a C++ compiler on CPU)
    compile: bool = False
    # Liger kernels (fused RMSNorm / RoPE / SwiGLU) patched into the model; needs liger-kernel
    liger_kernel: bool = False


# ---------------------------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    # local jsonl/json/parquet/csv file, a save_to_disk dir, or a hub dataset id
    path: Optional[str] = None
    # inline rows instead of a path
    rows: Optional[Any] = None
    split: str = "train"
    # hub dataset config name
    name: Optional[str] = None
    # hub dataset commit / tag / branch; part of the data key (pin it: an unpinned hub dataset can change)
    revision: Optional[str] = None
    # keep the first N rows; null = every row
    limit: Optional[int] = None
    # their column -> canonical column, e.g. {question: prompt, answer: completion}; applied after `drop`
    rename: dict[str, str] = field(default_factory=dict)
    # columns removed before the format is detected (e.g. a `messages` copy beside chosen/rejected)
    drop: list[str] = field(default_factory=list)


@dataclass
class ViewConfig:
    train: SourceConfig = field(default_factory=SourceConfig)
    # held-out rows; null = none
    eval: Optional[SourceConfig] = None


@dataclass
class DataConfig:
    name: str = MISSING
    # one source for every view the pipeline reads (converted by its format: a preference file feeds
    # sft via chosen, preference, and prompt); a view's own data.<view>.<split> wins over it
    train: Optional[SourceConfig] = None
    # held-out rows for the same views; null = none
    eval: Optional[SourceConfig] = None
    # rows for SFT: text | messages | prompt+completion
    sft: Optional[ViewConfig] = None
    # rows for reward / DPO: (prompt?, chosen, rejected)
    preference: Optional[ViewConfig] = None
    # prompts with reference columns for eval / GRPO / PPO
    prompt: Optional[ViewConfig] = None
    # tokens per sequence; with train.packing also the length of a packed row
    max_length: int = 512
    max_prompt_length: Optional[int] = None
    truncation: Truncation = Truncation.keep_start
    completion_only_loss: bool = True
    assistant_only_loss: bool = True
    # jinja template used when the tokenizer has none
    chat_template: Optional[str] = None
    # data_prep fails (naming the split, the counts and the main cause) when a split loses more than
    # this share of its rows to filtering (too long, nothing to train on, identical pairs); an emptied
    # split always fails. 1.0 allows any loss short of emptying it
    max_dropped_share: float = 0.5


# -------------------------------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    # epochs over the train split; ignored when max_steps > 0
    epochs: float = 1.0
    max_steps: int = -1
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    # a _target_ building the optimizer, called as factory(params, lr=lr, weight_decay=weight_decay)
    optimizer: Any = field(
        default_factory=lambda: {"_target_": "torch.optim.AdamW", "_partial_": True, "betas": [0.9, 0.999], "eps": 1e-8}
    )
    scheduler: Scheduler = Scheduler.cosine
    warmup_ratio: float = 0.0
    # 0 disables clipping
    max_grad_norm: float = 1.0
    # steps between held-out evaluations; 0 = only at the end
    eval_every: int = 0
    log_every: int = 1
    # steps between resumable checkpoints; 0 = none
    save_every: int = 0
    keep_last: int = 2
    # consecutive non-finite losses tolerated (skipped) before the stage fails
    max_nonfinite: int = 3
    progress: bool = True
    # pack each micro-batch's examples padding-free into rows of data.max_length tokens, positions
    # restarting per example so attention never crosses them (TRL's `packing`); sft, dpo and reward
    # (a preference pair as one prompt + chosen + rejected unit, its prompt computed once)
    packing: bool = False
    # null: micro-batches of micro_batch_size rows; a token count: each step's rows (still
    # micro_batch_size x grad_accum x processes of them) grouped by length into micro-batches of at most
    # this many padded tokens. Either way the loss is normalised over the whole step
    max_tokens_per_batch: Optional[int] = None
    # target tokens whose (tokens x vocab) logits the LM head computes at a time; more: faster, more memory
    logits_chunk_tokens: int = 2048
    # keep the activations saved for backward in CPU memory (GPU memory for transfer time)
    offload_activations: bool = False


def _partial_of(cls: type, name: str) -> type:
    """A dataclass with ``cls``'s fields, each Optional and None by default: a typed partial override,
    so `algorithm.train.max_steps=24` is accepted and `algorithm.train.lrr=1` is rejected."""
    hints = typing.get_type_hints(cls)
    return dataclasses.make_dataclass(
        name, [(f.name, Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(cls)]
    )


# changes an algorithm makes to the train group for its own stage (None = keep train's value)
TrainOverrides = _partial_of(TrainConfig, "TrainOverrides")


def stage_train(cfg: Any, section: Any) -> Any:
    """The train settings of the stage configured by ``section``: cfg.train, then the section's own."""
    own = section.get("train") if section is not None else None
    changes = {k: v for k, v in (own or {}).items() if v is not None}
    merged = OmegaConf.merge(cfg.train, changes)
    for key, value in changes.items():
        # a component naming another _target_ replaces the base one: SGD must not inherit AdamW's betas
        if OmegaConf.is_dict(value) and "_target_" in value and value._target_ != cfg.train[key].get("_target_"):
            merged[key] = value
    return merged


# ---------------------------------------------------------------------------------------- algorithm


@dataclass
class AlgorithmConfig:
    name: str = MISSING
    # registry key of the stage that runs it
    kind: str = MISSING
    # stages of pipeline=auto, in order
    stages: list[str] = field(default_factory=list)
    # per-algorithm changes to the train group (e.g. a smaller lr for DPO); they win over train.*
    train: TrainOverrides = field(default_factory=TrainOverrides)  # type: ignore[valid-type]
    loss: Any = None


@dataclass
class ReferenceConfig:
    # name of the ref_logps stage whose log-probs a dpo stage reads (pipeline=auto adds it by this name);
    # null = no cached reference (the reference-free losses ORPO / SimPO / CPO, or ref_sync's live one)
    stage: Optional[str] = "ref_logps"
    # pairs per reference forward pass; batch shapes change the low bits of the sums, so this is part of
    # the reference artifact's key (the loss is not: a beta sweep reuses one artifact)
    batch_size: int = 8


@dataclass
class RefSyncConfig:
    # optimizer steps between updates of a live reference (TR-DPO's tau); null = no live reference
    every: Optional[int] = None
    # each update sets reference <- alpha * policy + (1 - alpha) * reference; 1 = hard copy
    alpha: float = 0.6


@dataclass
class PreferenceAlgorithmConfig(AlgorithmConfig):
    # DPO's frozen reference: the policy's input model (the adapter-disabled base under LoRA), whose
    # log-probs a ref_logps stage computes once, keyed by that model and the data
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    # TR-DPO (Gorbatovski et al. 2024): a live reference model in memory, updated towards the policy
    # during training; needs reference.stage=null (its log-probs change, so none are cached)
    ref_sync: RefSyncConfig = field(default_factory=RefSyncConfig)
    # LD-DPO (Liu et al. 2024): weight of the log-probs of the tokens past the shorter response of each
    # pair, in [0, 1] (policy and reference alike); null = 1, plain log-probs
    ld_alpha: Optional[float] = None
    # WPO (Zhou et al. 2024): weigh each pair by the policy's own length-normalised probability of
    # its two responses (detached)
    use_weighting: bool = False


@dataclass
class UnpairedAlgorithmConfig(AlgorithmConfig):
    # KTO's frozen reference: the policy's input model, whose log-probs of every completion and of its
    # mismatched KL completion an unpaired_ref_logps stage computes once, keyed by that model and the data
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)


@dataclass
class GenerationConfig:
    # new tokens per completion (the maximum completion length)
    max_new_tokens: int = 16
    # sampling temperature; 0 = greedy (no exploration: every completion of a group is the same)
    temperature: float = 1.0
    # nucleus sampling: keep the smallest set of tokens covering this probability (1 = off)
    top_p: float = 1.0
    # keep the k most likely tokens (0 = off)
    top_k: int = 0
    # drop tokens less likely than min_p x the most likely one (0 = off)
    min_p: float = 0.0
    # completions per generation forward pass
    batch_size: int = 64


@dataclass
class RolloutAlgorithmConfig(AlgorithmConfig):
    """What every online RL algorithm (GRPO, PPO) has: rollout -> score -> updates, repeated."""

    # prompts per rollout over all processes
    prompts_per_rollout: int = 8
    # rollouts to train for
    rollouts: int = 20
    # optimizer steps one rollout is split into (each sees prompts_per_rollout / steps_per_rollout prompts)
    steps_per_rollout: int = 1
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # name -> reward function _target_ with TRL's signature fn(prompts=, completions=, completion_ids=, **columns)
    rewards: dict[str, Any] = field(default_factory=dict)
    # name -> weight of each reward (missing: 1.0); "reward_model" weighs the reward stage's score when the
    # pipeline has one
    reward_weights: dict[str, float] = field(default_factory=dict)
    # loss aggregation: a _target_ fn(mask, **context) -> (token weights, num_items) (align_runner.algos.reduce)
    aggregation: Any = None
    # completions per rollout written to rollouts.jsonl for the report
    samples: int = 4


@dataclass
class OnlineAlgorithmConfig(RolloutAlgorithmConfig):
    """GRPO and its variants: a group of completions per prompt, advantages within the group."""

    # completions sampled per prompt (G); advantages compare the completions of one prompt
    num_generations: int = 8
    # passes over each rollout (the GRPO paper's mu); > 1 reuses samples, clipped by the ratio to the old policy
    num_iterations: int = 1
    # advantages from a rollout's rewards: a _target_ fn(rewards (N,), group_size) -> (N,)
    advantage: Any = None
    # completions cut by max_new_tokens count nowhere in the loss (DAPO's overlong filtering)
    mask_truncated_completions: bool = False
    # groups whose completions all got the same reward count nowhere in the loss (no signal; DAPO)
    filter_zero_std_groups: bool = False
    # train on each prompt once with its completions packed behind it (4-D attention mask): the same
    # gradients for far less compute when prompts are long; off under flash-attention (no such masks)
    share_prompts: bool = True


class CriticInit(_StrEnum):
    reward = "reward"  # the reward stage's backbone and score head: initial values are its scores
    policy = "policy"  # the policy's input model with a zero head: initial values are 0


@dataclass
class CriticConfig:
    # where the value model's backbone comes from
    init: CriticInit = CriticInit.reward
    # changes to the PPO stage's train settings for the critic (its own optimizer and schedule); the
    # micro-batches are the policy's
    train: TrainOverrides = field(default_factory=TrainOverrides)  # type: ignore[valid-type]
    # the value loss: a _target_ fn(values, old_values, returns, mask, weights, num_items) -> LossOutput
    loss: Any = None


@dataclass
class PPOAlgorithmConfig(RolloutAlgorithmConfig):
    """PPO with a learned critic (classic RLHF): one completion per prompt, per-token rewards with a
    KL penalty, GAE advantages, policy and value updates."""

    # passes over each rollout
    ppo_epochs: int = 4
    # per-token rewards: a _target_ fn(scores, logps, ref_logps, mask, kl_coef=) -> (rewards, kl); its
    # kl_coef is the first rollout's coefficient, the stage passes each rollout's own
    kl: Any = None
    # the KL coefficient's controller: a _target_ fn(coef, kl, n_steps) -> next coef; its target null
    # keeps the coefficient fixed
    kl_control: Any = None
    # advantages and value targets: a _target_ fn(rewards, values, mask) -> (advantages, returns)
    advantage: Any = None
    # subtracted from the score of a completion that ends without EOS; null = none
    missing_eos_penalty: Optional[float] = None
    # whiten the per-token rewards over the rollout (keeping their mean) before GAE
    whiten_rewards: bool = False
    # whiten the advantages over the rollout (all processes) before the policy update
    whiten_advantages: bool = True
    critic: CriticConfig = field(default_factory=CriticConfig)


# ------------------------------------------------------------------------------------------ eval


@dataclass
class EvalConfig:
    # held-out prompts scored (null = all)
    limit: Optional[int] = 64
    batch_size: int = 16
    max_new_tokens: int = 32
    # 0 = greedy
    temperature: float = 0.0
    # name -> _target_ checker with the reward-function signature (prompts, completions, **columns)
    checkers: dict[str, Any] = field(default_factory=dict)
    # also compute held-out loss on the sft view's eval split
    heldout_loss: bool = True
    # generations shown in the report
    samples: int = 6


# -------------------------------------------------------------------------------------- hardware


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: Device = Device.cpu
    backend: Backend = Backend.ddp
    num_processes: int = 1
    num_nodes: int = 1
    precision: Precision = Precision.fp32
    # DeepSpeed ZeRO stage (backend=deepspeed)
    zero_stage: int = 0
    offload_optimizer: bool = False
    # memory of one device in GiB, for the preflight estimate
    device_memory_gb: float = 24.0
    # torch's CPU threads in each process; null = this node's cores / num_processes (one process: torch's
    # default, every core)
    cpu_threads: Optional[int] = None
    # multi-node rendezvous (torchrun --rdzv-endpoint host:port); null = this node alone (--standalone)
    rdzv_endpoint: Optional[str] = None
    # rank of this node among num_nodes (torchrun --node-rank); null = let the rendezvous assign it
    node_rank: Optional[int] = None
    # job id shared by every node of one run (torchrun --rdzv-id)
    rdzv_id: str = "align_runner"


# ------------------------------------------------------------------------------------------ pipeline


@dataclass
class StageSpecConfig:
    name: str = MISSING
    kind: str = MISSING
    # stage whose model this stage starts from; null = model.source
    model_from: Optional[str] = None
    # role -> earlier stage providing it, for the inputs the kind declares (e.g. {reference: ref_logps})
    inputs: dict[str, str] = field(default_factory=dict)
    # config node holding the stage's settings (e.g. algorithm, upstream.sft, eval)
    config: str = MISSING


@dataclass
class PipelineConfig:
    name: str = "auto"
    # null: derived from algorithm.stages (DESIGN §2)
    stages: Optional[list[StageSpecConfig]] = None
    # add eval of the main stage's input ("before") and output ("after")
    eval: bool = True
    # stage names or kinds to recompute even when cached
    force: list[str] = field(default_factory=list)
    # print the plan (stages, keys, cache state, memory estimate) and load nothing
    dry_run: bool = False
    # metric returned to Hydra sweepers: "<stage>/<metric>", a metric that stage declares (validate.py)
    objective: str = "eval_after/accuracy"
    # which way the objective improves: the best job of a sweep summary (align_runner/sweep.py)
    direction: Direction = Direction.maximize
    # seconds to wait for another job computing the same stage (its lock); null: wait as long as it runs
    lock_timeout: Optional[float] = None


@dataclass
class TrackingConfig:
    # any of: tensorboard, wandb
    backends: list[str] = field(default_factory=list)
    project: str = "align_runner"
    # null: from the Hydra job (run dir name; sweep name and job number under -m)
    run_name: Optional[str] = None
    # null: the Hydra job name, or the sweep for -m jobs
    group: Optional[str] = None
    # W&B key; prefer the WANDB_API_KEY environment variable. Never written to any saved file.
    api_key: Optional[str] = None


@dataclass
class PathsConfig:
    outputs: str = "outputs"
    store: str = "${paths.outputs}/store"
    # converted / built models (tiny, GGUF) are cached here
    cache: str = "${paths.outputs}/cache"


@dataclass
class UpstreamConfig:
    # settings of an SFT stage that runs before the main algorithm
    sft: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: AlgorithmConfig = field(default_factory=AlgorithmConfig)


@dataclass
class RootConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    algorithm: Any = MISSING
    train: TrainConfig = MISSING
    hardware: HardwareConfig = MISSING
    pipeline: PipelineConfig = MISSING
    tracking: TrackingConfig = MISSING
    paths: PathsConfig = MISSING
    eval: EvalConfig = MISSING
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    seed: int = 0


# schema name (first entry of an algorithm YAML's defaults list) -> dataclass; validate.py checks
# `algorithm.*` overrides against the schema of the algorithm the command line selects
ALGORITHM_SCHEMAS: dict[str, type] = {
    "algorithm_schema": AlgorithmConfig,
    "preference_schema": PreferenceAlgorithmConfig,
    "unpaired_schema": UnpairedAlgorithmConfig,
    "online_schema": OnlineAlgorithmConfig,
    "ppo_schema": PPOAlgorithmConfig,
}


def register_resolvers() -> None:
    """``${ar.demo:<file>}``: a file of the shipped demo dataset (works from any working directory)."""
    from align_runner.data.demo import DEMO_DIR

    if not OmegaConf.has_resolver("ar.demo"):
        OmegaConf.register_new_resolver("ar.demo", lambda name: str(DEMO_DIR / name))


def register_configs() -> None:
    """Register every schema so YAML files can name them in their defaults lists."""
    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="root_schema", node=RootConfig)
    for group, node in [
        ("model", ModelConfig),
        ("data", DataConfig),
        ("train", TrainConfig),
        ("hardware", HardwareConfig),
        ("pipeline", PipelineConfig),
        ("tracking", TrackingConfig),
        ("paths", PathsConfig),
        ("eval", EvalConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)
    cs.store(group="model/lora", name="lora_schema", node=LoraConfig)
    for name, node in ALGORITHM_SCHEMAS.items():
        cs.store(group="algorithm", name=name, node=node)
