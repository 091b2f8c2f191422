"""align-runner recipes: named pipelines with golden metrics, rerun and compared (list, check, update).

A recipe is a file of the ``experiment`` config group, ``align_runner/conf/experiment/<name>.yaml`` (or
``DIR/experiment/<name>.yaml`` with ``--config-dir DIR``); ``python -m align_runner experiment=<name>``
runs it. A name ending in ``_tiny`` is CI scale (the tiny model, seconds on a CPU); any other is the
embedded-model demo scale (SmolLM2-135M, minutes).

Its golden file, ``goldens/<name>.json`` beside it, holds what one run measured: for every stage the
``loss`` and ``reward`` of its metrics.jsonl at up to ``TRAJECTORY_POINTS`` fixed steps
(``sft/loss@step4``) and its final metrics from run.json (``eval_after/accuracy``), minus timings.
Each metric has a tolerance: it passes when ``|now - golden| <= abs + rel * |golden|``. ``check`` reruns
recipes (in a temporary outputs dir, so every stage computes; ``--store`` reuses the configured store)
and prints recipe, metric, golden, now, tolerance and verdict; ``update`` reruns them, rewrites their
goldens (keeping each metric's tolerance) and prints what changed.

Exit codes: 0 every metric within tolerance; 1 a metric drifted or is missing; 2 bad usage or config;
3 no drift, but a selected recipe has no golden yet (run ``recipes update``).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align_runner.fsutil import atomic_write_text

PROG = "align-runner recipes"
TINY_SUFFIX = "_tiny"
SCALES = ("tiny", "demo")
GOLDENS = "goldens"
# per scale, the (absolute, relative) tolerance a metric gets when it first enters a golden (edit the
# golden file to change one; `update` keeps it). A tiny recipe repeats bitwise on a CPU (fixed seeds,
# and sft_tiny's hardware.cpu_threads=1: the order of a sum over threads changes its last bits), so its
# goldens are exact. The embedded model on another CPU may answer a held-out prompt differently (one
# of the demo's 64 is 0.016 of accuracy).
DEFAULT_TOLERANCE = {"tiny": (0.0, 0.0), "demo": (0.02, 0.02)}
# the per-step metrics whose trajectory is golden, and how many steps of each (first and last included)
TRAJECTORY_METRICS = ("loss", "reward")
TRAJECTORY_POINTS = 5
# metrics that time the machine rather than measure the run: never golden
TIMING = re.compile(r"(^|/)time(/|$)|_per_s$|(^|/)seconds$")
EXIT_DRIFT, EXIT_USAGE, EXIT_NO_GOLDEN = 1, 2, 3


class RecipeError(ValueError):
    """A recipe name, golden file or option is wrong; the message names it and what is valid."""


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path

    @property
    def scale(self) -> str:
        return "tiny" if self.name.endswith(TINY_SUFFIX) else "demo"

    def golden_path(self, goldens: Path | None = None) -> Path:
        return (goldens or self.path.parent / GOLDENS) / f"{self.name}.json"

    def description(self) -> str:
        """The first comment line after the package line: what the recipe runs."""
        for line in self.path.read_text().splitlines():
            if line.startswith("#") and not line.startswith("# @package"):
                return line.lstrip("# ").strip()
        return ""


@dataclass(frozen=True)
class Row:
    recipe: str
    metric: str
    golden: float | None
    now: float | None
    tolerance: str
    verdict: str  # ok | DRIFT | missing (golden, not measured now) | new (measured, not in the golden)

    @property
    def failed(self) -> bool:
        return self.verdict in ("DRIFT", "missing")


# ------------------------------------------------------------------------------------ finding recipes


def discover(config_dirs: Sequence[str | Path] = ()) -> dict[str, Recipe]:
    """Every recipe where Hydra looks for ``experiment`` options: the shipped tree, then ``config_dirs``
    (the first folder holding a name wins, as in Hydra)."""
    from align_runner.validate import search_dirs

    found: dict[str, Recipe] = {}
    for root in search_dirs((), config_dirs):
        for path in sorted((root / "experiment").glob("*.yaml")):
            found.setdefault(path.stem, Recipe(path.stem, path))
    return found


def select(recipes: dict[str, Recipe], names: Sequence[str], scale: str) -> list[Recipe]:
    """The recipes named (any scale), or without names every recipe of ``scale`` (tiny, demo or all)."""
    for name in names:
        if name not in recipes:
            close = difflib.get_close_matches(name, recipes, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"no recipe {name!r} in experiment/.{hint} Recipes: {', '.join(sorted(recipes))}")
    if names:
        return [recipes[n] for n in dict.fromkeys(names)]
    return [r for r in recipes.values() if scale in ("all", r.scale)]


# ----------------------------------------------------------------------------------- what a run measured


def fixed_steps(steps: Sequence[int], points: int = TRAJECTORY_POINTS) -> list[int]:
    """Up to ``points`` of the logged ``steps`` (sorted), evenly spread, the first and last included."""
    if len(steps) <= points:
        return list(steps)
    return sorted({steps[round(i * (len(steps) - 1) / (points - 1))] for i in range(points)})


def trajectory(stage: str, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``<stage>/<metric>@step<N>`` for each TRAJECTORY_METRICS metric of a stage's metrics.jsonl rows at
    its fixed steps (a step logged twice: its last row)."""
    out: dict[str, float] = {}
    for metric in TRAJECTORY_METRICS:
        points = {int(r["step"]): float(r[metric]) for r in rows if metric in r}
        for step in fixed_steps(sorted(points)):
            out[f"{stage}/{metric}@step{step}"] = points[step]
    return out


