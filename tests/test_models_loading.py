"""Model sources, loaders and atomic saving."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from align_runner.models.loading import (
    ModelSourceError,
    build_dir_once,
    count_parameters,
    hub_or_local,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    resolve_source,
    revision_for,
    save_pretrained_atomic,
)
from align_runner.models.tiny import build_tiny

# hidden 32, 1 layer, 4 heads (2 kv), intermediate 64, vocab 512:
# embed 512*32 + q 32*32 + k 32*16 + v 32*16 + o 32*32 + mlp 3*32*64 + 2 norms*32 + final norm 32 + lm_head 512*32
TINY_KW = {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64}
TINY_PARAMS = 512 * 32 + 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32 + 32 + 512 * 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny(str(tmp_path_factory.mktemp("tiny")), **TINY_KW)


# ----------------------------------------------------------------------------- sources


def test_hub_or_local_accepts_model_dir(tiny_dir: str) -> None:
    assert hub_or_local("/unused", name_or_path=tiny_dir) == tiny_dir


def test_hub_or_local_dir_without_config_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match=rf"{tmp_path}.*no config\.json"):
        hub_or_local("/unused", name_or_path=str(tmp_path))


def test_hub_or_local_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        hub_or_local("/unused", name_or_path=str(tmp_path / "nope"))


@pytest.mark.parametrize("bad", ["gpt2", "a/b/c", "org/", "/", "org name/model", ""])
def test_hub_or_local_rejects_non_hub_ids(bad: str) -> None:
    with pytest.raises(ModelSourceError):
        hub_or_local("/unused", name_or_path=bad)


def test_hub_or_local_passes_hub_id_and_remembers_revision() -> None:
    assert hub_or_local("/unused", name_or_path="Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert revision_for("Qwen/Qwen2.5-0.5B-Instruct") is None
    hub_or_local("/unused", name_or_path="HuggingFaceTB/SmolLM2-135M", revision="abc123")
    assert revision_for("HuggingFaceTB/SmolLM2-135M") == "abc123"


def test_resolve_source_instantiates_with_cache_dir(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"_target_": "align_runner.models.tiny.build_tiny", **TINY_KW})
    path = resolve_source(cfg, str(tmp_path))
    assert Path(path).parent == tmp_path and (Path(path) / "config.json").is_file()


def test_resolve_source_rejects_non_string_result(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"_target_": "builtins.dict"})  # returns {'cache_dir': ...}, not a str
    with pytest.raises(TypeError, match=r"builtins\.dict.*returned dict"):
        resolve_source(cfg, str(tmp_path))


# ----------------------------------------------------------------------------- loaders


def test_load_tokenizer_pads_right(tiny_dir: str) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    assert tokenizer.padding_side == "right"
    batch = tokenizer(["What is 12 + 7?", "Hi"], padding=True, return_tensors="pt")
    assert batch.attention_mask[1].tolist()[-1] == 0  # the short row is padded at the end
    assert (batch.input_ids[1][batch.attention_mask[1] == 0] == tokenizer.pad_token_id).all()


def test_load_tokenizer_sets_missing_pad_to_eos(tiny_dir: str, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.pad_token == reloaded.eos_token == "<|endoftext|>"


def test_load_causal_lm_dtype_and_checkpointing(tiny_dir: str) -> None:
    model = load_causal_lm(tiny_dir, dtype=torch.bfloat16, gradient_checkpointing=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert model.config.use_cache is False
    assert load_causal_lm(tiny_dir).dtype == torch.float32


def test_load_sequence_classifier_scores_shape_and_last_token(tiny_dir: str) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    torch.manual_seed(0)
    model = load_sequence_classifier(tiny_dir).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["What is 12 + 7? 19", "What is 2 + 2?", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = model(**batch).logits
        alone = model(**tokenizer(["Hi"], return_tensors="pt")).logits
    assert scores.shape == (3, 1)
    # Right padding must not change a row's score: it is read at the last real token.
    torch.testing.assert_close(scores[2:], alone, rtol=0, atol=1e-5)


def test_count_parameters_by_hand(tiny_dir: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert count_parameters(model) == (TINY_PARAMS, TINY_PARAMS)
    model.model.embed_tokens.weight.requires_grad_(False)
    assert count_parameters(model) == (TINY_PARAMS, TINY_PARAMS - 512 * 32)


# ----------------------------------------------------------------------------- saving


def test_save_pretrained_atomic_round_trip(tiny_dir: str, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # something the saved copy must carry
    out = tmp_path / "out" / "model"
    assert save_pretrained_atomic(model, load_tokenizer(tiny_dir), str(out)) == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no tmp dir left
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_save_pretrained_atomic_replaces_existing(tiny_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_pretrained_atomic(AutoModelForCausalLM.from_pretrained(tiny_dir), None, str(out))
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_pretrained_atomic_failure_leaves_nothing(tiny_dir: str, tmp_path: Path) -> None:
    class Exploding:
        def save_pretrained(self, path: str) -> None:
            Path(path).mkdir(parents=True)
            (Path(path) / "partial.bin").write_bytes(b"x")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(Exploding(), None, str(tmp_path / "model"))  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_build_dir_once_crash_leaves_no_dir_and_retry_succeeds(tmp_path: Path) -> None:
    out = tmp_path / "thing"

    def crash(tmp: str) -> None:
        (Path(tmp) / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        build_dir_once(str(out), crash)
    assert not out.exists()
    build_dir_once(str(out), lambda tmp: (Path(tmp) / "ok").write_text("1"))
    assert (out / "ok").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing", "thing.lock"]


def test_build_dir_once_cleans_stale_temp_dirs(tmp_path: Path) -> None:
    stale = tmp_path / ".thing.build-dead"
    stale.mkdir()
    build_dir_once(str(tmp_path / "thing"), lambda tmp: None)
    assert not stale.exists()


def test_build_dir_once_waiters_reuse_the_first_build(tmp_path: Path) -> None:
    calls: list[int] = []

    def slow_build(tmp: str) -> None:
        calls.append(threading.get_ident())
        time.sleep(0.2)
        (Path(tmp) / "done").write_text("1")

    threads = [
        threading.Thread(target=build_dir_once, args=(str(tmp_path / "x"), slow_build)) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and (tmp_path / "x" / "done").is_file()


def test_an_unreachable_hub_model_is_one_line_and_exit_2_before_any_stage(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache, no network
    run = subprocess.run(
        [sys.executable, "-m", "align_runner", "model=local", "model.source.name_or_path=nobody/absent-model",
         f"paths.outputs={tmp_path / 'out'}", "pipeline.eval=false"],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    (line,) = [x for x in run.stderr.splitlines() if x.startswith("align_runner:")]
    assert line.startswith("align_runner: model error: model 'nobody/absent-model': not in the local Hugging Face cache")
    assert not list((tmp_path / "out").glob("store/*/DONE"))  # not even data_prep ran
