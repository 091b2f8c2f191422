"""From raw rows to tokenized examples for one *view*, with the length policy applied and counted.

Views and the formats that can feed them (a conversion is offered only where its meaning is
unambiguous; anything else is a DataError naming the accepted formats):

* ``sft``: language modeling, prompt-completion, and preference (trained on prompt + chosen).
* ``preference``: preference.
* ``prompt``: prompt-only, prompt-completion, preference and unpaired preference (their prompt), and
  conversational language modeling (the messages before the last assistant turn).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from jinja2 import TemplateError
from tqdm.auto import tqdm

from align_runner.data.errors import DataError
from align_runner.data.formats import Format, Kind, detect_source_format, validate_row, with_message_prompt
from align_runner.data.tokenize import preference_parts, tokenize_preference, tokenize_prompt, tokenize_sft

VIEWS = ("sft", "preference", "prompt")
TRUNCATIONS = ("keep_start", "keep_end", "drop")
_VIEW_KINDS: dict[str, tuple[Kind, ...]] = {
    "sft": (Kind.LANGUAGE_MODELING, Kind.PROMPT_COMPLETION, Kind.PREFERENCE),
    "preference": (Kind.PREFERENCE,),
    "prompt": (Kind.PROMPT_ONLY, Kind.PROMPT_COMPLETION, Kind.PREFERENCE, Kind.UNPAIRED_PREFERENCE,
               Kind.LANGUAGE_MODELING),
}


@dataclass
class PrepStats:
    """Row counts of one prepared source: ``total == kept + dropped``; ``truncated`` counts kept rows
    that were cut to fit."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def prepare_rows(
    rows: Sequence[Mapping],
    label: str,
    view: str,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: str = "keep_start",
    completion_only_loss: bool = True,
    assistant_only_loss: bool = True,
    chat_template: str | None = None,
    progress: bool = False,
) -> tuple[list[dict], PrepStats]:
    """Detect, validate, convert and tokenize ``rows`` for ``view``, then fit them to the lengths.

    Length policy (``truncation``):
      * ``keep_start`` / ``keep_end``: an SFT sequence over ``max_length`` keeps its first / last
        ``max_length`` tokens. Prompts (prompt view, and preference prompts) over
        ``max_prompt_length`` always keep their END, the turn being answered; preference responses
        keep their start and are cut so prompt + response <= ``max_length``. A prompt-view prompt is
        limited to ``max_prompt_length`` or, if unset, ``max_length``.
      * ``drop``: rows over any of these limits are dropped instead.
    A row left with nothing to learn from is dropped: an SFT row needs a trained token past
    position 0 (the first token is never a target), a preference row two non-empty responses,
    a prompt row a non-empty prompt.

    ``progress`` shows a bar with ETA (large hub datasets take minutes).
    Raises ``ValueError`` for an unknown view or truncation, :class:`DataError` for bad rows.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown data view {view!r}; valid views: {', '.join(VIEWS)}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncation!r}; valid: {', '.join(TRUNCATIONS)}")
    _check_lengths(max_length, max_prompt_length)
    fmt = detect_source_format(rows, label)
    _check_view(fmt, view, label)
    examples: list[dict] = []
    stats = PrepStats(total=len(rows))
    bar = tqdm(rows, desc=f"data_prep {view}", disable=not progress, dynamic_ncols=True, leave=False)
    for index, row in enumerate(bar):
        validate_row(row, fmt, label, index)
        row = with_message_prompt(row, label, index)
        try:
            example = _tokenize(row, fmt, view, tokenizer, completion_only_loss, assistant_only_loss, chat_template)
        except DataError:
            raise
        except (ValueError, TemplateError) as exc:  # implicit-prompt / chat-template problems lack a location
            raise DataError(f"{label}: row {index}: {exc}") from exc
        fitted, was_cut = _fit(example, view, max_length, max_prompt_length, truncation, tokenizer)
        if fitted is None:
            stats.dropped += 1
            continue
        stats.kept += 1
        stats.truncated += int(was_cut)
        examples.append(fitted)
    return examples, stats


# ------------------------------------------------------------------------------ conversion
def feeds(fmt: Format, view: str) -> bool:
    """Whether rows of ``fmt`` can be converted for ``view`` (see the module docstring)."""
    standard_lm_prompt = view == "prompt" and fmt.kind is Kind.LANGUAGE_MODELING and not fmt.conversational
    return fmt.kind in _VIEW_KINDS[view] and not standard_lm_prompt


def accepted_formats(view: str) -> str:
    """The formats that can feed ``view``, for error messages."""
    names = ", ".join(kind.value for kind in _VIEW_KINDS[view])
    return names + (" (language modeling only when conversational)" if view == "prompt" else "")


def _check_view(fmt: Format, view: str, label: str) -> None:
    if not feeds(fmt, view):
        raise DataError(f"{label}: {fmt} data cannot feed the '{view}' view; it accepts: {accepted_formats(view)}")


def _tokenize(
    row: Mapping, fmt: Format, view: str, tokenizer: Any,
    completion_only_loss: bool, assistant_only_loss: bool, chat_template: str | None,
) -> dict:
    if view == "preference":
        return tokenize_preference(row, fmt, tokenizer, chat_template=chat_template)
    if view == "prompt":
        if fmt.kind is Kind.LANGUAGE_MODELING:
            row, fmt = _messages_to_prompt(row), Format(Kind.PROMPT_ONLY, conversational=True)
        return tokenize_prompt(row, fmt, tokenizer, chat_template=chat_template)
    if fmt.kind is Kind.PREFERENCE:  # SFT on the preferred answer
        prompt, chosen, _ = preference_parts(row)
        row, fmt = {"prompt": prompt, "completion": chosen}, Format(Kind.PROMPT_COMPLETION, fmt.conversational)
    return tokenize_sft(
        row, fmt, tokenizer, completion_only_loss=completion_only_loss,
        assistant_only_loss=assistant_only_loss, chat_template=chat_template,
    )


def _messages_to_prompt(row: Mapping) -> dict:
    """A conversation as a prompt: the messages before its final assistant turn (if it ends with one)."""
    messages = list(row["messages"])
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise ValueError("the conversation has only an assistant message, so no prompt is left")
    return {**row, "prompt": messages}


# --------------------------------------------------------------------------- length policy
def _check_lengths(max_length: Any, max_prompt_length: Any) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if max_prompt_length is not None and (
        isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or max_prompt_length < 1
    ):
        raise ValueError(f"max_prompt_length must be a positive int or null, got {max_prompt_length!r}")


def _fit(
    example: dict, view: str, max_length: int, max_prompt_length: int | None, truncation: str, tokenizer: Any
) -> tuple[dict | None, bool]:
    """``(example or None if dropped, whether it was truncated)``."""
    if view == "sft":
        return _fit_sft(example, max_length, truncation)
    if view == "preference":
        return _fit_preference(example, max_length, max_prompt_length, truncation)
    return _fit_prompt(example, max_prompt_length or max_length, truncation, tokenizer)


def _fit_sft(example: dict, max_length: int, truncation: str) -> tuple[dict | None, bool]:
    ids, mask = example["input_ids"], example["loss_mask"]
    cut = len(ids) > max_length
    if cut and truncation == "drop":
        return None, False
    if cut:
        window = slice(0, max_length) if truncation == "keep_start" else slice(len(ids) - max_length, None)
        ids, mask = ids[window], mask[window]
    if not any(mask[1:]):
        return None, False
    return {**example, "input_ids": ids, "loss_mask": mask}, cut


def _fit_preference(
    example: dict, max_length: int, max_prompt_length: int | None, truncation: str
) -> tuple[dict | None, bool]:
    prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
    prompt_limit = max_prompt_length if max_prompt_length is not None else len(prompt)
    over = len(prompt) > prompt_limit or max(len(chosen), len(rejected)) + min(len(prompt), prompt_limit) > max_length
    if over and truncation == "drop":
        return None, False
    if over:
        prompt = _keep_end(prompt, prompt_limit)
        room = max(max_length - len(prompt), 0)
        chosen, rejected = chosen[:room], rejected[:room]
    if not chosen or not rejected:
        return None, False
    return {**example, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}, over


def _fit_prompt(example: dict, limit: int, truncation: str, tokenizer: Any) -> tuple[dict | None, bool]:
    ids = example["prompt_ids"]
    cut = len(ids) > limit
    if cut and truncation == "drop":
        return None, False
    if not ids:
        return None, False
    if not cut:
        return example, False
    ids = _keep_end(ids, limit)
    # Keep prompt_text equal to what generation actually sees.
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return {**example, "prompt_ids": ids, "prompt_text": text}, True


def _keep_end(ids: list[int], n: int) -> list[int]:
    return ids[len(ids) - n:] if len(ids) > n else ids
