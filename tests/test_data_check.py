"""Bad data fails early and plainly (issue 12, points 1-2): the check before any model loads, and
data_prep's filtering reports (drop reasons, emptied splits, data.max_dropped_share)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import REPO, run_cli, run_manifest

from align_runner import api
from align_runner.data import check as data_check
from align_runner.data.check import MAX_SHOWN, DataProblems
from align_runner.data.errors import DataError
from align_runner.data.sources import load_rows
from align_runner.pipeline.datacheck import check_data, needed_columns
from align_runner.pipeline.store import DONE

U = {"role": "user", "content": "1 + 1?"}
A = {"role": "assistant", "content": "2"}
B = {"role": "assistant", "content": "3"}
PROBLEM = "align_runner: data error: "
# prompt-completion rows for the tiny tokenizer at data.max_length=8: the long prompt alone is over 8
# tokens, so keep_start cuts its completion away (dropped: prompt_too_long); the short one fits
LONG = {"prompt": "1 2 3 4 5 6 7 8 9 1 2 3 4 5 6 7", "completion": " 8"}
SHORT = {"prompt": "1+1=", "completion": "2"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def base(tmp: Path, *extra: str) -> list[str]:
    return ["model=tiny", f"paths.outputs={tmp / 'out'}", f"paths.cache={tmp / 'cache'}", "train.progress=false", *extra]


def problems(stderr: str) -> list[str]:
    return [line[len(PROBLEM):] for line in stderr.splitlines() if line.startswith(PROBLEM)]


def assert_nothing_loaded(tmp: Path) -> None:
    # model=tiny builds its weights and tokenizer under paths.cache when the base model resolves
    assert not (tmp / "cache").exists(), sorted((tmp / "cache").rglob("*"))
    assert not (tmp / "out" / "store").exists()


# --------------------------------------------------------------------------- the CLI, bad files
def test_every_bad_source_gets_one_line_and_exit_2_before_any_model_loads(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(SHORT) + "\n{prompt: 1}\n")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # latin-1, not UTF-8: byte 0xe9 at offset 15 + 13
    wrong_type = write_jsonl(tmp_path / "type.jsonl", [{"prompt": "p", "chosen": " a", "rejected": " b"},
                                                        {"prompt": "p", "chosen": " a", "rejected": 5}])
    bad_role = write_jsonl(tmp_path / "role.jsonl", [{"prompt": [U], "chosen": [A], "rejected": [B]},
                                                     {"prompt": [{"role": "robot", "content": "x"}], "chosen": [A], "rejected": [B]}])
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "  ", "answer": "3"}])
    no_answer = write_jsonl(tmp_path / "six.jsonl", [{"text": "not a prompt"}])
    out = run_cli(base(tmp_path, "pipeline.eval=false", f"data.sft.train.path={bad_json}", f"data.sft.eval.path={latin}",
                       f"data.preference.train.path={wrong_type}", f"data.preference.eval.path={bad_role}",
                       f"data.prompt.train.path={empty}", f"data.prompt.eval.path={no_answer}"), cwd=REPO)
    assert out.returncode == 2, out.stderr[-3000:]
    assert problems(out.stderr) == [
        f"{bad_json}: line 2 (row 1): invalid JSON: Expecting property name enclosed in double quotes at column 2",
        f"{latin}: line 2 (row 1): not UTF-8: byte 0xe9 at byte offset 28; save the file as UTF-8",
        f"{wrong_type}: row 1: column 'rejected': expected a string, got 5 (int)",
        f"{bad_role}: row 1: column 'prompt': expected message 0 role to be one of system, user, assistant, tool, got 'robot'",
        f"{empty}: row 1: column 'prompt': expected a non-empty string, got '  '",
        "and 1 more",  # the sixth source: plain text cannot feed the prompt view
    ]
    assert "Traceback" not in out.stderr
    assert_nothing_loaded(tmp_path)


def test_dry_run_fails_the_same_way_and_checkers_need_their_columns(tmp_path):
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2="}])
    no_answer = write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": "3+4=", "solution": "7"}])
    out = run_cli(base(tmp_path, "pipeline.dry_run=true", f"data.prompt.train.path={missing}",
                       f"data.prompt.eval.path={no_answer}"), cwd=REPO)
    assert out.returncode == 2, out.stderr[-3000:]
    lack = f"which the prompt rows of {no_answer} lack (their columns: prompt, solution); add it or rename one to it"
    assert problems(out.stderr) == [
        f"{missing}: row 1: column 'completion': expected a column named 'completion', as row 0 (standard prompt "
        "completion) has, got columns ['prompt']",
        f"eval.checkers.accuracy: align_runner.algos.rewards.exact_answer needs a column 'answer', {lack}",
        f"eval.checkers.last_number: align_runner.algos.rewards.last_number needs a column 'answer', {lack}",
    ]
    assert "plan" not in out.stdout  # the plan is printed only for data that can run
    assert_nothing_loaded(tmp_path)


# ------------------------------------------------------------------------------ filtering
def test_a_split_emptied_by_filtering_is_one_line_exit_2_and_never_done(tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", [LONG] * 4)
    out = run_cli(base(tmp_path, "data=local", f"data.train.path={data}", "data.max_length=8"), cwd=REPO)
    assert out.returncode == 2, out.stderr[-3000:]
    assert problems(out.stderr) == [
        f"{data}: the 'sft' view (train): filtering dropped 4 of 4 rows (100%), none is left; mostly prompt_too_long "
        "(4): the prompt (the untrained start) is longer than data.max_length / data.max_prompt_length"
    ]
    assert "Traceback" not in out.stderr
    stages = list((tmp_path / "out" / "store").glob("data_prep-*"))
    assert stages and not any((s / DONE).exists() for s in stages)


def test_losing_more_than_the_allowed_share_fails_data_prep_in_the_api(tmp_path):
    data = write_jsonl(tmp_path / "mostly_long.jsonl", [LONG, SHORT, LONG, LONG])
    with pytest.raises(DataError) as err:
        api.run(base(tmp_path, "data=local", f"data.train.path={data}", "data.max_length=8"))
    assert str(err.value) == (
        f"{data}: the 'sft' view (train): filtering dropped 3 of 4 rows (75%), more than data.max_dropped_share=0.5; "
        "mostly prompt_too_long (3): the prompt (the untrained start) is longer than data.max_length / "
        "data.max_prompt_length"
    )
    assert not any((s / DONE).exists() for s in (tmp_path / "out" / "store").glob("data_prep-*"))


def test_a_run_shows_its_drop_reasons_and_a_cached_data_prep_is_not_read_again(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "mostly_long.jsonl", [LONG, SHORT, LONG, LONG])
    overrides = base(tmp_path, "data=local", f"data.train.path={data}", "data.max_length=8",
                     "data.max_dropped_share=0.8", "train.max_steps=1", "train.micro_batch_size=1")
    out = run_cli(overrides, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sft/train: 4 rows, kept 1, dropped 3 (prompt_too_long 3)" in " ".join(out.stdout.split())
    prep = run_manifest(tmp_path / "out")["stages"][0]
    assert prep["metrics"]["sft/train/dropped/prompt_too_long"] == 3 and prep["metrics"]["sft/train/kept"] == 1
    report = next((tmp_path / "out").glob("*/*/report.md")).read_text()
    assert "- `prompt_too_long`: the prompt (the untrained start) is longer than" in report

    def no_reading(source):
        raise AssertionError(f"read {source} again")

    monkeypatch.setattr(data_check, "load_rows", no_reading)
    check_data(api.compose(overrides))  # data_prep is DONE: its rows were checked when it ran
    # a stricter share applies to the cached counts (the share is not part of any key)
    with pytest.raises(DataProblems, match=r"dropped 3 of 4 rows \(75%\), more than data.max_dropped_share=0.5"):
        check_data(api.compose([*overrides, "data.max_dropped_share=0.5"]))


# ------------------------------------------------------------------------------ in process
def test_api_run_raises_the_problems_before_any_model_loads(tmp_path):
    data = write_jsonl(tmp_path / "roles.jsonl", [{"messages": [U, A]}, {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataProblems) as err:
        api.run(base(tmp_path, "data=local", f"data.train.path={data}"))
    assert err.value.lines == [
        f"{data}: row 1: column 'messages': expected message 0 role to be one of system, user, assistant, tool, got 'bot'"
    ]
    assert_nothing_loaded(tmp_path)


def test_problems_show_the_first_few_then_how_many_more():
    found = [DataError(f"f: row {i}: bad") for i in range(MAX_SHOWN + 2)]
    assert DataProblems(found).lines == [f"f: row {i}: bad" for i in range(MAX_SHOWN)] + ["and 2 more"]
    assert str(DataProblems([DataError("a\nb")])) == "a b"  # one line each, whatever the cause wrote


def test_non_utf8_csv_and_json_name_the_line_and_byte(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_bytes(b"prompt,completion\na,b\nc,\xff\n")
    with pytest.raises(DataError, match=rf"^{csv}: line 3: not UTF-8: byte 0xff at byte offset 24; save the file as UTF-8$"):
        load_rows({"path": str(csv)})
    js = tmp_path / "d.json"
    js.write_bytes(b'[\n{"text": "\xc3"}]')
    with pytest.raises(DataError, match=rf"^{js}: line 2: not UTF-8: byte 0xc3 at byte offset 12"):
        load_rows({"path": str(js)})
    bom = write_jsonl(tmp_path / "bom.jsonl", [{"text": "a"}])
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())  # Windows editors write one; it is not data
    assert load_rows({"path": str(bom)})[0] == [{"text": "a"}]


def test_needed_columns_are_the_parameters_without_default():
    from omegaconf import OmegaConf

    def node(target, **kw):
        return OmegaConf.create({"_target_": target, **kw})

    assert needed_columns(node("align_runner.algos.rewards.exact_answer", _partial_=True)) == ["answer"]
    assert needed_columns(node("align_runner.algos.rewards.format_match", _partial_=True, pattern="x")) == []
    assert needed_columns(node("align_runner.trl.rewards.accuracy_reward", _partial_=True)) == ["solution"]


def test_hub_datasets_are_checked_only_when_reading_them_needs_no_network(monkeypatch):
    import datasets

    hub, local = {"path": "org/name"}, {"rows": [{"text": "a"}]}
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    assert not data_check.readable_here(hub) and data_check.readable_here(local)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the datasets cache only: no network
    assert data_check.readable_here(hub)
