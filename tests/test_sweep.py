"""A beta sweep over DPO trains SFT and computes the reference log-probs once, and DPO once per beta:
through the Python API (counting reference computations and model forward passes) and through the
real command line with Hydra's ``-m`` (reading the run manifests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run
from omegaconf import OmegaConf
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from align_runner.stages import ref_logps

# DPO after SFT, without the generation evals; a learning rate the tiny model moves with
DPO = ["algorithm=dpo", "algorithm.train.lr=1e-3", "pipeline.eval=false", "data.preference.eval.limit=16"]
STAGES = ["data_prep", "sft", "ref_logps", "dpo"]


@pytest.fixture
def counters(monkeypatch) -> dict[str, int]:
    """Counts reference computations (one per data split) and forward passes of the tiny Llama."""
    calls = {"reference": 0, "forward": 0}
    compute, forward = ref_logps.compute_reference_logps, LlamaForCausalLM.forward

    def counting_compute(*args, **kwargs):
        calls["reference"] += 1
        return compute(*args, **kwargs)

    def counting_forward(self, *args, **kwargs):
        calls["forward"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ref_logps, "compute_reference_logps", counting_compute)
    monkeypatch.setattr(LlamaForCausalLM, "forward", counting_forward)
    return calls


def _hits(result) -> dict[str, bool]:
    return {s.name: s.cache_hit for s in result.stages}


def test_beta_sweep_reuses_sft_and_reference_and_runs_no_reference_forward(tiny, counters):
    first = run([*tiny, *DPO, "algorithm.loss.beta=0.05"])
    assert _hits(first) == dict.fromkeys(STAGES, False)
    assert counters["reference"] == 2  # the train and eval splits

    counters.update(reference=0, forward=0)
    second = run([*tiny, *DPO, "algorithm.loss.beta=0.1"])
    assert _hits(second) == {"data_prep": True, "sft": True, "ref_logps": True, "dpo": False}
    assert counters["reference"] == 0
    # one forward per micro-batch, the policy's: 4 train steps of one micro-batch + 16 eval pairs / 8.
    # A reference forward per batch would double this.
    assert counters["forward"] == 4 + 16 // 8
    assert second.stage("ref_logps").key == first.stage("ref_logps").key
    assert second.stage("dpo").key != first.stage("dpo").key
    manifest = json.loads((second.run_dir / "run.json").read_text())
    assert {s["name"]: s["cache_hit"] for s in manifest["stages"]} == _hits(second)

    counters.update(reference=0, forward=0)
    again = run([*tiny, *DPO, "algorithm.loss.beta=0.1"])
    assert all(_hits(again).values()) and counters == {"reference": 0, "forward": 0}


def test_cli_multirun_sweep_shares_upstream_stages(tmp_path, model_cache):
    outputs = tmp_path / "outputs"
    cmd = [
        sys.executable,
        "-m",
        "align_runner",
        "-m",
        *DPO,
        "algorithm.loss.beta=0.05,0.1",
        "model=tiny",
        f"paths.outputs={outputs}",
        f"paths.cache={model_cache}",
        "data.sft.train.limit=16",
        "data.preference.train.limit=16",
        "train.max_steps=2",
        "train.lr=1e-3",
        "train.progress=false",
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    run_files = sorted(outputs.glob("multirun/*/*/*/run.json"), key=lambda p: int(p.parent.name))
    assert [p.parent.name for p in run_files] == ["0", "1"]
    jobs = []
    for path in run_files:
        beta = OmegaConf.load(path.parent / "config.yaml").algorithm.loss.beta
        stages = {s["name"]: s for s in json.loads(path.read_text())["stages"]}
        jobs.append((beta, stages))
    (beta0, job0), (beta1, job1) = jobs
    assert (beta0, beta1) == (0.05, 0.1)
    assert list(job0) == list(job1) == STAGES
    assert not any(s["cache_hit"] for s in job0.values())
    assert {n: s["cache_hit"] for n, s in job1.items()} == {
        "data_prep": True,
        "sft": True,
        "ref_logps": True,
        "dpo": False,
    }
    for name in ("data_prep", "sft", "ref_logps"):
        assert job0[name]["key"] == job1[name]["key"]
    assert job0["dpo"]["key"] != job1["dpo"]["key"]
    assert Path(job1["ref_logps"]["dir"], "ref-train.jsonl").exists()
