"""TRL's Python API on align_runner's pipeline: change ``from trl import ...`` to
``from align_runner.trl import ...``. Fields and flags: ``align_runner.trl.fields``."""

from align_runner.trl.configs import DPOConfig, GRPOConfig, RewardConfig, SFTConfig
from align_runner.trl.trainers import DPOTrainer, GRPOTrainer, RewardTrainer, SFTTrainer

__all__ = ["DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer", "RewardConfig", "RewardTrainer", "SFTConfig", "SFTTrainer"]
