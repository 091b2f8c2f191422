"""From raw rows to tokenized examples for one *view*, with the length policy applied and counted.

Views and the formats that can feed them (a conversion is offered only where its meaning is
unambiguous; anything else is a DataError naming the accepted formats):

* ``sft``: language modeling, prompt-completion, and preference (trained on prompt + chosen).
* ``preference``: preference.
* ``prompt``: prompt-only, prompt-completion, preference and unpaired preference (their prompt), and
  conversational language modeling (the messages before the last assistant turn).
* ``unpaired``: unpaired preference (``prompt_ids``, ``completion_ids``, ``desirable``), and preference,
  each pair becoming two rows: chosen desirable, rejected undesirable (KTO).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError
from tqdm.auto import tqdm

from align_runner.config import Truncation
from align_runner.data.errors import DataError, Shown, row_error
from align_runner.data.formats import (
    Format,
    Kind,
    detect_format,
    format_columns,
    validate_row,
    with_message_prompt,
)
from align_runner.data.tokenize import preference_parts, tokenize_preference, tokenize_prompt, tokenize_sft

VIEWS = ("sft", "preference", "prompt", "unpaired")
# the config's truncation modes (data.truncation), as the strings this module compares with
TRUNCATIONS = tuple(t.value for t in Truncation)
_VIEW_KINDS: dict[str, tuple[Kind, ...]] = {
    "sft": (Kind.LANGUAGE_MODELING, Kind.PROMPT_COMPLETION, Kind.PREFERENCE),
    "preference": (Kind.PREFERENCE,),
    "prompt": (Kind.PROMPT_ONLY, Kind.PROMPT_COMPLETION, Kind.PREFERENCE, Kind.UNPAIRED_PREFERENCE,
               Kind.LANGUAGE_MODELING),
    "unpaired": (Kind.UNPAIRED_PREFERENCE, Kind.PREFERENCE),
}


# Why a row is dropped or truncated: the metric ``<view>/<split>/dropped/<reason>`` (and
# ``truncated/<reason>``), with what it means, for logs and errors.
REASONS = {
    "too_long": "longer than data.max_length (or its prompt than data.max_prompt_length) with data.truncation=drop",
    "prompt_too_long": "the prompt (the untrained start) is longer than data.max_length / data.max_prompt_length",
    "no_assistant_turn": "no assistant message to train on (data.assistant_only_loss=true)",
    "empty_completion": "no completion token to train on",
    "empty_prompt": "the prompt has no tokens",
    "identical_pair": "chosen is identical to rejected: no preference to learn",
}


@dataclass
class PrepStats:
    """Row counts of one prepared source: ``total == kept + dropped``; ``truncated`` counts kept rows
    that were cut to fit. ``dropped_by`` / ``truncated_by`` split them by reason (keys of REASONS)."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_by: dict[str, int] = field(default_factory=dict, compare=False)
    truncated_by: dict[str, int] = field(default_factory=dict, compare=False)

    def count(self, dropped: str | None = None, truncated: str | None = None) -> None:
        """Count one row: dropped for reason ``dropped``, else kept (truncated for ``truncated``)."""
        if dropped is not None:
            self.dropped += 1
            self.dropped_by[dropped] = self.dropped_by.get(dropped, 0) + 1
            return
        self.kept += 1
        if truncated is not None:
            self.truncated += 1
            self.truncated_by[truncated] = self.truncated_by.get(truncated, 0) + 1

    def as_dict(self) -> dict[str, int]:
        """The counts as metrics: ``total``, ``kept``, ``truncated``, ``dropped``, ``dropped/<reason>``,
        ``truncated/<reason>``."""
        out = {"total": self.total, "kept": self.kept, "truncated": self.truncated, "dropped": self.dropped}
        out.update({f"dropped/{r}": n for r, n in sorted(self.dropped_by.items())})
        out.update({f"truncated/{r}": n for r, n in sorted(self.truncated_by.items())})
        return out


