"""From config to stage graph: which stages run, in what order, reading which config and inputs.

``pipeline.stages: null`` (pipeline=auto) derives the graph from ``algorithm.stages``: data_prep feeds
every stage; each training stage starts from the previous training stage's model (the first from
``model.source``). The main stage (``algorithm.kind``) reads ``algorithm``; an upstream training stage
reads ``upstream.<kind>``. With ``pipeline.eval``, eval runs on the main stage's input and output
(when that output is a policy, not a scorer). Other inputs are bound by the role a kind declares
(``registry.Input``): a derived input (DPO's reference log-probs) gets its provider inserted right before
the stage, on the same input model; any other is the latest earlier stage of the declared kind (a GRPO
stage's ``reward_model`` is the pipeline's ``reward`` stage).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from align_runner.config import stage_train
from align_runner.data.prepare import VIEWS, accepted_formats
from align_runner.data.sources import fingerprint_source
from align_runner.data.views import (
    SPLITS,
    converted_views,
    fed_views,
    is_set,
    own_views,
    shared_formats,
    view_source,
)
from align_runner.models.fingerprint import source_fingerprint
from align_runner.registry import Input, get_stage
from align_runner.stages.context import StageSpec

# the names pipeline=auto gives the eval of the main stage's input and output model
EVAL_STAGES = ("eval_before", "eval_after")


class PipelineConfigError(ValueError):
    """The pipeline graph cannot be built from this config."""


def build_graph(cfg: DictConfig) -> list[StageSpec]:
    specs = _explicit(cfg.pipeline.stages, cfg) if cfg.pipeline.stages else _auto(cfg)
    _check(specs, cfg)
    data_views(cfg, specs)
    return specs


def _auto(cfg: DictConfig) -> list[StageSpec]:
    main = str(cfg.algorithm.kind)
    if main not in cfg.algorithm.stages:
        raise PipelineConfigError(f"algorithm.stages {list(cfg.algorithm.stages)} must include algorithm.kind {main!r}")
    specs: list[StageSpec] = []
    model_from: str | None = None
    for kind in cfg.algorithm.stages:
        if kind == "data_prep":
            specs.append(StageSpec("data_prep", "data_prep", config="data"))
            continue
        stage = get_stage(kind)  # an unknown kind fails here, listing the known ones
        config = "algorithm" if kind == main else f"upstream.{kind}"
        if OmegaConf.select(cfg, config) is None:
            raise PipelineConfigError(f"stage {kind!r} runs before {main!r} but the config has no {config!r} node")
        # eval generates with the stage's output, so a scorer (reward model) gets none; and it needs
        # held-out prompts (a user's file without an eval split trains without eval stages)
        evaluate = kind == main and cfg.pipeline.eval and stage.policy and _heldout_prompts(cfg)
        if evaluate:
            specs.append(_eval_spec(EVAL_STAGES[0], model_from, specs))
        inputs = _provided(stage.inputs, specs)
        for role, inp in stage.inputs.items():
            if inp.derived is not None:
                name = _derived_stage(cfg, config, inp)
                if name is None:  # the stage's config asks for none (`algorithm.reference.stage: null`)
                    continue
                name = str(name)
                specs.append(StageSpec(name, inp.kind, config=f"{config}.{inp.derived}", model_from=model_from))
                inputs[role] = name
        specs.append(StageSpec(kind, kind, config=config, model_from=model_from, inputs=tuple(sorted(inputs.items()))))
        if stage.trains and stage.policy:
            model_from = kind
        if evaluate:
            specs.append(_eval_spec(EVAL_STAGES[1], model_from, specs))
    return specs


def _provided(declared: Mapping[str, Input], specs: list[StageSpec]) -> dict[str, str]:
    """Each declared input that is not derived, bound to the latest earlier stage of its kind (if any)."""
    inputs = {}
    for role, inp in declared.items():
        provider = next((s.name for s in reversed(specs) if s.kind == inp.kind), None) if inp.derived is None else None
        if provider is not None:
            inputs[role] = provider
    return inputs


def _eval_spec(name: str, model_from: str | None, specs: list[StageSpec]) -> StageSpec:
    """An eval stage on ``model_from``'s output, reading the pipeline's reward model when it has one."""
    inputs = _provided(get_stage("eval").inputs, specs)
    return StageSpec(name, "eval", config="eval", model_from=model_from, inputs=tuple(sorted(inputs.items())))


def _explicit(stages: Any, cfg: DictConfig) -> list[StageSpec]:
    specs = []
    for s in stages:
        inputs = dict(s.inputs or {})
        for role, inp in get_stage(s.kind).inputs.items():
            if inp.derived is not None and role not in inputs:  # named in the stage's config, as in auto
                name = _derived_stage(cfg, s.config, inp)
                if name is not None:
                    inputs[role] = str(name)
        specs.append(StageSpec(s.name, s.kind, config=s.config, model_from=s.model_from, inputs=tuple(sorted(inputs.items()))))
    return specs


def _derived_stage(cfg: DictConfig, config: str, inp: Input) -> Any:
    """The name a stage's config gives the provider of a derived input (``algorithm.reference.stage``)."""
    return OmegaConf.select(cfg, f"{config}.{inp.derived}.stage")


