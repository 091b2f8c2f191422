"""Tiny random causal LMs built offline, for tests and the default CPU pipeline.

`build_tiny` writes a Hugging Face model directory (safetensors weights + tokenizer + chat template)
into the cache and returns its path, so every loader treats it like any downloaded model. The
tokenizer is a byte-level BPE trained on a small shipped corpus: any text tokenises, and digits are
split one per token (as Qwen2/Llama-3 do), which keeps arithmetic tasks learnable for a tiny model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from align_runner.models.loading import _DTYPE_KWARG, build_dir_once

# Bump when the build recipe changes in a way that changes the files, so old cache entries are not reused.
FORMAT_VERSION = 1

CORPUS_PATH = Path(__file__).parent / "assets" / "tiny_corpus.txt"

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]  # ids 0, 1, 2

# ChatML. The `{% generation %}` markers change nothing in the rendered text; they let
# `apply_chat_template(..., return_assistant_tokens_mask=True)` find assistant tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Pre-tokenizer split: words with a leading space, single digits, punctuation runs, whitespace.
# (The same split llama.cpp calls "qwen2", so a GGUF of a tiny model tokenises identically.)
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _llama_config(**kw: int) -> PretrainedConfig:
    return LlamaConfig(**kw)


def _qwen2_config(**kw: int) -> PretrainedConfig:
    # Qwen2 has q/k/v biases and otherwise the Llama layout; no sliding window at this size.
    return Qwen2Config(use_sliding_window=False, **kw)


ARCHS: dict[str, Callable[..., PretrainedConfig]] = {"llama": _llama_config, "qwen2": _qwen2_config}


def build_tiny(
    cache_dir: str,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    vocab_size: int = 512,
    seed: int = 0,
) -> str:
    """Build (once) a random tiny causal LM + tokenizer and return its directory.

    The directory is `<cache_dir>/tiny-<hash>`, the hash covering every argument, the corpus and
    `FORMAT_VERSION`; the same arguments give byte-identical weights and the same tokenizer.
    `vocab_size` is both the BPE target and the embedding size (>= 256 bytes + 3 special tokens).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; valid: {sorted(ARCHS)}")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} for a byte-level BPE, got {vocab_size}"
        )
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}) "
            f"and num_heads by num_kv_heads ({num_kv_heads})"
        )
    params = {
        "arch": arch,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "vocab_size": vocab_size,
        "seed": seed,
    }
    out_dir = Path(cache_dir) / f"tiny-{_params_hash(params)}"
    return build_dir_once(str(out_dir), partial(_write_tiny, params=params))


def _params_hash(params: dict[str, int | str]) -> str:
    corpus_digest = hashlib.sha256(CORPUS_PATH.read_bytes()).hexdigest()
    blob = json.dumps({"params": params, "format": FORMAT_VERSION, "corpus": corpus_digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_tiny(out_dir: str, *, params: dict) -> None:
    tokenizer = train_tokenizer(params["vocab_size"], params["max_position_embeddings"])
    config = ARCHS[params["arch"]](
        vocab_size=params["vocab_size"],
        hidden_size=params["hidden_size"],
        intermediate_size=params["intermediate_size"],
        num_hidden_layers=params["num_layers"],
        num_attention_heads=params["num_heads"],
        num_key_value_heads=params["num_kv_heads"],
        max_position_embeddings=params["max_position_embeddings"],
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,  # the tokenizer adds no BOS (as Qwen2's does not)
    )
    # Random init draws from torch's global RNG; fork it so building never disturbs the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params["seed"])
        model = AutoModelForCausalLM.from_config(config, **{_DTYPE_KWARG: torch.float32})
    # A chat turn ends with <|im_end|>; plain text with <|endoftext|>. Generation stops at either.
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def train_tokenizer(vocab_size: int, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ChatML special tokens, trained on the shipped corpus (deterministic)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols up front, so any UTF-8 text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines(keepends=True)
    backend.train_from_iterator(lines, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        padding_side="right",
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
