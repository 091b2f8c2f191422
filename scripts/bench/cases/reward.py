"""reward: a scalar reward model (score head on the backbone, Bradley-Terry loss) on preference pairs.

pairs/s = the epoch's pairs / training seconds. TRL: RewardTrainer / RewardConfig; align_runner:
``algorithm=reward``. Both score the last real token of prompt + chosen and prompt + rejected; no LM head.
"""

from __future__ import annotations

import argparse

from common import Case, read_jsonl

from cases import offline, preference


def settings(args: argparse.Namespace) -> dict:
    s = offline.settings(args, rows=16, quick_rows=16, unit_rows="preference pairs (explicit prompt)")
    offline.check_rows(s)
    s["loss"] = "Bradley-Terry, -log sigmoid(r_chosen - r_rejected), no centering"
    s["logits"] = "none: a score head (hidden x 1) at every position, read at the last real token"
    return s


def trl_worker(spec: dict) -> dict:
    import datasets
    from trl import RewardConfig, RewardTrainer

    trainer = RewardTrainer(
        model=spec["model_dir"],
        args=offline.trl_args(RewardConfig, spec),
        train_dataset=datasets.Dataset.from_list(read_jsonl(spec["data_file"])),
    )
    return {**offline.trl_train(trainer), "units": spec["settings"]["rows"]}


def align_runner_worker(spec: dict) -> dict:
    out = offline.run_align_runner(spec, "reward", [], load_fresh=lambda: _classifier(spec))
    return {**out, "units": spec["settings"]["rows"]}


def _classifier(spec: dict):
    """The input model as the reward stage loads it: its score head seeded as the stage seeds it."""
    import torch

    from align_runner.models.loading import load_sequence_classifier

    torch.manual_seed(int(spec["settings"]["seed"]))
    return load_sequence_classifier(spec["model_dir"], dtype=torch.float32)


CASE = Case(
    unit="pairs",
    settings=settings,
    prepare=preference.prepare,
    workers={"trl": trl_worker, "align_runner": align_runner_worker},
)
