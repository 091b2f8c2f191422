"""grpo: online GRPO, sampling G=8 completions for each of 4 prompts per optimizer step, scoring them,
group-normalised advantages, one AdamW step on the clipped policy loss.

completions/s = steps x 32 / seconds: TRL's ``trainer.train()`` vs align_runner's ``fit_online`` (the
grpo stage's rollout/update loop).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from common import Case, peak_memory, read_jsonl, write_jsonl
from measure import FLOP_FORMULA, EngineRecorder, patch_timer, sequence_flops

from cases import offline


def settings(args: argparse.Namespace) -> dict:
    return {
        "num_generations": 8,  # G
        "prompts_per_step": 4,  # -> 32 completions per optimizer step
        "max_completion_length": 32,  # random init rarely emits EOS: every completion runs to the max
        "temperature": 1.0,
        "lr": 1e-6,
        "beta": 0.0,  # no reference model
        "steps": args.steps or (2 if args.quick else 6),  # optimizer steps = rollouts (one step each)
        "micro_batch_size": 8,
        "optimizer": "AdamW (0.9, 0.999), eps 1e-8, weight decay 0, constant lr, no warmup, clip 1.0",
        "loss": "GRPO (sequence mean of token means), clip eps 0.2, group-normalised advantages",
        "precision": offline.precision(args) + ", no vLLM",
        "num_prompts": 64,
        "seed": 0,
        "reward": "bench_rewards.length_reward",
        "overhead_steps": args.overhead_steps or 2,
        "overhead_repeats": args.overhead_repeats or (2 if args.quick else 3),
    }


def prepare(spec: dict) -> dict:
    """64 conversational arithmetic prompts and their mean rendered length."""
    from transformers import AutoTokenizer

    rng = random.Random(spec["settings"]["seed"])
    rows = []
    for _ in range(spec["settings"]["num_prompts"]):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}? Answer with a number."}]})
    prompts = Path(spec["workdir"]) / "prompts.jsonl"
    write_jsonl(prompts, rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    lengths = [
        len(tokenizer.encode(tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True), add_special_tokens=False))
        for r in rows
    ]
    return {"prompts": str(prompts), "data": {"prompts": len(rows), "mean_prompt_tokens": statistics.fmean(lengths)}}


def trl_worker(spec: dict) -> dict:
    import bench_rewards
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    s = spec["settings"]
    per_step = s["prompts_per_step"] * s["num_generations"]
    args = GRPOConfig(
        **offline.trl_common(spec),
        # one optimizer step = micro-batch x accumulation completions; generation_batch_size defaults to
        # micro-batch x steps_per_generation (= accumulation): one generation of 32 per optimizer step,
        # so no old-logps pass (TRL computes those only when generation and steps are misaligned)
        per_device_train_batch_size=s["micro_batch_size"],
        gradient_accumulation_steps=per_step // s["micro_batch_size"],
        num_generations=s["num_generations"],
        max_completion_length=s["max_completion_length"],
        temperature=s["temperature"],
        top_p=1.0,
        top_k=0,
        beta=s["beta"],
        num_iterations=1,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        max_steps=s["steps"],
        use_vllm=False,
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=spec["model_dir"],
        reward_funcs=bench_rewards.length_reward,
        args=args,
        train_dataset=datasets.Dataset.from_list(read_jsonl(spec["prompts"])),
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    logs = [r for r in trainer.state.log_history if "completions/mean_length" in r]
    steps = trainer.state.global_step
    return {
        "seconds": seconds,
        "units": steps * per_step,
        "steps": steps,
        "mean_completion_length": statistics.fmean(r["completions/mean_length"] for r in logs) if logs else None,
        "timed": "trainer.train()",
    }


def overrides(spec: dict) -> list[str]:
    s, out = spec["settings"], Path(spec["run_dir"]) / "align_runner"
    return [
        "model=local",
        f"model.source.name_or_path={spec['model_dir']}",
        "model.gradient_checkpointing=false",
        *offline.hardware(spec),
        "algorithm=grpo",
        "algorithm.stages=[data_prep,grpo]",
        "pipeline.eval=false",
        "pipeline.objective=grpo/reward",
        "data.sft=null",
        "data.preference=null",
        "data.prompt.eval=null",
        f"data.prompt.train.path={spec['prompts']}",
        f"algorithm.rollouts={s['steps']}",
        "algorithm.steps_per_rollout=1",
        "algorithm.num_iterations=1",
        f"algorithm.prompts_per_rollout={s['prompts_per_step']}",
        f"algorithm.num_generations={s['num_generations']}",
        f"algorithm.generation.max_new_tokens={s['max_completion_length']}",
        f"algorithm.generation.temperature={s['temperature']}",
        "algorithm.generation.top_p=1.0",
        "algorithm.generation.top_k=0",
        f"algorithm.loss.beta={s['beta']}",
        f"algorithm.train.lr={s['lr']}",
        f"algorithm.train.micro_batch_size={s['micro_batch_size']}",
        "algorithm.train.scheduler=constant",
        "algorithm.train.warmup_ratio=0.0",
        "algorithm.train.weight_decay=0.0",
        "train.max_grad_norm=1.0",
        "train.progress=false",
        "~algorithm.rewards.accuracy",
        f"+algorithm.rewards.bench={{_target_:{s['reward']},_partial_:true}}",
        f"paths.outputs={out}",
        f"paths.cache={out / 'cache'}",
        f"seed={s['seed']}",
        *spec.get("align_runner_overrides", []),
    ]


def grpo_flops(model: dict, steps: list[list[dict]], prompt_tokens: float) -> float:
    """Each trained completion as the standard work: a forward + backward over its prompt (the mean
    prompt length) + completion, logits on the completion, plus its sampling counted as one forward
    (1/3). align_runner's shared-prompt layout computes each prompt once per group: less than this."""
    total = 0.0
    for batches in steps:
        for b in batches:
            for c in b["completion_mask"].sum(-1).tolist():
                total += sequence_flops(model, prompt_tokens + c, c)
    return total * (1 + 1 / 3)


