"""The run report: ``<run_dir>/report.md`` with PNG plots in ``<run_dir>/report/``.

Built only from files a finished run leaves behind (``run.json``, ``config.yaml`` and each stage's
``metrics.jsonl`` / ``samples.json`` in its store dir), so it works for cached stages and can be
regenerated at any time::

    python -m align_runner.report outputs/2025-01-01/12-00-00
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from align_runner.engine.online import ROLLOUTS_FILE
from align_runner.engine.trackers import HISTORY, read_metrics
from align_runner.pipeline.rundir import stage_dir  # the run's link, or the recorded store dir

# Training-curve panels: (title, y label, metrics.jsonl keys drawn together). Absent keys are skipped.
PANELS = (
    ("Loss", "loss", ("loss", "eval/loss")),
    ("Learning rate", "learning rate", ("lr", "critic/lr")),
    ("Gradient norm", "grad norm", ("grad_norm", "critic/grad_norm")),
    ("Token accuracy", "accuracy", ("mean_token_accuracy",)),
    ("Reward margin", "chosen - rejected", ("rewards/margins",)),
    ("Reward accuracy", "fraction chosen > rejected", ("rewards/accuracies",)),
    ("Rewards", "reward", ("rewards/chosen", "rewards/rejected")),
    ("Accuracy", "accuracy", ("accuracy", "eval/accuracy")),
    # online RL (rollouts)
    ("Reward", "reward", ("reward", "reward_std")),
    ("KL to the reference", "kl", ("kl",)),
    ("Entropy", "nats per token", ("entropy",)),
    ("Completion length", "tokens", ("completions/mean_length", "completions/min_length", "completions/max_length")),
    ("Clipping and filtering", "fraction", ("clip_ratio/region_mean", "completions/clipped_ratio", "frac_reward_zero_std")),
    # PPO: objective/* and val/num_eos_tokens are the rollout's; the others the mean of its optimizer steps
    ("PPO: score and RLHF reward", "per completion", ("objective/scores", "objective/rlhf_reward", "objective/non_score_reward")),
    ("PPO: KL to the reference", "nats per completion", ("objective/kl",)),
    ("PPO: KL coefficient", "coefficient", ("objective/kl_coef",)),
    ("PPO: entropy", "nats per completion", ("objective/entropy",)),
    ("PPO: losses", "loss", ("loss/policy_avg", "loss/value_avg")),
    ("PPO: clipped fraction", "fraction of tokens", ("policy/clipfrac_avg", "val/clipfrac_avg")),
    ("PPO: approx KL to the rollout policy", "nats per token", ("policy/approxkl_avg",)),
    ("PPO: ratio to the rollout policy", "mean ratio", ("val/ratio",)),
    ("PPO: completions ending with EOS", "completions", ("val/num_eos_tokens",)),
)
# eval metrics that are counts or on another scale than the checkers' scores: table only, no bars
NOT_TASK_METRICS = ("num_prompts", "completion_tokens", "heldout_loss")
# metrics shown in the stage table when present, in this order (at most HEADLINE_MAX of them)
HEADLINE = (
    "loss", "eval/loss", "mean_token_accuracy", "rewards/accuracies", "rewards/margins", "eval/accuracy",
    "accuracy", "last_number", "format", "heldout_loss", "sft/train/kept", "preference/train/kept",
)
HEADLINE_MAX = 5
SAMPLES_SHOWN = 6
CELL_CHARS = 240


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and its plots for the finished run in ``run_dir``; returns the report path."""
    run_dir = Path(run_dir)
    run_json = run_dir / "run.json"
    if not run_json.exists():
        raise FileNotFoundError(f"{run_json} not found: is {run_dir} a finished align_runner run dir?")
    run = json.loads(run_json.read_text())
    stages = run["stages"]
    plot_dir = run_dir / "report"
    plot_dir.mkdir(exist_ok=True)

    parts = [_header(run_dir, run), "## Stages", _stage_table(stages)]
    prep = next((s for s in stages if s["kind"] == "data_prep"), None)
    if prep is not None:  # the true row counts: what each view was prepared from, and what was cut
        from align_runner.pipeline.summary import data_counts

        parts += ["## Data", "\n".join(f"- {line}" for line in data_counts(prep["metrics"]))]
        reasons = sorted({k.rsplit("/", 1)[1] for k in prep["metrics"] if k.count("/") == 3})
        if reasons:  # what each drop / truncation reason means
            from align_runner.data.prepare import REASONS

            parts.append("\n".join(f"- `{r}`: {REASONS.get(r, r)}" for r in reasons))
    by_name = {s["name"]: s for s in stages}
    before, after = by_name.get("eval_before"), by_name.get("eval_after")
    if before is not None and after is not None:
        parts += ["## Before → after", _before_after_table(before["metrics"], after["metrics"])]
        png = plot_before_after(before["metrics"], after["metrics"], plot_dir / "before_after.png")
        if png is not None:
            parts.append(f"![task metrics before and after]({png.relative_to(run_dir)})")
    curves = []
    for s in stages:
        if _trains(s["kind"]):
            png = plot_training(s["name"], read_metrics(stage_dir(run_dir, s) / HISTORY), plot_dir)
            if png is not None:
                curves.append(f"### {s['name']}\n\n![{s['name']} training curves]({png.relative_to(run_dir)})")
    if curves:
        parts += ["## Training curves", *curves]
    evals = [s for s in stages if (stage_dir(run_dir, s) / "samples.json").exists()]
    if evals:
        parts += ["## Sample generations", _samples_table(run_dir, evals)]
    for s in stages:
        path = stage_dir(run_dir, s) / ROLLOUTS_FILE
        if path.exists():
            parts += [f"## Rollouts of {s['name']}", _rollouts_table(path)]
    config = run_dir / "config.yaml"
    config_text = config.read_text() if config.exists() else "# config.yaml not found in the run dir"
    parts += ["## Resolved config", f"<details><summary>config.yaml</summary>\n\n```yaml\n{config_text.rstrip()}\n```\n\n</details>"]
    report = run_dir / "report.md"
    report.write_text("\n\n".join(parts) + "\n")
    return report


