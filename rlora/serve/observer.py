"""`ServingObserver`: what an engine reports as it serves, for its caller's metrics.

The library keeps no metrics of its own and imports no metrics client: the engine calls these
methods (they do nothing here) and a caller subclasses it to count (the service's Prometheus
metrics, `service.metrics`). The adapter cache counts its hits, misses and evictions itself
(`AdapterCache.hits`, ...), read from `InferenceEngine.stats()` when wanted.
"""

from __future__ import annotations


class ServingObserver:
    """Called from the engine's threads (a base model's decode loop and output thread): an
    override must be quick and must not raise."""

    def decode_step(self, base_model: str, rows: int) -> None:
        """One decode step ran over ``rows`` requests (the batch size)."""

    def first_token(self, base_model: str, seconds: float) -> None:
        """A request's first token is out, ``seconds`` after it was submitted (time to first token)."""

    def tokens_generated(self, base_model: str, count: int) -> None:
        """``count`` more tokens were handed to requests."""

    def request_finished(self, base_model: str, finish_reason: str) -> None:
        """A request finished with ``finish_reason`` (length, eos_token, stop_sequence); those
        that fail or are cancelled are not reported."""
