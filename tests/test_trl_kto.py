"""align_runner.trl for KTO and the DPO loss options of TRL 1.16: KTOConfig / KTOTrainer / `align-runner kto`
on algorithm=kto, and each DPOConfig loss_type (and its neighbours: loss_weights, f-divergences, WPO,
LD-DPO, TR-DPO's reference sync) composed into the align_runner loss it names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from datasets import Dataset
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from align_runner import api
from align_runner.trl import cli
from align_runner.trl.fields import defaults
from align_runner.trl.overrides import build
from align_runner.validate import ConfigError

DPO, KTO = "align_runner.algos.dpo.", "align_runner.algos.kto."


@pytest.fixture
def pairs(tmp_path) -> str:
    """A local preference file (data prep reads its first row while composing)."""
    rows = [{"prompt": f"{i} + 1 =", "chosen": f" {i + 1}", "rejected": " no idea"} for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def algorithm(kind: str, data: str, **values) -> dict:
    """The composed ``algorithm`` node of a TRL config of ``kind`` with ``values`` (nothing runs)."""
    overrides = build(kind, {**defaults(kind), **values}, model="org/model", train={"path": data})
    return OmegaConf.to_container(api.compose(overrides).algorithm, resolve=True)


def unpaired(n: int) -> Dataset:
    """trl-lib/kto-mix-14k's schema: prompt, completion, label (here every other row desirable)."""
    return Dataset.from_list([{"prompt": f"What is {i} + 1?", "completion": f" {i + 1}" if i % 2 == 0 else " no idea",
                               "label": i % 2 == 0} for i in range(n)])


def train_losses(stage_dir: str) -> list[float]:
    rows = [json.loads(line) for line in (Path(stage_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "lr" in r]


# ------------------------------------------------------------------------------------------- KTO
def test_kto_config_has_trl_defaults_and_maps_onto_algorithm_kto(pairs):
    from align_runner.trl import KTOConfig

    args = KTOConfig()
    assert (args.beta, args.desirable_weight, args.undesirable_weight, args.loss_type) == (0.1, 1.0, 1.0, "kto")
    assert (args.learning_rate, args.max_length, args.sync_ref_model) == (1e-6, 1024, False)
    a = algorithm("kto", pairs, loss_type="apo_zero_unpaired", beta=0.2, desirable_weight=1.33, learning_rate=1e-3)
    assert a["name"] == "kto" and a["stages"] == ["data_prep", "kto"] and a["train"]["lr"] == 1e-3
    assert a["loss"] == {"_target_": KTO + "apo_zero_unpaired_loss", "_partial_": True, "beta": 0.2,
                         "desirable_weight": 1.33, "undesirable_weight": 1.0}
    assert algorithm("kto", pairs)["loss"]["_target_"] == KTO + "kto_loss"


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"loss_type": "bco"}, "loss_type='bco': expected one of kto, apo_zero_unpaired"),
        # TRL's KTO syncs its reference (TR-DPO); align_runner's live reference is DPO's only
        ({"sync_ref_model": True}, "sync_ref_model=True is not supported; align_runner accepts only False"),
        ({"ref_model_sync_steps": 8}, "'ref_model_sync_steps' is not supported by align_runner's kto trainer"),
    ],
)
def test_kto_fields_align_runner_lacks_are_named(kwargs, named):
    from align_runner.trl import KTOConfig

    with pytest.raises(ConfigError, match=re.escape(named)):
        KTOConfig(**kwargs)


@pytest.mark.usefixtures("one_thread", "outputs_here")
def test_kto_trainer_trains_unpaired_rows_then_pairs(tiny_dir):
    from align_runner.trl import KTOConfig, KTOTrainer

    args = KTOConfig(output_dir="kto-out", max_steps=2, per_device_train_batch_size=8, logging_steps=1,
                     learning_rate=1e-3, desirable_weight=2.0, gradient_checkpointing=False, disable_tqdm=True)
    trainer = KTOTrainer(model=tiny_dir, args=args, train_dataset=unpaired(8))
    out = trainer.train()

    assert out.global_step == 2
    assert [s.name for s in trainer.run_result.stages] == ["data_prep", "ref_logps", "kto"]
    # step 1: the policy is the reference (r = 0, z0 = 0), each row's loss w * (1 - sigma(0)) = w / 2;
    # the batch is all 8 rows, 4 desirable (w 2) and 4 undesirable (w 1): (4 * 1 + 4 * 0.5) / 8
    losses = train_losses(trainer.run_result.stage("kto").dir)
    assert losses[0] == pytest.approx(0.75, abs=1e-4) and losses[1] != pytest.approx(0.75, abs=1e-4)
    trained = AutoModelForCausalLM.from_pretrained("kto-out")
    assert trained.config.vocab_size == AutoModelForCausalLM.from_pretrained(tiny_dir).config.vocab_size

    # preference pairs: each pair a desirable and an undesirable row, so 4 pairs are the same 8-row batch
    paired = Dataset.from_list([{"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}", "rejected": " no idea"}
                                for i in range(4)])
    run = KTOTrainer(model=tiny_dir, args=args, train_dataset=paired).train()
    assert run.global_step == 2 and run.metrics["train_loss"] == pytest.approx(run.training_loss)


def test_kto_command_flags_match_the_python_trainer(pairs):
    kind, values, native = cli.parse(["kto", "--loss_type", "apo_zero_unpaired", "--undesirable_weight", "1.5",
                                      "--model_name_or_path", "org/model", "--dataset_name", pairs, "seed=3"])
    assert (kind, native) == ("kto", ["seed=3"])
    built = cli.overrides(kind, values, native)
    assert {f"algorithm.loss._target_={KTO}apo_zero_unpaired_loss", "algorithm.loss.undesirable_weight=1.5",
            "algorithm=kto", "algorithm.stages=[data_prep,kto]"} <= set(built) and built[-1] == "seed=3"


