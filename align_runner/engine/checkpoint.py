"""Step checkpoints for exact resume: model, optimizer, scheduler, every RNG state and the metrics so far.

A checkpoint is written into ``step-N.tmp`` and renamed to ``step-N`` when every process has finished
writing, so a process killed mid-write leaves only a ``.tmp`` folder that restore ignores (and the next
save deletes). Model and optimizer state go through the backend (engine/backend.py: one replicated file,
or one part per rank for sharding backends). The data position needs no state: the engine rebuilds any
step's batches from (seed, step).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align_runner.engine.trackers import HISTORY

META = "meta.pt"
RNG = "rng.pt"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU) so a stage's random draws repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """``<root>/step-N/``: ``meta.pt`` (position, each model's scheduler and step count), ``rng.pt`` (every rank's RNG states), ``metrics.jsonl`` and, per trained model, a
    folder of the backend's model/optimizer files. Keeps the newest ``keep_last``."""

    def __init__(self, root: Path, *, keep_last: int, backend: Any):
        self.root = Path(root)
        self.keep_last = max(1, keep_last)
        self.backend = backend

    def steps(self) -> list[int]:
        """Steps of complete checkpoints, oldest first (``.tmp`` folders are unfinished writes)."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.glob("step-*") if not p.name.endswith(".tmp") and (p / META).exists()]
        return sorted(int(p.name.split("-")[1]) for p in done)

    def save(self, step: int, states: Sequence[Any], *, history: Path | None = None) -> None:
        """Collective. ``step`` is the position to continue from (an optimizer step, or an online
        iteration); ``states`` are the stage's ``TrainState``s, each written to its own folder. The main
        process writes all but sharded model/optimizer state, which the backend has every rank write
        its own part of."""
        final = self.root / f"step-{step}"
        tmp = self.root / f"step-{step}.tmp"
        if self.backend.is_main:
            for stale in self.root.glob("step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
            for state in states:
                (tmp / state.name).mkdir()
        self.backend.barrier()
        for state in states:
            self.backend.save_train_state(tmp / state.name, state.model, state.optimizer)
        # every rank's RNG, written by the main process (only sharded model state needs every rank to write)
        rngs = self.backend.gather_object(rng_state())
        if self.backend.is_main:
            torch.save({"rng": rngs}, tmp / RNG)
            if history is not None and Path(history).exists():
                shutil.copyfile(history, tmp / HISTORY)
            meta = {
                "step": step,
                "states": {s.name: {"scheduler": s.scheduler.state_dict(), "step": s.step} for s in states},
            }
            torch.save(meta, tmp / META)
        self.backend.barrier()
        if self.backend.is_main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.steps()[: -self.keep_last]:
                shutil.rmtree(self.root / f"step-{old}", ignore_errors=True)
        self.backend.barrier()

    def restore(self, states: Sequence[Any]) -> tuple[int, Path | None]:
        """Load the newest complete checkpoint into ``states``, if any: (position to continue from, its
        folder). (0, None) means a fresh start. Every process reads the same folder (the main process
        decides)."""
        steps = self.backend.broadcast_object(self.steps())
        if not steps:
            return 0, None
        d = self.root / f"step-{steps[-1]}"
        meta = torch.load(d / META, map_location="cpu", weights_only=False)
        for state in states:
            self.backend.load_train_state(d / state.name, state.model, state.optimizer)
            state.scheduler.load_state_dict(meta["states"][state.name]["scheduler"])
            state.step = int(meta["states"][state.name]["step"])
        set_rng_state(torch.load(d / RNG, weights_only=False)["rng"][self.backend.rank])
        return int(meta["step"]), d
