"""Trains two tiny models in one online loop under a hardware profile (run by torchrun, or alone for the
1-process reference): ``python two_models_worker.py <profile> <out_dir> <model_cache>``. Rank 0 writes
both models' full weights and the backend's evidence for each to ``out_dir``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from align_runner import api
from align_runner.algos.sft import sft_loss
from align_runner.data.collate import collate_sft
from align_runner.engine.backend import get_backend
from align_runner.engine.loop import Engine
from align_runner.engine.online import Rollout, Update, fit_online
from align_runner.engine.trackers import Tracker
from align_runner.models.loading import load_causal_lm
from align_runner.models.tiny import build_tiny


def main(profile: str, out: Path, cache: str) -> None:
    torch.set_num_threads(1)
    cfg = api.compose(["model=tiny", f"hardware={profile}", f"paths.cache={cache}", "train.lr=1e-3", "train.progress=false"])
    backend = get_backend(cfg.hardware)
    engine = Engine(cfg.train, backend, out_dir=out, seed=0, tracker=Tracker(out, stage="two", enabled=backend.is_main))
    with backend.main_first():  # one process builds the cached model, the others then read it
        path = build_tiny(cache)
    states = []
    # the second model brings its own train settings: nothing is shared between the two
    for name, lr in (("policy", 1e-3), ("critic", 3e-3)):
        torch.manual_seed(0)
        train = OmegaConf.merge(cfg.train, {"lr": lr})
        states.append(engine.setup(load_causal_lm(path), total_steps=6, name=name, train=train))

    def step(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sft_loss(logits, batch["labels"])

    def rollout(i: int) -> Rollout:
        g = torch.Generator().manual_seed(i)
        rows = [{"input_ids": torch.randint(3, 500, (6 + j,), generator=g).tolist(), "loss_mask": [0, 0] + [1] * (4 + j)} for j in range(8)]
        # the same two micro-batches of 4 rows per step: one per process, or both accumulated on one
        halves = [collate_sft(rows[h::2], pad_id=0) for h in range(2)]
        return Rollout([halves[backend.rank :: backend.world_size]], {})

    fit_online(engine, updates=[Update(s, step) for s in states], rollouts=3, make_rollout=rollout, epochs=2)
    weights = {s.name: backend.full_state_dict(s.model) for s in states}
    if backend.is_main:
        assert not torch.equal(weights["policy"]["lm_head.weight"], weights["critic"]["lm_head.weight"])
        out.mkdir(parents=True, exist_ok=True)
        for name, state in weights.items():
            torch.save(state, out / f"{name}.pt")
        (out / "evidence.json").write_text(json.dumps(engine.evidence))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
