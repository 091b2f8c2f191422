"""What the align_runner side measures besides its throughput: the FLOPs of its work, this machine's
matmul peak, and the engine's overhead against a bare PyTorch loop on the same micro-batches.

FLOPs of a forward + backward over a sequence of L real tokens, with P the non-embedding parameters,
``layers`` / ``hidden`` the model's, V the vocabulary and K the positions whose logits are computed:

    6 * P * L  +  12 * layers * hidden * L**2  +  6 * hidden * V * K

(the weight matmuls, attention's QK^T and AV over the sequence's own length, the LM head on the K
positions). A forward-only pass (reference log-probs, sampling) counts a third of it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

FLOP_FORMULA = (
    "per sequence of L real tokens: 6*P*L + 12*layers*hidden*L^2 + 6*hidden*vocab*K "
    "(P: non-embedding parameters; K: positions whose logits are computed); forward-only passes count 1/3"
)


# ===================================================================================== FLOPs


def sequence_flops(model: dict, length: int, logit_positions: int) -> float:
    """Forward + backward FLOPs of one sequence (the module docstring's formula)."""
    layers, hidden, vocab = model["num_hidden_layers"], model["hidden_size"], model["vocab_size"]
    return (
        6.0 * model["non_embedding_parameters"] * length
        + 12.0 * layers * hidden * length**2
        + 6.0 * hidden * vocab * logit_positions
    )


def batch_sequences(batch: dict) -> list[int]:
    """Real-token lengths of the sequences of a padded (attention mask) or packed (sequence ids) batch."""
    import torch

    if "sequence_ids" in batch:
        seq = batch["sequence_ids"]
        return torch.bincount(seq[seq >= 0]).tolist()
    return batch["attention_mask"].sum(-1).tolist()


def shared_prefix_work(batch: dict) -> tuple[int, int] | None:
    """(real tokens, attended query-key pairs) of a batch laid out with a 4-D attention mask (units
    sharing a prefix, e.g. a reward pair's prompt computed once); None for other batches. A pad is the
    one column that neither attends to nor is attended by anything but itself."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 4:
        return None
    allowed = mask[:, 0]
    real = (allowed.sum(1) > 1) | (allowed.sum(2) > 1)
    return int(real.sum()), int(allowed[real].sum())


def batch_tokens(batch: dict) -> int:
    """Real tokens the batch feeds the model (a shared prefix once)."""
    shared = shared_prefix_work(batch)
    return shared[0] if shared else sum(batch_sequences(batch))


def batch_flops(model: dict, batch: dict, lm_head: bool = True) -> float:
    """Forward + backward FLOPs of one micro-batch. A shared-prefix layout counts its real tokens and,
    in place of each sequence's L^2, twice its attended pairs (a causal sequence attends L(L+1)/2)."""
    head = sequence_flops(model, 0, logit_positions(batch)) if lm_head else 0.0
    shared = shared_prefix_work(batch)
    if shared is None:
        return sum(sequence_flops(model, n, 0) for n in batch_sequences(batch)) + head
    tokens, pairs = shared
    layers, hidden = model["num_hidden_layers"], model["hidden_size"]
    return 6.0 * model["non_embedding_parameters"] * tokens + 12.0 * layers * hidden * 2 * pairs + head


def logit_positions(batch: dict) -> int:
    """Positions whose logits the step computes: SFT's trained tokens (labels, shifted by one), the
    response tokens of a preference batch (loss mask). (A reward model has none: ``lm_head=False``.)"""
    if "labels" in batch:
        return int((batch["labels"][:, 1:] != -100).sum())
    if "loss_mask" in batch:
        return int((batch["loss_mask"][:, 1:] != 0).sum())
    return 0


def steps_flops(model: dict, steps: list[list[dict]], lm_head: bool = True) -> float:
    """Forward + backward FLOPs of the recorded optimizer steps' micro-batches."""
    return sum(batch_flops(model, b, lm_head) for batches in steps for b in batches)


# ===================================================================================== matmul peak


def matmul_peak(sizes: tuple[int, ...], repeats: int, device: str = "cpu") -> dict:
    """``torch.mm`` FLOP/s of n x n matrices (2 n^3 per product) in the dtype training computes in
    (fp32 on the CPU, bf16 on a GPU): the best of ``repeats`` timed products after two unmeasured
    ones, per size; ``peak_flops`` is the best over sizes."""
    import torch
    from common import synchronize

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    best = {}
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        for _ in range(2):
            torch.mm(a, b)
        times = []
        for _ in range(repeats):
            synchronize()
            t0 = time.perf_counter()
            torch.mm(a, b)
            synchronize()
            times.append(time.perf_counter() - t0)
        best[str(n)] = 2.0 * n**3 / min(times)
    return {
        "per_size_flops": best,
        "peak_flops": max(best.values()),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
    }


# ===================================================================================== timing


def timed(fn: Callable, record: Callable[[float], object]) -> Callable:
    """``fn`` wrapped to pass the seconds of each call, queued GPU work included, to ``record``."""
    from common import synchronize

    def wrapper(*args, **kwargs):
        synchronize()
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            synchronize()
            record(time.perf_counter() - t0)

    return wrapper


def patch_timer(owner, name: str) -> list[float]:
    """Replace ``owner.name`` (a module's function or a class's method) by a wrapper that times each
    call; returns the list the seconds are appended to."""
    seconds: list[float] = []
    setattr(owner, name, timed(getattr(owner, name), seconds.append))
    return seconds


# ===================================================================================== engine overhead


class EngineRecorder:
    """Patches align_runner's ``Engine`` in this worker: times every ``fit`` and records every
    ``train_step``'s micro-batches (CPU tensors, as collated), the engine and the step function, so
    the same optimizer steps can be replayed afterwards."""

    def __init__(self):
        from align_runner.engine import loop

        self.steps: list[list[dict]] = []
        self.engine = None
        self.step_fn = None
        self._train_step = loop.Engine.train_step
        train_step, rec = loop.Engine.train_step, self

        def recording_train_step(engine, state, step, batches):
            rec.engine, rec.step_fn = engine, step
            rec.steps.append(list(batches))
            return train_step(engine, state, step, batches)

        loop.Engine.train_step = recording_train_step
        self.fit_seconds = patch_timer(loop.Engine, "fit")

    def replay_overhead(self, model, *, steps: int, repeats: int) -> dict:
        """The first ``steps`` recorded optimizer steps on ``model`` (a fresh copy of the input model),
        (a) through ``Engine.train_step`` and (b) by ``bare_step``, alternating after one unmeasured
        pass of each; overhead = median over pairs of (a - b) / b."""
        engine, replayed = self.engine, self.steps[:steps]
        engine.model = None  # the trained model: free it before the copy's optimizer state is built
        clock = ModelClock()
        step = clock.wrap(rebind_step(self.step_fn, model))
        state = engine.setup(model, total_steps=len(replayed))
        max_grad_norm = float(engine.train.max_grad_norm)

        def through_engine() -> None:
            for batches in replayed:
                self._train_step(engine, state, step, batches)

        def bare() -> None:
            for batches in replayed:
                bare_step(state, step, batches, max_grad_norm, engine.backend.precision)

        return alternate(through_engine, bare, repeats, clock) | {
            "optimizer_steps": len(replayed),
            "micro_batches": sum(len(b) for b in replayed),
        }


def rebind_step(step: Callable, model) -> Callable:
    """``step`` (a partial of a stage's step function) with its model-bound helpers rebuilt on
    ``model``: the counted-token LM head (sft, dpo) and the packed reward scores' hook (reward)."""
    if not isinstance(step, partial):
        return step
    from align_runner.models.counted_head import CountedHead
    from align_runner.stages.reward import TokenScores

    keywords = dict(step.keywords)
    for key, value in step.keywords.items():
        if isinstance(value, CountedHead):
            keywords[key] = CountedHead(model, value.chunk_size)
        elif isinstance(value, TokenScores):
            keywords[key] = TokenScores(model)
    return partial(step.func, *step.args, **keywords)


def bare_step(state, step, batches: list[dict], max_grad_norm: float, precision: str = "fp32") -> None:
    """One optimizer step with nothing but PyTorch: each micro-batch moved to the model's device, its
    loss (a mean over its num_items, under bf16/fp16 autocast unless fp32) weighted by its share of the
    step's items, backward, clip, step, zero_grad."""
    import torch

    state.model.train()
    device = next(state.model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    total = sum(float(b["num_items"]) for b in batches)
    for b in batches:
        b = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = step(state.model, b)
        (out.loss * (float(b["num_items"]) / total)).backward()
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_grad_norm)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)


