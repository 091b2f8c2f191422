"""Turning a model *source* into loaded models and tokenizers, and writing them back safely.

A source is a Hydra `_target_` node whose factory returns a string that `from_pretrained` accepts:
a local directory in Hugging Face layout, or a hub id. Factories take `cache_dir` as a keyword
(`resolve_source` passes it), so built or converted models land in one shared cache.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from filelock import FileLock
from packaging.version import Version
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

# `org/name` as the hub spells repository ids (letters, digits, `-`, `_`, `.`).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

# Revisions named by `hub_or_local`, keyed by hub id. The loaders below look a path up here so that
# a source node can pin a revision while still returning the plain string `from_pretrained` takes.
_REVISIONS: dict[str, str] = {}

# transformers 4.56 renamed `torch_dtype=` to `dtype=`; pyproject allows older releases too.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


class ModelSourceError(RuntimeError):
    """A model source cannot be turned into something `from_pretrained` can load."""


class ModelOptionError(ValueError):
    """A model speed option (`model.attn_implementation`, `model.liger_kernel`) cannot run here."""


# option value -> (importable module it needs, what to install)
_NEEDS = {
    "flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation (CUDA GPUs only)"),
    "liger_kernel": ("liger_kernel", "pip install liger-kernel (CUDA GPUs only)"),
}


def check_model_options(model_cfg: Any) -> None:
    """Fail at validation time, naming the key and what to install, when an asked-for kernel is missing."""
    import importlib.util

    asked = []
    if model_cfg.get("attn_implementation") is not None and str(model_cfg.attn_implementation) == "flash_attention_2":
        asked.append(("model.attn_implementation=flash_attention_2", "flash_attention_2"))
    if model_cfg.get("liger_kernel"):
        asked.append(("model.liger_kernel=true", "liger_kernel"))
    for key, need in asked:
        module, install = _NEEDS[need]
        if importlib.util.find_spec(module) is None:
            raise ModelOptionError(f"{key} needs the {module} package, which is not installed: {install}")


def speed_options(model_cfg: Any, *, training: bool) -> dict[str, Any]:
    """The keyword arguments of `load_causal_lm` / `load_sequence_classifier` set by `model.*`.

    `model.compile` applies to models a stage trains: generation and scoring run eager (their shapes
    change on every call, which would recompile again and again)."""
    attn = model_cfg.get("attn_implementation")
    return {
        "attn_implementation": None if attn is None else str(attn),
        "liger_kernel": bool(model_cfg.get("liger_kernel", False)),
        "compile": training and bool(model_cfg.get("compile", False)),
    }


def takes_attention_masks(model_cfg: Any) -> bool:
    """Whether the configured attention kernel takes an arbitrary 4-D attention mask, as the layouts that
    compute a shared prompt once need (sdpa and eager do; flash-attention's varlen path does not)."""
    attn = model_cfg.get("attn_implementation")
    return attn is None or str(attn) != "flash_attention_2"


def _apply_speed_options(model: PreTrainedModel, *, liger_kernel: bool, compile: bool) -> PreTrainedModel:
    if liger_kernel:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        # kernels for norms / RoPE / MLP only: the loss is align_runner's own (models/counted_head.py)
        _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)
    if compile:
        # in place (nn.Module.compile): the module, its parameters and state-dict keys stay the same
        model.compile()
    return model


# --------------------------------------------------------------------------- sources


def hub_or_local(cache_dir: str, *, name_or_path: str, revision: str | None = None) -> str:
    """Source factory for a model that already exists: a local HF directory or a hub id.

    `cache_dir` is accepted for the common factory signature and unused (the hub has its own cache).
    A `revision` is remembered for the hub id and applied by `load_*` below.
    """
    del cache_dir
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"model directory {str(path)!r} has no config.json; expected a Hugging Face layout "
                "(config.json, model.safetensors, tokenizer files), e.g. written by save_pretrained"
            )
        return str(path)
    if name_or_path.startswith(("/", ".", "~")):
        raise ModelSourceError(f"local model path {name_or_path!r} does not exist")
    if not _HUB_ID.match(name_or_path):
        raise ModelSourceError(
            f"{name_or_path!r} is neither an existing local directory nor a hub id of the form 'org/name'"
        )
    if revision is not None:
        _REVISIONS[name_or_path] = revision
    return name_or_path


def resolve_source(source_cfg: Any, cache_dir: str) -> str:
    """Build the source node (`hydra.utils.instantiate(source_cfg, cache_dir=...)`) to a path or hub id."""
    from hydra.utils import instantiate

    result = instantiate(source_cfg, cache_dir=cache_dir)
    if not isinstance(result, str):
        target = _target_of(source_cfg)
        raise TypeError(
            f"model source {target!r} returned {type(result).__name__}, expected str "
            "(a local directory or a hub id)"
        )
    return result


def _target_of(source_cfg: Any) -> str:
    try:
        return str(source_cfg["_target_"])
    except (KeyError, TypeError):
        return str(getattr(source_cfg, "_target_", "<no _target_>"))


