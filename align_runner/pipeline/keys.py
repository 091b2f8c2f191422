"""Stage keys: the content address of a stage's result.

A key hashes everything that can change what a stage produces (DESIGN §3): its kind, the part of the
resolved config it reads (minus keys that cannot change the result), the keys of its upstream stages,
the fingerprint of its input data, the seed and the align_runner version. Same key => same artifact.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import align_runner
from align_runner.config import ModelConfig, TrainConfig

# Dotted paths (inside a stage's config section) that cannot change its result: names shown in
# reports, logging / checkpoint cadence, progress bars and the auto-pipeline table.
NON_RESULT_KEYS = frozenset(
    {
        "section.name",
        "section.stages",
        "data.name",
        "model.architecture",
        "data.max_dropped_share",  # a check on data_prep's counts: it fails a stage, never changes one
        "train.log_every",
        "train.save_every",
        "train.keep_last",
        "train.progress",
        "train.eval_every",
    }
)


def _default(schema: type, name: str) -> Any:
    return schema.__dataclass_fields__[name].default


# Speed settings added after keys were first computed: they change a result's low bits (other
# batch shapes, kernels), so they enter the key when set, but at these defaults they are left out so
# the keys of every run that does not use them stay what they were.
DEFAULT_OFF_KEYS: dict[str, Any] = {
    **{f"train.{n}": _default(TrainConfig, n) for n in ("packing", "max_tokens_per_batch", "logits_chunk_tokens", "offload_activations")},
    **{f"model.{n}": _default(ModelConfig, n) for n in ("attn_implementation", "compile", "liger_kernel")},
}


def strip_non_result(section: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Copy of ``section`` without the keys listed in NON_RESULT_KEYS (matched by dotted path), nor
    those of DEFAULT_OFF_KEYS at their default."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        path = f"{prefix}{key}"
        if path in NON_RESULT_KEYS or (path in DEFAULT_OFF_KEYS and value == DEFAULT_OFF_KEYS[path]):
            continue
        out[key] = strip_non_result(value, f"{path}.") if isinstance(value, Mapping) else value
    return out


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal content => equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(
    *,
    kind: str,
    config: Mapping[str, Any],
    upstream: Mapping[str, str],
    data_fingerprint: str | None,
    seed: int,
    version: str = align_runner.__version__,
) -> str:
    """sha256 (hex) of everything that determines a stage's artifact.

    upstream maps the role of each input ("model", "data") to the upstream stage's key, so renaming a
    stage does not change keys but feeding it from another stage does.
    """
    payload = {
        "kind": kind,
        "config": strip_non_result(config),
        "upstream": dict(sorted(upstream.items())),
        "data": data_fingerprint,
        "seed": seed,
        "version": version,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()
