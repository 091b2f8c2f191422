"""The run report: plots, stage table, before -> after, samples and config from a run dir's files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run

from align_runner.report import question, series, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHATML = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stage(store: Path, run_dir: Path, name: str, kind: str, key: str, metrics: dict, cache_hit: bool) -> dict:
    d = store / f"{kind}-{key[:12]}"
    d.mkdir(parents=True)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    (run_dir / "stages" / name).symlink_to(d, target_is_directory=True)
    return {"name": name, "kind": kind, "key": key, "dir": str(d), "cache_hit": cache_hit, "seconds": 1.5, "metrics": metrics}


@pytest.fixture
def fake_run(tmp_path) -> Path:
    """A run dir as run_pipeline leaves it: data_prep, eval_before, dpo (cached), eval_after."""
    store, run_dir = tmp_path / "store", tmp_path / "outputs" / "2025-01-01" / "12-00-00"
    run_dir.mkdir(parents=True)
    before = {"accuracy": 0.25, "format": 0.5, "last_number": 0.25, "num_prompts": 4.0, "heldout_loss": 2.5}
    after = {"accuracy": 0.75, "format": 1.0, "last_number": 0.75, "num_prompts": 4.0, "heldout_loss": 1.25}
    stages = [
        _stage(store, run_dir, "data_prep", "data_prep", "a" * 64, {"sft/train/kept": 64.0}, False),
        _stage(store, run_dir, "eval_before", "eval", "b" * 64, before, False),
        _stage(store, run_dir, "dpo", "dpo", "c" * 64, {"loss": 0.5, "rewards/margins": 0.3}, True),
        _stage(store, run_dir, "eval_after", "eval", "d" * 64, after, False),
    ]
    # the cached dpo stage's curves live in its store dir, written by whichever run computed it
    train_rows = [{"stage": "dpo", "step": s, "time": 0.0, "loss": 0.7 - 0.05 * s, "lr": 1e-3,
                   "rewards/margins": 0.1 * s, "rewards/accuracies": 0.5 + 0.1 * s} for s in range(1, 5)]
    train_rows.append({"stage": "dpo", "step": 4, "time": 0.0, "eval/loss": 0.6})
    _write_jsonl(Path(stages[2]["dir"]) / "metrics.jsonl", train_rows)
    for st, answers in ((stages[1], ["4", "x"]), (stages[3], ["5", "12 | 13"])):
        samples = [{"prompt": CHATML, "completion": answers[0], "answer": "5", "accuracy": float(answers[0] == "5")},
                   {"prompt": [{"role": "user", "content": "What is 6 + 6?"}], "completion": answers[1],
                    "answer": "12", "accuracy": 0.0}]
        (Path(st["dir"]) / "samples.json").write_text(json.dumps(samples))
    run_json = {"stages": stages, "objective": {"name": "eval_after/accuracy", "value": 0.75}, "git_sha": "abc123"}
    (run_dir / "run.json").write_text(json.dumps(run_json))
    (run_dir / "config.yaml").write_text("seed: 1234\nalgorithm:\n  name: dpo\n")
    return run_dir


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def test_report_has_plots_tables_samples_and_config(fake_run):
    report = write_report(fake_run)
    assert report == fake_run / "report.md"
    text = report.read_text()
    for png in ("report/before_after.png", "report/train_dpo.png"):
        assert _is_png(fake_run / png)
        assert f"]({png})" in text
    # only trained stages get curves
    assert sorted(p.name for p in (fake_run / "report").iterdir()) == ["before_after.png", "train_dpo.png"]
    for name in ("data_prep", "eval_before", "dpo", "eval_after"):
        assert f"| {name} |" in text
    assert f"| dpo | dpo | `{'c' * 12}` | hit | 1.5 |" in text
    assert "| eval_before | eval | `bbbbbbbbbbbb` | computed |" in text
    assert "| accuracy | 0.25 | 0.75 | +0.5 |" in text
    assert "| heldout_loss | 2.5 | 1.25 | -1.25 |" in text
    # samples: the question from the ChatML rendering and from messages, both completions side by side
    assert "| What is 2 + 3? | 5 | 4<br><sub>accuracy=0</sub> | 5<br><sub>accuracy=1</sub> |" in text
    assert "| What is 6 + 6? | 12 | x<br>" in text
    assert "12 \\| 13" in text  # a pipe in a completion must not break the table
    assert "```yaml\nseed: 1234\nalgorithm:\n  name: dpo\n```" in text
    assert "eval_after/accuracy` = 0.75" in text


def test_stage_dir_falls_back_to_the_run_dir_link(fake_run):
    run_json = json.loads((fake_run / "run.json").read_text())
    for s in run_json["stages"]:
        s["dir"] = "/nonexistent/moved-away"  # the recorded store path is gone; the link still works
    (fake_run / "run.json").write_text(json.dumps(run_json))
    text = write_report(fake_run).read_text()
    assert _is_png(fake_run / "report" / "train_dpo.png")
    assert "What is 2 + 3?" in text


def test_report_without_eval_stages(tmp_path):
    run_dir = tmp_path / "run"
    stage = _stage(tmp_path / "store", run_dir, "sft", "sft", "e" * 64, {"loss": 1.0}, False)
    _write_jsonl(Path(stage["dir"]) / "metrics.jsonl", [{"stage": "sft", "step": 1, "time": 0, "loss": 1.0, "lr": 0.1}])
    (run_dir / "run.json").write_text(json.dumps({"stages": [stage]}))
    text = write_report(run_dir).read_text()
    assert "Before → after" not in text and "Sample generations" not in text
    assert "config.yaml not found" in text
    assert _is_png(run_dir / "report" / "train_sft.png")


def test_series_sorts_and_keeps_the_last_value_of_a_resumed_step():
    rows = [{"step": 2, "loss": 3.0}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 2.0},
            {"step": 3, "loss": "nan"}, {"step": 4, "lr": 1.0}]
    steps, values = series(rows, "loss")
    assert steps == [1, 2, 3] and values[:2] == [4.0, 2.0] and values[2] != values[2]


def test_question_extraction():
    assert question(CHATML) == "What is 2 + 3?"
    llama = "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert question(llama) == "Hi there"
    assert question([{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                     {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]) == "q2"
    long_plain = "x" * 1000 + "the end"
    assert question(long_plain).startswith("…") and question(long_plain).endswith("the end")


def test_cli_regenerates_and_fails_clearly_without_run_json(fake_run, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "align_runner.report", str(fake_run)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (fake_run / "report.md").exists() and str(fake_run / "report.md") in ok.stdout
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    bad = subprocess.run([sys.executable, "-m", "align_runner.report", str(empty)], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "run.json" in bad.stderr and str(empty) in bad.stderr


def test_pipeline_run_writes_the_report_and_survives_a_report_bug(tiny, monkeypatch, caplog):
    result = run(tiny)
    text = (result.run_dir / "report.md").read_text()
    for s in result.stages:
        assert f"| {s.name} |" in text
    assert _is_png(result.run_dir / "report" / "train_sft.png")
    assert _is_png(result.run_dir / "report" / "before_after.png")
    assert "## Sample generations" in text

    def broken(run_dir):
        raise RuntimeError("report bug")

    # all stages are cache hits now; a failing report only warns, the run still returns its result
    monkeypatch.setattr("align_runner.report.write_report", broken)
    again = run(tiny)
    assert all(s.cache_hit for s in again.stages) and (again.run_dir / "run.json").exists()
    assert not (again.run_dir / "report.md").exists()
    assert "could not write the run report" in caplog.text
