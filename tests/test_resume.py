"""Exact resume: a run killed mid-stage continues from its last step checkpoint and ends equal to an
uninterrupted run — weights bitwise and metrics.jsonl row for row (single process on CPU)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from cli_runner import (
    complete_checkpoints,
    metrics,
    run_cli,
    stage_dir,
    start_cli,
    tiny_overrides,
    wait_for_checkpoint,
    weights,
)

from align_runner import api
from align_runner.engine.checkpoint import CheckpointManager
from align_runner.engine.loop import TrainState
from align_runner.pipeline.store import DONE

# 12 optimizer steps of >= 0.25 s each, a checkpoint every 3: time enough to kill the run mid-stage
SLOW = [
    "train.max_steps=12",
    "train.save_every=3",
    "train.keep_last=2",
    "algorithm.loss._target_=cli_runner.slow_sft_loss",
    "+algorithm.loss.delay=0.25",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in new sessions, so
    killing the process group would leave them running): what a node crash does."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            os.kill(p.pid, signal.SIGKILL)


def _kill_after_first_checkpoint(overrides: list[str], outputs: Path, tmp_path: Path) -> int:
    proc = start_cli(overrides, cwd=tmp_path, log=tmp_path / "killed.log")
    try:
        wait_for_checkpoint(outputs, proc)
    finally:
        _kill_tree(proc.pid)
        proc.wait()
    stage = stage_dir(outputs, "sft")
    assert not (stage / DONE).exists() and not (stage / "model").exists()
    return complete_checkpoints(stage)[-1]


def test_sigkill_mid_stage_resumes_from_last_checkpoint_bitwise(tmp_path, model_cache):
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"
    overrides = tiny_overrides(killed_out, model_cache, *SLOW)

    last = _kill_after_first_checkpoint(overrides, killed_out, tmp_path)
    assert 3 <= last < 12
    rerun_started = time.time()
    rerun = run_cli(overrides, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"sft: resumed from step {last}/12" in rerun.stdout + rerun.stderr

    api.run(tiny_overrides(clean_out, model_cache, *SLOW))  # the uninterrupted reference, in-process
    resumed, clean = stage_dir(killed_out, "sft"), stage_dir(clean_out, "sft")
    assert _same_weights(weights(resumed), weights(clean))
    # metrics.jsonl equals the uninterrupted run's (timing fields aside) ...
    assert metrics(resumed) == metrics(clean)
    assert [r["step"] for r in metrics(resumed)] == [*range(1, 13), 12]  # 12 train rows + final eval
    # ... and its rows up to the checkpoint are the killed run's own: nothing before it was redone
    times = {r["step"]: r["time"] for r in metrics(resumed, drop=()) if "loss" in r}
    assert all(times[s] < rerun_started for s in range(1, last + 1))
    assert all(times[s] > rerun_started for s in range(last + 1, 13))
    assert not (resumed / "ckpt").exists()  # checkpoints are dropped once the stage is DONE


def test_lora_dropout_resume_is_bitwise(tiny, monkeypatch):
    """LoRA dropout draws from the RNG every step: resume must restore the RNG, not only the weights."""
    overrides = [*tiny, "pipeline.eval=false", "+model/lora=default", "model.lora.r=4", "model.lora.dropout=0.3",
                 "train.max_steps=6", "train.save_every=2", "train.keep_last=1"]
    outputs = Path(tiny[1].split("=", 1)[1])
    original, calls = torch.optim.AdamW.step, {"n": 0}

    def crash_at_step_5(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        api.run(overrides)
    stage = stage_dir(outputs, "sft")
    assert complete_checkpoints(stage) == [4]  # keep_last=1 dropped step-2
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    calls["n"] = 0
    resumed = api.run(overrides)
    assert resumed.stage("sft").metrics["loss"] > 0

    clean_overrides = [o.replace(str(outputs), str(outputs) + "-clean") for o in overrides]
    api.run(clean_overrides)
    clean = stage_dir(Path(str(outputs) + "-clean"), "sft")
    from safetensors.torch import load_file

    adapter = "model/adapter/adapter_model.safetensors"
    assert _same_weights(load_file(str(stage / adapter)), load_file(str(clean / adapter)))
    assert metrics(stage) == metrics(clean)


def test_checkpoint_is_atomic_and_keeps_last_k(tmp_path):
    """A .tmp folder (a write cut short) is never restored; only keep_last checkpoints stay."""

    class Single:
        rank, is_main = 0, True

        def barrier(self):
            pass

        def broadcast_object(self, obj):
            return obj

        def gather_object(self, obj):
            return [obj]

        def save_train_state(self, d, model, optimizer):
            torch.save({"w": model.weight.detach().clone()}, d / "train_state.pt")

        def load_train_state(self, d, model, optimizer):
            with torch.no_grad():
                model.weight.copy_(torch.load(d / "train_state.pt")["w"])

    model = torch.nn.Linear(2, 2, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    mgr = CheckpointManager(tmp_path, keep_last=2, backend=Single())
    state = TrainState("policy", model, opt, sched, total_steps=3)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(float(step))
        mgr.save(step, [state])
    assert mgr.steps() == [2, 3]
    (tmp_path / "step-4.tmp").mkdir()  # killed while writing step 4
    with torch.no_grad():
        model.weight.zero_()
    step, folder = mgr.restore([state])
    assert (step, folder.name) == (3, "step-3")
    assert torch.equal(model.weight, torch.full((2, 2), 3.0))