def measure(run_dir: Path) -> dict[str, float]:
    """Every golden-able metric of a finished run, stage by stage in run order: its trajectory, then
    its final metrics (timings left out)."""
    from align_runner.engine.trackers import HISTORY, read_metrics
    from align_runner.pipeline.rundir import RUN_MANIFEST, stage_dir

    manifest = json.loads((Path(run_dir) / RUN_MANIFEST).read_text())
    out: dict[str, float] = {}
    for stage in manifest["stages"]:
        name = stage["name"]
        out.update(trajectory(name, read_metrics(stage_dir(Path(run_dir), stage) / HISTORY)))
        out.update({f"{name}/{k}": float(v) for k, v in stage["metrics"].items() if not TIMING.search(k)})
    return out


# ------------------------------------------------------------------------------------------- goldens


def within(golden: float, now: float, abs_tol: float, rel_tol: float) -> bool:
    if math.isnan(golden) or math.isnan(now):
        return math.isnan(golden) and math.isnan(now)
    return abs(now - golden) <= abs_tol + rel_tol * abs(golden)


def tolerance_text(abs_tol: float, rel_tol: float) -> str:
    if abs_tol == 0 and rel_tol == 0:
        return "exact"
    return " + ".join(p for p in (f"±{abs_tol:g}" if abs_tol else "", f"±{rel_tol * 100:g}%" if rel_tol else "") if p)


def compare(recipe: str, golden: dict[str, dict[str, float]], now: dict[str, float]) -> list[Row]:
    """One row per metric: each golden one in its order, then those measured now that it lacks."""
    rows = []
    for metric, g in golden.items():
        tol = tolerance_text(g["abs"], g["rel"])
        value = now.get(metric)
        verdict = "missing" if value is None else "ok" if within(g["value"], value, g["abs"], g["rel"]) else "DRIFT"
        rows.append(Row(recipe, metric, g["value"], value, tol, verdict))
    rows += [Row(recipe, m, None, v, "", "new") for m, v in now.items() if m not in golden]
    return rows


def read_golden(path: Path) -> dict[str, dict[str, float]]:
    """The metrics of a golden file: name -> {value, abs, rel}."""
    try:
        metrics = json.loads(path.read_text())["metrics"]
        for name, entry in metrics.items():
            missing = {"value", "abs", "rel"} - set(entry)
            if missing:
                raise RecipeError(f"{path}: metric {name!r}: expected keys value, abs, rel; missing {', '.join(sorted(missing))}")
        return metrics
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise RecipeError(f"{path}: not a golden file ({type(e).__name__}: {e}); expected {{\"metrics\": {{name: {{value, abs, rel}}}}}}") from None


