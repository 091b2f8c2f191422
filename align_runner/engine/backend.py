"""Turns a ``hardware`` profile into the running backend. The only module that knows DDP from
DeepSpeed from FSDP: the training loop and the stages talk to the ``Backend`` interface alone.

``hardware.backend`` picks the class through ``BACKENDS`` (no string branching elsewhere):

- ``ddp``: one process, or DistributedDataParallel over several, through Accelerate;
- ``deepspeed``: ``deepspeed.initialize`` with ZeRO stage ``hardware.zero_stage`` (works on CPU/gloo);
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every decoder layer and the root.

Accelerate is not used for the last two: on CPU it cannot run DeepSpeed and silently turns FSDP into
DDP, and a profile that claims sharding must shard. ``describe()`` reports the evidence (wrapper class,
ZeRO optimizer class and stage, DTensor placements, local vs global element counts) into run.json.
All three live in this one file on purpose, so no other module needs to know them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from align_runner.config import Backend as BackendKind

log = logging.getLogger("align_runner")

# hardware.precision -> the dtype weights are stored in
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MakeOptimizer = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def distributed_env() -> tuple[int, int]:
    """(rank, world_size) from the variables torchrun sets; (0, 1) outside a distributed job."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def effective_precision(hardware: Any) -> str:
    """The precision actually used: fp32 on CPU (no native bf16 here; bf16 math is ~10x slower);
    bf16 only where the GPU supports it (else fp16 with a warning)."""
    if str(hardware.device) == "cpu":
        return "fp32"
    wanted = str(hardware.precision)
    if wanted == "bf16" and not torch.cuda.is_bf16_supported():
        log.warning("hardware.precision=bf16 but this GPU has no bf16; using fp16 mixed precision")
        return "fp16"
    return wanted


def model_dtype(hardware: Any, requested: str = "auto") -> torch.dtype:
    """Dtype to load weights in: ``model.dtype`` if set, else what the profile's backend trains in."""
    return get_backend_class(hardware).weights_dtype(hardware, requested)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group(device: str) -> None:
    """Join the torchrun job (gloo on CPU, nccl on GPU); a lone process gets a group of one, which
    DeepSpeed and fully_shard need as well."""
    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")


