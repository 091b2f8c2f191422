"""Tiny offline models: deterministic builds, both architectures, usable tokenizer and chat template."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align_runner.models import tiny
from align_runner.models.tiny import IM_END, IM_START, build_tiny

PROMPT = "What is 12 + 7?"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny(str(tmp_path_factory.mktemp("tiny")))


def test_same_params_give_identical_files_in_a_fresh_cache(llama_dir: str, tmp_path: Path) -> None:
    other = build_tiny(str(tmp_path))
    assert Path(other).name == Path(llama_dir).name  # the name is a hash of the parameters only
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert _sha(Path(other) / name) == _sha(Path(llama_dir) / name), name


def test_different_seed_gives_different_dir_and_weights(llama_dir: str, tmp_path: Path) -> None:
    other = build_tiny(str(tmp_path), seed=1)
    assert Path(other).name != Path(llama_dir).name
    assert _sha(Path(other) / "model.safetensors") != _sha(Path(llama_dir) / "model.safetensors")
    # The tokenizer does not depend on the seed.
    assert _sha(Path(other) / "tokenizer.json") == _sha(Path(llama_dir) / "tokenizer.json")


def test_build_does_not_disturb_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny(str(tmp_path), hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    assert torch.equal(torch.rand(3), expected)


def test_second_call_is_a_cache_hit(llama_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt an existing tiny model")

    monkeypatch.setattr(tiny, "_write_tiny", fail)
    assert build_tiny(str(Path(llama_dir).parent)) == llama_dir


def test_concurrent_builds_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_write = tiny._write_tiny

    def counting_write(out_dir: str, *, params: dict) -> None:
        calls.append(out_dir)
        real_write(out_dir, params=params)

    monkeypatch.setattr(tiny, "_write_tiny", counting_write)
    kwargs = {"hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(build_tiny(str(tmp_path), **kwargs))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(set(results)) == 1 and len(results) == 3
    assert not list(tmp_path.glob(".tiny-*.build-*"))  # no temp dirs left behind


@pytest.mark.parametrize("arch,model_type", [("llama", "llama"), ("qwen2", "qwen2")])
def test_reload_and_forward(arch: str, model_type: str, tmp_path: Path) -> None:
    path = build_tiny(str(tmp_path), arch=arch, hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == model_type
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 1)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    ids = tokenizer([PROMPT], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 512)
    assert torch.isfinite(logits).all()


def test_tokenizer_round_trip_and_special_tokens(llama_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    ids = tokenizer(PROMPT).input_ids
    assert tokenizer.decode(ids) == PROMPT
    # Digits are single tokens (split one per token), so "12" is "1", "2".
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert {"1", "2", "7"} <= set(tokens)
    assert not any(len(t) > 1 and any(c.isdigit() for c in t) for t in tokens)
    # Byte-level: text never seen in the corpus still round-trips exactly.
    odd = "Zürich → 東京 😀 \t tabs"
    assert tokenizer.decode(tokenizer(odd).input_ids) == odd
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", IM_START, IM_END]) == [0, 1, 2]
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer) <= 512


def test_config_token_ids_match_tokenizer(llama_dir: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    assert model.config.eos_token_id == tokenizer.eos_token_id == 0
    assert model.config.pad_token_id == tokenizer.pad_token_id == 0
    assert model.config.bos_token_id is None and tokenizer.bos_token is None
    assert tokenizer(PROMPT).input_ids[0] != 0  # nothing prepended
    # Generation stops at the end of text or at the end of a chat turn.
    assert sorted(model.generation_config.eos_token_id) == [0, 2]


def test_chat_template_renders_chatml(llama_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "19"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n19<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n"
    )
    # The {% generation %} markers let HF compute an assistant-token mask: exactly "19<|im_end|>".
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "19<|im_end|>"


def test_unknown_arch_lists_valid(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown tiny arch 'gpt9'.*\['llama', 'qwen2'\]"):
        build_tiny(str(tmp_path), arch="gpt9")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"vocab_size": 100}, "vocab_size must be >= 259"),
        ({"hidden_size": 30, "num_heads": 4}, "must divide"),
        ({"num_heads": 4, "num_kv_heads": 3}, "must divide"),
    ],
)
def test_bad_shapes_are_rejected(kwargs: dict, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        build_tiny(str(tmp_path), **kwargs)
