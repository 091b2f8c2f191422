"""Runs a pipeline: plan keys, reuse finished stages, compute the rest, write the run manifest.

Every process of a distributed job runs this; all agree on the plan (keys are pure functions of the
config). Only the main process writes to the store and the run dir.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import align_runner
from align_runner.engine.backend import get_backend
from align_runner.engine.checkpoint import seed_everything
from align_runner.engine.trackers import RunTracker, job_identity
from align_runner.fsutil import atomic_write_json, disk_error_message, os_error
from align_runner.pipeline.graph import build_graph, data_views, stage_config
from align_runner.pipeline.keys import stage_key
from align_runner.pipeline.rundir import RUN_MANIFEST, link_stage
from align_runner.pipeline.store import StageStore, StoreError
from align_runner.redact import redact
from align_runner.registry import get_stage
from align_runner.stages.context import StageContext, StageSpec

log = logging.getLogger("align_runner")


@dataclass
class PlannedStage:
    spec: StageSpec
    key: str
    config: dict[str, Any]
    upstream: dict[str, str]
    cached: bool
    forced: bool


@dataclass
class StageRecord:
    name: str
    kind: str
    key: str
    dir: str
    cache_hit: bool
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RunResult:
    run_dir: Path
    stages: list[StageRecord]
    objective: float | None

    def stage(self, name: str) -> StageRecord:
        return next(s for s in self.stages if s.name == name)


def data_fingerprint(cfg: DictConfig, views: list[str]) -> str:
    from align_runner.data.sources import fingerprint_source
    from align_runner.data.views import CONVERTED_FROM
    from align_runner.pipeline.keys import canonical_json

    prints = {}
    for view in views:
        # a converted view (KTO's unpaired rows from the pairs) is as new as its source view's files
        view_cfg = cfg.data.get(view) if view in cfg.data else cfg.data.get(CONVERTED_FROM.get(view, ""))
        for split in ("train", "eval"):
            src = view_cfg.get(split) if view_cfg is not None else None
            if src is not None:
                prints[f"{view}/{split}"] = fingerprint_source(OmegaConf.to_container(src, resolve=True))
    return canonical_json(prints)


def plan(cfg: DictConfig, store: StageStore) -> list[PlannedStage]:
    """Keys and cache state of every stage, without loading anything (each data file read once)."""
    from align_runner.data.sources import fingerprints_memoized

    with fingerprints_memoized():
        return _plan(cfg, store)


def _plan(cfg: DictConfig, store: StageStore) -> list[PlannedStage]:
    specs = build_graph(cfg)
    views = data_views(cfg, specs)
    force = set(cfg.pipeline.force)
    unknown = force - {s.name for s in specs} - {s.kind for s in specs}
    if unknown:
        raise ValueError(f"pipeline.force names {sorted(unknown)}, which are not stages of this pipeline: {[s.name for s in specs]}")
    keys: dict[str, str] = {}
    planned: list[PlannedStage] = []
    for spec in specs:
        upstream = {role: keys[name] for role, name in input_stages(spec).items()}
        if "data" in upstream:
            upstream["data"] = _data_key(cfg, specs[0], [v for v in views if v in get_stage(spec.kind).views])
        config = stage_config(cfg, spec, views)
        key = _key(cfg, spec, config, upstream, views)
        keys[spec.name] = key
        forced = spec.name in force or spec.kind in force
        planned.append(PlannedStage(spec, key, config, upstream, store.is_done(spec.kind, key) and not forced, forced))
    return planned


def _key(cfg: DictConfig, spec: StageSpec, config: dict[str, Any], upstream: dict[str, str], views: list[str]) -> str:
    return stage_key(
        kind=spec.kind,
        config=config,
        upstream=upstream,
        data_fingerprint=data_fingerprint(cfg, views) if spec.kind == "data_prep" else None,
        seed=int(cfg.seed),
    )


def _data_key(cfg: DictConfig, data_prep: StageSpec, views: list[str]) -> str:
    """What a stage's data enters its key as: the key of a data_prep that builds only the views the
    stage reads. So a stage is not recomputed when a view it never reads changes (new preference data
    leaves the SFT stage cached), while data_prep itself, which builds every view, is."""
    return _key(cfg, data_prep, stage_config(cfg, data_prep, views), {}, views)


def input_stages(spec: StageSpec) -> dict[str, str]:
    """role -> name of every stage ``spec`` reads: its data, its starting model, its declared inputs."""
    roles = {} if spec.kind == "data_prep" else {"data": "data_prep"}
    if spec.model_from is not None:
        roles["model"] = spec.model_from
    return {**roles, **dict(spec.inputs)}


def run_pipeline(cfg: DictConfig, run_dir: Path) -> RunResult:
    run_dir = Path(run_dir)
    store = StageStore(cfg.paths.store)
    stages = plan(cfg, store)
    backend = get_backend(cfg.hardware)
    _check_ranks_agree(backend, stages)
    if backend.is_main:
        with _disk_errors("run dir", run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(redact(resolved)))
    tracker = _open_tracker(cfg, run_dir, stages) if backend.is_main else None
    try:
        records, sharding = _run_stages(cfg, stages, store, backend, run_dir, tracker)
    except BaseException:
        if tracker is not None:
            tracker.close(failed=True)
        raise
    if tracker is not None:
        tracker.close()
    objective = _objective(cfg, records)
    if backend.is_main:
        with _disk_errors("run dir", run_dir):
            main = next((p.spec.name for p in stages if p.spec.config == "algorithm"), None)
            manifest = _run_manifest(cfg, records, objective, backend, sharding, main)
            atomic_write_json(run_dir / RUN_MANIFEST, redact(manifest))
        try:
            from align_runner.report import write_report  # the report sits above the pipeline layer

            write_report(run_dir)
        except Exception:  # a report bug must never fail a run whose stages all finished
            log.warning("could not write the run report in %s", run_dir, exc_info=True)
    return RunResult(run_dir, records, objective)


def _open_tracker(cfg: DictConfig, run_dir: Path, stages: list[PlannedStage]) -> RunTracker | None:
    """The job's one tracker run (none without tracking.backends): the resolved config and every
    stage's key as its hyperparameters; named and grouped from the Hydra job (a sweep's jobs together)."""
    tr = cfg.tracking
    if not tr.backends:
        return None
    name, group = job_identity(run_dir.name)
    return RunTracker(
        run_dir,
        backends=list(tr.backends),
        project=tr.project,
        run_name=tr.run_name or name,
        group=tr.group or group,
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        stage_keys={p.spec.name: p.key for p in stages},
        api_key=tr.get("api_key"),
    )


def _run_stages(cfg, stages: list[PlannedStage], store: StageStore, backend, run_dir: Path, tracker: RunTracker | None):
    """Reuse or compute each stage in order: (their records, the backend evidence of the last trained model)."""
    base_model: str | None = None
    dirs: dict[str, Path] = {}
    records: list[StageRecord] = []
    sharding: dict[str, Any] = {}
    for p in stages:
        t0 = time.perf_counter()
        stage_dir = store.stage_dir(p.spec.kind, p.key)
        hit = store.is_done(p.spec.kind, p.key) and not p.forced
        if hit:
            log.info("stage %-12s %s  cache hit (%s)", p.spec.name, p.key[:12], stage_dir)
            metrics = store.manifest(p.spec.kind, p.key)["metrics"]
            if backend.is_main:
                store.tidy(p.spec.kind, p.key)
        else:
            if base_model is None:
                base_model = _resolve_base_model(cfg, backend)
            with _disk_errors(f"stage {p.spec.name!r}", stage_dir):
                metrics, hit, evidence = _compute(cfg, p, store, backend, dirs, base_model, run_dir, tracker)
            # run.json shows what the backend did to the last trained model (its policy's wrapping)
            sharding = next(iter(evidence.values()), sharding)
        dirs[p.spec.name] = stage_dir
        records.append(StageRecord(p.spec.name, p.spec.kind, p.key, str(stage_dir), hit, time.perf_counter() - t0, metrics))
        if tracker is not None:
            tracker.log_stage(p.spec.name, stage_dir, metrics, cached=hit)
        if backend.is_main:
            with _disk_errors("run dir", run_dir):
                link_stage(run_dir, p.spec.name, stage_dir)
    return records, sharding


@contextlib.contextmanager
def _disk_errors(where: str, path: Path) -> Iterator[None]:
    """A full disk or a read-only / forbidden path becomes a one-line StoreError naming the path and
    the cause; every other error passes as it is."""
    try:
        yield
    except Exception as e:
        wrapped = os_error(e)
        message = None if wrapped is None else disk_error_message(wrapped, where, path)
        if message is None:
            raise
        raise StoreError(message) from e


def _compute(cfg, p: PlannedStage, store: StageStore, backend, dirs, base_model, run_dir, tracker: RunTracker | None):
    """Compute one stage under the store lock: (its metrics, whether another job made them, the backend
    evidence of each model it trained)."""
    timeout = cfg.pipeline.get("lock_timeout")
    locked = store.computing(p.spec.kind, p.key, stage=p.spec.name, timeout=timeout) if backend.is_main else contextlib.nullcontext()
    with locked:
        # a parallel sweep job may have finished it while we waited for the lock
        if store.is_done(p.spec.kind, p.key) and not p.forced:
            log.info("stage %-12s %s  computed by another job meanwhile; reusing", p.spec.name, p.key[:12])
            return store.manifest(p.spec.kind, p.key)["metrics"], True, {}
        log.info("stage %-12s %s  computing", p.spec.name, p.key[:12])
        out_dir = store.begin(p.spec.kind, p.key, force=p.forced) if backend.is_main else store.stage_dir(p.spec.kind, p.key)
        backend.barrier()
        params = {"views": p.config["views"]} if p.spec.kind == "data_prep" else {}
        ctx = StageContext(
            cfg=cfg,
            spec=p.spec,
            key=p.key,
            out_dir=out_dir,
            backend=backend,
            inputs={role: dirs[name] for role, name in input_stages(p.spec).items()},
            base_model=base_model,
            run_name=run_dir.name,
            params=params,
            run_tracker=tracker,
        )
        t0 = time.perf_counter()
        # same seed on every rank: random inits (adapters, heads) must agree before sharding/DDP
        seed_everything(int(cfg.seed))
        try:
            metrics = {k: float(v) for k, v in (get_stage(p.spec.kind).fn(ctx) or {}).items()}
        finally:
            backend.release()  # this stage's models and optimizers: the next stage or sweep job needs the memory
        evidence = {name: e for engine in ctx.engines for name, e in engine.evidence.items()}
        backend.barrier()
        if backend.is_main:
            store.finish(
                p.spec.kind,
                p.key,
                {
                    "name": p.spec.name,
                    "kind": p.spec.kind,
                    "key": p.key,
                    "upstream": p.upstream,
                    "config": redact(p.config),
                    "metrics": metrics,
                    "sharding": evidence,
                    "seconds": time.perf_counter() - t0,
                    "align_runner": align_runner.__version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )
        backend.barrier()
        return metrics, False, evidence


def _check_ranks_agree(backend, stages: list[PlannedStage]) -> None:
    """Every process must compute the same stage keys, or they would write and read different dirs."""
    keys = [(p.spec.name, p.key) for p in stages]
    main = backend.broadcast_object(keys)
    if main != keys:
        raise RuntimeError(f"rank {backend.rank} planned stage keys {keys} but rank 0 planned {main}")


def _resolve_base_model(cfg: DictConfig, backend) -> str:
    from align_runner.models.loading import check_reachable, resolve_source

    # one process builds / converts into the cache; the others then find it there
    with backend.main_first():
        source = resolve_source(cfg.model.source, cache_dir=str(cfg.paths.cache))
        check_reachable(source)
        return source


def _objective(cfg: DictConfig, records: list[StageRecord]) -> float | None:
    stage, _, metric = str(cfg.pipeline.objective).partition("/")
    rec = next((r for r in records if r.name == stage), None)
    return None if rec is None else rec.metrics.get(metric)


def _git_sha() -> str | None:
    try:
        root = Path(align_runner.__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _run_manifest(
    cfg: DictConfig, records: list[StageRecord], objective: float | None, backend, sharding: dict[str, Any],
    main_stage: str | None = None,
) -> dict[str, Any]:
    import transformers

    return {
        "stages": [r.__dict__ for r in records],
        "objective": {"name": cfg.pipeline.objective, "value": objective, "direction": str(cfg.pipeline.direction)},
        # the stage of algorithm.kind (its key metrics head a sweep summary's columns)
        "main_stage": main_stage,
        "versions": {
            "align_runner": align_runner.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "git_sha": _git_sha(),
        "hardware": {**OmegaConf.to_container(cfg.hardware, resolve=True), **backend.describe(), "sharding": sharding},
        "host": platform.node(),
        "pid": os.getpid(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
