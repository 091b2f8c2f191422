"""The end-of-run table: each stage, cached or computed, its time and key metrics, the rows each data
view was prepared from (and what was cut or dropped), before -> after."""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from align_runner.pipeline.runner import RunResult
from align_runner.registry import get_stage


def _fmt(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() and abs(v) >= 1 else f"{v:.4g}"


def summary_table(result: RunResult) -> Table:
    table = Table(title=f"align_runner: {result.run_dir}", title_justify="left")
    for col in ("stage", "key", "cache", "time", "metrics"):
        table.add_column(col)
    for r in result.stages:
        keys = get_stage(r.kind).key_metrics or tuple(sorted(r.metrics))[:4]
        shown = ", ".join(f"{k}={_fmt(r.metrics[k])}" for k in keys if k in r.metrics)
        table.add_row(r.name, r.key[:12], "hit" if r.cache_hit else "computed", f"{r.seconds:.1f}s", shown)
    return table


def data_counts(metrics: Mapping[str, float]) -> list[str]:
    """One line per prepared ``view/split`` of data_prep's metrics: rows in the source, rows cut by its
    limit, rows kept (and truncated), rows dropped, each with its reasons (``dropped/<reason>``, the
    names of ``align_runner.data.prepare.REASONS``) when the manifest has them."""
    counts: dict[str, dict[str, int]] = {}
    for key, value in metrics.items():
        view, split, name = (key.split("/", 2) + ["", ""])[:3]
        if name:
            counts.setdefault(f"{view}/{split}", {})[name] = int(value)
    lines = []
    for where, c in counts.items():
        parts = [f"{c.get('rows', c.get('total', 0))} rows"]  # manifests before `rows` have only `total`
        if c.get("limited"):
            parts.append(f"{c['limited']} cut by limit")
        truncated = _reasons(c, "truncated") or "over the length limits"
        parts.append(f"kept {c.get('kept', 0)}" + (f" ({c['truncated']} truncated: {truncated})" if c.get("truncated") else ""))
        if c.get("dropped"):
            parts.append(f"dropped {c['dropped']} ({_reasons(c, 'dropped') or 'over the length limits, or nothing to train on'})")
        lines.append(f"{where}: {', '.join(parts)}")
    return lines


def _reasons(counts: Mapping[str, int], what: str) -> str:
    """``prompt_too_long 3, identical_pair 1``: the ``<what>/<reason>`` counts, most first."""
    found = sorted(((k.split("/", 1)[1], n) for k, n in counts.items() if k.startswith(f"{what}/")), key=lambda rn: -rn[1])
    return ", ".join(f"{reason} {n}" for reason, n in found)


def before_after(result: RunResult) -> list[str]:
    names = {r.name for r in result.stages}
    if not {"eval_before", "eval_after"} <= names:
        return []
    b, a = result.stage("eval_before").metrics, result.stage("eval_after").metrics
    return [f"{k}: {b[k]:.4g} -> {a[k]:.4g}" for k in sorted(b) if k in a and k != "num_prompts"]


def print_summary(cfg: DictConfig, result: RunResult) -> None:
    console = Console()
    console.print(summary_table(result))
    prep = next((r for r in result.stages if r.kind == "data_prep"), None)
    if prep is not None:
        console.print("data: " + "; ".join(data_counts(prep.metrics)))
    lines = before_after(result)
    if lines:
        console.print("before -> after: " + "; ".join(lines))
    if result.objective is not None:
        console.print(f"objective {cfg.pipeline.objective} = {result.objective:.4g}")
    report = result.run_dir / "report.md"
    if report.exists():
        console.print(f"report: {report}")
