"""TRL's Python API on align_runner's pipeline: change ``from trl import ...`` to
``from align_runner.trl import ...``. Fields and flags: ``align_runner.trl.fields``."""

from align_runner.trl.configs import DPOConfig, GRPOConfig, KTOConfig, RewardConfig, SFTConfig
from align_runner.trl.trainers import DPOTrainer, GRPOTrainer, KTOTrainer, RewardTrainer, SFTTrainer

__all__ = ["DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer", "KTOConfig", "KTOTrainer", "RewardConfig",
           "RewardTrainer", "SFTConfig", "SFTTrainer"]
