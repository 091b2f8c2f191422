"""The config tree composes in every combination users reach for, and bad config fails while composing,
before any model loads, with a message naming the key and what is valid."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import align_runner
from align_runner.api import compose
from align_runner.validate import CONF_DIR, ConfigError, check_targets

GROUPS = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and any(d.glob("*.yaml")))


# options that name the user's own input: composing them needs it (a local file of the same schema)
_USER_FILE = f"data.train.path={CONF_DIR.parent / 'data' / 'demo' / 'sft-train.jsonl'}"
NEEDS = {
    "data=local": [_USER_FILE],
    "data=hub": [_USER_FILE],
    # no answer checkers: the demo's objective eval_after/accuracy is a config error (validate.check_objective)
    "eval=heldout": ["pipeline.objective=eval_after/heldout_loss"],
}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda v: str(v)
)
def test_every_option_of_every_group_composes(group, option):
    cfg = compose([f"{group}={option}", *NEEDS.get(f"{group}={option}", [])])
    check_targets(cfg)  # every _target_ imports and takes the keys beside it


def test_required_groups_exist():
    assert {"model", "data", "algorithm", "hardware", "pipeline", "train", "tracking", "paths"} <= set(GROUPS)
    assert {"tiny", "smollm2-135m", "qwen0.5b", "qwen1.5b", "llama3-8b"} <= set(_options("model"))
    assert {"cpu", "1xgpu", "4xa100", "8xh100"} <= set(_options("hardware"))


def test_every_yaml_starts_with_a_usage_comment():
    for path in CONF_DIR.rglob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and "align_runner" in path.read_text().split("\n\n")[0], path


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(align_runner.__path__, "align_runner.")]
    assert "align_runner.engine.loop" in names
    for name in names:
        importlib.import_module(name)


def test_cli_prints_the_job_config_offline():
    out = subprocess.run(
        [sys.executable, "-m", "align_runner", "--cfg", "job", "algorithm=dpo", "model=qwen0.5b", "hardware=4xa100"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent,
    )
    assert out.returncode == 0, out.stderr
    assert "Qwen/Qwen2.5-0.5B-Instruct" in out.stdout
    assert "zero_stage: 2" in out.stdout and "kind: dpo" in out.stdout


def test_misspelt_top_level_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"'trian'.*Did you mean 'train'.*Valid keys:.*train"):
        compose(["trian.lr=1"])


def test_misspelt_nested_key_names_the_parent():
    with pytest.raises(ConfigError, match=r"'lrr' is not a key of train.*Did you mean 'lr'"):
        compose(["train.lrr=1"])


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"model=qwen9b: no such option.*Valid options:.*qwen0.5b.*tiny"):
        compose(["model=qwen9b"])


def test_bad_enum_value_lists_the_choices():
    with pytest.raises(Exception, match=r"keep_start.*keep_end.*drop"):
        compose(["data.truncation=middle"])


def test_bad_value_range_names_the_key():
    with pytest.raises(ConfigError, match=r"train.lr=-1.0: expected a positive learning rate"):
        compose(["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=0"):
        compose(["train.micro_batch_size=0"])


def test_misspelt_loss_parameter_is_caught_against_the_function_signature():
    with pytest.raises(ConfigError, match=r"algorithm.loss.bta: .*sigmoid_loss has no parameter 'bta'.*Did you mean 'beta'"):
        compose(["algorithm=dpo", "algorithm.loss.bta=0.1"])


def test_unimportable_target_names_the_key():
    with pytest.raises(ConfigError, match=r"algorithm.loss._target_='align_runner.algos.dpo.nope_loss' cannot be imported"):
        compose(["algorithm=dpo", "algorithm.loss._target_=align_runner.algos.dpo.nope_loss"])


def test_unknown_stage_kind_lists_known_kinds():
    with pytest.raises(KeyError, match=r"unknown stage kind 'sftt'; known kinds: .*data_prep.*sft"):
        compose(["algorithm.stages=[data_prep,sftt,sft]"])


def test_cli_reports_config_errors_without_a_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "align_runner", "trian.lr=1"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert "config error" in out.stderr and "Did you mean 'train'" in out.stderr
    assert "Traceback" not in out.stderr


def test_auto_pipelines_follow_the_algorithm():
    from align_runner.pipeline.graph import build_graph

    def names(overrides):
        return [(s.name, s.model_from) for s in build_graph(compose(overrides))]

    assert names(["pipeline.eval=false"]) == [("data_prep", None), ("sft", None)]
    assert names([]) == [("data_prep", None), ("eval_before", None), ("sft", None), ("eval_after", "sft")]


def test_console_script_is_the_same_entry_point():
    import shutil

    exe = shutil.which("align-runner")
    assert exe is not None, "pip install -e . installs the align-runner script"
    out = subprocess.run([exe, "--cfg", "job", "model=tiny"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "build_tiny" in out.stdout


def test_algorithm_train_takes_any_train_key_and_wins_for_that_stage_only():
    from align_runner.config import stage_train

    cfg = compose(["algorithm=dpo", "algorithm.train.max_steps=24", "train.max_steps=7"])
    dpo, sft = stage_train(cfg, cfg.algorithm), stage_train(cfg, cfg.upstream.sft)
    assert (dpo.max_steps, dpo.lr) == (24, 5e-6)  # lr from conf/algorithm/dpo.yaml
    assert (sft.max_steps, sft.lr) == (7, cfg.train.lr)
    with pytest.raises(ConfigError, match=r"'lrr' is not a key of algorithm.train.*Did you mean 'lr'"):
        compose(["algorithm=dpo", "algorithm.train.lrr=1"])


def test_algorithm_ppo_picks_the_mixed_style_demo_unless_data_is_given():
    def data_of(overrides):
        cfg = compose(overrides)
        return cfg.data.name, Path(cfg.data.sft.train.path).name

    assert data_of(["algorithm=ppo"]) == ("demo_mixed", "sft-mixed-train.jsonl")
    assert data_of(["experiment=ppo"]) == ("demo_mixed", "sft-mixed-train.jsonl")
    assert data_of(["algorithm=ppo", "data=demo"]) == ("demo", "sft-train.jsonl")
    assert data_of(["algorithm=dpo"]) == ("demo", "sft-train.jsonl")
    # the preference pairs the reward model learns from are the demo's own
    assert compose(["algorithm=ppo"]).data.preference == compose(["algorithm=dpo"]).data.preference


def test_an_objective_naming_no_stage_is_reported_before_the_run(caplog):
    with caplog.at_level("WARNING", logger="align_runner"):
        compose(["pipeline.eval=false"])
    assert "pipeline.objective=eval_after/accuracy names no stage of this pipeline (data_prep, sft)" in caplog.text


# ------------------------------------------------------------------ the user's own config groups


@pytest.fixture
def user_conf(tmp_path: Path) -> Path:
    """A user's config dir: a data option on the demo, an algorithm on grpo, an experiment (a recipe
    that picks other groups' options, `# @package _global_`)."""
    files = {
        "data/mydata.yaml": "defaults:\n  - demo\n  - _self_\nname: mydata\n",
        "algorithm/myalgo.yaml": "defaults:\n  - grpo\n  - _self_\nname: myalgo\n",
        "experiment/myrecipe.yaml": "# @package _global_\ndefaults:\n  - override /algorithm: dpo\n"
                                    "  - override /model: tiny\ntrain:\n  lr: 0.00123\n",
    }
    for name, text in files.items():
        (tmp_path / "conf" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "conf" / name).write_text(text)
    return tmp_path / "conf"


