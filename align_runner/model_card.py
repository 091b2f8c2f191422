"""The model card (``README.md``) of an export: hub metadata, how to load it, metrics and the recipe.

Built only from files a finished run leaves behind: the stage's ``manifest.json`` and, when exported
from a run, ``run.json``, ``config.yaml`` and Hydra's recorded overrides. Every config value passes
through ``redact`` and the whole text through ``redact_text``, so no secret reaches the card.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from align_runner.redact import MASK, redact, redact_text

if TYPE_CHECKING:
    from align_runner.export import Source

# sections of the run's config that make its recipe (paths, tracking and pipeline switches do not)
RECIPE = ("seed", "model", "data", "upstream", "algorithm", "train", "eval", "hardware")
_HUB_SOURCE = "align_runner.models.loading.hub_or_local"


def model_card(src: Source, *, adapter_base: str | None, location: str) -> str:
    """Card text for the export of ``src``; ``adapter_base``: the exported adapter's base (None for a full
    model); ``location``: the hub repo id or the export's folder, for the loading snippet."""
    from align_runner.registry import get_stage

    m = src.manifest
    policy = get_stage(m["kind"]).policy
    parts = [
        _front_matter(src, adapter_base, policy),
        f"# {Path(location).name}",
        _intro(src, adapter_base),
        "## Use\n\n" + _usage(location, adapter_base, policy),
        "## Metrics\n\n" + _metrics(src),
        "## Recipe\n\n" + _recipe(src),
    ]
    return redact_text("\n\n".join(parts) + "\n")


def hub_origin(src: Source) -> str | None:
    """The hub id the run's base model came from, when ``model.source`` named one."""
    from align_runner.models.loading import _HUB_ID

    source = ((src.manifest.get("config") or {}).get("model") or {}).get("source") or {}
    name = str(source.get("name_or_path") or "")
    if source.get("_target_") == _HUB_SOURCE and _HUB_ID.match(name) and not Path(name).expanduser().exists():
        return name
    return None


def _algorithm(src: Source) -> str:
    return str(((src.manifest.get("config") or {}).get("section") or {}).get("name") or src.manifest["kind"])


def _front_matter(src: Source, adapter_base: str | None, policy: bool) -> str:
    kind, algorithm = src.manifest["kind"], _algorithm(src)
    tags = ["align_runner", kind, *([algorithm] if algorithm != kind else []), *(["lora"] if adapter_base else [])]
    # the hub's base_model must be a hub id: the run's hub model for a full model, the adapter's own base
    # for an adapter (a local base, copied into base/, has none)
    if adapter_base is None:
        base = hub_origin(src)
    else:
        base = None if Path(adapter_base).is_absolute() else adapter_base
    meta: dict[str, Any] = {"base_model": base} if base else {}
    meta |= {
        "library_name": "peft" if adapter_base else "transformers",
        "pipeline_tag": "text-generation" if policy else "text-classification",
        "tags": tags,
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---"


def _intro(src: Source, adapter_base: str | None) -> str:
    m = src.manifest
    what = "A LoRA adapter" if adapter_base else "A model"
    run = f" of run `{src.run_dir.name}`" if src.run_dir else ""
    lines = [
        f"{what} trained with align_runner {m.get('align_runner', '')}: stage `{m['name']}` (kind `{m['kind']}`, "
        f"algorithm `{_algorithm(src)}`, key `{str(m['key'])[:12]}`){run}.",
        "",
        f"Base model: {_base_text(src, adapter_base)}",
    ]
    return "\n".join(lines)


def _base_text(src: Source, adapter_base: str | None) -> str:
    source = ((src.manifest.get("config") or {}).get("model") or {}).get("source") or {}
    origin = f"`model.source`: `{yaml.safe_dump(redact(source), default_flow_style=True, sort_keys=True, width=10**6).strip()}`"
    if adapter_base is None:
        return origin + "."
    if not Path(adapter_base).is_absolute():
        return f"the adapter applies to the hub model `{adapter_base}` ({origin})."
    upstream = " (the merged model of the stage this one started from)" if (src.manifest.get("upstream") or {}).get("model") else ""
    return (
        f"the adapter applies to a local model{upstream}, not on the hub ({origin}). It is copied into `base/` "
        f"and `adapter_config.json` points at it by absolute path (`{adapter_base}`), so the adapter loads from "
        "any working directory; after moving this folder, load the base from its new `base/` as shown below."
    )


def _usage(location: str, adapter_base: str | None, policy: bool) -> str:
    if adapter_base is not None:
        code = [
            "from peft import AutoPeftModelForCausalLM, PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{location}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
        ]
        if Path(adapter_base).is_absolute():
            code += [
                "# after moving the folder (or from the hub): the base is in its base/ subfolder",
                f'base = AutoModelForCausalLM.from_pretrained("{location}", subfolder="base")',
                f'model = PeftModel.from_pretrained(base, "{location}")',
            ]
    elif policy:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{location}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
            'prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],',
            "                                       add_generation_prompt=True, return_tensors=\"pt\")",
            "print(tokenizer.decode(model.generate(prompt)[0]))",
        ]
    else:
        code = [
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            "# a reward model: the logit (num_labels=1) at the last real token is the reward",
            f'model = AutoModelForSequenceClassification.from_pretrained("{location}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
        ]
    return "```python\n" + "\n".join(code) + "\n```"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _metrics(src: Source) -> str:
    m = src.manifest
    rows = [f"Final metrics of `{m['name']}`:", "", "| metric | value |", "|---|---|"]
    rows += [f"| {k} | {_fmt(v)} |" for k, v in sorted((m.get("metrics") or {}).items())]
    objective = (src.run or {}).get("objective") or {}
    if objective.get("value") is not None:
        rows += ["", f"Run objective `{objective['name']}` = {_fmt(objective['value'])}."]
    return "\n".join(rows)