class Backend:
    """Interface every backend implements; the defaults suit plain torch modules."""

    kind = "base"

    def __init__(self, hardware: Any):
        self.hardware = hardware
        self.precision = effective_precision(hardware)

    # -- topology
    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if str(self.hardware.device) == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    @property
    def name(self) -> str:
        return self.kind

    @classmethod
    def weights_dtype(cls, hardware: Any, requested: str = "auto") -> torch.dtype:
        if requested != "auto":
            return _NAMED_DTYPES[requested]
        # fp32 master weights under bf16/fp16 autocast, as TRL and HF Trainer do: an AdamW update at
        # lr 1e-6 is far below bf16's spacing (2^-8 relative) and would vanish in bf16 weights. Pure
        # bf16 weights only when asked for (model.dtype=bfloat16).
        return torch.float32

    # -- training
    def prepare(
        self, model: nn.Module, params: list[nn.Parameter], make_optimizer: MakeOptimizer, train: Any
    ) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
        """Wrap ``model`` and build its optimizer over ``params``: (wrapped model, optimizer, evidence).

        The optimizer is the one a learning-rate scheduler drives (its ``param_groups``); evidence is
        what the wrapping did (wrapper class, partition sizes, placements), for run.json. Everything a
        later call needs lives in the returned model and optimizer, never in the backend, so one
        backend can train several models (a policy and a critic)."""
        raise NotImplementedError

    def prepare_eval(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient reduction on accumulation micro-steps that are not the last."""
        return contextlib.nullcontext()

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> float:
        """Clip (``max_grad_norm`` > 0), step, zero the gradients; returns the pre-clip gradient norm."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return _to_float(norm)

    def discard_gradients(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Drop this step's gradients without an update (non-finite loss)."""
        optimizer.zero_grad(set_to_none=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def release(self) -> None:
        """Forget the models and optimizers this backend prepared: a stage has ended. The backend lives
        as long as the process, which in a sweep (Hydra's basic launcher) or a test session runs many
        stages; a reference kept here would keep each stage's weights and optimizer state alive."""

    # -- saving
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Every weight, unsharded, on CPU, on the main process (None elsewhere). Collective."""
        if not self.is_main:
            return None
        return {k: v.detach().cpu() for k, v in self.unwrap(model).state_dict().items()}

    def save_train_state(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Model + optimizer state for exact resume (replicated: the main process writes). Collective."""
        if self.is_main:
            trainable = {n: p.detach().cpu() for n, p in self.unwrap(model).named_parameters() if p.requires_grad}
            torch.save({"model": trainable, "optimizer": optimizer.state_dict()}, Path(directory) / "train_state.pt")

    def load_train_state(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        state = torch.load(Path(directory) / "train_state.pt", map_location="cpu", weights_only=False)
        params = dict(self.unwrap(model).named_parameters())
        with torch.no_grad():
            for name, value in state["model"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])

    # -- collectives
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        t = t.to(self.device).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on the main process (None elsewhere). Collective."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. builds a cache), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "world_size": self.world_size,
            "device": str(self.device),
            "precision": self.precision,
        }


def _to_float(t: Any) -> float:
    if t is None:
        return float("nan")
    if hasattr(t, "full_tensor"):  # a DTensor norm under FSDP2
        t = t.full_tensor()
    return float(t)


# --------------------------------------------------------------------------------------------- ddp


class DDPBackend(Backend):
    """Single process or DistributedDataParallel, through Accelerate (mixed precision, grad scaler)."""

    kind = "ddp"

    def __init__(self, hardware: Any):
        super().__init__(hardware)
        from accelerate import Accelerator

        cpu = str(hardware.device) == "cpu"
        self.accelerator = Accelerator(cpu=cpu, mixed_precision="no" if self.precision == "fp32" else self.precision)

    @property
    def name(self) -> str:
        return "ddp" if self.world_size > 1 else "single"

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def prepare(self, model, params, make_optimizer, train):
        model, optimizer = self.accelerator.prepare(model, make_optimizer(params))
        return model, optimizer, {"wrapper": type(model).__name__}

    def no_sync(self, model, sync):
        return contextlib.nullcontext() if sync or self.world_size == 1 else self.accelerator.no_sync(model)

    def backward(self, model, loss):
        self.accelerator.backward(loss)

    def optimizer_step(self, model, optimizer, max_grad_norm):
        params = [p for p in model.parameters() if p.grad is not None]
        norm = self.accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return _to_float(norm)

    def autocast(self):
        return self.accelerator.autocast()

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def release(self):
        # Accelerate keeps every prepared model and optimizer in lists of its own until told otherwise
        self.accelerator.free_memory()


# --------------------------------------------------------------------------------------- deepspeed


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO (stage ``hardware.zero_stage``). ZeRO keeps fp32 master weights itself, so
    weights load in the compute precision; gradient clipping and the update happen in ``engine.step``."""

    kind = "deepspeed"

    def __init__(self, hardware: Any):
        super().__init__(hardware)
        if int(hardware.zero_stage) not in (1, 2, 3):
            raise ValueError(f"hardware.zero_stage={hardware.zero_stage}: backend=deepspeed needs 1, 2 or 3")
        init_process_group(str(hardware.device))

    @property
    def name(self) -> str:
        return f"deepspeed-zero{int(self.hardware.zero_stage)}"

    @classmethod
    def weights_dtype(cls, hardware, requested="auto"):
        if requested != "auto":
            return _NAMED_DTYPES[requested]
        return PRECISION_DTYPES[effective_precision(hardware)]

    def ds_config(self, train: Any) -> dict[str, Any]:
        zero: dict[str, Any] = {"stage": int(self.hardware.zero_stage)}
        if self.hardware.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        return {
            "train_micro_batch_size_per_gpu": int(train.micro_batch_size),
            "gradient_accumulation_steps": int(train.grad_accum),
            "train_batch_size": int(train.micro_batch_size) * int(train.grad_accum) * self.world_size,
            "gradient_clipping": float(train.max_grad_norm),
            "zero_optimization": zero,
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16"},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    def prepare(self, model, params, make_optimizer, train):
        import deepspeed

        optimizer = make_optimizer(params)
        # the DeepSpeedEngine is the wrapped model: every later call finds its ZeRO state through it
        engine, _, _, _ = deepspeed.initialize(
            model=model.to(self.device), optimizer=optimizer, config=self.ds_config(train)
        )
        zero_opt = engine.optimizer
        evidence = {
            "optimizer": type(zero_opt).__name__,
            "zero_stage": int(engine.zero_optimization_stage()),
            "optimizer_partition_numel": _zero_partition_numel(zero_opt),
            "trainable_numel": sum(int(getattr(p, "ds_numel", p.numel())) for p in params),
        }
        if int(self.hardware.zero_stage) == 3:  # weights partitioned too: each rank holds its ds_tensor
            module = engine.module
            evidence["local_param_numel"] = sum(int(p.ds_tensor.numel()) for p in module.parameters())
            evidence["param_numel"] = sum(int(p.ds_numel) for p in module.parameters())
        # The base optimizer's param_groups (same dicts ZeRO steps with) carry the scheduler's lr.
        return engine, optimizer, evidence

    def no_sync(self, model, sync):
        # ZeRO-2/3 reduce every micro-step into partitions; the boundary flag tells ZeRO when to
        # finish the reduction so one engine.step() applies the accumulated gradient.
        model.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, model, loss):
        # the loop already divides by the step's global item count
        model.backward(loss, scale_wrt_gas=False)

    def optimizer_step(self, model, optimizer, max_grad_norm):
        model.step()
        return _to_float(model.get_global_grad_norm())

    def discard_gradients(self, model, optimizer):
        # ZeRO holds reduced gradients in its partitions; its step skips the update and clears them
        # when the gradient norm is not finite (its overflow path), which a non-finite loss gives.
        model.step()
        norm = model.get_global_grad_norm()
        if norm is not None and torch.isfinite(torch.as_tensor(norm)):
            raise RuntimeError("DeepSpeed applied an update for a step whose loss was not finite")

    def unwrap(self, model):
        return getattr(model, "module", model)

    def full_state_dict(self, model):
        if int(self.hardware.zero_stage) == 3 and hasattr(model, "_zero3_consolidated_16bit_state_dict"):
            state = model._zero3_consolidated_16bit_state_dict()  # gathers to rank 0
            return {k: v.cpu() for k, v in state.items()} if self.is_main else None
        return super().full_state_dict(model)

    def save_train_state(self, directory, model, optimizer):
        # every rank writes its own ZeRO partition of the optimizer state
        model.save_checkpoint(str(directory), tag="zero", save_latest=False)

    def load_train_state(self, directory, model, optimizer):
        model.load_checkpoint(
            str(directory), tag="zero", load_optimizer_states=True, load_lr_scheduler_states=False
        )


def _zero_partition_numel(zero_opt: Any) -> int:
    """Elements of fp32 master weights this rank owns: about 1/world of the trainable ones."""
    groups = getattr(zero_opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if groups is None:
        groups = getattr(zero_opt, "fp32_partitioned_groups_flat", [])  # ZeRO-3
    return int(sum(g.numel() for g in groups))


# ------------------------------------------------------------------------------------------- fsdp2


class FSDP2Backend(Backend):
    """torch FSDP2: ``fully_shard`` on each decoder layer (the model's ``_no_split_modules``), then on
    the root. Parameters become DTensors sharded on dim 0; fp32 masters with bf16 compute on GPU."""

    kind = "fsdp2"

    def __init__(self, hardware: Any):
        super().__init__(hardware)
        init_process_group(str(hardware.device))

    @classmethod
    def weights_dtype(cls, hardware, requested="auto"):
        # MixedPrecisionPolicy casts shards for compute; the sharded master weights stay fp32
        return _NAMED_DTYPES[requested] if requested != "auto" else torch.float32

    def prepare(self, model, params, make_optimizer, train):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.tensor import DTensor

        ids = {id(p) for p in params}
        names = [n for n, p in model.named_parameters() if id(p) in ids]
        model = model.to(self.device)
        kwargs: dict[str, Any] = {}
        if self.precision != "fp32":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=PRECISION_DTYPES[self.precision], reduce_dtype=torch.float32)
        blocks = set(getattr(_base_model(model), "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
        # fully_shard swaps every parameter for a DTensor one: rebuild the optimizer's list by name
        named = dict(model.named_parameters())
        sharded = [p for p in named.values() if isinstance(p, DTensor)]
        evidence = {
            "dtensor_params": len(sharded),
            "params": len(named),
            "placements": sorted({str(p.placements) for p in sharded}),
            "local_numel": int(sum(p.to_local().numel() for p in sharded)),
            "global_numel": int(sum(p.numel() for p in sharded)),
        }
        return model, make_optimizer([named[n] for n in names]), evidence

    @contextlib.contextmanager
    def no_sync(self, model, sync):
        model.set_requires_gradient_sync(sync)
        yield

    def full_state_dict(self, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None

    def save_train_state(self, directory, model, optimizer):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(Path(directory) / "dcp"))

    def load_train_state(self, directory, model, optimizer):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optimizer": osd}
        dcp.load(state, checkpoint_id=str(Path(directory) / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (it declares ``_no_split_modules``)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# ---------------------------------------------------------------------------------------- registry

BACKENDS: dict[BackendKind, type[Backend]] = {
    BackendKind.ddp: DDPBackend,
    BackendKind.deepspeed: DeepSpeedBackend,
    BackendKind.fsdp2: FSDP2Backend,
}

_BACKEND: Backend | None = None


def cpu_threads(hardware: Any, cores: int | None = None) -> int | None:
    """torch's intra-op threads for each process: ``hardware.cpu_threads``, else this node's cores
    shared by its processes (so two CPU processes do not each run a thread per core, fighting over
    them); None for one process without a setting: torch's own default (every core) stays."""
    if hardware.get("cpu_threads") is not None:
        return int(hardware.cpu_threads)
    processes = int(hardware.num_processes)
    if processes == 1:
        return None
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return max(1, cores // processes)


def get_backend_class(hardware: Any) -> type[Backend]:
    try:
        return BACKENDS[BackendKind(str(hardware.backend))]
    except (KeyError, ValueError):
        raise ValueError(
            f"hardware.backend={hardware.backend!r}; valid: {', '.join(str(k) for k in BACKENDS)}"
        ) from None


def get_backend(hardware: Any) -> Backend:
    """One backend per process (process groups and Accelerate's state are process-global); a new
    profile in the same process (tests) builds a new one."""
    global _BACKEND
    cls = get_backend_class(hardware)
    if _BACKEND is None or type(_BACKEND) is not cls or _BACKEND.hardware != hardware:
        _BACKEND = cls(hardware)
    # every run applies its setting, also on a reused backend (the default is set at launch:
    # cli._self_launch), so runs in one process do not inherit each other's thread counts
    if hardware.get("cpu_threads") is not None:
        torch.set_num_threads(int(hardware.cpu_threads))
    return _BACKEND
