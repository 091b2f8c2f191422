"""dpo: direct preference optimisation (sigmoid loss, beta 0.1) on preference pairs, no SFT before it.

pairs/s = the epoch's pairs / seconds, the reference pass counted on both sides: TRL's DPOTrainer
(default ``precompute_ref_log_probs=False``) runs the reference model's forward inside every step, so
``trainer.train()`` includes it; align_runner computes the reference log-probs once in its own
``ref_logps`` stage (pipeline=auto inserts it before dpo), so its seconds are that computation's plus
the dpo stage's ``fit``: the reference pass amortised over the epoch.

dpo: both sides' defaults, padded batches of 8 pairs. dpo_packed: align_runner ``train.packing=true``
(each pair packed as prompt + chosen + rejected, its prompt computed once, into rows of max_length, in
the reference pass and in training) against the same TRL run: TRL 1.16's ``padding_free`` for DPO
falls back to padding ("temporarily unavailable", and FlashAttention-only).
"""

from __future__ import annotations

import argparse

from common import Case, read_jsonl
from measure import patch_timer

from cases import offline, preference


def settings(args: argparse.Namespace, packing: bool = False) -> dict:
    s = offline.settings(args, rows=16, quick_rows=16, unit_rows="preference pairs (explicit prompt)")
    offline.check_rows(s)
    s["packing"] = packing
    if packing:
        s["trl_batch"] = "8 padded pairs per step (DPOTrainer's padding_free falls back to padding in TRL 1.16)"
        s["align_runner_batch"] = (
            "8 pairs per step and per reference batch, each packed as prompt + chosen + rejected into rows "
            "of max_length (train.packing=true)"
        )
    s["loss"] = "sigmoid DPO, beta 0.1, no label smoothing"
    s["reference"] = (
        "TRL: a second model's forward in every step; align_runner: the ref_logps stage once "
        "(batches of 8 pairs), timed and added"
    )
    s["logits"] = "both sides run the LM head on response positions only (TRL's fused LM head, align_runner's counted-token head)"
    return s


def trl_worker(spec: dict) -> dict:
    import datasets
    from trl import DPOConfig, DPOTrainer

    trainer = DPOTrainer(
        model=spec["model_dir"],
        args=offline.trl_args(DPOConfig, spec, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=False),
        train_dataset=datasets.Dataset.from_list(read_jsonl(spec["data_file"])),
    )
    return {**offline.trl_train(trainer), "units": spec["settings"]["rows"]}


def align_runner_worker(spec: dict) -> dict:
    import align_runner.stages.ref_logps as ref_stage

    reference = patch_timer(ref_stage, "compute_reference_logps")
    packing = ["train.packing=true"] if spec["settings"]["packing"] else []  # the reference pass's too
    out = offline.run_align_runner(
        spec,
        "dpo",
        ["algorithm.loss.beta=0.1", f"algorithm.reference.batch_size={spec['settings']['batch']}", *packing],
        stages=("ref_logps",),
        load_fresh=lambda: offline.causal_lm(spec["model_dir"]),
    )
    if not reference:
        raise RuntimeError("the ref_logps stage did not call compute_reference_logps: the reference pass was not timed")
    # the reference forward over the same sequences, the LM head on the same response positions (packed:
    # the same pairs, in batches of 8 taken in order rather than shuffled, so about the same work)
    out["flops"] *= 1 + 1 / 3
    out["fit_seconds"] = out["seconds"]
    out["reference_seconds"] = sum(reference)
    out["seconds"] += out["reference_seconds"]
    out["timed"] = "compute_reference_logps of the ref_logps stage + Engine.fit of the dpo stage"
    return {**out, "units": spec["settings"]["rows"]}


WORKERS = {"trl": trl_worker, "align_runner": align_runner_worker}
CASE = Case(unit="pairs", settings=settings, prepare=preference.prepare, workers=WORKERS)
PACKED = Case(unit="pairs", settings=lambda a: settings(a, packing=True), prepare=preference.prepare, workers=WORKERS)
