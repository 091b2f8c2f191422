"""Self-launch and DDP: ``hardware=cpu_ddp2`` relaunches the CLI under torchrun with 2 processes that
train like one process with the same global batch; only rank 0 writes; a rank's failure stops the job
with that rank's error."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from cli_runner import (
    metrics,
    run_cli,
    run_manifest,
    single_reference,
    stage_dir,
    tiny_overrides,
    weights,
)

from align_runner import cli
from align_runner.pipeline.runner import _check_ranks_agree
from align_runner.pipeline.store import DONE

# measured: equal bitwise on CPU (one thread per process); the tolerance allows other reduction orders
LOSS_RTOL = 1e-6


def test_ddp2_self_launch_matches_single_process(tmp_path, model_cache):
    out, ref_out = tmp_path / "ddp", tmp_path / "single"
    run = run_cli(tiny_overrides(out, model_cache, "hardware=cpu_ddp2"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "relaunching under torchrun: 2 process(es)" in run.stderr

    manifest = run_manifest(out)
    assert manifest["hardware"]["world_size"] == 2
    assert manifest["hardware"]["sharding"]["wrapper"] == "DistributedDataParallel"
    # both ranks used one run dir, and only rank 0 wrote into it (one .hydra, one line per stage)
    run_dirs = list(out.glob("*/*/run.json"))
    assert len(run_dirs) == 1
    log = (run_dirs[0].parent / "cli.log").read_text()
    assert log.count("stage sft") == 1 and log.count("stage data_prep") == 1

    # 2 processes x micro-batch 8 == 1 process x micro-batch 8 x 2 accumulation steps
    single_reference(ref_out, model_cache, micro=8, accum=2)
    ddp, single = stage_dir(out, "sft"), stage_dir(ref_out, "sft")
    rows, ref_rows = metrics(ddp), metrics(single)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [1, 2, 3, 4, 4]
    for r, q in zip(rows, ref_rows):
        for k, rtol in (("loss", LOSS_RTOL), ("eval/loss", LOSS_RTOL), ("grad_norm", 10 * LOSS_RTOL)):
            if k in q:
                assert r[k] == pytest.approx(q[k], rel=rtol), (r["step"], k)
    w, ref_w = weights(ddp), weights(single)
    assert max((w[k] - ref_w[k]).abs().max().item() for k in ref_w) < 2e-6
    from transformers import AutoModelForCausalLM

    assert sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(ddp / "model").parameters()) > 0


@pytest.mark.slow
def test_a_failing_rank_stops_the_job_with_its_error(tmp_path, model_cache):
    out = tmp_path / "out"
    overrides = tiny_overrides(
        out, model_cache, "hardware=cpu_ddp2", "algorithm.loss._target_=cli_runner.rank_failing_loss", "+algorithm.loss.rank=1"
    )
    t0 = time.time()
    run = run_cli(overrides, cwd=tmp_path, timeout=300)
    # rank 0 was waiting in an all-reduce; torchrun stopped it instead of letting gloo time out (30 min)
    assert time.time() - t0 < 240
    assert run.returncode == 1
    assert "rank 1 failed (exit code 1): ValueError: boom on rank 1" in run.stderr
    assert "rank_failing_loss" in run.stderr  # the failing rank's traceback
    assert not (stage_dir(out, "sft") / DONE).exists()


# ---------------------------------------------------------------------------------- fast units


def test_parent_reports_first_failed_rank_and_its_exit_code(tmp_path, capsys):
    for rank, t, code in ((1, 10.0, 3), (0, 11.0, 1)):
        (tmp_path / f"rank-{rank}.json").write_text(
            json.dumps({"rank": rank, "time": t, "exitcode": code, "error": f"E{rank}", "traceback": f"tb{rank}\n"})
        )
    assert cli._report_failures(tmp_path, rc=1) == 3
    err = capsys.readouterr().err
    assert "tb1" in err and "rank 1 failed (exit code 3): E1" in err
    assert cli._report_failures(tmp_path, rc=0) == 0


def test_rank_records_its_failure(tmp_path, monkeypatch):
    monkeypatch.setenv(cli.FAILURE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    try:
        raise KeyError("missing")
    except KeyError as e:
        cli._record_failure(e)
    cli._record_failure(SystemExit(1))  # Hydra's exit after the error: the first record stays
    report = json.loads((tmp_path / "rank-1.json").read_text())
    assert report["rank"] == 1 and report["exitcode"] == 1 and report["error"] == "KeyError: 'missing'"
    assert "raise KeyError" in report["traceback"]


def test_other_ranks_write_nothing_into_the_run_dir(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert cli._rank_overrides([]) == ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    monkeypatch.setenv("RANK", "0")
    assert cli._rank_overrides([]) == []


def test_torchrun_command_single_node_and_multinode(monkeypatch):
    from align_runner.api import compose

    hw = compose(["model=tiny", "hardware=cpu_ddp2"]).hardware
    cmd = cli.torchrun_command(hw, ["hardware=cpu_ddp2"], "/runs/a b")
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1", "--standalone",
                       "-m", "align_runner", "hardware=cpu_ddp2", "hydra.run.dir='/runs/a b'"]
    for k, v in {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_GPUS_ON_NODE": "8", "MASTER_ADDR": "node01",
                 "MASTER_PORT": "29511", "SLURM_JOB_ID": "77"}.items():
        monkeypatch.setenv(k, v)
    hw = compose(["model=tiny", "hardware=multinode"]).hardware
    cmd = cli.torchrun_command(hw, [], "/runs/x")
    assert cmd[3:17] == ["--nproc_per_node", "8", "--nnodes", "4", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                         "node01:29511", "--rdzv_id", "77", "--node_rank", "2", "-m", "align_runner"]


def test_ranks_that_plan_other_keys_fail_loudly():
    stage = SimpleNamespace(spec=SimpleNamespace(name="sft"), key="k-rank1")
    other_rank = SimpleNamespace(rank=1, broadcast_object=lambda obj: [("sft", "k-rank0")])
    with pytest.raises(RuntimeError, match="rank 1 planned stage keys"):
        _check_ranks_agree(other_rank, [stage])
    same = SimpleNamespace(rank=1, broadcast_object=lambda obj: obj)
    _check_ranks_agree(same, [stage])


def test_world_size_mismatch_is_a_config_error(monkeypatch):
    from align_runner.api import compose

    cfg = compose(["model=tiny", "hardware=cpu_ddp2"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(cli.ConfigError, match="wants 2 processes but this job runs in 1"):
        cli._check_world_size(cfg)


