"""Keep secrets out of every file align_runner writes (saved configs, manifests, tracker configs).

A value is secret when its key looks like one (``api_key``, ``token``, ``password``, ...) or when it
contains the value of an environment variable whose name looks like one (``WANDB_API_KEY``,
``HF_TOKEN``, ...): a config that reads ``${oc.env:WANDB_API_KEY}`` resolves to the key itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
# config keys holding a secret (whole key; "pad_token" or "max_new_tokens" are not secrets)
_SECRET_KEY = re.compile(
    r"^(api[_-]?key|(hf|auth|access|api)?[_-]?token|secret([_-]?key)?|passw(or)?d|credentials?)$", re.IGNORECASE
)
# environment variable names holding a secret (WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...)
_SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
# shorter values (e.g. "1", "true") would mask innocent text
_MIN_SECRET_LEN = 8


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables, longest first."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_ENV.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(obj: Any, environ: Mapping[str, str] | None = None) -> Any:
    """Copy of a plain container (dicts, lists, scalars) with secrets replaced by ``***``."""
    return _redact(obj, secret_values(environ))


def _redact(obj: Any, secrets: list[str]) -> Any:
    if isinstance(obj, Mapping):
        return {
            k: MASK if _SECRET_KEY.match(str(k)) and isinstance(v, str) and v else _redact(v, secrets)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(v, secrets) for v in obj)
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, MASK)
    return obj


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with every secret environment value replaced by ``***``."""
    for s in secret_values(environ):
        text = text.replace(s, MASK)
    return text


# a secret typed on the command line is handed to the job through this environment variable prefix
SECRET_ENV_PREFIX = "ALIGN_RUNNER_SECRET_"


def is_secret_key(dotted: str) -> bool:
    """Whether a config key (``tracking.api_key``, ``+model.source.token``) holds a secret."""
    return bool(_SECRET_KEY.match(dotted.lstrip("+~").rsplit(".", 1)[-1]))


def hide_secret_overrides(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the overrides with each secret value replaced by an environment reference, those variables).

    Hydra records the command line itself — ``.hydra/overrides.yaml``, ``hydra.yaml``, ``config.yaml``,
    ``multirun.yaml``, the ``#0 : ...`` lines of a sweep — before any code of ours runs. So a secret
    override (``tracking.api_key=abc``) becomes ``tracking.api_key=${oc.env:ALIGN_RUNNER_SECRET_TRACKING_API_KEY}``
    and the value travels in that variable (set in this process, inherited by torchrun's ranks): every
    record holds the reference, the resolved config the job reads holds the key, and the variable's
    name marks its value secret for :func:`redact_text`. Values that already are references stay.
    """
    out, env = [], {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not is_secret_key(key) or value.startswith("${") or value in ("", "null"):
            out.append(override)
            continue
        var = SECRET_ENV_PREFIX + re.sub(r"\W", "_", key.lstrip("+~")).upper()
        env[var] = _unquote(value)
        out.append(f"{key}=${{oc.env:{var}}}")
    return out, env


def _unquote(value: str) -> str:
    """The string Hydra's grammar reads from a quoted value ('a b' or "a b"); a bare one as it is."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value
