"""Dataset formats: detect which of TRL's documented dataset types a row is, and validate it.

Kinds and their columns (the names TRL documents, so users can bring their data as is):

=====================  =================================  ==========================================
kind                   columns                            used by
=====================  =================================  ==========================================
language modeling      ``text`` or ``messages``           SFT
prompt-only            ``prompt``                         GRPO, PPO, eval (generation)
prompt-completion      ``prompt``, ``completion``         SFT (completion-only loss), eval
preference             ``prompt`` (optional), ``chosen``,  DPO, reward model
                       ``rejected``
unpaired preference    ``prompt``, ``completion``,        KTO-style data; usable as prompts
                       ``label``
=====================  =================================  ==========================================

Each is *standard* (values are strings) or *conversational* (values are lists of
``{"role", "content"}`` messages). Detection looks at column names, most specific set first, so
extra columns (ids, answers, metadata) are allowed and passed along.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from align_runner.data.errors import Shown, describe, row_error

ROLES = ("system", "user", "assistant", "tool")
# Roles whose message must say something: an empty system prompt or tool result is a harmless
# placeholder many datasets carry, an empty user or assistant turn is a broken row.
_CONTENT_ROLES = ("user", "assistant")
MESSAGES_EXPECTED = "a non-empty list of {role, content} messages"
STRING_EXPECTED = "a string"
NON_EMPTY_EXPECTED = "a non-empty string"


class Kind(str, Enum):
    """The five dataset types (see the module docstring for their columns)."""

    LANGUAGE_MODELING = "language_modeling"
    PROMPT_ONLY = "prompt_only"
    PROMPT_COMPLETION = "prompt_completion"
    PREFERENCE = "preference"
    UNPAIRED_PREFERENCE = "unpaired_preference"


@dataclass(frozen=True)
class Format:
    """A dataset type plus whether its values are message lists (conversational) or strings."""

    kind: Kind
    conversational: bool

    def __str__(self) -> str:
        style = "conversational" if self.conversational else "standard"
        return f"{style} {self.kind.value.replace('_', ' ')}"


# (kind, columns that must all be present, column whose value decides standard vs conversational).
# Most specific first: ultrachat-style rows carry `prompt` *and* `messages` and are conversations.
_DETECTION_ORDER: tuple[tuple[Kind, tuple[str, ...], str], ...] = (
    (Kind.PREFERENCE, ("chosen", "rejected"), "chosen"),
    (Kind.UNPAIRED_PREFERENCE, ("prompt", "completion", "label"), "completion"),
    (Kind.PROMPT_COMPLETION, ("prompt", "completion"), "completion"),
    (Kind.LANGUAGE_MODELING, ("messages",), "messages"),
    (Kind.LANGUAGE_MODELING, ("text",), "text"),
    (Kind.PROMPT_ONLY, ("prompt",), "prompt"),
)
_KNOWN_SETS = "text | messages | prompt | prompt+completion | [prompt+]chosen+rejected | prompt+completion+label"


def detect_format(row: Mapping, label: str, index: int) -> Format:
    """The :class:`Format` of one row, from its column names and the type of its main column.

    Raises :class:`DataError` when no known column set is present, or when the main column is
    neither a string nor a list.
    """
    if not isinstance(row, Mapping):
        raise row_error(label, index, None, "an object with dataset columns", row)
    for kind, columns, main in _DETECTION_ORDER:
        if not all(column in row for column in columns):
            continue
        if main == "messages":
            return Format(kind, conversational=True)  # validate_row reports a non-list
        if main == "text":
            return Format(kind, conversational=False)
        value = row[main]
        if isinstance(value, str):
            return Format(kind, conversational=False)
        if isinstance(value, list):
            return Format(kind, conversational=True)
        raise row_error(label, index, main, f"{STRING_EXPECTED} or {MESSAGES_EXPECTED}", value)
    raise row_error(label, index, None, f"one of the column sets {_KNOWN_SETS}", Shown(f"columns {sorted(row)}"))


def format_columns(fmt: Format) -> tuple[str, ...]:
    """The columns every row of ``fmt`` has (``prompt`` of a preference row is optional)."""
    if fmt.kind is Kind.LANGUAGE_MODELING:
        return ("messages",) if fmt.conversational else ("text",)
    return next(columns for kind, columns, _ in _DETECTION_ORDER if kind is fmt.kind)


def validate_row(row: Mapping, fmt: Format, label: str, index: int) -> None:
    """Check ``row`` has ``fmt``'s columns with the right types; raise :class:`DataError` if not."""
    kind = fmt.kind
    if kind is Kind.LANGUAGE_MODELING:
        column = "messages" if fmt.conversational else "text"
        _check_value(row, column, fmt.conversational, label, index)
    elif kind is Kind.PROMPT_ONLY:
        _check_value(row, "prompt", fmt.conversational, label, index)
    elif kind in (Kind.PROMPT_COMPLETION, Kind.UNPAIRED_PREFERENCE):
        _check_value(row, "prompt", fmt.conversational, label, index)
        _check_value(row, "completion", fmt.conversational, label, index)
        if kind is Kind.UNPAIRED_PREFERENCE:
            _check_label(row, label, index)
    else:  # preference; the prompt may be implicit (shared start of chosen and rejected)
        _check_value(row, "chosen", fmt.conversational, label, index)
        _check_value(row, "rejected", fmt.conversational, label, index)
        if fmt.conversational and isinstance(row.get("prompt"), str):
            with_message_prompt(row, label, index)  # raises unless chosen/rejected repeat it
        elif "prompt" in row:
            _check_value(row, "prompt", fmt.conversational, label, index)
        elif row["chosen"] != row["rejected"]:  # an identical pair is dropped and counted, not an error
            _check_implicit_prompt(row, label, index)


