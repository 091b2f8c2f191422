"""Trackers: metrics.jsonl always; TensorBoard and W&B (offline) with run name and group from the Hydra
job; secrets never reach a saved file."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runner import cli_env, metrics, run_cli, single_thread, stage_dir, tiny_overrides

from align_runner import api
from align_runner.redact import MASK, redact, redact_text

WANDB_SECRET = "wandb-secret-0123456789abcdef"
HF_SECRET = "hf_secretTOKENvalue987654321"


def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tiny):
    with single_thread():
        result = api.run([*tiny, "pipeline.eval=false", "tracking=tensorboard"])
    sft = Path(result.stage("sft").dir)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(sft / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("sft/loss")]
    expected = [(r["step"], r["loss"]) for r in metrics(sft) if "loss" in r]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert losses == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]


def _leaks(root: Path) -> list[str]:
    return [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and (WANDB_SECRET.encode() in p.read_bytes() or HF_SECRET.encode() in p.read_bytes())
    ]


def test_wandb_offline_api_run_keeps_the_key_out_of_every_file(tiny, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    with single_thread():
        result = api.run([*tiny, "pipeline.eval=false", "tracking=wandb", "tracking.api_key=${oc.env:WANDB_API_KEY}"])
    sft = Path(result.stage("sft").dir)
    assert len(list((sft / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    import json

    # outside a Hydra job the run is named after its run dir, with no group
    assert json.loads((sft / "tracking.json").read_text())["run_name"] == f"{result.run_dir.name}/sft"
    assert f"api_key: '{MASK}'" in (result.run_dir / "config.yaml").read_text()
    assert _leaks(Path(tiny[1].split("=", 1)[1])) == []


@pytest.mark.slow
def test_wandb_offline_run_named_from_the_hydra_job_and_no_secret_in_any_file(tmp_path, model_cache):
    out = tmp_path / "outputs"
    env = cli_env(WANDB_MODE="offline", WANDB_API_KEY=WANDB_SECRET, HF_TOKEN=HF_SECRET)
    overrides = tiny_overrides(out, model_cache, "tracking=wandb", "tracking.api_key=${oc.env:WANDB_API_KEY}")
    run = run_cli(overrides, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]

    run_dir = next(out.glob("*/*/run.json")).parent
    sft = stage_dir(out, "sft")
    import json

    identity = json.loads((sft / "tracking.json").read_text())
    assert identity["run_name"] == f"{run_dir.parent.name}_{run_dir.name}/sft"
    assert identity["group"] == "cli"  # the Hydra job name
    offline = list((sft / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    assert identity["run_name"].encode() in offline[0].read_bytes()

    # the resolved config keeps the key's place, masked
    saved = (run_dir / "config.yaml").read_text()
    assert f"api_key: '{MASK}'" in saved
    assert (run_dir / ".hydra" / "overrides.yaml").exists()  # Hydra's own copies are checked too
    assert _leaks(out) == []
    assert WANDB_SECRET not in run.stdout + run.stderr


def test_redact_masks_secret_keys_and_secret_environment_values():
    env = {"WANDB_API_KEY": WANDB_SECRET, "HF_TOKEN": HF_SECRET, "TOKENIZERS_PARALLELISM": "false", "HOME": "/root"}
    cfg = {
        "tracking": {"api_key": "typed-in-key-123", "project": "p"},
        "model": {"source": {"name_or_path": f"https://user:{HF_SECRET}@host/repo", "token": None}},
        "data": {"pad_token": "<|endoftext|>", "max_new_tokens": 32},
        "list": [WANDB_SECRET, "ok"],
    }
    out = redact(cfg, env)
    assert out["tracking"] == {"api_key": MASK, "project": "p"}
    assert out["model"]["source"] == {"name_or_path": f"https://user:{MASK}@host/repo", "token": None}
    assert out["data"] == cfg["data"]  # "pad_token" and "max_new_tokens" are not secrets
    assert out["list"] == [MASK, "ok"]
    assert redact_text(f"key={WANDB_SECRET}", env) == f"key={MASK}"
