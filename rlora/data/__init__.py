"""The dataset layer: reading and validating records (`records`), the task mixture (`mixture`),
and tokenization with answer-only labels (`tokenize`). Nothing here knows about HTTP, Celery
or the database. Names are imported on first use: checking a file needs no torch."""

from .._exports import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["MixtureSampler", "MixtureSource", "epoch_steps", "held_out_count", "split_validation", "steps_for_epochs"], ".mixture"),
    **dict.fromkeys(
        ["DatasetSummary", "DatasetValidationError", "Example", "RecordError", "check_dataset", "load_dataset", "lone_surrogate",
         "validate_dataset"],
        ".records",
    ),
    **dict.fromkeys(
        ["IGNORE_INDEX", "Collator", "chat_prompt", "encode_example", "left_pad", "prompt_ids", "with_bos"], ".tokenize"
    ),
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
