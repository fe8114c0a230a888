"""Per-request generation parameters, engine limits, what a request gives back, and the
validation error the HTTP layer maps to 422.

Field names and semantics follow text-generation-inference (TGI): sampling is on when
``do_sample`` is true *or* any warper is set (``temperature`` != 1, ``top_k``, ``top_p`` < 1),
as TGI's ``NextTokenChooser`` does; the stop text is kept in ``generated_text``. Types and
values are checked here, since Python callers hand the engine plain dicts: a bad value must be
this request's `GenerationValidationError`, never an error inside the shared decode loop. (The
service's wire schema checks types too, to answer in its clients' error shape.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

MAX_SEED = 2**64 - 1


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond any float
        return False


class GenerationValidationError(ValueError):
    """A request the engine refuses; ``field`` names the offending parameter (``inputs`` for
    the prompt). The HTTP layer maps it to 422 with ``str(error)`` as the message."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"Input validation error: {message}")
        self.field = field_name
        self.message = message

    def __reduce__(self):
        return (self.__class__, (self.field, self.message))


@dataclass(frozen=True)
class Limits:
    """Engine-wide limits. ``None`` means "from the base model": ``max_total_tokens`` defaults to
    the model's ``max_position_embeddings`` and ``max_input_tokens`` to one less."""

    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_new_tokens: int = 2048  # upper bound a request may ask for
    default_max_new_tokens: int = 100  # when a request leaves it out (capped by the total)
    max_stop_sequences: int = 4
    max_stop_chars: int = 256
    max_batch_size: int = 64  # rows decoded together per base model (KV cache slots)
    max_batch_adapters: int = 16  # distinct adapters in one base model's batch (slot table size)
    max_prefill_tokens: int = 4096  # padded prompt tokens in one prefill forward while nothing decodes (as TGI)
    prefill_chunk_tokens: int = 512  # ... and while rows decode: long prompts go in chunks between steps
    max_queue: int = 1024  # waiting requests per base model before `EngineOverloaded`
    # One tenant (the name a caller gives `submit`) among many:
    max_pending_per_tenant: int | None = None  # its waiting requests per base model (None: up to max_queue)
    max_running_per_tenant: int | None = None  # its rows while others wait (None: as many as free)
    max_tokens_per_second_per_tenant: float | None = None  # tokens it generates (reserved at admission)

    def resolved(self, model_max_positions: int | None) -> "Limits":
        total = self.max_total_tokens or model_max_positions or 2048
        max_input = self.max_input_tokens or max(total - 1, 1)
        return dataclasses.replace(self, max_total_tokens=total, max_input_tokens=min(max_input, total - 1))


@dataclass(frozen=True)
class GenerationParams:
    """What one request asks for. ``None`` means the default (see `Limits` for
    ``max_new_tokens``); ``seed`` None with sampling on draws a seed, reported in the details."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    do_sample: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None
    ignore_eos_token: bool = False
    return_full_text: bool = False
    details: bool = False
    decoder_input_details: bool = False
    truncate: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        elif not isinstance(self.stop, tuple):
            raise GenerationValidationError("stop", f"`stop` must be a list of strings, got {self.stop!r}")
        self._validate()

    @property
    def sampling(self) -> bool:
        return bool(self.do_sample) or self.has_warpers

    @property
    def has_warpers(self) -> bool:
        return (
            (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k != 0)
            or (self.top_p is not None and self.top_p < 1.0)
        )

    def _validate(self) -> None:
        def number(name, value):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise GenerationValidationError(name, f"`{name}` must be a number, got {value!r}")
            if value is not None and not _finite(value):
                raise GenerationValidationError(name, f"`{name}` must be a finite number, got {value!r}")

        def integer(name, value):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise GenerationValidationError(name, f"`{name}` must be an integer, got {value!r}")

        def boolean(name, value):
            if not isinstance(value, bool):
                raise GenerationValidationError(name, f"`{name}` must be true or false, got {value!r}")

        for name in ("temperature", "top_p", "repetition_penalty"):
            number(name, getattr(self, name))
        for name in ("max_new_tokens", "top_k", "seed", "truncate"):
            integer(name, getattr(self, name))
        for name in ("do_sample", "ignore_eos_token", "return_full_text", "details", "decoder_input_details"):
            boolean(name, getattr(self, name))
        if self.temperature is not None and not self.temperature > 0:
            raise GenerationValidationError("temperature", "`temperature` must be strictly positive")
        if self.top_k is not None and self.top_k <= 0:
            raise GenerationValidationError("top_k", "`top_k` must be strictly positive")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise GenerationValidationError("top_p", "`top_p` must be > 0.0 and <= 1.0")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise GenerationValidationError("repetition_penalty", "`repetition_penalty` must be strictly positive")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise GenerationValidationError("max_new_tokens", "`max_new_tokens` must be strictly positive")
        if self.truncate is not None and self.truncate <= 0:
            raise GenerationValidationError("truncate", "`truncate` must be strictly positive")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise GenerationValidationError("seed", f"`seed` must be in 0..{MAX_SEED}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise GenerationValidationError("stop", "`stop` must be a list of non-empty strings")

    def check_limits(self, limits: Limits) -> None:
        """Limits that do not depend on the prompt's length."""
        if len(self.stop) > limits.max_stop_sequences:
            raise GenerationValidationError(
                "stop", f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(self.stop)}"
            )
        for s in self.stop:
            if len(s) > limits.max_stop_chars:
                raise GenerationValidationError("stop", f"each stop sequence must be at most {limits.max_stop_chars} characters")
        if self.max_new_tokens is not None and self.max_new_tokens > limits.max_new_tokens:
            raise GenerationValidationError(
                "max_new_tokens", f"`max_new_tokens` must be <= {limits.max_new_tokens}. Given: {self.max_new_tokens}"
            )
        if self.truncate is not None and self.truncate > limits.max_input_tokens:
            raise GenerationValidationError(
                "truncate", f"`truncate` must be strictly positive and less than {limits.max_input_tokens + 1}. Given: {self.truncate}"
            )


@dataclass(frozen=True)
class Token:
    """One token as TGI reports it; ``logprob`` is None for the first prefill token."""

    id: int
    text: str
    logprob: float | None
    special: bool


@dataclass
class GenerationResult:
    """The outcome of one request, with everything TGI's ``details`` holds, plus ``routing``
    (`rlora.adapter.diagnostics.routing_from_totals` of the request's tokens, with ``details``;
    None without a router). ``finish_reason``: ``length``, ``eos_token`` or ``stop_sequence``."""

    generated_text: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    seed: int | None
    tokens: list[Token] = field(default_factory=list)
    prefill: list[Token] = field(default_factory=list)
    routing: dict | None = None
    adapter_id: str | None = None


@dataclass(frozen=True)
class StreamEvent:
    """One generated token. The last event of a request has ``generated_text`` and ``result``
    set (TGI puts ``generated_text`` and ``details`` on the last server-sent event)."""

    index: int
    token: Token
    generated_text: str | None = None
    result: GenerationResult | None = None

    @property
    def final(self) -> bool:
        return self.result is not None


def as_params(params: GenerationParams | Mapping[str, Any] | None) -> GenerationParams:
    if params is None:
        return GenerationParams()
    if isinstance(params, GenerationParams):
        return params
    try:
        return GenerationParams(**dict(params))
    except TypeError as err:  # unknown keyword
        raise GenerationValidationError("parameters", str(err)) from None
