"""Shared fixtures: offline tiny-model pipelines in a temporary output tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_thread():
    """One intra-op torch thread, as the CLI subprocesses use: in-process runs compare bitwise with them."""
    from cli_runner import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    """One cache of built tiny models for the whole session (building takes a second or two)."""
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture
def tiny(tmp_path, model_cache) -> list[str]:
    """Overrides for a fast offline pipeline: tiny model, a slice of the demo data, few steps."""
    return [
        "model=tiny",
        f"paths.outputs={tmp_path / 'outputs'}",
        f"paths.cache={model_cache}",
        "data.sft.train.limit=64",
        "data.preference.train.limit=64",
        "data.prompt.eval.limit=16",
        "eval.limit=16",
        "eval.max_new_tokens=4",
        "train.max_steps=4",
        "train.lr=1e-3",
        "train.progress=false",
    ]


def run(overrides: list[str]):
    from align_runner import api

    return api.run(overrides)


@pytest.fixture
def count_optimizer_steps(monkeypatch):
    """Counts torch.optim.AdamW.step calls made while the test runs."""
    import torch

    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    return calls


@pytest.fixture
def tiny_dir(model_cache) -> str:
    """A tiny random model (and tokenizer) saved as a local Hugging Face checkpoint."""
    from align_runner.models.tiny import build_tiny

    return build_tiny(model_cache)


@pytest.fixture
def outputs_here(tmp_path, monkeypatch) -> Path:
    """Runs, store and the TRL facade's cache in the test's tmp dir, which is also the cwd (TRL's
    relative output_dir lands there)."""
    monkeypatch.setenv("ALIGN_RUNNER_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.delenv("ALIGN_RUNNER_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "outputs"
