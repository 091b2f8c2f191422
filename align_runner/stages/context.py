"""What a stage plugin gets: its config, its inputs, and helpers to load models and data.

The pipeline builds one ``StageContext`` per computed stage. Stages read inputs only through it, so a
stage's key (computed by the pipeline from the same inputs) covers everything the stage can see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from align_runner.config import stage_train
from align_runner.engine.backend import Backend, model_dtype
from align_runner.engine.loop import Engine
from align_runner.engine.trackers import RunTracker, Tracker
from align_runner.fsutil import atomic_write_json

log = logging.getLogger("align_runner")


@dataclass(frozen=True)
class StageSpec:
    """One node of the pipeline graph."""

    name: str
    kind: str
    # config node holding the stage's settings, e.g. "algorithm", "upstream.sft", "eval", "data"
    config: str
    # upstream stage whose model this stage starts from; None = the configured base model
    model_from: str | None = None
    # (role, stage name) of every other input the kind declares (registry.Input), sorted by role
    inputs: tuple[tuple[str, str], ...] = ()


@dataclass
class StageContext:
    cfg: DictConfig
    spec: StageSpec
    key: str
    out_dir: Path
    backend: Backend
    # role -> output dir of each input: "data" (data_prep), "model" (the stage model_from names, if
    # any) and the roles its kind declares. The stage's key covers exactly these; it sees nothing else.
    inputs: dict[str, Path] = field(default_factory=dict)
    # resolved path / hub id of the base model (model.source)
    base_model: str = ""
    run_name: str = "run"
    # settings the pipeline derives for this stage (part of its key), e.g. data_prep's views
    params: dict[str, Any] = field(default_factory=dict)
    # engines this stage made (their backend evidence goes to the manifest and run.json)
    engines: list[Engine] = field(default_factory=list)
    # the job's TensorBoard / W&B run (main process, tracking.backends set), shared by its stages
    run_tracker: RunTracker | None = None

    # ------------------------------------------------------------------------------------- config
    @property
    def section(self) -> DictConfig:
        return OmegaConf.select(self.cfg, self.spec.config)

    @cached_property
    def train(self) -> DictConfig:
        """cfg.train with the stage's own ``train:`` changes applied (validated against TrainConfig)."""
        merged = stage_train(self.cfg, self.section)
        return merged

    @property
    def is_main(self) -> bool:
        return self.backend.is_main

    # -------------------------------------------------------------------------------------- models
    def input_model_path(self) -> str:
        """The model this stage starts from: an upstream stage's ``model/`` or the base model."""
        if self.spec.model_from is None:
            return self.base_model
        return str(self.input_dir("model") / "model")

    def input_dir(self, role: str) -> Path:
        """The output dir of the stage bound to ``role`` ("data", "model" or a declared input role)."""
        try:
            return self.inputs[role]
        except KeyError:
            raise KeyError(f"stage {self.spec.name!r} has no {role!r} input; it has: {sorted(self.inputs)}") from None

    def has_input(self, role: str) -> bool:
        return role in self.inputs

    @property
    def dtype(self):
        return model_dtype(self.cfg.hardware, str(self.cfg.model.dtype))

    def tokenizer(self):
        from align_runner.models.loading import load_tokenizer

        return load_tokenizer(self.input_model_path())

    def load_policy(self):
        """The input model; in a training stage with ``model.lora`` set, wrapped with fresh adapters."""
        from align_runner.models.loading import load_causal_lm, speed_options
        from align_runner.registry import get_stage

        m = self.cfg.model
        model = load_causal_lm(
            self.input_model_path(),
            dtype=self.dtype,
            gradient_checkpointing=bool(m.gradient_checkpointing),
            quantization=m.quantization,
            **speed_options(m, training=get_stage(self.spec.kind).trains),
        )
        if m.lora is not None and get_stage(self.spec.kind).trains:
            from align_runner.models.peft import apply_lora

            model = apply_lora(model, m.lora)
        # a quantized base is already placed on its GPU by from_pretrained
        return model if m.quantization else model.to(self.backend.device)

    def load_frozen_policy(self):
        """The input model as a frozen reference (eval mode, no gradients, no adapters), on the device."""
        from align_runner.models.loading import load_causal_lm

        model = load_causal_lm(self.input_model_path(), dtype=self.dtype)
        model.requires_grad_(False).eval()
        return model.to(self.backend.device)

    def save_model(self, model, tokenizer) -> Path:
        """Save the final model in Hugging Face layout under ``<stage>/model`` (main process writes).

        Collective: the backend gathers sharded weights to the main process. A LoRA policy saves its
        adapter in ``model/adapter/`` and the merged full model in ``model/`` (models/peft.py)."""
        from align_runner.models.loading import save_pretrained_atomic
        from align_runner.models.peft import is_peft_model, save_lora_artifact

        out = self.out_dir / "model"
        state = self.backend.full_state_dict(model)
        if self.is_main:
            unwrapped = self.backend.unwrap(model)
            if is_peft_model(unwrapped):
                save_lora_artifact(unwrapped, state, tokenizer, out, base=self.input_model_path(), dtype=self.dtype)
            else:
                save_pretrained_atomic(unwrapped, tokenizer, str(out), state_dict=state)
        self.backend.barrier()
        return out

    # ---------------------------------------------------------------------------------------- data
    def dataset(self, view: str, split: str = "train") -> list[dict]:
        """Rows prepared by data_prep for ``view`` ("sft", "preference", "prompt") and split."""
        from align_runner.data.prepared import load_prepared

        return load_prepared(self._data_dir(view), view, split)

    def _data_dir(self, view: str) -> Path:
        # a stage's key covers only the views its kind declares (runner._data_key): reading another
        # would let a stale cached result survive a change to that view's data
        from align_runner.registry import get_stage

        declared = get_stage(self.spec.kind).views
        if view not in declared:
            raise RuntimeError(f"stage kind {self.spec.kind!r} reads view {view!r} but declares only {declared} (register_stage views=)")
        return self.input_dir("data")

    def splits(self, view: str) -> tuple[list[dict], list[dict] | None]:
        """(train rows, held-out rows or None when the data config has no eval split) of ``view``."""
        return self.dataset(view, "train"), (self.dataset(view, "eval") if self.has_dataset(view, "eval") else None)

    def has_dataset(self, view: str, split: str = "train") -> bool:
        from align_runner.data.prepared import prepared_path

        return prepared_path(self._data_dir(view), view, split).exists()

    # -------------------------------------------------------------------------------------- engine
    @cached_property
    def tracker(self) -> Tracker:
        """This stage's metrics.jsonl, forwarded to the job's tracker run under the stage's name."""
        return Tracker(self.out_dir, stage=self.spec.name, enabled=self.is_main, run=self.run_tracker)

    def engine(self) -> Engine:
        """A training engine for this stage (its checkpoints, its tracker); what it prepares is
        reported in run.json."""
        engine = Engine(
            self.train,
            self.backend,
            out_dir=self.out_dir,
            seed=int(self.cfg.seed),
            tracker=self.tracker,
            desc=self.spec.name,
        )
        self.engines.append(engine)
        return engine

    def write_json(self, name: str, obj: Any) -> None:
        if self.is_main:
            atomic_write_json(self.out_dir / name, obj)
