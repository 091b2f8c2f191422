#!/usr/bin/env python
"""align_runner vs TRL, side by side on one machine in one invocation, reported as ratios.

    python scripts/bench/run.py grpo            # SmolLM2-135M architecture, random init, fp32, 6 steps
    python scripts/bench/run.py grpo --quick    # a 2-layer Llama: smoke test in seconds
    python scripts/bench/run.py grpo --repeats 3 --only align_runner --threads 1

A *case* (``CASES``) is one training algorithm measured on both sides: ``prepare`` builds what both
read (model checkpoint, data, settings) once, and one worker per side trains on it in a fresh Python
process (``run.py _worker <case> <side> <spec> <result>``), timing the training part only and reporting
its peak RSS. Runs alternate TRL, align_runner, TRL, align_runner ...; the medians go to
``results/<case>.json`` / ``.md`` (``<case>-quick`` with ``--quick``). New cases (sft, dpo, reward) are
a ``prepare`` and two workers added to ``CASES``.

TRL is only the peer we measure against (``pip install --no-deps trl`` or the ``bench`` extra); when it
is not importable the align_runner side still runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parents[1]
RESULTS = BENCH / "results"
SIDES = ("trl", "align_runner")

# SmolLM2-135M(-Instruct): the config.json of the embedded GGUF converted by align_runner.models.gguf.
SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}
# --quick: the same layout, tiny (with the 512-token byte-level tokenizer of align_runner.models.tiny)
QUICK_LLAMA = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


@dataclass(frozen=True)
class Case:
    # what one unit of work is called ("completions", "sequences", "pairs")
    unit: str
    # settings shared by both sides: prepare(args) -> settings (written into the spec)
    settings: Callable[[argparse.Namespace], dict]
    # runs in a worker process: prepare(spec) -> extra spec entries (model dir, data files, ...)
    prepare: Callable[[dict], dict]
    # side -> worker(spec) -> {"seconds": training wall time, "units": work done, ...}; runs in its own process
    workers: dict[str, Callable[[dict], dict]]


# ===================================================================================== shared pieces


def build_model(spec: dict) -> dict:
    """Save a random-init (fixed seed) fp32 Llama + tokenizer as a Hugging Face checkpoint at spec['model_dir']."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    quick = spec["quick"]
    arch = dict(QUICK_LLAMA if quick else SMOLLM2_135M)
    tokenizer, tok_source, check = (None, None, {})
    if not quick:
        tokenizer, tok_source, check = _smollm2_tokenizer(arch)
    if tokenizer is None:
        tokenizer = _byte_level_tokenizer(arch["vocab_size"] if quick else 49152)
        tok_source = f"byte-level BPE (align_runner.models.tiny.train_tokenizer), {len(tokenizer)} tokens"
        arch["vocab_size"] = len(tokenizer)
    config = LlamaConfig(
        **arch,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec["settings"]["seed"]))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # one stop token for both sides: the end of an assistant turn
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(spec["model_dir"])
    tokenizer.save_pretrained(spec["model_dir"])
    return {
        "model": {
            "arch": "llama",
            **arch,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "float32",
            "init": f"random, torch.manual_seed({spec['settings']['seed']})",
            "tokenizer": tok_source,
            "checked_against": check,
        }
    }


def _smollm2_tokenizer(arch: dict):
    """The embedded SmolLM2 tokenizer (converting the GGUF once into align_runner's model cache), its
    source, and how ``arch`` compares with the converted config.json; (None, None, {...}) if unavailable."""
    from transformers import AutoTokenizer

    try:
        from align_runner import api
        from align_runner.models.loading import resolve_source

        cache = os.environ.get("ALIGN_RUNNER_CACHE") or str(REPO / "outputs" / "cache")
        cfg = api.compose(["model=smollm2-135m", f"paths.cache={cache}"])
        path = resolve_source(cfg.model.source, cfg.paths.cache)
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to the byte-level tokenizer
        print(
            f"bench: embedded SmolLM2 tokenizer unavailable ({type(e).__name__}: {e}); using a byte-level BPE"
        )
        return None, None, {"error": str(e)}
    converted = json.loads((Path(path) / "config.json").read_text())
    rope = (converted.get("rope_parameters") or {}).get("rope_theta", converted.get("rope_theta"))
    got = {**converted, "rope_theta": rope}
    mismatches = {k: {"bench": v, "converted": got.get(k)} for k, v in arch.items() if got.get(k) != v}
    if mismatches:
        print(f"bench: WARNING: architecture differs from {path}/config.json: {mismatches}")
    return (
        AutoTokenizer.from_pretrained(path),
        f"SmolLM2-135M-Instruct (embedded GGUF, {path})",
        {
            "config": f"{path}/config.json",
            "mismatches": mismatches,
        },
    )