def new_golden(scale: str, now: dict[str, float], old: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The golden metrics for ``now``: each keeps its old tolerance, a new one gets the scale's default."""
    abs_tol, rel_tol = DEFAULT_TOLERANCE[scale]
    return {m: {"value": v, "abs": old.get(m, {}).get("abs", abs_tol), "rel": old.get(m, {}).get("rel", rel_tol)}
            for m, v in now.items()}


def golden_text(recipe: Recipe, metrics: dict[str, dict[str, float]]) -> str:
    """The golden file: a header, then one metric per line (a change is a one-line diff in review)."""
    import torch

    import align_runner

    header = {
        "recipe": recipe.name,
        "scale": recipe.scale,
        "command": f"align-runner recipes update {recipe.name}",
        "measured_with": {"align_runner": align_runner.__version__, "torch": torch.__version__},
    }
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()]
    entries = [f"    {json.dumps(m)}: {json.dumps(e)}" for m, e in metrics.items()]
    return "{\n" + "\n".join(lines) + '\n  "metrics": {\n' + ",\n".join(entries) + "\n  }\n}\n"


def diff_lines(old: dict[str, dict[str, float]], new: dict[str, dict[str, float]]) -> list[str]:
    """``metric: old -> new`` for each changed value, with the added and removed metrics."""
    lines = [f"  {m}: {old[m]['value']!r} -> {e['value']!r}" for m, e in new.items()
             if m in old and not within(old[m]["value"], e["value"], 0.0, 0.0)]
    lines += [f"  + {m}: {e['value']!r} (new)" for m, e in new.items() if m not in old]
    lines += [f"  - {m}: {e['value']!r} (removed)" for m, e in old.items() if m not in new]
    return lines


# ------------------------------------------------------------------------------------------- running


def preflight(recipes: Sequence[Recipe], config_dirs: Sequence[str | Path] = ()) -> dict[str, str]:
    """Compose every recipe before any runs (a bad one fails first, not after an hour of the others);
    returns each one's model cache dir, absolute: a temporary store still reuses built base models."""
    from align_runner import api

    return {r.name: str(Path(str(api.compose([f"experiment={r.name}"], config_dirs=config_dirs).paths.cache)).resolve())
            for r in recipes}


def run_recipe(recipe: Recipe, *, outputs: Path | None, cache: str, config_dirs: Sequence[str | Path] = ()) -> dict[str, float]:
    """Run one recipe (into ``outputs``, or the configured outputs when None) and return what it measured."""
    import torch

    from align_runner import api

    overrides = [f"experiment={recipe.name}", "train.progress=false"]
    if outputs is not None:
        overrides += [f"paths.outputs={outputs}", f"paths.cache={cache}"]
    t0 = time.perf_counter()
    print(f"{PROG}: running {recipe.name} ({recipe.scale})", file=sys.stderr, flush=True)
    threads = torch.get_num_threads()
    try:
        result = api.run(overrides, config_dirs=config_dirs)
    finally:  # a run applies its hardware.cpu_threads to this process: the caller's count comes back
        torch.set_num_threads(threads)
    print(f"{PROG}: {recipe.name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return measure(result.run_dir)


@contextlib.contextmanager
def _outputs(store: bool) -> Iterator[Path | None]:
    """None (the configured store) with ``--store``, else a temporary outputs dir for this invocation."""
    if store:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="align_runner-recipes-") as tmp:
        yield Path(tmp)


def check(recipes: Sequence[Recipe], *, store: bool = False, config_dirs: Sequence[str | Path] = (),
          goldens: Path | None = None) -> dict[str, list[Row] | None]:
    """recipe name -> its rows, or None when it has no golden (not run: there is nothing to compare)."""
    have = [r for r in recipes if r.golden_path(goldens).is_file()]
    expected = {r.name: read_golden(r.golden_path(goldens)) for r in have}
    caches = preflight(have, config_dirs)
    results: dict[str, list[Row] | None] = {r.name: None for r in recipes}
    with _outputs(store) as outputs:
        for r in have:
            now = run_recipe(r, outputs=outputs, cache=caches[r.name], config_dirs=config_dirs)
            results[r.name] = compare(r.name, expected[r.name], now)
    return results


def update(recipes: Sequence[Recipe], *, store: bool = False, config_dirs: Sequence[str | Path] = (),
           goldens: Path | None = None) -> dict[str, list[str]]:
    """Rerun ``recipes`` and rewrite their goldens; recipe name -> the diff lines."""
    caches = preflight(recipes, config_dirs)
    diffs = {}
    with _outputs(store) as outputs:
        for r in recipes:
            path = r.golden_path(goldens)
            old = read_golden(path) if path.is_file() else {}
            now = run_recipe(r, outputs=outputs, cache=caches[r.name], config_dirs=config_dirs)
            metrics = new_golden(r.scale, now, old)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, golden_text(r, metrics))
            diffs[r.name] = diff_lines(old, metrics)
    return diffs


