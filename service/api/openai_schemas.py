"""OpenAI's wire format, in one place: the error shape of the OpenAI routes, the bodies of chat
and text completions (requests checked here, converted to the engine's `GenerationParams`;
responses and stream chunks made of its results) and the fine-tuning job objects (a view of the
service's jobs).

As in ``tgi.py``, a field OpenAI defines that this server does not support is accepted at null
or its default and refused (400, naming it) when it asks for something; keys OpenAI does not
define are ignored. Beyond OpenAI, as vLLM: ``top_k`` and ``repetition_penalty``.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationInfo, field_validator
from sqlalchemy import Row

from rlora.serve import GenerationParams, GenerationResult, Token

from service.api.deps import SessionRoute
from service.api.errors import APIError, invalid
from service.api.schemas import unix_seconds
from service.models import Job, JobEvent

T = TypeVar("T")

# --- errors ------------------------------------------------------------------------------------

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error", 429: "rate_limit_error"}


def error_content(err: APIError) -> dict:
    """OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}`` (plus the
    service's ``details`` when there are several problems)."""
    if err.status >= 500:
        kind = "server_error"
    else:
        kind = _ERROR_TYPES.get(err.status, "invalid_request_error")
    error: dict[str, Any] = {"message": err.message, "type": kind, "param": err.field, "code": err.code}
    if err.details:
        error["details"] = err.details
    return {"error": error}


class OpenAIRoute(SessionRoute):
    """A route of the OpenAI API: its errors in OpenAI's shape, and an invalid request a 400
    as OpenAI answers one (the service's other routes answer 422)."""

    @staticmethod
    def render_error(err: APIError) -> JSONResponse:
        status = 400 if err.status == 422 else err.status
        return JSONResponse(error_content(err), status_code=status, headers=err.headers)


class ErrorObject(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, rate_limit_error, server_error")
    param: str | None = Field(description="the field at fault, e.g. messages[0].role")
    code: str | None = Field(description="the service's error code, e.g. model_not_found")
    details: list[dict[str, Any]] | None = None


class OpenAIErrorResponse(BaseModel):
    error: ErrorObject


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of the OpenAI routes' errors."""
    return {status: {"model": OpenAIErrorResponse, "description": "an error, in OpenAI's shape"} for status in statuses}


def now_seconds() -> int:
    return int(datetime.now(timezone.utc).timestamp())


# --- inference requests ------------------------------------------------------------------------

# OpenAI fields this server does not support, and when a value asks for them.
_UNSUPPORTED = {
    "tools": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none"),
    "functions": lambda v: bool(v),
    "function_call": lambda v: v not in (None, "none"),
    "response_format": lambda v: v is not None and v != {"type": "text"},
    "logit_bias": lambda v: bool(v),
    "presence_penalty": lambda v: v not in (None, 0),
    "frequency_penalty": lambda v: v not in (None, 0),
    "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]),
    "prediction": lambda v: v is not None,
    "web_search_options": lambda v: v is not None,
    "reasoning_effort": lambda v: v is not None,
    "suffix": lambda v: bool(v),
    "best_of": lambda v: v not in (None, 1),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = Field(None, description="a last chunk with the usage (and no choices)")


class _Sampling(BaseModel):
    """The fields chat and text completions share."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr = Field(min_length=1, description="a base model (GET /v1/models), or the id of one of your adapters")
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | StrictInt | None = Field(None, ge=0, le=2, description="0: greedy; default 1")
    top_p: StrictFloat | StrictInt | None = Field(None, gt=0, le=1)
    n: StrictInt | None = Field(None, ge=1, description="1 only: one choice per request")
    stop: StrictStr | list[StrictStr] | None = Field(None, description="up to 4 sequences; not part of the text returned")
    seed: StrictInt | None = Field(None, ge=0, description="the same seed (and request) gives the same output")
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # Beyond OpenAI (as vLLM):
    top_k: StrictInt | None = Field(None, ge=1)
    repetition_penalty: StrictFloat | StrictInt | None = Field(None, gt=0)
    # Accepted at null or their default only:
    logit_bias: dict[str, Any] | None = None
    presence_penalty: StrictFloat | StrictInt | None = None
    frequency_penalty: StrictFloat | StrictInt | None = None
    response_format: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _refuse_unsupported(self) -> None:
        for name, asked_for in _UNSUPPORTED.items():
            value = getattr(self, name, None)
            if asked_for(value):
                raise invalid(name, f"{name}: not supported by this server (got {value!r})")
        if self.n not in (None, 1):
            raise invalid("n", f"n: only 1 choice per request is supported (got {self.n}); send {self.n} requests with different seeds")

    def generation_params(self, max_new_tokens: int | None, details: bool) -> GenerationParams:
        """The engine's parameters: sampling at temperature 1 unless ``temperature`` is 0
        (greedy), as OpenAI does. Raises `APIError` for what is not supported."""
        self._refuse_unsupported()
        greedy = self.temperature == 0
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return GenerationParams(
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy or self.temperature is None else float(self.temperature),
            top_p=None if greedy or self.top_p is None or self.top_p == 1 else float(self.top_p),
            top_k=None if greedy else self.top_k,
            repetition_penalty=None if self.repetition_penalty is None else float(self.repetition_penalty),
            seed=self.seed,
            stop=tuple(stop),
            details=details,
        )


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[Any] | None = None

    def as_turn(self, index: int) -> dict[str, str]:
        """``{"role", "content"}`` as the chat template (and the training data) has it:
        ``developer`` is OpenAI's newer name for ``system``; text parts are joined."""
        if self.tool_calls:
            raise invalid(f"messages[{index}].tool_calls", f"messages[{index}].tool_calls: tools are not supported by this server")
        if self.content is None:
            raise invalid(f"messages[{index}].content", f"messages[{index}].content: required")
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="wins over max_tokens; default: the server's")
    logprobs: StrictBool | None = Field(None, description="each generated token's log probability")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20, description="0 only: alternatives are not computed")
    # Accepted at null or their default only:
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: StrictBool | None = None
    audio: Any = None
    modalities: list[StrictStr] | None = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: StrictStr | None = None
    store: StrictBool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: StrictStr | None = None

    def params(self) -> GenerationParams:
        if self.top_logprobs:
            raise invalid("top_logprobs", "top_logprobs: alternative tokens are not computed by this server; set 0 (logprobs alone is supported)")
        max_new_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.generation_params(max_new_tokens, details=bool(self.logprobs))

    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def turns(self) -> list[dict[str, str]]:
        return [message.as_turn(index) for index, message in enumerate(self.messages)]


# OpenAI's default max_tokens of a text completion.
COMPLETION_MAX_TOKENS = 16


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt (text or token ids)."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool | None = Field(None, description="the prompt before the completion in text")
    logprobs: StrictInt | None = Field(None, ge=0, le=5, description="0 only: each token's log probability, no alternatives")
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError(f"one prompt per request is supported (got {len(value)}); send them one by one")
            value = value[0]
        if not value:
            raise ValueError("must not be empty")
        return value

    def params(self) -> GenerationParams:
        if self.logprobs:
            raise invalid("logprobs", "logprobs: alternative tokens are not computed by this server; set 0 for each token's log probability")
        max_new_tokens = self.max_tokens if self.max_tokens is not None else COMPLETION_MAX_TOKENS
        return self.generation_params(max_new_tokens, details=self.logprobs is not None)


def parameter_field(max_tokens_field: str, prompt_field: str):
    """The request's name for each `GenerationParams` field (the engine's errors name those)."""
    names = {"max_new_tokens": max_tokens_field, "inputs": prompt_field, "truncate": prompt_field}
    return lambda name: names.get(name, name)


# --- inference responses -----------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


def finish_reason(result: GenerationResult) -> FinishReason:
    return "length" if result.finish_reason == "length" else "stop"


def completion_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(result: GenerationResult) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.generated_tokens,
                 total_tokens=result.prompt_tokens + result.generated_tokens)


