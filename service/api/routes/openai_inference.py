"""OpenAI's inference API: ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed
(server-sent chunks, then ``data: [DONE]``) or not. ``model`` is a base model or the id of one of
the caller's adapters (another tenant's is a 404 ``model_not_found``).

Requests go through the same engine, queues and batching as the TGI routes
(`service.api.generation`); chat messages become the prompt through the base model's chat
template, as training renders chat records (`service.api.chat_template`). Sampling follows
OpenAI: temperature 1 unless given, 0 for greedy; a stop sequence ends the text and is not part
of it. Errors are in OpenAI's shape, an invalid request a 400 (``OpenAIRoute``); an error after
a stream began is a ``data: {"error": {...}}`` event, which OpenAI's clients raise.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from rlora.serve import EngineClosed, GenerationParams, GenerationResult, GenerationValidationError, RequestFailed, Token

from service.api.auth import TenantDep
from service.api.catalog import generation_target
from service.api.chat_template import render_chat
from service.api.deps import SessionDep, SettingsDep
from service.api.errors import APIError, invalid, reject_lone_surrogates
from service.api.generation import CLIENT_CLOSED_REQUEST, Fields, Target, result_unless_client_gone, submit
from service.api.inference import Handle, get_engine
from service.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    OpenAIRoute,
    chat_logprobs,
    completion_id,
    completion_logprobs,
    error_content,
    finish_reason,
    kept_tokens,
    now_seconds,
    parameter_field,
    stop_at,
    usage,
)
from service.engine.client import EngineUnavailable
from service.engine.streaming import RequestStreamResponse
from service.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["inference (OpenAI)"], route_class=OpenAIRoute)


# --- request preparation -----------------------------------------------------------------------


def _params(make: Callable[[], GenerationParams], fields: Fields) -> GenerationParams:
    try:
        return make()
    except GenerationValidationError as err:
        raise invalid(fields.parameter(err.field), f"{fields.parameter(err.field)}: {err.message}") from None


def _target(session: Session, settings: Settings, tenant_id: str, model: str) -> Target:
    try:
        return generation_target(session, settings, tenant_id, model)
    finally:
        session.close()  # a stream can last minutes: the connection goes back now


def _chat_prompt(session: Session, settings: Settings, tenant_id: str, model: str, turns: list[dict[str, str]]) -> tuple[Target, str]:
    target = _target(session, settings, tenant_id, model)
    return target, render_chat(settings, target.base_model, turns)


# --- streaming ---------------------------------------------------------------------------------


class _StreamedText:
    """A stream's text as OpenAI sends it, without the stop sequence (the engine keeps it, and
    sends it token by token): text that could begin a stop sequence is held back until it cannot,
    and each token goes out with the text it begins in."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.text = ""
        self.sent = 0
        self.pending: list[tuple[int, Token]] = []  # tokens not sent yet, by where their text begins

    def add(self, token: Token) -> None:
        if not token.special:  # eos and the like are no text
            self.pending.append((len(self.text), token))
            self.text += token.text

    def take(self, final: bool) -> tuple[str, list[Token]]:
        """The text (and its tokens) that can go out now; ``final``: all there is to send."""
        end = len(stop_at(self.text, self.stop))
        if not final and end == len(self.text):
            end -= max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent : end], end
        ready = [token for start, token in self.pending if start < end]
        self.pending = [(start, token) for start, token in self.pending if start >= end]
        return piece, ready


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


_DONE = b"data: [DONE]\n\n"


class _ChunkStream(RequestStreamResponse):
    """Server-sent chunks of one engine request (cancelled however the response ends)."""

    media_type = "text/event-stream"

    def __init__(self, handle: Handle, chunks: AsyncIterator[bytes]):
        super().__init__(handle, chunks, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chunks(
    handle: Handle,
    stop: tuple[str, ...],
    chunk: Callable[[str, list[Token], GenerationResult | None], dict | None],
    usage_chunk: Callable[[GenerationResult], dict] | None,
) -> AsyncIterator[bytes]:
    """The stream's chunks: ``chunk(text, tokens, result)`` makes each (``result`` on the last;
    None: nothing to send), ``usage_chunk`` the usage chunk after the last, if asked for."""
    text = _StreamedText(stop)
    result = None
    try:
        async with contextlib.aclosing(handle.stream()) as stream:
            async for event in stream:
                text.add(event.token)
                result = event.result
                body = chunk(*text.take(final=result is not None), result)
                if body is not None:
                    yield _sse(body)
    except (EngineClosed, EngineUnavailable, RequestFailed) as err:
        yield _sse(error_content(APIError(503, "generation_failed", str(err))))
        return
    except Exception:  # noqa: BLE001 - the status is sent already: report it in the stream
        log.exception("generation failed after its stream began")
        yield _sse(error_content(APIError(500, "internal_error", "Request failed during generation")))
        return
    if result is None:
        yield _sse(error_content(APIError(500, "incomplete_generation", "Incomplete generation")))
        return
    if usage_chunk is not None:
        yield _sse(usage_chunk(result))
    yield _DONE


def _stream(
    handle: Handle,
    body: ChatCompletionRequest | CompletionRequest,
    params: GenerationParams,
    prefix: str,
    kind: str,
    choice: Callable[[str, list[Token], GenerationResult | None], dict | None],
) -> Response:
    """The chunks of a streamed completion (``kind``, OpenAI's object name), each with the
    one choice ``choice`` makes; the usage chunk last when the request asked for it."""
    common: dict[str, Any] = {"id": completion_id(prefix), "object": kind, "created": now_seconds(), "model": body.model,
                              "system_fingerprint": None}
    if body.include_usage:
        common["usage"] = None  # in every chunk, as OpenAI sends it; the last one has it

    def chunk(text: str, tokens: list[Token], result: GenerationResult | None) -> dict | None:
        made = choice(text, tokens, result)
        return None if made is None else {**common, "choices": [made]}

    def usage_chunk(result: GenerationResult) -> dict:
        return {**common, "choices": [], "usage": usage(result).model_dump()}

    return _ChunkStream(handle, _chunks(handle, params.stop, chunk, usage_chunk if body.include_usage else None))


# --- /v1/chat/completions ----------------------------------------------------------------------


def _chat_stream(handle: Handle, body: ChatCompletionRequest, params: GenerationParams) -> Response:
    first = [True]

    def choice(text: str, tokens: list[Token], result: GenerationResult | None) -> dict | None:
        delta: dict[str, Any] = {"content": text}
        if first[0]:
            delta["role"] = "assistant"
            first[0] = False
        elif not text and result is None:
            return None  # held back (a stop sequence may be beginning): nothing to send yet
        logprobs = chat_logprobs(tokens).model_dump() if body.logprobs else None
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason(result) if result else None}

    return _stream(handle, body, params, "chatcmpl", "chat.completion.chunk", choice)


_CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ChatCompletion,
        "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/ChatCompletionChunk"}}},
        "description": "a chat completion; with stream: true, chat.completion.chunk events, then data: [DONE]",
    }
}


@router.post("/chat/completions", response_class=JSONResponse, responses=_CHAT_RESPONSES)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, tenant: TenantDep, session: SessionDep, settings: SettingsDep
) -> Response:
    """A reply to ``messages`` from ``model`` (a base model, or one of your adapters)."""
    engine = get_engine(request.app)  # first: a process that serves no generation says so at once
    reject_lone_surrogates(body.model_dump(exclude_none=True))
    fields = Fields(parameter=parameter_field(body.max_tokens_field(), "messages"), adapter="model")
    params = _params(body.params, fields)
    turns = body.turns()  # the messages' problems before the model's
    target, prompt = await run_in_threadpool(_chat_prompt, session, settings, tenant.id, body.model, turns)
    handle = await submit(engine, prompt, params, target, tenant.id, fields)
    if body.stream:
        return _chat_stream(handle, body, params)
    result = await result_unless_client_gone(request, handle, target, fields)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    text = stop_at(result.generated_text, params.stop)
    completion = ChatCompletion(
        id=completion_id("chatcmpl"), created=now_seconds(), model=body.model, usage=usage(result),
        choices=[ChatChoice(
            message=AssistantMessage(content=text), finish_reason=finish_reason(result),
            logprobs=chat_logprobs(kept_tokens(result.tokens, len(text))) if body.logprobs else None,
        )],
    )
    return JSONResponse(completion.model_dump())


# --- /v1/completions ---------------------------------------------------------------------------


def _completion_stream(handle: Handle, body: CompletionRequest, params: GenerationParams, echo: str) -> Response:
    sent = [len(echo)]  # where the next token's text begins
    first = [True]

    def choice(text: str, tokens: list[Token], result: GenerationResult | None) -> dict | None:
        if first[0]:
            text, first[0] = echo + text, False
        elif not text and result is None:
            return None  # held back (a stop sequence may be beginning)
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(tokens, sent[0]).model_dump()
            sent[0] += sum(len(token.text) for token in tokens)
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(result) if result else None}

    return _stream(handle, body, params, "cmpl", "text_completion", choice)


_COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": Completion,
        "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/Completion"}}},
        "description": "a text completion; with stream: true, text_completion chunks, then data: [DONE]",
    }
}


@router.post("/completions", response_class=JSONResponse, responses=_COMPLETION_RESPONSES)
async def completions(body: CompletionRequest, request: Request, tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> Response:
    """The continuation of ``prompt`` (text, or token ids) by ``model``."""
    engine = get_engine(request.app)
    reject_lone_surrogates(body.model_dump(exclude_none=True))
    fields = Fields(parameter=parameter_field("max_tokens", "prompt"), adapter="model")
    params = _params(body.params, fields)
    if body.echo and not isinstance(body.prompt, str):
        raise invalid("echo", "echo: supported for a text prompt only")
    echo = body.prompt if body.echo else ""
    target = await run_in_threadpool(_target, session, settings, tenant.id, body.model)
    handle = await submit(engine, body.prompt, params, target, tenant.id, fields)
    if body.stream:
        return _completion_stream(handle, body, params, echo)
    result = await result_unless_client_gone(request, handle, target, fields)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    text = stop_at(result.generated_text, params.stop)
    logprobs = completion_logprobs(kept_tokens(result.tokens, len(text)), len(echo)) if body.logprobs is not None else None
    completion = Completion(
        id=completion_id("cmpl"), created=now_seconds(), model=body.model, usage=usage(result),
        choices=[CompletionChoice(text=echo + text, logprobs=logprobs, finish_reason=finish_reason(result))],
    )
    return JSONResponse(completion.model_dump())
