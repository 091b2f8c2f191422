"""Helpers for tests that run the real command line in a subprocess (self-launch, kill/resume, trackers).

Imported by the test modules, and by the CLI subprocesses themselves (``tests/`` is on their
PYTHONPATH) for ``slow_sft_loss``, a loss ``_target_`` that makes each step take a known time.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, as the CLI subprocesses do (cli_env)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def slow_sft_loss(logits, labels, *, num_items=None, delay: float = 0.0):
    """``sft_loss`` after sleeping ``delay`` seconds: gives a test time to kill a run mid-stage."""
    from align_runner.algos.sft import sft_loss

    time.sleep(delay)
    return sft_loss(logits, labels, num_items=num_items)


def even_token_reward(completion_ids, *, delay: float = 0.0, **_):
    """A learnable rule for the tiny model: the share of a completion's tokens whose id is even. A
    random policy scores about 0.5; GRPO should push it up. ``delay`` slows each call (kill tests)."""
    time.sleep(delay)
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    env.setdefault("WANDB_MODE", "offline")
    env["TOKENIZERS_PARALLELISM"] = "false"
    # one intra-op thread per process: results independent of the machine's core count (so runs
    # compare bitwise with in-process ones, see single_thread) and no thread thrashing on a busy CI box
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def tiny_overrides(outputs: Path, cache: str, *extra: str) -> list[str]:
    """A short SFT-only pipeline on the tiny model (no eval stages: they add time, not coverage)."""
    return [
        "model=tiny",
        f"paths.outputs={outputs}",
        f"paths.cache={cache}",
        "pipeline.eval=false",
        "data.sft.train.limit=64",
        "data.sft.eval.limit=16",
        "train.max_steps=4",
        "train.lr=1e-3",
        "train.progress=false",
        *extra,
    ]


def run_cli(overrides: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "align_runner", *overrides],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(overrides: list[str], *, cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the CLI in its own session (so a test can kill the whole process group)."""
    out = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "align_runner", *overrides],
        cwd=cwd,
        env=env or cli_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stage_dir(outputs: Path, kind: str) -> Path:
    dirs = sorted(Path(outputs, "store").glob(f"{kind}-*"))
    assert len(dirs) == 1, f"expected one {kind} stage dir in {outputs}/store, found {dirs}"
    return dirs[0]


def metrics(stage: Path, drop: tuple[str, ...] = ("time", "tokens_per_s")) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # a dropped name drops its group too: "time" also drops the online loop's "time/update" ...
    return [{k: v for k, v in r.items() if k not in drop and k.split("/")[0] not in drop} for r in rows]


def weights(stage: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(stage / "model" / "model.safetensors"))


def run_manifest(outputs: Path) -> dict[str, Any]:
    runs = sorted(Path(outputs).glob("*/*/run.json"))
    assert runs, f"no run.json under {outputs}"
    return json.loads(runs[-1].read_text())


def complete_checkpoints(stage: Path) -> list[int]:
    ckpt = stage / "ckpt"
    if not ckpt.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in ckpt.glob("step-*") if not p.name.endswith(".tmp") and (p / "meta.pt").exists())


def wait_for_checkpoint(outputs: Path, proc: subprocess.Popen, timeout: float = 300, kind: str = "sft") -> int:
    """Poll until a complete step checkpoint of the ``kind`` stage exists; returns its step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for stage in Path(outputs, "store").glob(f"{kind}-*"):
            steps = complete_checkpoints(stage)
            if steps:
                return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before writing a checkpoint")
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared in time")


def kill_and_resume(overrides: list[str], outputs: Path, kind: str, rollouts: int, *, cwd: Path) -> Path:
    """SIGKILL an online-RL run at its first checkpoint, rerun it, and check the rerun resumed from that
    checkpoint (not from scratch); returns the stage dir, to compare with an uninterrupted run."""
    import signal

    from align_runner.pipeline.store import DONE

    proc = start_cli(overrides, cwd=cwd, log=cwd / "killed.log")
    try:
        wait_for_checkpoint(outputs, proc, kind=kind)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stage = stage_dir(outputs, kind)
    last = complete_checkpoints(stage)[-1]
    assert not (stage / DONE).exists() and last < rollouts
    rerun = run_cli(overrides, cwd=cwd)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{kind}: resumed from rollout {last}/{rollouts}" in rerun.stdout + rerun.stderr
    return stage


def rank_failing_loss(logits, labels, *, num_items=None, rank: int = 1):
    """``sft_loss`` that raises on one rank only: the others are then blocked in a collective."""
    from align_runner.algos.sft import sft_loss

    if int(os.environ.get("RANK", 0)) == rank:
        raise ValueError(f"boom on rank {rank}")
    return sft_loss(logits, labels, num_items=num_items)


def single_reference(outputs: Path, cache: str, *extra: str, micro: int = 8, accum: int = 2):
    """In-process single-process run with the same global batch as 2 processes x micro x accum/2."""
    from align_runner import api

    with single_thread():
        return api.run(tiny_overrides(outputs, cache, f"train.micro_batch_size={micro}", f"train.grad_accum={accum}", *extra))
