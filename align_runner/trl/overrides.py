"""TRL field values -> the Hydra overrides of the same training (pure functions, no I/O).

The CLI flags and the Python trainers both end here, so the same training asked for either way is
the same override list, hence the same stage keys. The pipeline is the data prep and the trainer's
own stage (TRL trains the model it is given: no SFT before DPO, no demo eval after); DPO's reference
log-probs stage is inserted by pipeline=auto.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

from align_runner.trl.fields import DPO_LOSSES, SKIP, fields_for
from align_runner.validate import CONF_DIR, ConfigError

# the metric each trainer's run returns as its objective (a metric its stage reports)
OBJECTIVE = {"sft": "loss", "dpo": "loss", "reward": "loss", "grpo": "reward", "kto": "loss"}
DPO = "align_runner.algos.dpo."
# TRL's DPO loss_type names whose loss reads no reference (alone, the pipeline inserts no ref_logps stage)
REFERENCE_FREE = {"sft"}
# the keys of algorithm/dpo.yaml's loss node
_DPO_FILE_KEYS = ("_target_", "_partial_", "beta", "label_smoothing")


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (strings quoted unless they are safe bare)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_/.~][\w./:@+~-]*", text) and text not in ("true", "false", "null"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_values(kind: str, values: Mapping[str, Any], where: str) -> None:
    """Every name is a field of ``kind``; fixed fields are at their default; choices are respected."""
    table = fields_for(kind)
    for name, value in values.items():
        row = table.get(name)
        if row is None:
            close = difflib.get_close_matches(name, table, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: {name!r} is not supported by align_runner's {kind} trainer (a TRL field it does not "
                f"implement, or a typo).{hint} Supported fields: see `align-runner {kind} --help`"
            )
        default = row.default_for(kind)
        if row.fixed and value != default:
            raise ConfigError(f"{where}: {name}={value!r} is not supported; align_runner accepts only {default!r} ({row.note or 'what it always does'})")
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items if row.choices else ():
            if item not in row.choices:
                raise ConfigError(f"{where}: {name}={value!r}: expected one of {', '.join(map(str, row.choices))}")


def build(
    kind: str,
    values: Mapping[str, Any],
    *,
    model: str,
    train: Mapping[str, Any],
    eval: Mapping[str, Any] | None = None,
    rewards: Sequence[tuple[str, dict]] = (),
    n_prompts: int | None = None,
    world: int = 1,
) -> list[str]:
    """The override list for ``values`` (every field of ``kind``, at TRL's default unless set).

    ``model``: a local directory or hub id; ``train`` / ``eval``: data sources (path, name, split);
    ``rewards``: GRPO's (name, _target_ node) pairs in order; ``n_prompts``: GRPO's prompt count
    (needed when training by epochs); ``world``: processes (GRPO's batch arithmetic)."""
    v = dict(values)
    out = [f"algorithm={kind}", f"algorithm.stages=[data_prep,{kind}]", "pipeline.eval=false",
           f"pipeline.objective={kind}/{OBJECTIVE[kind]}", "model=local",
           f"model.source.name_or_path={hydra_value(model)}", "data=local"]
    out += [f"data.train.{k}={hydra_value(x)}" for k, x in train.items() if x is not None]
    if eval is not None:
        out += [f"data.eval.{k}={hydra_value(x)}" for k, x in eval.items() if x is not None]
    for name, row in fields_for(kind).items():
        if row.convert is None or row.fixed or name not in v:
            continue
        converted = row.convert(v[name])
        if converted is not SKIP:
            out.append(f"{row.key}={hydra_value(converted)}")
    out += _train(v)
    out += _model(v)
    if v.get("dataset_text_field", "text") != "text":
        out.append(f"data.train.rename={hydra_value({v['dataset_text_field']: 'text'})}")
    if kind == "dpo":
        out += _dpo_loss(v)
    if kind == "grpo":
        out += _grpo(v, rewards, n_prompts, world)
    return out


def _train(v: Mapping[str, Any]) -> list[str]:
    out = []
    warmup = float(v.get("warmup_steps") or 0)
    if warmup >= 1:
        if int(v.get("max_steps", -1)) <= 0:
            raise ConfigError(f"warmup_steps={v['warmup_steps']} counts steps and needs max_steps; give a fraction (< 1) or max_steps")
        warmup /= int(v["max_steps"])
    if v.get("warmup_ratio") is None:
        out.append(f"algorithm.train.warmup_ratio={warmup!r}")
    elif warmup:
        raise ConfigError("give warmup_steps or warmup_ratio, not both")
    optimizer = {"_target_": "torch.optim.AdamW", "_partial_": True,
                 "betas": [float(v.get("adam_beta1", 0.9)), float(v.get("adam_beta2", 0.999))],
                 "eps": float(v.get("adam_epsilon", 1e-8))}
    out.append(f"algorithm.train.optimizer={hydra_value(optimizer)}")
    out.append(f"algorithm.train.log_every={_steps('logging_steps', v.get('logging_steps', 10))}")
    save = 0 if v.get("save_strategy", "steps") == "no" else _steps("save_steps", v.get("save_steps", 500))
    out.append(f"algorithm.train.save_every={save}")
    if v.get("eval_strategy", "no") == "steps":
        every = v.get("eval_steps") if v.get("eval_steps") is not None else v.get("logging_steps", 10)
        out.append(f"algorithm.train.eval_every={_steps('eval_steps', every)}")
    elif "eval_strategy" in v:
        out.append("algorithm.train.eval_every=0")
    if v.get("disable_tqdm") is not None:
        out.append(f"algorithm.train.progress={hydra_value(not v['disable_tqdm'])}")
    if v.get("bf16") and v.get("fp16"):
        raise ConfigError("bf16 and fp16 are both set; pick one")
    if v.get("bf16") is not None or v.get("fp16"):
        out.append("hardware.precision=" + ("bf16" if v.get("bf16") else "fp16" if v.get("fp16") else "fp32"))
    report = v.get("report_to", "none")
    report = [report] if isinstance(report, str) else list(report or [])
    backends = [] if report in (["none"], []) else report
    from align_runner.engine.trackers import KNOWN_BACKENDS

    bad = [b for b in backends if b not in KNOWN_BACKENDS]
    if bad:
        raise ConfigError(f"report_to={report!r}: align_runner reports to none, tensorboard or wandb, not {bad}")
    out.append(f"tracking.backends={hydra_value(backends)}")
    return out


def _steps(name: str, value: Any) -> int:
    """TRL's cadence fields may be a fraction of training; align_runner counts steps."""
    if float(value) < 1 or float(value) != int(float(value)):
        raise ConfigError(f"{name}={value!r}: align_runner takes a whole number of steps (>= 1)")
    return int(float(value))


def _model(v: Mapping[str, Any]) -> list[str]:
    out = []
    if v.get("load_in_4bit") and v.get("load_in_8bit"):
        raise ConfigError("load_in_4bit and load_in_8bit are both set; pick one")
    if v.get("load_in_4bit") or v.get("load_in_8bit"):
        out.append("model.quantization=" + ("4bit" if v.get("load_in_4bit") else "8bit"))
    if v.get("use_peft"):
        targets = v.get("lora_target_modules")
        if isinstance(targets, list) and len(targets) == 1:
            targets = targets[0]  # `--lora_target_modules all-linear`
        out += ["+model/lora=default", f"model.lora.r={int(v.get('lora_r', 16))}",
                f"model.lora.alpha={int(v.get('lora_alpha', 32))}", f"model.lora.dropout={float(v.get('lora_dropout', 0.05))!r}",
                f"model.lora.target_modules={hydra_value(targets)}",
                f"model.lora.use_rslora={hydra_value(bool(v.get('use_rslora')))}",
                f"model.lora.use_dora={hydra_value(bool(v.get('use_dora')))}"]
    return out


def _dpo_loss(v: Mapping[str, Any]) -> list[str]:
    """``algorithm.loss`` (and the DPO options beside it) for TRL's loss_type, loss_weights, beta,
    label_smoothing, discopop_tau, the f-divergence and the TR-DPO reference sync."""
    types = v.get("loss_type", ["sigmoid"])
    types = [types] if isinstance(types, str) else list(types)
    parts = [_dpo_part(t, v) for t in types]
    weights = v.get("loss_weights")
    if weights is not None and len(weights) != len(types):
        raise ConfigError(f"loss_weights has {len(weights)} values for the {len(types)} loss types {types}")
    if len(parts) == 1:  # the algorithm file's loss node (_target_, beta, label_smoothing), changed in place
        node = parts[0]
        out = [f"algorithm.loss._target_={node['_target_']}", f"algorithm.loss.beta={node['beta']!r}"]
        smoothing = node.get("label_smoothing")
        out.append("~algorithm.loss.label_smoothing" if smoothing is None else f"algorithm.loss.label_smoothing={smoothing!r}")
        out += [f"+algorithm.loss.{k}={hydra_value(x)}" for k, x in node.items() if k not in _DPO_FILE_KEYS]
    else:
        out = [f"algorithm.loss._target_={DPO}mixture_loss", "~algorithm.loss.beta", "~algorithm.loss.label_smoothing",
               f"+algorithm.loss.losses={hydra_value(parts)}",
               f"+algorithm.loss.weights={hydra_value([float(w) for w in weights or [1.0] * len(types)])}"]
    sync = bool(v.get("sync_ref_model"))
    if sync and v.get("save_strategy", "steps") != "no":
        raise ConfigError("sync_ref_model=True: the live reference is not checkpointed (a resumed run would start "
                          "from another reference); set save_strategy='no'")
    if sync or set(types) <= REFERENCE_FREE:  # a live reference, or none: no ref_logps stage
        out.append("algorithm.reference.stage=null")
    if sync:
        out += [f"algorithm.ref_sync.every={int(v.get('ref_model_sync_steps', 512))}",
                f"algorithm.ref_sync.alpha={float(v.get('ref_model_mixup_alpha', 0.6))!r}"]
    return out


def _dpo_part(name: str, v: Mapping[str, Any]) -> dict[str, Any]:
    """The ``_target_`` node of one TRL loss_type (a partial of its align_runner.algos.dpo function)."""
    fn, smooths = DPO_LOSSES[name]
    node: dict[str, Any] = {"_target_": DPO + fn, "_partial_": True, "beta": float(v.get("beta", 0.1))}
    smoothing = float(v.get("label_smoothing", 0.0))
    if smooths:
        node["label_smoothing"] = smoothing
    elif smoothing:
        raise ConfigError(f"label_smoothing={smoothing} does not apply to loss_type={name!r}")
    if name == "discopop":
        node["tau"] = float(v.get("discopop_tau", 0.05))
    divergence = v.get("f_divergence_type", "reverse_kl")
    if divergence != "reverse_kl":
        if name != "sigmoid" or smoothing:
            raise ConfigError(f"f_divergence_type={divergence!r} with loss_type={name!r}"
                              f"{' and label_smoothing' if smoothing else ''}: align_runner implements the f-divergences "
                              "for the plain sigmoid loss only (align_runner.algos.dpo.f_divergence_loss)")
        coef = float(v.get("f_alpha_divergence_coef", 0.5))
        if divergence == "alpha_divergence" and not 0 < coef < 1:
            raise ConfigError(f"f_alpha_divergence_coef={coef}: expected a number in (0, 1) (1 is reverse_kl)")
        node = {"_target_": DPO + "f_divergence_loss", "_partial_": True, "beta": node["beta"],
                "divergence": divergence, "alpha": 1 - coef}
    return node


def _grpo(v: Mapping[str, Any], rewards: Sequence[tuple[str, dict]], n_prompts: int | None, world: int) -> list[str]:
    g, per, accum = int(v.get("num_generations", 8)), int(v.get("per_device_train_batch_size", 8)), int(v.get("gradient_accumulation_steps", 1))
    spg, gbs = v.get("steps_per_generation"), v.get("generation_batch_size")
    if spg is not None and gbs is not None:
        raise ConfigError("give steps_per_generation or generation_batch_size, not both")
    completions = int(gbs) if gbs is not None else per * world * int(spg or accum)
    step = per * world * accum
    if completions % g or completions % step:
        raise ConfigError(
            f"a rollout of {completions} completions (generation_batch_size) must be a multiple of num_generations={g} "
            f"and of the {step} completions of an optimizer step (per_device_train_batch_size x processes x "
            "gradient_accumulation_steps)"
        )
    prompts, steps_per_rollout, iterations = completions // g, completions // step, int(v.get("num_iterations", 1))
    if int(v.get("max_steps", -1)) > 0:
        rollouts = math.ceil(int(v["max_steps"]) / (steps_per_rollout * iterations))
    elif n_prompts is None:
        raise ConfigError("GRPO by num_train_epochs needs the number of prompts; give max_steps")
    else:
        rollouts = max(1, math.ceil(float(v.get("num_train_epochs", 3.0)) * n_prompts / prompts))
    out = [f"algorithm.train.micro_batch_size={per}", f"algorithm.prompts_per_rollout={prompts}",
           f"algorithm.steps_per_rollout={steps_per_rollout}", f"algorithm.rollouts={rollouts}"]
    eps = float(v.get("epsilon", 0.2))
    high = v.get("epsilon_high")
    out.append(f"algorithm.loss.epsilon_high={float(eps if high is None else high)!r}")
    if not rewards:
        raise ConfigError("GRPO needs reward_funcs (a function, a reward model id or path, or a list of them)")
    # the algorithm file's own rewards make way for the trainer's (a dict node merges, so delete each)
    shipped = OmegaConf.load(CONF_DIR / "algorithm" / "grpo.yaml").get("rewards") or {}
    out += [f"~algorithm.rewards.{name}" for name in shipped]
    out += [f"+algorithm.rewards.{name}={hydra_value(node)}" for name, node in rewards]
    weights = v.get("reward_weights")
    if weights is not None:
        if len(weights) != len(rewards):
            raise ConfigError(f"reward_weights has {len(weights)} values for {len(rewards)} reward functions")
        out += [f"+algorithm.reward_weights.{name}={float(w)!r}" for (name, _), w in zip(rewards, weights)]
    return out


def default_hardware(native: Sequence[str] = ()) -> list[str]:
    """``hardware=1xgpu`` where a GPU is visible and the overrides pick no profile: TRL trains on the
    GPU it finds, and so should the same training run here."""
    import torch

    if any(o.startswith("hardware=") for o in native) or not torch.cuda.is_available():
        return []
    return ["hardware=1xgpu"]
