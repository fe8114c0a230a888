"""The text-generation-inference (TGI) wire format, as LoRAX speaks it, in one place: the request
schemas, their conversion to the engine's `GenerationParams`, the response bodies and stream
events made of its results (and their schemas, for OpenAPI), the error body, and the server-sent
event framing of /generate_stream.

TGI and LoRAX clients send every field of their request schema, most as null or at their
defaults, so every field name of both is declared here and accepted at null or its default; a
feature this server does not support, when actually asked for, is refused (never silently
ignored). Keys that neither TGI nor LoRAX define are ignored, as TGI does. The types are checked
here, by pydantic (a 422 names the field, e.g. ``parameters.max_new_tokens``); the values by
`GenerationParams` (its `GenerationValidationError` names the field, see `error_field`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from rlora.serve import GenerationParams, GenerationResult, GenerationValidationError, StreamEvent, Token

# The parameters the engine takes; the adapter fields (adapter_id, adapter_source, api_token)
# the service reads itself to pick the adapter.
_GENERATION_FIELDS = {field.name for field in dataclasses.fields(GenerationParams)}

# Fields of TGI or LoRAX this server does not support, and when a value asks for them (null and
# the default ask for nothing).
_UNSUPPORTED = {
    "best_of": lambda v: v is not None and v != 1,
    "watermark": lambda v: bool(v),
    "typical_p": lambda v: v is not None and v != 1.0,
    "top_n_tokens": lambda v: v is not None and v != 0,
    "grammar": lambda v: v is not None,
    "response_format": lambda v: v is not None,
    "merged_adapters": lambda v: v is not None,
    "adapter_parameters": lambda v: v is not None,
    "frequency_penalty": lambda v: v is not None and v != 0,
    "presence_penalty": lambda v: v is not None and v != 0,
    "return_k_alternatives": lambda v: v is not None and v != 0,
    "apply_chat_template": lambda v: bool(v),
}
_UNSUPPORTED_HINTS = {"apply_chat_template": "; send the formatted prompt"}


class GenerateParameters(BaseModel):
    """TGI's ``GenerateParameters`` plus LoRAX's additions (adapter selection and the rest)."""

    model_config = ConfigDict(extra="ignore")

    # Adapter selection (LoRAX; TGI >= 2.1 has adapter_id too).
    adapter_id: StrictStr | None = Field(None, description="id of one of your adapters; null: the base model")
    adapter_source: StrictStr | None = Field(None, description='null, "local" or "hub": adapter_id is always an adapter id here')
    api_token: StrictStr | None = Field(None, description="LoRAX's token for hub downloads; unused (nothing is downloaded)")
    merged_adapters: Any = Field(None, description="LoRAX adapter merging: not supported, must be null")
    adapter_parameters: Any = Field(None, description="LoRAX adapter merging: not supported, must be null")

    # Generation.
    max_new_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_k: StrictInt | None = None
    top_p: StrictFloat | None = None
    do_sample: StrictBool | None = None
    seed: StrictInt | None = None
    stop: list[StrictStr] | None = None
    repetition_penalty: StrictFloat | None = None
    ignore_eos_token: StrictBool | None = None
    return_full_text: StrictBool | None = None
    truncate: StrictInt | None = None
    details: StrictBool | None = None
    decoder_input_details: StrictBool | None = None

    # Accepted at null or default only (refused when asked for).
    best_of: StrictInt | None = None
    watermark: StrictBool | None = None
    typical_p: StrictFloat | None = None
    top_n_tokens: StrictInt | None = None
    frequency_penalty: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    grammar: Any = None
    response_format: Any = None
    return_k_alternatives: StrictInt | None = None
    apply_chat_template: StrictBool | None = None

    def generation_params(self) -> GenerationParams:
        """The engine's parameters (null means the default). Raises `GenerationValidationError`
        for an unsupported feature that is asked for, or a value out of range."""
        for name, asked_for in _UNSUPPORTED.items():
            value = getattr(self, name)
            if asked_for(value):
                raise GenerationValidationError(
                    name, f"`{name}` is not supported by this server (got {value!r}){_UNSUPPORTED_HINTS.get(name, '')}"
                )
        values = self.model_dump(include=_GENERATION_FIELDS)
        return GenerationParams(**{name: value for name, value in values.items() if value is not None})


def error_field(name: str) -> str:
    """The request field a `GenerationValidationError`'s ``field`` names."""
    return name if name == "inputs" else f"parameters.{name}"


class GenerateRequest(BaseModel):
    """``POST /generate`` and ``POST /generate_stream``."""

    model_config = ConfigDict(extra="ignore")

    # Not empty: checked by the route, to answer with TGI's message (the schema says so).
    inputs: StrictStr = Field(json_schema_extra={"minLength": 1})
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_means_defaults(cls, value: Any) -> Any:
        # Clients that build the body from a schema send "parameters": null for "all defaults".
        return {} if value is None else value


