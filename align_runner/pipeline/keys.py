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

# Dotted paths (inside a stage's config section) that cannot change its result: names shown in
# reports, logging / checkpoint cadence, progress bars and the auto-pipeline table.
NON_RESULT_KEYS = frozenset(
    {
        "section.name",
        "section.stages",
        "data.name",
        "train.log_every",
        "train.save_every",
        "train.keep_last",
        "train.progress",
        "train.eval_every",
    }
)


def strip_non_result(section: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Copy of ``section`` without the keys listed in NON_RESULT_KEYS (matched by dotted path)."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        path = f"{prefix}{key}"
        if path in NON_RESULT_KEYS:
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
