"""data_prep: read every configured source, validate, convert, tokenize, mask and length-filter it once.

Output: ``data/<view>-<split>.jsonl`` per view ("sft", "preference", "prompt") and split ("train",
"eval"), plus the row counts in the manifest: ``<view>/<split>/rows`` (in the source), ``limited``
(cut by its ``limit``), ``total`` (prepared), ``kept``, ``truncated`` and ``dropped`` (over the length
limits, or left with nothing to learn from), each of the last two also by reason
(``dropped/prompt_too_long``, ``truncated/too_long``: ``prepare.REASONS``). A split that filtering
empties, or that loses more than ``data.max_dropped_share`` of its rows, is a DataError raised before
the stage finishes, so it never gets DONE. Each view's source is its own ``data.<view>.<split>`` or
the shared ``data.<split>`` (``align_runner.data.views``). Later stages read these files through
``StageContext.dataset``; none of them tokenizes again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from align_runner.data.prepare import REASONS, VIEWS, check_kept, prepare_rows
from align_runner.data.prepared import prepared_path
from align_runner.data.sources import apply_limit, load_rows
from align_runner.data.views import SPLITS, shared_formats, view_source
from align_runner.registry import register_stage
from align_runner.stages.context import StageContext

log = logging.getLogger("align_runner")


def prepared_metrics(cfg, spec) -> list[str]:
    """``<view>/<split>/<count>`` for every view and split data_prep may build (``PrepStats.as_dict``
    and the row counts ``run_data_prep`` adds)."""
    counts = ["rows", "limited", "total", "kept", "truncated", "dropped"]
    counts += [f"{what}/{reason}" for what in ("dropped", "truncated") for reason in REASONS]
    return [f"{view}/{split}/{c}" for view in VIEWS for split in SPLITS for c in counts]


@register_stage(
    "data_prep",
    trains=False,
    key_metrics=("sft/train/kept", "preference/train/kept", "prompt/eval/kept"),
    metrics=prepared_metrics,
)
def run_data_prep(ctx: StageContext) -> dict[str, float]:
    data = ctx.cfg.data
    sources = OmegaConf.to_container(data, resolve=True)
    formats = shared_formats(sources)
    tokenizer = ctx.tokenizer()
    metrics: dict[str, float] = {}
    loaded: dict[str, tuple[list[dict], str]] = {}  # a shared source feeds several views: read it once
    for view in ctx.params["views"]:
        for split in SPLITS:
            source = view_source(sources, view, split, formats)
            if source is None:
                continue
            key = json.dumps(source, sort_keys=True, default=str)
            if key not in loaded:
                loaded[key] = load_rows({**source, "limit": None})
            everything, label = loaded[key]
            rows = apply_limit(everything, source.get("limit"), label)
            prepared, stats = prepare_rows(
                rows,
                label,
                view,
                tokenizer,
                max_length=data.max_length,
                max_prompt_length=data.max_prompt_length,
                truncation=str(data.truncation),
                completion_only_loss=data.completion_only_loss,
                assistant_only_loss=data.assistant_only_loss,
                chat_template=data.chat_template,
                progress=ctx.is_main and bool(ctx.cfg.train.progress),  # data.train is a source here, not train settings
            )
            counts = {"rows": len(everything), "limited": len(everything) - len(rows), **stats.as_dict()}
            log.info("data_prep %s/%s from %s: %s", view, split, label, ", ".join(f"{k} {v}" for k, v in counts.items()))
            check_kept(counts, label, view, split, float(data.max_dropped_share))
            for k, v in counts.items():
                metrics[f"{view}/{split}/{k}"] = v
            if ctx.is_main:
                _write_jsonl(prepared_path(ctx.out_dir, view, split), prepared)
    return metrics


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
