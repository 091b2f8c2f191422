"""pipeline.objective is checked when the config is composed: it must name a stage of the pipeline and
a metric that stage's kind declares (register_stage(metrics=...)); a typo fails with "did you mean"
before any model loads. Only the default eval objective meeting a pipeline without eval stages warns."""

from __future__ import annotations

import pytest
from cli_runner import cli_env, run_cli

from align_runner.api import compose
from align_runner.registry import get_stage
from align_runner.validate import ConfigError


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # a metric of eval_after misspelt (the demo's checkers: accuracy, last_number, format)
        (["pipeline.objective=eval_after/acuracy"],
         r"pipeline.objective=eval_after/acuracy: stage 'eval_after' \(eval\) reports no metric 'acuracy'\. Did you mean 'accuracy'\?"),
        # a stage misspelt
        (["pipeline.objective=eval_aftr/accuracy"],
         r"pipeline.objective=eval_aftr/accuracy: 'eval_aftr' is not a stage of this pipeline\. Did you mean 'eval_after'\?"),
        # a training stage's metric: DPO reports rewards/accuracies (TRL's name), not rewards/accuracy
        (["algorithm=dpo", "pipeline.objective=dpo/rewards/accuracy"],
         r"stage 'dpo' \(dpo\) reports no metric 'rewards/accuracy'\. Did you mean 'rewards/accuracies'\?"),
        # an eval metric is checked even when the pipeline has no eval stage to report it
        (["algorithm=reward", "pipeline.objective=eval_after/acuracy"], r"Did you mean 'accuracy'\?"),
        (["pipeline.objective=accuracy"], r"expected '<stage>/<metric>'"),
    ],
)
def test_a_misspelt_objective_is_a_config_error_with_a_suggestion(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # eval_after/accuracy
        ["pipeline.eval=false", "pipeline.objective=sft/eval/loss"],  # the engine's held-out mean
        ["algorithm=dpo", "pipeline.objective=dpo/eval/rewards/accuracies"],
        ["algorithm=grpo", "pipeline.objective=grpo/rewards/accuracy/mean"],  # per reward function
        ["algorithm=ppo", "pipeline.objective=eval_after/reward_model"],  # eval scores with the reward model
        ["pipeline.objective=data_prep/sft/train/kept"],
    ],
)
def test_objectives_the_stages_report_pass(overrides):
    compose(overrides)


def test_the_default_objective_without_eval_stages_only_warns(caplog):
    with caplog.at_level("WARNING", logger="align_runner"):
        cfg = compose(["algorithm=reward"])  # data_prep -> sft -> reward: a scorer gets no eval
    assert cfg.pipeline.objective == "eval_after/accuracy"
    assert "pipeline.objective=eval_after/accuracy names no stage of this pipeline (data_prep, sft, reward)" in caplog.text


@pytest.mark.parametrize("algorithm", ["dpo", "grpo", "ppo"])
def test_every_built_in_kind_declares_its_key_metrics(algorithm):
    from align_runner.pipeline.graph import build_graph

    cfg = compose([f"algorithm={algorithm}"])
    for spec in build_graph(cfg):
        kind = get_stage(spec.kind)
        produced = kind.produces(cfg, spec)
        # eval scores with the reward model only where the pipeline has one (ppo's does)
        scored = "reward_model" in dict(spec.inputs)
        expected = set(kind.key_metrics) - ({"reward_model"} if spec.kind == "eval" and not scored else set())
        assert produced is not None and expected <= produced, (spec.name, expected - (produced or set()))
        if spec.kind == "eval":
            assert ("reward_model" in produced) == scored


@pytest.mark.parametrize(
    ("objective", "suggestion"), [("eval_after/acuracy", "'accuracy'"), ("eval_aftr/accuracy", "'eval_after'")]
)
def test_cli_exits_2_with_one_line_before_any_model_loads(tmp_path, objective, suggestion):
    cache = tmp_path / "cache"
    done = run_cli(
        ["model=tiny", f"paths.outputs={tmp_path / 'outputs'}", f"paths.cache={cache}", f"pipeline.objective={objective}"],
        cwd=tmp_path,
        env=cli_env(),
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("align_runner:")]
    assert len(errors) == 1 and errors[0].startswith(f"align_runner: config error: pipeline.objective={objective}: ")
    assert f"Did you mean {suggestion}?" in errors[0]
    assert "Traceback" not in done.stderr
    # the tiny model is built into paths.cache when it is first loaded: nothing was
    assert not cache.exists() or not any(cache.iterdir())
    assert not (tmp_path / "outputs" / "store").exists()