def check_reachable(source: str) -> None:
    """A hub id must be in the local Hugging Face cache or downloadable. Its config.json (a few KB) is
    fetched now, so an offline machine, a misspelt id or a gated model fails here in one line, before
    any stage runs, not as a chain of tracebacks from the first tokenizer load."""
    if Path(source).is_dir():
        return
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(source, "config.json", revision=revision_for(source))
    except Exception as e:  # offline, unknown repo or revision, gated, no permission: all the user's to fix
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(
            f"model {source!r}: not in the local Hugging Face cache and not fetchable from the hub ({cause}); "
            "check the id, log in for a gated model, download it while online, or point the model source at a local directory"
        ) from e


def revision_for(path: str) -> str | None:
    """The revision `hub_or_local` pinned for this hub id, if any."""
    return _REVISIONS.get(path)


# --------------------------------------------------------------------------- loaders


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token and right padding (the collators build masks for right padding)."""
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision_for(path))
    if tokenizer.pad_token is None:
        # Many base models ship without a pad token. Padding positions are masked out of both the
        # attention and the loss, so reusing eos keeps the vocabulary (and the embedding matrix)
        # unchanged. Consequence: label masks must come from the attention mask / lengths, never
        # from `input_ids == pad_token_id`, or the real eos would be dropped from the loss too.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_causal_lm(
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    quantization: str | None = None,
    attn_implementation: str | None = None,
    liger_kernel: bool = False,
    compile: bool = False,
) -> PreTrainedModel:
    """`AutoModelForCausalLM` in `dtype`, optionally with (non-reentrant) gradient checkpointing.

    `quantization` ("4bit" / "8bit", CUDA + bitsandbytes) loads a frozen quantized base for QLoRA,
    placed on this process's GPU. `attn_implementation` (None: transformers' default), `liger_kernel`
    and `compile` are the `model.*` speed options (`speed_options`)."""
    from align_runner.models.quantization import prepare_quantized, quantization_kwargs

    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=revision_for(path),
        **{_DTYPE_KWARG: dtype},
        **quantization_kwargs(quantization, dtype),
        **_attn_kwargs(attn_implementation),
    )
    if quantization is not None:
        return prepare_quantized(model, gradient_checkpointing)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return _apply_speed_options(model, liger_kernel=liger_kernel, compile=compile)


def _attn_kwargs(attn_implementation: str | None) -> dict[str, str]:
    return {} if attn_implementation is None else {"attn_implementation": attn_implementation}


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in backward instead of storing them (memory for ~30% more compute)."""
    # Non-reentrant checkpointing works with frozen inputs (LoRA) and DDP's unused-parameter checks.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # The KV cache is useless in training and incompatible with recomputing activations.
    model.config.use_cache = False


def load_sequence_classifier(
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    liger_kernel: bool = False,
    compile: bool = False,
) -> PreTrainedModel:
    """Scalar-output model (`num_labels=1`) for reward modelling: scores of shape (B, 1).

    From a causal-LM checkpoint the backbone is reused and the `score` head is freshly initialised
    from torch's global RNG (seed before calling for reproducibility). `pad_token_id` must be set:
    the model finds each row's last real token as the last position that is not padding.
    """
    pad_token_id = _pad_token_id(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        revision=revision_for(path),
        num_labels=1,
        pad_token_id=pad_token_id,
        **{_DTYPE_KWARG: dtype},
        **_attn_kwargs(attn_implementation),
    )
    return _apply_speed_options(model, liger_kernel=liger_kernel, compile=compile)


def _pad_token_id(path: str) -> int:
    """Pad id from the tokenizer (as `load_tokenizer` sets it), so scores line up with collated batches."""
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token_id is None:
        raise ModelSourceError(f"tokenizer at {path!r} has neither a pad nor an eos token")
    return int(tokenizer.pad_token_id)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """`(total, trainable)` parameter counts; tied weights are counted once."""
    total = trainable = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return total, trainable


# --------------------------------------------------------------------------- writing


def save_pretrained_atomic(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str,
    *,
    safe_serialization: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> str:
    """Save model (+ tokenizer) to `out_dir` so that readers see either nothing or the whole thing.

    Writes into `<out_dir>.tmp-<pid>` and renames it into place. An existing `out_dir` is replaced
    (moved aside first, deleted after the new one is in place). `state_dict` (full, unsharded) replaces
    the model's own, for models whose parameters are sharded across processes.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        extra = {"state_dict": state_dict} if state_dict is not None else {}
        model.save_pretrained(tmp, **_serialization_kwargs(model, safe_serialization), **extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _serialization_kwargs(model: PreTrainedModel, safe_serialization: bool) -> dict[str, bool]:
    # transformers 5 dropped the flag (it always writes safetensors); 4.x still takes it.
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        return {"safe_serialization": safe_serialization}
    if not safe_serialization:
        logger.warning(
            "this transformers version always saves safetensors; ignoring safe_serialization=False"
        )
    return {}


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` is moved aside first so the swap is two renames."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def build_dir_once(out_dir: str, build: Callable[[str], None]) -> str:
    """Create `out_dir` with `build(tmp_dir)` exactly once, safely across processes.

    Holds a `FileLock` on `<out_dir>.lock`; `build` writes into a temp dir beside `out_dir`, which is
    renamed into place only when complete, so a crash never leaves a half-written `out_dir`. A process
    that waited on the lock finds the directory present and returns at once.
    """
    out = Path(out_dir)
    if out.is_dir():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if out.is_dir():
            return str(out)
        # Leftovers of a crashed build of this same directory: safe to delete while we hold the lock.
        for stale in out.parent.glob(f".{out.name}.build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent)
        try:
            build(tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
