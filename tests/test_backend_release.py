"""A stage's models and optimizers are freed when it ends, also in a process that runs many stages.

Hydra's basic launcher runs a sweep's jobs one after another in one process, and the backend lives as
long as the process: a reference it kept to each stage's model and AdamW state (Accelerate keeps every
prepared object in lists of its own) grew a 13-job DPO sweep on SmolLM2-135M to 23.7 GB of RSS until
the kernel killed it.
"""

from __future__ import annotations

import gc
import weakref

from conftest import run

from align_runner.engine import backend as backend_mod


def test_a_finished_stage_leaves_no_model_or_optimizer_alive(tiny, monkeypatch):
    prepared: list[weakref.ref] = []
    prepare = backend_mod.DDPBackend.prepare

    def recording_prepare(self, model, params, make_optimizer, train):
        model, optimizer, evidence = prepare(self, model, params, make_optimizer, train)
        prepared.extend([weakref.ref(model), weakref.ref(optimizer)])
        return model, optimizer, evidence

    monkeypatch.setattr(backend_mod.DDPBackend, "prepare", recording_prepare)
    # two trained stages in one run (sft, then dpo on it), twice over: a second job in the same process
    for lr in ("1e-3", "2e-3"):
        run([*tiny, "algorithm=dpo", "pipeline.eval=false", f"train.lr={lr}"])
    gc.collect()
    assert len(prepared) == 8  # sft and dpo, model and optimizer, in each of two runs (the second's sft new: lr)
    alive = [ref() for ref in prepared if ref() is not None]
    assert alive == [], f"{len(alive)} prepared models / optimizers still referenced: {[type(a).__name__ for a in alive]}"
    assert backend_mod._BACKEND.accelerator._models == []  # and the backend itself holds none
