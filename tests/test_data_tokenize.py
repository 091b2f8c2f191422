"""Tokenization and loss masks, checked token by token (align_runner.data.tokenize / templates).

The word tokenizer makes one token per word: ids below are spelled as tokens through ``ids``.
"""

from __future__ import annotations

import pytest
from conftest_data import EOS, IM_END, IM_START, byte_tokenizer, ids, word_tokenizer
from tokenizers import processors

from align_runner.data import tokenize as tok_module
from align_runner.data.errors import ChatTemplateError
from align_runner.data.formats import Format, Kind
from align_runner.data.templates import CHATML, render_chat
from align_runner.data.tokenize import BoundaryWarning, tokenize_preference, tokenize_prompt, tokenize_sft

pytestmark = pytest.mark.filterwarnings("error::align_runner.data.tokenize.BoundaryWarning")

S, E = IM_START, IM_END
USER = {"role": "user", "content": "hi there"}
GOOD = {"role": "assistant", "content": "hello friend"}
BAD = {"role": "assistant", "content": "bad"}
CONVERSATION = [
    {"role": "system", "content": "be good"},
    USER,
    GOOD,
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine thanks"},
]
LM, LM_CONV = Format(Kind.LANGUAGE_MODELING, False), Format(Kind.LANGUAGE_MODELING, True)
PC, PC_CONV = Format(Kind.PROMPT_COMPLETION, False), Format(Kind.PROMPT_COMPLETION, True)
PREF, PREF_CONV = Format(Kind.PREFERENCE, False), Format(Kind.PREFERENCE, True)


@pytest.fixture(scope="module")
def wt():
    return word_tokenizer()


@pytest.fixture(scope="module")
def bt():
    return byte_tokenizer()


def masked_text(tokenizer, out) -> list[str]:
    """The trained spans of a tokenize_sft result, decoded, one string per contiguous span."""
    spans, current = [], []
    for token, keep in zip(out["input_ids"], out["loss_mask"]):
        if keep:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]


# ---------------------------------------------------------------------------------- standard
def test_standard_text_trains_every_token_and_ends_with_eos(wt):
    out = tokenize_sft({"text": "hi there"}, LM, wt)
    assert out == {"input_ids": ids(wt, "hi", "there", EOS), "loss_mask": [1, 1, 1]}


def test_standard_prompt_completion_masks_only_completion_and_eos(wt):
    row = {"prompt": "hi there", "completion": " hello friend"}
    out = tokenize_sft(row, PC, wt)
    assert out["input_ids"] == ids(wt, "hi", "there", "hello", "friend", EOS)
    assert out["loss_mask"] == [0, 0, 1, 1, 1]
    assert tokenize_sft(row, PC, wt, completion_only_loss=False)["loss_mask"] == [1] * 5


def test_tokenizer_bos_goes_on_standard_text_once():
    tokenizer = word_tokenizer()
    # Stand-in for a Llama-style tokenizer that prepends a BOS (here <|im_start|>) to every encode.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{S} $A", special_tokens=[(S, tokenizer.convert_tokens_to_ids(S))]
    )
    out = tokenize_sft({"prompt": "hi", "completion": " there"}, PC, tokenizer)
    assert out["input_ids"] == ids(tokenizer, S, "hi", "there", EOS) and out["loss_mask"] == [0, 0, 1, 1]
    pref = tokenize_preference({"prompt": "hi", "chosen": " yes", "rejected": " no"}, PREF, tokenizer)
    assert pref["prompt_ids"] == ids(tokenizer, S, "hi") and pref["chosen_ids"] == ids(tokenizer, "yes", EOS)