def test_align_runner_kto_is_a_command():
    from align_runner.cli import COMMANDS

    assert COMMANDS["kto"] == "align_runner.trl.cli"


# ---------------------------------------------------------------------------------- DPO losses
# every loss_type TRL 1.16's DPOConfig names, and the align_runner.algos.dpo function it becomes
TRL_DPO_LOSSES = {
    "sigmoid": "sigmoid_loss", "hinge": "hinge_loss", "ipo": "ipo_loss", "exo_pair": "exo_loss",
    "nca_pair": "nca_loss", "robust": "robust_loss", "bco_pair": "bco_pair_loss", "sppo_hard": "sppo_hard_loss",
    "aot": "aot_loss", "aot_unpaired": "aot_unpaired_loss", "apo_zero": "apo_zero_loss", "apo_down": "apo_down_loss",
    "discopop": "discopop_loss", "sft": "sft_loss", "sigmoid_norm": "sigmoid_norm_loss",
}


@pytest.mark.parametrize("loss_type", sorted(TRL_DPO_LOSSES))
def test_each_trl_dpo_loss_type_composes_into_its_function(loss_type, pairs):
    a = algorithm("dpo", pairs, loss_type=[loss_type], beta=0.25)
    assert a["loss"]["_target_"] == DPO + TRL_DPO_LOSSES[loss_type] and a["loss"]["beta"] == 0.25
    # the sft term alone reads no reference: no ref_logps stage
    assert a["reference"]["stage"] == (None if loss_type == "sft" else "ref_logps")


def test_discopop_tau_and_label_smoothing_go_where_they_apply(pairs):
    assert algorithm("dpo", pairs, loss_type=["discopop"], discopop_tau=0.2)["loss"] == {
        "_target_": DPO + "discopop_loss", "_partial_": True, "beta": 0.1, "tau": 0.2}
    assert algorithm("dpo", pairs, loss_type=["aot"], label_smoothing=0.1)["loss"]["label_smoothing"] == 0.1
    with pytest.raises(ConfigError, match=re.escape("label_smoothing=0.1 does not apply to loss_type='sigmoid_norm'")):
        algorithm("dpo", pairs, loss_type=["sigmoid_norm"], label_smoothing=0.1)


def test_several_loss_types_are_a_weighted_mixture(pairs):
    # MPO as in TRL's docs: sigmoid + bco_pair + sft, weights 0.8, 0.2, 1.0
    a = algorithm("dpo", pairs, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.3)
    assert a["loss"] == {
        "_target_": DPO + "mixture_loss", "_partial_": True, "weights": [0.8, 0.2, 1.0],
        "losses": [{"_target_": DPO + "sigmoid_loss", "_partial_": True, "beta": 0.3, "label_smoothing": 0.0},
                   {"_target_": DPO + "bco_pair_loss", "_partial_": True, "beta": 0.3},
                   {"_target_": DPO + "sft_loss", "_partial_": True, "beta": 0.3}],
    }
    assert a["reference"]["stage"] == "ref_logps"  # sigmoid and bco_pair read it
    assert algorithm("dpo", pairs, loss_type=["ipo", "sft"])["loss"]["weights"] == [1.0, 1.0]  # None: 1.0 each
    with pytest.raises(ConfigError, match=r"loss_weights has 1 values for the 2 loss types \['ipo', 'sft'\]"):
        algorithm("dpo", pairs, loss_type=["ipo", "sft"], loss_weights=[1.0])


def test_f_divergences_map_onto_f_divergence_loss(pairs):
    a = algorithm("dpo", pairs, f_divergence_type="js_divergence")
    assert a["loss"] == {"_target_": DPO + "f_divergence_loss", "_partial_": True, "beta": 0.1,
                         "divergence": "js_divergence", "alpha": 0.5}
    # TRL's alpha-divergence f'(t) = (t^(c-1) - 1) / (c - 1) is ours (1 - t^-alpha) / alpha at alpha = 1 - c
    assert algorithm("dpo", pairs, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.25)["loss"]["alpha"] == 0.75
    with pytest.raises(ConfigError, match="f_divergence_type='forward_kl' with loss_type='hinge': align_runner implements"):
        algorithm("dpo", pairs, f_divergence_type="forward_kl", loss_type=["hinge"])
    with pytest.raises(ConfigError, match=r"f_alpha_divergence_coef=1.5: expected a number in \(0, 1\)"):
        algorithm("dpo", pairs, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.5)


def test_wpo_ld_dpo_and_tr_dpo_fields(pairs):
    a = algorithm("dpo", pairs, use_weighting=True, ld_alpha=0.5)
    assert (a["use_weighting"], a["ld_alpha"], a["ref_sync"]["every"]) == (True, 0.5, None)
    # TR-DPO: a live reference synced every ref_model_sync_steps, mixed by ref_model_mixup_alpha; no ref_logps
    a = algorithm("dpo", pairs, sync_ref_model=True, ref_model_sync_steps=4, ref_model_mixup_alpha=0.5, save_strategy="no")
    assert (a["ref_sync"], a["reference"]["stage"]) == ({"every": 4, "alpha": 0.5}, None)
    with pytest.raises(ConfigError, match="sync_ref_model=True: the live reference is not checkpointed .* save_strategy='no'"):
        algorithm("dpo", pairs, sync_ref_model=True)


def test_a_loss_name_trl_lacks_is_named():
    from align_runner.trl import DPOConfig

    with pytest.raises(ConfigError, match=re.escape("loss_type=['kto']: expected one of sigmoid, robust")):
        DPOConfig(loss_type=["kto"])
