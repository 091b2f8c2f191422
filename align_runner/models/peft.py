"""LoRA / DoRA / rsLoRA adapters on the policy, and merging adapters into full models (QLoRA's
quantized loading: ``models/quantization.py``).

A LoRA stage's artifact is ``<stage>/model/``: the **merged** full Hugging Face model (so every later
stage, eval and export load it like any model) with the trained adapter beside it in
``<stage>/model/adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``). The merge is
``merge_adapter``, which also serves as the export helper for an adapter trained elsewhere.

LoRA (Hu et al. 2021): W' = W + (alpha / r) * B @ A, with A (r x in) random and B (out x r) zero at
start, so the adapted model starts equal to its base. rsLoRA scales by alpha / sqrt(r); DoRA (Liu et
al. 2024) also learns a per-output-row magnitude of W'.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads lazily
    import torch
    from torch import nn

ADAPTER_DIR = "adapter"


def peft_lora_config(lora: Any):
    """``peft.LoraConfig`` from the ``model.lora`` node."""
    from peft import LoraConfig, TaskType

    targets = lora.target_modules
    if targets is not None and not isinstance(targets, str):  # None: peft's default for the architecture
        targets = [str(t) for t in targets]
    return LoraConfig(
        r=int(lora.r),
        lora_alpha=int(lora.alpha),
        lora_dropout=float(lora.dropout),
        target_modules=targets,
        use_rslora=bool(lora.use_rslora),
        use_dora=bool(lora.use_dora),
        task_type=TaskType.CAUSAL_LM,
    )


def apply_lora(model: nn.Module, lora: Any) -> nn.Module:
    """Wrap ``model`` in a PEFT model with fresh adapters; only adapter weights require grad.

    The adapters' A matrices are drawn from torch's global RNG: seed first for reproducibility."""
    from peft import get_peft_model

    return get_peft_model(model, peft_lora_config(lora))


def reference_mode(model: nn.Module) -> contextlib.AbstractContextManager:
    """The context in which ``model`` computes as DPO's reference.

    Under LoRA the reference is the policy's base with its adapters switched off (PEFT's
    ``disable_adapter()``), so one copy of the weights serves both roles. A plain model is its own
    reference: it was loaded from the same input model the policy starts from.
    """
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_lora_artifact(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    tokenizer: Any,
    out_dir: str | Path,
    *,
    base: str,
    dtype: torch.dtype | None = None,
) -> str:
    """Write ``out_dir/adapter/`` (from ``state_dict``, the PEFT model's full state) and the merged model
    in ``out_dir``. ``state_dict`` comes from the backend, so sharded models save too; the training
    model itself is not touched (the merge happens on a fresh copy of ``base``)."""
    from align_runner.models.loading import _replace_dir

    out = Path(out_dir)
    staging = out.with_name(f"{out.name}.lora-staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging / ADAPTER_DIR, state_dict=state_dict)
        _record_base(staging / ADAPTER_DIR, base)
        merged = staging / "merged"
        merge_adapter(staging / ADAPTER_DIR, merged, base=base, dtype=dtype, tokenizer=tokenizer)
        shutil.move(str(staging / ADAPTER_DIR), str(merged / ADAPTER_DIR))
        _replace_dir(merged, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(out)


def _record_base(adapter: Path, base: str) -> None:
    """Record a local base in ``adapter_config.json`` by absolute path.

    PEFT writes the path the base was loaded from, which may be relative to the run's working directory
    (``outputs/cache/...``) and would then resolve nowhere else. A hub id stays as it is."""
    if not Path(base).exists():
        return
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(Path(base).resolve())
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def adapter_dir(path: str | Path) -> Path:
    """The adapter folder of a stage's ``model/`` (or ``path`` itself when it is one)."""
    p = Path(path)
    if (p / "adapter_config.json").exists():
        return p
    if (p / ADAPTER_DIR / "adapter_config.json").exists():
        return p / ADAPTER_DIR
    raise FileNotFoundError(f"{p} holds no LoRA adapter (no adapter_config.json here or in {ADAPTER_DIR}/)")


def merge_adapter(
    stage_model_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
) -> str:
    """Merge a LoRA adapter into its base and save a full Hugging Face model in ``out_dir``.

    ``stage_model_dir``: a stage's ``model/`` (adapter in ``adapter/``) or an adapter folder.
    ``base``: the base model; default: the ``base_model_name_or_path`` the adapter records.
    ``dtype``: of the merged weights (default float32).
    """
    import torch
    from peft import PeftModel

    from align_runner.models.loading import load_causal_lm, load_tokenizer, save_pretrained_atomic

    src = adapter_dir(stage_model_dir)
    if base is None:
        base = json.loads((src / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(load_causal_lm(str(base), dtype=dtype or torch.float32), str(src))
    merged = model.merge_and_unload()
    return save_pretrained_atomic(merged, tokenizer if tokenizer is not None else load_tokenizer(str(base)), str(out_dir))