def stop_at(text: str, stop: tuple[str, ...]) -> str:
    """``text`` up to the first stop sequence in it (OpenAI leaves the stop out; TGI keeps it)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def kept_tokens(tokens: list[Token], text_length: int) -> list[Token]:
    """The generated tokens whose text begins within the first ``text_length`` characters
    (special tokens, such as eos, are not part of the text)."""
    kept, offset = [], 0
    for token in tokens:
        if token.special:
            continue
        if offset >= text_length:
            break
        kept.append(token)
        offset += len(token.text)
    return kept


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict[str, Any]] = Field(description="always empty: alternatives are not computed")


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


def chat_logprobs(tokens: list[Token]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprob(token=t.text, logprob=t.logprob if t.logprob is not None else 0.0, bytes=list(t.text.encode()), top_logprobs=[])
        for t in tokens
    ])


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One ``data:`` event of a streamed chat completion (then ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice] = Field(description="empty in the usage chunk")
    usage: Usage | None = Field(None, description="in the last chunk, with stream_options.include_usage")
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = Field(description="null: alternatives are not computed")
    text_offset: list[int]


def completion_logprobs(tokens: list[Token], start: int) -> CompletionLogprobs:
    offsets, offset = [], start
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return CompletionLogprobs(
        tokens=[t.text for t in tokens], token_logprobs=[t.logprob if t.logprob is not None else 0.0 for t in tokens],
        top_logprobs=None, text_offset=offsets,
    )


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """A text completion, and (``object`` the same) each chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# --- fine-tuning jobs --------------------------------------------------------------------------

