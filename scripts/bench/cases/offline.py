"""What the offline cases (sft, sft_packed, reward, dpo) share: their settings, TRL's training
arguments for them, and the align_runner worker that runs one stage and measures it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import is_cuda, peak_memory, read_jsonl
from measure import FLOP_FORMULA, EngineRecorder, batch_tokens, steps_flops

# rendered tokens of a row (prompt + completion, or prompt + one response), both ends included
ROW_TOKENS = (20, 400)
# what each device trains in, on both sides: fp32 on the CPU (no native bf16 there); on a GPU bf16
# autocast over fp32 master weights (TRL's bf16=True, align_runner's hardware=1xgpu)
PRECISION = {
    "cpu": "fp32 (bf16=False), no gradient checkpointing, CPU",
    "cuda": "bf16 autocast over fp32 weights (bf16=True), no gradient checkpointing, one GPU",
}


def precision(args: argparse.Namespace) -> str:
    return PRECISION[args.device]


def settings(args: argparse.Namespace, *, rows: int, quick_rows: int, unit_rows: str) -> dict:
    """The settings every offline case gives both sides; ``rows``: the data's rows (pairs)."""
    return {
        "rows": args.rows or (quick_rows if args.quick else rows),
        "rows_are": unit_rows,
        "row_tokens": list(ROW_TOKENS),
        "epochs": 1,
        "batch": 8,  # rows (pairs) per optimizer step, one micro-batch
        "max_length": args.max_length or 512,
        "lr": 1e-5,
        "optimizer": "AdamW (0.9, 0.999), eps 1e-8, weight decay 0, constant lr, no warmup, clip 1.0",
        "precision": precision(args) + ", no eval, no saving during training",
        "seed": 0,
        "overhead_steps": args.overhead_steps or 2,
        "overhead_repeats": args.overhead_repeats or (2 if args.quick else 3),
    }


def check_rows(s: dict) -> None:
    """Both sides must train on exactly the N rows: align_runner's last step would wrap around to the
    epoch's start otherwise, TRL's would run short."""
    if s["rows"] % s["batch"]:
        raise SystemExit(f"bench: --rows {s['rows']} must be a multiple of the batch ({s['batch']})")


def trl_common(spec: dict) -> dict:
    """TRL config fields every case shares (offline and grpo): the optimizer and schedule align_runner
    runs too, the device's precision (``PRECISION``), and nothing that costs time beside training (no
    saving, reporting, progress bars or loader workers)."""
    s, cuda = spec["settings"], is_cuda(spec)
    return dict(
        output_dir=str(Path(spec["run_dir"]) / "trl"),
        learning_rate=s["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        bf16=cuda,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not cuda,
        model_init_kwargs={"dtype": "float32"},
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=s["seed"],
    )


def trl_args(config_cls, spec: dict, **fields):
    """TRL's config for an offline case: the shared settings, one epoch of fixed batches, then the
    case's own ``fields``."""
    s = spec["settings"]
    offline = dict(
        per_device_train_batch_size=s["batch"],
        gradient_accumulation_steps=1,
        num_train_epochs=s["epochs"],
        max_length=s["max_length"],
        eval_strategy="no",
    )
    return config_cls(**{**trl_common(spec), **offline, **fields})


def trl_train(trainer) -> dict:
    """``trainer.train()`` timed, and the real tokens of the dataset it trained on."""
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "steps": trainer.state.global_step,
        "tokens_trained": dataset_tokens(trainer.train_dataset),
        "timed": "trainer.train()",
    }


def dataset_tokens(dataset) -> int:
    """Real tokens one epoch over a tokenized TRL dataset feeds the model: SFT's ``input_ids`` (packed
    or not); a preference pair's prompt + chosen and prompt + rejected."""
    cols = dataset.column_names
    total = lambda col: sum(len(x) for x in dataset[col])  # noqa: E731
    if "input_ids" in cols:
        return total("input_ids")
    if "prompt_ids" in cols:  # DPO: the prompt is fed with each response
        return 2 * total("prompt_ids") + total("chosen_ids") + total("rejected_ids")
    return total("chosen_ids") + total("rejected_ids")  # reward: each already holds its prompt


def causal_lm(path: str):
    """A fresh copy of the input model, loaded as align_runner's stages load a policy."""
    import torch

    from align_runner.models.loading import load_causal_lm

    return load_causal_lm(path, dtype=torch.float32)


