"""prepare_rows: views, conversions, length policy and counts (align_runner.data.prepare)."""

from __future__ import annotations

import pytest
from conftest_data import EOS, IM_END, IM_START, ids, word_tokenizer

from align_runner.data.errors import DataError
from align_runner.data.prepare import PrepStats, prepare_rows
from align_runner.data.templates import CHATML

S, E = IM_START, IM_END
USER = {"role": "user", "content": "hi there"}
GOOD = {"role": "assistant", "content": "hello friend"}
BAD = {"role": "assistant", "content": "bad"}


@pytest.fixture(scope="module")
def wt():
    return word_tokenizer()


def stats(total, kept, truncated, dropped):
    return PrepStats(total=total, kept=kept, truncated=truncated, dropped=dropped)


def test_unknown_view_and_truncation(wt):
    with pytest.raises(ValueError, match="unknown data view 'rl'; valid views: sft, preference, prompt"):
        prepare_rows([{"text": "hi"}], "s", "rl", wt, max_length=8)
    with pytest.raises(ValueError, match="unknown truncation 'middle'; valid: keep_start, keep_end, drop"):
        prepare_rows([{"text": "hi"}], "s", "sft", wt, max_length=8, truncation="middle")
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        prepare_rows([{"text": "hi"}], "s", "sft", wt, max_length=0)


# ----------------------------------------------------------------------------------------- sft
ROWS_TEXT = [{"text": "hi there"}, {"text": "hi there hello friend"}]  # 3 and 5 tokens with eos


def test_sft_keep_start(wt):
    examples, st = prepare_rows(ROWS_TEXT, "s", "sft", wt, max_length=3)
    assert [e["input_ids"] for e in examples] == [ids(wt, "hi", "there", EOS), ids(wt, "hi", "there", "hello")]
    assert examples[1]["loss_mask"] == [1, 1, 1]
    assert st == stats(2, 2, 1, 0)
    assert st.as_dict() == {"total": 2, "kept": 2, "truncated": 1, "dropped": 0, "truncated/too_long": 1}


def test_sft_keep_end(wt):
    examples, st = prepare_rows(ROWS_TEXT, "s", "sft", wt, max_length=3, truncation="keep_end")
    assert examples[1]["input_ids"] == ids(wt, "hello", "friend", EOS)
    assert st == stats(2, 2, 1, 0)


def test_sft_drop(wt):
    examples, st = prepare_rows(ROWS_TEXT, "s", "sft", wt, max_length=3, truncation="drop")
    assert [e["input_ids"] for e in examples] == [ids(wt, "hi", "there", EOS)]
    assert st == stats(2, 1, 0, 1) and st.dropped_by == {"too_long": 1} and st.truncated_by == {}


def test_sft_row_whose_completion_is_cut_away_is_dropped(wt):
    rows = [
        {"prompt": "hi there hello", "completion": " friend"},  # [0 0 0 | 1 1] -> [0 0 0]
        {"prompt": "hi", "completion": " there hello friend"},  # [0 | 1 1 1 1] -> [0 1 1]
    ]
    examples, st = prepare_rows(rows, "s", "sft", wt, max_length=3)
    assert st == stats(2, 1, 1, 1)
    assert st.dropped_by == {"prompt_too_long": 1} and st.truncated_by == {"too_long": 1}
    assert examples == [{"input_ids": ids(wt, "hi", "there", "hello"), "loss_mask": [0, 1, 1]}]


def test_sft_conversation_without_assistant_turn_is_dropped(wt):
    rows = [{"messages": [USER]}, {"messages": [USER, GOOD]}]
    examples, st = prepare_rows(rows, "s", "sft", wt, max_length=64)
    assert st == stats(2, 1, 0, 1) and st.dropped_by == {"no_assistant_turn": 1}
    assert examples[0]["loss_mask"] == [0] * 7 + [1] * 3
    _, st_all = prepare_rows(rows, "s", "sft", wt, max_length=64, assistant_only_loss=False)
    assert st_all == stats(2, 2, 0, 0)


def test_sft_from_preference_trains_on_chosen(wt):
    rows = [{"prompt": "hi there", "chosen": " hello friend", "rejected": " bad"}]
    examples, _ = prepare_rows(rows, "s", "sft", wt, max_length=64)
    assert examples == [{"input_ids": ids(wt, "hi", "there", "hello", "friend", EOS), "loss_mask": [0, 0, 1, 1, 1]}]


def test_sft_rejects_prompt_only_data(wt):
    with pytest.raises(DataError, match=r"s: standard prompt only data cannot feed the 'sft' view; it accepts: "
                                        r"language_modeling, prompt_completion, preference"):
        prepare_rows([{"prompt": "hi"}], "s", "sft", wt, max_length=8)


# ---------------------------------------------------------------------------------- preference
PREF_ROW = {"prompt": "a b c d e", "chosen": " hello friend", "rejected": " bad"}  # 5 | 3 | 2 tokens


def test_preference_prompt_keeps_end_and_responses_fit_max_length(wt):
    examples, st = prepare_rows([PREF_ROW], "s", "preference", wt, max_length=5, max_prompt_length=3)
    assert examples == [{
        "prompt_ids": ids(wt, "c", "d", "e"),
        "chosen_ids": ids(wt, "hello", "friend"),
        "rejected_ids": ids(wt, "bad", EOS),
    }]
    assert st == stats(1, 1, 1, 0) and st.truncated_by == {"prompt_too_long": 1}


