"""Training stage: `TrainConfig` and `train` (full, LoRA, QLoRA), and `merge_adapter`.

Called, the package is `calltune.api.train`: ``calltune.train(recipe)`` (see `calltune.callable_package`).
"""

from calltune.callable_package import make_callable
from calltune.train.config import LoraSettings, TrainConfig

_TRAINER = ("TrainResult", "merge_adapter", "train")


def __getattr__(name: str):
    # The trainer imports torch and transformers: loaded on first use, so configs stay light.
    if name in _TRAINER:
        from calltune.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LoraSettings", "TrainConfig", "TrainResult", "merge_adapter", "train"]

make_callable(__name__, "train")