# The learning rate a multiplier of 1 means: the trainer's default.
BASE_LEARNING_RATE = 2e-4
DEFAULT_TASK = "default"


# The range of each hyperparameter (the learning rate multiplier above 0).
_HYPERPARAMETER_RANGES = {"n_epochs": (1, 1000), "batch_size": (1, 4096), "learning_rate_multiplier": (0, 5000)}


class Hyperparameters(BaseModel):
    """OpenAI's hyperparameters; ``auto`` (or null) leaves the trainer's default."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Literal["auto"] | Annotated[StrictInt, Field(ge=1, le=1000)] | None = None
    batch_size: Literal["auto"] | Annotated[StrictInt, Field(ge=1, le=4096)] | None = None
    learning_rate_multiplier: Literal["auto"] | Annotated[StrictFloat | StrictInt, Field(gt=0, le=5000)] | None = None

    @field_validator("n_epochs", "batch_size", "learning_rate_multiplier", mode="before")
    @classmethod
    def _auto_or_number(cls, value: Any, info: ValidationInfo) -> Any:
        # One message naming the field, not one per member of the union.
        whole = info.field_name != "learning_rate_multiplier"
        number = isinstance(value, int) if whole else isinstance(value, (int, float))
        if value is None or value == "auto":
            return value
        if not number or isinstance(value, bool):
            raise ValueError(f"must be \"auto\" or {'an integer' if whole else 'a number'}, got {value!r}")
        low, high = _HYPERPARAMETER_RANGES[info.field_name]
        if not (low <= value <= high and value != 0):
            raise ValueError(f"must be between {low} and {high}, got {value!r}")
        return value

    def training(self) -> dict[str, Any]:
        """The ``training`` settings these set."""
        values: dict[str, Any] = {}
        if isinstance(self.n_epochs, int):
            values["epochs"] = self.n_epochs
        if isinstance(self.batch_size, int):
            values["batch_size"] = self.batch_size
        if isinstance(self.learning_rate_multiplier, (int, float)):
            values["learning_rate"] = BASE_LEARNING_RATE * self.learning_rate_multiplier
        return values


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    """OpenAI's fine-tuning method: supervised only (a preference or reinforcement method is a 400)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"]
    supervised: Supervised | None = None


# The training setting each hyperparameter sets.
_HYPERPARAMETER_OF = {"epochs": "n_epochs", "batch_size": "batch_size", "learning_rate": "learning_rate_multiplier"}
_MIXTURE_FIELDS = {"mixture[0].file_id": "training_file", "mixture[0].validation_file_id": "validation_file", "mixture[0].task": "rlora.task"}