# ------------------------------------------------------------------------------ conversations
def test_assistant_only_mask_covers_exactly_the_assistant_turns(wt):
    out = tokenize_sft({"messages": CONVERSATION}, LM_CONV, wt)
    expected = [
        (S, 0), ("system", 0), ("be", 0), ("good", 0), (E, 0),
        (S, 0), ("user", 0), ("hi", 0), ("there", 0), (E, 0),
        (S, 0), ("assistant", 0), ("hello", 1), ("friend", 1), (E, 1),
        (S, 0), ("user", 0), ("how", 0), ("are", 0), ("you", 0), (E, 0),
        (S, 0), ("assistant", 0), ("fine", 1), ("thanks", 1), (E, 1),
    ]
    assert out["input_ids"] == ids(wt, *(t for t, _ in expected))
    assert out["loss_mask"] == [m for _, m in expected]


def test_assistant_only_false_trains_everything(wt):
    out = tokenize_sft({"messages": CONVERSATION}, LM_CONV, wt, assistant_only_loss=False)
    assert out["loss_mask"] == [1] * len(out["input_ids"])


def test_byte_level_mask_stops_at_end_of_turn_not_newline(bt):
    out = tokenize_sft({"messages": CONVERSATION}, LM_CONV, bt)
    assert bt.decode(out["input_ids"]) == render_chat(bt, CONVERSATION)
    # ChatML's "\n" after <|im_end|> is layout, not a target.
    assert masked_text(bt, out) == [f"hello friend{E}", f"fine thanks{E}"]


# A template that closes the whole conversation with <|endoftext|>: prefixes then do not
# tokenize as prefixes of the full conversation, which forces the offset-mapping fallback.
CLOSED_CHATML = CHATML + f"{{% if not add_generation_prompt %}}{EOS}{{% endif %}}"


@pytest.mark.parametrize("make", [word_tokenizer, byte_tokenizer])
def test_offset_fallback_gives_the_same_assistant_spans(make):
    tokenizer = make(CLOSED_CHATML)
    text = render_chat(tokenizer, CONVERSATION)
    full = tokenizer.encode(text, add_special_tokens=False)
    assert tok_module._assistant_spans_by_prefix(CONVERSATION, full, tokenizer, None) is None
    out = tokenize_sft({"messages": CONVERSATION}, LM_CONV, tokenizer)
    assert masked_text(tokenizer, out) == [
        tokenizer.decode(tokenizer.encode(x, add_special_tokens=False)) for x in (f"hello friend{E}", f"fine thanks{E}")
    ]
    assert out["loss_mask"][-1] == 0  # the closing <|endoftext|> is not an assistant token


def test_conversational_prompt_completion(wt, bt):
    row = {"prompt": [USER], "completion": [GOOD]}
    out = tokenize_sft(row, PC_CONV, wt)
    assert out["input_ids"] == ids(wt, S, "user", "hi", "there", E, S, "assistant", "hello", "friend", E)
    assert out["loss_mask"] == [0] * 7 + [1] * 3
    byte_out = tokenize_sft(row, PC_CONV, bt)
    assert masked_text(bt, byte_out) == [f"hello friend{E}"]
    assert bt.decode(byte_out["input_ids"]).endswith(f"assistant\nhello friend{E}")


def test_missing_chat_template_tells_to_set_data_chat_template():
    tokenizer = word_tokenizer(chat_template=None)
    with pytest.raises(ChatTemplateError, match=r"set data\.chat_template"):
        tokenize_sft({"messages": [USER, GOOD]}, LM_CONV, tokenizer)
    out = tokenize_sft({"messages": [USER, GOOD]}, LM_CONV, tokenizer, chat_template="chatml")
    assert out["loss_mask"] == [0] * 7 + [1] * 3


def test_render_chat_uses_a_configured_jinja_template(wt):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert render_chat(wt, [USER, GOOD], chat_template=template) == "user: hi there\nassistant: hello friend\n"
    assert render_chat(wt, [USER], add_generation_prompt=True) == f"{S}user\nhi there{E}\n{S}assistant\n"


