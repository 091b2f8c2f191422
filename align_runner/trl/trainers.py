"""``SFTTrainer``, ``DPOTrainer``, ``RewardTrainer``, ``GRPOTrainer``, ``KTOTrainer``: TRL's constructors on the
pipeline.

A trainer turns its arguments into the override list the CLI flags give (``overrides.build``), checks
it by composing the config (so bad settings fail in the constructor, before any model loads), and
``train()`` runs it with ``align_runner.api.run``: stage keys, the stage cache, run.json and the report
as for any run. ``output_dir`` then holds the final model as a Hugging Face checkpoint
(``align_runner.export``). Arguments of TRL's that have no counterpart here (callbacks, collators,
optimizers, ...) are errors when given, never ignored.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar

from align_runner.trl.configs import CONFIGS
from align_runner.trl.inputs import (
    dataset_rows,
    model_path,
    resolved_paths,
    reward_nodes,
    split_datasets,
    write_rows,
)
from align_runner.trl.overrides import build, check_values, default_hardware
from align_runner.validate import ConfigError

# peft.LoraConfig attributes that say nothing about the adapter (bookkeeping peft fills in)
_LORA_BOOKKEEPING = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                     "peft_version"}
_LORA_FIELDS = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                "target_modules": "lora_target_modules", "use_rslora": "use_rslora", "use_dora": "use_dora"}


def lora_values(peft_config: Any) -> dict[str, Any]:
    """A peft ``LoraConfig`` as the CLI's LoRA flags; a setting align_runner does not map is an error."""
    if peft_config is None:
        return {}
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        raise ConfigError(f"peft_config: only a peft LoraConfig is supported, got {type(peft_config).__name__}")
    default = LoraConfig()
    for f in dataclasses.fields(LoraConfig):
        if f.name in _LORA_FIELDS or f.name in _LORA_BOOKKEEPING:
            continue
        if getattr(peft_config, f.name) != getattr(default, f.name):
            raise ConfigError(f"peft_config.{f.name}={getattr(peft_config, f.name)!r} is not supported (LoRA maps r, "
                              f"lora_alpha, lora_dropout, target_modules, use_rslora, use_dora)")
    values = {flag: getattr(peft_config, name) for name, flag in _LORA_FIELDS.items()}
    targets = values["lora_target_modules"]
    values["lora_target_modules"] = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    return {"use_peft": True, **values}


class _Trainer:
    kind: ClassVar[str]

    def __init__(self, model: Any, args: Any, train_dataset: Any, eval_dataset: Any, processing_class: Any,
                 peft_config: Any, reward_funcs: Any = None, **unsupported: Any) -> None:
        name = type(self).__name__
        given = [k for k, v in unsupported.items() if v is not None and v != (None, None)]
        if given:
            raise ConfigError(f"{name}: {', '.join(given)} {'is' if len(given) == 1 else 'are'} not supported by align_runner "
                              "(stages build their own collators, optimizers and logging)")
        config_cls = CONFIGS[self.kind]
        if args is None:
            args = config_cls(f"{Path(str(getattr(model, 'name_or_path', model))).name}-{self.kind.upper()}")
        if not isinstance(args, config_cls):
            raise ConfigError(f"{name}: args must be align_runner.trl.{config_cls.__name__}, got {type(args).__module__}.{type(args).__name__}")
        check_values(self.kind, args.to_dict(), config_cls.__name__)  # attributes may have changed since
        if train_dataset is None:
            raise ConfigError(f"{name}: train_dataset is required")
        self.args, self.processing_class = args, processing_class
        self._model, self._trained = model, None
        cache = str(resolved_paths().cache)
        train, eval = split_datasets(train_dataset, eval_dataset, str(getattr(args, "eval_strategy", "no")))
        if eval is not None and self.kind == "grpo":
            raise ConfigError("GRPOTrainer: eval_dataset is not supported (evaluate with pipeline.eval and checkers)")
        rows = dataset_rows(train, "train_dataset")
        self.overrides = build(
            self.kind,
            {**args.to_dict(), **lora_values(peft_config)},
            model=model_path(model, processing_class, cache),
            train={"path": write_rows(rows, cache)},
            eval=None if eval is None else {"path": write_rows(dataset_rows(eval, "eval_dataset"), cache)},
            rewards=reward_nodes(reward_funcs, cache) if self.kind == "grpo" else (),
            n_prompts=len(rows),
        ) + default_hardware()
        from align_runner import api

        api.compose(self.overrides)  # every config check now, before anything trains
        self.run_result = None

    @property
    def output_dir(self) -> str:
        return str(self.args.output_dir or "trainer_output")

    def train(self, resume_from_checkpoint: Any = None) -> Any:
        """Run the pipeline; returns ``TrainOutput(global_step, training_loss, metrics)``.

        Resuming needs no argument: a stage killed midway resumes from its last checkpoint
        (``save_steps``) when the same training runs again, and a finished one is a cache hit."""
        from transformers.trainer_utils import TrainOutput

        from align_runner import api

        if resume_from_checkpoint not in (None, False, True):
            raise ConfigError("resume_from_checkpoint: align_runner resumes a stage from its own checkpoints when the "
                              "same training runs again; a checkpoint path is not supported")
        self.run_result = api.run(self.overrides)
        stage = self.run_result.stage(self.kind)
        self._trained = Path(stage.dir)
        self.save_model()
        steps, losses = _history(self._trained)
        loss = sum(losses) / len(losses) if losses else math.nan
        metrics = {"train_runtime": stage.seconds, "train_loss": loss, **stage.metrics}
        return TrainOutput(steps, loss, metrics)

    def save_model(self, output_dir: str | None = None) -> str:
        """Write the trained model to ``output_dir`` (default ``args.output_dir``) as a Hugging Face
        checkpoint (a LoRA run writes its adapter, as TRL does)."""
        from align_runner.export import export

        if self._trained is None:
            raise ConfigError("save_model: nothing trained yet; call train() first")
        return str(export(self._trained, output_dir or self.output_dir, overwrite=True))

    @property
    def model(self) -> Any:
        """The model given before ``train()``; the trained model (loaded from the stage) after it."""
        if self._trained is None:
            return self._model
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForSequenceClassification if self.kind == "reward" else AutoModelForCausalLM
        return auto.from_pretrained(self._trained / "model")


