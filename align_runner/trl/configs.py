"""``SFTConfig``, ``DPOConfig``, ``RewardConfig``, ``GRPOConfig``, ``KTOConfig``: TRL's names and defaults.

Generated from the table in ``fields.py`` (the rows a Python config has; model and dataset settings
are the trainer's arguments there). A name the table lacks, set in the constructor or later as an
attribute, is a ConfigError naming it; a value the table accepts only at its default is one too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from align_runner.trl.fields import CONFIG, defaults
from align_runner.trl.overrides import check_values
from align_runner.validate import ConfigError


class TRLConfig:
    """Base of the generated config classes."""

    kind: ClassVar[str]

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.__dataclass_fields__:  # type: ignore[attr-defined]
            check_values(self.kind, {name: value}, type(self).__name__)  # raises, naming it
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        check_values(self.kind, self.to_dict(), type(self).__name__)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def _make(kind: str, name: str) -> type:
    values = defaults(kind, (CONFIG,))
    # output_dir first: TRL's configs take it positionally, as TrainingArguments does
    order = ["output_dir", *sorted(n for n in values if n != "output_dir")]
    fields = [(n, Any, dataclasses.field(default_factory=lambda v=values[n]: list(v) if isinstance(v, list) else v)) for n in order]
    cls = dataclasses.make_dataclass(name, fields, bases=(TRLConfig,), namespace={"kind": kind})
    generated = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > 1:
            raise ConfigError(f"{name} takes output_dir positionally and every other field by name")
        check_values(kind, kwargs, name)
        generated(self, *args, **kwargs)

    cls.__init__ = __init__
    cls.__doc__ = f"TRL's {name}: the fields align_runner supports, at TRL's defaults (see align_runner.trl.fields)."
    return cls


SFTConfig = _make("sft", "SFTConfig")
DPOConfig = _make("dpo", "DPOConfig")
RewardConfig = _make("reward", "RewardConfig")
GRPOConfig = _make("grpo", "GRPOConfig")
KTOConfig = _make("kto", "KTOConfig")
CONFIGS = {"sft": SFTConfig, "dpo": DPOConfig, "reward": RewardConfig, "grpo": GRPOConfig, "kto": KTOConfig}
