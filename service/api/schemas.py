"""Request and response bodies of the HTTP API (apart from the database models)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, computed_field, field_validator

from service.jobs.requests import JobRequest
from service.keys import LAST_USED_RESOLUTION, MAX_ROTATION_GRACE, KeyState, key_state
from service.models import ApiKey, utcnow

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    next_cursor: str | None = Field(None, description="pass as ?after= for the next page")

    @computed_field(description="whether there is a next page (OpenAI's name for a next_cursor)")
    @property
    def has_more(self) -> bool:
        return self.next_cursor is not None


def unix_seconds(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


class FileOut(BaseModel):
    """A dataset file: OpenAI's file object (its ``purpose`` is always ``fine-tune``, and a file
    is ``processed`` once stored: it is checked whole before that), plus what the check found."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["file"] = "file"
    filename: str
    bytes: int
    created_at: int = Field(description="Unix seconds, as OpenAI's file object")
    purpose: Literal["fine-tune"] = "fine-tune"
    status: Literal["processed"] = "processed"
    sha256: str
    format: str
    records: int
    tasks: dict[str, int]
    shapes: dict[str, int]

    @field_validator("created_at", mode="before")
    @classmethod
    def _unix_seconds(cls, value: Any) -> Any:
        return unix_seconds(value) if isinstance(value, datetime) else value


class JobCreate(JobRequest):
    """The body of ``POST /v1/jobs``: a job request as the job domain defines it."""


class Progress(BaseModel):
    step: int | None
    total_steps: int | None
    loss: float | None
    learning_rate: float | None
    tokens_per_second: float | None
    eta_seconds: float | None


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: str
    base_model: str
    mixture: list[dict[str, Any]]
    adapter: dict[str, Any]
    training: dict[str, Any]
    cancel_requested: bool
    attempt: int
    phase: str | None = Field(
        None, description="what a running job is doing: preparing, training, evaluating or saving (null unless running)"
    )
    progress: Progress | None
    metrics: dict[str, Any] | None
    adapter_id: str | None
    error: JobError | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    object: Literal["job.event"] = "job.event"
    kind: str
    data: dict[str, Any]
    created_at: datetime


class JobMetrics(BaseModel):
    job_id: str
    status: str
    final: bool = Field(description="true once the job succeeded and these are its recorded metrics")
    train_loss: list[dict[str, Any]]
    metrics: dict[str, Any] | None


class AdapterOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["adapter"] = "adapter"
    job_id: str
    base_model: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    head_similarity: dict[str, Any] | None
    routing: dict[str, Any] | None
    eval: dict[str, Any] | None
    created_at: datetime

    @computed_field(description="the form of the base model it was trained over: none, nf4 or int8 (QLoRA)")
    @property
    def base_model_quantization(self) -> str:
        return self.config.get("base_model_quantization", "none")

    @computed_field(description="how it is served, where that is not plainly over the base model")
    @property
    def serving_note(self) -> str | None:
        if self.base_model_quantization == "none":
            return None
        return (f"trained over a {self.base_model_quantization}-quantized base: served over the base loaded the same way; "
                "it also loads over the full-precision base (rlora.load), as QLoRA adapters are used")


class KeyOut(BaseModel):
    """An API key as listed: never the key itself, which is shown only when it is made."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["api_key"] = "api_key"
    prefix: str = Field(description="the key's first characters, to recognise it")
    name: str | None
    created_at: datetime
    last_used_at: datetime | None = Field(description=f"accurate to {LAST_USED_RESOLUTION.total_seconds():g} s")
    expires_at: datetime | None
    revoked_at: datetime | None

    @computed_field
    @property
    def status(self) -> KeyState:
        return key_state(self.revoked_at, self.expires_at, utcnow())


class KeyCreated(KeyOut):
    key: str = Field(description="the API key, shown only this once (it is stored hashed)")

    @classmethod
    def of(cls, row: ApiKey, key: str) -> "KeyCreated":
        return cls(key=key, **KeyOut.model_validate(row).model_dump(exclude={"status"}))


class _KeyExpiry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_at: AwareDatetime | None = Field(None, description="when the key stops working (ISO 8601 with a zone); default never")

    @field_validator("expires_at")
    @classmethod
    def _in_the_future(cls, value: datetime | None) -> datetime | None:
        if value is not None and value <= utcnow():
            raise ValueError("must be in the future")
        return value


class KeyCreate(_KeyExpiry):
    name: str | None = Field(None, min_length=1, max_length=200)


class KeyRotate(_KeyExpiry):
    """The new key takes the old one's name; ``expires_at`` is the new key's."""

    grace_seconds: int = Field(
        0, ge=0, le=int(MAX_ROTATION_GRACE.total_seconds()),
        description="how long the old key goes on working; 0 (the default): it is revoked at once",
    )


class QuotaUsage(BaseModel):
    used: int
    limit: int


class UsageOut(BaseModel):
    """What the tenant keeps, against its quotas."""

    object: Literal["usage"] = "usage"
    stored_bytes: QuotaUsage = Field(description="dataset files plus adapter folders, in bytes")
    files: QuotaUsage
    adapters: QuotaUsage = Field(description="a job needs room for one more, counting those of the queued and running jobs")
    jobs: QuotaUsage = Field(description="jobs in any status")
    jobs_by_status: dict[str, int] = Field(description="each status, 0 where no job has it")


class ModelOut(BaseModel):
    """OpenAI's model object: a base model, or one of the caller's adapters (its id)."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds: when the adapter was made, or the base model installed")
    owned_by: str = Field(description='"system" for a base model; the tenant\'s id for its adapters')
    parent: str | None = Field(description="an adapter's base model (null for a base model), as vLLM lists adapters")


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    checks: dict[str, str] = Field(description="each dependency checked (database, broker) and its state")


class ErrorInfo(BaseModel):
    code: str = Field(description="machine-readable, e.g. invalid_request, not_found, unauthorized")
    message: str = Field(description="what is wrong, naming the field when there is one")
    field: str | None = Field(None, description="where: a body path such as mixture[0].weight, a query parameter or a header")
    details: list[dict[str, Any]] | None = Field(None, description="every problem found, when there are several")


class ErrorResponse(BaseModel):
    """The one error shape of every failure."""

    error: ErrorInfo


_ERROR_DESCRIPTIONS = {
    401: "Missing or invalid API key",
    403: "A quota of the tenant would be exceeded (quota_exceeded: the quota, its limit and the usage named)",
    408: "The request body arrived too slowly, or stopped",
    404: "No such object (or it belongs to another tenant)",
    409: "Conflict with the object's current state",
    410: "The object's files are gone",
    413: "Request body too large",
    415: "The body is not sent as JSON",
    422: "Invalid request (a body that is not valid JSON included): the field is named",
    429: "Too many requests or active jobs",
    503: "Temporarily unavailable",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all in the one error shape."""
    return {status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}

