"""Loading rows from files, saved datasets, inline lists and (mocked) hub ids; fingerprints."""

from __future__ import annotations

import csv
import json
import os
import re

import pytest

from align_runner.data.errors import DataError
from align_runner.data.sources import fingerprint_source, load_rows, source_label

ROWS = [
    {"prompt": "2+2?", "completion": "4"},
    {"prompt": "3+3?", "completion": "6"},
    {"prompt": "1+1?", "completion": "2"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    rows, label = load_rows({"path": str(path)})
    assert rows == ROWS and label == str(path)


def test_jsonl_skips_blank_lines_and_applies_limit(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]) + "\n")
    rows, _ = load_rows({"path": str(path), "limit": 2})
    assert rows == ROWS[:2]


def test_json_list_and_split_object(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"train": ROWS[:1], "test": ROWS[1:]}))
    assert load_rows({"path": str(tmp_path / "a.json")})[0] == ROWS
    assert load_rows({"path": str(tmp_path / "b.json"), "split": "test"})[0] == ROWS[1:]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]
    pq.write_table(pa.Table.from_pylist([{"messages": m} for m in messages]), tmp_path / "d.parquet")
    rows, _ = load_rows({"path": str(tmp_path / "d.parquet")})
    assert rows == [{"messages": messages[0]}]


def test_csv_decodes_conversations_and_labels(tmp_path):
    path = tmp_path / "d.csv"
    conversation = [{"role": "user", "content": "hi, there"}]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion", "label"])
        writer.writerow([json.dumps(conversation), "[not json", "true"])
        writer.writerow(["plain, text", "[1, 2]", "0"])
    rows, _ = load_rows({"path": str(path)})
    assert rows == [
        {"prompt": conversation, "completion": "[not json", "label": True},
        # a JSON list of non-objects is text, not a conversation
        {"prompt": "plain, text", "completion": "[1, 2]", "label": False},
    ]


def test_save_to_disk_folder_dataset_and_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]),
                          "test": datasets.Dataset.from_list(ROWS[1:])}).save_to_disk(str(tmp_path / "dd"))
    assert load_rows({"path": str(tmp_path / "ds")})[0] == ROWS
    assert load_rows({"path": str(tmp_path / "dd"), "split": "test"})[0] == ROWS[1:]
    with pytest.raises(DataError, match="split 'validation' not found; available: train, test"):
        load_rows({"path": str(tmp_path / "dd"), "split": "validation"})


def test_plain_folder_is_rejected(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="must be written by datasets.save_to_disk"):
        load_rows({"path": str(tmp_path / "folder")})


def test_inline_rows():
    rows, label = load_rows({"rows": ROWS, "limit": 1})
    assert rows == ROWS[:1] and label == "inline"
    with pytest.raises(DataError, match=r"inline: row 1: expected an object, got str"):
        load_rows({"rows": [{"text": "a"}, "b"]})


def test_exactly_one_of_path_or_rows():
    with pytest.raises(DataError, match="exactly one of 'path' or 'rows'"):
        load_rows({"path": "x.jsonl", "rows": ROWS})
    with pytest.raises(DataError, match="exactly one of 'path' or 'rows'"):
        load_rows({})


def test_bad_limit(tmp_path):
    with pytest.raises(DataError, match="'limit' must be a non-negative int"):
        load_rows({"rows": ROWS, "limit": -1})


# ------------------------------------------------------------------------------------- errors
def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"^{re.escape(str(missing))}: file not found$"):
        load_rows({"path": str(missing)})


def test_missing_relative_file_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="^data/demo/sft: file not found$"):
        load_rows({"path": "data/demo/sft"})


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello")
    with pytest.raises(DataError) as err:
        load_rows({"path": str(path)})
    assert f"{path}: unsupported file extension '.txt'" in str(err.value)
    assert ".jsonl, .json, .parquet, .csv" in str(err.value)


