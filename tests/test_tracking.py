"""Trackers: metrics.jsonl in every stage dir; one TensorBoard / W&B (offline) run per pipeline job, in
its run dir, with every stage under its name (cached stages from their metrics.jsonl), the resolved
config and stage keys as hyperparameters and eval samples as a table; run name and group from the
Hydra job (a sweep's jobs share a group); secrets never reach a saved file."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cli_runner import cli_env, metrics, run_cli, single_thread, tiny_overrides

from align_runner import api
from align_runner.redact import MASK, redact, redact_text

WANDB_SECRET = "wandb-secret-0123456789abcdef"
HF_SECRET = "hf_secretTOKENvalue987654321"


def _two_runs(tiny: list[str], backend: str):
    """SFT alone, then the same pipeline with eval: the second job's data_prep and SFT are cache hits,
    its eval stages computed. Returns (the first run, the second)."""
    with single_thread():
        first = api.run([*tiny, "pipeline.eval=false"])
        second = api.run([*tiny, f"tracking={backend}"])
    assert {s.name: s.cache_hit for s in second.stages} == {
        "data_prep": True, "eval_before": False, "sft": True, "eval_after": False,
    }
    return first, second


def test_tensorboard_one_run_per_job_with_cached_stages_config_and_samples(tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    first, second = _two_runs(tiny, "tensorboard")
    sft = Path(first.stage("sft").dir)
    # one event file, in the job's run dir; none in the shared stage dirs
    assert len(list((second.run_dir / "tensorboard").glob("events.*"))) == 1
    assert not list(Path(sft).parent.glob("*/tensorboard"))
    events = EventAccumulator(str(second.run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()

    # the cached SFT stage's curve, replayed from its metrics.jsonl under the stage's prefix
    losses = [(e.step, e.value) for e in events.Scalars("sft/loss")]
    expected = [(r["step"], r["loss"]) for r in metrics(sft) if "loss" in r]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert losses == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]
    # a cached stage that logs no rows (data_prep) shows its final metrics at step 0; computed eval stages
    assert [(e.step, e.value) for e in events.Scalars("data_prep/sft/train/kept")] == [(0, 64.0)]
    for name in ("eval_before", "eval_after"):
        assert [e.value for e in events.Scalars(f"{name}/accuracy")] == [pytest.approx(second.stage(name).metrics["accuracy"])]

    # the hyperparameters: every stage key and the resolved config, flattened
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert {n: hparams[f"stage_keys.{n}"].string_value for n in ("data_prep", "sft", "eval_after")} == {
        n: second.stage(n).key for n in ("data_prep", "sft", "eval_after")
    }
    assert hparams["config.train.lr"].number_value == 1e-3
    assert hparams["config.model.name"].string_value == "tiny"

    # sample generations: eval's samples.json as a text table
    table = events.Tensors("eval_after/samples/text_summary")[0].tensor_proto.string_val[0].decode()
    samples = json.loads((Path(second.stage("eval_after").dir) / "samples.json").read_text())
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header == sorted(samples[0])  # the columns of samples.json (its keys are saved sorted)
    assert len(table.splitlines()) == 2 + len(samples)


def _leaks(root: Path) -> list[str]:
    return [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and (WANDB_SECRET.encode() in p.read_bytes() or HF_SECRET.encode() in p.read_bytes())
    ]


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run file (``run-<id>.wandb``): a 7-byte header, then LevelDB's log format
    (32 KiB blocks of chunks: crc32c, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, i = [], b"", 7
    while i + 7 <= len(data):
        if block - i % block < 7:  # a block's tail too short for a chunk header is padding
            i += block - i % block
            continue
        _, length, kind = struct.unpack("<IHB", data[i : i + 7])
        if kind == 0:
            break
        pending += data[i + 7 : i + 7 + length]
        i += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(pending))
            pending = b""
    return records


def test_wandb_offline_one_run_per_job_with_cached_stages_config_and_samples(tiny, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    first, second = _two_runs(tiny, "wandb")
    runs = list((second.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and not list(Path(first.stage("sft").dir).glob("wandb"))
    records = wandb_records(runs[0])

    history: dict[str, list[tuple[int, Any]]] = {}
    for r in records:
        if r.HasField("history"):
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for k, v in row.items():
                stage = k.split("/", 1)[0]
                if f"{stage}/step" in row and k != f"{stage}/step":
                    history.setdefault(k, []).append((row[f"{stage}/step"], v))
    sft = Path(first.stage("sft").dir)
    assert history["sft/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in metrics(sft) if "loss" in r]
    assert history["data_prep/sft/train/kept"] == [(0, 64)]
    assert history["eval_after/accuracy"] == [(0, pytest.approx(second.stage("eval_after").metrics["accuracy"]))]

    # the run's config (wandb.init's) is in its run record
    config = {i.key: json.loads(i.value_json) for r in records if r.HasField("run") for i in r.run.config.update}
    assert config["stage_keys"] == {s.name: s.key for s in second.stages}
    assert config["config"]["train"]["lr"] == 1e-3 and config["config"]["model"]["name"] == "tiny"

    # eval's samples as a W&B table: a history entry (nested keys) pointing at its file in the run's media
    table = {i.nested_key[1]: json.loads(i.value_json) for r in records if r.HasField("history") for i in r.history.item
             if list(i.nested_key[:1]) == ["eval_after/samples"]}
    assert table["_type"] == "table-file"
    saved = json.loads((runs[0].parent / "files" / table["path"]).read_text())
    assert {"prompt", "completion", "accuracy"} <= set(saved["columns"])
    assert len(saved["data"]) == len(json.loads((Path(second.stage("eval_after").dir) / "samples.json").read_text()))
    identity = json.loads((second.run_dir / "tracking.json").read_text())
    assert identity["run_name"] == second.run_dir.name and identity["group"] is None  # outside a Hydra job


def test_wandb_offline_api_run_keeps_the_key_out_of_every_file(tiny, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    with single_thread():
        result = api.run([*tiny, "pipeline.eval=false", "tracking=wandb", "tracking.api_key=${oc.env:WANDB_API_KEY}"])
    assert len(list((result.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert f"api_key: '{MASK}'" in (result.run_dir / "config.yaml").read_text()
    assert _leaks(Path(tiny[1].split("=", 1)[1])) == []


@pytest.mark.slow
def test_wandb_offline_run_named_from_the_hydra_job_and_no_secret_in_any_file(tmp_path, model_cache):
    out = tmp_path / "outputs"
    env = cli_env(WANDB_MODE="offline", WANDB_API_KEY=WANDB_SECRET, HF_TOKEN=HF_SECRET)
    overrides = tiny_overrides(out, model_cache, "tracking=wandb", "tracking.api_key=${oc.env:WANDB_API_KEY}")
    run = run_cli(overrides, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]

    run_dir = next(out.glob("*/*/run.json")).parent
    identity = json.loads((run_dir / "tracking.json").read_text())
    assert identity["run_name"] == f"{run_dir.parent.name}_{run_dir.name}"
    assert identity["group"] == "cli"  # the Hydra job name
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    assert identity["run_name"].encode() in offline[0].read_bytes()

    # the resolved config keeps the key's place, masked
    saved = (run_dir / "config.yaml").read_text()
    assert f"api_key: '{MASK}'" in saved
    assert (run_dir / ".hydra" / "overrides.yaml").exists()  # Hydra's own copies are checked too
    assert _leaks(out) == []
    assert WANDB_SECRET not in run.stdout + run.stderr


def test_redact_masks_secret_keys_and_secret_environment_values():
    env = {"WANDB_API_KEY": WANDB_SECRET, "HF_TOKEN": HF_SECRET, "TOKENIZERS_PARALLELISM": "false", "HOME": "/root"}
    cfg = {
        "tracking": {"api_key": "typed-in-key-123", "project": "p"},
        "model": {"source": {"name_or_path": f"https://user:{HF_SECRET}@host/repo", "token": None}},
        "data": {"pad_token": "<|endoftext|>", "max_new_tokens": 32},
        "list": [WANDB_SECRET, "ok"],
    }
    out = redact(cfg, env)
    assert out["tracking"] == {"api_key": MASK, "project": "p"}
    assert out["model"]["source"] == {"name_or_path": f"https://user:{MASK}@host/repo", "token": None}
    assert out["data"] == cfg["data"]  # "pad_token" and "max_new_tokens" are not secrets
    assert out["list"] == [MASK, "ok"]
    assert redact_text(f"key={WANDB_SECRET}", env) == f"key={MASK}"
