"""Step checkpoints for exact resume: model, optimizer, scheduler and every RNG state.

A checkpoint is written into ``step-N.tmp`` and renamed to ``step-N`` when complete, so a process
killed mid-write leaves only a ``.tmp`` folder that restore ignores. The data position needs no state:
the engine rebuilds any step's batches from (seed, step).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


class CheckpointManager:
    def __init__(self, root: Path, *, keep_last: int, backend: Any):
        self.root = Path(root)
        self.keep_last = max(1, keep_last)
        self.backend = backend

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.glob("step-*") if not p.name.endswith(".tmp") and (p / "state.pt").exists()]
        return sorted(int(p.name.split("-")[1]) for p in done)

    def save(self, step: int, model: torch.nn.Module, optimizer, scheduler) -> None:
        """Every process saves its own RNG state; rank 0 writes model/optimizer (replicated under DDP)."""
        rank = self.backend.rank
        final = self.root / f"step-{step}"
        tmp = self.root / f"step-{step}.tmp"
        if self.backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.backend.barrier()
        torch.save({"rng": _rng_state()}, tmp / f"rng-{rank}.pt")
        if self.backend.is_main:
            trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
            torch.save(
                {
                    "step": step,
                    "model": trainable,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                },
                tmp / "state.pt",
            )
        self.backend.barrier()
        if self.backend.is_main:
            tmp.rename(final)
            for old in self.steps()[: -self.keep_last]:
                shutil.rmtree(self.root / f"step-{old}", ignore_errors=True)
        self.backend.barrier()

    def restore(self, model: torch.nn.Module, optimizer, scheduler) -> int:
        """Load the newest complete checkpoint, if any; returns the step to continue from (0 = fresh)."""
        steps = self.steps()
        if not steps:
            return 0
        d = self.root / f"step-{steps[-1]}"
        state = torch.load(d / "state.pt", map_location="cpu", weights_only=False)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["model"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = d / f"rng-{self.backend.rank}.pt"
        if rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False)["rng"])
        return int(state["step"])