def _history(stage_dir: Path) -> tuple[int, list[float]]:
    """(last optimizer step, the logged training losses) from a stage's metrics.jsonl."""
    from align_runner.engine.trackers import HISTORY, read_metrics

    path = stage_dir / HISTORY
    rows = read_metrics(path) if path.exists() else []
    train = [r for r in rows if isinstance(r.get("loss"), float)]
    return max((int(r["step"]) for r in rows), default=0), [r["loss"] for r in train]


class SFTTrainer(_Trainer):
    kind = "sft"

    def __init__(self, model: Any, args: Any = None, data_collator: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, *, peft_config: Any = None,
                 compute_loss_func: Any = None, compute_metrics: Any = None, callbacks: Any = None,
                 optimizers: Any = (None, None), optimizer_cls_and_kwargs: Any = None,
                 preprocess_logits_for_metrics: Any = None, quantization_config: Any = None,
                 formatting_func: Any = None) -> None:
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, peft_config,
                         data_collator=data_collator, compute_loss_func=compute_loss_func, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                         quantization_config=quantization_config, formatting_func=formatting_func)


class DPOTrainer(_Trainer):
    kind = "dpo"

    def __init__(self, model: Any, ref_model: Any = None, args: Any = None, data_collator: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None, *,
                 compute_metrics: Any = None, callbacks: Any = None, optimizers: Any = (None, None),
                 quantization_config: Any = None, peft_config: Any = None) -> None:
        # the reference is always the input model (its log-probs a cached stage); a separate one is not mapped
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, peft_config,
                         ref_model=ref_model, data_collator=data_collator, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers, quantization_config=quantization_config)


class RewardTrainer(_Trainer):
    kind = "reward"

    def __init__(self, model: Any, args: Any = None, data_collator: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, *, compute_metrics: Any = None,
                 callbacks: Any = None, optimizers: Any = (None, None), optimizer_cls_and_kwargs: Any = None,
                 preprocess_logits_for_metrics: Any = None, quantization_config: Any = None,
                 peft_config: Any = None) -> None:
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, peft_config,
                         data_collator=data_collator, compute_metrics=compute_metrics, callbacks=callbacks,
                         optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                         quantization_config=quantization_config)


class GRPOTrainer(_Trainer):
    kind = "grpo"

    def __init__(self, model: Any, reward_funcs: Any = None, args: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, reward_processing_classes: Any = None, *,
                 callbacks: Any = None, optimizers: Any = (None, None), quantization_config: Any = None,
                 peft_config: Any = None, tools: Any = None, rollout_func: Any = None,
                 environment_factory: Any = None) -> None:
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, peft_config, reward_funcs,
                         reward_processing_classes=reward_processing_classes, callbacks=callbacks,
                         optimizers=optimizers, quantization_config=quantization_config, tools=tools,
                         rollout_func=rollout_func, environment_factory=environment_factory)


class KTOTrainer(DPOTrainer):
    """KTO on ``prompt, completion, label`` rows (label true: desirable), or on ``prompt, chosen, rejected``
    pairs, each pair becoming a desirable and an undesirable row (the unpaired view of data_prep). TRL's
    signature is DPO's; as there, the reference is the input model, its log-probs (and the KL samples')
    a cached stage."""

    kind = "kto"