def _recipe(src: Source) -> str:
    parts = []
    overrides = src.overrides
    if overrides is not None:
        parts.append("Command:\n\n```bash\n" + " ".join(["python -m align_runner", *map(_masked, overrides)]) + "\n```")
    if src.run:
        parts.append("Stages:\n\n" + _stage_table(src.run.get("stages", [])))
        run = src.run
        versions = ", ".join(f"{k} {v}" for k, v in sorted((run.get("versions") or {}).items()))
        parts.append(f"Versions: {versions}; git sha: {run.get('git_sha') or 'n/a'}; "
                     f"hardware: {(run.get('hardware') or {}).get('name', 'n/a')}.")
    config = _recipe_config(src)
    what = "The run's resolved config (its recipe sections)" if src.config else "The stage's config (what its key hashes)"
    parts.append(f"{what}:\n\n```yaml\n" + yaml.safe_dump(redact(config), sort_keys=False).rstrip() + "\n```")
    return "\n\n".join(parts)


def _stage_table(stages: list[dict[str, Any]]) -> str:
    from align_runner.registry import get_stage

    rows = ["| stage | kind | key | cache | metrics |", "|---|---|---|---|---|"]
    for s in stages:
        metrics = s.get("metrics") or {}
        try:
            shown = get_stage(s["kind"]).key_metrics
        except KeyError:
            shown = ()
        shown = [k for k in shown or sorted(metrics)[:4] if k in metrics]
        text = ", ".join(f"{k}={_fmt(metrics[k])}" for k in shown)
        rows.append(f"| {s['name']} | {s['kind']} | `{str(s['key'])[:12]}` | {'hit' if s.get('cache_hit') else 'computed'} | {text} |")
    return "\n".join(rows)


def _recipe_config(src: Source) -> dict[str, Any]:
    """The recipe sections of the run's config (of the stage's, exported from the store), without the
    keys left unset (null): the card shows what was chosen."""
    if not src.config:
        return _set_keys({k: v for k, v in src.manifest.items() if k in ("config", "upstream")})
    stages = (src.run or {}).get("stages", [])
    main = (src.config.get("algorithm") or {}).get("kind")
    config = {k: src.config[k] for k in RECIPE if k in src.config}
    # upstream.<kind> configures a stage of that kind that runs before the main one, when there is one
    config["upstream"] = {k: v for k, v in (config.get("upstream") or {}).items()
                          if any(s["kind"] == k and s["name"] != main for s in stages)}
    if not any(s["kind"] == "eval" for s in stages):
        config.pop("eval", None)
    return _set_keys(config)


def _set_keys(node: Any) -> Any:
    if isinstance(node, dict):
        kept = {k: _set_keys(v) for k, v in node.items() if v is not None}
        return {k: v for k, v in kept.items() if v != {}}
    return node


def _masked(override: str) -> str:
    """An override with its value masked when its key names a secret (``tracking.api_key=...``)."""
    key, sep, value = override.partition("=")
    if not sep:
        return override
    leaf = key.lstrip("+~").rsplit(".", 1)[-1]
    return f"{key}={MASK}" if redact({leaf: value})[leaf] == MASK else override
