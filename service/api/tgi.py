"""The text-generation-inference (TGI) wire format, as LoRAX speaks it: request schemas and the
server-sent event encoding of /generate_stream.

TGI and LoRAX clients send every field of their request schema, most as null or at their
defaults, so every field name of both is declared here and accepted at null or its default.
The types are checked here (a 422 names the field, e.g. ``parameters.max_new_tokens``); the
values, and whether an unsupported feature is actually asked for, are checked by
`rlora.serve.GenerationParams.from_tgi`, which refuses such a feature instead of ignoring
it. Keys that neither TGI nor LoRAX define are ignored, as TGI does.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

# The fields the service reads itself to pick the adapter; the rest go to `from_tgi`.
ROUTING_FIELDS = ("adapter_id", "adapter_source", "api_token")


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

    def generation_fields(self) -> dict[str, Any]:
        """The fields for `GenerationParams.from_tgi` (nulls dropped: null means default)."""
        return {k: v for k, v in self.model_dump(exclude=set(ROUTING_FIELDS)).items() if v is not None}


class GenerateRequest(BaseModel):
    """``POST /generate`` and ``POST /generate_stream``."""

    model_config = ConfigDict(extra="ignore")

    inputs: StrictStr
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


def sse(data: dict) -> bytes:
    """One server-sent event, as TGI writes them."""
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


def sse_error(message: str, error_type: str) -> bytes:
    """TGI's error event, sent when a request fails after its stream began."""
    return sse({"error": message, "error_type": error_type})