class CompatGenerateRequest(GenerateRequest):
    """``POST /``: ``stream`` true answers with the event stream, else a list of one response."""

    stream: StrictBool = False

    @field_validator("stream", mode="before")
    @classmethod
    def _null_stream(cls, value: Any) -> Any:
        return False if value is None else value


def _token(token: Token) -> dict:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def generate_response(result: GenerationResult, *, details: bool) -> dict:
    """TGI's /generate response body: ``generated_text``, and with ``details`` TGI's details
    (``prefill`` empty unless ``decoder_input_details`` was asked for) plus ``prompt_tokens``
    and ``routing``."""
    body: dict[str, Any] = {"generated_text": result.generated_text}
    if details:
        body["details"] = {
            "finish_reason": result.finish_reason,
            "generated_tokens": result.generated_tokens,
            "prompt_tokens": result.prompt_tokens,
            "seed": result.seed,
            "prefill": [_token(t) for t in result.prefill],
            "tokens": [_token(t) for t in result.tokens],
            "routing": result.routing,
        }
    return body


def stream_event(event: StreamEvent, *, details: bool) -> dict:
    """TGI's /generate_stream event: the last one has ``generated_text``, and with ``details``
    its details (plus ``routing``)."""
    body: dict[str, Any] = {
        "index": event.index,
        "token": _token(event.token),
        "generated_text": event.generated_text,
        "details": None,
    }
    if event.result is not None and details:
        body["details"] = {
            "finish_reason": event.result.finish_reason,
            "generated_tokens": event.result.generated_tokens,
            # TGI (and huggingface_hub) name the prompt's length input_length; LoRAX prompt_tokens.
            "input_length": event.result.prompt_tokens,
            "prompt_tokens": event.result.prompt_tokens,
            "seed": event.result.seed,
            "routing": event.result.routing,
        }
    return body


# --- response schemas (OpenAPI; the bodies above are built as dicts, on the hot path) ----------

FinishReason = Literal["length", "eos_token", "stop_sequence"]


class TokenOut(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(description="null for the first prompt token")
    special: bool


class Routing(BaseModel):
    per_layer: dict[str, dict[str, Any]] = Field(description="each adapted layer's mean head weight over the request")
    mean_entropy: float


class GenerateDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    prompt_tokens: int
    seed: int | None = Field(description="the sampling seed; null when greedy")
    prefill: list[TokenOut] = Field(description="the prompt's tokens with decoder_input_details, else empty")
    tokens: list[TokenOut]
    routing: Routing | None = Field(description="beyond TGI: null without a router (the base model, plain LoRA)")


class GenerateResponse(BaseModel):
    """``POST /generate``; ``details`` only when asked for."""

    generated_text: str
    details: GenerateDetails | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    input_length: int = Field(description="the prompt's tokens (TGI's name)")
    prompt_tokens: int = Field(description="the prompt's tokens (LoRAX's name)")
    seed: int | None
    routing: Routing | None


class StreamResponse(BaseModel):
    """One ``data:`` event of ``/generate_stream``: the last one has ``generated_text`` and
    (with ``details``) ``details``."""

    index: int
    token: TokenOut
    generated_text: str | None
    details: StreamDetails | None


class TGIError(BaseModel):
    """The error body of the TGI routes, and the event of an error after the stream began."""

    error: str
    error_type: str = Field(description="validation, overloaded, generation, incomplete_generation; else the error's code")
    code: str | None = Field(None, description="beyond TGI: the service's error code")
    field: str | None = Field(None, description="beyond TGI: the field at fault, e.g. parameters.max_new_tokens")


# The error types TGI's clients know, by status: they raise ValidationError, OverloadedError,
# GenerationError for these, and fall back on the status (404: NotFoundError) for the others.
_TGI_ERROR_TYPES = {400: "validation", 408: "validation", 413: "validation", 415: "validation", 422: "validation",
                    429: "overloaded", 503: "overloaded"}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of the TGI routes' errors."""
    return {status: {"model": TGIError, "description": "an error, in TGI's shape"} for status in statuses}


def error_content(status: int, code: str, message: str, field: str | None) -> dict:
    """An error as TGI answers one (``{"error", "error_type"}``), with the service's code and field."""
    error_type = "generation" if code == "generation_failed" else _TGI_ERROR_TYPES.get(status, code)
    body: dict[str, Any] = {"error": message, "error_type": error_type, "code": code}
    if field:
        body["field"] = field
    return body


def sse(data: dict) -> bytes:
    """One server-sent event, as TGI writes them."""
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


def sse_error(message: str, error_type: str) -> bytes:
    """TGI's error event, sent when a request fails after its stream began."""
    return sse({"error": message, "error_type": error_type})
