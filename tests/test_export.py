"""align-runner export: a run's final model as a Hugging Face checkpoint that loads from any working
directory (full model, LoRA adapter, merged adapter), its card, its errors, atomicity, hub upload, and
run dirs that still open after moving or copying."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import cli_env, run_cli, tiny_overrides
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from align_runner import api
from align_runner.export import ExportError, export, final_stage, main, main_stage
from align_runner.redact import MASK

TINY = [
    "model=tiny",
    "data.sft.train.limit=64",
    "data.sft.eval.limit=16",
    "data.preference.train.limit=64",
    "data.prompt.eval.limit=16",
    "eval.limit=16",
    "eval.max_new_tokens=4",
    "train.max_steps=4",
    "train.lr=1e-3",
    "train.progress=false",
]
LORA = ["+model/lora=default", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0"]
IDS = torch.tensor([[5, 17, 42, 99, 3, 250]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def _causal_lm_logits(path) -> torch.Tensor:
    return _logits(AutoModelForCausalLM.from_pretrained(path))


def _card(out: Path) -> tuple[dict, str]:
    _, front, body = (out / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(front), body


def _run_in(cwd: Path, overrides: list[str]) -> Path:
    """Run a pipeline from ``cwd`` with outputs relative to it (as a user would); the absolute run dir."""
    before = Path.cwd()
    os.chdir(cwd)
    try:
        return cwd / api.run(overrides).run_dir
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, model_cache) -> Path:
    """A finished tiny SFT run with eval stages whose eval samples at temperature 0.7."""
    work = tmp_path_factory.mktemp("sft-run")
    return _run_in(work, [*TINY, "paths.outputs=outputs", f"paths.cache={model_cache}", "eval.temperature=0.7"])


def _stage(run_dir: Path, name: str) -> dict:
    return next(s for s in json.loads((run_dir / "run.json").read_text())["stages"] if s["name"] == name)


def test_exported_run_reloads_from_another_cwd_with_card_and_generation_config(sft_run, tmp_path, monkeypatch):
    out = export(sft_run, tmp_path / "export")
    assert out == (tmp_path / "export").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    stage_model = Path(_stage(sft_run, "sft")["dir"]) / "model"
    assert torch.equal(_causal_lm_logits(out), _causal_lm_logits(stage_model))
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "adapter").exists() and not (out / "adapter_config.json").exists()

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.chat_template == AutoTokenizer.from_pretrained(stage_model).chat_template
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    # eos: the model's <|im_end|> (2) and the tokenizer's <|endoftext|> (0), which also pads; the
    # run's eval sampled at 0.7
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.eos_token_id, gen.pad_token_id, gen.do_sample, gen.temperature) == ([0, 2], 0, True, 0.7)

    meta, body = _card(out)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"align_runner", "sft"} <= set(meta["tags"]) and "lora" not in meta["tags"]
    assert "base_model" not in meta  # a tiny model built locally has no hub id
    sft = _stage(sft_run, "sft")
    assert f"| loss | {sft['metrics']['loss']:.4g} |" in body
    assert f"| sft | sft | `{sft['key'][:12]}` | computed |" in body and "| eval_after | eval |" in body
    recipe = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    assert recipe["train"]["lr"] == 0.001 and recipe["eval"]["temperature"] == 0.7
    assert "upstream" not in recipe  # algorithm=sft runs no stage before its main one
    assert "Command:" not in body  # an API run records no command line


def test_a_run_stage_link_and_a_store_dir_export_the_same_weights(sft_run, tmp_path):
    sft = _stage(sft_run, "sft")
    from_run = load_file(str(export(sft_run, tmp_path / "run") / "model.safetensors"))
    from_link = load_file(str(export(sft_run / "stages" / "sft", tmp_path / "link") / "model.safetensors"))
    from_store = export(sft["dir"], tmp_path / "store")
    assert from_run.keys() == from_link.keys() and all(torch.equal(from_run[k], from_link[k]) for k in from_run)
    assert (tmp_path / "store" / "model.safetensors").read_bytes() == (tmp_path / "run" / "model.safetensors").read_bytes()
    _, body = _card(from_store)
    # without its run, the card holds what the stage's manifest knows
    assert "The stage's config" in body and "Stages:" not in body and f"| loss | {sft['metrics']['loss']:.4g} |" in body
    # a store stage carries no eval settings: the model's own generation config, with eos and pad
    gen = GenerationConfig.from_pretrained(from_store)
    assert (gen.eos_token_id, gen.pad_token_id) == ([0, 2], 0) and not gen.do_sample


def _stages(*pairs: str) -> list[dict]:
    return [{"name": p.split(":")[0], "kind": p.split(":")[-1]} for p in pairs]


def test_the_final_model_is_read_from_the_stage_graph():
    sft = _stages("data_prep", "eval_before:eval", "sft", "eval_after:eval")
    assert final_stage(sft, "sft")["name"] == "sft"
    # a reward run exports its reward model, not the SFT policy it started from
    assert final_stage(_stages("data_prep", "sft", "reward"), "reward")["name"] == "reward"
    # grpo_rm trains a reward model too, but its main stage is the policy
    grpo_rm = _stages("data_prep", "sft", "reward", "eval_before:eval", "grpo", "eval_after:eval")
    assert final_stage(grpo_rm, "grpo")["name"] == "grpo"
    assert final_stage(_stages("data_prep", "sft", "ref_logps", "dpo", "polish:sft"), "dpo")["name"] == "polish"
    with pytest.raises(ExportError, match=r"no stage of this run trains a model \(stages: \['data_prep', 'eval'\]\)"):
        final_stage(_stages("data_prep", "eval"), None)
    with pytest.raises(ExportError, match="unknown stage kind 'mystery'"):
        final_stage(_stages("data_prep", "x:mystery"), None)

    assert main_stage({"algorithm": {"kind": "dpo"}, "pipeline": {"stages": None}}) == "dpo"
    explicit = {"algorithm": {"kind": "reward"}, "pipeline": {"stages": [
        {"name": "warmup", "kind": "sft", "config": "upstream.sft"}, {"name": "rm", "kind": "reward", "config": "algorithm"}]}}
    assert main_stage(explicit) == "rm"


def _fails(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("align-runner export: error: ") and "\n" not in err
    return err


def test_bad_sources_and_output_dirs_fail_with_one_named_line(sft_run, tmp_path, capsys):
    out = ["--output_dir", str(tmp_path / "out")]
    assert "nope does not exist; expected a run dir" in _fails(["export", str(tmp_path / "nope"), *out], capsys)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("x")
    assert f"{stray} is not a run dir (no run.json) nor a stage dir (no manifest.json)" in _fails(["export", str(stray), *out], capsys)
    err = _fails(["export", str(sft_run / "stages" / "data_prep"), *out], capsys)
    assert "stage 'data_prep' (kind 'data_prep') holds no model/*.safetensors" in err
    err = _fails(["export", str(sft_run / "stages" / "sfft"), *out], capsys)
    assert "has no stage 'sfft'; its stages: ['data_prep', 'eval_before', 'sft', 'eval_after']" in err
    unfinished = tmp_path / "sft-unfinished"
    subprocess.run(["cp", "-r", _stage(sft_run, "sft")["dir"], str(unfinished)], check=True)
    (unfinished / "DONE").unlink()
    assert f"{unfinished}: stage 'sft' is unfinished (no DONE marker)" in _fails(["export", str(unfinished), *out], capsys)
    assert "--private applies to --push-to-hub" in _fails(["export", str(sft_run), *out, "--private"], capsys)
    assert not (tmp_path / "out").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    assert f"--output_dir {taken} is not empty; pass --overwrite" in _fails(["export", str(sft_run), "--output_dir", str(taken)], capsys)
    assert (taken / "mine.txt").read_text() == "keep me"
    assert main(["export", str(sft_run), "--output_dir", str(taken), "--overwrite"]) == 0
    assert capsys.readouterr().out.strip() == str(taken)
    assert not (taken / "mine.txt").exists() and (taken / "model.safetensors").exists()


def test_a_failed_export_leaves_no_half_written_output(sft_run, tmp_path, monkeypatch):
    import align_runner.model_card

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(align_runner.model_card, "model_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(sft_run, tmp_path / "new")
    kept = tmp_path / "old"
    kept.mkdir()
    (kept / "mine.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="disk full"):
        export(sft_run, kept, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no "new", no temp dir left behind
    assert [p.name for p in kept.iterdir()] == ["mine.txt"]


def test_export_help_through_the_align_runner_command():
    proc = subprocess.run([sys.executable, "-m", "align_runner", "export", "--help"], capture_output=True, text=True,
                          env=cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: align-runner export") and "--merge-lora" in proc.stdout and "--push-to-hub" in proc.stdout


def test_run_dir_links_are_relative_and_moved_or_copied_run_dirs_still_open(tmp_path, model_cache):
    from align_runner.report import write_report

    outputs = tmp_path / "outputs"
    run_dir = api.run([*TINY, f"paths.outputs={outputs}", f"paths.cache={model_cache}", "pipeline.eval=false",
                       "train.max_steps=2"]).run_dir
    key12 = _stage(run_dir, "sft")["key"][:12]
    assert os.readlink(run_dir / "stages" / "sft") == f"../../../store/sft-{key12}"
    weights = (run_dir / "stages" / "sft" / "model" / "model.safetensors").read_bytes()

    def exports(source, name: str) -> bool:
        return (export(source, tmp_path / name) / "model.safetensors").read_bytes() == weights

    # cp -r elsewhere keeps the links as they are (dangling there): the stages are found in the store
    copied, deep = tmp_path / "copy", tmp_path / "deep"
    subprocess.run(["cp", "-r", str(run_dir), str(copied)], check=True)
    subprocess.run(["cp", "-rL", str(run_dir), str(deep)], check=True)  # copies the stages themselves
    assert (copied / "stages" / "sft").is_symlink() and not (copied / "stages" / "sft").exists()
    assert exports(copied, "e-copy")
    assert "## Training curves" in write_report(copied).read_text()

    # move outputs/ as a whole: the recorded store paths are gone, the relative links still work
    moved = tmp_path / "moved"
    os.rename(outputs, moved)
    moved_run = moved / run_dir.relative_to(outputs)
    assert not Path(_stage(moved_run, "sft")["dir"]).exists()
    assert exports(moved_run, "e-moved") and exports(moved_run / "stages" / "sft", "e-moved-stage")
    assert exports(deep, "e-deep")  # the cp -rL copy needs no store
    for run in (moved_run, deep):
        assert "## Training curves" in write_report(run).read_text() and (run / "report" / "train_sft.png").exists()
    # a cp -r copy whose store has moved away has nothing left to read: said in one line
    with pytest.raises(ExportError, match=r"stage 'sft' of run .*copy is not here: .*copy it with `cp -rL`"):
        export(copied, tmp_path / "e-lost")


def test_lora_adapter_exports_with_a_base_that_loads_from_any_cwd(tmp_path, monkeypatch, capsys):
    from peft import AutoPeftModelForCausalLM

    work = tmp_path / "work"
    work.mkdir()
    # relative outputs and cache, as a user's run: the recorded base must still resolve from elsewhere
    run_dir = _run_in(work, [*TINY, *LORA, "paths.outputs=outputs", "pipeline.eval=false", "train.max_steps=3",
                             "train.lr=1e-2"])
    stage_model = Path(_stage(run_dir, "sft")["dir"]) / "model"
    recorded = json.loads((stage_model / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded).is_absolute() and recorded.startswith(str(work.resolve() / "outputs" / "cache"))

    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    out = export(run_dir, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out / "base")
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    assert (out / "base" / "model.safetensors").read_bytes() == (Path(recorded) / "model.safetensors").read_bytes()
    meta, body = _card(out)
    assert meta["library_name"] == "peft" and {"align_runner", "sft", "lora"} <= set(meta["tags"])
    assert "copied into `base/`" in body

    monkeypatch.chdir(tmp_path)
    merged = _causal_lm_logits(stage_model)
    adapted = _logits(AutoPeftModelForCausalLM.from_pretrained(out))
    # base + adapter computes what the merged weights compute, up to float rounding
    assert torch.allclose(adapted, merged, atol=1e-5)
    assert not torch.allclose(adapted, _causal_lm_logits(recorded), atol=1e-3)  # the adapter changed the model
    assert AutoTokenizer.from_pretrained(out).chat_template

    assert main(["export", str(run_dir), "--output_dir", str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert torch.equal(_causal_lm_logits(tmp_path / "merged"), merged)
    assert "lora" not in _card(tmp_path / "merged")[0]["tags"]

    # a stage saved before bases were recorded by absolute path: resolvable only from the run's cwd
    adapter_config = stage_model / "adapter" / "adapter_config.json"
    adapter_config.write_text(json.dumps({**json.loads(adapter_config.read_text()),
                                          "base_model_name_or_path": os.path.relpath(recorded, work)}))
    capsys.readouterr()
    err = _fails(["export", str(run_dir), "--output_dir", str(tmp_path / "old")], capsys)
    assert f"the adapter's base model 'outputs/cache/{Path(recorded).name}' (recorded in" in err and "--merge-lora" in err
    monkeypatch.chdir(work)
    assert json.loads((export(run_dir, tmp_path / "old") / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == str(tmp_path / "old" / "base")


def test_an_adapter_on_an_upstream_stage_finds_that_stage_after_outputs_moved(tmp_path):
    from peft import AutoPeftModelForCausalLM

    outputs = tmp_path / "outputs"
    run_dir = api.run([*TINY, *LORA, f"paths.outputs={outputs}", f"paths.cache={tmp_path / 'cache'}",
                       "algorithm=dpo", "pipeline.eval=false", "train.max_steps=2", "train.lr=1e-2"]).run_dir
    sft, dpo = _stage(run_dir, "sft"), _stage(run_dir, "dpo")
    # DPO's adapter sits on the SFT stage's merged model, recorded by its absolute store path
    recorded = json.loads((Path(dpo["dir"]) / "model" / "adapter" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(Path(sft["dir"]) / "model")

    moved = tmp_path / "moved"
    os.rename(outputs, moved)  # that path is gone; the run finds the SFT stage by its key
    out = export(moved / run_dir.relative_to(outputs), tmp_path / "dpo-adapter")
    moved_sft = moved / Path(sft["dir"]).relative_to(outputs)
    assert (out / "base" / "model.safetensors").read_bytes() == (moved_sft / "model" / "model.safetensors").read_bytes()
    merged = _causal_lm_logits(moved / Path(dpo["dir"]).relative_to(outputs) / "model")
    assert torch.allclose(_logits(AutoPeftModelForCausalLM.from_pretrained(out)), merged, atol=1e-5)
    assert {"dpo", "lora"} <= set(_card(out)[0]["tags"])


SECRET = "hf_export_test_secret_123"


class FakeHfApi:
    """Records what would go to the hub."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        files = sorted(str(p.relative_to(kwargs["folder_path"])) for p in Path(kwargs["folder_path"]).rglob("*"))
        self.calls.append(("upload_folder", files, kwargs))


def test_cli_run_card_has_its_command_and_push_keeps_the_token_off_disk(tmp_path, model_cache, monkeypatch):
    import huggingface_hub

    outputs = tmp_path / "outputs"
    # a value that is the hub token at export time: it must be masked wherever it appears
    proc = run_cli(tiny_overrides(outputs, model_cache, "train.max_steps=2", f"tracking.project={SECRET}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = next(outputs.glob("*/*/run.json")).parent
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    out = tmp_path / "push"

    assert main(["export", str(run_dir), "--output_dir", str(out), "--push-to-hub", "me/tiny-sft", "--private"]) == 0

    (create, repo, kwargs), (upload, files, up) = FakeHfApi.calls
    assert (create, repo, kwargs) == ("create_repo", "me/tiny-sft", {"repo_type": "model", "private": True, "exist_ok": True})
    assert upload == "upload_folder" and up["repo_id"] == "me/tiny-sft" and up["folder_path"] == str(out)
    assert up.get("token") is None and "README.md" in files and "model.safetensors" in files
    _, body = _card(out)
    assert f"python -m align_runner model=tiny paths.outputs={outputs}" in body
    assert f"tracking.project={MASK}" in body
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-sft")' in body
    for f in out.rglob("*"):
        assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f
