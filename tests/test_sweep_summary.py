"""A multirun writes summary.md, summary.csv and summary.png in its sweep dir (the Hydra callback
align_runner.sweep.SweepSummary): one row per job with its swept values, status, objective, the main
stage's key metrics, cache hits and time, the best job marked for the objective's direction. The table
logic on synthetic job dirs; the real command line with the basic launcher, including a failed job."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_runner import cli_env, run_cli, tiny_overrides

from align_runner.pipeline.sweep_summary import (
    SUMMARY_CSV,
    SUMMARY_MD,
    SUMMARY_PNG,
    best_job,
    read_jobs,
    swept_keys,
    write_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def failing_loss(logps, labels, *, num_items=None):
    """A loss ``_target_`` whose job fails while training (the CLI test's second job)."""
    raise RuntimeError("deliberately failing loss")


def _stage(name: str, kind: str, hit: bool, seconds: float, metrics: dict[str, float]) -> dict[str, Any]:
    return {"name": name, "kind": kind, "key": f"{name}-key", "dir": "", "cache_hit": hit, "seconds": seconds, "metrics": metrics}


def _job(sweep: Path, num: int, overrides: list[str], objective: float | None = None, direction: str = "maximize") -> None:
    """A job dir as Hydra and the pipeline leave it; ``objective`` None: a job that failed (no run.json)."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if objective is None:
        return
    stages = [
        _stage("data_prep", "data_prep", True, 0.5, {"sft/train/kept": 64.0}),
        _stage("sft", "sft", True, 1.5, {"loss": 1.0}),
        _stage("dpo", "dpo", False, 10.0 + num, {"loss": 0.5 + num, "rewards/accuracies": 0.25 * num, "lr": 1e-3}),
        _stage("eval_after", "eval", False, 2.0, {"accuracy": objective}),
    ]
    run = {"stages": stages, "main_stage": "dpo", "objective": {"name": "eval_after/accuracy", "value": objective, "direction": direction}}
    (job / "run.json").write_text(json.dumps(run))


def _set_direction(sweep: Path, direction: str) -> None:
    for path in sweep.glob("*/run.json"):
        run = json.loads(path.read_text())
        run["objective"]["direction"] = direction
        path.write_text(json.dumps(run))


def _csv_rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / SUMMARY_CSV).open() as f:
        return list(csv.DictReader(f))


def test_table_and_best_job_from_synthetic_job_dirs(tmp_path):
    sweep = tmp_path / "sweep"
    fixed = ["model=tiny", "algorithm=dpo"]
    _job(sweep, 0, [*fixed, "algorithm.loss.beta=0.05", "+loss=sigmoid"], 0.5)
    _job(sweep, 1, [*fixed, "algorithm.loss.beta=0.1", "+loss=ipo"], 0.75)
    _job(sweep, 2, [*fixed, "algorithm.loss.beta=0.3", "+loss=sigmoid"])  # failed: no run.json
    _job(sweep, 10, [*fixed, "algorithm.loss.beta=0.5", "+loss=ipo"], 0.25)

    jobs = read_jobs(sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "10"]  # by job number, not as text
    assert [j.status for j in jobs] == ["ok", "ok", "failed", "ok"]
    assert swept_keys(jobs) == ["algorithm.loss.beta", "loss"]  # model and algorithm do not vary
    assert best_job(jobs, "maximize").name == "1" and best_job(jobs, "minimize").name == "10"

    paths = write_summary(sweep)
    assert paths == [sweep / SUMMARY_MD, sweep / SUMMARY_CSV, sweep / SUMMARY_PNG]
    rows = _csv_rows(sweep)
    assert list(rows[0]) == ["job", "status", "best", "algorithm.loss.beta", "loss", "objective", "dpo/loss",
                             "dpo/rewards/accuracies", "cache_hits", "seconds"]
    assert rows[1] == {"job": "1", "status": "ok", "best": "best", "algorithm.loss.beta": "0.1", "loss": "ipo",
                       "objective": "0.75", "dpo/loss": "1.5", "dpo/rewards/accuracies": "0.25", "cache_hits": "2/4",
                       "seconds": str(0.5 + 1.5 + 11.0 + 2.0)}
    assert rows[2] == {**dict.fromkeys(rows[2], ""), "job": "2", "status": "failed", "algorithm.loss.beta": "0.3", "loss": "sigmoid"}
    assert [r["best"] for r in rows] == ["", "best", "", ""]
    md = (sweep / SUMMARY_MD).read_text()
    assert "4 jobs, 3 ok, 1 failed. Objective `eval_after/accuracy` (maximize): best is job 1 = 0.75." in md
    assert "| **1** | **ok** | **best** | **0.1** | **ipo** | **0.75** |" in md
    assert "| 2 | failed |  | 0.3 | sigmoid |" in md
    assert (sweep / SUMMARY_PNG).read_bytes()[:8] == PNG_MAGIC

    _set_direction(sweep, "minimize")
    write_summary(sweep)
    assert [r["best"] for r in _csv_rows(sweep)] == ["", "", "", "best"]
    assert "(minimize): best is job 10 = 0.25." in (sweep / SUMMARY_MD).read_text()


def test_a_key_the_sweep_was_launched_to_vary_is_a_column_even_with_one_job(tmp_path):
    sweep = tmp_path / "sweep"
    _job(sweep, 0, ["model=tiny", "train.lr=1e-3"], 0.5)
    assert swept_keys(read_jobs(sweep)) == []
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": ["model=tiny", "train.lr=1e-3"]},
                                                                   "sweeper": {"params": {"seed": "range(3)"}}}}))
    write_summary(sweep)  # train.lr is fixed, seed is the sweeper's (Optuna-style) parameter
    assert list(_csv_rows(sweep)[0])[3:4] == ["objective"]
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": ["model=tiny", "train.lr=1e-3,1e-2"]}}}))
    write_summary(sweep)
    assert _csv_rows(sweep)[0]["train.lr"] == "1e-3"


def _sweep(tmp_path: Path, model_cache: str, *extra: str):
    out = tmp_path / "outputs"
    overrides = tiny_overrides(out, model_cache, "train.max_steps=2", "pipeline.objective=sft/eval/loss", *extra)
    done = run_cli(["-m", *overrides], cwd=tmp_path, env=cli_env())
    sweep = next(out.glob("multirun/*/*"))
    return done, sweep


def _installed(plugin: str) -> bool:
    return importlib.util.find_spec(f"hydra_plugins.{plugin}") is not None


def _plugin(name: str, plugin: str):
    return pytest.param(name, marks=pytest.mark.skipif(not _installed(plugin), reason=f"{plugin} is not installed"))


# the callback reads only job dirs: any launcher. joblib runs the two jobs at once, in worker processes;
# submitit_local at once too, each in a subprocess of its own (submitit's .submitit/ folder of logs
# and pickles sits beside the job dirs)
LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local"],
}


@pytest.mark.parametrize(
    "launcher",
    ["basic", _plugin("joblib", "hydra_joblib_launcher"), _plugin("submitit_local", "hydra_submitit_launcher")],
)
def test_cli_sweep_writes_a_summary_equal_to_the_jobs_run_json(tmp_path, model_cache, launcher):
    done, sweep = _sweep(
        tmp_path, model_cache, "pipeline.direction=minimize", "tracking=tensorboard", "train.lr=1e-3,1e-2", *LAUNCHERS[launcher]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"align_runner: sweep summary: {sweep / SUMMARY_MD}" in done.stdout
    runs = [json.loads((sweep / n / "run.json").read_text()) for n in ("0", "1")]
    rows = _csv_rows(sweep)
    # the values as Hydra recorded each job's overrides (it writes a swept float in its own form)
    assert [(r["job"], r["status"], r["train.lr"]) for r in rows] == [("0", "ok", "0.001"), ("1", "ok", "0.01")]
    for row, run in zip(rows, runs):
        sft = next(s for s in run["stages"] if s["name"] == "sft")
        assert run["main_stage"] == "sft" and run["objective"]["direction"] == "minimize"
        assert float(row["objective"]) == run["objective"]["value"] == sft["metrics"]["eval/loss"]
        for metric in ("loss", "eval/loss", "mean_token_accuracy"):
            assert float(row[f"sft/{metric}"]) == sft["metrics"][metric]
        assert float(row["seconds"]) == sum(s["seconds"] for s in run["stages"])
    # one job computes data_prep, the other reuses it (with joblib, whichever took its lock second)
    assert sorted(r["cache_hits"] for r in rows) == ["0/2", "1/2"]
    values = [run["objective"]["value"] for run in runs]
    assert values[0] != values[1]
    lowest = values.index(min(values))
    assert [r["best"] for r in rows] == ["best" if i == lowest else "" for i in range(2)]
    assert (sweep / SUMMARY_PNG).read_bytes()[:8] == PNG_MAGIC
    _set_direction(sweep, "maximize")
    write_summary(sweep)
    assert [r["best"] for r in _csv_rows(sweep)] == ["" if i == lowest else "best" for i in range(2)]

    # one tracker run per job, grouped by the sweep
    group = f"{sweep.parent.name}_{sweep.name}"
    identities = [json.loads((sweep / n / "tracking.json").read_text()) for n in ("0", "1")]
    assert [(i["run_name"], i["group"]) for i in identities] == [(f"{group}-0", group), (f"{group}-1", group)]


def test_cli_sweep_with_a_failing_job_lists_it_as_failed(tmp_path, model_cache):
    losses = "algorithm.loss._target_=align_runner.algos.sft.sft_loss,test_sweep_summary.failing_loss"
    done, sweep = _sweep(tmp_path, model_cache, losses)
    assert done.returncode != 0 and "deliberately failing loss" in done.stderr
    rows = _csv_rows(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "failed")]
    assert rows[1]["algorithm.loss._target_"] == "test_sweep_summary.failing_loss"
    assert [r["best"] for r in rows] == ["best", ""]  # the only job with an objective
    assert "2 jobs, 1 ok, 1 failed" in (sweep / SUMMARY_MD).read_text()


# a user's recipe in their own config dir: an Optuna search over the learning rate
LR_SEARCH = """# @package _global_
defaults:
  - override /search: optuna
hydra:
  sweeper:
    params:
      train.lr: interval(1e-4, 1e-2)
"""
OPTUNA = "hydra_optuna_sweeper"


@pytest.mark.skipif(not _installed(OPTUNA), reason=f"{OPTUNA} is not installed")
def test_optuna_sweep_optimises_the_returned_objective_in_pipeline_direction_and_summarises_its_trials(tmp_path, model_cache):
    conf = tmp_path / "conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "lr_search.yaml").write_text(LR_SEARCH)
    out = tmp_path / "outputs"
    # the search sets train.lr: no fixed value for it on the command line (Optuna would drop it from the search)
    fixed = [o for o in tiny_overrides(out, model_cache, "train.max_steps=2") if not o.startswith("train.lr=")]
    # maximize, not Optuna's default: a search that minimised would pick the other trial
    extra = ["experiment=lr_search", "pipeline.objective=sft/eval/loss", "pipeline.direction=maximize", "hydra.sweeper.n_trials=2"]
    done = run_cli(["-m", "--config-dir", str(conf), *fixed, *extra], cwd=tmp_path, env=cli_env())
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = next(out.glob("multirun/*/*"))
    rows = _csv_rows(sweep)
    # the swept values come from each job's overrides (Optuna's trials are not in -m a=1,2)
    assert list(rows[0])[:5] == ["job", "status", "best", "train.lr", "objective"]
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok")]
    lrs = []
    for row in rows:
        overrides = yaml.safe_load((sweep / row["job"] / ".hydra" / "overrides.yaml").read_text())
        assert f"train.lr={row['train.lr']}" in overrides
        lrs.append(float(row["train.lr"]))
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and lrs[0] != lrs[1]
    values = [json.loads((sweep / r["job"] / "run.json").read_text())["objective"]["value"] for r in rows]
    assert [float(r["objective"]) for r in rows] == values and values[0] != values[1]
    highest = values.index(max(values))
    assert [r["best"] for r in rows] == ["best" if i == highest else "" for i in range(2)]
    assert (sweep / SUMMARY_PNG).read_bytes()[:8] == PNG_MAGIC
    # Optuna got each job's objective back from the task and maximised it (pipeline.direction): its
    # best trial is the summary's best job
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == max(values) and result["best_params"] == {"train.lr": lrs[highest]}


@pytest.mark.skipif(not _installed(OPTUNA), reason=f"{OPTUNA} is not installed")
def test_optuna_direction_is_taken_from_pipeline_direction_and_a_different_one_is_a_config_error():
    from align_runner.api import _compose
    from align_runner.sweep import direction_mismatch

    def composed(*overrides: str):
        return _compose(["model=tiny", *overrides], hydra_config=True)

    for direction in ("minimize", "maximize"):
        cfg = composed("search=optuna", f"pipeline.direction={direction}")
        assert str(cfg.hydra.sweeper.direction) == direction and direction_mismatch(cfg) is None
    assert composed("search=optuna", "seed=3").hydra.sweeper.sampler.seed == 3  # a seeded search by default
    assert direction_mismatch(composed()) is None  # the basic sweeper has no direction
    assert direction_mismatch(composed("hydra/sweeper=optuna", "pipeline.direction=minimize")) is None
    # the plugin's own default (minimize) against ours (maximize)
    assert direction_mismatch(composed("hydra/sweeper=optuna")) == (
        "hydra.sweeper.direction=minimize but pipeline.direction=maximize: the sweeper must optimise the one "
        "objective (eval_after/accuracy) the way pipeline.direction says. Use search=optuna (it takes "
        "pipeline.direction), or hydra.sweeper.direction='${pipeline.direction}'"
    )
    assert direction_mismatch(composed("search=optuna", "hydra.sweeper.direction=minimize")).startswith(
        "hydra.sweeper.direction=minimize but pipeline.direction=maximize"
    )
    assert direction_mismatch(composed("search=optuna", "hydra.sweeper.direction=[minimize,maximize]")).startswith(
        "hydra.sweeper.direction=minimize,maximize but pipeline.direction=maximize"
    )


@pytest.mark.skipif(not _installed(OPTUNA), reason=f"{OPTUNA} is not installed")
def test_a_sweep_whose_optuna_direction_differs_stops_before_any_job(tmp_path, model_cache):
    out = tmp_path / "outputs"
    search = ["hydra/sweeper=optuna", "train.lr=interval(1e-4,1e-2)", "hydra.sweeper.n_trials=2"]
    fixed = [o for o in tiny_overrides(out, model_cache) if not o.startswith("train.lr=")]
    done = run_cli(["-m", *fixed, *search], cwd=tmp_path, env=cli_env())
    assert done.returncode == 2, done.stderr[-3000:]
    assert "align_runner: config error: hydra.sweeper.direction=minimize but pipeline.direction=maximize" in done.stderr
    assert not list(out.glob("multirun/*/*/*/run.json")) and not (out / "store").exists()