# -------------------------------------------------------------------------------- preference
def test_standard_preference_with_prompt(wt):
    row = {"prompt": "hi there", "chosen": " hello friend", "rejected": " bad"}
    assert tokenize_preference(row, PREF, wt) == {
        "prompt_ids": ids(wt, "hi", "there"),
        "chosen_ids": ids(wt, "hello", "friend", EOS),
        "rejected_ids": ids(wt, "bad", EOS),
    }


def test_standard_preference_implicit_prompt(wt):
    row = {"chosen": "Q: two plus four A: 4", "rejected": "Q: two plus four A: 5"}
    assert tokenize_preference(row, PREF, wt) == {
        "prompt_ids": ids(wt, "Q:", "two", "plus", "four", "A:"),
        "chosen_ids": ids(wt, "4", EOS),
        "rejected_ids": ids(wt, "5", EOS),
    }


def test_conversational_preference_implicit_prompt(wt, bt):
    row = {"chosen": [USER, GOOD], "rejected": [USER, BAD]}
    assert tokenize_preference(row, PREF_CONV, wt) == {
        "prompt_ids": ids(wt, S, "user", "hi", "there", E, S, "assistant"),
        "chosen_ids": ids(wt, "hello", "friend", E),
        "rejected_ids": ids(wt, "bad", E),
    }
    byte_out = tokenize_preference(row, PREF_CONV, bt)
    assert bt.decode(byte_out["chosen_ids"]) == f"hello friend{E}"  # ends at end-of-turn
    assert bt.decode(byte_out["prompt_ids"]) == f"{S}user\nhi there{E}\n{S}assistant\n"


def test_boundary_disagreement_warns_and_keeps_the_joint_tokens(wt):
    # "hello" + "there" joins into the unknown word "hellothere": the prompt's ids [hi, hello] are
    # not a prefix of [hi, [UNK], eos]. The prompt shrinks to the agreeing part [hi], so every
    # sequence is exactly its joint tokenisation and nothing of the response is lost.
    row = {"prompt": "hi hello", "chosen": "there", "rejected": " friend"}
    with pytest.warns(BoundaryWarning, match="disagree at the boundary"):
        out = tokenize_preference(row, PREF, wt)
    assert out == {
        "prompt_ids": ids(wt, "hi"),
        "chosen_ids": ids(wt, "[UNK]", EOS),
        "rejected_ids": ids(wt, "hello", "friend", EOS),
    }


def test_boundary_disagreement_in_sft_trains_on_the_merged_token(wt):
    with pytest.warns(BoundaryWarning):
        out = tokenize_sft({"prompt": "hi hello", "completion": "there"}, PC, wt)
    assert out == {"input_ids": ids(wt, "hi", "[UNK]", EOS), "loss_mask": [0, 1, 1]}


# ------------------------------------------------------------------------------------ prompts
def test_prompt_passes_other_columns_through(wt):
    row = {"prompt": [USER], "answer": "4", "id": 7}
    out = tokenize_prompt(row, Format(Kind.PROMPT_ONLY, True), wt)
    assert out["prompt_ids"] == ids(wt, S, "user", "hi", "there", E, S, "assistant")
    assert out["prompt_text"] == f"{S}user\nhi there{E}\n{S}assistant\n"
    assert out["answer"] == "4" and out["id"] == 7 and out["prompt"] == [USER]


def test_standard_prompt_and_implicit_preference_prompt(wt):
    out = tokenize_prompt({"prompt": "two plus four", "answer": "6"}, Format(Kind.PROMPT_ONLY, False), wt)
    assert out["prompt_ids"] == ids(wt, "two", "plus", "four") and out["prompt_text"] == "two plus four"
    pref = {"chosen": "I like cats", "rejected": "I like dogs"}
    out = tokenize_prompt(pref, PREF, wt)
    assert out["prompt"] == "I like" and out["prompt_ids"] == ids(wt, "I", "like")
    assert out["chosen"] == "I like cats"
