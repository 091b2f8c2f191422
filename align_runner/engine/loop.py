"""The one training loop every stage runs on.

A stage hands ``Engine.fit`` a ``step(model, batch) -> LossOutput`` whose loss is the mean over the
micro-batch's ``num_items`` (tokens for SFT, pairs for DPO/reward). The engine rescales it by
``num_items / global items of the optimizer step`` so that any micro-batch x accumulation x process
split of the same examples gives the same gradient (DESIGN §6).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from align_runner.algos.types import LossOutput
from align_runner.data.pack import split_to_count, token_budget_batches
from align_runner.engine.backend import Backend
from align_runner.engine.checkpoint import CheckpointManager
from align_runner.engine.trackers import Tracker


class NonFiniteLossError(FloatingPointError):
    """Raised after ``train.max_nonfinite`` consecutive NaN/inf losses."""


Batch = dict[str, Any]
StepFn = Callable[[nn.Module, Batch], LossOutput]


@dataclass
class FitResult:
    steps: int
    # last logged training metrics and the final eval metrics ("eval/loss", ...)
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _real_tokens(batch: Batch) -> int:
    """Tokens of a batch that are not padding (a packed batch marks padding with sequence id -1)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "sequence_ids" in batch:
        return int((batch["sequence_ids"] >= 0).sum())
    return 0


