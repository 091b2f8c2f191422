"""The training loop: accumulation-invariant gradients, a model that learns, a NaN guard."""

from __future__ import annotations

import random
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from align_runner.algos.sft import sft_loss
from align_runner.config import HardwareConfig, TrainConfig
from align_runner.data.collate import collate_sft, sft_tokens
from align_runner.engine.backend import get_backend
from align_runner.engine.loop import Engine, NonFiniteLossError, schedule_indices
from align_runner.engine.trackers import Tracker, read_metrics
from align_runner.models.loading import load_causal_lm
from align_runner.models.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")))


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(5, 20)  # unequal lengths: a per-micro-batch mean would weight them wrongly
        prompt = rng.randint(1, length - 2)
        rows.append({"input_ids": [rng.randint(3, 500) for _ in range(length)], "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return rows


def _train(tiny_dir, tmp_path, rows, **train) -> tuple[torch.nn.Module, list[dict], list[torch.Tensor]]:
    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainConfig),
        {"max_steps": 1, "lr": 1e-2, "scheduler": "constant", "warmup_ratio": 0.0, "progress": False, **train},
    )
    backend = get_backend(OmegaConf.structured(HardwareConfig(name="cpu")))
    torch.manual_seed(0)
    model = load_causal_lm(tiny_dir)
    tracker = Tracker(tmp_path, stage="t", enabled=True)
    engine = Engine(cfg, backend, out_dir=tmp_path, seed=0, tracker=tracker)

    def step(m, batch):
        return sft_loss(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])

    grads: list[torch.Tensor] = []
    original = torch.optim.AdamW.step

    def record(opt, *a, **k):  # the gradient the optimizer is about to apply
        grads.extend(p.grad.detach().clone() for g in opt.param_groups for p in g["params"])
        return original(opt, *a, **k)

    torch.optim.AdamW.step = record
    try:
        engine.fit(step, model=model, train_data=rows, collate=partial(collate_sft, pad_id=0), length=sft_tokens)
    finally:
        torch.optim.AdamW.step = original
    return model, read_metrics(tmp_path / "metrics.jsonl"), grads


def test_micro_batch_8_equals_8_accumulated_micro_batches_of_1(tiny_dir, tmp_path):
    rows = _rows(8)
    a, ma, ga = _train(tiny_dir, tmp_path / "a", rows, micro_batch_size=8, grad_accum=1)
    b, mb, gb = _train(tiny_dir, tmp_path / "b", rows, micro_batch_size=1, grad_accum=8)
    assert ma[0]["loss"] == pytest.approx(mb[0]["loss"], abs=1e-5)
    assert len(ga) == len(gb) > 0
    assert max((x - y).abs().max().item() for x, y in zip(ga, gb)) < 1e-5
    # Adam's first step is ~lr * sign(g), so weights agree to lr-scale only where g ~ 0; still close:
    diff = max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
    assert diff < 1e-3
    # and the step really moved the weights (the comparison above is not vacuous)
    fresh = load_causal_lm(tiny_dir)
    moved = max((pa - pf).abs().max().item() for pa, pf in zip(a.parameters(), fresh.parameters()))
    assert moved > 1e-3


def test_token_budget_micro_batches_give_the_fixed_size_gradient(tiny_dir, tmp_path, monkeypatch):
    rows = _rows(8)
    sizes: list[int] = []  # rows of each collated micro-batch
    original = collate_sft

    def counting(examples, **kw):
        sizes.append(len(examples))
        return original(examples, **kw)

    monkeypatch.setitem(globals(), "collate_sft", counting)
    a, ma, ga = _train(tiny_dir, tmp_path / "a", rows, micro_batch_size=8, grad_accum=1)
    sizes.clear()
    # rows of 5..20 tokens under a 40-token budget: several micro-batches of similar lengths
    b, mb, gb = _train(tiny_dir, tmp_path / "b", rows, micro_batch_size=8, grad_accum=1, max_tokens_per_batch=40)
    assert len(sizes) > 1 and sum(sizes) == 8
    assert mb[0]["loss"] == pytest.approx(ma[0]["loss"], abs=1e-5)
    assert max((x - y).abs().max().item() for x, y in zip(ga, gb)) < 1e-5