def _check(specs: list[StageSpec], cfg: DictConfig) -> None:
    names = [s.name for s in specs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise PipelineConfigError(f"stage names must be unique; repeated: {sorted(dupes)}")
    if not specs or specs[0].kind != "data_prep":
        raise PipelineConfigError(f"the first stage must be data_prep; got {names}")
    earlier: dict[str, StageSpec] = {}
    for s in specs:
        kind = get_stage(s.kind)  # an unknown kind fails here, listing the known ones
        if s.model_from is not None:
            if s.model_from not in earlier:
                raise PipelineConfigError(f"stage {s.name!r}: model_from {s.model_from!r} is not an earlier stage of {names}")
            if not get_stage(earlier[s.model_from].kind).trains:
                raise PipelineConfigError(f"stage {s.name!r}: model_from {s.model_from!r} produces no model")
        if OmegaConf.select(cfg, s.config) is None:
            raise PipelineConfigError(f"stage {s.name!r}: config node {s.config!r} does not exist")
        _check_inputs(s, kind.inputs, earlier)
        if kind.check is not None:
            kind.check(cfg, s)
        earlier[s.name] = s


def _check_inputs(spec: StageSpec, declared: Mapping[str, Input], earlier: dict[str, StageSpec]) -> None:
    """Every bound input is declared and provided by an earlier stage of the declared kind; every
    required one is bound; a derived one runs on the same input model as ``spec``."""
    bound = dict(spec.inputs)
    for role in bound.keys() - declared.keys():
        raise PipelineConfigError(
            f"stage {spec.name!r} ({spec.kind}) has no input {role!r}; it reads: {sorted(declared) or 'none'}"
        )
    for role, inp in declared.items():
        name = bound.get(role)
        if name is None:
            if inp.required:
                raise PipelineConfigError(
                    f"stage {spec.name!r} ({spec.kind}) needs a {role!r} input from an earlier stage of kind {inp.kind!r}"
                )
            continue
        provider = earlier.get(name)
        if provider is None or provider.kind != inp.kind or (inp.derived and provider.model_from != spec.model_from):
            same_model = f" with model_from {spec.model_from!r}" if inp.derived else ""
            where = f" ({spec.config}.{inp.derived}.stage)" if inp.derived else ""
            raise PipelineConfigError(
                f"stage {spec.name!r} reads {inp.what or f'its {role!r} input'} from stage {name!r}{where}, which "
                f"must be an earlier stage of kind {inp.kind!r}{same_model}"
            )


def data_views(cfg: DictConfig, specs: list[StageSpec]) -> list[str]:
    """The views data_prep builds.

    A view's own source (``data.<view>``): every view the data config defines, not only those this
    pipeline reads, so that pipelines of different algorithms over the same data share one data_prep
    stage, and with it every stage after it (`algorithm=sft` then `algorithm=dpo` reuse the SFT).
    The shared sources (``data.train`` / ``data.eval``, one file for every view): the views the
    pipeline reads that their format can feed, so a large file is converted only for what runs.
    A stage's first view is required: a pipeline whose stage reads a view nothing feeds is a config
    error naming the view (and the shared file's format).
    """
    data, formats = _data_sources(cfg)
    read = {v for s in specs for v in get_stage(s.kind).views}
    shared = [v for v in fed_views(formats) if v in read]
    own = own_views(data)
    converted = [v for v in converted_views(data) if v in read]  # built only for a pipeline reading it
    built = [v for v in VIEWS if v in own or v in shared or v in converted]
    required = {s.name: get_stage(s.kind).views[0] for s in specs if get_stage(s.kind).views}
    for view in dict.fromkeys(required.values()):
        if view not in built:
            raise PipelineConfigError(_unfed(cfg, [n for n, v in required.items() if v == view], view, formats))
    return built


def _unfed(cfg: DictConfig, stages: list[str], view: str, formats: Mapping[str, tuple[Any, str]]) -> str:
    if not formats:
        configured = own_views(OmegaConf.to_container(cfg.data, resolve=True))
        return f"stage {stages[0]!r} reads data.{view}, which data={cfg.data.name} does not define (it defines: {configured})"
    names = ", ".join(map(repr, stages))
    where = f"stage {names} reads the {view!r} view" if len(stages) == 1 else f"stages {names} read the {view!r} view"
    files = " and ".join(f"data.{split} ({label}) holds {fmt} data" for split, (fmt, label) in formats.items())
    return f"{where}, but {files}, which cannot feed it; {view!r} takes: {accepted_formats(view)}"


def _data_sources(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, tuple[Any, str]]]:
    """The resolved data config and the format of each shared source (read from its first row)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data, dict)
    if data.get("train") is not None and not is_set(data["train"]) and not own_views(data):
        raise PipelineConfigError(
            f"data.train.path is not set: data={cfg.data.name} reads rows from data.train.path=<a jsonl / json / "
            "parquet / csv file, a save_to_disk folder or a hub dataset id>"
        )
    return data, shared_formats(data)


def _heldout_prompts(cfg: DictConfig) -> bool:
    """Whether some source feeds the prompt view's eval split (what the eval stages generate on)."""
    data, formats = _data_sources(cfg)
    return view_source(data, "prompt", "eval", formats) is not None


