"""Recipes (align_runner/conf/experiment/) and their golden checks.

Every algorithm has a recipe at both scales; every tiny recipe's golden passes (this is the CI check:
one store for the whole session, so recipes share their SFT, reward and reference stages); a changed
loss fails the check with a row naming the metric; ``update`` rewrites a golden and prints old -> new;
a recipe without a golden is its own exit status, found without running anything; user recipes in
their own config dir work the same way. The demo-scale checks are ``slow``.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from align_runner import api, recipes
from align_runner.validate import CONF_DIR, ConfigError, check_override_keys

RECIPES = recipes.discover()
TINY = sorted(n for n, r in RECIPES.items() if r.scale == "tiny")
DEMO = sorted(n for n, r in RECIPES.items() if r.scale == "demo")
ALGORITHMS = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))
GOLDENS = CONF_DIR / "experiment" / recipes.GOLDENS


@pytest.fixture(scope="session")
def session_outputs(tmp_path_factory) -> Path:
    """One outputs dir (and so one store) for every recipe run of the session."""
    return tmp_path_factory.mktemp("recipes-outputs")


@pytest.fixture
def env(session_outputs, model_cache, monkeypatch):
    """The configured outputs are the session's (`--store` reuses them); built tiny models are cached."""
    monkeypatch.setenv("ALIGN_RUNNER_OUTPUTS", str(session_outputs))
    monkeypatch.setenv("ALIGN_RUNNER_CACHE", model_cache)
    return session_outputs


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = recipes.main(["recipes", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------------------------- the recipes


def test_every_algorithm_has_a_recipe_at_both_scales():
    for algorithm in ALGORITHMS:
        for name, model in ((algorithm, "smollm2-135m"), (f"{algorithm}_tiny", "tiny")):
            assert name in RECIPES, f"no recipe {name}: add experiment/{name}.yaml (see experiment/README.md)"
            cfg = api.compose([f"experiment={name}"])
            assert (cfg.algorithm.name, cfg.model.name) == (algorithm, model), name
            assert RECIPES[name].description(), f"{name}: the first comment line says what it runs"
    for name in TINY:
        assert RECIPES[name].golden_path().is_file(), f"{name}: no golden; run `align-runner recipes update {name}`"


def test_without_an_experiment_the_run_is_unchanged():
    """The sft recipe is the default run written out: composing it changes nothing."""
    default = OmegaConf.to_container(api.compose([]))
    assert OmegaConf.to_container(api.compose(["experiment=sft"])) == default
    assert (default["algorithm"]["name"], default["model"]["name"]) == ("sft", "smollm2-135m")


def test_tiny_recipes_share_their_upstream_stages(tmp_path):
    """The SFT every tiny recipe trains first is sft_tiny's; grpo_rm_tiny's and ppo_tiny's reward model
    is reward_tiny's: one stage each in a shared store."""
    from align_runner.pipeline.runner import plan
    from align_runner.pipeline.store import StageStore

    @functools.cache
    def keys(name):
        cfg = api.compose([f"experiment={name}"])
        return {p.spec.name: p.key for p in plan(cfg, StageStore(tmp_path))}

    sft, reward = keys("sft_tiny")["sft"], keys("reward_tiny")["reward"]
    for name in TINY:
        assert keys(name)["sft"] == sft, name
    assert keys("grpo_rm_tiny")["reward"] == keys("ppo_tiny")["reward"] == reward
    assert keys("ipo_tiny")["ref_logps"] == keys("dpo_tiny")["ref_logps"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_key_of_a_recipe_has_a_comment_above_it(name):
    lines = RECIPES[name].path.read_text().splitlines()
    assert lines[0] == "# @package _global_", f"{name}: a recipe sets keys anywhere in the config"
    for i, line in enumerate(lines):
        if re.match(r"\s*[\w.]+:", line) and line.strip() != "defaults:":
            assert lines[i - 1].strip().startswith("#"), f"{RECIPES[name].path}:{i + 1}: {line.strip()!r} has no comment above it"


def test_a_misspelt_recipe_gets_a_suggestion(capsys):
    with pytest.raises(ConfigError, match=r"experiment=dpo_tiy: no such option in experiment/\. Did you mean 'dpo_tiny'\?"):
        api.compose(["experiment=dpo_tiy"])
    rc, _, err = cli(capsys, "check", "dpo_tiy")
    assert rc == recipes.EXIT_USAGE
    assert "no recipe 'dpo_tiy' in experiment/. Did you mean 'dpo_tiny'?" in err


def test_list_shows_every_recipe_with_its_scale(capsys):
    rc, out, _ = cli(capsys, "list")
    assert rc == 0
    assert re.search(r"^dpo_tiny\s+tiny\s+dpo\s+yes\s+DPO at CI scale", out, re.M)
    assert re.search(r"^ppo\s+demo\s+ppo\s+(yes|no)\s+PPO with a critic", out, re.M)
    assert len(out.splitlines()) == 1 + len(RECIPES)


# ------------------------------------------------------------------------- pure pieces, by hand


def test_fixed_steps_spread_over_the_run():
    assert recipes.fixed_steps([1, 2, 3, 4]) == [1, 2, 3, 4]
    # indices round(i * 39 / 4) for i = 0..4: 0, 10 (9.75), 20 (19.5), 29 (29.25), 39
    assert recipes.fixed_steps(list(range(1, 41))) == [1, 11, 21, 30, 40]
    rows = [{"step": 1, "loss": 2.0, "lr": 0.1}, {"step": 1, "eval/loss": 9.0}, {"step": 2, "loss": 1.5, "reward": 0.25}]
    assert recipes.trajectory("dpo", rows) == {"dpo/loss@step1": 2.0, "dpo/loss@step2": 1.5, "dpo/reward@step2": 0.25}


def test_compare_tolerances_and_verdicts():
    golden = {
        "a": {"value": 1.0, "abs": 0.0, "rel": 0.0},
        "b": {"value": 2.0, "abs": 0.1, "rel": 0.0},
        "c": {"value": 10.0, "abs": 0.0, "rel": 0.01},
        "d": {"value": 3.0, "abs": 0.0, "rel": 0.0},
    }
    rows = recipes.compare("r", golden, {"a": 1.0, "b": 2.11, "c": 10.1, "e": 5.0})
    assert [(r.metric, r.tolerance, r.verdict) for r in rows] == [
        ("a", "exact", "ok"),
        ("b", "±0.1", "DRIFT"),  # 0.11 away, 0.1 allowed
        ("c", "±1%", "ok"),  # 0.1 away, 0.01 * 10 allowed
        ("d", "exact", "missing"),
        ("e", "", "new"),
    ]
    assert [r.failed for r in rows] == [False, True, False, True, False]
    assert recipes.within(float("nan"), float("nan"), 0, 0) and not recipes.within(1.0, float("nan"), 1, 1)
    drift, fine, no_golden = [rows[1]], [rows[0]], None
    assert recipes.exit_code({"x": fine}) == 0
    assert recipes.exit_code({"x": fine, "y": no_golden}) == recipes.EXIT_NO_GOLDEN
    assert recipes.exit_code({"x": drift, "y": no_golden}) == recipes.EXIT_DRIFT


def test_update_keeps_tolerances_and_says_what_changed():
    old = {"a": {"value": 1.0, "abs": 0.5, "rel": 0.0}, "gone": {"value": 7.0, "abs": 0.0, "rel": 0.0}}
    new = recipes.new_golden("demo", {"a": 1.25, "b": 2.0}, old)
    assert new == {"a": {"value": 1.25, "abs": 0.5, "rel": 0.0}, "b": {"value": 2.0, "abs": 0.02, "rel": 0.02}}
    assert recipes.diff_lines(old, new) == ["  a: 1.0 -> 1.25", "  + b: 2.0 (new)", "  - gone: 7.0 (removed)"]


# ------------------------------------------------------------------------------ the golden checks


@pytest.mark.parametrize("name", TINY)
def test_tiny_recipe_matches_its_golden(name, env):
    results = recipes.check([RECIPES[name]], store=True)
    table = recipes.check_table(results)
    assert recipes.exit_code(results) == 0, table
    metrics = {r.metric for r in results[name]}
    stage = api.compose([f"experiment={name}"]).algorithm.kind  # pipeline=auto names the main stage by its kind
    # the golden holds the main stage's loss trajectory and its final metrics
    assert f"{stage}/loss@step1" in metrics and f"{stage}/loss" in metrics, sorted(metrics)


def test_a_changed_loss_fails_the_check_naming_the_metric(env, capsys, monkeypatch):
    """The SFT loss doubled: a fresh store (the default) recomputes SFT, and the check names the metrics
    that moved; step 1's loss, before any update, is exactly twice the golden one."""
    import align_runner.algos.sft as sft
    from align_runner.registry import get_stage

    # stage modules import sft_loss by name (eval's held-out loss): loaded first, they keep the
    # original, so the doubled loss reaches only the configured `algorithm.loss` of this test's run
    get_stage("eval")
    original = sft.sft_loss

    @functools.wraps(original)
    def doubled(*args, **kwargs):
        out = original(*args, **kwargs)
        return out._replace(loss=out.loss * 2)

    monkeypatch.setattr(sft, "sft_loss", doubled)
    rc, out, _ = cli(capsys, "check", "sft_tiny")
    assert rc == recipes.EXIT_DRIFT, out
    row = re.search(r"^sft_tiny\s+sft/loss@step1\s+(\S+)\s+(\S+)\s+exact\s+DRIFT$", out, re.M)
    assert row, out
    assert float(row.group(2)) == pytest.approx(2 * float(row.group(1)), rel=1e-6)
    assert re.search(r"^sft_tiny\s+\(\d+ of \d+ metrics within tolerance\)\s+DRIFT$", out, re.M)


def test_update_rewrites_a_golden_and_prints_the_diff(env, capsys, tmp_path):
    goldens = tmp_path / "goldens"
    shutil.copytree(GOLDENS, goldens)
    path = goldens / "sft_tiny.json"
    shipped = json.loads(path.read_text())["metrics"]
    edited = json.loads(path.read_text())
    edited["metrics"]["sft/loss@step2"]["value"] = 9.0
    edited["metrics"]["sft/lr"]["abs"] = 0.5  # a hand-set tolerance survives the update
    path.write_text(json.dumps(edited))

    rc, out, _ = cli(capsys, "check", "sft_tiny", "--store", "--goldens", str(goldens))
    assert rc == recipes.EXIT_DRIFT and re.search(r"^sft_tiny\s+sft/loss@step2\s+9\.0\s+\S+\s+exact\s+DRIFT$", out, re.M)

    rc, out, _ = cli(capsys, "update", "sft_tiny", "--store", "--goldens", str(goldens))
    assert rc == 0
    assert f"sft_tiny: 1 change(s) to {path}" in out
    assert f"  sft/loss@step2: 9.0 -> {shipped['sft/loss@step2']['value']!r}" in out
    rewritten = json.loads(path.read_text())["metrics"]
    assert rewritten["sft/lr"] == {**shipped["sft/lr"], "abs": 0.5}
    assert {k: v for k, v in rewritten.items() if k != "sft/lr"} == {k: v for k, v in shipped.items() if k != "sft/lr"}
    assert cli(capsys, "check", "sft_tiny", "--store", "--goldens", str(goldens))[0] == 0


def test_a_broken_golden_file_is_named_before_anything_runs(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(recipes, "run_recipe", lambda *a, **k: pytest.fail("ran a recipe with a broken golden"))
    (tmp_path / "sft_tiny.json").write_text('{"metrics": {"sft/loss@step1": {"value": 2.5, "abs": 0}}}')
    rc, _, err = cli(capsys, "check", "sft_tiny", "--goldens", str(tmp_path))
    assert rc == recipes.EXIT_USAGE
    assert err == (f"align-runner recipes: error: {tmp_path / 'sft_tiny.json'}: metric 'sft/loss@step1': "
                   "expected keys value, abs, rel; missing rel\n")
    (tmp_path / "sft_tiny.json").write_text("{not json")
    rc, _, err = cli(capsys, "check", "sft_tiny", "--goldens", str(tmp_path))
    assert rc == recipes.EXIT_USAGE and err.startswith(f"align-runner recipes: error: {tmp_path / 'sft_tiny.json'}: not a golden file (JSONDecodeError")


def test_a_recipe_without_golden_is_reported_without_running(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(recipes, "run_recipe", lambda *a, **k: pytest.fail("ran a recipe without a golden"))
    rc, out, _ = cli(capsys, "check", "sft_tiny", "--goldens", str(tmp_path))
    assert rc == recipes.EXIT_NO_GOLDEN
    assert re.search(r"^sft_tiny\s+\(no golden yet: run `align-runner recipes update sft_tiny`\)\s+NO GOLDEN$", out, re.M)
    rc, out, _ = cli(capsys, "check", "--scale", "demo", "--goldens", str(tmp_path))
    assert rc == recipes.EXIT_NO_GOLDEN
    assert re.findall(r"^(\w+)\s+\(no golden yet: run `align-runner recipes update \1`\)\s+NO GOLDEN$", out, re.M) == DEMO


# --------------------------------------------------------------------------------- user recipes


MINE = """# @package _global_
# DPO at CI scale with beta 0.2: dpo_tiny with a stronger pull to the reference
defaults:
  - dpo_tiny
  - _self_

# the dpo stage's algorithm
algorithm:
  # its loss
  loss:
    # the KL constraint's strength (dpo_tiny: 0.1)
    beta: 0.2
"""


def test_a_user_recipe_works_like_a_shipped_one(env, capsys, tmp_path, count_optimizer_steps):
    conf = tmp_path / "my_conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "mine_tiny.yaml").write_text(MINE)
    cfg = api.compose(["experiment=mine_tiny"], config_dirs=[conf])
    assert (cfg.algorithm.name, cfg.model.name, cfg.algorithm.loss.beta) == ("dpo", "tiny", 0.2)
    # built on dpo_tiny, it types command-line keys as DPO's
    check_override_keys(["experiment=mine_tiny", "algorithm.reference.batch_size=4"], [conf])

    rc, out, _ = cli(capsys, "update", "mine_tiny", "--config-dir", str(conf), "--store")
    golden = conf / "experiment" / "goldens" / "mine_tiny.json"
    assert rc == 0 and golden.is_file() and "  + dpo/loss@step1: " in out
    assert json.loads(golden.read_text())["metrics"]["dpo/loss@step1"]["abs"] == 0.0  # tiny: exact

    rc, out, _ = cli(capsys, "list", "--config-dir", str(conf))
    assert re.search(r"^mine_tiny\s+tiny\s+dpo\s+yes\s+DPO at CI scale with beta 0\.2", out, re.M)

    steps = count_optimizer_steps["n"]
    rc, out, _ = cli(capsys, "check", "mine_tiny", "--config-dir", str(conf), "--store")
    assert rc == 0, out
    assert count_optimizer_steps["n"] == steps  # every stage a cache hit: no training


# --------------------------------------------------------------------------------- demo scale


@pytest.mark.slow
@pytest.mark.parametrize("name", DEMO)
def test_demo_recipe_matches_its_golden(name):
    """The embedded model, minutes to an hour per recipe on a CPU, every stage computed afresh."""
    if not RECIPES[name].golden_path().is_file():
        pytest.skip(f"no golden yet for {name}: run `align-runner recipes update {name}`")
    results = recipes.check([RECIPES[name]])
    assert recipes.exit_code(results) == 0, recipes.check_table(results)