class ModelClock:
    """The seconds a replay spends in the model's own work, which both loops share: the step function
    (forward + loss, wrapped by ``wrap``) and ``Tensor.backward`` (patched inside ``timing``).

    What a pass spends besides them is its own bookkeeping, optimizer step and clipping included: the
    engine's or the bare loop's. Whole passes swing by about 10% from one to the next on a shared CPU,
    more than the overhead sought; the remainders are measured in the same passes and do not carry
    the model kernels' swing, so their difference is the overhead measured directly."""

    def __init__(self):
        self.seconds = 0.0

    def _add(self, seconds: float) -> None:
        self.seconds += seconds

    def wrap(self, step: Callable) -> Callable:
        return timed(step, self._add)

    @contextmanager
    def timing(self) -> Iterator[ModelClock]:
        import torch

        backward = torch.Tensor.backward
        torch.Tensor.backward = timed(backward, self._add)
        try:
            yield self
        finally:
            torch.Tensor.backward = backward


def alternate(engine_fn: Callable[[], None], bare_fn: Callable[[], None], repeats: int, clock: ModelClock) -> dict:
    """``engine_fn`` and ``bare_fn`` timed alternately ``repeats`` times each, after one unmeasured
    call of each (allocator and kernel warm-up): the overhead of each pair and their median, in %, and
    the direct estimate, (engine's remainder - bare's remainder) / bare, the remainders being each
    pass's time outside the model's forward and backward (``ModelClock``)."""

    from common import synchronize

    def seconds(fn) -> tuple[float, float]:
        synchronize()
        model_before, t0 = clock.seconds, time.perf_counter()
        with clock.timing():
            fn()
        synchronize()
        total = time.perf_counter() - t0
        return total, total - (clock.seconds - model_before)

    engine_fn(), bare_fn()
    engine_s, bare_s, engine_rest, bare_rest = [], [], [], []
    for _ in range(repeats):
        for fn, whole, rest in ((engine_fn, engine_s, engine_rest), (bare_fn, bare_s, bare_rest)):
            total, remainder = seconds(fn)
            whole.append(total)
            rest.append(remainder)
    pairs = [100.0 * (a - b) / b for a, b in zip(engine_s, bare_s)]
    return {
        "engine_s": engine_s,
        "bare_s": bare_s,
        "pairs_pct": pairs,
        "median_pct": statistics.median(pairs),
        "engine_rest_s": engine_rest,
        "bare_rest_s": bare_rest,
        "direct_pct": 100.0 * (sum(engine_rest) - sum(bare_rest)) / sum(bare_s),
    }
