"""``align-runner sft|dpo|reward|grpo|kto`` with TRL's flags.

    align-runner sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara \\
        --output_dir Qwen2.5-0.5B-SFT [--config recipe.yaml] [native.key=value ...]

Flags come from the table in ``fields.py`` (``--help`` lists each with its align_runner key); a
``--config`` YAML holds the same names (``field: value``) and flags win over it. The flags become the
override list the Python trainers build, plus any native ``key=value`` overrides after them, and run
through the native command line (so a multi-process hardware profile relaunches itself under
torchrun). The final model is then exported to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from pathlib import Path
from typing import Any

from align_runner.trl.fields import fields_for
from align_runner.validate import ConfigError

PROG = "align-runner"


def _bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind: type):
    """A flag value that may be ``None`` (TRL's optional fields)."""

    def parse(text: str) -> Any:
        return None if text in ("None", "none", "null") and kind is not str else kind(text)

    return parse


def parser(kind: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} {kind}",
        usage=f"{PROG} {kind} --model_name_or_path M --dataset_name D [--flag value ...] [key=value ...]",
        description=f"TRL's `trl {kind}` flags on align_runner's pipeline. Each flag shows the align_runner key it "
        "sets; native key=value overrides may follow the flags.",
        argument_default=argparse.SUPPRESS,  # only flags given on the command line override --config
    )
    p.add_argument("--config", help="a TRL-style YAML recipe (field: value); flags override it")
    for name, f in fields_for(kind).items():
        default = f.default_for(kind)
        help_text = f"-> {f.key} (default {default!r}{'; only this value' if f.fixed else ''}){'. ' + f.note if f.note else ''}"
        if f.type is bool:
            p.add_argument(f"--{name}", nargs="?", const=True, type=_bool, metavar="BOOL", help=help_text)
        elif f.type is list:
            p.add_argument(f"--{name}", nargs="+", help=help_text)
        else:
            p.add_argument(f"--{name}", type=_optional(f.type), help=help_text)
    return p


def parse(argv: list[str]) -> tuple[str, dict[str, Any], list[str]]:
    """(kind, field values given by --config and flags, native overrides); unknown flags exit 2."""
    kind, rest = argv[0], argv[1:]
    p = parser(kind)
    native = [a for a in rest if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    ns, unknown = p.parse_known_args([a for a in rest if a not in native])
    if unknown:
        flags = [a.split("=")[0] for a in unknown if a.startswith("--")] or unknown
        close = difflib.get_close_matches(flags[0].lstrip("-"), fields_for(kind), n=1)
        hint = f" Did you mean --{close[0]}?" if close else ""
        raise ConfigError(f"unknown flag(s) {', '.join(flags)} for `{PROG} {kind}` (align_runner supports the TRL flags "
                          f"listed by --help).{hint}")
    given = vars(ns)
    values = _read_recipe(given.pop("config")) if "config" in given else {}
    unknown_keys = sorted(set(values) - set(fields_for(kind)))
    if unknown_keys:
        raise ConfigError(f"--config: {', '.join(unknown_keys)} {'is' if len(unknown_keys) == 1 else 'are'} not supported by "
                          f"`{PROG} {kind}`; see --help")
    return kind, {**values, **given}, native


def _read_recipe(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: cannot read it as YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of TRL field names to values, got {type(data).__name__}")
    return data


def overrides(kind: str, given: dict[str, Any], native: list[str]) -> list[str]:
    """The override list of this command: the trainers' (same function), then native overrides."""
    from align_runner.trl.fields import defaults
    from align_runner.trl.inputs import REWARD_MODEL_TARGET
    from align_runner.trl.overrides import build, check_values, default_hardware

    check_values(kind, given, f"{PROG} {kind}")
    values = {**defaults(kind), **given}
    for required in ("model_name_or_path", "dataset_name"):
        if values.get(required) is None:
            raise ConfigError(f"--{required} is required")
    train = {"path": values["dataset_name"], "name": values["dataset_config"], "split": values["dataset_train_split"]}
    evaluate = kind != "grpo" and values.get("eval_strategy", "no") != "no"
    eval = {**train, "split": values["dataset_test_split"]} if evaluate else None
    rewards: list[tuple[str, dict]] = []
    if kind == "grpo":
        if values["reward_model_name_or_path"]:
            path = values["reward_model_name_or_path"]
            rewards.append((Path(path).name.replace("-", "_").replace(".", "_"), {"_target_": REWARD_MODEL_TARGET, "path": path}))
        rewards += [_reward_function(name) for name in values["reward_funcs"] or []]
    n_prompts = _count_rows(train) if kind == "grpo" and int(values["max_steps"]) <= 0 else None
    out = build(kind, values, model=values["model_name_or_path"], train=train, eval=eval, rewards=rewards, n_prompts=n_prompts)
    return out + default_hardware(native) + native


# reward function names TRL's grpo script knows, as align_runner functions
REWARD_FUNCTIONS = {"accuracy_reward": "align_runner.trl.rewards.accuracy_reward"}


def _reward_function(name: str) -> tuple[str, dict]:
    if name in REWARD_FUNCTIONS:
        target = REWARD_FUNCTIONS[name]
    elif "." in name:
        target = name
    else:
        raise ConfigError(f"--reward_funcs {name}: expected one of {', '.join(REWARD_FUNCTIONS)} or module.function")
    return target.rsplit(".", 1)[-1], {"_target_": target, "_partial_": True}


def _count_rows(source: dict[str, Any]) -> int:
    from align_runner.data.sources import load_rows

    return len(load_rows(source)[0])


def main(argv: list[str]) -> int:
    from align_runner import cli
    from align_runner.trl.inputs import resolved_paths

    try:
        kind, given, native = parse(argv)
        run_overrides = overrides(kind, given, native)
        outputs = resolved_paths(native).outputs
    except ConfigError as e:
        print(f"align_runner: config error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(str(outputs)) / time.strftime("%Y-%m-%d/%H-%M-%S") / f"{kind}-{time.time_ns() % 1_000_000:06d}"
    saved = sys.argv
    sys.argv = [saved[0], *run_overrides, f"hydra.run.dir={run_dir}"]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    if code != 0 or "pipeline.dry_run=true" in native:
        return code
    return _export(kind, run_dir, given.get("output_dir") or "trainer_output")


def _export(kind: str, run_dir: Path, output_dir: str) -> int:
    from align_runner.export import export

    run = json.loads((run_dir / "run.json").read_text())
    stage = next(s for s in run["stages"] if s["name"] == kind)
    out = export(stage["dir"], output_dir, overwrite=True)
    print(f"align_runner: {kind} model written to {out} (run: {run_dir})")
    return 0
