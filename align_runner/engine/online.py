"""The online loop: rollout -> score -> experience -> updates, repeated (GRPO, and PPO next).

``fit_online`` knows no algorithm. The stage hands it ``make_rollout(i)``, which samples with the
current policy, scores, and returns this process's micro-batches for each optimizer step of rollout
``i``, and the ``updates`` to apply to each step's batches (a policy, and later a critic, each a
``TrainState`` with its own step function). Checkpoints fall on rollout boundaries: a rerun after a kill
restores every model, optimizer, scheduler and RNG state and continues with the next rollout, whose
prompts and sampling seeds are functions of (seed, rollout index), so the resumed run is the
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from align_runner.engine.loop import Batch, Engine, FitResult, StepFn, TrainState

# sample completions of every rollout, one JSON object a line, in the stage's output dir
ROLLOUTS_FILE = "rollouts.jsonl"


@contextlib.contextmanager
def timed(times: dict[str, float], key: str) -> Iterator[None]:
    """Adds the wall seconds the block takes to ``times[key]``.

    perf_counter only, no device synchronize: every rollout phase ends by copying its result to the
    CPU (token ids, scores, log-probs, values) and every ``Engine.train_step`` by reading its loss and
    gradient norm, and those copies wait for the device's queued work, so each phase's time is its own
    on CUDA too.
    """
    start = time.perf_counter()
    try:
        yield
    finally:
        times[key] = times.get(key, 0.0) + time.perf_counter() - start


@dataclass
class Rollout:
    """What one rollout gives the updates."""

    # this process's micro-batches for each optimizer step of the rollout
    steps: list[list[Batch]]
    # rollout-level metrics (rewards, completion lengths ...), already global
    metrics: dict[str, float] = field(default_factory=dict)
    # a few completions (prompt, completion, reward ...) appended to ROLLOUTS_FILE for the report
    samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Update:
    """One trained model and the step function its loss comes from."""

    state: TrainState
    step: StepFn


def fit_online(
    engine: Engine,
    *,
    updates: Sequence[Update],
    rollouts: int,
    make_rollout: Callable[[int], Rollout],
    epochs: int = 1,
) -> FitResult:
    """Run ``rollouts`` rollouts; each is passed over ``epochs`` times (GRPO's mu), every optimizer step
    updating each model of ``updates`` in turn. Logs one row per rollout (its metrics plus the mean of
    the steps' metrics, the first model's unprefixed and the others' bare names under ``<name>/``), and
    the seconds it spent in ``make_rollout`` (``time/rollout``) and in the optimizer steps of every model
    (``time/update``), this process's."""
    t = engine.train
    states = [u.state for u in updates]
    start = engine.restore(states, total=rollouts, unit="rollout")
    result = FitResult(steps=rollouts, resumed_from=start)
    bar = engine.progress(rollouts, start)
    mark = time.perf_counter()
    for i in range(start, rollouts):
        times: dict[str, float] = {}
        with timed(times, "time/rollout"):
            rollout = make_rollout(i)
        with timed(times, "time/update"):
            step_means = _update(engine, updates, rollout, epochs)
        done = i + 1
        row = {**rollout.metrics, **step_means, **times}
        mark = engine.throughput(row, mark)
        if done % t.log_every == 0 or done == rollouts:
            engine.tracker.log(row, step=done)
        result.metrics.update(row)
        _write_samples(engine, done, rollout.samples, first=i == start)
        bar.update(1)
        bar.set_postfix(reward=f"{row.get('reward', float('nan')):.3f}")
        if t.save_every > 0 and done % t.save_every == 0 and done < rollouts:
            engine.ckpt.save(done, states, history=engine.tracker.path)
    bar.close()
    return result


def _update(engine: Engine, updates: Sequence[Update], rollout: Rollout, epochs: int) -> dict[str, float]:
    """Every optimizer step of one rollout, each model in turn; the mean of the steps' metrics."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for _ in range(epochs):
        for batches in rollout.steps:
            for n, u in enumerate(updates):
                row = engine.train_step(u.state, u.step, batches)
                for k, v in (row or {}).items():
                    # a later model's bare names (the engine's loss, lr, grad_norm) would clash with the
                    # first's; a name with a group of its own (PPO's val/clipfrac_avg) is kept as is
                    name = k if n == 0 or "/" in k else f"{u.state.name}/{k}"
                    sums[name] = sums.get(name, 0.0) + v
                    counts[name] = counts.get(name, 0) + 1
    return {k: v / counts[k] for k, v in sums.items()}


def _write_samples(engine: Engine, rollout: int, samples: list[dict[str, Any]], *, first: bool) -> None:
    """Append a rollout's samples. The first rollout this run computes drops what an earlier,
    interrupted attempt wrote from that rollout on (all of it on a fresh start)."""
    if not engine.backend.is_main:
        return
    path = engine.out_dir / ROLLOUTS_FILE
    if first:
        old = path.read_text().splitlines() if path.exists() else []
        path.write_text("".join(line + "\n" for line in old if json.loads(line).get("rollout", 0) < rollout))
    with path.open("a") as f:
        f.writelines(json.dumps({"rollout": rollout, **s}) + "\n" for s in samples)
