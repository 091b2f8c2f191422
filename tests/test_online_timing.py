"""fit_online's time split: each rollout row has the seconds spent making the rollout (time/rollout)
and in the optimizer steps of every model (time/update), each charged to its own phase."""

from __future__ import annotations

import time

import torch
from omegaconf import OmegaConf

from align_runner.algos.types import LossOutput
from align_runner.config import HardwareConfig, TrainConfig
from align_runner.engine.backend import get_backend
from align_runner.engine.loop import Engine
from align_runner.engine.online import Rollout, Update, fit_online, timed
from align_runner.engine.trackers import Tracker, read_metrics

ROLLOUT_S, STEP_S = 0.5, 0.05


def test_rollout_and_update_seconds_are_charged_to_their_phase(tmp_path):
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"lr": 1e-2, "progress": False})
    backend = get_backend(OmegaConf.structured(HardwareConfig(name="cpu")))
    engine = Engine(cfg, backend, out_dir=tmp_path, seed=0, tracker=Tracker(tmp_path, stage="t", enabled=True))
    states = [engine.setup(torch.nn.Linear(3, 1), total_steps=8, name=n) for n in ("policy", "critic")]

    def loss(m, batch):
        time.sleep(STEP_S)
        return LossOutput(((m(batch["x"]) - batch["y"]) ** 2).mean(), {})

    def rollout(i):
        time.sleep(ROLLOUT_S)
        x = torch.ones(4, 3)
        return Rollout([[{"x": x, "y": x.sum(1, keepdim=True), "num_items": 4}]] * 2)

    fit_online(engine, updates=[Update(s, loss) for s in states], rollouts=2, make_rollout=rollout)
    for r in read_metrics(tmp_path / "metrics.jsonl"):
        # 2 steps x 2 models, one micro-batch each: 4 sleeps of STEP_S in the updates, none in the rollout
        assert ROLLOUT_S <= r["time/rollout"] < ROLLOUT_S + 4 * STEP_S, r
        assert 4 * STEP_S <= r["time/update"] < ROLLOUT_S, r


def test_timed_adds_up_repeated_blocks():
    times = {"time/values": 1.0}
    for _ in range(2):
        with timed(times, "time/values"):
            time.sleep(STEP_S)
    assert 1.0 + 2 * STEP_S <= times["time/values"] < 1.0 + ROLLOUT_S
