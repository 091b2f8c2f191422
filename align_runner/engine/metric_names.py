"""The metric names the engine reports by itself, for stage kinds declaring what they produce
(``register_stage(metrics=...)``), so that ``pipeline.objective`` is checked before anything runs.

An offline stage reports the engine's per-step names, its loss's metrics and their held-out means
(``eval/<name>``, with an eval split); an online stage reports the per-step names, its rollouts'
metrics and the loop's timings.
"""

from __future__ import annotations

# Engine.train_step's own names (engine/loop.py) and Engine.throughput's
STEP = ("loss", "lr", "grad_norm", "tokens_per_s")
# fit_online's seconds per rollout (engine/online.py)
ONLINE = ("time/rollout", "time/update")


def offline(*loss_metrics: str) -> tuple[str, ...]:
    """What ``Engine.fit`` reports for a loss whose metrics are ``loss_metrics``."""
    return (*STEP, *loss_metrics, "eval/loss", *(f"eval/{m}" for m in loss_metrics))


def online(*metrics: str) -> tuple[str, ...]:
    """What ``fit_online`` reports for rollouts and updates whose metrics are ``metrics``."""
    return (*STEP, *ONLINE, *metrics)
