"""The rest of the preference family on the tiny model: KTO (its unpaired data, its cached reference of
completions and KL samples), the reference-free losses (no reference stage, no reference forward),
TR-DPO's live reference, LD-DPO's public sums, and one check that every method raises the held-out
implicit-reward accuracy on the demo pairs. One stage store serves the module: data prep and the
references are computed once for all methods."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from align_runner.api import compose
from align_runner.data.errors import DataError
from align_runner.data.prepared import load_prepared
from align_runner.models import reference
from align_runner.pipeline.graph import build_graph
from align_runner.stages import ref_logps
from align_runner.stages.context import StageContext
from align_runner.stages.dpo import LiveReference
from align_runner.validate import ConfigError

# no SFT and no generation evals: each method straight from the tiny base model on demo pairs
STEPS = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("store"))


@pytest.fixture
def base(tmp_path, model_cache, store) -> list[str]:
    return [
        "model=tiny",
        f"paths.outputs={tmp_path / 'outputs'}",
        f"paths.cache={model_cache}",
        f"paths.store={store}",
        "train.progress=false",
        "pipeline.eval=false",
        "data.preference.train.limit=64",
        "data.preference.eval.limit=32",
        f"train.max_steps={STEPS}",
        # the algorithms' lr is for real models; the tiny one needs a much larger one to move in 8 steps
        "algorithm.train.lr=1e-3",
    ]


def metric_rows(result, stage: str) -> list[dict]:
    path = Path(result.stage(stage).dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_rows(result, stage: str) -> list[dict]:
    return [r for r in metric_rows(result, stage) if "loss" in r and "lr" in r]


# ------------------------------------------------------------------------------------------ graph


@pytest.mark.parametrize("algorithm", ["orpo", "simpo", "cpo", "tr_dpo"])
def test_reference_free_and_live_reference_pipelines_have_no_reference_stage(algorithm):
    specs = build_graph(compose([f"algorithm={algorithm}", "model=tiny"]))
    assert [s.kind for s in specs] == ["data_prep", "sft", "eval", "dpo", "eval"]
    assert dict(next(s for s in specs if s.kind == "dpo").inputs) == {}


def test_kto_pipeline_reads_the_unpaired_reference():
    specs = build_graph(compose(["algorithm=kto", "model=tiny"]))
    assert [(s.name, s.kind) for s in specs] == [
        ("data_prep", "data_prep"),
        ("sft", "sft"),
        ("eval_before", "eval"),
        ("ref_logps", "unpaired_ref_logps"),
        ("kto", "kto"),
        ("eval_after", "eval"),
    ]
    assert dict(specs[4].inputs) == {"reference": "ref_logps"} and specs[3].model_from == "sft"


@pytest.mark.parametrize(
    "overrides, message",
    [
        # a reference-free loss with a reference would pay for a pass it never reads
        (["algorithm=dpo", "algorithm.loss._target_=align_runner.algos.dpo.simpo_loss", "~algorithm.loss.label_smoothing"],
         "algorithm.reference.stage='ref_logps': expected null: simpo_loss uses no reference"),
        # a loss comparing with a reference, without one
        (["algorithm=orpo", "algorithm.loss._target_=align_runner.algos.dpo.sigmoid_loss"],
         "algorithm.reference.stage=None: expected a ref_logps stage .* sigmoid_loss compares the policy with a reference"),
        (["algorithm=tr_dpo", "algorithm.reference.stage=ref_logps"], "algorithm.reference.stage='ref_logps': expected null with ref_sync"),
        # ref_sync on the dpo algorithm without dropping its cached reference
        (["algorithm=dpo", "algorithm.ref_sync.every=8"], "expected null with ref_sync"),
        (["algorithm=tr_dpo", "hardware=cpu_zero2"], "hardware.backend='deepspeed': expected ddp with ref_sync"),
        (["algorithm=tr_dpo", "train.save_every=4"], "save_every=4: expected 0 with ref_sync"),
        (["algorithm=ld_dpo", "algorithm.ld_alpha=1.5"], r"algorithm.ld_alpha=1.5: expected null or a number in \[0, 1\]"),
        (["algorithm=kto", "algorithm.loss.beta=0"], "algorithm.loss.beta=0: expected a number > 0"),
    ],
)
def test_settings_that_cannot_work_fail_at_compose_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose([*overrides, "model=tiny"])


# ---------------------------------------------------------------------- no reference, no reference pass


@pytest.fixture
def forwards(monkeypatch) -> dict[str, int]:
    """Counts forward passes of the tiny Llama; any reference computation or frozen model load fails."""
    calls = {"forward": 0}
    forward = LlamaForCausalLM.forward

    def counting(self, *args, **kwargs):
        calls["forward"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", counting)
    return calls


def test_reference_free_losses_run_no_reference_forward(base, forwards, monkeypatch):
    def no_reference(*_, **__):
        raise AssertionError("a reference-free loss must not compute reference log-probs")

    monkeypatch.setattr(ref_logps, "compute_reference_logps", no_reference)
    monkeypatch.setattr(StageContext, "load_frozen_policy", no_reference)
    # (simpo and cpo run the same stage code path; the graph test above shows they get no reference stage)
    result = run([*base, "algorithm=orpo", "algorithm.stages=[data_prep,dpo]", "train.max_steps=2"])
    assert [s.name for s in result.stages] == ["data_prep", "dpo"]
    # one forward per micro-batch, the policy's: 2 train steps + 32 eval pairs / 8
    assert forwards["forward"] == 2 + 32 // 8


def test_live_reference_runs_one_reference_forward_per_batch(base, forwards):
    result = run([*base, "algorithm=tr_dpo", "algorithm.stages=[data_prep,dpo]", "train.max_steps=2"])
    assert [s.name for s in result.stages] == ["data_prep", "dpo"]
    # the policy's and the live reference's forward on each of the 2 + 4 batches
    assert forwards["forward"] == 2 * (2 + 32 // 8)


# ----------------------------------------------------------------------------------------- TR-DPO


def _linear(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_live_reference_follows_the_policy_every_n_steps(alpha):
    reference, policy = _linear(0), _linear(1)
    start = [p.detach().clone() for p in reference.parameters()]
    live = LiveReference(reference, policy, every=3, alpha=alpha, chunk_size=8)
    live.after_optimizer_step()
    live.after_optimizer_step()
    assert all(torch.equal(r, s) for r, s in zip(reference.parameters(), start))  # 2 steps: untouched
    live.after_optimizer_step()
    for r, s, p in zip(reference.parameters(), start, policy.parameters()):
        # alpha = 1: a copy of the policy; alpha = 0.25: 0.25 * policy + 0.75 * the old reference
        assert torch.allclose(r, alpha * p + (1 - alpha) * s, atol=1e-7)


def test_live_reference_without_a_sync_is_cached_dpo(base):
    # the live reference is the input model until its first update: every step equals DPO's with the
    # cached reference log-probs (up to the float noise of other batch shapes)
    live = run([*base, "algorithm=tr_dpo", "algorithm.stages=[data_prep,dpo]", "algorithm.ref_sync.every=100"])
    cached = method_run("dpo", base)
    live_rows, cached_rows = train_rows(live, "dpo"), train_rows(cached, "dpo")
    assert live_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for a, b in zip(live_rows, cached_rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-4)


def test_hard_sync_makes_the_reference_the_policy(base):
    # every=2, alpha=1: right after step 2 the reference IS the policy, so step 3 starts from zero
    # implicit rewards again (loss log 2), while step 2 had moved away from them
    result = run([*base, "algorithm=tr_dpo", "algorithm.stages=[data_prep,dpo]", "train.max_steps=3",
                  "algorithm.ref_sync.every=2", "algorithm.ref_sync.alpha=1.0"])
    rows = train_rows(result, "dpo")
    assert abs(rows[1]["rewards/margins"]) > 1e-3
    assert abs(rows[2]["rewards/margins"]) < 1e-5 and rows[2]["loss"] == pytest.approx(math.log(2), abs=1e-5)


# ----------------------------------------------------------------------------------------- LD-DPO


def test_shared_prefix_marks_the_first_min_length_tokens():
    # 2 pairs, token counts: chosen [3, 2], rejected [4, 1] -> shared lengths [3, 1] (per pair)
    tokens = torch.tensor([3, 2, 4, 1])
    sequence = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    assert reference.shared_prefix(sequence, tokens).tolist() == [1, 1, 1, 1, 0, 1, 1, 1, 0, 1]
    # packed rows put sequences in any order; each one's tokens stay contiguous
    packed = torch.tensor([2, 2, 2, 2, 0, 0, 0, 3, 1, 1])
    assert reference.shared_prefix(packed, tokens).tolist() == [1, 1, 1, 0, 1, 1, 1, 1, 1, 0]


def test_ld_alpha_one_is_dpo_and_the_reference_holds_public_sums(base):
    dpo = method_run("dpo", base)
    one = run([*base, "algorithm=ld_dpo", "algorithm.stages=[data_prep,dpo]", "algorithm.ld_alpha=1.0"])
    for a, b in zip(train_rows(one, "dpo"), train_rows(dpo, "dpo"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # the reference artifact holds the public sums (over the pair's shared length): the shorter response
    # is public as a whole, the longer one's public sum leaves out its tail (log-probs < 0: it is larger)
    refs = reference.load_reference_logps(Path(dpo.stage("ref_logps").dir), "train")
    for r in refs:
        tails = [r[f"ref_{side}_public_logps"] - r[f"ref_{side}_logps"] for side in ("chosen", "rejected")]
        assert min(tails) == pytest.approx(0.0, abs=1e-6) and max(tails) >= 0
    assert any(r["ref_rejected_public_logps"] > r["ref_rejected_logps"] + 1e-3 for r in refs)


# -------------------------------------------------------------------------------------------- KTO


def test_kto_trains_on_the_demo_pairs_unpaired(base):
    result = method_run("kto", base)
    assert [(s.name, s.kind) for s in result.stages] == [
        ("data_prep", "data_prep"), ("ref_logps", "unpaired_ref_logps"), ("kto", "kto")
    ]
    prep = result.stage("data_prep").metrics
    # every kept pair becomes a desirable and an undesirable row
    rows = load_prepared(Path(result.stage("data_prep").dir), "unpaired", "train")
    assert len(rows) == 2 * prep["unpaired/train/kept"] and sum(r["desirable"] for r in rows) == len(rows) / 2
    refs = reference.load_reference_logps(Path(result.stage("ref_logps").dir), "train")
    assert len(refs) == len(rows) and set(refs[0]) == {"ref_logps", "ref_kl_logps"}
    first = train_rows(result, "kto")[0]
    # step 1: the policy is the reference, so r = 0 and z0 = 0: each row's loss is 1 - sigma(0) = 0.5
    assert first["loss"] == pytest.approx(0.5, abs=1e-4) and first["kl"] == pytest.approx(0.0, abs=1e-4)


def test_kto_reads_an_unpaired_file(base, tmp_path):
    def row(a: int, b: int, good: bool) -> dict:
        answer = a + b if good else a + b + 1 + a % 3
        return {"prompt": f"Q: What is {a} + {b}? A:", "completion": f" {answer}", "label": good}

    for split, offset in (("train", 0), ("eval", 100)):
        rows = [row(i + offset, 2 * i, i % 3 != 0) for i in range(24)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    local = ["data=local", f"data.train.path={tmp_path / 'train.jsonl'}", f"data.eval.path={tmp_path / 'eval.jsonl'}"]
    result = run([*base, *local, "algorithm=kto", "algorithm.stages=[data_prep,kto]", "train.max_steps=2"])
    prepared = load_prepared(Path(result.stage("data_prep").dir), "unpaired", "train")
    assert [r["desirable"] for r in prepared] == [float(i % 3 != 0) for i in range(24)]
    assert math.isfinite(result.stage("kto").metrics["eval/loss"])


def test_kto_bad_label_fails_before_any_model_loads(base, tmp_path, monkeypatch):
    rows = [{"prompt": "Q: 1 + 1? A:", "completion": " 2", "label": True}, {"prompt": "Q: 2 + 2?", "completion": " 4", "label": "yes"}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def no_model(*_, **__):
        raise AssertionError("no model may load before the data is checked")

    monkeypatch.setattr(StageContext, "load_policy", no_model)
    with pytest.raises(DataError, match=r"bad.jsonl.*row 1: column 'label': expected a bool"):
        run([*base, "data=local", f"data.train.path={path}", "algorithm=kto", "algorithm.stages=[data_prep,kto]"])


# --------------------------------------------------------------------- every method learns on the demo


# method -> (its overrides, the stage that trains)
METHODS = {
    "dpo": (["algorithm=dpo"], "dpo"),
    "kto": (["algorithm=kto"], "kto"),
    "apo_zero_unpaired": (["algorithm=kto", "algorithm.loss._target_=align_runner.algos.kto.apo_zero_unpaired_loss"], "kto"),
    # reference-free: the demo's held-out pairs need a gentler rate over more steps (see below)
    "orpo": (["algorithm=orpo", "train.max_steps=16", "algorithm.train.lr=3e-4"], "dpo"),
    "simpo": (["algorithm=simpo", "train.max_steps=16", "algorithm.train.lr=3e-4"], "dpo"),
    "aot": (["algorithm=aot"], "dpo"),
    "aot_unpaired": (["algorithm=aot", "algorithm.loss._target_=align_runner.algos.dpo.aot_unpaired_loss"], "dpo"),
    "discopop": (["algorithm=discopop"], "dpo"),
    "sigmoid_norm": (["algorithm=sigmoid_norm"], "dpo"),
    "fdpo": (["algorithm=fdpo"], "dpo"),
    "wpo": (["algorithm=wpo"], "dpo"),
    "ld_dpo": (["algorithm=ld_dpo"], "dpo"),
    "tr_dpo": (["algorithm=tr_dpo", "algorithm.ref_sync.every=4"], "dpo"),
}
# CPO is not in METHODS: no setting of its own objective raises the accuracy it reports, because its
# reward is the summed log-prob u = logp(chosen) - logp(rejected) and the input model's u on the 32
# held-out pairs is bimodal: 16 "verbose" pairs (rejected = a ~26-token explanation, u = 156..169 nats,
# about 6.2 = log 512 per extra token of the random model) are all right already, and 16 wrong-sum pairs
# ("40" vs "39": same length, |u| < 0.8) are a coin flip, 10 of 16 right: start 26/32. Only the
# wrong-sum pairs can gain, and only by learning which of two nearby numbers is a + b on unseen sums.
# No sigmoid is saturated where it matters (beta u ~ 16 only on pairs already right; |beta u| < 0.1 on
# the others at beta <= 0.1), so a smaller beta changes nothing. Measured (start at lr 1e-12: 0.8125):
# 16 steps at lr 3e-4: beta 0.1 alpha 1 (the paper's / TRL's CPOConfig defaults) 0.72, alpha 0 0.72,
# beta 1 0.66, beta 0.006 (1 / the verbose margin) 0.72; lr 1e-3 beta 1 alpha 0 0.72; 8 steps at 1e-3
# 0.69; on all 512 train pairs at lr 3e-4: 64 steps beta 1 alpha 0 0.84 (27/32, one pair), beta 0.1
# alpha 1 0.81; 128 steps beta 1: alpha 0 0.81, alpha 1 0.75.
# Its loss is checked by hand in test_algos_dpo.py; its graph (no reference stage) above.
REFERENCE_FREE = {"orpo", "simpo"}
_RUNS: dict[str, object] = {}


def method_run(method: str, base: list[str]):
    """The method's run on the demo pairs, once per module (later tests read the same result)."""
    overrides, stage = METHODS[method]
    if method not in _RUNS:  # ``base`` differs between tests only in the outputs dir
        _RUNS[method] = run([*base, *overrides, f"algorithm.stages=[data_prep,{stage}]"])
    return _RUNS[method]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_raises_held_out_implicit_reward_accuracy(method, base):
    overrides, stage = METHODS[method]
    if method in REFERENCE_FREE:
        # the reward is the policy's own length-normalised log-prob: the input model already ranks some
        # pairs right. Its accuracy: one step at lr 1e-12 (0 is refused) leaves the weights as they were
        pipeline = [*base, *overrides, f"algorithm.stages=[data_prep,{stage}]"]
        before = run([*pipeline, "train.max_steps=1", "algorithm.train.lr=1e-12"]).stage(stage).metrics
        start, least = before["eval/rewards/accuracies"], 0.06  # at least 2 more of the 32 pairs
    else:
        # the reward is beta * log(pi / pi_ref) and the policy starts as the reference: every reward is 0
        # and no held-out pair (KTO: no row) is on its right side
        start, least = 0.0, 0.5
    after = method_run(method, base).stage(stage).metrics["eval/rewards/accuracies"]
    print(f"{method}: held-out implicit-reward accuracy {start:.3f} -> {after:.3f}")
    assert after >= start + least, (start, after)