class RLoRASettings(BaseModel):
    """Beyond OpenAI: the R-LoRA adapter and training settings of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    adapter: dict[str, Any] = Field(default_factory=dict, description="AdapterConfig settings (method, heads, rank, ...)")
    training: dict[str, Any] = Field(default_factory=dict, description="training settings; hyperparameters and seed set theirs")
    task: str = Field(DEFAULT_TASK, description="the task name of the training file's records (per-task evaluation)")


class FineTuningJobCreate(BaseModel):
    """``POST /v1/fine_tuning/jobs``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: StrictStr = Field(min_length=1, max_length=255, description="a base model (GET /v1/models)")
    training_file: StrictStr = Field(min_length=1, description="the id of an uploaded file")
    validation_file: StrictStr | None = Field(None, min_length=1)
    hyperparameters: Hyperparameters | None = Field(None, description="deprecated by OpenAI in favour of method; both are read")
    method: Method | None = None
    suffix: StrictStr | None = Field(None, min_length=1, max_length=64)
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    metadata: dict[str, StrictStr] | None = Field(None, max_length=16, description="up to 16 string pairs, shown back")
    integrations: list[Any] | None = Field(None, description="none are supported: null or empty")
    rlora: RLoRASettings = Field(default_factory=RLoRASettings, description="beyond OpenAI: the R-LoRA settings")

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("integrations are not supported by this server")
        return value

    def job_request(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The body of ``POST /v1/jobs`` this request is (to be checked as any other), and the
        field of this request that set each training setting other than through ``rlora``."""
        set_by: dict[str, str] = {}
        training = dict(self.rlora.training)
        given = [("hyperparameters", self.hyperparameters)]
        if self.method is not None and self.method.supervised is not None:
            given.append(("method.supervised.hyperparameters", self.method.supervised.hyperparameters))
        for where, hyperparameters in given:
            for name, value in (hyperparameters.training() if hyperparameters else {}).items():
                field = f"{where}.{_HYPERPARAMETER_OF[name]}"
                if name in set_by or name in training:
                    other = set_by.get(name, f"rlora.training.{name}")
                    raise invalid(field, f"{field} sets training.{name}, which {other} sets too; give it once")
                set_by[name] = field
                training[name] = value
        if self.seed is not None:
            if "seed" in training:
                raise invalid("seed", "seed: rlora.training.seed sets it too; give it once")
            set_by["seed"] = "seed"
            training["seed"] = self.seed
        item: dict[str, Any] = {"file_id": self.training_file, "weight": 1.0, "task": self.rlora.task}
        if self.validation_file is not None:
            item["validation_file_id"] = self.validation_file
        return {"base_model": self.model, "mixture": [item], "adapter": self.rlora.adapter, "training": training}, set_by

    @staticmethod
    def field_name(set_by: dict[str, str]):
        """This request's name for a field of the job request it became (problems name those)."""

        def name(field: str) -> str:
            head, _, rest = field.partition(".")
            if field.startswith("mixture[0].") or field == "mixture":
                return _MIXTURE_FIELDS.get(field, "training_file")
            if head == "base_model":
                return "model"
            if head == "training" and rest:
                setting = re.split(r"[.\[]", rest, maxsplit=1)[0]
                return set_by.get(setting, f"rlora.{field}")
            if head in ("adapter", "training"):
                return f"rlora.{field}"
            return field

        return name


class JobErrorObject(BaseModel):
    code: str
    message: str
    param: str | None = None


class OutHyperparameters(BaseModel):
    n_epochs: Literal["auto"] | int | float
    batch_size: int
    learning_rate_multiplier: float


class FineTuningJob(BaseModel):
    """OpenAI's fine-tuning job object: a view of the service's job (``GET /v1/jobs/{id}`` is
    the same job), ``fine_tuned_model`` its adapter, usable as ``model`` for inference."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None = Field(description="the adapter's id once the job succeeded")
    organization_id: str = Field(description="the tenant's id")
    result_files: list[str]
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    validation_file: str | None
    training_file: str
    hyperparameters: OutHyperparameters
    method: dict[str, Any]
    trained_tokens: int | None
    error: JobErrorObject | None
    seed: int
    estimated_finish: int | None
    integrations: list[Any]
    user_provided_suffix: str | None
    metadata: dict[str, str] | None
    rlora: dict[str, Any] = Field(description="beyond OpenAI: adapter, training, progress and metrics")


def _epochs(training: dict[str, Any]) -> Literal["auto"] | int | float:
    epochs = training.get("epochs")
    if epochs is None or training.get("max_steps") is not None:
        return "auto"  # a number of steps decides
    return int(epochs) if float(epochs).is_integer() else epochs


def fine_tuning_job(job: Job | Row, adapter_id: str | None) -> FineTuningJob:
    training = job.training
    hyperparameters = OutHyperparameters(
        n_epochs=_epochs(training), batch_size=training["batch_size"],
        learning_rate_multiplier=training["learning_rate"] / BASE_LEARNING_RATE,
    )
    item = job.mixture[0] if job.mixture else {}
    error = None
    if job.error_code:
        error = JobErrorObject(code=job.error_code, message=job.error_message or "")
    estimated = None
    if job.status == "running" and job.eta_seconds is not None:
        estimated = now_seconds() + int(job.eta_seconds)
    progress = None
    if job.step is not None:
        progress = {"step": job.step, "total_steps": job.total_steps, "loss": job.loss, "learning_rate": job.learning_rate,
                    "tokens_per_second": job.tokens_per_second, "eta_seconds": job.eta_seconds}
    return FineTuningJob(
        id=job.id, model=job.base_model, created_at=unix_seconds(job.created_at), finished_at=unix_seconds(job.finished_at),
        fine_tuned_model=adapter_id, organization_id=job.tenant_id, result_files=[], status=job.status,
        validation_file=item.get("validation_file_id"), training_file=item.get("file_id", ""),
        hyperparameters=hyperparameters,
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters.model_dump()}},
        trained_tokens=(job.metrics or {}).get("trained_tokens"), error=error, seed=training.get("seed", 0),
        estimated_finish=estimated, integrations=[], user_provided_suffix=job.suffix, metadata=job.user_metadata,
        rlora={"adapter": job.adapter, "training": training, "mixture": job.mixture, "progress": progress,
               "cancel_requested": job.cancel_requested, "metrics": job.metrics},
    )


EVENT_PREFIX = "ftevent-"


class FineTuningJobEvent(BaseModel):
    id: str = Field(description=f"{EVENT_PREFIX} and the native event's id")
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any]


def _event_message(kind: str, data: dict[str, Any]) -> tuple[str, str]:
    """The event's message and level."""
    if kind == "progress":
        loss = data.get("loss")
        loss_text = "" if loss is None else f": training loss={loss:.4f}"
        return f"Step {data.get('step')}/{data.get('total_steps')}{loss_text}", "info"
    if kind == "created":
        return "Created fine-tuning job", "info"
    if kind == "started":
        return f"Fine-tuning job started (attempt {data.get('attempt')})", "info"
    status = data.get("status")
    if status == "succeeded":
        return "The job has successfully completed", "info"
    if status == "failed":
        error = data.get("error") or {}
        return f"Fine-tuning job failed: {error.get('message') or data.get('message') or kind}", "error"
    if status == "cancelled":
        return "Fine-tuning job cancelled", "info"
    if status == "queued":
        return f"Fine-tuning job queued again ({kind}): it resumes from its last checkpoint", "warn"
    return kind.replace("_", " ").capitalize(), "info"


def fine_tuning_event(event: JobEvent | Row) -> FineTuningJobEvent:
    message, level = _event_message(event.kind, event.data)
    metrics = event.kind == "progress"
    data = {"step": event.data.get("step"), "total_steps": event.data.get("total_steps"), "train_loss": event.data.get("loss")} if metrics else {}
    return FineTuningJobEvent(
        id=f"{EVENT_PREFIX}{event.id}", created_at=unix_seconds(event.created_at), level=level, message=message,
        type="metrics" if metrics else "message", data={**data, "kind": event.kind, **({} if metrics else event.data)},
    )


def event_cursor(after: str | None) -> int | None:
    """The native event id an ``after`` names (an event's id as listed)."""
    if after is None:
        return None
    number = after[len(EVENT_PREFIX):] if after.startswith(EVENT_PREFIX) else after
    if not number.isdigit() or int(number) > 2**31 - 1:
        raise invalid("after", f"after: {after!r} is not an event id (ftevent-<number>)")
    return int(number)


class CheckpointMetrics(BaseModel):
    step: int | None
    train_loss: float | None
    valid_loss: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    """The model a job made: its adapter (intermediate training checkpoints are for resuming,
    not for serving, so they are not listed)."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str = Field(description="the adapter's id, usable as model")
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class CursorPage(BaseModel, Generic[T]):
    """OpenAI's list: ``has_more`` says whether to ask again with ``after`` = the last id."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
