"""Which source feeds each data view and split.

A view's own ``data.<view>.<split>`` source wins. Otherwise the shared ``data.<split>`` source (one
file for every view, e.g. ``data=local data.train.path=my.jsonl``) feeds the view when its format can
be converted for it (``prepare.feeds``: a preference file feeds sft via chosen, preference, and prompt).
The shared source's format is read from its first row, so this is known while planning, before any
model loads.
"""

from __future__ import annotations

from collections.abc import Mapping

from align_runner.data.formats import Format, detect_format
from align_runner.data.prepare import VIEWS, feeds
from align_runner.data.sources import first_row

SPLITS = ("train", "eval")
# A view with neither a source of its own nor a shared one that feeds it is converted from another
# view's own source: KTO's unpaired rows from data.preference's pairs (chosen desirable, rejected not).
CONVERTED_FROM = {"unpaired": "preference"}


def is_set(source: Mapping | None) -> bool:
    """Whether a source names rows: data=local ships its sources with no path, meaning none (a null
    node could not take a ``data.eval.path=...`` override)."""
    return source is not None and (source.get("path") is not None or source.get("rows") is not None)


def shared_formats(data: Mapping) -> dict[str, tuple[Format, str]]:
    """``split -> (format, label)`` of each shared (top-level) source of ``data`` (a resolved data config)."""
    out = {}
    for split in SPLITS:
        if is_set(data.get(split)):
            row, label = first_row(data[split])
            out[split] = detect_format(row, label, 0), label
    return out


def view_source(data: Mapping, view: str, split: str, formats: Mapping[str, tuple[Format, str]]) -> Mapping | None:
    """The source of ``view``/``split``: its own, else the shared one when its format feeds ``view``;
    None when neither (``formats`` from :func:`shared_formats`)."""
    own = (data.get(view) or {}).get(split)
    if is_set(own):
        return own
    shared = data.get(split)
    if is_set(shared) and feeds(formats[split][0], view):
        return shared
    parent = (data.get(CONVERTED_FROM.get(view, "")) or {}).get(split)
    return parent if is_set(parent) else None


def own_views(data: Mapping) -> list[str]:
    """The views with a source of their own (``data.<view>.<split>`` naming rows)."""
    return [v for v in VIEWS if any(is_set((data.get(v) or {}).get(split)) for split in SPLITS)]


def converted_views(data: Mapping) -> list[str]:
    """The views ``CONVERTED_FROM`` feeds: those whose source view has rows of its own."""
    own = own_views(data)
    return [view for view, parent in CONVERTED_FROM.items() if parent in own]


def fed_views(formats: Mapping[str, tuple[Format, str]]) -> list[str]:
    """The views the shared sources can feed (in either split), in canonical order."""
    return [v for v in VIEWS if any(feeds(fmt, v) for fmt, _ in formats.values())]
