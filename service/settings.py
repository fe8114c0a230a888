"""The service's settings: one class, read from ``RLORA_*`` environment variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RLORA_", extra="ignore")

    home: Path = Field(Path("~/.rlora"), description="data root: database, files, jobs, broker")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite under home")
    broker_url: str | None = Field(None, description="Celery broker; default an embedded one under home")
    models_dir: Path | None = Field(None, description="folders of Hugging Face models, by name")

    # Limits on what a tenant may send.
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    max_json_bytes: int = Field(1024 * 1024, ge=1, description="any request body but a file upload (413 above)")
    max_record_chars: int = Field(100_000, ge=1)
    max_record_messages: int = Field(256, ge=1, description="messages (turns) in one chat record")
    max_active_jobs_per_tenant: int = Field(100, ge=1, description="queued plus running jobs")
    page_size_max: int = Field(100, ge=1)

    # Limits on the work one job may ask for (a 422 naming the field over one), sized so that
    # a 2-core machine and a 24 GB GPU stay usable for every tenant; the base model's context
    # bounds max_seq_len besides.
    max_steps: int = Field(100_000, ge=1, description="optimiser steps of one job (max_steps, or what its epochs come to)")
    max_tokens_per_step: int = Field(131_072, ge=1, description="batch_size x gradient_accumulation_steps x max_seq_len")
    max_heads_x_rank: int = Field(256, ge=1, description="adapter heads x rank")
    max_adapter_params_per_layer: int = Field(4_194_304, ge=1, description="adapter parameters (and frozen buffers) on one adapted layer")
    gpu_memory_bytes: int | None = Field(
        None, ge=1, description="memory of one GPU of the gpu workers: a job whose estimate is over it is refused (422); "
        "unset: not checked"
    )
    cpu_memory_bytes: int | None = Field(
        None, ge=1, description="memory a cpu worker may give one job: a job whose estimate is over it is refused (422); "
        "unset: not checked"
    )
    max_eval_new_tokens: int = Field(256, ge=1, description="eval_max_new_tokens")
    max_eval_examples: int = Field(256, ge=0, description="eval_max_examples: validation examples evaluated (greedy) per task")
    max_job_seconds: float = Field(86_400.0, gt=0, description="wall-clock of one attempt at a job; past it the job fails")
    max_job_attempts: int = Field(3, ge=1, description="a job whose worker is lost this many times fails instead of being queued again")
    # Per-tenant quotas on what a tenant keeps (service.jobs.quotas); 403 quota_exceeded past one.
    quota_stored_bytes: int = Field(10 * 1024**3, ge=1, description="dataset files plus adapter folders, in bytes")
    quota_files: int = Field(1000, ge=1, description="dataset files")
    quota_adapters: int = Field(200, ge=1, description="adapters, counting those its queued and running jobs will make")
    quota_jobs: int = Field(10_000, ge=1, description="jobs in any status")

    # Job routing: queue names are "<queue_prefix>.<device class>" (service.jobs.queue).
    queue_prefix: str = Field("rlora", pattern=r"^[A-Za-z0-9_.\-]+$")
    auto_device_class: Literal["cpu", "gpu"] = Field("cpu", description="queue for device 'auto' jobs")
    worker_queues: str | None = Field(None, description="comma-separated device classes a worker takes")

    # Worker timing, in seconds.
    progress_interval: float = Field(2.0, gt=0, description="least time between progress writes")
    heartbeat_interval: float = Field(10.0, gt=0)
    heartbeat_timeout: float = Field(120.0, gt=0, description="a running job silent this long is presumed lost")
    reconcile_interval: float = Field(30.0, gt=0)

    # Inference (/generate): one engine per API process, or per accelerator in `rlora engine`
    # processes (engine_* below); base models loaded on first use.
    default_base_model: str = Field("tiny", description="the base model of requests that name no adapter")
    inference_device: str | None = Field(None, description="e.g. cpu, cuda, cuda:1; default cuda when available")
    inference_quantization: Literal["none", "nf4", "int8"] = Field(
        "none", description="the form base models are served in (bitsandbytes); adapters trained over a quantized base "
        "are served over the base in their form whatever this says"
    )
    adapter_cache_bytes: int = Field(1 << 30, ge=1, description="adapters kept loaded (LRU), in bytes")
    max_input_tokens: int | None = Field(None, ge=1, description="default: the model's context length - 1")
    max_total_tokens: int | None = Field(None, ge=2, description="prompt + new tokens; default: the model's context length")
    max_new_tokens: int = Field(2048, ge=1, description="the most a request may ask for")
    max_batch_size: int = Field(64, ge=1, description="requests decoded together per base model (KV cache rows)")
    max_batch_adapters: int = Field(16, ge=1, description="distinct adapters decoded together per base model (slot table size)")
    max_prefill_tokens: int = Field(4096, ge=1, description="prompt tokens in one prefill pass while nothing decodes (its masks grow with it times the context)")
    prefill_chunk_tokens: int = Field(512, ge=1, description="prompt tokens per pass while requests decode: long prompts go in chunks")
    # One tenant among many, per base model: its share of the generation queue and of the batch.
    max_pending_generations_per_tenant: int = Field(256, ge=1, description="a tenant's waiting generation requests; more: 429")
    max_running_generations_per_tenant: int = Field(32, ge=1, description="a tenant's requests decoding at once; more wait, the others' go first")
    max_generated_tokens_per_second_per_tenant: float | None = Field(None, gt=0, description="a tenant's generated tokens per second (unset: no cap)")

    # Scheduling: the broker carries one token per startable job; the database picks the job.
    max_running_jobs_per_tenant: int = Field(4, ge=1, description="a tenant's jobs running at once; the rest wait")
    queue_check_interval: float = Field(3.0, gt=0, description="seconds between comparisons of broker tokens with startable jobs")

    # The API tier under load (timeouts in seconds).
    api_threads: int = Field(40, ge=1, description="threads per API process for blocking work (database, files)")
    database_pool_timeout: float = Field(5.0, gt=0, description="longest wait for a pooled connection (503 after)")
    body_idle_timeout: float = Field(30.0, gt=0, description="longest pause within a request body (408 after)")
    body_min_rate: int = Field(1024, ge=1, description="bytes per second a body must average once body_idle_timeout has passed")
    ready_timeout: float = Field(3.0, gt=0, description="longest wait of /ready for the database and for the broker")
    staging_max_age: float = Field(3600.0, gt=0, description="staged uploads and downloads older than this are swept at start")
    inference_in_api: bool = Field(True, description="serve /generate from API processes (false: 503 there)")

    # Engine processes (`rlora engine`): one per accelerator, holding the base models; API
    # processes given their URLs forward generation to them instead of holding an engine.
    engine_urls: str | None = Field(None, description="comma-separated base URLs of `rlora engine` processes")
    engine_host: str = Field("127.0.0.1", description="address `rlora engine` listens on")
    engine_port: int = Field(8200, ge=1, le=65535, description="port `rlora engine` listens on")
    engine_token: str | None = Field(None, repr=False, description="shared secret between the API and its engines")
    engine_connect_timeout: float = Field(2.0, gt=0, description="longest wait to connect to an engine (then the next one)")
    engine_refresh_interval: float = Field(5.0, gt=0, description="seconds between asking engines which base models they hold")

    # Operations: logs (service.logs) and the workers' metrics (service.metrics; the API and the
    # engines serve theirs at /metrics on their own port).
    log_format: Literal["auto", "json", "text"] = Field("auto", description="auto: text when stderr is a terminal, else JSON lines")
    log_level: Literal["debug", "info", "warning", "error"] | None = Field(
        None, description="`rlora --log-level` wins; unset: info for serve, engine and worker, warning for the other commands",
    )
    worker_metrics_port: int | None = Field(None, ge=1, le=65535, description="port of a worker's /metrics (unset: none)")

    # Operators: the admin routes (/v1/admin/...) are mounted only when this is set.
    admin_token: str | None = Field(None, min_length=32, repr=False, description="bearer token of the admin routes")

    @model_validator(mode="after")
    def _heartbeat_fits(self) -> "Settings":
        if self.heartbeat_timeout <= 2 * self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must exceed twice heartbeat_interval, or live jobs look lost")
        return self

    @field_validator("engine_urls")
    @classmethod
    def _engine_urls(cls, value: str | None) -> str | None:
        urls = [url.strip().rstrip("/") for url in (value or "").split(",") if url.strip()]
        bad = [url for url in urls if not url.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"engine URLs start with http:// or https://, got {', '.join(bad)}")
        return ",".join(urls) or None  # empty: unset

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_name(cls, value: str | None) -> str | None:
        return value.lower() if isinstance(value, str) else value

    @field_validator("engine_token", "admin_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("home", "models_dir")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'rlora.db'}"

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None

    @property
    def engine_url_list(self) -> list[str]:
        return self.engine_urls.split(",") if self.engine_urls else []

    @property
    def files_dir(self) -> Path:
        return self.home / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def tmp_dir(self) -> Path:
        # Uploads are staged here, on the same filesystem as files_dir, so the final
        # rename into place is atomic.
        return self.home / "tmp"

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def cache_dir(self) -> Path:
        # Where built-in models (tiny) are built; the same place `rlora train` uses.
        return self.home / "models"

    def prepare_dirs(self) -> None:
        # Private to the service's user (tenants' data), whatever the process's umask.
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in (self.files_dir, self.jobs_dir, self.tmp_dir, self.cache_dir):
            folder.mkdir(mode=0o700, exist_ok=True)
        # A home made before files were private (0755) is closed too: the home's mode guards all
        # below it. Not when another user owns it (a shared mount the operator set up).
        if self.home.stat().st_uid == os.getuid() and self.home.stat().st_mode & 0o077:
            os.chmod(self.home, 0o700)


@lru_cache
def get_settings() -> Settings:
    """The settings of this process, from the environment."""
    return Settings()
