"""``pipeline.dry_run=true``: the plan — stages, keys, cache state, world size, backend — with no weights loaded."""

from __future__ import annotations

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from align_runner.pipeline.runner import plan
from align_runner.pipeline.store import StageStore


def print_plan(cfg: DictConfig) -> None:
    hw = cfg.hardware
    table = Table(title="align_runner plan (dry run: nothing loaded)", title_justify="left")
    for col in ("stage", "kind", "starts from", "config", "key", "state"):
        table.add_column(col)
    for p in plan(cfg, StageStore(cfg.paths.store)):
        state = "forced" if p.forced else ("cached" if p.cached else "to compute")
        table.add_row(p.spec.name, p.spec.kind, p.spec.model_from or "-", p.spec.config, p.key[:12], state)
    console = Console()
    console.print(table)
    console.print(
        f"hardware={hw.name}: {hw.num_processes * hw.num_nodes} process(es), backend {hw.backend}, "
        f"{hw.device}, precision {hw.precision}"
    )