def with_message_prompt(row: Mapping, label: str, index: int) -> Mapping:
    """A conversational preference row whose ``prompt`` is a string that chosen and rejected already
    begin with as a user message (UltraFeedback-binarized): the prompt becomes their shared leading
    messages and chosen / rejected what follows, so the prompt is not tokenized twice. Other rows
    are returned unchanged. A string prompt that is not among the shared leading user messages is a
    DataError naming the row and column.
    """
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if not (isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list)):
        return row
    # at most len - 1 messages are shared, so each response keeps at least one (identical answers too)
    limit = min(len(chosen), len(rejected)) - 1
    shared = 0
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    users = [m.get("content") for m in chosen[:shared] if isinstance(m, Mapping) and m.get("role") == "user"]
    if not any(isinstance(u, str) and u.strip() == prompt.strip() for u in users):
        raise row_error(
            label, index, "prompt",
            f"{MESSAGES_EXPECTED}, or a string equal to a user message that chosen and rejected both begin with",
            prompt,
        )
    return {**row, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _check_implicit_prompt(row: Mapping, label: str, index: int) -> None:
    """A pair without a ``prompt`` column must have one to extract (their shared start)."""
    try:
        extract_implicit_prompt(row["chosen"], row["rejected"])
    except ValueError as exc:
        raise row_error(label, index, "prompt", "a 'prompt' column, or chosen and rejected that share their start",
                        Shown(str(exc))) from None


def _check_value(row: Mapping, column: str, conversational: bool, label: str, index: int) -> None:
    if column not in row:
        raise row_error(label, index, column, "a column named " + repr(column), Shown(f"columns {sorted(row)}"))
    value = row[column]
    if not conversational:
        if not isinstance(value, str):
            raise row_error(label, index, column, STRING_EXPECTED, value)
        if not value.strip():
            raise row_error(label, index, column, NON_EMPTY_EXPECTED, value)
        return
    if not isinstance(value, list) or not value:
        raise row_error(label, index, column, MESSAGES_EXPECTED, value)
    for position, message in enumerate(value):
        _check_message(message, position, column, label, index)


def _check_message(message: Any, position: int, column: str, label: str, index: int) -> None:
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise row_error(label, index, column, f"message {position} to be a {{role, content}} object", message)
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise row_error(label, index, column, f"message {position} role to be one of {', '.join(ROLES)}", role)
    # An assistant turn that only calls tools may carry content None (OpenAI-style tool_calls).
    if content is None and message.get("tool_calls"):
        return
    if not isinstance(content, str):
        raise row_error(label, index, column, f"message {position} content to be a string", content)
    if role in _CONTENT_ROLES and not content.strip():
        raise row_error(label, index, column, f"message {position} ({role}) content to be a non-empty string", content)


def _check_label(row: Mapping, label: str, index: int) -> None:
    if "label" not in row:
        raise row_error(label, index, "label", "a column named 'label'", Shown(f"columns {sorted(row)}"))
    value = row["label"]
    if not (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))):
        raise row_error(label, index, "label", "a bool (true = desirable completion)", value)


# ------------------------------------------------------------------------------ implicit prompts
_WORD_CHAR = re.compile(r"\w")


def extract_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split a preference pair without a ``prompt`` column into ``(prompt, chosen, rejected)``.

    Conversational: the leading messages both conversations share are the prompt; what follows
    is each response. Raises ``ValueError`` when they share nothing or one has nothing left.

    Standard strings: start from the longest common prefix, then
      1. if the cut falls inside a word (word characters on both sides of it, in either string),
         move it back to the start of that word, so no response begins mid-word;
      2. move whitespace just before the cut into the responses, so ``"Q: hi A:"`` + ``" yes"``
         rather than ``"Q: hi A: "`` + ``"yes"`` — byte-level and SentencePiece tokenizers attach
         a space to the word after it, so the prompt's tokens then stay a prefix of the joint ones.
    One response may end up empty (the other continues the text); identical strings raise
    ``ValueError``.
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _split_conversations(chosen, rejected)
    if isinstance(chosen, str) and isinstance(rejected, str):
        return _split_strings(chosen, rejected)
    raise ValueError(f"chosen and rejected must both be strings or both be message lists, got "
                     f"{describe(chosen)} and {describe(rejected)}")


def _split_conversations(chosen: list, rejected: list) -> tuple[list, list, list]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise ValueError("chosen and rejected share no leading messages, so there is no implicit "
                         "prompt; add a 'prompt' column")
    if shared == len(chosen) or shared == len(rejected):
        raise ValueError("one of chosen / rejected has no messages after the shared prompt; the "
                         "responses must differ in their final messages")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _split_strings(chosen: str, rejected: str) -> tuple[str, str, str]:
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical, so no prompt/response split exists")
    cut = 0
    while cut < min(len(chosen), len(rejected)) and chosen[cut] == rejected[cut]:
        cut += 1
    while cut > 0 and _inside_word(chosen, rejected, cut):
        cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _inside_word(chosen: str, rejected: str, cut: int) -> bool:
    """True when position ``cut`` splits a word: a word char before it and one after it in either."""
    if not _WORD_CHAR.match(chosen[cut - 1]):
        return False
    return any(cut < len(text) and _WORD_CHAR.match(text[cut]) for text in (chosen, rejected))
