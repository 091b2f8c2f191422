"""A sweep's summary: ``summary.md``, ``summary.csv`` and ``summary.png`` in its sweep dir.

One row per job: its swept values, status, objective, the main stage's key metrics, how many stages
were cache hits, and its time; the best job marked. Everything comes from the job dirs alone — each
job's ``.hydra/overrides.yaml`` (its values) and the ``run.json`` the pipeline writes last — so the
summary is the same whichever launcher ran the jobs (basic, joblib, submitit) and whichever sweeper
chose them (basic, Optuna). A job dir without ``run.json`` is a job that failed (or, in a summary
written while the sweep runs, one that has not finished).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align_runner.fsutil import atomic_write_text
from align_runner.pipeline.rundir import RUN_MANIFEST

SUMMARY_MD, SUMMARY_CSV, SUMMARY_PNG = "summary.md", "summary.csv", "summary.png"
OVERRIDES = Path(".hydra") / "overrides.yaml"
# Hydra's record of the sweep as launched (the basic sweeper writes it): its sweep overrides
MULTIRUN = "multirun.yaml"


@dataclass
class Job:
    name: str
    # the job's command-line overrides, key -> value as typed (``train.lr`` -> ``1e-3``)
    overrides: dict[str, str]
    # its run.json; None when the job failed
    run: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "ok" if self.run is not None else "failed"

    @property
    def objective(self) -> float | None:
        value = ((self.run or {}).get("objective") or {}).get("value")
        return None if value is None or not math.isfinite(float(value)) else float(value)


def read_jobs(sweep_dir: Path) -> list[Job]:
    """Every job dir of ``sweep_dir`` (a folder holding Hydra's overrides or a run.json), by job number."""
    dirs = [d for d in Path(sweep_dir).iterdir() if d.is_dir() and ((d / OVERRIDES).exists() or (d / RUN_MANIFEST).exists())]
    dirs.sort(key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
    return [_read_job(d) for d in dirs]


def _read_job(job_dir: Path) -> Job:
    overrides = yaml.safe_load((job_dir / OVERRIDES).read_text()) if (job_dir / OVERRIDES).exists() else []
    pairs = (str(o).lstrip("+~").partition("=") for o in overrides or [])
    job = Job(job_dir.name, {k: v for k, _, v in pairs})
    if (job_dir / RUN_MANIFEST).exists():
        job.run = json.loads((job_dir / RUN_MANIFEST).read_text())
        job.metrics = main_metrics(job.run)
    return job


def main_metrics(run: dict[str, Any]) -> dict[str, float]:
    """The main stage's key metrics (registry ``key_metrics``), as ``<stage>/<metric>``."""
    from align_runner.registry import get_stage

    stage = next((s for s in run.get("stages", []) if s["name"] == run.get("main_stage")), None)
    if stage is None:
        return {}
    try:
        keys = get_stage(stage["kind"]).key_metrics
    except KeyError:  # a kind of a plugin that is not installed here
        keys = ()
    return {f"{stage['name']}/{k}": stage["metrics"][k] for k in keys if k in stage["metrics"]}


def swept_keys(jobs: list[Job], declared: Iterable[str] = ()) -> list[str]:
    """The keys the sweep varies: ``declared`` ones (the sweep's own overrides) and any whose value
    differs between jobs (an Optuna sweeper's parameters), in the order the jobs give them."""
    declared = set(declared)
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    return [k for k in keys if k in declared or len({j.overrides.get(k) for j in jobs}) > 1]


def declared_keys(sweep_dir: Path, node: Mapping[str, Any] | None = None) -> list[str]:
    """Keys the sweep was launched to vary — its sweep overrides (``a=1,2``, ``range(...)``) and its
    sweeper's ``params`` (Optuna's search space) — from Hydra's ``multirun.yaml`` in the sweep dir, or
    else from ``node`` (the sweep config's ``hydra`` node)."""
    path = Path(sweep_dir) / MULTIRUN
    if path.exists():
        node = (yaml.safe_load(path.read_text()) or {}).get("hydra")
    node = node or {}
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = [str(o) for o in (node.get("overrides") or {}).get("task") or []]
    sweeps = [o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()]
    return sweeps + [str(k) for k in ((node.get("sweeper") or {}).get("params") or {})]


def best_job(jobs: list[Job], direction: str) -> Job | None:
    """The job with the largest (``maximize``) or smallest (``minimize``) objective; the first on ties."""
    scored = [j for j in jobs if j.objective is not None]
    if not scored:
        return None
    pick = max if direction == "maximize" else min
    return pick(scored, key=lambda j: j.objective)


def direction_of(jobs: list[Job]) -> str:
    """The objective's direction as the jobs recorded it (``pipeline.direction``); maximize by default."""
    return next((j.run["objective"].get("direction") for j in jobs if j.run and j.run.get("objective")), None) or "maximize"


def table(jobs: list[Job], swept: list[str], best: Job | None) -> tuple[list[str], list[list[Any]]]:
    """(columns, one row per job): raw values, None where a failed job has none."""
    metric_cols = list(dict.fromkeys(k for j in jobs for k in j.metrics))
    columns = ["job", "status", "best", *swept, "objective", *metric_cols, "cache_hits", "seconds"]
    rows = []
    for j in jobs:
        stages = (j.run or {}).get("stages", [])
        hits = f"{sum(bool(s['cache_hit']) for s in stages)}/{len(stages)}" if j.run else None
        seconds = sum(float(s["seconds"]) for s in stages) if j.run else None
        rows.append([j.name, j.status, "best" if j is best else "", *(j.overrides.get(k) for k in swept),
                     j.objective, *(j.metrics.get(k) for k in metric_cols), hits, seconds])
    return columns, rows


def write_summary(sweep_dir: Path, node: Mapping[str, Any] | None = None, *, final: bool = True) -> list[Path]:
    """Write the summary files of ``sweep_dir`` (``node``: the sweep config's hydra node, read when
    Hydra left no multirun.yaml); returns their paths (no plot without an objective or a swept key)."""
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir)
    swept = swept_keys(jobs, declared_keys(sweep_dir, node))
    direction = direction_of(jobs)
    best = best_job(jobs, direction)
    columns, rows = table(jobs, swept, best)
    atomic_write_text(sweep_dir / SUMMARY_CSV, to_csv(columns, rows))
    objective = next((j.run["objective"]["name"] for j in jobs if j.run and j.run.get("objective")), "objective")
    plot = plot_objective(jobs, swept, best, objective, sweep_dir / SUMMARY_PNG)
    atomic_write_text(sweep_dir / SUMMARY_MD, to_markdown(columns, rows, objective, direction, best, plot, final))
    return [sweep_dir / SUMMARY_MD, sweep_dir / SUMMARY_CSV] + ([plot] if plot else [])


def to_csv(columns: list[str], rows: list[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return out.getvalue()


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def to_markdown(columns, rows, objective: str, direction: str, best: Job | None, plot: Path | None, final: bool) -> str:
    failed = sum(r[1] == "failed" for r in rows)
    lines = [
        "# Sweep summary",
        "",
        f"{len(rows)} jobs, {len(rows) - failed} ok, {failed} failed"
        + ("" if final else " (written while the sweep runs: a job without run.json may still be running)")
        + f". Objective `{objective}` ({direction})"
        + (f": best is job {best.name} = {best.objective:.4g}." if best else ": no job reported it."),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(f"**{_fmt(v)}**" if row[2] and v is not None else _fmt(v) for v in row) + " |" for row in rows]
    if plot is not None:
        lines += ["", f"![objective against each swept parameter]({plot.name})"]
    return "\n".join(lines) + "\n"


def _numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def plot_objective(jobs: list[Job], swept: list[str], best: Job | None, objective: str, path: Path) -> Path | None:
    """One panel per swept parameter: the objective of each job that reported one against the
    parameter's value (numbers on a numeric axis, anything else as categories); the best job starred."""
    scored = [j for j in jobs if j.objective is not None]
    if not scored or not swept:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(swept), 3.4), layout="constrained")
    for i, key in enumerate(swept):
        ax = fig.add_subplot(1, len(swept), i + 1)
        raw = [j.overrides.get(key, "") for j in scored]
        xs = _numeric(raw)
        if xs is None:
            categories = list(dict.fromkeys(raw))
            xs = [float(categories.index(v)) for v in raw]
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        ax.scatter(xs, [j.objective for j in scored])
        if best is not None and best in scored:
            k = scored.index(best)
            ax.scatter([xs[k]], [best.objective], marker="*", s=200, color="tab:red", label=f"best (job {best.name})")
            ax.legend()
        ax.set_xlabel(key)
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
    # parallel jobs (joblib, submitit) each rewrite the summary when they end
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    return path