def align_runner_overrides(spec: dict, kind: str, extra: list[str], micro_batch: int | None = None) -> list[str]:
    """One ``kind`` stage after data_prep on the local model and data file, the shared settings;
    ``micro_batch``: rows per optimizer step when not the shared batch (packed SFT)."""
    s, out = spec["settings"], Path(spec["run_dir"]) / "align_runner"
    return [
        "model=local",
        f"model.source.name_or_path={spec['model_dir']}",
        "model.gradient_checkpointing=false",
        *hardware(spec),
        f"algorithm={kind}",
        f"algorithm.stages=[data_prep,{kind}]",
        "pipeline.eval=false",
        f"pipeline.objective={kind}/loss",
        "data=local",
        f"data.train.path={spec['data_file']}",
        f"data.max_length={s['max_length']}",
        f"algorithm.train.epochs={s['epochs']}",
        f"algorithm.train.lr={s['lr']}",
        f"algorithm.train.micro_batch_size={micro_batch or s['batch']}",
        "algorithm.train.grad_accum=1",
        "algorithm.train.scheduler=constant",
        "algorithm.train.warmup_ratio=0.0",
        "algorithm.train.weight_decay=0.0",
        "algorithm.train.max_grad_norm=1.0",
        "algorithm.train.save_every=0",
        "algorithm.train.eval_every=0",
        "algorithm.train.log_every=1",
        "train.progress=false",
        f"paths.outputs={out}",
        f"paths.cache={out / 'cache'}",
        f"seed={s['seed']}",
        *extra,
        *spec.get("align_runner_overrides", []),
    ]


def hardware(spec: dict) -> list[str]:
    """align_runner's hardware profile for the bench's device (``PRECISION``); the GPU's memory as the
    plan's bound (the profile's default is a 24 GB card)."""
    if not is_cuda(spec):
        return ["hardware=cpu"]
    import torch

    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return ["hardware=1xgpu", "hardware.precision=bf16", f"hardware.device_memory_gb={int(gib)}"]


def run_align_runner(
    spec: dict,
    kind: str,
    extra: list[str],
    *,
    load_fresh,
    stages: tuple[str, ...] = (),
    micro_batch: int | None = None,
    lm_head: bool = True,
) -> dict:
    """Run data_prep -> ``kind`` (and ``stages``, those pipeline=auto adds) in this worker, timing the
    engine's ``fit``, then replay the recorded steps on ``load_fresh()`` (a fresh copy of the input
    model) for the engine overhead; ``lm_head=False`` for a model without one (a reward model's score
    head), whose FLOPs then count no logits. Returns the worker's result without ``units``."""
    from align_runner import api

    s = spec["settings"]
    recorder = EngineRecorder()
    out = Path(spec["run_dir"]) / "align_runner"
    result = api.run(align_runner_overrides(spec, kind, extra, micro_batch), run_dir=out / "run")
    records = {name: result.stage(name) for name in (*stages, kind)}
    hit = [name for name, rec in records.items() if rec.cache_hit]
    if hit or len(recorder.fit_seconds) != 1:
        raise RuntimeError(f"nothing timed: stage(s) {hit} were cache hits, fit ran {len(recorder.fit_seconds)} times")
    peak = peak_memory()  # training's peak; the replay below builds a second model and optimizer
    model = spec["model"]
    flops = steps_flops(model, recorder.steps, lm_head)
    overhead = None
    if spec.get("measure_overhead", True):  # the harness asks for it in one repeat: it costs minutes at full size
        overhead = recorder.replay_overhead(load_fresh(), steps=int(s["overhead_steps"]), repeats=int(s["overhead_repeats"]))
    return {
        "seconds": recorder.fit_seconds[0],
        "steps": len(recorder.steps),
        "tokens_trained": sum(batch_tokens(b) for batches in recorder.steps for b in batches),
        "flops": flops,
        "flop_formula": FLOP_FORMULA,
        "stage_seconds": {name: rec.seconds for name, rec in records.items()},
        "overhead": overhead,
        **peak,
        "peak_rss_with_replay_mib": peak_memory()["peak_rss_mib"],
        "timed": f"Engine.fit of the {kind} stage",
        "metrics": read_jsonl(Path(records[kind].dir) / "metrics.jsonl")[-1:],
    }
