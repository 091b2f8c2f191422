"""The one training loop every stage runs on.

A stage hands ``Engine.fit`` a ``step(model, batch) -> LossOutput`` whose loss is the mean over the
micro-batch's ``num_items`` (tokens for SFT, pairs for DPO/reward). The engine rescales it by
``num_items / global items of the optimizer step`` so that any micro-batch x accumulation x process
split of the same examples gives the same gradient (DESIGN §6).
"""

from __future__ import annotations

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

    # ----------------------------------------------------------------------------------- schedule
    def _plan(self, n: int) -> tuple[int, int]:
        t = self.train
        global_batch = t.micro_batch_size * t.grad_accum * self.backend.world_size
        steps_per_epoch = max(1, math.ceil(n / global_batch))
        total = t.max_steps if t.max_steps > 0 else max(1, round(steps_per_epoch * t.epochs))
        return steps_per_epoch, total

    def _step_batches(self, n: int, step: int, steps_per_epoch: int) -> list[list[int]]:
        """This process's micro-batches (lists of example indices) for optimizer step ``step``."""
        t, ws = self.train, self.backend.world_size
        epoch, pos = divmod(step, steps_per_epoch)
        idx = schedule_indices(n, t.micro_batch_size * t.grad_accum * ws, epoch, self.seed)[pos]
        micro = [idx[i : i + t.micro_batch_size] for i in range(0, len(idx), t.micro_batch_size)]
        return micro[self.backend.rank * t.grad_accum : (self.backend.rank + 1) * t.grad_accum]

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
    ) -> FitResult:
        """Train ``model`` with ``step`` over ``train_data``; returns the final metrics.

        ``step(model, batch)`` gets the backend-wrapped model (DDP hooks run only when the wrapper is
        called) and a batch already on the device.
        """
        from transformers import get_scheduler

        t = self.train
        if not train_data:
            raise ValueError(f"{self.desc}: the train split is empty; nothing to train on")
        steps_per_epoch, total = self._plan(len(train_data))
        params = params if params is not None else [p for p in model.parameters() if p.requires_grad]

        def make_optimizer(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
            return torch.optim.AdamW(
                ps, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay
            )

        # the backend builds the optimizer: sharding backends replace parameters before it may exist
        self.model, optimizer = self.backend.prepare(model, params, make_optimizer, t)
        scheduler = get_scheduler(
            str(t.scheduler),
            optimizer,
            num_warmup_steps=int(round(t.warmup_ratio * total)),
            num_training_steps=total,
        )
        start, ckpt_dir = self.ckpt.restore(self.model, optimizer, scheduler)
        result = FitResult(steps=total, resumed_from=start)
        if ckpt_dir is not None:
            # metrics logged after the checkpoint by the interrupted run are dropped
            self.tracker.restore_history(ckpt_dir)
            self.tracker.log_text(f"{self.desc}: resumed from step {start}/{total} ({ckpt_dir})")

        bar = tqdm(
            total=total,
            initial=start,
            desc=self.desc,
            disable=not (t.progress and self.backend.is_main),
            dynamic_ncols=True,
        )
        nonfinite = 0
        t_last, tokens_since = time.perf_counter(), 0
        for s in range(start, total):
            self.model.train()
            batches = [collate([train_data[i] for i in mb]) for mb in self._step_batches(len(train_data), s, steps_per_epoch)]
            local_items = sum(float(b["num_items"]) for b in batches)
            global_items = float(self.backend.all_reduce_sum(torch.tensor(local_items)).item())
            sums: dict[str, float] = {}
            loss_total = torch.zeros((), device=self.backend.device)
            for j, batch in enumerate(batches):
                batch = _to_device(batch, self.backend.device)
                tokens_since += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                with self.backend.no_sync(self.model, sync=j == len(batches) - 1), self.backend.autocast():
                    out = step(self.model, batch)
                    # mean over this micro-batch -> share of the step's global mean; DDP averages
                    # gradients over processes, hence the world-size factor.
                    scale = float(batch["num_items"]) / max(global_items, 1.0)
                    loss = out.loss * scale * self.backend.world_size
                    self.backend.backward(loss)
                loss_total += out.loss.detach() * scale
                for k, v in out.metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
            step_loss = float(self.backend.all_reduce_sum(loss_total).item())
            if not math.isfinite(step_loss):
                nonfinite += 1
                self.backend.discard_gradients(self.model, optimizer)
                self.tracker.log_text(f"{self.desc}: step {s + 1}: non-finite loss, step skipped")
                if nonfinite > t.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{self.desc}: {nonfinite} consecutive non-finite losses at step {s + 1}; "
                        "lower train.lr or check the data"
                    )
                continue
            nonfinite = 0
            grad_norm = self.backend.optimizer_step(self.model, optimizer, t.max_grad_norm)
            scheduler.step()
            bar.update(1)

            done = s + 1
            if done % t.log_every == 0 or done == total:
                now = time.perf_counter()
                row = {"loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
                row["tokens_per_s"] = tokens_since * self.backend.world_size / max(now - t_last, 1e-9)
                row.update(sums)
                t_last, tokens_since = now, 0
                self.tracker.log(row, step=done)
                result.metrics.update(row)
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if eval_data and eval_step and t.eval_every > 0 and done % t.eval_every == 0 and done < total:
                self.tracker.log(self.evaluate(eval_step, eval_data, collate), step=done)
            if t.save_every > 0 and done % t.save_every == 0 and done < total:
                self.ckpt.save(done, self.model, optimizer, scheduler, history=self.tracker.path)
        bar.close()
        if eval_data and eval_step:
            final = self.evaluate(eval_step, eval_data, collate)
            self.tracker.log(final, step=total)
            result.metrics.update(final)
        return result

    @torch.no_grad()
    def evaluate(self, eval_step: StepFn, data: Sequence[dict], collate: Callable) -> dict[str, float]:
        """Item-weighted mean of ``eval_step``'s loss and metrics over ``data`` (this process's share)."""
        self.model.eval()
        mb = self.train.micro_batch_size
        shard = list(range(self.backend.rank, len(data), self.backend.world_size))
        totals: dict[str, float] = {}
        items = 0.0
        for i in range(0, len(shard), mb):
            batch = _to_device(collate([data[j] for j in shard[i : i + mb]]), self.backend.device)
            out = eval_step(self.model, batch)
            w = float(batch["num_items"])
            items += w
            for k, v in {"loss": out.loss, **out.metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * w
        keys = sorted(totals)
        vec = self.backend.all_reduce_sum(torch.tensor([totals[k] for k in keys] + [items], dtype=torch.float64))
        return {f"eval/{k}": float(v / max(float(vec[-1]), 1e-12)) for k, v in zip(keys, vec[:-1].tolist())}
