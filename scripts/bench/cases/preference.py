"""The preference cases' data: generated pairs (reward and dpo share it)."""

from __future__ import annotations

from pathlib import Path

from common import write_jsonl


def prepare(spec: dict) -> dict:
    """The preference rows (data.jsonl) and the token counts of their sequences."""
    import chat_data
    from transformers import AutoTokenizer

    s = spec["settings"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows, lengths = chat_data.preference_rows(tokenizer, s["rows"], *s["row_tokens"], seed=s["seed"])
    data_file = Path(spec["workdir"]) / "data.jsonl"
    write_jsonl(data_file, rows)
    data = chat_data.length_stats([n for pair in lengths for n in pair])
    data["pairs"] = len(rows)
    return {"data_file": str(data_file), "data": data}
