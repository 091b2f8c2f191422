"""Errors raised by the data layer.

Every message points at the exact place to fix: the source label (a file path, ``hub:<id>:<split>``
or ``inline``), the 0-based row index, the column, and what was expected versus what was found.
"""

from __future__ import annotations

from typing import Any

# Long values would drown the message; the start is enough to recognise the row.
_MAX_SHOWN_CHARS = 80


class DataError(ValueError):
    """A data source or one of its rows cannot be used.

    Subclasses ``ValueError`` so callers that validate config values can catch both alike.
    Build row-level errors with :func:`row_error` so they all read the same way::

        data/demo/sft.jsonl: row 12: column 'messages': expected a non-empty list of
        {role, content} messages, got []
    """


class ChatTemplateError(DataError):
    """The tokenizer has no chat template and ``data.chat_template`` is not set."""


def describe(value: Any) -> str:
    """Short, type-revealing rendering of ``value`` for error messages (``repr`` cut to 80 chars)."""
    text = repr(value)
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[: _MAX_SHOWN_CHARS - 3] + "..."
    if isinstance(value, (str, list, dict)):
        return text
    return f"{text} ({type(value).__name__})"


def row_error(label: str, index: int, column: str | None, expected: str, got: Any) -> DataError:
    """A :class:`DataError` for one row: ``<label>: row <i>: column '<c>': expected <e>, got <g>``.

    ``got`` is rendered with :func:`describe`; pass a ``str`` already formatted by the caller by
    wrapping it in :class:`Shown` when it is a description rather than a value.
    """
    where = f"{label}: row {index}"
    if column is not None:
        where += f": column '{column}'"
    shown = got.text if isinstance(got, Shown) else describe(got)
    return DataError(f"{where}: expected {expected}, got {shown}")


class Shown:
    """Marks text that :func:`row_error` prints as is (e.g. ``'no such column'``), not as a repr."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text
