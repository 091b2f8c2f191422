"""data_prep: read every configured source, validate, convert, tokenize, mask and length-filter it once.

Output: ``data/<view>-<split>.jsonl`` per view ("sft", "preference", "prompt") and split ("train",
"eval"), plus the kept/truncated/dropped counts in the manifest. Later stages read these files through
``StageContext.dataset``; none of them tokenizes again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from align_runner.data.prepare import prepare_rows
from align_runner.data.sources import load_rows
from align_runner.registry import register_stage
from align_runner.stages.context import StageContext

log = logging.getLogger("align_runner")

VIEWS = ("sft", "preference", "prompt")
SPLITS = ("train", "eval")


def prepared_path(stage_dir: Path, view: str, split: str) -> Path:
    return Path(stage_dir) / "data" / f"{view}-{split}.jsonl"


def load_prepared(stage_dir: Path, view: str, split: str) -> list[dict]:
    path = prepared_path(stage_dir, view, split)
    if not path.exists():
        have = sorted(p.stem for p in (Path(stage_dir) / "data").glob("*.jsonl"))
        raise FileNotFoundError(
            f"data_prep produced no {view!r} rows for split {split!r} (have: {have}); "
            f"configure data.{view}.{split} in the data config"
        )
    with path.open() as f:
        return [json.loads(line) for line in f]


@register_stage("data_prep", trains=False, key_metrics=("sft/train/kept", "preference/train/kept", "prompt/eval/kept"))
def run_data_prep(ctx: StageContext) -> dict[str, float]:
    data = ctx.cfg.data
    tokenizer = ctx.tokenizer()
    metrics: dict[str, float] = {}
    for view in ctx.params["views"]:
        view_cfg = data[view]
        for split in SPLITS:
            source = view_cfg.get(split)
            if source is None:
                continue
            rows, label = load_rows(OmegaConf.to_container(source, resolve=True))
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
                progress=ctx.is_main and ctx.train.progress,
            )
            log.info(
                "data_prep %s/%s from %s: %d rows, kept %d, truncated %d, dropped %d",
                view, split, label, stats.total, stats.kept, stats.truncated, stats.dropped,
            )
            for k, v in stats.as_dict().items():
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