def _trains(kind: str) -> bool:
    """Whether a kind's metrics.jsonl is a training curve; a kind whose plugin is not installed here
    is plotted when it logged anything."""
    from align_runner.registry import get_stage

    try:
        return get_stage(kind).trains
    except KeyError:
        return True


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, sorted by step; a step logged twice (a resumed stage) keeps its last value."""
    by_step: dict[int, float] = {}
    for row in rows:
        if key in row:
            try:
                by_step[int(row["step"])] = float(row[key])  # non-finite values are stored as "nan"/"inf"
            except (TypeError, ValueError):
                continue
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plotted_panels(rows: list[dict[str, Any]]) -> list[tuple[str, str, list[tuple[str, list[int], list[float]]]]]:
    """The PANELS with data in ``rows``: (title, y label, [(key, steps, values)] of the keys present)."""
    panels = [(t, y, [(k, *series(rows, k)) for k in keys]) for t, y, keys in PANELS]
    panels = [(t, y, [c for c in curves if c[1]]) for t, y, curves in panels]
    return [p for p in panels if p[2]]


def plot_training(name: str, rows: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """One PNG with a panel per metric group present in ``rows``; None when nothing is plottable."""
    panels = plotted_panels(rows)
    if not panels:
        return None
    cols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * nrows), layout="constrained")
    fig.suptitle(f"{name}: training curves")
    for i, (title, ylabel, curves) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for key, steps, values in curves:
            # eval points are sparse: markers make single points visible
            style = {"marker": "o"} if key.startswith("eval/") or len(steps) < 3 else {}
            ax.plot(steps, values, label=key, **style)
        ax.set_title(title)
        ax.set_xlabel("step (optimizer step; rollout for online RL)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend()
    path = out_dir / f"train_{_slug(name)}.png"
    fig.savefig(path, dpi=100)
    return path


def plot_before_after(before: dict[str, float], after: dict[str, float], path: Path) -> Path | None:
    """Grouped bars of the checker scores in both eval stages; None when they share none."""
    keys = [k for k in sorted(before) if k in after and k not in NOT_TASK_METRICS]
    if not keys:
        return None
    fig = Figure(figsize=(max(4.0, 1.6 * len(keys) + 1.5), 3.6), layout="constrained")
    ax = fig.add_subplot()
    x = range(len(keys))
    for offset, label, values in ((-0.2, "before", before), (0.2, "after", after)):
        bars = ax.bar([i + offset for i in x], [values[k] for k in keys], width=0.4, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(list(x), keys)
    ax.set_title("Task metrics: eval_before vs eval_after")
    ax.set_xlabel("metric")
    ax.set_ylabel("mean score")
    values = [v[k] for v in (before, after) for k in keys]
    # checker scores are fractions: a fixed 0..1 axis keeps all-zero or tiny changes honest
    ax.set_ylim(min(0.0, *values), max(1.0, *values) * 1.12)
    ax.legend()
    fig.savefig(path, dpi=100)
    return path


def question(prompt: Any) -> str:
    """The user's question of a prompt: last user turn of messages or a rendered chat, else its tail."""
    if isinstance(prompt, list):  # conversational rows keep their messages
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return str(users[-1]).strip()
        prompt = "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in prompt)
    text = str(prompt)
    for pattern in _USER_TURN:
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    text = text.strip()
    return text if len(text) <= CELL_CHARS else "…" + text[-CELL_CHARS:]