def check_kept(counts: Mapping[str, float], label: str, view: str, split: str, max_dropped_share: float) -> None:
    """Raise a DataError when filtering left ``view``'s ``split`` (read from source ``label``) with no
    row, or dropped more than ``max_dropped_share`` of its rows; the message gives the counts and the
    main cause. ``counts`` as :meth:`PrepStats.as_dict` (or data_prep's metrics of that split) gives them."""
    total, kept, dropped = int(counts.get("total", 0)), int(counts.get("kept", 0)), int(counts.get("dropped", 0))
    if total == 0 or (kept > 0 and dropped <= max_dropped_share * total):
        return
    reasons = {k.split("/", 1)[1]: int(v) for k, v in counts.items() if k.startswith("dropped/")}
    main = max(reasons, key=lambda r: reasons[r]) if reasons else None
    cause = f"; mostly {main} ({reasons[main]}): {REASONS.get(main, main)}" if main else ""
    why = "none is left" if kept == 0 else f"more than data.max_dropped_share={max_dropped_share:g}"
    raise DataError(
        f"{label}: the {view!r} view ({split}): filtering dropped {dropped} of {total} rows "
        f"({dropped / total:.0%}), {why}{cause}"
    )


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
    problem = next(check_rows(rows, label, view), None)  # every row is checked before any is tokenized
    if problem is not None:
        raise problem
    fmt = detect_format(rows[0], label, 0)
    untrained = "no_assistant_turn" if fmt.kind is Kind.LANGUAGE_MODELING and fmt.conversational else "empty_completion"
    examples: list[dict] = []
    stats = PrepStats(total=len(rows))
    bar = tqdm(rows, desc=f"data_prep {view}", disable=not progress, dynamic_ncols=True, leave=False)
    for index, row in enumerate(bar):
        if _identical_pair(row, fmt, view):
            stats.count(dropped="identical_pair")
            continue
        row = with_message_prompt(row, label, index)
        try:
            example = _tokenize(row, fmt, view, tokenizer, completion_only_loss, assistant_only_loss, chat_template)
        except DataError:
            raise
        except (ValueError, TemplateError) as exc:  # chat-template problems lack a location
            raise DataError(f"{label}: row {index}: {exc}") from exc
        fitted, reason = _fit(example, view, max_length, max_prompt_length, truncation, tokenizer, untrained)
        if fitted is None:
            stats.count(dropped=reason)
            continue
        stats.count(truncated=reason)
        examples.extend(_unpaired(fitted, row, fmt) if view == "unpaired" else [fitted])
    return examples, stats


def check_rows(rows: Sequence[Mapping], label: str, view: str) -> Iterator[DataError]:
    """Every problem of ``rows`` as ``view``'s data, in row order, without tokenizing: a format the
    view cannot take (reported once), then each row of another format than row 0 or with a bad column,
    type, role or empty content. data_prep and the check before any model loads both run this."""
    if not rows:
        yield DataError(f"{label}: no rows")
        return
    try:
        fmt = detect_format(rows[0], label, 0)
        _check_view(fmt, view, label)
    except DataError as exc:
        yield exc
        return
    for index, row in enumerate(rows):
        try:
            missing = [c for c in format_columns(fmt) if isinstance(row, Mapping) and c not in row]
            if missing:
                raise row_error(label, index, missing[0], f"a column named {missing[0]!r}, as row 0 ({fmt}) has",
                                Shown(f"columns {sorted(row)}"))
            found = detect_format(row, label, index)
            if found != fmt:
                raise row_error(label, index, None, f"the same format as row 0 ({fmt})", Shown(f"{found} (columns {sorted(row)})"))
            validate_row(row, fmt, label, index)
            if view == "prompt" and fmt.kind is Kind.LANGUAGE_MODELING:
                _check_has_prompt(row, label, index)
        except DataError as exc:
            yield exc


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


def _identical_pair(row: Mapping, fmt: Format, view: str) -> bool:
    """A pair whose chosen equals rejected teaches no preference, and without a prompt column it has
    no prompt to extract; as SFT data with its own prompt it is an ordinary example."""
    return fmt.kind is Kind.PREFERENCE and row["chosen"] == row["rejected"] and (view != "sft" or "prompt" not in row)


def _tokenize(
    row: Mapping, fmt: Format, view: str, tokenizer: Any,
    completion_only_loss: bool, assistant_only_loss: bool, chat_template: str | None,
) -> dict:
    if view == "preference":
        return tokenize_preference(row, fmt, tokenizer, chat_template=chat_template)
    if view == "unpaired":
        if fmt.kind is Kind.UNPAIRED_PREFERENCE:
            # the completion as both sides of a pair: one tokenisation path (chat template, prompt/response
            # boundary, EOS) and one length policy for paired and unpaired rows
            row, fmt = {"prompt": row["prompt"], "chosen": row["completion"], "rejected": row["completion"]}, Format(
                Kind.PREFERENCE, fmt.conversational
            )
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


