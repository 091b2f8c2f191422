"""Format detection, row validation and implicit-prompt extraction (align_runner.data.formats)."""

from __future__ import annotations

import pytest

from align_runner.data.errors import DataError
from align_runner.data.formats import (
    Format,
    Kind,
    detect_format,
    extract_implicit_prompt,
    validate_row,
)
from align_runner.data.prepare import check_rows

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
B = {"role": "assistant", "content": "go away"}

# One row per (kind, conversational), with an extra column that detection must ignore.
EXAMPLES = [
    ({"text": "a b c", "id": 1}, Format(Kind.LANGUAGE_MODELING, False)),
    ({"messages": [U, A], "id": 1}, Format(Kind.LANGUAGE_MODELING, True)),
    ({"prompt": "2+2?", "answer": "4"}, Format(Kind.PROMPT_ONLY, False)),
    ({"prompt": [U], "answer": "4"}, Format(Kind.PROMPT_ONLY, True)),
    ({"prompt": "2+2?", "completion": "4"}, Format(Kind.PROMPT_COMPLETION, False)),
    ({"prompt": [U], "completion": [A]}, Format(Kind.PROMPT_COMPLETION, True)),
    ({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, Format(Kind.PREFERENCE, False)),
    ({"chosen": "2+2? 4", "rejected": "2+2? 5"}, Format(Kind.PREFERENCE, False)),
    ({"prompt": [U], "chosen": [A], "rejected": [B]}, Format(Kind.PREFERENCE, True)),
    ({"chosen": [U, A], "rejected": [U, B]}, Format(Kind.PREFERENCE, True)),
    ({"prompt": "2+2?", "completion": "4", "label": True}, Format(Kind.UNPAIRED_PREFERENCE, False)),
    ({"prompt": [U], "completion": [B], "label": False}, Format(Kind.UNPAIRED_PREFERENCE, True)),
]


@pytest.mark.parametrize(("row", "expected"), EXAMPLES, ids=[str(f) for _, f in EXAMPLES])
def test_detect_every_kind_and_style(row, expected):
    assert detect_format(row, "x.jsonl", 0) == expected
    validate_row(row, expected, "x.jsonl", 0)  # every example is valid


def test_messages_win_over_prompt_column():
    # ultrachat_200k rows carry prompt, prompt_id and messages: they are conversations.
    row = {"prompt": "hi", "prompt_id": "x", "messages": [U, A]}
    assert detect_format(row, "s", 0) == Format(Kind.LANGUAGE_MODELING, True)


def test_unknown_columns_name_file_row_and_known_sets():
    with pytest.raises(DataError) as err:
        detect_format({"question": "q", "response": "r"}, "data/x.jsonl", 3)
    message = str(err.value)
    assert message.startswith("data/x.jsonl: row 3: expected one of the column sets")
    assert "['question', 'response']" in message


def test_main_column_of_wrong_type():
    with pytest.raises(DataError, match=r"s: row 0: column 'prompt': expected a string or a non-empty list"):
        detect_format({"prompt": 7}, "s", 0)


def first_problem(rows, label, view="sft"):
    return str(next(check_rows(rows, label, view), ""))


def test_a_row_without_row_0s_columns_names_the_row_and_the_column():
    rows = [{"text": "a"}, {"text": "b"}, {"prompt": "p", "completion": "c"}]
    assert first_problem(rows, "d.jsonl") == (
        "d.jsonl: row 2: column 'text': expected a column named 'text', as row 0 (standard language modeling) "
        "has, got columns ['completion', 'prompt']"
    )


def test_standard_and_conversational_rows_do_not_mix():
    assert first_problem([{"prompt": "p"}, {"prompt": [U]}], "d", "prompt").startswith(
        "d: row 1: expected the same format as row 0 (standard prompt only), got conversational prompt only"
    )


def test_empty_source_is_an_error():
    assert first_problem([], "d") == "d: no rows"


def test_every_problem_is_reported_in_row_order():
    rows = [{"text": "a"}, {"text": ""}, {"text": 3}, {"text": "ok"}, {"messages": [U]}]
    assert [str(p) for p in check_rows(rows, "d", "sft")] == [
        "d: row 1: column 'text': expected a non-empty string, got ''",
        "d: row 2: column 'text': expected a string, got 3 (int)",
        "d: row 4: column 'text': expected a column named 'text', as row 0 (standard language modeling) has, "
        "got columns ['messages']",
    ]


# -------------------------------------------------------------------------------- validation
CONV_LM = Format(Kind.LANGUAGE_MODELING, True)


def test_empty_conversation_message_matches_the_documented_example():
    with pytest.raises(DataError) as err:
        validate_row({"messages": []}, CONV_LM, "data/demo/sft.jsonl", 12)
    assert str(err.value) == (
        "data/demo/sft.jsonl: row 12: column 'messages': expected a non-empty list of "
        "{role, content} messages, got []"
    )


def test_string_where_messages_expected():
    with pytest.raises(DataError, match=r"f: row 1: column 'messages': expected a non-empty list .* got 'hello'"):
        validate_row({"messages": "hello"}, CONV_LM, "f", 1)


def test_unknown_role():
    row = {"messages": [U, {"role": "bot", "content": "x"}]}
    with pytest.raises(DataError) as err:
        validate_row(row, CONV_LM, "f", 4)
    assert str(err.value) == (
        "f: row 4: column 'messages': expected message 1 role to be one of system, user, assistant, "
        "tool, got 'bot'"
    )


def test_non_string_content():
    row = {"messages": [{"role": "user", "content": ["part"]}]}
    with pytest.raises(DataError, match=r"column 'messages': expected message 0 content to be a string, got \['part'\]"):
        validate_row(row, CONV_LM, "f", 0)


def test_empty_content_is_an_error_except_for_system_and_tool_messages():
    with pytest.raises(DataError) as err:
        validate_row({"messages": [U, {"role": "assistant", "content": "  "}]}, CONV_LM, "f", 3)
    assert str(err.value) == (
        "f: row 3: column 'messages': expected message 1 (assistant) content to be a non-empty string, got '  '"
    )
    with pytest.raises(DataError, match=r"^f: row 0: column 'completion': expected a non-empty string, got ''$"):
        validate_row({"prompt": "p", "completion": ""}, Format(Kind.PROMPT_COMPLETION, False), "f", 0)
    # an empty system prompt or tool result is a placeholder, not a broken row
    validate_row({"messages": [{"role": "system", "content": ""}, U, {"role": "tool", "content": ""}, A]}, CONV_LM, "f", 0)


def test_tool_call_message_may_have_no_content():
    call = {"role": "assistant", "content": None, "tool_calls": [{"name": "add"}]}
    validate_row({"messages": [U, call]}, CONV_LM, "f", 0)


def test_message_without_role():
    with pytest.raises(DataError, match=r"expected message 0 to be a \{role, content\} object, got \{'content': 'x'\}"):
        validate_row({"messages": [{"content": "x"}]}, CONV_LM, "f", 0)


def test_missing_column():
    fmt = Format(Kind.PROMPT_COMPLETION, False)
    with pytest.raises(DataError) as err:
        validate_row({"prompt": "p"}, fmt, "f.csv", 2)
    assert str(err.value) == "f.csv: row 2: column 'completion': expected a column named 'completion', got columns ['prompt']"


def test_wrong_type_in_standard_column():
    fmt = Format(Kind.PREFERENCE, False)
    with pytest.raises(DataError, match=r"f: row 0: column 'rejected': expected a string, got 5 \(int\)"):
        validate_row({"prompt": "p", "chosen": "c", "rejected": 5}, fmt, "f", 0)


def test_unpaired_label_must_be_bool():
    fmt = Format(Kind.UNPAIRED_PREFERENCE, False)
    validate_row({"prompt": "p", "completion": "c", "label": 1}, fmt, "f", 0)  # 0/1 ints are fine
    with pytest.raises(DataError, match=r"column 'label': expected a bool .* got 'yes'"):
        validate_row({"prompt": "p", "completion": "c", "label": "yes"}, fmt, "f", 0)


def test_long_values_are_shortened_in_messages():
    with pytest.raises(DataError) as err:
        validate_row({"messages": "x" * 500}, CONV_LM, "f", 0)
    assert len(str(err.value)) < 200 and str(err.value).endswith("...")


# -------------------------------------------------------------------------- implicit prompts
def test_implicit_prompt_conversational_takes_shared_leading_messages():
    system = {"role": "system", "content": "be nice"}
    prompt, chosen, rejected = extract_implicit_prompt([system, U, A], [system, U, B])
    assert prompt == [system, U] and chosen == [A] and rejected == [B]


def test_implicit_prompt_conversational_errors():
    with pytest.raises(ValueError, match="share no leading messages"):
        extract_implicit_prompt([A], [B])
    with pytest.raises(ValueError, match="no messages after the shared prompt"):
        extract_implicit_prompt([U, A], [U, A, U, B])


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        # whitespace before the cut goes to the responses
        ("I like cats", "I like dogs", ("I like", " cats", " dogs")),
        # the common prefix "I like ca" ends inside a word: back to the word's start
        ("I like cats", "I like cars", ("I like", " cats", " cars")),
        # punctuation after a word is a boundary: no need to cut back
        ("Hello world.", "Hello world!", ("Hello world", ".", "!")),
        ("Q: 2+2? A:4", "Q: 2+2? A:5", ("Q: 2+2? A:", "4", "5")),
        # one answer continues the other: the shorter response is empty
        ("Yes", "Yes, sure", ("Yes", "", ", sure")),
        # nothing shared
        ("abc", "xyz", ("", "abc", "xyz")),
    ],
)
def test_implicit_prompt_strings(chosen, rejected, expected):
    assert extract_implicit_prompt(chosen, rejected) == expected
    prompt, c, r = expected
    assert prompt + c == chosen and prompt + r == rejected


def test_implicit_prompt_identical_or_mixed_is_an_error():
    with pytest.raises(ValueError, match="identical"):
        extract_implicit_prompt("same", "same")
    with pytest.raises(ValueError, match="both be strings or both be message lists"):
        extract_implicit_prompt("text", [A])