def _byte_level_tokenizer(vocab_size: int):
    from align_runner.models.tiny import IM_END, train_tokenizer

    tokenizer = train_tokenizer(vocab_size)
    tokenizer.eos_token = IM_END  # a chat turn ends with <|im_end|>: the one stop token of both sides
    return tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ===================================================================================== GRPO


def grpo_settings(args: argparse.Namespace) -> dict:
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
        "precision": "fp32, no gradient checkpointing, no vLLM",
        "num_prompts": 64,
        "seed": 0,
        "reward": "bench_rewards.length_reward",
    }


def grpo_prepare(spec: dict) -> dict:
    """64 conversational arithmetic prompts and the model checkpoint."""
    import random

    rng = random.Random(spec["settings"]["seed"])
    rows = []
    for _ in range(spec["settings"]["num_prompts"]):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}? Answer with a number."}]})
    prompts = Path(spec["workdir"]) / "prompts.jsonl"
    write_jsonl(prompts, rows)
    return {"prompts": str(prompts), **build_model(spec)}


def grpo_trl(spec: dict) -> dict:
    import bench_rewards
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    s = spec["settings"]
    per_step = s["prompts_per_step"] * s["num_generations"]
    accum = per_step // s["micro_batch_size"]
    rows = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines()]
    args = GRPOConfig(
        output_dir=str(Path(spec["run_dir"]) / "trl"),
        # one optimizer step = micro-batch x accumulation completions; generation_batch_size defaults to
        # micro-batch x steps_per_generation (= accumulation): one generation of 32 per optimizer step,
        # so no old-logps pass (TRL computes those only when generation and steps are misaligned)
        per_device_train_batch_size=s["micro_batch_size"],
        gradient_accumulation_steps=accum,
        num_generations=s["num_generations"],
        max_completion_length=s["max_completion_length"],
        temperature=s["temperature"],
        top_p=1.0,
        top_k=0,
        learning_rate=s["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        beta=s["beta"],
        num_iterations=1,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        max_steps=s["steps"],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_vllm=False,
        use_cpu=True,
        model_init_kwargs={"dtype": "float32"},
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=s["seed"],
    )
    trainer = GRPOTrainer(
        model=spec["model_dir"],
        reward_funcs=bench_rewards.length_reward,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
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
        "mean_completion_length": statistics.fmean(r["completions/mean_length"] for r in logs)
        if logs
        else None,
        "timed": "trainer.train()",
    }


def grpo_align_runner(spec: dict) -> dict:
    import align_runner.stages.grpo as grpo_stage
    from align_runner import api

    s = spec["settings"]
    out = Path(spec["run_dir"]) / "align_runner"
    # time the online loop (rollouts + updates) the way trainer.train() is timed on the TRL side; the
    # stage's own seconds (also loading the policy and saving the trained model) are reported too
    loop: list[float] = []
    fit_online = grpo_stage.fit_online

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return fit_online(*a, **k)
        finally:
            loop.append(time.perf_counter() - t0)

    grpo_stage.fit_online = timed
    result = api.run(
        [
            "model=local",
            f"model.source.name_or_path={spec['model_dir']}",
            "model.gradient_checkpointing=false",
            "hardware=cpu",
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
        ],
        run_dir=out / "run",
    )
    rec = result.stage("grpo")
    if rec.cache_hit:
        raise RuntimeError("the grpo stage was a cache hit: nothing was timed")
    rows = [json.loads(line) for line in (Path(rec.dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "completions/mean_length" in r]
    per_step = s["prompts_per_step"] * s["num_generations"]
    timed_what = "fit_online (the grpo stage's rollout/update loop)"
    if not loop:  # the stage no longer calls fit_online by that name: fall back to the whole stage
        loop, timed_what = [rec.seconds], "the whole grpo stage (fit_online was not called by name)"
    return {
        "seconds": sum(loop),
        "units": len(rows) * per_step,
        "steps": len(rows),
        "mean_completion_length": statistics.fmean(r["completions/mean_length"] for r in rows)
        if rows
        else None,
        "stage_seconds": rec.seconds,
        "timed": timed_what,
    }


CASES: dict[str, Case] = {
    "grpo": Case(
        unit="completions",
        settings=grpo_settings,
        prepare=grpo_prepare,
        workers={"trl": grpo_trl, "align_runner": grpo_align_runner},
    ),
}


# ===================================================================================== harness


def worker_env(threads: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), str(REPO), env.get("PYTHONPATH", "")) if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    return env


def spawn(case: str, role: str, spec_path: Path, result_path: Path, log: Path, threads: int) -> dict:
    """Run one worker in a fresh process; its result dict (raises with the log's tail on failure)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_worker",
        case,
        role,
        str(spec_path),
        str(result_path),
    ]
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=worker_env(threads), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result_path.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"bench worker {case}/{role} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return json.loads(result_path.read_text())


def worker_main(case: str, role: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    threads = int(spec["threads"])
    code = code_fingerprint()  # before importing: the align_runner this process is about to run
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import torch

    torch.set_num_threads(threads)
    c = CASES[case]
    fn = c.prepare if role == "prepare" else c.workers[role]
    out = fn(spec)
    if role != "prepare":
        out.update(threads=torch.get_num_threads(), peak_rss_mib=peak_rss_mib(), code=code)
    Path(result_path).write_text(json.dumps(out, indent=2))


def code_fingerprint() -> dict:
    """The git commit and a hash of align_runner's sources and configs as this process reads them, so
    a result shows which code each run measured (a tree edited during a benchmark gives mixed runs)."""
    import hashlib

    h = hashlib.sha256()
    for root in ("align_runner",):
        for f in sorted((REPO / root).rglob("*")):
            if f.suffix in (".py", ".yaml") and f.is_file():
                h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return {
        "git_sha": _git(["rev-parse", "--short", "HEAD"]),
        "dirty": _git_dirty(),
        "source_hash": h.hexdigest()[:12],
    }


def _git(args: list[str]) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def trl_available() -> bool:
    try:
        return importlib.util.find_spec("trl") is not None
    except (ImportError, ValueError):
        return False


def machine() -> dict:
    import torch  # only for its version: the parent process trains nothing

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "trl": version("trl"),
        "align_runner": version("align-runner"),
        "git_sha": _git(["rev-parse", "--short", "HEAD"]),
        "git_dirty": _git_dirty(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _git_dirty() -> bool | None:
    """Whether align_runner's tracked sources or configs differ from the commit (the measured code is the working tree)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "align_runner"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def run_case(name: str, args: argparse.Namespace) -> dict:
    case = CASES[name]
    started = time.perf_counter()
    sides = list(SIDES if args.only is None else [args.only])
    if "trl" in sides and not trl_available():
        print(
            "bench: TRL is not installed (pip install --no-deps trl, or the `bench` extra): running the align_runner side only"
        )
        sides.remove("trl")
        if not sides:
            raise SystemExit("bench: nothing to run")
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix=f"ar-bench-{name}-"))
    try:
        spec = {
            "case": name,
            "quick": bool(args.quick),
            "threads": args.threads,
            "settings": case.settings(args),
            "workdir": str(workdir),
            "model_dir": str(workdir / "model"),
        }
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        print(f"bench {name}: building the model and data in {workdir} ...", flush=True)
        spec.update(
            spawn(name, "prepare", spec_path, workdir / "prepare.json", workdir / "prepare.log", args.threads)
        )
        print(
            f"bench {name}: model: {spec['model']['parameters'] / 1e6:.1f}M parameters; tokenizer: {spec['model']['tokenizer']}"
        )
        runs = []
        for r in range(args.repeats):
            for side in sides:
                run_dir = workdir / f"run-{r}-{side}"
                run_dir.mkdir()
                run_spec = {**spec, "run_dir": str(run_dir)}
                (run_dir / "spec.json").write_text(json.dumps(run_spec))
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                print(f"bench {name}: repeat {r + 1}/{args.repeats} {side} ...", end=" ", flush=True)
                out = spawn(
                    name,
                    side,
                    run_dir / "spec.json",
                    run_dir / "result.json",
                    workdir / f"run-{r}-{side}.log",
                    args.threads,
                )
                out.update(side=side, repeat=r, loadavg_before=load, per_s=out["units"] / out["seconds"])
                print(
                    f"{out['per_s']:.2f} {case.unit}/s, {out['seconds']:.1f} s, peak RSS {out['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
                runs.append(out)
                if not args.keep:
                    shutil.rmtree(run_dir, ignore_errors=True)  # a 135M run's saved model: ~0.5 GB
        result = summarise(name, case, spec, info, runs, sides)
    finally:
        if args.keep:
            print(f"bench: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["total_seconds"] = time.perf_counter() - started
    return result


def summarise(name: str, case: Case, spec: dict, info: dict, runs: list[dict], sides: list[str]) -> dict:
    summary: dict[str, Any] = {}
    for side in sides:
        mine = [r for r in runs if r["side"] == side]
        summary[side] = {
            "per_s": statistics.median(r["per_s"] for r in mine),
            "seconds": statistics.median(r["seconds"] for r in mine),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine),
            # the fastest run: the least disturbed by other jobs on a shared machine
            "best_per_s": max(r["per_s"] for r in mine),
            # fastest / slowest run: above ~1.2 the machine was busy and the medians are noisy
            "spread": max(r["per_s"] for r in mine) / min(r["per_s"] for r in mine),
            "runs": len(mine),
        }
        if any("stage_seconds" in r for r in mine):
            summary[side]["stage_seconds"] = statistics.median(r["stage_seconds"] for r in mine)
    if "trl" in summary and "align_runner" in summary:
        a, t = summary["align_runner"], summary["trl"]
        summary["ratio"] = {
            "per_s": a["per_s"] / t["per_s"],
            "peak_rss_mib": a["peak_rss_mib"] / t["peak_rss_mib"],
            "best_per_s": a["best_per_s"] / t["best_per_s"],
            # each align_runner run over the TRL run just before it (same repeat, similar machine load)
            "pairs": [
                next(r["per_s"] for r in runs if r["side"] == "align_runner" and r["repeat"] == i)
                / next(r["per_s"] for r in runs if r["side"] == "trl" and r["repeat"] == i)
                for i in sorted({r["repeat"] for r in runs})
            ],
        }
    return {
        "case": name,
        "unit": case.unit,
        "quick": spec["quick"],
        "threads": spec["threads"],
        "command": "python scripts/bench/run.py " + " ".join(sys.argv[1:]),
        "settings": spec["settings"],
        "model": spec["model"],
        "machine": info,
        "summary": summary,
        "runs": runs,
    }


def markdown(res: dict) -> str:
    s, u, m = res["summary"], res["unit"], res["machine"]
    sides = [k for k in SIDES if k in s]
    lines = [
        f"# {res['case']}{' (quick)' if res['quick'] else ''}: align_runner vs TRL",
        "",
        f"`{res['command']}` — {m['date']}, {res['total_seconds']:.0f} s in all",
        "",
        "| | " + " | ".join(sides) + (" | align_runner / TRL |" if "ratio" in s else " |"),
        "|---|" + "---:|" * (len(sides) + ("ratio" in s)),
    ]

    def row(label, key, fmt, ratio_key=None):
        cells = [fmt.format(s[k][key]) for k in sides]
        if "ratio" in s:
            cells.append(f"{s['ratio'][ratio_key]:.2f}x" if ratio_key else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row(f"{u}/s (median)", "per_s", "{:.2f}", "per_s")
    row(f"{u}/s (best run)", "best_per_s", "{:.2f}", "best_per_s")
    row("training seconds (median)", "seconds", "{:.1f}")
    row("peak RSS MiB (median)", "peak_rss_mib", "{:.0f}", "peak_rss_mib")
    lines.append(
        "| runs | " + " | ".join(str(s[k]["runs"]) for k in sides) + (" | |" if "ratio" in s else " |")
    )
    if "ratio" in s:
        lines += [
            "",
            "align_runner / TRL per repeat: " + ", ".join(f"{x:.2f}x" for x in s["ratio"]["pairs"]) + ".",
        ]
    codes: dict[str, list[int]] = {}
    for i, r in enumerate(res["runs"]):
        if r["side"] == "align_runner" and r.get("code"):
            codes.setdefault(_code(r["code"]), []).append(i + 1)
    if len(codes) > 1:
        lines += [
            "",
            "**Mixed code**: align_runner's sources changed between its runs ("
            + "; ".join(f"run(s) {', '.join(map(str, idx))}: {k}" for k, idx in codes.items())
            + "): its median mixes versions.",
        ]
    for note in res.get("notes", []):
        lines += ["", f"**Note**: {note}"]
    noisy = {k: s[k]["spread"] for k in sides if s[k]["spread"] > 1.2}
    if noisy:
        lines += [
            "",
            "**Noisy**: the fastest and slowest runs of a side differ by "
            + ", ".join(f"{v:.2f}x ({k})" for k, v in noisy.items())
            + ": the timings are noisy (other jobs on the CPUs, see the load averages, or runs too short)."
            " Prefer the best-run and per-repeat ratios, or rerun on an idle machine with more --repeats.",
        ]
    lines += [
        "",
        "Each run, in the order run:",
        "",
        f"| # | side | {u}/s | seconds | steps | mean completion length | peak RSS MiB | load avg before | code |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(res["runs"]):
        mcl = "" if r.get("mean_completion_length") is None else f"{r['mean_completion_length']:.1f}"
        load = "" if r.get("loadavg_before") is None else f"{r['loadavg_before']:.2f}"
        lines.append(
            f"| {i + 1} | {r['side']} | {r['per_s']:.2f} | {r['seconds']:.1f} | {r['steps']} | {mcl} | {r['peak_rss_mib']:.0f} | {load} | {_code(r.get('code'))} |"
        )
    timed = {r["side"]: r.get("timed", "") for r in res["runs"]}
    lines += ["", "Timed: " + "; ".join(f"{k}: {v}" for k, v in timed.items()) + "."]
    if "stage_seconds" in s.get("align_runner", {}):
        a = s["align_runner"]
        lines.append(
            f"align_runner's whole grpo stage (also loading the policy and saving the trained model): "
            f"{a['stage_seconds']:.1f} s median."
        )
    mo = res["model"]
    lines += [
        "",
        f"Model: Llama, {mo['num_hidden_layers']} layers, hidden {mo['hidden_size']}, {mo['num_attention_heads']} heads / "
        f"{mo['num_key_value_heads']} KV, intermediate {mo['intermediate_size']}, vocab {mo['vocab_size']}, tied embeddings, "
        f"{mo['parameters'] / 1e6:.1f}M parameters, {mo['dtype']}, {mo['init']}; tokenizer: {mo['tokenizer']}.",
        "",
        "Settings (both sides): " + ", ".join(f"{k}={v}" for k, v in res["settings"].items()) + ".",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable, {m['cpu']}), {res['threads']} torch thread(s) per run, "
        f"torch {m['torch']}, transformers {m['transformers']}, TRL {m['trl']}, align_runner {m['align_runner']} "
        f"({m['git_sha']}{' + uncommitted changes' if m.get('git_dirty') else ''}), Python {m['python']}; load average {_load(m.get('loadavg_start'))} at start, "
        f"{_load(m.get('loadavg_end'))} at end.",
        "",
    ]
    return "\n".join(lines)


def _code(c: dict | None) -> str:
    """align_runner's commit (+dirty) and source hash as a worker saw them."""
    if not c:
        return "not recorded"
    return f"{c.get('git_sha')}{'+dirty' if c.get('dirty') else ''} {c.get('source_hash')}"


def _load(v) -> str:
    return "n/a" if not v else "/".join(f"{x:.2f}" for x in v)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        worker_main(*argv[1:5])
        return 0
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument(
        "--quick", action="store_true", help="a 2-layer Llama and 2 steps: a smoke test in seconds"
    )
    p.add_argument(
        "--repeats", type=int, default=2, help="runs per side, alternating TRL / align_runner (default 2)"
    )
    p.add_argument("--only", choices=SIDES, help="run one side only")
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default: 6, 2 with --quick)"
    )
    p.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads in every worker (default 2)"
    )
    p.add_argument(
        "--out", type=Path, default=RESULTS, help=f"where <case>.json / .md go (default {RESULTS})"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary model / data / logs directory")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    res = run_case(args.case, args)
    stem = args.case + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (args.out / f"{stem}.md").write_text(md)
    print()
    print(md)
    print(f"bench: wrote {args.out / (stem + '.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