def _unpaired(example: dict, row: Mapping, fmt: Format) -> list[dict]:
    """The unpaired view's rows of one tokenized (pair-shaped) example: an unpaired row keeps its label,
    a pair becomes its chosen (desirable) and its rejected (undesirable) completion."""
    prompt = example["prompt_ids"]
    if fmt.kind is Kind.UNPAIRED_PREFERENCE:
        return [{"prompt_ids": prompt, "completion_ids": example["chosen_ids"], "desirable": float(bool(row["label"]))}]
    return [
        {"prompt_ids": prompt, "completion_ids": example["chosen_ids"], "desirable": 1.0},
        {"prompt_ids": prompt, "completion_ids": example["rejected_ids"], "desirable": 0.0},
    ]


def _messages_to_prompt(row: Mapping) -> dict:
    """A conversation as a prompt: the messages before its final assistant turn (if it ends with one);
    :func:`_check_has_prompt` made sure some are left."""
    messages = list(row["messages"])
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return {**row, "prompt": messages}


def _check_has_prompt(row: Mapping, label: str, index: int) -> None:
    if len(row["messages"]) == 1 and row["messages"][0]["role"] == "assistant":
        raise row_error(label, index, "messages", "a message before the final assistant turn (the prompt)",
                        Shown("only an assistant message"))


# --------------------------------------------------------------------------- length policy
def _check_lengths(max_length: Any, max_prompt_length: Any) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if max_prompt_length is not None and (
        isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or max_prompt_length < 1
    ):
        raise ValueError(f"max_prompt_length must be a positive int or null, got {max_prompt_length!r}")


def _fit(
    example: dict, view: str, max_length: int, max_prompt_length: int | None, truncation: str, tokenizer: Any,
    untrained: str,
) -> tuple[dict | None, str | None]:
    """``(example, truncation reason or None)`` when kept, ``(None, drop reason)`` when dropped (reasons:
    keys of REASONS; ``untrained`` is the reason for an SFT row that trains no token)."""
    if view == "sft":
        return _fit_sft(example, max_length, truncation, untrained)
    if view in ("preference", "unpaired"):
        return _fit_preference(example, max_length, max_prompt_length, truncation)
    return _fit_prompt(example, max_prompt_length or max_length, truncation, tokenizer)


def _fit_sft(example: dict, max_length: int, truncation: str, untrained: str) -> tuple[dict | None, str | None]:
    ids, mask = example["input_ids"], example["loss_mask"]
    if not any(mask[1:]):  # the first token is never a target
        return None, untrained
    cut = len(ids) > max_length
    if cut and truncation == "drop":
        return None, "too_long"
    if cut:
        window = slice(0, max_length) if truncation == "keep_start" else slice(len(ids) - max_length, None)
        ids, mask = ids[window], mask[window]
    if not any(mask[1:]):
        return None, "prompt_too_long"
    return {**example, "input_ids": ids, "loss_mask": mask}, "too_long" if cut else None


def _fit_preference(
    example: dict, max_length: int, max_prompt_length: int | None, truncation: str
) -> tuple[dict | None, str | None]:
    prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
    if not chosen or not rejected:
        return None, "empty_completion"
    prompt_limit = max_prompt_length if max_prompt_length is not None else len(prompt)
    long_prompt = len(prompt) > prompt_limit
    over = long_prompt or max(len(chosen), len(rejected)) + min(len(prompt), prompt_limit) > max_length
    reason = "prompt_too_long" if long_prompt else "too_long"
    if over and truncation == "drop":
        return None, "too_long"
    if over:
        prompt = _keep_end(prompt, prompt_limit)
        room = max(max_length - len(prompt), 0)
        chosen, rejected = chosen[:room], rejected[:room]
    if not chosen or not rejected:
        return None, "prompt_too_long"
    return {**example, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}, reason if over else None


def _fit_prompt(example: dict, limit: int, truncation: str, tokenizer: Any) -> tuple[dict | None, str | None]:
    ids = example["prompt_ids"]
    if not ids:
        return None, "empty_prompt"
    cut = len(ids) > limit
    if cut and truncation == "drop":
        return None, "too_long"
    if not cut:
        return example, None
    ids = _keep_end(ids, limit)
    # Keep prompt_text equal to what generation actually sees.
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return {**example, "prompt_ids": ids, "prompt_text": text}, "prompt_too_long"


def _keep_end(ids: list[int], n: int) -> list[int]:
    return ids[len(ids) - n:] if len(ids) > n else ids
