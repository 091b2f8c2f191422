"""sft and sft_packed: supervised fine-tuning on prompt-completion chat rows, loss on the completion.

tokens/s = every real (non-pad) token of the epoch's rows, prompt and completion, rendered by the chat
template (the same total on both sides) / training seconds.

sft: TRL's default (padded batches of 8 rows, completion-only loss) vs align_runner's (padded).
sft_packed: TRL ``packing=True`` (its default strategy, best-fit decreasing into rows of max_length,
padding-free: a batch of 8 packed rows flattened into one sequence) vs align_runner
``train.packing=true`` (each step's rows packed best-fit decreasing into rows of max_length), with as
many rows per optimizer step as TRL's packed batches hold on average (the same token budget per step).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from common import Case, read_jsonl, write_jsonl

from cases import offline


def _settings(args: argparse.Namespace, packing: bool) -> dict:
    s = offline.settings(args, rows=32, quick_rows=16, unit_rows="prompt-completion chat rows")
    offline.check_rows(s)
    s["packing"] = packing
    s["loss"] = "cross-entropy on completion tokens (TRL completion_only_loss default; align_runner sft_loss)"
    s["logits"] = "both sides run the LM head on completion positions only (TRL's fused LM head, align_runner's counted-token head)"
    s["tokens_counted"] = "all real tokens of prompt + completion as rendered by the chat template"
    if packing:
        s["trl_batch"] = "8 packed rows of <= max_length tokens per step (packing_strategy=bfd, padding-free)"
        s["align_runner_batch"] = (
            "rows per step chosen so the epoch has as many optimizer steps as TRL's (see data.packed), "
            "packed best-fit decreasing into rows of max_length (train.packing=true)"
        )
    return s


def prepare(spec: dict) -> dict:
    """The chat rows (data.jsonl) and their token counts; for packing, TRL's packed rows per epoch
    and the rows per align_runner step that match its step count."""
    import chat_data
    from transformers import AutoTokenizer

    from align_runner.data.pack import best_fit_decreasing

    s = spec["settings"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows, lengths = chat_data.sft_rows(tokenizer, s["rows"], *s["row_tokens"], seed=s["seed"])
    data_file = Path(spec["workdir"]) / "data.jsonl"
    write_jsonl(data_file, rows)
    data = chat_data.length_stats(lengths)
    if s["packing"]:
        bins = len(best_fit_decreasing(lengths, s["max_length"]))
        steps = math.ceil(bins / s["batch"])
        divisors = [d for d in range(1, s["rows"] + 1) if s["rows"] % d == 0]
        per_step = min(divisors, key=lambda d: (abs(d - s["rows"] / steps), -d))
        data["packed"] = {"trl_packed_rows": bins, "trl_steps": steps, "align_runner_rows_per_step": per_step}
    return {"data_file": str(data_file), "data": data}


def trl_worker(spec: dict) -> dict:
    import datasets
    from trl import SFTConfig, SFTTrainer

    s = spec["settings"]
    trainer = SFTTrainer(
        model=spec["model_dir"],
        args=offline.trl_args(SFTConfig, spec, packing=s["packing"]),
        train_dataset=datasets.Dataset.from_list(read_jsonl(spec["data_file"])),
    )
    return {**offline.trl_train(trainer), "units": spec["data"]["tokens"]}


def align_runner_worker(spec: dict) -> dict:
    s = spec["settings"]
    packed = spec["data"].get("packed")
    out = offline.run_align_runner(
        spec,
        "sft",
        ["algorithm.train.packing=true"] if s["packing"] else [],
        micro_batch=packed["align_runner_rows_per_step"] if packed else None,
        load_fresh=lambda: offline.causal_lm(spec["model_dir"]),
    )
    return {**out, "units": spec["data"]["tokens"]}


WORKERS = {"trl": trl_worker, "align_runner": align_runner_worker}
SFT = Case(unit="tokens", settings=lambda a: _settings(a, False), prepare=prepare, workers=WORKERS)
SFT_PACKED = Case(unit="tokens", settings=lambda a: _settings(a, True), prepare=prepare, workers=WORKERS)
