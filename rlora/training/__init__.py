"""Training an adapter on a mixture of datasets: the settings and their YAML form (`config`),
the bounds on a run (`limits`), the loop (`loop`), its checkpoints (`checkpoint`) and the
evaluation of each task (`evaluate`). Names are imported on first use: checking a config needs no torch."""

from .._exports import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["MixtureEntry", "TrainConfig", "TrainingSettings", "field_path", "read_train_config"], ".config"),
    **dict.fromkeys(["Progress", "TrainingCancelled", "train"], ".loop"),
    **dict.fromkeys(["LimitProblem", "TrainingLimits", "limit_problems"], ".limits"),
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
