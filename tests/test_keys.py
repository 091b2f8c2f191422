"""Stage keys: a content address that changes exactly when the stage's result can."""

from __future__ import annotations

import hashlib

import align_runner
from align_runner.pipeline.keys import canonical_json, stage_key, strip_non_result

BASE = dict(kind="sft", config={"train": {"lr": 1e-4, "log_every": 1}, "section": {"name": "sft"}},
            upstream={"data": "abc"}, data_fingerprint=None, seed=0)


def test_key_is_sha256_of_the_canonical_payload():
    # worked by hand: the payload with non-result keys removed, sorted, compact
    payload = (
        '{"config":{"section":{},"train":{"lr":0.0001}},"data":null,"kind":"sft",'
        f'"seed":0,"upstream":{{"data":"abc"}},"version":"{align_runner.__version__}"}}'
    )
    assert stage_key(**BASE) == hashlib.sha256(payload.encode()).hexdigest()


def test_non_result_keys_do_not_change_the_key():
    other = dict(BASE, config={"train": {"lr": 1e-4, "log_every": 50}, "section": {"name": "renamed"}})
    assert stage_key(**other) == stage_key(**BASE)


def test_every_result_input_changes_the_key():
    base = stage_key(**BASE)
    variants = [
        dict(BASE, kind="dpo"),
        dict(BASE, config={"train": {"lr": 2e-4}, "section": {}}),
        dict(BASE, upstream={"data": "abd"}),
        dict(BASE, upstream={"data": "abc", "model": "x"}),
        dict(BASE, data_fingerprint="f"),
        dict(BASE, seed=1),
        dict(BASE, version="9.9.9"),
    ]
    keys = [stage_key(**v) for v in variants]
    assert base not in keys and len(set(keys)) == len(keys)


def test_strip_matches_dotted_paths_only():
    assert strip_non_result({"data": {"name": "demo", "max_length": 8}, "name": "kept"}) == {
        "data": {"max_length": 8},
        "name": "kept",
    }


def test_canonical_json_ignores_key_order():
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == canonical_json({"a": [1, {"c": 3, "d": 2}], "b": 1})
