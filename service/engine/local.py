"""The in-process `rlora.serve.InferenceEngine`, made from the settings: what `rlora engine`
holds, and what an API process holds in the embedded default."""

from __future__ import annotations

from rlora.serve import InferenceEngine, Limits, ServingObserver

from service.metrics import BATCH_SIZE, GENERATED_TOKENS, GENERATION_REQUESTS, TIME_TO_FIRST_TOKEN
from service.settings import Settings


class PrometheusServingObserver(ServingObserver):
    """The engine's reports as the generation metrics (`service.metrics`)."""

    def decode_step(self, base_model: str, rows: int) -> None:
        BATCH_SIZE.labels(base_model).observe(rows)

    def first_token(self, base_model: str, seconds: float) -> None:
        TIME_TO_FIRST_TOKEN.labels(base_model).observe(seconds)

    def tokens_generated(self, base_model: str, count: int) -> None:
        GENERATED_TOKENS.labels(base_model).inc(count)

    def request_finished(self, base_model: str, finish_reason: str) -> None:
        GENERATION_REQUESTS.labels(base_model, finish_reason).inc()


def engine_limits(settings: Settings) -> Limits:
    return Limits(
        max_input_tokens=settings.max_input_tokens,
        max_total_tokens=settings.max_total_tokens,
        max_new_tokens=settings.max_new_tokens,
        max_batch_size=settings.max_batch_size,
        max_batch_adapters=settings.max_batch_adapters,
        max_prefill_tokens=settings.max_prefill_tokens,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        max_pending_per_tenant=settings.max_pending_generations_per_tenant,
        max_running_per_tenant=settings.max_running_generations_per_tenant,
        max_tokens_per_second_per_tenant=settings.max_generated_tokens_per_second_per_tenant,
    )


def make_engine(settings: Settings, device: str | None = None) -> InferenceEngine:
    """The engine on ``device``, by default the ``inference_device`` setting."""
    return InferenceEngine(
        models_dir=settings.models_dir,
        cache_dir=settings.cache_dir,
        adapter_cache_bytes=settings.adapter_cache_bytes,
        device=device or settings.inference_device,
        limits=engine_limits(settings),
        default_base_model=settings.default_base_model,
        observer=PrometheusServingObserver(),
        quantization=settings.inference_quantization,
    )