def stage_config(cfg: DictConfig, spec: StageSpec, views: list[str]) -> dict[str, Any]:
    """The part of the resolved config a stage reads — what its key hashes (DESIGN §3)."""
    section = OmegaConf.to_container(OmegaConf.select(cfg, spec.config), resolve=True)
    assert isinstance(section, Mapping)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("name", None)
    # a local base model enters by its content, not its path: the same checkpoint anywhere, one key
    model["source"] = source_fingerprint(model["source"], cache_dir=cfg.paths.cache)
    if spec.kind == "data_prep":
        # Sources enter the key through their content fingerprint, not their path, so the same files
        # in another checkout share the cache. The tokenizer comes from the base model.
        data = {k: v for k, v in section.items() if k not in (*VIEWS, *SPLITS)}
        out = {"data": data, "tokenizer": model["source"], "views": views}
        shared = {split: fingerprint_source(section[split]) for split in SPLITS if is_set(section.get(split))}
        if shared:  # only when set: the per-view sources (the demo's) enter through the runner's data fingerprint
            out["shared_sources"] = shared
        return out
    out: dict[str, Any] = {"section": section, "model": model}
    if get_stage(spec.kind).trains:
        train = OmegaConf.to_container(stage_train(cfg, OmegaConf.select(cfg, spec.config)), resolve=True)
        out["train"] = train
        out["section"] = {k: v for k, v in section.items() if k != "train"}
        # numerics and the effective batch depend on these; the backend's name does not
        out["hardware"] = {"precision": str(cfg.hardware.precision), "num_processes": int(cfg.hardware.num_processes) * int(cfg.hardware.num_nodes)}
    else:
        # model outputs (reference log-probs, generations) depend on the precision they run in
        out["hardware"] = {"precision": str(cfg.hardware.precision)}
    return out
