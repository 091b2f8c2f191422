"""A secret typed on the command line (``tracking.api_key=...``) reaches the job but no file the run
writes (Hydra's .hydra/ records and multirun.yaml included) and no console line."""

from __future__ import annotations

from pathlib import Path

from cli_runner import cli_env, run_cli, tiny_overrides

from align_runner import api
from align_runner.redact import MASK, hide_secret_overrides, is_secret_key

SECRET = "SECRET123456"
REFERENCE = "${oc.env:ALIGN_RUNNER_SECRET_TRACKING_API_KEY}"


def test_secret_overrides_move_into_the_environment():
    overrides = ["train.lr=1e-3", f"tracking.api_key={SECRET}", "+model.source.token='a b\\'c d'",
                 "tracking.api_key=${oc.env:WANDB_API_KEY}", "data.pad_token=<pad>"]
    hidden, env = hide_secret_overrides(overrides)
    assert hidden == ["train.lr=1e-3", f"tracking.api_key={REFERENCE}",
                      "+model.source.token=${oc.env:ALIGN_RUNNER_SECRET_MODEL_SOURCE_TOKEN}",
                      "tracking.api_key=${oc.env:WANDB_API_KEY}", "data.pad_token=<pad>"]
    assert env == {"ALIGN_RUNNER_SECRET_TRACKING_API_KEY": SECRET, "ALIGN_RUNNER_SECRET_MODEL_SOURCE_TOKEN": "a b'c d"}
    assert is_secret_key("tracking.api_key") and not is_secret_key("data.pad_token")


def test_the_job_still_reads_the_secret(monkeypatch):
    hidden, env = hide_secret_overrides([f"tracking.api_key={SECRET}"])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert api.compose(hidden).tracking.api_key == SECRET


def _files_holding(root: Path, secret: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes())


def test_a_secret_on_the_command_line_is_in_no_written_file_nor_console(tmp_path, model_cache):
    out = tmp_path / "outputs"
    env = cli_env()
    env.pop("WANDB_API_KEY", None)
    overrides = tiny_overrides(out, model_cache, "train.max_steps=2", "tracking=tensorboard", f"tracking.api_key={SECRET}")
    single = run_cli(overrides, cwd=tmp_path, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    # a sweep of two jobs (a non-result key: both reuse the single run's stages) writes multirun.yaml
    # and prints each job's overrides
    sweep = run_cli(["-m", *overrides, "train.log_every=1,2"], cwd=tmp_path, env=env)
    assert sweep.returncode == 0, sweep.stderr[-3000:]

    run_dir = next(p.parent for p in out.glob("*/*/run.json"))
    sweep_dir = next(out.glob("multirun/*/*"))
    written = [run_dir / ".hydra" / n for n in ("config.yaml", "overrides.yaml", "hydra.yaml")]
    written += [sweep_dir / "multirun.yaml", sweep_dir / "0" / ".hydra" / "overrides.yaml", sweep_dir / "1" / "run.json"]
    written += [run_dir / "config.yaml", run_dir / "run.json", run_dir / "cli.log"]
    events, manifests = list(run_dir.glob("tensorboard/events.*")), list(out.glob("store/*/manifest.json"))
    assert [str(p) for p in written if not p.is_file()] == [] and events and len(manifests) == 2
    assert _files_holding(tmp_path, SECRET) == []
    assert SECRET not in single.stdout + single.stderr + sweep.stdout + sweep.stderr
    # what Hydra recorded is the reference; the job had the key (masked where the config is saved)
    assert f"tracking.api_key={REFERENCE}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert f"api_key: '{MASK}'" in (run_dir / "config.yaml").read_text()
    assert f"api_key: '{MASK}'" in (sweep_dir / "0" / "config.yaml").read_text()
    # Hydra's "#0 : ..." lines show the reference (escaped, as sweep jobs receive it)
    assert "tracking.api_key=$\\{oc.env\\:ALIGN_RUNNER_SECRET_TRACKING_API_KEY\\}" in sweep.stdout + sweep.stderr
