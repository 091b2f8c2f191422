"""Per-token estimators of KL(pi || pi_ref) from sampled log-probs.

Schulman 2020, "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html). For tokens
sampled from pi, with log r = log pi_ref(y) - log pi(y) = ``ref_logps - logps``:

    k1 = -log r                 unbiased, high variance, can be negative per token
    k2 = 1/2 (log r)^2          biased, low variance, >= 0
    k3 = (r - 1) - log r        unbiased, low variance, >= 0 (r - 1 is a zero-mean control variate)

Every estimator maps (…) log-probs to (…) estimates, elementwise; reducing over tokens is the
caller's job. Pure tensor functions: no models, no I/O, no config.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = log pi(y) - log pi_ref(y). logps, ref_logps: (…) -> (…)."""
    return logps - ref_logps


def kl_k2(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k2 = 1/2 (log pi(y) - log pi_ref(y))^2. logps, ref_logps: (…) -> (…)."""
    return 0.5 * (logps - ref_logps) ** 2


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = exp(log r) - log r - 1 with log r = ref_logps - logps. logps, ref_logps: (…) -> (…).

    The estimator GRPO uses (Shao et al. 2024, eq. 4). ``expm1`` keeps the value accurate when the
    policy is close to the reference (log r near 0), where ``exp(x) - 1`` would cancel.
    """
    log_r = ref_logps - logps
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
"""Estimator name -> function(logps, ref_logps)."""


def kl_estimate(logps: Tensor, ref_logps: Tensor, estimator: str) -> Tensor:
    """The named estimator (``"k1"``, ``"k2"`` or ``"k3"``) applied per token: (…) -> (…)."""
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; valid: {', '.join(sorted(KL_ESTIMATORS))}"
        ) from None
    return fn(logps, ref_logps)