def test_packed_batches_count_their_real_tokens_for_throughput():
    from align_runner.data.collate import collate_packed_sft
    from align_runner.engine.loop import _real_tokens

    rows = [{"input_ids": [1, 2, 3], "loss_mask": [1, 1, 1]}, {"input_ids": [4, 5], "loss_mask": [1, 1]}, {"input_ids": [6] * 4, "loss_mask": [1] * 4}]
    packed = collate_packed_sft(rows, 0, max_tokens=5)  # rows [6 x4] + pad, [1 2 3 4 5]
    assert packed["input_ids"].numel() == 10 and _real_tokens(packed) == 9 == _real_tokens(collate_sft(rows, 0))


def test_step_batches_under_a_token_budget_by_hand(tmp_path):
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"micro_batch_size": 3, "grad_accum": 2, "max_tokens_per_batch": 10})
    backend = get_backend(OmegaConf.structured(HardwareConfig(name="cpu")))
    engine = Engine(cfg, backend, out_dir=tmp_path, seed=0, tracker=Tracker(tmp_path, stage="t", enabled=False))
    lengths = [2, 9, 3, 4, 5, 1]
    step = schedule_indices(6, 6, epoch=0, seed=0)[0]
    plan = engine._step_batches(6, 0, 1, lengths)
    # the same six examples, grouped shortest first: 1, 2, 3 (3 rows x 3 = 9 <= 10); 4 (2 x 5 = 10 with
    # 5); 9 alone
    assert sorted(i for mb in plan for i in mb) == sorted(step)
    assert [[lengths[i] for i in mb] for mb in plan] == [[1, 2, 3], [4, 5], [9]]


def test_schedule_is_a_deterministic_permutation_per_epoch():
    steps = schedule_indices(10, 4, epoch=0, seed=3)
    assert len(steps) == 3 and all(len(s) == 4 for s in steps)
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10))  # every example once, then wrap-around fill
    assert steps == schedule_indices(10, 4, epoch=0, seed=3)
    assert steps != schedule_indices(10, 4, epoch=1, seed=3)


def test_nonfinite_losses_are_skipped_then_fail(tiny_dir, tmp_path):
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"max_steps": 10, "max_nonfinite": 2, "progress": False})
    backend = get_backend(OmegaConf.structured(HardwareConfig(name="cpu")))
    model = load_causal_lm(tiny_dir)
    engine = Engine(cfg, backend, out_dir=tmp_path, seed=0, tracker=Tracker(tmp_path, stage="t", enabled=True))

    def nan_step(m, batch):
        out = sft_loss(m(input_ids=batch["input_ids"]).logits, batch["labels"])
        return out._replace(loss=out.loss * float("nan"))

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses at step 3"):
        engine.fit(nan_step, model=model, train_data=_rows(8), collate=partial(collate_sft, pad_id=0))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # no NaN reached the weights


def _two_models_online(tmp_path, crash_at: int | None = None):
    """fit_online with two models (a "policy" and a "critic"), each its own TrainState and optimizer."""
    from align_runner.algos.types import LossOutput
    from align_runner.engine.online import Rollout, Update, fit_online

    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainConfig),
        {"lr": 1e-2, "scheduler": "linear", "progress": False, "save_every": 2, "keep_last": 1},
    )
    backend = get_backend(OmegaConf.structured(HardwareConfig(name="cpu")))
    engine = Engine(cfg, backend, out_dir=tmp_path, seed=0, tracker=Tracker(tmp_path, stage="t", enabled=True))
    torch.manual_seed(0)
    policy, critic = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    states = [engine.setup(policy, total_steps=8, name="policy"), engine.setup(critic, total_steps=8, name="critic")]

    def loss(m, batch):
        return LossOutput(((m(batch["x"]) - batch["y"]) ** 2).mean(), {})

    def rollout(i):
        if i == crash_at:
            raise KeyboardInterrupt("killed")
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, 3, generator=g)
        return Rollout([[{"x": x, "y": x.sum(1, keepdim=True), "num_items": 4}]] * 2, {"rollout": float(i)})

    fit_online(engine, updates=[Update(s, loss) for s in states], rollouts=4, make_rollout=rollout)
    return policy, critic, states


