"""Training an adapter on a mixture of datasets: the settings (`config`) and the loop (`loop`)."""

from .config import MixtureEntry, TrainConfig, TrainingSettings
from .loop import Progress, TrainingCancelled, train

__all__ = ["MixtureEntry", "Progress", "TrainConfig", "TrainingCancelled", "TrainingSettings", "train"]
