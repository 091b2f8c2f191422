"""scripts/bench: the --quick smoke runs produce their results (run.py's GRPO case, align_runner side;
ppo.py's time split and engine overhead)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_grpo_quick_align_runner(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench" / "run.py"),
            "grpo",
            "--quick",
            "--repeats",
            "1",
            "--only",
            "align_runner",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=tmp_path,  # the script finds the repo and writes only under --out and a temp dir
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "grpo-quick.json").read_text())
    ar = res["summary"]["align_runner"]
    assert ar["per_s"] > 0 and ar["peak_rss_mib"] > 0
    assert "trl" not in res["summary"] and "ratio" not in res["summary"]
    (run,) = res["runs"]
    assert run["steps"] == res["settings"]["steps"] == 2
    assert run["units"] == 2 * 4 * 8  # steps x prompts per step x generations
    assert (tmp_path / "grpo-quick.md").read_text().startswith("# grpo (quick)")


def test_ppo_quick_reports_the_time_split_and_engine_overhead(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench" / "ppo.py"),
            "--quick",
            "--overhead-repeats",
            "2",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "ppo-quick.json").read_text())
    phases = ("generation", "scoring", "reference", "values", "update")
    assert [r["rollout"] for r in res["rollouts"]] == [1, 2]  # --quick: 2 rollouts
    for r in res["rollouts"]:
        assert min(r[k] for k in phases) > 0 and r["other"] >= 0
        assert r["total"] == pytest.approx(sum(r[k] for k in (*phases, "other")))
    # the medians leave out the first rollout (one-time costs): of one rollout, the shares add up to the whole
    assert res["split"]["rollouts"] == [2] and sum(res["split"]["median_share"].values()) == pytest.approx(1.0)
    o = res["overhead"]
    assert o["optimizer_steps"] == 2 * 2 * 2  # ppo_epochs x steps_per_rollout x (policy, critic)
    assert len(o["engine_s"]) == len(o["bare_s"]) == 2 and min(o["engine_s"] + o["bare_s"]) > 0
    assert o["pairs_pct"] == [100 * (a - b) / b for a, b in zip(o["engine_s"], o["bare_s"])]
    assert o["median_pct"] == pytest.approx(sum(o["pairs_pct"]) / 2)
    assert "no PPO trainer" in res["trl"]
    assert (tmp_path / "ppo-quick.md").read_text().startswith("# ppo (quick)")
