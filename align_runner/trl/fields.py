"""The one table of TRL names align_runner understands: config fields, model and script flags.

Each row is a TRL field (its name and default in TRL 1.16, per trainer) and the align_runner key it
becomes. The Config dataclasses (``configs.py``), the CLI flags (``cli.py``) and the README's
"Coming from TRL" table are all generated from ``FIELDS``; ``overrides.py`` turns values into Hydra
overrides. A row with ``convert`` maps one value to one key; a row without is combined with other
rows there (``derived``), e.g. GRPO's batch fields become prompts per rollout and steps per rollout.
A ``fixed`` row is accepted only at its default (what align_runner always does); any name not in
this table is rejected, never ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KINDS = ("sft", "dpo", "reward", "grpo", "kto")
ALL = KINDS
OFFLINE = ("sft", "dpo", "reward", "kto")  # trained on a fixed dataset, with epochs and held-out loss
PREFERENCE = ("dpo", "kto")  # trained against the input model's cached reference log-probs

# `where` of a row: the Python config class, or the CLI only (TRL's ModelConfig / ScriptArguments)
CONFIG, MODEL, SCRIPT = "config", "model", "script"

# one override value -> Hydra value; SKIP: no override (align_runner's own default stands)
SKIP = object()

# TRL 1.16's DPO loss_type names -> (align_runner.algos.dpo function, whether it takes label_smoothing);
# align_runner implements every name TRL has
DPO_LOSSES = {
    "sigmoid": ("sigmoid_loss", True), "robust": ("robust_loss", True), "ipo": ("ipo_loss", False),
    "hinge": ("hinge_loss", False), "exo_pair": ("exo_loss", True), "nca_pair": ("nca_loss", False),
    "bco_pair": ("bco_pair_loss", False), "sppo_hard": ("sppo_hard_loss", False),
    "apo_zero": ("apo_zero_loss", False), "apo_down": ("apo_down_loss", False),
    "aot": ("aot_loss", True), "aot_unpaired": ("aot_unpaired_loss", True), "discopop": ("discopop_loss", False),
    "sigmoid_norm": ("sigmoid_norm_loss", False), "sft": ("sft_loss", False),
}
# TRL's f_divergence_type names (align_runner.algos.dpo.F_DIVERGENCES, not imported: this table loads no torch)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL 1.16's KTO loss_type names: each is align_runner.algos.kto.<name>_loss
KTO_LOSSES = ("kto", "apo_zero_unpaired")


def same(value: Any) -> Any:
    return value


def unless_none(value: Any) -> Any:
    return SKIP if value is None else value


@dataclass(frozen=True)
class Field:
    name: str
    kinds: tuple[str, ...]
    type: type  # str, int, float, bool or list (a flag taking several values)
    default: Any  # TRL's default; a {kind: default} dict where trainers differ
    key: str  # the align_runner key it becomes (shown in --help and the README)
    convert: Callable[[Any], Any] | None = same  # None: derived with other fields in overrides.py
    where: str = CONFIG
    fixed: bool = False
    choices: tuple[Any, ...] = ()
    note: str = ""

    def default_for(self, kind: str) -> Any:
        return self.default[kind] if isinstance(self.default, dict) else self.default


FIELDS: tuple[Field, ...] = (
    # ------------------------------------------------------------------ training (TrainingArguments)
    Field("output_dir", ALL, str, None, "(the final model is copied here)", None,
          note="None: `trainer_output`, as in transformers"),
    Field("learning_rate", ALL, float, {"sft": 2e-5, "dpo": 1e-6, "reward": 1e-4, "grpo": 1e-6, "kto": 1e-6}, "algorithm.train.lr"),
    Field("per_device_train_batch_size", OFFLINE, int, 8, "algorithm.train.micro_batch_size"),
    Field("per_device_train_batch_size", ("grpo",), int, 8, "algorithm.train.micro_batch_size, algorithm.prompts_per_rollout", None,
          note="completions per micro-batch; a rollout samples per_device x processes x steps_per_generation completions"),
    Field("gradient_accumulation_steps", OFFLINE, int, 1, "algorithm.train.grad_accum"),
    Field("gradient_accumulation_steps", ("grpo",), int, 1, "algorithm.steps_per_rollout", None,
          note="an optimizer step takes per_device x processes x this many completions"),
    Field("num_train_epochs", OFFLINE, float, 3.0, "algorithm.train.epochs"),
    Field("num_train_epochs", ("grpo",), float, 3.0, "algorithm.rollouts", None,
          note="rollouts = epochs x prompts / prompts per rollout"),
    Field("max_steps", OFFLINE, int, -1, "algorithm.train.max_steps"),
    Field("max_steps", ("grpo",), int, -1, "algorithm.rollouts", None,
          note="rollouts = max_steps / (steps per rollout x num_iterations); wins over num_train_epochs"),
    Field("lr_scheduler_type", ALL, str, "linear", "algorithm.train.scheduler",
          choices=("constant", "constant_with_warmup", "linear", "cosine")),
    Field("warmup_steps", ALL, float, 0, "algorithm.train.warmup_ratio", None,
          note="below 1 a fraction of training; from 1 a step count (needs max_steps)"),
    Field("warmup_ratio", ALL, float, None, "algorithm.train.warmup_ratio", unless_none,
          note="the transformers 4 name"),
    Field("weight_decay", ALL, float, 0.0, "algorithm.train.weight_decay"),
    Field("max_grad_norm", ALL, float, 1.0, "algorithm.train.max_grad_norm"),
    Field("optim", ALL, str, "adamw_torch_fused", "algorithm.train.optimizer", None,
          choices=("adamw_torch", "adamw_torch_fused"), note="torch.optim.AdamW"),
    Field("adam_beta1", ALL, float, 0.9, "algorithm.train.optimizer.betas", None),
    Field("adam_beta2", ALL, float, 0.999, "algorithm.train.optimizer.betas", None),
    Field("adam_epsilon", ALL, float, 1e-8, "algorithm.train.optimizer.eps", None),
    Field("seed", ALL, int, 42, "seed"),
    Field("logging_steps", ALL, float, 10, "algorithm.train.log_every", None, note="a step count"),
    Field("save_strategy", ALL, str, "steps", "algorithm.train.save_every", None, choices=("no", "steps")),
    Field("save_steps", ALL, float, 500, "algorithm.train.save_every", None,
          note="resumable checkpoints: rerun the same command after a crash"),
    Field("save_total_limit", ALL, int, None, "algorithm.train.keep_last", unless_none),
    Field("eval_strategy", OFFLINE, str, "no", "algorithm.train.eval_every", None, choices=("no", "steps"),
          note="held-out loss on eval_dataset; it is also computed once at the end"),
    Field("eval_strategy", ("grpo",), str, "no", "(none)", fixed=True),
    Field("eval_steps", OFFLINE, float, None, "algorithm.train.eval_every", None, note="None: logging_steps"),
    Field("bf16", ALL, bool, None, "hardware.precision", None, note="None: the hardware profile decides"),
    Field("fp16", ALL, bool, False, "hardware.precision", None),
    Field("gradient_checkpointing", ALL, bool, True, "model.gradient_checkpointing"),
    Field("torch_compile", ALL, bool, False, "model.compile"),
    Field("use_liger_kernel", ALL, bool, False, "model.liger_kernel", note="needs the liger-kernel package"),
    Field("report_to", ALL, list, "none", "tracking.backends", None, note="none, tensorboard, wandb"),
    Field("run_name", ALL, str, None, "tracking.run_name", unless_none),
    Field("disable_tqdm", ALL, bool, None, "algorithm.train.progress", None),
    Field("push_to_hub", ALL, bool, False, "(none)", fixed=True,
          note="`align-runner export <run> --push-to-hub REPO`"),
    Field("disable_dropout", ("dpo", "reward", "grpo", "kto"), bool, {"dpo": True, "reward": True, "grpo": False, "kto": True},
          "(none)",
          fixed=True, note="the model's own dropout settings apply (0 in Llama / Qwen / SmolLM configs)"),
    # ----------------------------------------------------------------------------------- data
    Field("max_length", OFFLINE, int, 1024, "data.max_length"),
    Field("truncation_mode", ("sft", "dpo"), str, "keep_start", "data.truncation", choices=("keep_start", "keep_end")),
    Field("completion_only_loss", ("sft",), bool, None, "data.completion_only_loss",
          lambda v: True if v is None else v, note="None: true"),
    Field("assistant_only_loss", ("sft",), bool, False, "data.assistant_only_loss"),
    Field("dataset_text_field", ("sft",), str, "text", "data.train.rename", None, note="{field: text}"),
    Field("packing", ("sft",), bool, False, "algorithm.train.packing",
          note="best-fit-decreasing into max_length rows, positions restarting per example (align_runner packs "
               "dpo and reward pairs too, each prompt once; `train.packing` packs the reference pass as well)"),
    Field("activation_offloading", ("sft",), bool, False, "algorithm.train.offload_activations"),
    Field("loss_type", ("sft",), str, "nll", "algorithm.loss", fixed=True),
    # ------------------------------------------------------------------------------------ DPO
    Field("beta", ("grpo", "kto"), float, {"grpo": 0.0, "kto": 0.1}, "algorithm.loss.beta"),
    Field("beta", ("dpo",), float, 0.1, "algorithm.loss.beta", None, note="each part's beta in a mixture"),
    Field("loss_type", ("dpo",), list, ["sigmoid"], "algorithm.loss._target_", None, choices=tuple(DPO_LOSSES),
          note="align_runner.algos.dpo.<name>_loss (exo_pair: exo_loss, nca_pair: nca_loss); several: mixture_loss"),
    Field("loss_weights", ("dpo",), list, None, "algorithm.loss.weights", None,
          note="one weight per loss_type, for mixture_loss; None: 1.0 each"),
    Field("label_smoothing", ("dpo",), float, 0.0, "algorithm.loss.label_smoothing", None),
    Field("discopop_tau", ("dpo",), float, 0.05, "algorithm.loss.tau", None, note="loss_type discopop"),
    Field("f_divergence_type", ("dpo",), str, "reverse_kl", "algorithm.loss._target_", None, choices=F_DIVERGENCES,
          note="not reverse_kl: align_runner.algos.dpo.f_divergence_loss (loss_type sigmoid only)"),
    Field("f_alpha_divergence_coef", ("dpo",), float, 0.5, "algorithm.loss.alpha", None,
          note="alpha = 1 - this (the f-DPO paper's parametrisation); in (0, 1)"),
    Field("use_weighting", ("dpo",), bool, False, "algorithm.use_weighting", note="WPO's pair weights"),
    Field("ld_alpha", ("dpo",), float, None, "algorithm.ld_alpha", unless_none, note="LD-DPO"),
    Field("sync_ref_model", ("dpo",), bool, False, "algorithm.ref_sync.every", None,
          note="TR-DPO's live reference (no ref_logps stage); needs save_strategy no"),
    Field("sync_ref_model", ("kto",), bool, False, "(none)", fixed=True, note="a live reference is DPO's only"),
    Field("ref_model_sync_steps", ("dpo",), int, 512, "algorithm.ref_sync.every", None, note="with sync_ref_model"),
    Field("ref_model_mixup_alpha", ("dpo",), float, 0.6, "algorithm.ref_sync.alpha", None, note="with sync_ref_model"),
    Field("precompute_ref_log_probs", PREFERENCE, bool, False, "(always: the ref_logps stage)", lambda v: SKIP,
          note="reference log-probs are always computed once, as their own cached stage"),
    Field("precompute_ref_batch_size", PREFERENCE, int, None, "algorithm.reference.batch_size", unless_none),
    # ------------------------------------------------------------------------------------ KTO
    Field("loss_type", ("kto",), str, "kto", "algorithm.loss._target_", lambda v: f"align_runner.algos.kto.{v}_loss",
          choices=KTO_LOSSES, note="align_runner.algos.kto.<name>_loss"),
    Field("desirable_weight", ("kto",), float, 1.0, "algorithm.loss.desirable_weight"),
    Field("undesirable_weight", ("kto",), float, 1.0, "algorithm.loss.undesirable_weight"),
    # --------------------------------------------------------------------------------- reward
    Field("center_rewards_coefficient", ("reward",), float, None, "algorithm.loss.center_coef",
          lambda v: 0.0 if v is None else v),
    # ----------------------------------------------------------------------------------- GRPO
    Field("num_generations", ("grpo",), int, 8, "algorithm.num_generations"),
    Field("steps_per_generation", ("grpo",), int, None, "algorithm.prompts_per_rollout", None,
          note="None: gradient_accumulation_steps"),
    Field("generation_batch_size", ("grpo",), int, None, "algorithm.prompts_per_rollout", None,
          note="completions per rollout; prompts per rollout = this / num_generations"),
    Field("max_completion_length", ("grpo",), int, 512, "algorithm.generation.max_new_tokens"),
    Field("temperature", ("grpo",), float, 1.0, "algorithm.generation.temperature"),
    Field("top_p", ("grpo",), float, 1.0, "algorithm.generation.top_p"),
    Field("top_k", ("grpo",), int, 0, "algorithm.generation.top_k"),
    Field("min_p", ("grpo",), float, None, "algorithm.generation.min_p", lambda v: 0.0 if v is None else v),
    Field("num_iterations", ("grpo",), int, 1, "algorithm.num_iterations"),
    Field("epsilon", ("grpo",), float, 0.2, "algorithm.loss.epsilon_low"),
    Field("epsilon_high", ("grpo",), float, None, "algorithm.loss.epsilon_high", None, note="None: epsilon"),
    Field("importance_sampling_level", ("grpo",), str, "token", "algorithm.loss.importance_sampling_level",
          choices=("token", "sequence")),
    Field("loss_type", ("grpo",), str, "dapo", "algorithm.aggregation._target_",
          lambda v: f"align_runner.algos.reduce.{v}", choices=("grpo", "dr_grpo", "dapo", "bnpo"),
          note="align_runner.algos.reduce.<name>"),
    Field("scale_rewards", ("grpo",), str, "group", "++algorithm.advantage.scale_rewards",
          lambda v: {True: "group", False: "none", "true": "group", "false": "none"}.get(v, v),
          choices=("group", "batch", "none", True, False, "true", "false")),
    Field("mask_truncated_completions", ("grpo",), bool, False, "algorithm.mask_truncated_completions"),
    Field("reward_weights", ("grpo",), list, None, "algorithm.reward_weights", None,
          note="one weight per reward function, in order"),
    Field("shuffle_dataset", ("grpo",), bool, True, "(always: prompts drawn from (seed, rollout))", fixed=True),
    # ------------------------------------------------------------------ model (ModelConfig, CLI)
    Field("model_name_or_path", ALL, str, None, "model.source.name_or_path", None, where=MODEL,
          note="with model=local; a hub id or a local directory"),
    Field("model_revision", ALL, str, "main", "model.source.revision", lambda v: SKIP if v in (None, "main") else v,
          where=MODEL),
    Field("dtype", ALL, str, "float32", "model.dtype", lambda v: "auto" if v in ("float32", "auto") else v, where=MODEL,
          choices=("auto", "float32", "bfloat16", "float16"),
          note="float32: fp32 weights, bf16 autocast where the hardware has it"),
    Field("use_peft", ALL, bool, False, "+model/lora=default", None, where=MODEL),
    Field("lora_r", ALL, int, 16, "model.lora.r", None, where=MODEL),
    Field("lora_alpha", ALL, int, 32, "model.lora.alpha", None, where=MODEL),
    Field("lora_dropout", ALL, float, 0.05, "model.lora.dropout", None, where=MODEL),
    Field("lora_target_modules", ALL, list, None, "model.lora.target_modules", None, where=MODEL,
          note="None: peft's default for the architecture"),
    Field("use_rslora", ALL, bool, False, "model.lora.use_rslora", None, where=MODEL),
    Field("use_dora", ALL, bool, False, "model.lora.use_dora", None, where=MODEL),
    Field("load_in_4bit", ALL, bool, False, "model.quantization", None, where=MODEL),
    Field("load_in_8bit", ALL, bool, False, "model.quantization", None, where=MODEL),
    # --------------------------------------------------------- script (ScriptArguments, CLI)
    Field("dataset_name", ALL, str, None, "data.train.path", None, where=SCRIPT,
          note="with data=local (a local file or folder) or data=hub"),
    Field("dataset_config", ALL, str, None, "data.train.name", None, where=SCRIPT),
    Field("dataset_train_split", ALL, str, "train", "data.train.split", None, where=SCRIPT),
    Field("dataset_test_split", ALL, str, "test", "data.eval.split", None, where=SCRIPT,
          note="read when eval_strategy is not no"),
    Field("dataset_streaming", ALL, bool, False, "(none)", where=SCRIPT, fixed=True),
    Field("reward_funcs", ("grpo",), list, None, "algorithm.rewards.<name>", None, where=SCRIPT,
          note="accuracy_reward, or module.function"),
    Field("reward_model_name_or_path", ("grpo",), str, None, "algorithm.rewards.<name>", None, where=SCRIPT,
          note="scored with the model's own tokenizer"),
)


def fields_for(kind: str, where: tuple[str, ...] = (CONFIG, MODEL, SCRIPT)) -> dict[str, Field]:
    """name -> row for the trainer ``kind`` (one row per name and kind)."""
    if kind not in KINDS:
        raise ValueError(f"unknown trainer {kind!r}; expected one of {', '.join(KINDS)}")
    return {f.name: f for f in FIELDS if kind in f.kinds and f.where in where}


def defaults(kind: str, where: tuple[str, ...] = (CONFIG, MODEL, SCRIPT)) -> dict[str, Any]:
    """TRL's default of every field of ``kind`` (lists copied, so callers may change them)."""
    return {name: _copy(f.default_for(kind)) for name, f in fields_for(kind, where).items()}


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def markdown_table() -> str:
    """The README's table of TRL fields and their align_runner keys (one row per name and key)."""
    lines = ["| TRL field | trainers | align_runner key | notes |", "|---|---|---|---|"]
    for f in FIELDS:
        note = "; ".join(x for x in (("only " + repr(f.default) if not isinstance(f.default, dict) else "only the default")
                                      if f.fixed else "", f.note) if x)
        where = {MODEL: " (CLI)", SCRIPT: " (CLI)"}.get(f.where, "")
        key = f.key if f.key.startswith("(") else f"`{f.key}`"
        lines.append(f"| `{f.name}`{where} | {', '.join(f.kinds)} | {key} | {note} |")
    return "\n".join(lines)
