"""The dataset layer: reading and validating records (`records`), the task mixture (`mixture`),
and tokenization with answer-only labels (`tokenize`). Nothing here knows about HTTP, Celery
or the database."""

from .mixture import MixtureSampler, MixtureSource, split_validation, steps_for_epochs
from .records import (
    IGNORE_INDEX,
    DatasetSummary,
    DatasetValidationError,
    Example,
    RecordError,
    load_dataset,
    lone_surrogate,
    validate_dataset,
)
from .tokenize import Collator, encode_example, left_pad, prompt_ids, with_bos

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "DatasetSummary",
    "DatasetValidationError",
    "Example",
    "MixtureSampler",
    "MixtureSource",
    "RecordError",
    "encode_example",
    "left_pad",
    "load_dataset",
    "lone_surrogate",
    "prompt_ids",
    "split_validation",
    "steps_for_epochs",
    "validate_dataset",
    "with_bos",
]