def schedule_indices(n: int, global_batch: int, epoch: int, seed: int) -> list[list[int]]:
    """Example indices of each optimizer step of one epoch.

    The permutation depends only on (seed, epoch), so any step's data can be rebuilt on resume. The
    last step wraps around to the epoch's start instead of running short, which keeps every process
    busy under DDP.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    steps = max(1, math.ceil(n / global_batch))
    order = (order * (steps * global_batch // n + 1))[: steps * global_batch]
    return [order[i * global_batch : (i + 1) * global_batch] for i in range(steps)]


@dataclass
class TrainState:
    """One trained model's handle: its backend-wrapped model, optimizer and scheduler.

    The backend keeps nothing per model, so a stage may train several (PPO's policy and critic), each
    with its own state; ``name`` is its folder inside a step checkpoint.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    # facts the backend found while wrapping (wrapper class, ZeRO partition sizes, DTensor placements)
    evidence: dict[str, Any] = field(default_factory=dict)
    # optimizer steps applied so far
    step: int = 0
    # consecutive non-finite losses (the NaN guard)
    nonfinite: int = 0


class Engine:
    def __init__(
        self,
        train: Any,
        backend: Backend,
        *,
        out_dir: Path,
        seed: int,
        tracker: Tracker,
        desc: str = "train",
    ):
        self.train = train
        self.backend = backend
        self.out_dir = Path(out_dir)
        self.seed = seed
        self.tracker = tracker
        self.desc = desc
        self.ckpt = CheckpointManager(self.out_dir / "ckpt", keep_last=train.keep_last, backend=backend)
        # name -> evidence of every model this engine prepared, for run.json
        self.evidence: dict[str, dict[str, Any]] = {}
        self._tokens = 0

    # ----------------------------------------------------------------------------------- schedule
    def _plan(self, n: int) -> tuple[int, int]:
        t = self.train
        global_batch = t.micro_batch_size * t.grad_accum * self.backend.world_size
        steps_per_epoch = max(1, math.ceil(n / global_batch))
        total = t.max_steps if t.max_steps > 0 else max(1, round(steps_per_epoch * t.epochs))
        return steps_per_epoch, total

    def _step_batches(
        self, n: int, step: int, steps_per_epoch: int, lengths: Sequence[int] | None = None
    ) -> list[list[int]]:
        """This process's micro-batches (lists of example indices) for optimizer step ``step``.

        The step's examples and each process's share of them are fixed by the schedule; only how a
        share is cut into micro-batches depends on ``train.max_tokens_per_batch`` (then ``lengths``, the
        padded tokens of each example, group them by length).
        """
        t, ws = self.train, self.backend.world_size
        epoch, pos = divmod(step, steps_per_epoch)
        share = t.micro_batch_size * t.grad_accum
        idx = schedule_indices(n, share * ws, epoch, self.seed)[pos]
        if t.max_tokens_per_batch is None:
            micro = [idx[i : i + t.micro_batch_size] for i in range(0, len(idx), t.micro_batch_size)]
            return micro[self.backend.rank * t.grad_accum : (self.backend.rank + 1) * t.grad_accum]
        if lengths is None:
            raise ValueError(f"{self.desc}: train.max_tokens_per_batch needs the examples' lengths")
        plans = []
        for r in range(ws):
            mine = idx[r * share : (r + 1) * share]
            plans.append([[mine[j] for j in b] for b in token_budget_batches([lengths[i] for i in mine], t.max_tokens_per_batch)])
        # every process runs as many micro-batches as the one with most: ZeRO / DDP reduce in each backward
        return split_to_count(plans[self.backend.rank], max(len(p) for p in plans))

    # ------------------------------------------------------------------------------------- setup
    def setup(
        self,
        model: nn.Module,
        *,
        total_steps: int,
        params: list[nn.Parameter] | None = None,
        name: str = "policy",
        train: Any = None,
    ) -> TrainState:
        """Wrap ``model`` for the backend, build its optimizer (``train.optimizer``, a ``_target_``)
        and learning-rate schedule. ``train`` defaults to the engine's; a second model may bring its own
        (e.g. a critic's learning rate). Restoring from a checkpoint is ``restore``'s job."""
        from hydra.utils import instantiate
        from transformers import get_scheduler

        t = train if train is not None else self.train
        params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        optimizer_factory = instantiate(t.optimizer)

        def make_optimizer(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
            return optimizer_factory(ps, lr=t.lr, weight_decay=t.weight_decay)

        # the backend builds the optimizer: sharding backends replace parameters before it may exist
        wrapped, optimizer, evidence = self.backend.prepare(model, params, make_optimizer, t)
        scheduler = get_scheduler(
            str(t.scheduler),
            optimizer,
            num_warmup_steps=int(round(t.warmup_ratio * total_steps)),
            num_training_steps=total_steps,
        )
        self.evidence[name] = evidence
        return TrainState(name, wrapped, optimizer, scheduler, total_steps, evidence)

    def restore(self, states: Sequence[TrainState], *, total: int, unit: str = "step") -> int:
        """Load the newest step checkpoint into ``states`` and say so; returns the position (an optimizer
        step, or a rollout: ``unit``) to continue from, 0 on a fresh start."""
        position, ckpt_dir = self.ckpt.restore(states)
        if ckpt_dir is not None:
            # metrics logged after the checkpoint by the interrupted run are dropped
            self.tracker.restore_history(ckpt_dir)
            self.tracker.log_text(f"{self.desc}: resumed from {unit} {position}/{total} ({ckpt_dir})")
        return position

    # -------------------------------------------------------------------------------- train_step
    def train_step(self, state: TrainState, step: StepFn, batches: Sequence[Batch]) -> dict[str, float] | None:
        """One optimizer step of ``state`` over this process's micro-batches (collated, on any device).

        Each micro-batch's loss is the mean over its ``num_items``; it is rescaled by ``num_items /
        global items of the step`` so any micro-batch x accumulation x process split gives the same
        gradient. Returns the step's metrics, or None when the step was skipped (a non-finite loss, or no
        items anywhere); raises NonFiniteLossError after ``train.max_nonfinite`` consecutive skips.
        """
        t, backend = self.train, self.backend
        state.model.train()
        local_items = sum(float(b["num_items"]) for b in batches)
        global_items = float(backend.all_reduce_sum(torch.tensor(local_items)).item())
        if global_items == 0:  # e.g. every group filtered out: nothing to learn from (all ranks agree)
            return None
        sums: dict[str, float] = {}
        loss_total = torch.zeros((), device=backend.device)
        for j, batch in enumerate(batches):
            batch = _to_device(batch, backend.device)
            self._tokens += _real_tokens(batch)
            with backend.no_sync(state.model, sync=j == len(batches) - 1), backend.autocast(), self._offload():
                out = step(state.model, batch)
                # mean over this micro-batch -> share of the step's global mean; DDP averages
                # gradients over processes, hence the world-size factor.
                scale = float(batch["num_items"]) / max(global_items, 1.0)
                backend.backward(state.model, out.loss * scale * backend.world_size)
            loss_total += out.loss.detach() * scale
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
        step_loss = float(backend.all_reduce_sum(loss_total).item())
        if not math.isfinite(step_loss):
            backend.discard_gradients(state.model, state.optimizer)
            state.nonfinite += 1
            # skipped steps still use up their batches: number them as positions in the schedule
            at = state.step + state.nonfinite
            self.tracker.log_text(f"{self.desc}: {state.name} step {at}: non-finite loss, step skipped")
            if state.nonfinite > t.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self.desc}: {state.nonfinite} consecutive non-finite losses at step {at}; "
                    "lower train.lr or check the data"
                )
            return None
        state.nonfinite = 0
        grad_norm = backend.optimizer_step(state.model, state.optimizer, t.max_grad_norm)
        state.scheduler.step()
        state.step += 1
        return {"loss": step_loss, "lr": state.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), **sums}

    def _offload(self) -> contextlib.AbstractContextManager:
        """``train.offload_activations``: what autograd saves for backward waits in CPU memory."""
        if not self.train.get("offload_activations"):
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=str(self.backend.device).startswith("cuda"))

    def throughput(self, row: dict[str, float], since: float) -> float:
        """Adds ``tokens_per_s`` (tokens trained on since the mark ``since``) to ``row``; returns the
        new mark."""
        now = time.perf_counter()
        row["tokens_per_s"] = self._tokens * self.backend.world_size / max(now - since, 1e-9)
        self._tokens = 0
        return now

    def progress(self, total: int, initial: int) -> tqdm:
        return tqdm(
            total=total,
            initial=initial,
            desc=self.desc,
            disable=not (self.train.progress and self.backend.is_main),
            dynamic_ncols=True,
        )

    # ---------------------------------------------------------------------------------------- fit
    def fit(
        self,
        step: StepFn,
        *,
        model: nn.Module,
        train_data: Sequence[dict],
        collate: Callable[[list[dict]], Batch],
        eval_data: Sequence[dict] | None = None,
        eval_step: StepFn | None = None,
        params: list[nn.Parameter] | None = None,
        length: Callable[[dict], int] | None = None,
    ) -> FitResult:
        """Offline training: ``step`` over ``train_data`` for the configured epochs / steps.

        ``step(model, batch)`` gets the backend-wrapped model (DDP hooks run only when the wrapper is
        called) and a batch already on the device. ``length(example)``: the tokens an example adds to a
        padded batch, needed by ``train.max_tokens_per_batch``.
        """
        t = self.train
        if not train_data:
            raise ValueError(f"{self.desc}: the train split is empty; nothing to train on")
        steps_per_epoch, total = self._plan(len(train_data))
        state = self.setup(model, total_steps=total, params=params)
        self.model = state.model
        start = self.restore([state], total=total)
        result = FitResult(steps=total, resumed_from=start)

        lengths = [length(row) for row in train_data] if length is not None and t.max_tokens_per_batch else None
        bar = self.progress(total, start)
        mark = time.perf_counter()
        for s in range(start, total):
            plan = self._step_batches(len(train_data), s, steps_per_epoch, lengths)
            batches = [collate([train_data[i] for i in mb]) for mb in plan]
            row = self.train_step(state, step, batches)
            if row is None:
                continue
            bar.update(1)
            done = s + 1
            if done % t.log_every == 0 or done == total:
                mark = self.throughput(row, mark)
                self.tracker.log(row, step=done)
                result.metrics.update(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if eval_data and eval_step and t.eval_every > 0 and done % t.eval_every == 0 and done < total:
                self.tracker.log(self.evaluate(eval_step, eval_data, collate), step=done)
            if t.save_every > 0 and done % t.save_every == 0 and done < total:
                self.ckpt.save(done, [state], history=self.tracker.path)
        bar.close()
        if eval_data and eval_step:
            final = self.evaluate(eval_step, eval_data, collate)
            self.tracker.log(final, step=total)
            result.metrics.update(final)
        return result

    @torch.no_grad()
    def evaluate(
        self, eval_step: StepFn, data: Sequence[dict], collate: Callable, model: nn.Module | None = None
    ) -> dict[str, float]:
        """Item-weighted mean of ``eval_step``'s loss and metrics over ``data`` (this process's share)."""
        model = model if model is not None else self.model
        model.eval()
        mb = self.train.micro_batch_size
        shard = list(range(self.backend.rank, len(data), self.backend.world_size))
        totals: dict[str, float] = {}
        items = 0.0
        for i in range(0, len(shard), mb):
            batch = _to_device(collate([data[j] for j in shard[i : i + mb]]), self.backend.device)
            out = eval_step(model, batch)
            w = float(batch["num_items"])
            items += w
            for k, v in {"loss": out.loss, **out.metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * w
        keys = sorted(totals)
        vec = self.backend.all_reduce_sum(torch.tensor([totals[k] for k in keys] + [items], dtype=torch.float64))
        return {f"eval/{k}": float(v / max(float(vec[-1]), 1e-12)) for k, v in zip(keys, vec[:-1].tolist())}
