"""A user's own data (data=local / data=hub): one shared train/eval source feeds the views the pipeline
reads, no demo leftovers (limit, checkers, objective), column mapping, revisions in the keys, the
UltraFeedback-binarized schema, extra columns reaching reward functions, and true row counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest_data import word_tokenizer
from omegaconf import OmegaConf

from align_runner import api
from align_runner.data.errors import DataError
from align_runner.data.prepare import prepare_rows
from align_runner.data.sources import fingerprint_source, load_rows
from align_runner.pipeline.graph import PipelineConfigError
from align_runner.pipeline.runner import plan
from align_runner.pipeline.store import StageStore
from align_runner.pipeline.summary import data_counts
from align_runner.validate import CONF_DIR

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def completions(n: int) -> list[dict]:
    return [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(n)]


def preferences(n: int) -> list[dict]:
    return [{"prompt": f"{i} + 1 =", "chosen": f" {i + 1}", "rejected": f" {i + 2}"} for i in range(n)]


def local(tmp_path: Path, model_cache: str, *extra: str) -> list[str]:
    return [
        "data=local",
        "model=tiny",
        f"paths.outputs={tmp_path / 'outputs'}",
        f"paths.cache={model_cache}",
        "train.max_steps=2",
        "train.progress=false",
        *extra,
    ]


def stage_names(overrides: list[str], tmp_path: Path) -> list[str]:
    return [p.spec.name for p in plan(api.compose(overrides), StageStore(tmp_path / "store"))]


def planned(overrides: list[str], tmp_path: Path) -> dict:
    return {p.spec.name: p for p in plan(api.compose(overrides), StageStore(tmp_path / "store"))}


# ------------------------------------------------------------------------------------ no leftovers
def test_demo_default_is_unchanged():
    cfg = api.compose([])
    assert cfg.data.name == "demo" and cfg.data.train is None and cfg.data.eval is None
    assert cfg.data.sft.train.limit == 320
    assert set(cfg.eval.checkers) == {"accuracy", "last_number", "format"}
    assert cfg.pipeline.objective == "eval_after/accuracy"


def test_local_file_runs_with_no_demo_limit_checker_or_objective(tmp_path, model_cache):
    train = write_jsonl(tmp_path / "train.jsonl", completions(40))
    held = write_jsonl(tmp_path / "eval.jsonl", completions(6))
    overrides = local(tmp_path, model_cache, f"data.train.path={train}", f"data.eval.path={held}",
                      "eval.limit=2", "eval.max_new_tokens=2")
    cfg = api.compose(overrides)
    assert dict(cfg.eval.checkers) == {}
    assert cfg.data.train.limit is None and all(cfg.data[v].train.path is None for v in ("sft", "preference", "prompt"))

    result = api.run(overrides)
    assert [s.name for s in result.stages] == ["data_prep", "eval_before", "sft", "eval_after"]
    # every one of the file's 40 rows was prepared (the demo's limit of 320 would have hidden a cut)
    prep = result.stage("data_prep").metrics
    assert (prep["sft/train/rows"], prep["sft/train/limited"], prep["sft/train/kept"]) == (40, 0, 40)
    assert prep["prompt/eval/kept"] == 6 and "preference/train/rows" not in prep
    # the objective is one the pipeline produced: eval_after's held-out loss
    assert cfg.pipeline.objective == "eval_after/heldout_loss"
    assert result.objective == result.stage("eval_after").metrics["heldout_loss"] > 0
    assert set(result.stage("eval_after").metrics) == {"num_prompts", "completion_tokens", "heldout_loss"}
    assert "sft/train: 40 rows, kept 40" in data_counts(prep)
    assert "- sft/train: 40 rows, kept 40" in (result.run_dir / "report.md").read_text()


def test_without_an_eval_file_there_are_no_eval_stages(tmp_path, model_cache):
    train = write_jsonl(tmp_path / "train.jsonl", completions(4))
    assert stage_names(local(tmp_path, model_cache, f"data.train.path={train}"), tmp_path) == ["data_prep", "sft"]


def test_local_without_a_path_names_the_key():
    with pytest.raises(PipelineConfigError, match=r"^data.train.path is not set: data=local reads rows from"):
        api.compose(["data=local"])


# ---------------------------------------------------------------------------------------- views
def test_shared_file_builds_only_the_views_it_can_feed_and_the_pipeline_reads(tmp_path, model_cache):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preferences(4))

    def views(*extra: str) -> list[str]:
        overrides = local(tmp_path, model_cache, f"data.train.path={prefs}", *extra)
        return planned(overrides, tmp_path)["data_prep"].config["views"]

    assert views() == ["sft"]  # algorithm=sft reads sft only (no eval file, no eval stages)
    assert views("algorithm=dpo") == ["sft", "preference"]
    assert views("algorithm=dpo", f"data.eval.path={prefs}") == ["sft", "preference", "prompt"]


def test_a_view_the_file_cannot_feed_is_a_config_error_naming_format_and_view(tmp_path, model_cache):
    train = write_jsonl(tmp_path / "train.jsonl", completions(4))
    with pytest.raises(
        PipelineConfigError,
        match=r"stages 'ref_logps', 'dpo' read the 'preference' view, but data.train \(.*train.jsonl\) holds "
        r"standard prompt completion data, which cannot feed it; 'preference' takes: preference$",
    ):
        api.compose(local(tmp_path, model_cache, f"data.train.path={train}", "algorithm=dpo"))


def test_a_views_own_source_wins_over_the_shared_one(tmp_path, model_cache):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preferences(4))
    sft = write_jsonl(tmp_path / "sft.jsonl", completions(3))
    base = local(tmp_path, model_cache, f"data.train.path={prefs}")
    result = api.run([*base, f"data.sft.train.path={sft}"])
    assert result.stage("data_prep").metrics["sft/train/rows"] == 3  # from sft.jsonl, not prefs.jsonl


def test_data_prep_key_follows_the_shared_files_content(tmp_path, model_cache):
    a = write_jsonl(tmp_path / "a.jsonl", completions(4))
    b = write_jsonl(tmp_path / "b.jsonl", completions(5))
    def key(path: str) -> str:
        return planned(local(tmp_path, model_cache, f"data.train.path={path}"), tmp_path)["data_prep"].key

    assert key(a) != key(b)
    copy = write_jsonl(tmp_path / "copy.jsonl", completions(4))
    assert key(copy) == key(a)  # content, not location


# ------------------------------------------------------------------------------------ hub + revision
def test_hub_dataset_revision_is_passed_and_enters_the_key(tmp_path, model_cache, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, *, split, **kwargs):  # a local file of the hub dataset's schema
        calls.append((path, name, split, kwargs.get("revision")))
        return datasets.Dataset.from_list(completions(4))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    def hub(rev: str) -> list[str]:
        return local(tmp_path, model_cache, "data=hub", "data.train.path=org/name", "data.train.name=cfg",
                     "data.train.split=train_sft", f"data.train.revision={rev}")

    one, two = planned(hub("abc123"), tmp_path)["data_prep"], planned(hub("def456"), tmp_path)["data_prep"]
    assert one.key != two.key
    assert ("org/name", "cfg", "train_sft", "abc123") in calls and ("org/name", "cfg", "train_sft", "def456") in calls
    assert api.compose(hub("abc123")).data.train.limit is None


def test_model_revision_enters_every_stage_key(tmp_path):
    def keys(rev: str) -> dict[str, str]:
        return {
            p.spec.name: p.key
            for p in plan(
                api.compose(["model=local", "model.source.name_or_path=org/model", f"model.source.revision={rev}"]),
                StageStore(tmp_path / "store"),
            )
        }

    one, two = keys("abc"), keys("def")
    assert all(one[name] != two[name] for name in one)


def test_every_hub_model_config_exposes_a_revision():
    hub = [p for p in (CONF_DIR / "model").glob("*.yaml") if "hub_or_local" in p.read_text()]
    assert {p.stem for p in hub} >= {"qwen0.5b", "qwen1.5b", "smollm2-360m", "llama3-8b", "local"}
    for path in hub:
        assert "revision" in OmegaConf.load(path).source, path


# ---------------------------------------------------------------------------------- column mapping
def test_rename_maps_columns_and_drop_removes_them_before_detection(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "messages": [], "id": 1}])
    rows, _ = load_rows({"path": path, "drop": ["messages"], "rename": {"question": "prompt", "answer": "completion"}})
    assert rows == [{"prompt": "q", "completion": "a", "id": 1}]


def test_rename_or_drop_of_a_missing_column_lists_the_sources_columns(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"qa.jsonl: rename names \['querstion'\], which are not columns of this "
                                        r"source; its columns: \['question', 'answer'\]$"):
        load_rows({"path": path, "rename": {"querstion": "prompt"}})
    with pytest.raises(DataError, match=r"drop names \['extra'\].*its columns: \['question', 'answer'\]"):
        load_rows({"path": path, "drop": ["extra"]})
    with pytest.raises(DataError, match=r"rename .* targets \['answer'\], which the source already has"):
        load_rows({"path": path, "rename": {"question": "answer"}})


def test_column_mapping_enters_the_fingerprint_only_when_set(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    plain = fingerprint_source({"path": path})
    assert fingerprint_source({"path": path, "rename": {}, "drop": []}) == plain  # the demo's keys stay put
    assert fingerprint_source({"path": path, "rename": {"question": "prompt"}}) != plain
    assert fingerprint_source({"path": path, "drop": ["answer"]}) != plain


# -------------------------------------------------------------------------- UltraFeedback-binarized
def ultrafeedback_row(prompt: str, user: str, chosen: str, rejected: str) -> dict:
    def conversation(answer: str) -> list[dict]:
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    return {
        "prompt": prompt,
        "prompt_id": "0f3a",
        "chosen": conversation(chosen),
        "rejected": conversation(rejected),
        "messages": conversation(chosen),
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }


def occurrences(ids: list[int], part: list[int]) -> int:
    return sum(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_ultrafeedback_string_prompt_is_tokenized_once(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", [ultrafeedback_row("what is two plus four", "what is two plus four",
                                                                 "answer 4", "I like cats")])
    rows, label = load_rows({"path": path})
    tok = word_tokenizer()
    question = tok.encode("what is two plus four", add_special_tokens=False)
    def prep(view: str) -> dict:
        return prepare_rows(rows, label, view, tok, max_length=64)[0][0]

    pref = prep("preference")
    assert occurrences(pref["prompt_ids"] + pref["chosen_ids"], question) == 1
    assert occurrences(pref["prompt_ids"], question) == 1
    assert tok.decode(pref["chosen_ids"]).startswith("answer 4")
    assert occurrences(prep("sft")["input_ids"], question) == 1
    prompt = prep("prompt")
    assert occurrences(prompt["prompt_ids"], question) == 1
    assert prompt["prompt"] == [{"role": "user", "content": "what is two plus four"}]
    assert (prompt["prompt_id"], prompt["score_chosen"]) == ("0f3a", 8.0)  # extra columns pass through


def test_ultrafeedback_string_prompt_that_does_not_match_names_row_and_column(tmp_path):
    rows = [ultrafeedback_row("hi there", "hi there", "fine", "bad"),
            ultrafeedback_row("what is two plus four", "hi there", "fine", "bad")]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    loaded, label = load_rows({"path": path})
    with pytest.raises(DataError, match=r"uf.jsonl: row 1: column 'prompt': expected a non-empty list of \{role, "
                                        r"content\} messages, or a string equal to a user message that chosen and "
                                        r"rejected both begin with, got 'what is two plus four'$"):
        prepare_rows(loaded, label, "preference", word_tokenizer(), max_length=64)


# ------------------------------------------------------------------------------ reward functions
SEEN: list[dict] = []


def record_columns(prompts, completions, **columns) -> list[float]:
    """A reward function that keeps the keyword arguments it was called with."""
    SEEN.append(columns)
    return [0.0] * len(completions)


def test_extra_columns_reach_grpo_reward_functions(tmp_path, model_cache):
    rows = [{"prompt": f"{i} + 1 =", "solution": str(i + 1), "level": i % 3} for i in range(4)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    SEEN.clear()
    api.run(local(
        tmp_path, model_cache, f"data.train.path={prompts}", "algorithm=grpo", "algorithm.stages=[data_prep,grpo]",
        "~algorithm.rewards.accuracy", "+algorithm.rewards.mine={_target_:test_data_local.record_columns,_partial_:true}",
        "algorithm.rollouts=1", "algorithm.num_generations=2", "algorithm.prompts_per_rollout=2",
        "algorithm.generation.max_new_tokens=2",
    ))
    (columns,) = SEEN
    assert {"solution", "level", "prompt_ids", "completion_ids"} <= set(columns)
    by_solution = {s: lv for s, lv in zip(columns["solution"], columns["level"])}
    assert all(by_solution[str(i + 1)] == i % 3 for i in range(4) if str(i + 1) in by_solution)
    assert len(columns["solution"]) == 4  # 2 prompts x 2 completions, one value per completion
