"""Sharding is real (slow: each case starts 2 processes twice; DeepSpeed's first start JIT-builds a
comm op). For every 2-process CPU profile: the run is killed mid-stage and rerun; the rerun resumes from
the last checkpoint; run.json shows the sharding really happened (DDP wrapper, ZeRO optimizer class and
stage, DTensor-sharded parameters); losses and final weights equal a single-process run with the same
global batch within tolerance; the saved model is a full Hugging Face checkpoint that reloads."""

from __future__ import annotations

import pytest
from cli_runner import metrics, run_cli, run_manifest, single_reference, stage_dir, tiny_overrides, weights
from test_resume import SLOW, _kill_after_first_checkpoint

# Sums in another order (reduce-scatter vs one process) differ in the last bits. Measured on CPU:
# DDP equal bitwise; ZeRO-2/3 and FSDP2 within 1.2e-7 on weights and 9e-8 relative on losses. A resume
# that lost optimizer or RNG state would be off by ~lr (1e-3) on the weights.
LOSS_RTOL, WEIGHT_ATOL = 1e-6, 2e-6
N = 139_584  # parameters of the tiny model (test_preflight works it out by hand)


def _check_ddp(s):
    assert s["wrapper"] == "DistributedDataParallel"


def _check_zero2(s):
    assert (s["optimizer"], s["zero_stage"]) == ("DeepSpeedZeroOptimizer", 2)
    assert s["trainable_numel"] == N and s["optimizer_partition_numel"] == N // 2  # fp32 masters split in 2


def _check_zero3(s):
    assert (s["optimizer"], s["zero_stage"]) == ("DeepSpeedZeroOptimizer_Stage3", 3)
    assert s["optimizer_partition_numel"] <= N // 2 + 64
    assert s["param_numel"] == N and s["local_param_numel"] <= N // 2 + 64  # weights partitioned too


def _check_fsdp2(s):
    assert s["dtensor_params"] == s["params"] == 21
    assert s["placements"] == ["(Shard(dim=0),)"]
    assert (s["global_numel"], s["local_numel"]) == (N, N // 2)


CASES = {"cpu_ddp2": _check_ddp, "cpu_zero2": _check_zero2, "cpu_zero3": _check_zero3, "cpu_fsdp2": _check_fsdp2}


@pytest.mark.slow
@pytest.mark.parametrize("profile", list(CASES))
def test_two_process_profile_shards_resumes_and_matches_single_process(profile, tmp_path, model_cache):
    out, ref_out = tmp_path / profile, tmp_path / "single"
    overrides = tiny_overrides(out, model_cache, f"hardware={profile}", *SLOW)

    last = _kill_after_first_checkpoint(overrides, out, tmp_path)
    run = run_cli(overrides, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"sft: resumed from step {last}/12" in run.stdout + run.stderr

    hardware = run_manifest(out)["hardware"]
    assert hardware["world_size"] == 2
    CASES[profile](hardware["sharding"])

    single_reference(ref_out, model_cache, *SLOW, micro=8, accum=2)
    sharded, single = stage_dir(out, "sft"), stage_dir(ref_out, "sft")
    rows, ref_rows = metrics(sharded), metrics(single)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [*range(1, 13), 12]
    for r, q in zip(rows, ref_rows):
        for k in ("loss", "eval/loss", "lr"):
            if k in q:
                assert r[k] == pytest.approx(q[k], rel=LOSS_RTOL), (r["step"], k)

    w, ref_w = weights(sharded), weights(single)
    assert w.keys() == ref_w.keys() and all(w[k].shape == ref_w[k].shape for k in w)  # full, unsharded
    assert max((w[k] - ref_w[k]).abs().max().item() for k in w) < WEIGHT_ATOL
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(sharded / "model")
    assert sum(p.numel() for p in reloaded.parameters()) == N