def test_bad_json_line_names_file_line_and_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError) as err:
        load_rows({"path": str(path)})
    # line 4 of the file; row 2 because the blank line is not a row
    assert str(err.value).startswith(f"{path}: line 4 (row 2): invalid JSON: Expecting value")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2 \(row 1\): expected a JSON object, got list"):
        load_rows({"path": str(path)})


# ------------------------------------------------------------------------------------ hub ids
def test_hub_id_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, *, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, label = load_rows({"path": "org/set", "name": "main", "split": "test", "revision": "abc", "limit": 2})
    assert rows == ROWS[:2] and label == "hub:org/set:test"
    assert calls == [("org/set", "main", "test", {"revision": "abc"})]


def test_hub_failure_is_a_data_error(monkeypatch):
    import datasets

    def failing(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match=r"hub:org/set:train: could not load hub dataset \(ConnectionError: offline\)"):
        load_rows({"path": "org/set"})


def test_source_label():
    assert source_label({"rows": []}) == "inline"
    assert source_label({"path": "org/set", "split": "test"}) == "hub:org/set:test"
    assert source_label({"path": "/tmp/x.jsonl"}) == "/tmp/x.jsonl"


# ------------------------------------------------------------------------------- fingerprints
def test_fingerprint_depends_on_content_not_path_or_mtime(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", ROWS)
    b = _write_jsonl(tmp_path / "b.jsonl", ROWS)
    os.utime(b, (1_000_000, 1_000_000))
    fa = fingerprint_source({"path": str(a)})
    assert len(fa) == 64 and fa == fingerprint_source({"path": str(b)})
    assert fa != fingerprint_source({"path": str(a), "limit": 2})
    _write_jsonl(b, ROWS[:2])
    assert fa != fingerprint_source({"path": str(b)})


def test_fingerprint_of_folders_inline_and_hub(tmp_path):
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part.arrow").write_bytes(b"1234")
    (tmp_path / "y" / ".DS_Store").write_bytes(b"junk")  # hidden files do not count
    assert fingerprint_source({"path": str(tmp_path / "x")}) == fingerprint_source({"path": str(tmp_path / "y")})
    (tmp_path / "y" / "part.arrow").write_bytes(b"1235")
    assert fingerprint_source({"path": str(tmp_path / "x")}) != fingerprint_source({"path": str(tmp_path / "y")})

    assert fingerprint_source({"rows": [{"a": 1, "b": 2}]}) == fingerprint_source({"rows": [{"b": 2, "a": 1}]})
    assert fingerprint_source({"rows": [{"a": 1}]}) != fingerprint_source({"rows": [{"a": 2}]})

    hub = {"path": "org/set", "split": "train"}
    assert fingerprint_source(hub) == fingerprint_source({"path": "org/set"})
    assert fingerprint_source(hub) != fingerprint_source({**hub, "revision": "v2"})
    assert fingerprint_source(hub) != fingerprint_source({**hub, "name": "other"})


def test_fingerprint_of_missing_local_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        fingerprint_source({"path": str(tmp_path / "gone.jsonl")})


def test_a_plan_reads_each_data_file_once(tmp_path, monkeypatch):
    """plan() keys every stage by the views it reads; each file is still hashed once per plan, and
    again by the next plan (it may have changed in between)."""
    from align_runner import api
    from align_runner.data import sources
    from align_runner.pipeline.runner import plan
    from align_runner.pipeline.store import StageStore

    reads = []
    hash_file = sources._hash_file
    monkeypatch.setattr(sources, "_hash_file", lambda digest, path: reads.append(path.name) or hash_file(digest, path))
    cfg = api.compose(["model=tiny", "algorithm=dpo", f"paths.outputs={tmp_path}"])
    plan(cfg, StageStore(cfg.paths.store))
    files = sorted(set(reads))
    assert "preference-train.jsonl" in files and sorted(reads) == files  # every file once
    plan(cfg, StageStore(cfg.paths.store))
    assert sorted(reads) == sorted(files * 2)
