"""Where rows come from: local files, ``save_to_disk`` folders, hub datasets, or inline lists.

A *source* is a mapping (one ``data.*`` config node)::

    path:  str | None     # .jsonl/.json/.parquet/.csv file, a datasets.save_to_disk folder, or a hub id
    rows:  list | None    # inline rows; exactly one of path / rows
    split: str = "train"  # hub split; also picks the split of a saved DatasetDict or a {split: [...]} json
    name:  str | None     # hub config name
    revision: str | None  # hub revision (commit / tag), part of the fingerprint
    limit: int | None     # keep the first N rows
    drop: list[str]       # columns removed (before rename and before the format is detected)
    rename: dict          # their column -> canonical column, e.g. {question: prompt}

Rows are returned as plain ``list[dict]`` so every later step is a pure function of python values.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from align_runner.data.errors import DataError

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
# Files `datasets.save_to_disk` always writes; one of them marks a folder as a saved dataset.
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# Suffixes that can only mean a local file: a missing one is a typo, not a hub id.
_LOCAL_LOOKING_SUFFIXES = (*SUPPORTED_EXTENSIONS, ".txt", ".arrow", ".gz", ".tsv", ".jsonl.gz")
# Editors on Windows start UTF-8 files with it; it is not part of the first row.
_BOM = "\ufeff"


def load_rows(source: Mapping) -> tuple[list[dict], str]:
    """Load the rows of ``source``; return ``(rows, label)`` where ``label`` names it in errors.

    Raises :class:`DataError` for a missing file, an unknown extension, a bad JSON line (naming the
    file, line and row), a non-object row, or a source that sets both or neither of path / rows.
    """
    path, inline = source.get("path"), source.get("rows")
    if (path is None) == (inline is None):
        raise DataError(
            f"a data source needs exactly one of 'path' or 'rows', got path={path!r} and "
            f"rows={'<list>' if inline is not None else None}"
        )
    split = source.get("split") or "train"
    if inline is not None:
        rows, label = _inline_rows(inline), "inline"
    else:
        rows, label = _path_rows(str(path), split, source.get("name"), source.get("revision"))
    return map_columns(apply_limit(rows, source.get("limit"), label), source, label), label


def first_row(source: Mapping) -> tuple[dict, str]:
    """The first row of ``source`` with its columns mapped, and its label: enough to detect the format
    while planning. A jsonl file is read up to its first row and a hub dataset is not converted to
    python, so a large source costs little; other sources are loaded whole."""
    path = source.get("path")
    local = Path(str(path)).expanduser() if path is not None and source.get("rows") is None else None
    if local is not None and local.is_file() and local.suffix.lower() == ".jsonl":
        rows, label = _jsonl_rows(local, stop_after=1), str(path)
    elif local is not None and not local.exists() and not _is_local(str(path)):
        split = source.get("split") or "train"
        dataset, label = _hub_dataset(str(path), source.get("name"), split, source.get("revision")), f"hub:{path}:{split}"
        rows = [dataset[0]] if len(dataset) else []
    else:
        rows, label = load_rows({**source, "rename": {}, "drop": []})
    if not rows:
        raise DataError(f"{label}: no rows")
    return map_columns(rows[:1], source, label)[0], label


def map_columns(rows: list[dict], source: Mapping, label: str) -> list[dict]:
    """Apply the source's ``drop`` then ``rename``. A named column that the first row lacks is a
    DataError naming the source and listing its columns (a typo would otherwise pass silently)."""
    drop, rename = list(source.get("drop") or []), dict(source.get("rename") or {})
    if not rows or not (drop or rename):
        return rows
    columns = list(rows[0])
    for key, names in (("drop", drop), ("rename", list(rename))):
        missing = [c for c in names if c not in columns]
        if missing:
            raise DataError(f"{label}: {key} names {missing}, which are not columns of this source; its columns: {columns}")
    kept = [c for c in columns if c not in drop]
    clash = sorted(set(rename.values()) & (set(kept) - set(rename)))
    if clash:
        raise DataError(
            f"{label}: rename {rename} targets {clash}, which the source already has; add them to 'drop' first"
        )
    return [{rename.get(k, k): v for k, v in row.items() if k not in drop} for row in rows]


def is_hub(source: Mapping) -> bool:
    """Whether ``source`` names a hub dataset (a path that is neither here nor local-looking)."""
    path = source.get("path")
    if path is None or source.get("rows") is not None:
        return False
    return not Path(str(path)).expanduser().exists() and not _is_local(str(path))


def source_label(source: Mapping) -> str:
    """The label :func:`load_rows` would give ``source``, without loading it."""
    if source.get("rows") is not None:
        return "inline"
    path = str(source.get("path"))
    if _is_local(path):
        return path
    return f"hub:{path}:{source.get('split') or 'train'}"


# fingerprints already computed inside fingerprints_memoized(), by source: a plan keys every stage by
# the data it reads, so one file would otherwise be read once per stage
_MEMO: dict[str, str] | None = None


@contextlib.contextmanager
def fingerprints_memoized() -> Iterator[None]:
    """Within this block each source is fingerprinted once (its files are assumed not to change
    meanwhile, as during one plan); outside it every call reads the content again."""
    global _MEMO
    outer = _MEMO
    _MEMO = {} if outer is None else outer
    try:
        yield
    finally:
        _MEMO = outer


def fingerprint_source(source: Mapping) -> str:
    """:func:`content_fingerprint` of ``source``, computed once per source inside
    :func:`fingerprints_memoized`."""
    if _MEMO is None:
        return content_fingerprint(source)
    key = _canonical_json(dict(source))
    if key not in _MEMO:
        _MEMO[key] = content_fingerprint(source)
    return _MEMO[key]


def content_fingerprint(source: Mapping) -> str:
    """sha256 hex digest of what ``source`` yields: content, not location or mtime.

    Local file: its bytes (+ split, limit). Folder: every non-hidden file's relative path and bytes
    (+ split, limit). Inline
    rows: canonical JSON. Hub id: id, config name, split and revision (a hub dataset without a pinned
    revision can change upstream; pin ``revision`` for a reproducible key). A column mapping
    (``drop`` / ``rename``) changes the rows, so it enters too when set.
    """
    digest = hashlib.sha256()
    limit, split = source.get("limit"), source.get("split") or "train"
    if source.get("drop") or source.get("rename"):
        _update(digest, "columns", list(source.get("drop") or []), dict(source.get("rename") or {}))
    if source.get("rows") is not None:
        _update(digest, "inline", limit)
        digest.update(_canonical_json(source["rows"]).encode())
        return digest.hexdigest()
    path = str(source.get("path"))
    local = Path(path).expanduser()
    if local.is_file():
        _update(digest, "file", local.suffix.lower(), split, limit)
        _hash_file(digest, local)
    elif local.is_dir():
        _update(digest, "dir", split, limit)
        # Hidden files (.DS_Store, editor swap files) are not data and must not change the key.
        files = [p for p in local.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(local))]
        for file in sorted(files):
            _update(digest, file.relative_to(local).as_posix())
            _hash_file(digest, file)
    elif _is_local(path):
        raise DataError(f"{path}: file not found")
    else:
        _update(digest, "hub", path, source.get("name"), split, source.get("revision"), limit)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------- loaders
def _inline_rows(rows: Any) -> list[dict]:
    if not isinstance(rows, (list, tuple)):
        raise DataError(f"inline: expected 'rows' to be a list of objects, got {type(rows).__name__}")
    out = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"inline: row {index}: expected an object, got {type(row).__name__}")
        out.append(dict(row))
    return out


def _path_rows(path: str, split: str, name: str | None, revision: str | None) -> tuple[list[dict], str]:
    local = Path(path).expanduser()
    if local.is_file():
        return _file_rows(local, split), path
    if local.is_dir():
        return _saved_dataset_rows(local, split), path
    if _is_local(path):
        raise DataError(f"{path}: file not found")
    return _hub_rows(path, name, split, revision), f"hub:{path}:{split}"


def _file_rows(path: Path, split: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        return _json_rows(path, split)
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # pyarrow ships with `datasets`; imported late to keep import fast

        return _check_objects(pq.read_table(path).to_pylist(), str(path))
    if suffix == ".csv":
        return _csv_rows(path)
    raise DataError(
        f"{path}: unsupported file extension {suffix or '(none)'!r}; supported: "
        f"{', '.join(SUPPORTED_EXTENSIONS)}, a datasets.save_to_disk folder, or a hub dataset id"
    )


def _jsonl_rows(path: Path, stop_after: int | None = None) -> list[dict]:
    rows: list[dict] = []
    offset = 0  # of the line's first byte, to point at a byte that is not UTF-8
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if stop_after is not None and len(rows) >= stop_after:
                break
            line = _decode_line(raw, path, offset, f"line {line_number} (row {len(rows)})")
            offset += len(raw)
            if not line.strip():
                continue  # blank lines (often a trailing newline) are not rows
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {line_number} (row {len(rows)}): invalid JSON: {exc.msg} "
                    f"at column {exc.colno}"
                ) from exc
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: line {line_number} (row {len(rows)}): expected a JSON object, "
                    f"got {type(row).__name__}"
                )
            rows.append(row)
    return rows


def _json_rows(path: Path, split: str) -> list[dict]:
    """A ``.json`` file holds a list of objects, or an object with a ``split``/``data``/``rows`` list."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several objects one per line: a .jsonl under a .json name
            return _jsonl_rows(path)
        raise DataError(f"{path}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if isinstance(data, dict):
        key = next((k for k in (split, "data", "rows") if isinstance(data.get(k), list)), None)
        if key is None:
            raise DataError(
                f"{path}: expected a list of objects or an object with a list under "
                f"{split!r}, 'data' or 'rows', got keys {sorted(data)[:10]}"
            )
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects, got {type(data).__name__}")
    return _check_objects(data, str(path))


def _csv_rows(path: Path) -> list[dict]:
    """CSV cells are strings; two decodings make TRL-format files usable (see ``_decode_csv_cell``)."""
    text = _read_text(path)
    return [
        {column: _decode_csv_cell(column, cell) for column, cell in row.items()}
        for row in csv.DictReader(io.StringIO(text, newline=""))
    ]


def _decode_csv_cell(column: str, cell: str | None) -> Any:
    """A JSON list of objects becomes that list (conversational columns); ``label`` true/false/1/0
    becomes a bool (unpaired preference). Everything else stays the exact string."""
    if cell is None:
        return None
    stripped = cell.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return cell
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return value
    if column == "label" and stripped.lower() in ("true", "false", "1", "0"):
        return stripped.lower() in ("true", "1")
    return cell


def _saved_dataset_rows(path: Path, split: str) -> list[dict]:
    if not any((path / marker).exists() for marker in _SAVED_DATASET_MARKERS):
        raise DataError(
            f"{path}: a folder must be written by datasets.save_to_disk (no "
            f"{' / '.join(_SAVED_DATASET_MARKERS)} found); for data files point 'path' at one "
            f"{', '.join(SUPPORTED_EXTENSIONS)} file"
        )
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: split {split!r} not found; available: {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded.to_list()


def _hub_rows(dataset_id: str, name: str | None, split: str, revision: str | None) -> list[dict]:
    return _hub_dataset(dataset_id, name, split, revision).to_list()


def _hub_dataset(dataset_id: str, name: str | None, split: str, revision: str | None) -> Any:
    import datasets

    kwargs = {"revision": revision} if revision else {}
    try:
        return datasets.load_dataset(dataset_id, name, split=split, **kwargs)
    except Exception as exc:  # network, auth, unknown id or split: all need the same hint
        raise DataError(
            f"hub:{dataset_id}:{split}: could not load hub dataset ({type(exc).__name__}: {exc}); "
            f"check the id, 'name', 'split' and 'revision', or point 'path' at a local file"
        ) from exc


# --------------------------------------------------------------------------------------- helpers
def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (without a byte-order mark); a byte that is not UTF-8 is a DataError
    naming its line and byte offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix(_BOM)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _not_utf8(path, data, exc.start, f"line {line}") from None


def _decode_line(raw: bytes, path: Path, offset: int, where: str) -> str:
    """One line (starting at byte ``offset`` of the file) as UTF-8; the first without a byte-order mark."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, raw, exc.start, where, offset) from None
    return text.removeprefix(_BOM) if offset == 0 else text


def _not_utf8(path: Path, raw: bytes, start: int, where: str, offset: int = 0) -> DataError:
    return DataError(f"{path}: {where}: not UTF-8: byte 0x{raw[start]:02x} at byte offset {offset + start}; "
                     "save the file as UTF-8")


def _is_local(path: str) -> bool:
    """Whether ``path`` can only mean a local file or folder (so a missing one is an error)."""
    if path.startswith(("/", "./", "../", "~", ".\\")) or "\\" in path:
        return True
    if path.lower().endswith(_LOCAL_LOOKING_SUFFIXES):
        return True
    # `data/demo/x` whose first folder exists here is a local path; `org/name` is a hub id.
    first = Path(path).parts[0] if Path(path).parts else ""
    return "/" in path and Path(first).is_dir()


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _check_objects(rows: list, label: str) -> list[dict]:
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{label}: row {index}: expected an object, got {type(row).__name__}")
    return rows


def apply_limit(rows: list[dict], limit: Any, label: str) -> list[dict]:
    if limit is None:
        return rows
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise DataError(f"{label}: 'limit' must be a non-negative int or null, got {limit!r}")
    return rows[:limit]


def _canonical_json(value: Any) -> str:
    # default=str: inline rows from YAML may hold dates etc.; str() keeps the hash deterministic.
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def _update(digest: Any, *parts: Any) -> None:
    # Length-prefix each part so ("ab", "c") and ("a", "bc") hash differently.
    for part in parts:
        encoded = _canonical_json(part).encode()
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)


def _hash_file(digest: Any, path: Path) -> None:
    digest.update(path.stat().st_size.to_bytes(8, "little"))  # delimits files within a folder
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