def test_preference_fitting_rows_are_untouched_and_drop_mode_drops(wt):
    examples, st = prepare_rows([PREF_ROW], "s", "preference", wt, max_length=8)
    assert st == stats(1, 1, 0, 0) and examples[0]["prompt_ids"] == ids(wt, "a", "b", "c", "d", "e")
    _, st = prepare_rows([PREF_ROW], "s", "preference", wt, max_length=8, max_prompt_length=4, truncation="drop")
    assert st == stats(1, 0, 0, 1)
    _, st = prepare_rows([PREF_ROW], "s", "preference", wt, max_length=7, truncation="drop")
    assert st == stats(1, 0, 0, 1) and st.dropped_by == {"too_long": 1}


def test_preference_prompt_filling_max_length_leaves_no_response(wt):
    _, st = prepare_rows([PREF_ROW], "s", "preference", wt, max_length=5)
    assert st == stats(1, 0, 0, 1) and st.dropped_by == {"prompt_too_long": 1}


def test_preference_implicit_prompt_failure_names_the_row(wt):
    rows = [{"chosen": [USER, GOOD], "rejected": [USER, BAD]}, {"chosen": [GOOD], "rejected": [BAD]}]
    with pytest.raises(DataError, match=r"^d\.jsonl: row 1: column 'prompt': expected a 'prompt' column, or chosen "
                                        r"and rejected that share their start, got chosen and rejected share no"):
        prepare_rows(rows, "d.jsonl", "preference", wt, max_length=64)


def test_identical_pairs_are_dropped_and_counted(wt):
    same = {"chosen": "hello friend", "rejected": "hello friend"}
    rows = [{"chosen": "I like cats", "rejected": "I like dogs"}, same, {"prompt": "hi", "chosen": " bad", "rejected": " bad"}]
    _, st = prepare_rows(rows, "d", "preference", wt, max_length=8)
    assert st == stats(3, 1, 0, 2) and st.dropped_by == {"identical_pair": 2}
    # as SFT data a pair with its own prompt is an ordinary example; without one it has no prompt
    _, st = prepare_rows(rows, "d", "sft", wt, max_length=8)
    assert st == stats(3, 2, 0, 1) and st.dropped_by == {"identical_pair": 1}


def test_preference_view_needs_pairs(wt):
    with pytest.raises(DataError, match="cannot feed the 'preference' view; it accepts: preference"):
        prepare_rows([{"prompt": "p", "completion": "c", "label": True}], "s", "preference", wt, max_length=8)


# -------------------------------------------------------------------------------------- prompt
def test_prompt_view_from_preference_keeps_prompt_end_and_columns(wt):
    rows = [{"prompt": "a b c d e", "chosen": " yes", "rejected": " no", "id": 1},
            {"prompt": "a b", "chosen": " yes", "rejected": " no", "id": 2}]
    examples, st = prepare_rows(rows, "s", "prompt", wt, max_length=64, max_prompt_length=3)
    assert st == stats(2, 2, 1, 0)
    assert examples[0]["prompt_ids"] == ids(wt, "c", "d", "e") and examples[0]["prompt_text"] == "c d e"
    assert examples[0]["id"] == 1 and examples[0]["chosen"] == " yes"
    assert examples[1]["prompt_ids"] == ids(wt, "a", "b") and examples[1]["prompt_text"] == "a b"
    assert st.truncated_by == {"prompt_too_long": 1}
    _, st = prepare_rows(rows, "s", "prompt", wt, max_length=3, truncation="drop")
    assert st == stats(2, 1, 0, 1) and st.dropped_by == {"too_long": 1}


def test_prompt_view_from_conversation_drops_final_assistant_turn(wt):
    examples, _ = prepare_rows([{"messages": [USER, GOOD]}], "s", "prompt", wt, max_length=64)
    assert examples[0]["prompt"] == [USER]
    assert examples[0]["prompt_ids"] == ids(wt, S, "user", "hi", "there", E, S, "assistant")
    assert examples[0]["messages"] == [USER, GOOD]


def test_prompt_view_rejects_plain_text(wt):
    with pytest.raises(DataError, match="language modeling only when conversational"):
        prepare_rows([{"text": "hi"}], "s", "prompt", wt, max_length=8)


# --------------------------------------------------------------------------------- bad rows
def test_bad_row_is_reported_with_source_row_and_column(wt):
    rows = [{"messages": [USER, GOOD]}, {"messages": [USER, {"role": "bot", "content": "x"}]}]
    with pytest.raises(DataError, match=r"^f\.jsonl: row 1: column 'messages': expected message 1 role"):
        prepare_rows(rows, "f.jsonl", "sft", wt, max_length=64)


def test_mixed_formats_are_reported(wt):
    with pytest.raises(DataError, match=r"^f: row 1: column 'text': expected a column named 'text', as row 0"):
        prepare_rows([{"text": "hi"}, {"messages": [USER, GOOD]}], "f", "sft", wt, max_length=64)


def test_chat_template_exception_names_the_row():
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}" + CHATML
    rows = [{"messages": [USER, GOOD]}, {"messages": [GOOD, USER]}]
    with pytest.raises(DataError, match=r"^f: row 1: must start with user"):
        prepare_rows(rows, "f", "sft", word_tokenizer(strict), max_length=64)


def test_preference_margin_column_reaches_the_prepared_rows(wt):
    examples, _ = prepare_rows([{**PREF_ROW, "margin": 2.5}, PREF_ROW], "s", "preference", wt, max_length=8)
    assert examples[0]["margin"] == 2.5 and "margin" not in examples[1]