def align_runner_worker(spec: dict) -> dict:
    import align_runner.stages.grpo as grpo_stage
    from align_runner import api

    s = spec["settings"]
    recorder = EngineRecorder()
    # time the online loop (rollouts + updates) the way trainer.train() is timed on the TRL side; the
    # stage's own seconds (also loading the policy and saving the trained model) are reported too
    loop = patch_timer(grpo_stage, "fit_online")
    out = Path(spec["run_dir"]) / "align_runner"
    rec = api.run(overrides(spec), run_dir=out / "run").stage("grpo")
    if rec.cache_hit or not loop:
        raise RuntimeError("the grpo stage did not run fit_online: nothing was timed")
    peak = peak_memory()
    rows = [r for r in read_jsonl(Path(rec.dir) / "metrics.jsonl") if "completions/mean_length" in r]
    result = {
        "seconds": sum(loop),
        "units": len(rows) * s["prompts_per_step"] * s["num_generations"],
        "steps": len(rows),
        "mean_completion_length": statistics.fmean(r["completions/mean_length"] for r in rows) if rows else None,
        "flops": grpo_flops(spec["model"], recorder.steps, spec["data"]["mean_prompt_tokens"]),
        "flop_formula": FLOP_FORMULA + "; each completion: its mean-length prompt + completion trained, and sampled (a forward)",
        "stage_seconds": {"grpo": rec.seconds},
        "overhead": None,
        **peak,
        "timed": "fit_online (the grpo stage's rollout/update loop)",
    }
    if spec.get("measure_overhead", True):
        result["overhead"] = recorder.replay_overhead(
            offline.causal_lm(spec["model_dir"]), steps=int(s["overhead_steps"]), repeats=int(s["overhead_repeats"])
        )
        result["peak_rss_with_replay_mib"] = peak_memory()["peak_rss_mib"]
    return result


CASE = Case(
    unit="completions",
    settings=settings,
    prepare=prepare,
    workers={"trl": trl_worker, "align_runner": align_runner_worker},
)
