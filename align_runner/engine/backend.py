"""Turns a ``hardware`` profile into the running backend. The only module that knows DDP from
DeepSpeed from FSDP: the training loop and the stages talk to the ``Backend`` interface alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def distributed_env() -> tuple[int, int]:
    """(rank, world_size) from the variables torchrun sets; (0, 1) outside a distributed job."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def model_dtype(hardware: Any, requested: str = "auto") -> torch.dtype:
    """Weights dtype: the model's own setting, else the hardware's precision.

    On CPU we keep fp32 weights: this CPU has no native bf16 and bf16 math runs ~10x slower here.
    """
    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    if str(hardware.device) == "cpu":
        return torch.float32
    return _DTYPES[str(hardware.precision)]


@dataclass
class Backend:
    """Single process or DistributedDataParallel, through Accelerate."""

    hardware: Any
    accelerator: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from accelerate import Accelerator

        backend = str(self.hardware.backend)
        if backend != "ddp":
            # ZeRO and FSDP2 need their own engines on CPU; refusing beats silently running DDP.
            raise NotImplementedError(
                f"hardware.backend={backend!r} is not available in this build; valid here: 'ddp'"
            )
        cpu = str(self.hardware.device) == "cpu"
        precision = "no" if cpu or str(self.hardware.precision) == "fp32" else str(self.hardware.precision)
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=precision)

    # -- topology
    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def name(self) -> str:
        return "ddp" if self.world_size > 1 else "single"

    # -- training
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        return self.accelerator.prepare(model, optimizer)

    def prepare_eval(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on accumulation micro-steps that are not the last."""
        return contextlib.nullcontext() if sync or self.world_size == 1 else self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm > 0:
            return self.accelerator.clip_grad_norm_(params, max_norm)
        norms = [p.grad.detach().norm(2) for p in params]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    # -- collectives
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        return self.accelerator.reduce(t.to(self.device), reduction="sum")

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        with self.accelerator.main_process_first():
            yield

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "world_size": self.world_size, "device": str(self.device)}


_BACKEND: Backend | None = None


def get_backend(hardware: Any) -> Backend:
    """One backend per process (Accelerate's state is process-global)."""
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = Backend(hardware)
    return _BACKEND