# ------------------------------------------------------------------------------------------- printing


def _fmt(value: float | None) -> str:
    return "-" if value is None else repr(value)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows])


def check_table(results: dict[str, list[Row] | None], *, show_all: bool = False) -> str:
    """Every failed or new metric; a passing recipe as one line (every metric with ``show_all``)."""
    lines = []
    for name, rows in results.items():
        if rows is None:
            lines.append([name, f"(no golden yet: run `{PROG} update {name}`)", "", "", "", "NO GOLDEN"])
            continue
        shown = [r for r in rows if show_all or r.verdict != "ok"]
        lines += [[r.recipe, r.metric, _fmt(r.golden), _fmt(r.now), r.tolerance, r.verdict] for r in shown]
        ok = sum(r.verdict == "ok" for r in rows)
        if not show_all:
            lines.append([name, f"({ok} of {sum(r.verdict != 'new' for r in rows)} metrics within tolerance)",
                          "", "", "", "ok" if not any(r.failed for r in rows) else "DRIFT"])
    return table(["recipe", "metric", "golden", "now", "tolerance", "verdict"], lines)


def exit_code(results: dict[str, list[Row] | None]) -> int:
    if any(rows is not None and any(r.failed for r in rows) for rows in results.values()):
        return EXIT_DRIFT
    return EXIT_NO_GOLDEN if any(rows is None for rows in results.values()) else 0


def list_table(recipes: dict[str, Recipe], goldens: Path | None = None, config_dirs: Sequence[str | Path] = ()) -> str:
    from align_runner.validate import experiment_algorithm, search_dirs

    dirs = search_dirs((), config_dirs)
    rows = [[r.name, r.scale, ",".join(experiment_algorithm(r.name, dirs)) or "-",
             "yes" if r.golden_path(goldens).is_file() else "no", r.description()] for r in recipes.values()]
    return table(["recipe", "scale", "algorithm", "golden", "description"], rows)


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config-dir", "-cd", action="append", default=[], metavar="DIR",
                        help="a folder of your own config groups; its experiment/*.yaml are recipes too")
    common.add_argument("--goldens", type=Path, metavar="DIR",
                        help="read and write golden files here instead of experiment/goldens/ beside each recipe")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[common], help="the recipes, their scale and whether they have a golden")
    for name, text in (("check", "rerun recipes and compare with their goldens"),
                       ("update", "rerun recipes and rewrite their goldens")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("names", nargs="*", metavar="NAME", help="recipes to run (default: every one of --scale)")
        p.add_argument("--scale", choices=("tiny", "demo", "all"), default="tiny",
                       help="without NAMEs: tiny (CI scale, the default), demo (embedded model, minutes each) or all")
        p.add_argument("--store", action="store_true",
                       help="reuse the configured store (paths.outputs) instead of computing every stage afresh")
        if name == "check":
            p.add_argument("--all", action="store_true", dest="show_all", help="print every metric, not only failures")
    return parser


def main(argv: list[str] | None = None) -> int:
    from align_runner.data.errors import DataError
    from align_runner.validate import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["recipes"]:  # dispatched by `align-runner recipes ...` with the command name
        argv = argv[1:]
    args = _parser().parse_args(argv)
    try:
        recipes = discover(args.config_dir)
        if args.command == "list":
            print(list_table(recipes, args.goldens, args.config_dir))
            return 0
        chosen = select(recipes, args.names, args.scale)
        if not chosen:
            raise RecipeError(f"no {args.scale} recipes in experiment/")
        options = {"store": args.store, "config_dirs": args.config_dir, "goldens": args.goldens}
        if args.command == "update":
            for name, lines in update(chosen, **options).items():
                print(f"{name}: {len(lines)} change(s) to {recipes[name].golden_path(args.goldens)}")
                if lines:
                    print("\n".join(lines))
            return 0
        results = check(chosen, **options)
        print(check_table(results, show_all=args.show_all))
        return exit_code(results)
    except RecipeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, DataError) as e:
        kind = "data" if isinstance(e, DataError) else "config"
        for line in str(e).splitlines() or [""]:
            print(f"align_runner: {kind} error: {line}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
