"""Pipeline semantics on the tiny model: cache hits do no work, changes recompute exactly what depends
on them, force recomputes, an interrupted stage is never DONE, run.json records it all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run

from align_runner.pipeline.store import DONE


def _hits(result) -> dict[str, bool]:
    return {s.name: s.cache_hit for s in result.stages}


def test_second_run_trains_nothing(tiny, count_optimizer_steps):
    first = run(tiny)
    assert [s.name for s in first.stages] == ["data_prep", "eval_before", "sft", "eval_after"]
    assert not any(_hits(first).values())
    assert count_optimizer_steps["n"] == 4  # train.max_steps

    count_optimizer_steps["n"] = 0
    second = run(tiny)
    assert all(_hits(second).values())
    assert count_optimizer_steps["n"] == 0
    assert [s.key for s in second.stages] == [s.key for s in first.stages]
    assert second.objective == first.objective


def test_sft_only_change_recomputes_sft_and_dependants(tiny, count_optimizer_steps):
    first = run(tiny)
    second = run([*tiny, "train.lr=5e-4"])
    assert _hits(second) == {"data_prep": True, "eval_before": True, "sft": False, "eval_after": False}
    assert second.stage("sft").key != first.stage("sft").key
    assert second.stage("data_prep").key == first.stage("data_prep").key


def test_non_result_keys_do_not_change_keys(tiny):
    first = run(tiny)
    second = run([*tiny, "train.log_every=2", "train.progress=true"])
    assert all(_hits(second).values())
    assert [s.key for s in second.stages] == [s.key for s in first.stages]


def test_force_recomputes_only_the_named_stage(tiny, count_optimizer_steps):
    run(tiny)
    count_optimizer_steps["n"] = 0
    forced = run([*tiny, "pipeline.force=[sft]"])
    assert _hits(forced) == {"data_prep": True, "eval_before": True, "sft": False, "eval_after": True}
    assert count_optimizer_steps["n"] == 4


def test_force_unknown_stage_is_an_error(tiny):
    with pytest.raises(ValueError, match="pipeline.force names \\['sfft'\\]"):
        run([*tiny, "pipeline.force=[sfft]"])


def test_interrupted_stage_is_never_done_and_is_recomputed(tiny, monkeypatch):
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def crash_on_third(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(tiny)
    store = Path(tiny[1].split("=", 1)[1]) / "store"
    sft_dirs = list(store.glob("sft-*"))
    assert len(sft_dirs) == 1 and not (sft_dirs[0] / DONE).exists()
    assert not (sft_dirs[0] / "model").exists()

    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    again = run(tiny)
    assert _hits(again) == {"data_prep": True, "eval_before": True, "sft": False, "eval_after": False}
    assert (sft_dirs[0] / DONE).exists()


def test_run_manifest_and_store_layout(tiny):
    result = run(tiny)
    manifest = json.loads((result.run_dir / "run.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["data_prep", "eval_before", "sft", "eval_after"]
    for s in manifest["stages"]:
        assert set(s) >= {"name", "kind", "key", "dir", "cache_hit", "seconds", "metrics"}
        stage_dir = Path(s["dir"])
        assert stage_dir.name == f"{s['kind']}-{s['key'][:12]}"
        assert (stage_dir / DONE).read_text().strip() == s["key"]
        assert json.loads((stage_dir / "manifest.json").read_text())["key"] == s["key"]
        assert (result.run_dir / "stages" / s["name"]).resolve() == stage_dir.resolve()
    assert set(manifest["versions"]) >= {"align_runner", "torch", "transformers", "python"}
    assert "git_sha" in manifest and manifest["hardware"]["name"] == "cpu"
    assert (result.run_dir / "config.yaml").exists()
    # sft's model is a Hugging Face checkpoint that reloads
    from transformers import AutoModelForCausalLM

    sft_dir = Path(result.stage("sft").dir)
    model = AutoModelForCausalLM.from_pretrained(sft_dir / "model")
    assert sum(p.numel() for p in model.parameters()) > 0
    rows = [json.loads(line) for line in (sft_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mean_token_accuracy"} <= set(rows[0])
    assert "eval/loss" in rows[-1]


def test_sft_then_dpo_share_data_prep_and_sft(tiny, count_optimizer_steps):
    sft = run(tiny)
    dpo = run([*tiny, "algorithm=dpo", "pipeline.eval=false"])
    assert dpo.stage("data_prep").key == sft.stage("data_prep").key and dpo.stage("data_prep").cache_hit
    assert dpo.stage("sft").key == sft.stage("sft").key and dpo.stage("sft").cache_hit
    assert not dpo.stage("dpo").cache_hit


def test_a_stage_reading_a_view_the_data_lacks_fails_at_compose_time():
    from align_runner.api import compose
    from align_runner.pipeline.graph import PipelineConfigError

    with pytest.raises(PipelineConfigError, match=r"stage '(ref_logps|dpo)' reads data.preference, which data=demo does not define"):
        compose(["algorithm=dpo", "data.preference=null"])


def test_new_data_for_one_view_recomputes_only_the_stages_that_read_it(tiny, tmp_path, count_optimizer_steps):
    from align_runner.data.demo import DEMO_DIR

    dpo = [*tiny, "algorithm=dpo", "pipeline.eval=false"]
    first = run(dpo)
    fewer = tmp_path / "preference-train.jsonl"
    fewer.write_text("".join((DEMO_DIR / "preference-train.jsonl").read_text().splitlines(keepends=True)[:40]))
    count_optimizer_steps["n"] = 0
    second = run([*dpo, f"data.preference.train.path={fewer}"])
    # data_prep builds every view, so it reruns; SFT reads only the sft view and stays cached
    assert _hits(second) == {"data_prep": False, "sft": True, "ref_logps": False, "dpo": False}
    assert second.stage("sft").key == first.stage("sft").key
    assert second.stage("dpo").key != first.stage("dpo").key
    assert count_optimizer_steps["n"] == 4  # the DPO stage's steps only


def test_a_stage_reading_a_view_its_kind_does_not_declare_is_refused(tmp_path):
    from align_runner.stages.context import StageContext, StageSpec

    ctx = StageContext(cfg=None, spec=StageSpec("sft", "sft", config="algorithm"), key="k", out_dir=tmp_path, backend=None,
                       inputs={"data": tmp_path}, base_model="m", run_name="r", params={})
    with pytest.raises(RuntimeError, match="stage kind 'sft' reads view 'preference' but declares only \\('sft',\\)"):
        ctx.dataset("preference")