_USER_TURN = (
    re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S),  # ChatML (Qwen, SmolLM2)
    re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S),  # Llama 3
)


def _header(run_dir: Path, run: dict[str, Any]) -> str:
    obj = run.get("objective") or {}
    lines = [f"# align_runner run `{run_dir.name}`", "", f"- run dir: `{run_dir}`"]
    if obj.get("name"):
        lines.append(f"- objective `{obj['name']}` = {_fmt(obj.get('value'))}")
    for label, value in (("finished", run.get("finished")), ("git sha", run.get("git_sha")),
                         ("hardware", (run.get("hardware") or {}).get("name"))):
        if value:
            lines.append(f"- {label}: {value}")
    versions = run.get("versions") or {}
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    return "\n".join(lines)


def _stage_table(stages: list[dict[str, Any]]) -> str:
    rows = ["| stage | kind | key | cache | seconds | metrics |", "|---|---|---|---|---|---|"]
    for s in stages:
        m = s.get("metrics", {})
        shown = [k for k in HEADLINE if k in m][:HEADLINE_MAX] or sorted(m)[:4]
        metrics = ", ".join(f"{k}={_fmt(m[k])}" for k in shown)
        cache = "hit" if s.get("cache_hit") else "computed"
        rows.append(f"| {s['name']} | {s['kind']} | `{s['key'][:12]}` | {cache} | {s.get('seconds', 0):.1f} | {metrics} |")
    return "\n".join(rows)


def _before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    rows = ["| metric | before | after | change |", "|---|---|---|---|"]
    for k in sorted(before):
        if k in after:
            rows.append(f"| {k} | {_fmt(before[k])} | {_fmt(after[k])} | {after[k] - before[k]:+.4g} |")
    return "\n".join(rows)


def _samples_table(run_dir: Path, evals: list[dict[str, Any]]) -> str:
    """Question, reference answer, then one column per eval stage (same prompts, same order)."""
    samples = {}
    for s in evals:
        path = stage_dir(run_dir, s) / "samples.json"
        samples[s["name"]] = json.loads(path.read_text()) if path.exists() else []
    n = min(SAMPLES_SHOWN, max(len(v) for v in samples.values()))
    if n == 0:
        return "_No samples were saved (eval.samples=0)._"
    rows = ["| question | answer | " + " | ".join(samples) + " |", "|---" * (2 + len(samples)) + "|"]
    for i in range(n):
        first = next(v[i] for v in samples.values() if i < len(v))
        cells = [_cell(question(first.get("prompt", ""))), _cell(str(first.get("answer", "")))]
        cells += [_completion_cell(v[i]) if i < len(v) else "" for v in samples.values()]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _rollouts_table(path: Path) -> str:
    """The sample completions of the first and the last rollout, side by side with their rewards."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return "_No rollout samples were saved._"
    shown = [r for r in rows if r["rollout"] in (rows[0]["rollout"], rows[-1]["rollout"])]
    table = ["| rollout | question | completion | reward |", "|---|---|---|---|"]
    for r in shown:
        table.append(f"| {r['rollout']} | {_cell(question(r.get('prompt', '')))} | {_cell(str(r.get('completion', '')))} | {_fmt(r.get('reward'))} |")
    return "\n".join(table)


def _completion_cell(sample: dict[str, Any]) -> str:
    """The completion, then the checker scores (the numeric fields the eval stage added)."""
    scores = [f"{k}={_fmt(v)}" for k, v in sample.items()
              if k not in ("prompt", "completion", "answer") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    text = _cell(str(sample.get("completion", ""))) or "<i>(empty)</i>"
    return text + (f"<br><sub>{', '.join(scores)}</sub>" if scores else "")


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: escaped HTML and pipes, newlines as <br>, truncated."""
    text = text.strip()
    if len(text) > CELL_CHARS:
        text = text[:CELL_CHARS] + "…"
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _fmt(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "n/a" if v is None else str(v)
    return f"{v:.0f}" if float(v).is_integer() and abs(v) >= 1 else f"{v:.4g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m align_runner.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holds run.json)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir)
    except FileNotFoundError as e:
        print(f"align_runner.report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
