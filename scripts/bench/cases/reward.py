"""reward: a scalar reward model (score head on the backbone, Bradley-Terry loss) on preference pairs.

pairs/s = the epoch's pairs / training seconds. TRL: RewardTrainer / RewardConfig; align_runner:
``algorithm=reward``. Both score the last real token of prompt + chosen and prompt + rejected; no LM head.

reward: both sides' defaults, padded batches of 8 pairs. reward_packed: align_runner
``train.packing=true`` (each pair packed as prompt + chosen + rejected, its prompt computed once, into
rows of max_length) against the same TRL run: TRL's RewardTrainer has no padding-free or packing mode.
"""

from __future__ import annotations

import argparse

from common import Case, read_jsonl

from cases import offline, preference


def settings(args: argparse.Namespace, packing: bool = False) -> dict:
    s = offline.settings(args, rows=16, quick_rows=16, unit_rows="preference pairs (explicit prompt)")
    offline.check_rows(s)
    s["packing"] = packing
    if packing:
        s["trl_batch"] = "8 padded pairs per step (RewardTrainer has no padding-free mode)"
        s["align_runner_batch"] = "8 pairs per step, each packed as prompt + chosen + rejected into rows of max_length (train.packing=true)"
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
    packing = ["algorithm.train.packing=true"] if spec["settings"]["packing"] else []
    # a score head, no LM head: no logit FLOPs
    out = offline.run_align_runner(spec, "reward", packing, load_fresh=lambda: _classifier(spec), lm_head=False)
    return {**out, "units": spec["settings"]["rows"]}


def _classifier(spec: dict):
    """The input model as the reward stage loads it: its score head seeded as the stage seeds it."""
    import torch

    from align_runner.models.loading import load_sequence_classifier

    torch.manual_seed(int(spec["settings"]["seed"]))
    return load_sequence_classifier(spec["model_dir"], dtype=torch.float32)


WORKERS = {"trl": trl_worker, "align_runner": align_runner_worker}
CASE = Case(unit="pairs", settings=settings, prepare=preference.prepare, workers=WORKERS)
PACKED = Case(unit="pairs", settings=lambda a: settings(a, packing=True), prepare=preference.prepare, workers=WORKERS)
