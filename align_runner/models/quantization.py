"""QLoRA's quantized base: whether it can run here (checked at validation, before any model loads),
the ``from_pretrained`` arguments that load it in 4 or 8 bits, and PEFT's k-bit preparation.

Below ``models/loading`` (which loads a quantized base through these) and ``models/peft`` (the
adapters trained on it).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads lazily: config validation (check_quantization) must stay light
    import torch
    from torch import nn


class QuantizationUnavailableError(ValueError):
    """model.quantization was asked for where it cannot run (no CUDA, no bitsandbytes, no LoRA)."""


def check_quantization(model_cfg: Any, hardware: Any) -> None:
    """Fail at validation time (before any model loads) when QLoRA cannot run here."""
    q = model_cfg.get("quantization")
    if q is None:
        return
    where = f"model.quantization={q}"
    if model_cfg.get("lora") is None:
        raise QuantizationUnavailableError(
            f"{where} trains LoRA adapters on a frozen quantized base (QLoRA); add +model/lora=default"
        )
    if str(hardware.device) != "cuda":
        raise QuantizationUnavailableError(
            f"{where} needs a CUDA GPU (bitsandbytes kernels); hardware={hardware.name} runs on {hardware.device}. "
            "Use a GPU profile such as hardware=1xgpu, or drop model.quantization"
        )
    if str(hardware.backend) != "ddp":
        raise QuantizationUnavailableError(f"{where} runs with hardware.backend=ddp only, not {hardware.backend}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailableError(f"{where} needs bitsandbytes: pip install bitsandbytes")
    import torch

    if not torch.cuda.is_available():
        raise QuantizationUnavailableError(f"{where}: hardware.device=cuda but torch sees no CUDA GPU here")


def quantization_kwargs(quantization: str | None, compute_dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a 4-bit (NF4, double quant) or 8-bit base."""
    if quantization is None:
        return {}
    import os

    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": bnb, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}


def prepare_quantized(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """PEFT's k-bit preparation: fp32 norms/head, input grads for checkpointing through frozen layers."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
