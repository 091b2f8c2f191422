"""scripts/bench/run.py: the GRPO case's --quick smoke run of the align_runner side produces a result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