def test_online_loop_trains_two_models_and_resumes_both(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _two_models_online(tmp_path / "a", crash_at=3)
    assert sorted(p.name for p in (tmp_path / "a" / "ckpt").iterdir()) == ["step-2"]
    assert sorted(p.name for p in (tmp_path / "a" / "ckpt" / "step-2").iterdir() if p.is_dir()) == ["critic", "policy"]
    resumed = _two_models_online(tmp_path / "a")
    clean = _two_models_online(tmp_path / "b")
    for a, b in zip(resumed[:2], clean[:2]):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # each model took 2 optimizer steps per rollout on its own optimizer and schedule
    assert [s.step for s in resumed[2]] == [8, 8]
    assert resumed[2][0].optimizer is not resumed[2][1].optimizer
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "critic/loss" in rows[-1] and "loss" in rows[-1]


def test_a_step_with_no_items_anywhere_is_skipped_without_a_forward(tmp_path):
    """Every completion filtered out (num_items 0 on every process): no forward, no update, no
    scheduler step, and no error (DeepSpeed would otherwise be asked to discard gradients it has not got)."""
    from align_runner.algos.types import LossOutput

    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"lr": 1e-2, "progress": False})
    backend = get_backend(OmegaConf.structured(HardwareConfig(name="cpu")))
    engine = Engine(cfg, backend, out_dir=tmp_path, seed=0, tracker=Tracker(tmp_path, stage="t", enabled=True))
    model = torch.nn.Linear(2, 1)
    state = engine.setup(model, total_steps=4)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def step(m, batch):
        calls.append(1)
        return LossOutput(m(batch["x"]).sum(), {})

    assert engine.train_step(state, step, [{"x": torch.ones(1, 2), "num_items": 0}]) is None
    assert calls == [] and state.step == 0 and state.scheduler.last_epoch == 0
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_cpu_threads_share_the_cores_among_a_nodes_processes():
    from omegaconf import OmegaConf

    from align_runner.engine.backend import cpu_threads

    def hw(**kw):
        return OmegaConf.create({"num_processes": 1, "cpu_threads": None, **kw})

    assert cpu_threads(hw(), cores=8) is None  # one process: torch's default, every core
    assert cpu_threads(hw(num_processes=2), cores=8) == 4
    assert cpu_threads(hw(num_processes=4), cores=2) == 1  # never 0
    assert cpu_threads(hw(num_processes=2, cpu_threads=3), cores=8) == 3  # the setting wins


def test_a_backend_applies_cpu_threads_and_a_bad_value_is_a_config_error(monkeypatch):
    import torch

    from align_runner import api
    from align_runner.engine.backend import cpu_threads, get_backend
    from align_runner.validate import ConfigError, validate

    before = torch.get_num_threads()
    try:
        hardware = api.compose(["hardware.cpu_threads=1"]).hardware
        get_backend(hardware)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)  # e.g. restored by a caller between two runs
        get_backend(hardware)  # the same backend, reused: the run's setting still applies
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    # the default is given to torchrun's processes at launch, unless the user set OMP_NUM_THREADS
    from align_runner import cli

    launched = []
    monkeypatch.setattr(cli.subprocess, "Popen", lambda cmd, env: launched.append(env) or SimpleNamespace(wait=lambda: 0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    hardware = api.compose(["hardware=cpu_ddp2"]).hardware
    cli._self_launch([], hardware, "/tmp/unused")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    cli._self_launch([], hardware, "/tmp/unused")
    assert [e["OMP_NUM_THREADS"] for e in launched] == [str(cpu_threads(hardware)), "7"]
    with pytest.raises(ConfigError, match="hardware.cpu_threads"):
        validate(api.compose(["hardware.cpu_threads=0"]))