def test_user_groups_compose_through_the_api(user_conf):
    cfg = compose(["data=mydata", "experiment=myrecipe"], config_dirs=[user_conf])
    assert (cfg.data.name, cfg.model.name, cfg.algorithm.kind, cfg.train.lr) == ("mydata", "tiny", "dpo", 0.00123)
    # the experiment's algorithm types the command line's algorithm keys (a key of dpo's, not of sft's)
    cfg = compose(["experiment=myrecipe", "algorithm.reference.batch_size=3"], config_dirs=[user_conf])
    assert cfg.algorithm.reference.batch_size == 3
    cfg = compose([f"hydra.searchpath=[file://{user_conf}]", "algorithm=myalgo", "algorithm.num_generations=4"])
    assert (cfg.algorithm.name, cfg.algorithm.kind, cfg.algorithm.num_generations) == ("myalgo", "grpo", 4)


def test_user_groups_are_checked_like_the_shipped_ones(user_conf):
    with pytest.raises(ConfigError, match=r"data=mydat: no such option in data/ \(searched .*conf\)\. Did you mean 'mydata'\? Valid options: .*demo.*mydata"):
        compose(["data=mydat"], config_dirs=[user_conf])
    # myalgo is typed by the schema of the file it builds on (grpo)
    with pytest.raises(ConfigError, match=r"'num_generatons' is not a key of algorithm\. Did you mean 'num_generations'"):
        compose([f"hydra.searchpath=[file://{user_conf}]", "algorithm=myalgo", "algorithm.num_generatons=4"])
    with pytest.raises(ConfigError, match=r"'reference' is not a key of algorithm"):
        compose(["algorithm.reference.batch_size=3"], config_dirs=[user_conf])  # sft: no experiment picked dpo
    with pytest.raises(ConfigError, match=r"debug=fast: no such option in debug/\. Valid options: none \(add DIR/debug/fast\.yaml and pass --config-dir DIR\)"):
        compose(["debug=fast"])
    with pytest.raises(ConfigError, match=r"config dir .*nope: no such directory"):
        compose(["data=mydata"], config_dirs=[user_conf / "nope"])
    with pytest.raises(ConfigError, match=r"hydra.searchpath: file://.*nope: no such directory"):
        compose([f"hydra.searchpath=[file://{user_conf / 'nope'}]"])


def test_user_groups_through_the_cli(user_conf):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "align_runner", *args], capture_output=True, text=True, timeout=300,
                              cwd=user_conf.parent)

    bad = cli("--config-dir", str(user_conf), "data=mydat")
    assert bad.returncode == 2 and "Did you mean 'mydata'" in bad.stderr and "Traceback" not in bad.stderr
    shown = cli("-cd", str(user_conf), "experiment=myrecipe", "data=mydata", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr
    assert "name: mydata" in shown.stdout and "lr: 0.00123" in shown.stdout and "kind: dpo" in shown.stdout
    # a run composes in the launcher first, then in Hydra's main: both see the relative dir
    plan = cli("--config-dir=conf", "experiment=myrecipe", "pipeline.dry_run=true", f"paths.outputs={user_conf.parent / 'out'}")
    assert plan.returncode == 0, plan.stderr
    assert "model=tiny" in plan.stdout and "│ dpo " in plan.stdout
