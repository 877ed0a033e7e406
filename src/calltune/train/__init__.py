"""Training stage: `TrainConfig` and `train` (full, LoRA, QLoRA), and `merge_adapter`."""

from calltune.train.config import LoraSettings, TrainConfig
from calltune.train.trainer import TrainResult, merge_adapter, train

__all__ = ["LoraSettings", "TrainConfig", "TrainResult", "merge_adapter", "train"]
