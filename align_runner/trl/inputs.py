"""What a TRL trainer is handed, turned into what a config can name: paths and ``_target_`` nodes.

In-memory inputs are written once into content-addressed places under ``paths.cache`` (``trl/``):
rows as a canonical jsonl named by its hash, a ``PreTrainedModel`` (with its tokenizer) as a Hugging
Face directory named by the hash of its files. The config names those paths, never the rows; stage
keys hash the content (data_prep the file's bytes, training stages the model directory's files), so
equal content gives equal keys wherever it came from.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from align_runner.validate import ConfigError

SUBDIR = "trl"
REWARD_MODEL_TARGET = "align_runner.trl.rewards.RewardModel"


def resolved_paths(overrides: Sequence[str] = ()) -> Any:
    """``paths`` of the config these overrides compose (outputs, store, cache), resolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from align_runner.config import register_configs
    from align_runner.validate import CONF_DIR

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[o for o in overrides if o.startswith("paths.")])
    GlobalHydra.instance().clear()
    return cfg.paths


# ----------------------------------------------------------------------------------------- data
def dataset_rows(data: Any, what: str) -> list[dict]:
    """Rows of a ``datasets.Dataset`` or a list of dicts."""
    if isinstance(data, (list, tuple)):
        bad = next((i for i, r in enumerate(data) if not isinstance(r, Mapping)), None)
        if bad is not None:
            raise ConfigError(f"{what}: row {bad}: expected a dict, got {type(data[bad]).__name__}")
        return [dict(r) for r in data]
    if type(data).__name__ == "Dataset" and hasattr(data, "to_list"):
        return data.to_list()
    raise ConfigError(
        f"{what}: expected a datasets.Dataset, a DatasetDict or a list of dicts, got {type(data).__name__} "
        "(an IterableDataset is not supported: the rows are fingerprinted before training)"
    )


def split_datasets(train: Any, eval: Any, eval_strategy: str) -> tuple[Any, Any]:
    """A ``DatasetDict`` passed as train_dataset gives its ``train`` split, and its ``test`` split as the
    eval set when evaluation is on and none was given (the splits TRL's scripts use)."""
    if type(train).__name__ != "DatasetDict":
        return train, eval
    if "train" not in train:
        raise ConfigError(f"train_dataset is a DatasetDict without a 'train' split; it has {list(train)}")
    if eval is None and eval_strategy != "no" and "test" in train:
        eval = train["test"]
    return train["train"], eval


def jsonl_bytes(rows: Sequence[Mapping]) -> bytes:
    """The canonical jsonl of ``rows``: one object a line, keys sorted, UTF-8."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode()


def write_rows(rows: Sequence[Mapping], cache: str | Path) -> str:
    """``rows`` as ``<cache>/trl/data/<sha256>.jsonl`` (written once); returns the path."""
    blob = jsonl_bytes(rows)
    path = Path(cache) / SUBDIR / "data" / f"{hashlib.sha256(blob).hexdigest()}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
        os.replace(tmp, path)
    return str(path)


# --------------------------------------------------------------------------------------- models
def model_path(model: Any, tokenizer: Any, cache: str | Path) -> str:
    """A directory or hub id ``from_pretrained`` loads ``model`` (with ``tokenizer``) from.

    A string is used as it is, unless a tokenizer other than its own is given (then a local model is
    copied beside that tokenizer). A ``PreTrainedModel`` is saved with its tokenizer (the one given, or
    the one its ``name_or_path`` names)."""
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        if tokenizer is None or getattr(tokenizer, "name_or_path", None) == name:
            return name
        if not Path(name).is_dir():
            raise ConfigError(
                f"processing_class differs from the tokenizer of {name!r}; with a hub model id pass the model "
                "loaded (AutoModelForCausalLM.from_pretrained) so both are saved together"
            )
        return _stored(cache, lambda tmp: (shutil.copytree(name, tmp, dirs_exist_ok=True), tokenizer.save_pretrained(tmp)))
    if type(model).__name__.startswith("Peft") or hasattr(model, "peft_config"):
        raise ConfigError("model is a PEFT model; pass the base model and the LoraConfig as peft_config")
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(f"model: expected a model id, a local directory or a PreTrainedModel, got {type(model).__name__}")
    if tokenizer is None:
        tokenizer = _own_tokenizer(model)

    def save(tmp: str) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _stored(cache, save)


def _own_tokenizer(model: Any) -> Any:
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", "") or ""
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:  # no tokenizer there (a model built from a config): say what to pass
        raise ConfigError(
            f"model has no tokenizer at its name_or_path {source!r} ({type(e).__name__}); pass processing_class"
        ) from None


def _stored(cache: str | Path, write: Callable[[str], Any]) -> str:
    """Write a model directory into a temp dir, then keep it as ``<cache>/trl/models/<hash of its files>``."""
    from align_runner.models.fingerprint import dir_fingerprint

    root = Path(cache) / SUBDIR / "models"
    root.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".save-", dir=root)
    try:
        write(tmp)
        final = root / dir_fingerprint(tmp)[:32]
        if not final.exists():
            os.replace(tmp, final)
        return str(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -------------------------------------------------------------------------------------- rewards
def reward_nodes(funcs: Any, cache: str | Path) -> list[tuple[str, dict]]:
    """(name, ``_target_`` node) of each GRPO reward: an importable function, or a reward model (an id,
    a local directory or a ``PreTrainedModel``) scored by ``align_runner.trl.rewards.RewardModel``."""
    funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
    out: list[tuple[str, dict]] = []
    for i, fn in enumerate(funcs):
        if isinstance(fn, (str, os.PathLike)) or hasattr(fn, "save_pretrained"):
            path = str(fn) if isinstance(fn, (str, os.PathLike)) else model_path(fn, None, cache)
            name, node = Path(path).name, {"_target_": REWARD_MODEL_TARGET, "path": path}
        elif callable(fn):
            name, node = fn.__name__, {"_target_": function_target(fn, f"reward_funcs[{i}]"), "_partial_": True}
        else:
            raise ConfigError(f"reward_funcs[{i}]: expected a function, a model id / path or a PreTrainedModel, got {type(fn).__name__}")
        name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
        if name in dict(out):
            raise ConfigError(f"reward_funcs: two rewards are named {name!r}; metrics are kept per name")
        out.append((name, node))
    return out


def function_target(fn: Callable, what: str) -> str:
    """``module.qualname`` of ``fn``, checked to import back to it (a config can only name importable
    functions: a lambda or a function defined inside another is an error)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        raise ConfigError(
            f"{what}: {qualname or fn!r} cannot be named in a config (a lambda or a nested function); define it "
            "at the top level of a module (or of your script)"
        )
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not fn:
        raise ConfigError(f"{what}: {module}.{qualname} does not import back to the function given")
    return f"{module}.{qualname}"
