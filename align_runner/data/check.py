"""The data check that runs before any model loads: every row of every source the pipeline's
data_prep will read, checked by the functions data_prep itself runs (``prepare.check_rows``: format,
columns, types, roles, non-empty content) and read by the same loaders (JSON lines, UTF-8), without
tokenizing. Problems are collected, not raised one by one, so a user fixes a file in one pass.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence

from align_runner.data.errors import DataError
from align_runner.data.prepare import check_rows
from align_runner.data.sources import is_hub, load_rows
from align_runner.data.views import SPLITS, view_source

log = logging.getLogger("align_runner")

# Problems shown before "and N more": enough to see a pattern, few enough to read.
MAX_SHOWN = 5


class DataProblems(DataError):
    """Every problem the check found, one line each: the first MAX_SHOWN, then ``and N more``."""

    def __init__(self, problems: Sequence[DataError | str], total: int | None = None) -> None:
        total = len(problems) if total is None else total
        self.lines = [" ".join(str(p).splitlines()) for p in problems[:MAX_SHOWN]]  # one line each, always
        if total > len(self.lines):
            self.lines.append(f"and {total - len(self.lines)} more")
        super().__init__("\n".join(self.lines))


class Problems:
    """A running list of problems that keeps the first MAX_SHOWN and counts the rest."""

    def __init__(self) -> None:
        self.shown: list[DataError] = []
        self.total = 0

    def add(self, found: Iterable[DataError]) -> int:
        """Add ``found``; returns how many there were."""
        before = self.total
        for problem in found:
            self.total += 1
            if len(self.shown) < MAX_SHOWN:
                self.shown.append(problem)
        return self.total - before

    def raise_any(self) -> None:
        if self.total:
            raise DataProblems(self.shown, self.total)


def check_sources(data: Mapping, views: Sequence[str], formats: Mapping, problems: Problems) -> None:
    """Check every row of each source feeding ``views`` (``data``: the resolved data config;
    ``formats``: ``views.shared_formats(data)``) with the checks of ``prepare.check_rows``.

    A source shared by several views is read once and, once it has problems, not checked again for the
    next view (its rows would report the same ones). A hub dataset is checked only when the datasets
    library is offline (``HF_HUB_OFFLINE=1``), where it reads the local cache and nothing else: online,
    reading it here would contact the hub (and download what is not cached) before the run starts, so
    it is left to data_prep, which runs the same checks on every row before tokenizing any.
    """
    loaded: dict[str, tuple[list[dict], str] | None] = {}
    for view in views:
        for split in SPLITS:
            source = view_source(data, view, split, formats)
            if source is None or not readable_here(source):
                continue
            key = json.dumps(source, sort_keys=True, default=str)
            if key not in loaded:
                loaded[key] = _load(source, problems)
            if loaded[key] is not None and problems.add(check_rows(*loaded[key], view)):
                loaded[key] = None


def _load(source: Mapping, problems: Problems) -> tuple[list[dict], str] | None:
    try:
        return load_rows(source)
    except DataError as exc:
        problems.add([exc])
        return None


def readable_here(source: Mapping) -> bool:
    """Whether reading ``source`` needs no network: anything but a hub dataset, which only offline
    (``HF_HUB_OFFLINE=1``: the datasets library then reads its local cache and nothing else)."""
    if not is_hub(source):
        return True
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)
