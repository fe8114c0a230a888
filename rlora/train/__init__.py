"""Training an adapter on a mixture of datasets: the settings and their YAML form (`config`),
the loop (`loop`), its checkpoints (`checkpoint`) and the evaluation of each task (`evaluate`)."""

from .config import MixtureEntry, TrainConfig, TrainingSettings, field_path, read_train_config
from .loop import Progress, TrainingCancelled, train

__all__ = [
    "MixtureEntry",
    "Progress",
    "TrainConfig",
    "TrainingCancelled",
    "TrainingSettings",
    "field_path",
    "read_train_config",
    "train",
]
