"""The inference engine: base models loaded once by name, adapters on demand, one continuously
batched decode loop per base model, requests for different adapters in the same batch.

Threading model
---------------
Each served base model has a `BaseModelRunner` that owns the model and runs its decode loop in
one background thread; only that thread runs forward passes. Callers (any thread, or an asyncio
event loop) `submit` requests: validation, tokenization and adapter loading happen in the
caller's thread (``asubmit`` runs them in a worker thread), then the request is queued and the
call returns a `RequestHandle` at once. Between decode steps the loop admits queued requests
(prefills them as one left-padded batch and merges them into the running batch, KV caches
included), runs one decode step for every running row, and drops rows that finished or were
cancelled, so a long request never holds up short ones.

A handle gives the tokens as they come (``events()`` blocking, ``stream()`` async) and the final
`GenerationResult` (``result()`` blocking, ``aresult()`` async). ``cancel()`` (thread-safe,
idempotent) removes the request from the batch before the next step; ``aresult``/``stream``
cancel the request themselves when the awaiting task is cancelled or the stream is closed early,
which is what happens when an HTTP client disconnects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import os
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Mapping, Sequence

import torch
from transformers import DynamicCache

from ..data.tokenize import with_bos
from ..adapter.folder import AdapterMismatchError, base_model_fingerprint, read_adapter_config
from ..basemodels import load_base_model, resolve_base_model
from .adapters import AdapterCache, LoadedAdapter, load_adapter
from .multi_linear import ForwardContext, build_plan, wrap_linears
from .params import (
    MAX_SEED,
    GenerationParams,
    GenerationResult,
    GenerationValidationError,
    Limits,
    StreamEvent,
    Token,
    as_params,
)

DEFAULT_ADAPTER_CACHE_BYTES = 1 << 30


class RequestCancelled(Exception):
    """The request was cancelled (client gone) before it finished."""


class EngineOverloaded(RuntimeError):
    """Too many requests waiting; the HTTP layer maps it to 429 (TGI: "Model is overloaded")."""


class EngineClosed(RuntimeError):
    """The engine was shut down."""


# ---------------------------------------------------------------------------------------------
# Request handles
# ---------------------------------------------------------------------------------------------

_DONE = object()


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class RequestHandle:
    """One submitted request. Thread-safe; usable from threads and from asyncio."""

    def __init__(self, request_id: int, params: GenerationParams, prompt_tokens: int):
        self.id = request_id
        self.params = params
        self.prompt_tokens = prompt_tokens
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._events: list[StreamEvent] = []
        self._closed = False  # no more events (finished, failed or cancelled)
        self._cond = threading.Condition(self._lock)
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._cancel_requested = threading.Event()
        self._on_cancel: Callable[[], None] | None = None

    # -- producer side (the decode loop) --
    def _emit(self, event: StreamEvent) -> None:
        with self._lock:
            self._events.append(event)
            self._cond.notify_all()
            listeners = list(self._listeners)
        for loop, queue in listeners:
            loop.call_soon_threadsafe(queue.put_nowait, event)

    def _close(self, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            listeners = list(self._listeners)
        try:
            if error is not None:
                self._future.set_exception(error)
            else:
                self._future.set_result(result)
        except concurrent.futures.InvalidStateError:  # someone cancelled the future itself
            pass
        for loop, queue in listeners:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)
            except RuntimeError:  # the listener's event loop is closed
                pass

    # -- consumer side --
    @property
    def cancelled(self) -> bool:
        return self._cancel_requested.is_set() or self._future.cancelled()

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> None:
        """Stop the request's work; a no-op once it finished. Waiters get `RequestCancelled`."""
        if self._future.done():
            return
        self._cancel_requested.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def result(self, timeout: float | None = None) -> GenerationResult:
        return self._future.result(timeout)

    async def aresult(self) -> GenerationResult:
        """Await the result; cancelling the awaiting task cancels the request."""
        waited = asyncio.wrap_future(self._future)
        try:
            return await asyncio.shield(waited)
        except asyncio.CancelledError:
            # Nobody awaits it any more: take its RequestCancelled, or asyncio logs it as
            # "Future exception was never retrieved".
            waited.add_done_callback(_retrieve)
            self.cancel()
            raise

    def events(self, timeout: float | None = None) -> Iterator[StreamEvent]:
        """Blocking iterator over the request's tokens; raises the request's error at the end."""
        index = 0
        while True:
            with self._cond:
                while index >= len(self._events) and not self._closed:
                    if not self._cond.wait(timeout):
                        raise TimeoutError("no token within the timeout")
                pending = self._events[index:]
                closed = self._closed
            for event in pending:
                yield event
            index += len(pending)
            if closed and index >= len(self._events):
                break
        if self._future.exception() is not None:
            raise self._future.exception()

    async def stream(self) -> AsyncIterator[StreamEvent]:
        """Async iterator over the request's tokens (the last has ``result`` set). Raises the
        request's error at the end. Leaving the iteration early (or the task being cancelled,
        e.g. the client disconnected) cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            for event in self._events:
                queue.put_nowait(event)
            if self._closed:
                queue.put_nowait(_DONE)
            else:
                self._listeners.append((loop, queue))
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    finished = True
                    break
                yield item
                if item.final:
                    finished = True
                    break
            if self._future.done() and self._future.exception() is not None:
                raise self._future.exception()
        finally:
            with self._lock:
                if (loop, queue) in self._listeners:
                    self._listeners.remove((loop, queue))
            if not finished:
                self.cancel()


# ---------------------------------------------------------------------------------------------
# Internal per-request state
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    handle: RequestHandle
    params: GenerationParams
    adapter: LoadedAdapter | None
    prompt: list[int]
    prompt_text: str
    max_new_tokens: int
    seed: int | None
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    prefill: list[Token] = field(default_factory=list)
    text: str = ""  # concatenated text of the generated non-special tokens
    stream_ids: list[int] = field(default_factory=list)  # prompt + non-special generated tokens
    prefix_offset: int = 0
    read_offset: int = 0
    routing: dict[str, list] = field(default_factory=dict)  # path -> [weight sums, entropy, tokens]

    @property
    def wants_routing(self) -> bool:
        return self.params.details and self.adapter is not None and self.adapter.has_router

    @property
    def simple_greedy(self) -> bool:
        return not self.params.sampling and self.params.repetition_penalty in (None, 1.0)


@dataclass
class _Row:  # a stand-in row for `BaseModelRunner.logits`
    adapter: LoadedAdapter | None
    wants_routing: bool = False


# ---------------------------------------------------------------------------------------------
# The per-base-model runner
# ---------------------------------------------------------------------------------------------


class BaseModelRunner:
    """One base model, its tokenizer, and the decode loop serving every adapter on it."""

    def __init__(self, name: str, model, tokenizer, limits: Limits, *, adapter_lookup=None):
        self.name = name
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        # Fast tokenizers can refuse concurrent use ("Already borrowed"): submitters encode while
        # the loop decodes, so both take this lock.
        self._tokenizer_lock = threading.Lock()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.fingerprint = base_model_fingerprint(model)
        self.context = ForwardContext()
        self.layers = wrap_linears(model, self.context)
        self.linear_shapes = {p: tuple(m.base_layer.weight.shape) for p, m in self.layers.items()}
        config = model.config
        self.limits = limits.resolved(getattr(config, "max_position_embeddings", None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = set()
        for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, (list, tuple)):
                eos.update(source)
        self.eos_ids = eos
        self.special_ids = set(tokenizer.all_special_ids)
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        kinds = {type(layer).__name__ for layer in getattr(DynamicCache(config=config), "layers", [])}
        if kinds - {"DynamicLayer"}:
            # Merging and trimming caches assumes full-attention layers that keep every position.
            raise NotImplementedError(f"base model {name!r} has cache layers {sorted(kinds)}; only full attention is supported")
        if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
            model.set_attn_implementation("sdpa")  # the engine builds its own 4-D masks
        # Decode-loop state (touched by the loop thread only).
        self._rows: list[_Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, L) bool
        self._positions: torch.Tensor | None = None  # (B,) next position id
        self._next: torch.Tensor | None = None  # (B,) next input token
        self._plan_rows: list | None = None  # rows the layer plans were built for
        # Queue shared with submitters.
        self._cv = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._closed = False
        self._next_id = 0
        self.steps = 0  # decode steps run, for tests and stats
        self.max_rows = 0  # largest batch seen
        self._thread = threading.Thread(target=self._loop, name=f"rlora-inference-{name}", daemon=True)
        self._thread.start()

    # -- submission (any thread) --

    def encode(self, inputs: str | Sequence[int], params: GenerationParams) -> tuple[list[int], str]:
        if isinstance(inputs, str):
            with self._tokenizer_lock:
                encoded = self.tokenizer(inputs, add_special_tokens=False)["input_ids"]
            ids = with_bos(self.tokenizer, encoded)
            text = inputs
        else:
            ids = [int(i) for i in inputs]
            vocab = self.model.config.vocab_size
            if any(not 0 <= i < vocab for i in ids):
                raise GenerationValidationError("inputs", f"token ids must be in 0..{vocab - 1}")
            with self._tokenizer_lock:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if params.truncate is not None and len(ids) > params.truncate:
            # Keep the last `truncate` tokens, bos included when the prompt starts with it.
            head = 1 if ids and ids[0] == self.tokenizer.bos_token_id else 0
            keep = params.truncate - head
            ids = ids[:head] + (ids[len(ids) - keep :] if keep > 0 else [])
        return ids, text

    def submit(self, inputs: str | Sequence[int], params: GenerationParams, adapter: LoadedAdapter | None) -> RequestHandle:
        limits = self.limits
        params.check_limits(limits)
        if not isinstance(inputs, str) and not (isinstance(inputs, Sequence) and inputs):
            raise GenerationValidationError("inputs", "`inputs` must be a string or a non-empty list of token ids")
        prompt, text = self.encode(inputs, params)
        n = len(prompt)
        if n > limits.max_input_tokens:
            raise GenerationValidationError(
                "inputs", f"`inputs` tokens must be <= {limits.max_input_tokens}. Given: {n}"
                + ("" if params.truncate else "; set `truncate` to keep the last tokens")
            )
        max_new = params.max_new_tokens
        if max_new is None:
            # The default, within the server's own limit (RLORA_MAX_NEW_TOKENS) and the context.
            max_new = max(1, min(limits.default_max_new_tokens, limits.max_new_tokens, limits.max_total_tokens - n))
        if n + max_new > limits.max_total_tokens:
            raise GenerationValidationError(
                "max_new_tokens",
                f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                f"Given: {n} `inputs` tokens and {max_new} `max_new_tokens`",
            )
        seed, generator = None, None
        if params.sampling:
            seed = params.seed if params.seed is not None else random.SystemRandom().randrange(MAX_SEED + 1)
            generator = torch.Generator().manual_seed(seed)
        with self._cv:
            if self._closed:
                raise EngineClosed("the inference engine is shut down")
            if len(self._pending) >= limits.max_queue:
                raise EngineOverloaded("Model is overloaded")
            self._next_id += 1
            handle = RequestHandle(self._next_id, params, n)
            request = _Request(
                handle=handle, params=params, adapter=adapter, prompt=prompt, prompt_text=text,
                max_new_tokens=max_new, seed=seed, generator=generator, stream_ids=list(prompt),
                prefix_offset=max(n - 5, 0), read_offset=n,
            )
            handle._on_cancel = self._wake
            self._pending.append(request)
            self._cv.notify_all()
        return handle

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` in the decode loop's thread, between steps, and return its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise EngineClosed("the inference engine is shut down")
            self._jobs.append((fn, future))
            self._cv.notify_all()
        return future.result(timeout)

    def logits(self, sequences: Sequence[Sequence[int]], adapters: Sequence[LoadedAdapter | None]) -> list[torch.Tensor]:
        """Full-sequence logits of each sequence with its adapter, computed in one batch (left
        padded) by the serving path; ``[i]`` is (len_i, vocab). For tests and diagnostics."""
        def job():
            rows = [_Row(a) for a in adapters]
            ids, mask = self._left_pad([list(s) for s in sequences])
            self._set_plans(rows)
            self.context.token_mask, self.context.record_routing = mask, False
            out = self.model(input_ids=ids, attention_mask=self._attention(self._prefill_mask(mask)), position_ids=self._prefill_positions(mask), use_cache=False)
            self._set_plans(self._rows)
            return [out.logits[i, mask.shape[1] - len(s):].float().cpu() for i, s in enumerate(sequences)]
        return self.call(job)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # -- the decode loop (its own thread) --

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._pending and not self._rows and not self._jobs:
                    self._cv.wait()
                if self._closed:
                    break
                jobs = list(self._jobs)
                self._jobs.clear()
                admitted = self._admit()
            try:
                with torch.inference_mode():
                    for fn, future in jobs:
                        try:
                            future.set_result(fn())
                        except BaseException as err:  # noqa: BLE001 - handed to the caller
                            future.set_exception(err)
                    self._drop_cancelled()
                    if admitted:
                        self._prefill(admitted)
                    if self._rows:
                        self._decode_step()
            except Exception as err:  # noqa: BLE001 - a failed step fails its requests, not the loop
                for request in self._rows + [r for r in admitted if not r.handle.done()]:
                    request.handle._close(error=err)
                self._reset_batch()
        error = EngineClosed("the inference engine is shut down")
        with self._cv:
            leftovers = list(self._pending) + self._rows
            self._pending.clear()
            jobs = list(self._jobs)
        for request in leftovers:
            request.handle._close(error=error)
        for _, future in jobs:
            future.set_exception(error)

    def _admit(self) -> list[_Request]:
        """Queued requests that fit the batch now (called with ``_cv`` held)."""
        admitted = []
        room = self.limits.max_batch_size - len(self._rows)
        while self._pending and len(admitted) < room:
            request = self._pending[0]
            if request.handle.cancelled:
                self._pending.popleft()
                request.handle._close(error=RequestCancelled("request cancelled"))
                continue
            width = max([len(r.prompt) for r in admitted] + [len(request.prompt)])
            if admitted and width * (len(admitted) + 1) > self.limits.max_prefill_tokens:
                break
            self._pending.popleft()
            admitted.append(request)
        return admitted

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask, self._positions, self._next = [], None, None, None, None
        self._set_plans([])

    # Batch building blocks.

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = True
        return ids.to(self.device), mask.to(self.device)

    def _prefill_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, T) bool: causal over real tokens; a padding query sees itself only, so no
        attention row is empty (an empty row gives NaN in some SDPA kernels)."""
        width = mask.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
        full = causal.unsqueeze(0) & mask.unsqueeze(1)
        full |= torch.eye(width, dtype=torch.bool, device=mask.device).unsqueeze(0)
        return full.unsqueeze(1)

    @staticmethod
    def _prefill_positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.long().cumsum(1) - 1).clamp_min(0)

    def _attention(self, allowed: torch.Tensor) -> torch.Tensor:
        """A (B, 1, Q, K) bool mask (True: may attend) as the additive float mask that eager and
        SDPA attention take as it is, in every transformers version."""
        zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)

    def _forward(self, ids, attention_mask, positions, cache, keep_all: bool):
        attention_mask = self._attention(attention_mask)
        kwargs = {"input_ids": ids, "attention_mask": attention_mask, "position_ids": positions,
                  self._cache_kwarg: cache, "use_cache": True}
        if self._has_logits_to_keep and not keep_all:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs).logits

    def _set_plans(self, rows: list) -> None:
        """Build every wrapped layer's plan for ``rows`` (no-op when already built for them)."""
        if self._plan_rows is not None and len(self._plan_rows) == len(rows) and all(
            a is b for a, b in zip(self._plan_rows, rows)
        ):
            return
        self._flush_routing()
        self._plan_rows = list(rows)
        adapters = [row.adapter for row in rows]
        if not rows or all(a is None for a in adapters):
            for layer in self.layers.values():
                layer.plan = None
            return
        slots: list[LoadedAdapter | None] = []
        row_slots = []
        for adapter in adapters:
            for index, known in enumerate(slots):
                if known is adapter:
                    break
            else:
                index = len(slots)
                slots.append(adapter)
            row_slots.append(index)
        record = any(row.wants_routing for row in rows)
        for path, layer in self.layers.items():
            slot_layers = [None if a is None else a.layers.get(path) for a in slots]
            layer.plan = build_plan(
                path, slot_layers, row_slots, self.linear_shapes[path], self.device,
                reads_dtype=_reads_dtype(slot_layers), writes_dtype=self.dtype, record_routing=record,
            )

    def _flush_routing(self) -> None:
        """Move the routing sums of the current plans into their rows' requests."""
        rows = self._plan_rows
        if not rows or not any(row.wants_routing for row in rows):
            return
        for path, layer in self.layers.items():
            plan = layer.plan
            if plan is None or plan.weight_sums is None:
                continue
            sums, entropy, counts = plan.weight_sums.cpu(), plan.entropy_sums.cpu(), plan.token_counts.cpu()
            for i, row in enumerate(rows):
                if not row.wants_routing:
                    continue
                packed = row.adapter.layers.get(path)
                if packed is None or not packed.has_router or counts[i] == 0:
                    continue
                acc = row.routing.setdefault(path, [torch.zeros(packed.heads), 0.0, 0])
                acc[0] += sums[i, : packed.heads]
                acc[1] += float(entropy[i])
                acc[2] += int(counts[i])
            plan.weight_sums.zero_()
            plan.entropy_sums.zero_()
            plan.token_counts.zero_()

    # Steps.

    def _prefill(self, requests: list[_Request]) -> None:
        ids, mask = self._left_pad([r.prompt for r in requests])
        self._set_plans(requests)
        self.context.token_mask = mask
        self.context.record_routing = any(r.wants_routing for r in requests)
        cache = DynamicCache(config=self.model.config)
        keep_all = any(r.params.decoder_input_details for r in requests)
        logits = self._forward(ids, self._prefill_mask(mask), self._prefill_positions(mask), cache, keep_all)
        if keep_all:
            self._prefill_details(requests, logits, mask.shape[1])
        chosen = self._choose(requests, logits[:, -1, :].float())
        positions = mask.long().sum(1)
        next_tokens = torch.tensor([c[0] for c in chosen], dtype=torch.long, device=self.device)
        finished = self._accept(requests, chosen)
        # Merge the new rows (with their caches) into the running batch.
        self._merge(requests, cache, mask, positions, next_tokens)
        self._retire(finished)

    def _decode_step(self) -> None:
        batch = len(self._rows)
        self._set_plans(self._rows)
        ones = torch.ones(batch, 1, dtype=torch.bool, device=self.device)
        mask = torch.cat([self._mask, ones], dim=1)
        self.context.token_mask = ones
        self.context.record_routing = any(r.wants_routing for r in self._rows)
        logits = self._forward(self._next.unsqueeze(1), mask[:, None, None, :], self._positions.unsqueeze(1), self._cache, False)
        self._mask = mask
        self._positions = self._positions + 1
        chosen = self._choose(self._rows, logits[:, -1, :].float())
        self._next = torch.tensor([c[0] for c in chosen], dtype=torch.long, device=self.device)
        self.steps += 1
        self._retire(self._accept(self._rows, chosen))

    def _merge(self, requests, cache, mask, positions, next_tokens) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask, self._positions, self._next = list(requests), cache, mask, positions, next_tokens
            self.max_rows = max(self.max_rows, len(self._rows))
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)

        def pad(t, length):  # left-pad dim -2 (cache) or dim 1 (mask) to width
            if length == width:
                return t
            if t.dim() == 2:
                return torch.cat([torch.zeros(t.shape[0], width - length, dtype=t.dtype, device=t.device), t], dim=1)
            shape = list(t.shape)
            shape[-2] = width - length
            return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=-2)

        layers = []
        for (k_old, v_old, *_), (k_new, v_new, *_) in zip(self._cache, cache):
            layers.append((torch.cat([pad(k_old, old_len), pad(k_new, new_len)]), torch.cat([pad(v_old, old_len), pad(v_new, new_len)])))
        self._cache = DynamicCache(layers, config=self.model.config)
        self._mask = torch.cat([pad(self._mask, old_len), pad(mask, new_len)])
        self._positions = torch.cat([self._positions, positions])
        self._next = torch.cat([self._next, next_tokens])
        self._rows = self._rows + list(requests)
        self.max_rows = max(self.max_rows, len(self._rows))

    def _drop_cancelled(self) -> None:
        cancelled = [r for r in self._rows if r.handle.cancelled]
        for request in cancelled:
            request.handle._close(error=RequestCancelled("request cancelled"))
        if cancelled:
            self._keep([r for r in self._rows if not r.handle.cancelled])

    def _retire(self, finished: list[tuple[_Request, str]]) -> None:
        if not finished:
            return
        self._flush_routing()
        for request, reason in finished:
            self._finish(request, reason)
        done = {id(r) for r, _ in finished}
        self._keep([r for r in self._rows if id(r) not in done])

    def _keep(self, rows: list[_Request]) -> None:
        """Shrink the batch to ``rows`` (a subsequence of the current rows)."""
        if not rows:
            self._reset_batch()
            return
        position = {id(r): i for i, r in enumerate(self._rows)}
        index = torch.tensor([position[id(r)] for r in rows], device=self.device)
        mask = self._mask.index_select(0, index)
        used = mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]  # drop all-padding columns on the left
        layers = [(k.index_select(0, index)[..., start:, :], v.index_select(0, index)[..., start:, :]) for k, v, *_ in self._cache]
        self._cache = DynamicCache(layers, config=self.model.config)
        self._mask = mask[:, start:]
        self._positions = self._positions.index_select(0, index)
        self._next = self._next.index_select(0, index)
        self._rows = rows

    # Token choice, per request (results never depend on the rest of the batch).

    def _choose(self, requests: Sequence[_Request], logits: torch.Tensor) -> list[tuple[int, float]]:
        chosen: list[tuple[int, float] | None] = [None] * len(requests)
        simple = [i for i, r in enumerate(requests) if r.simple_greedy]
        if simple:
            index = torch.tensor(simple, device=logits.device)
            rows = logits.index_select(0, index)
            ids = rows.argmax(-1)
            logprobs = torch.log_softmax(rows, -1).gather(1, ids.unsqueeze(1)).squeeze(1)
            for i, token, lp in zip(simple, ids.tolist(), logprobs.tolist()):
                chosen[i] = (token, lp)
        for i, request in enumerate(requests):
            if chosen[i] is None:
                chosen[i] = self._choose_one(request, logits[i])
        return chosen  # type: ignore[return-value]

    def _choose_one(self, request: _Request, scores: torch.Tensor) -> tuple[int, float]:
        params = request.params
        scores = scores.clone()
        # Extreme (valid) penalties and temperatures must not make a NaN of the softmax: each
        # factor is clamped to what the scores' dtype can hold, a score pushed to +inf is capped,
        # and the best score is shifted to 0 before the temperature divides, so a tiny
        # temperature sends the others to -inf rather than the best to +inf.
        finfo = torch.finfo(scores.dtype)
        penalty = params.repetition_penalty
        if penalty is not None and penalty != 1.0:
            penalty = min(max(penalty, finfo.tiny), finfo.max)
            seen = torch.tensor(request.prompt + request.generated, dtype=torch.long, device=scores.device)
            picked = scores.gather(0, seen)
            scores.scatter_(0, seen, torch.where(picked < 0, picked * penalty, picked / penalty))
            scores = torch.nan_to_num(scores, nan=float("-inf"), posinf=finfo.max)
        if params.sampling:
            if params.temperature is not None and params.temperature != 1.0:
                temperature = min(max(params.temperature, finfo.tiny), finfo.max)
                scores = (scores - scores.max()) / temperature
            if params.top_k:
                k = min(params.top_k, scores.shape[-1])
                kth = torch.topk(scores, k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if params.top_p is not None and params.top_p < 1.0:
                sorted_scores, order = torch.sort(scores)
                cumulative = sorted_scores.softmax(-1).cumsum(-1)
                remove = cumulative <= (1 - params.top_p)
                remove[-1] = False
                scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
            logprobs = torch.log_softmax(scores, -1)
            probs = logprobs.exp().cpu()
            token = int(torch.multinomial(probs, 1, generator=request.generator))
        else:
            logprobs = torch.log_softmax(scores, -1)
            token = int(scores.argmax())
        return token, float(logprobs[token])

    # Per-token bookkeeping.

    def _decode_token(self, request: _Request, token: int, special: bool) -> str:
        """The text a new token adds. Special tokens give their own text and stay out of the
        text stream; other tokens use TGI's incremental decoding (nothing until the bytes of a
        character are complete), over the prompt and the non-special generated tokens."""
        if special:
            return self._decode([token])
        request.stream_ids.append(token)
        ids = request.stream_ids
        prefix = self._decode(ids[request.prefix_offset : request.read_offset])
        new = self._decode(ids[request.prefix_offset :])
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            request.prefix_offset, request.read_offset = request.read_offset, len(ids)
            return new[len(prefix) :]
        return ""

    def _pending_text(self, request: _Request) -> str:
        """Text held back by incremental decoding (an incomplete character) at the end."""
        ids = request.stream_ids
        if request.read_offset >= len(ids):
            return ""
        prefix = self._decode(ids[request.prefix_offset : request.read_offset])
        new = self._decode(ids[request.prefix_offset :])
        return new[len(prefix) :]

    def _decode(self, ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _accept(self, requests: Sequence[_Request], chosen) -> list[tuple[_Request, str]]:
        finished = []
        for request, (token, logprob) in zip(requests, chosen):
            request.generated.append(token)
            special = token in self.special_ids
            text = self._decode_token(request, token, special)
            reason = None
            if len(request.generated) >= request.max_new_tokens:
                reason = "length"
            elif not request.params.ignore_eos_token and token in self.eos_ids:
                reason = "eos_token"
            if reason is not None and not special:
                text += self._pending_text(request)  # the last token flushes what was held back
            item = Token(id=token, text=text, logprob=logprob, special=special)
            request.tokens.append(item)
            if not special and text:
                before = len(request.text)
                request.text += text
                if reason is None and request.params.stop:
                    for stop in request.params.stop:
                        if request.text.find(stop, max(0, before - len(stop) + 1)) != -1:
                            reason = "stop_sequence"
                            break
            if reason is None:
                request.handle._emit(StreamEvent(index=len(request.generated), token=item))
            else:
                finished.append((request, reason))
        return finished

    def _finish(self, request: _Request, reason: str) -> None:
        params = request.params
        text = request.text  # the texts of the generated non-special tokens, stop text included
        if params.return_full_text:
            text = request.prompt_text + text
        result = GenerationResult(
            generated_text=text,
            finish_reason=reason,
            prompt_tokens=len(request.prompt),
            generated_tokens=len(request.generated),
            seed=request.seed,
            tokens=request.tokens,
            prefill=request.prefill,
            routing=self._routing_summary(request) if params.details else None,
            adapter_id=request.adapter.adapter_id if request.adapter else None,
        )
        request.handle._emit(StreamEvent(index=len(request.generated), token=request.tokens[-1], generated_text=text, result=result))
        request.handle._close(result=result)

    def _routing_summary(self, request: _Request) -> dict | None:
        if not request.wants_routing:
            return None
        per_layer = {}
        for path, (sums, entropy, count) in request.routing.items():
            heads = sums.shape[0]
            per_layer[path] = {
                "mean_weight": [round(float(v), 6) for v in sums / count],
                "entropy": entropy / count,
                "max_entropy": math.log(heads),
                "tokens": count,
            }
        mean = sum(v["entropy"] for v in per_layer.values()) / len(per_layer) if per_layer else None
        return {"per_layer": per_layer, "mean_entropy": mean}

    def _prefill_details(self, requests: Sequence[_Request], logits: torch.Tensor, width: int) -> None:
        for i, request in enumerate(requests):
            if not request.params.decoder_input_details:
                continue
            n = len(request.prompt)
            rows = logits[i, width - n : width - 1].float()
            ids = torch.tensor(request.prompt[1:], dtype=torch.long, device=rows.device)
            logprobs = torch.log_softmax(rows, -1).gather(1, ids.unsqueeze(1)).squeeze(1).tolist() if n > 1 else []
            texts = [self._decode([t]) for t in request.prompt]
            request.prefill = [
                Token(id=t, text=texts[j], logprob=None if j == 0 else logprobs[j - 1], special=t in self.special_ids)
                for j, t in enumerate(request.prompt)
            ]


def _reads_dtype(slot_layers) -> torch.dtype:
    for layer in slot_layers:
        if layer is not None:
            return layer.reads.dtype
    return torch.float32


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


class InferenceEngine:
    """Base models by name (loaded once, on first use), adapters by id (loaded on demand into a
    byte-bounded LRU cache), and one `BaseModelRunner` decode loop per base model.

    ``models_dir`` and ``cache_dir`` are those of `rlora.basemodels.resolve_base_model`; ``device``
    and ``dtype`` are given to `rlora.basemodels.load_base_model`.
    """

    def __init__(
        self,
        *,
        models_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        adapter_cache_bytes: int = DEFAULT_ADAPTER_CACHE_BYTES,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        limits: Limits | None = None,
        default_base_model: str | None = None,
    ):
        self.models_dir = models_dir
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(os.environ.get("RLORA_HOME", Path.home() / ".rlora")).expanduser() / "models"
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.limits = limits or Limits()
        self.default_base_model = default_base_model
        self.adapters = AdapterCache(adapter_cache_bytes)
        self._runners: dict[str, BaseModelRunner] = {}
        self._models_lock = threading.Lock()
        self._adapter_lock = threading.Lock()
        self._closed = False

    # Base models.

    def base_model(self, name: str) -> BaseModelRunner:
        """The runner of base model ``name``, loading it on first use (raises
        `rlora.basemodels.UnknownBaseModel`, a LookupError, for an unknown name)."""
        with self._models_lock:
            if self._closed:
                raise EngineClosed("the inference engine is shut down")
            runner = self._runners.get(name)
            if runner is None:
                path = resolve_base_model(name, self.models_dir, self.cache_dir)
                model, tokenizer = load_base_model(path, dtype=self.dtype, device=self.device)
                runner = BaseModelRunner(name, model, tokenizer, self.limits)
                self._runners[name] = runner
            return runner

    def loaded_base_models(self) -> list[str]:
        return list(self._runners)

    # Adapters.

    def adapter(self, adapter_id: str, path: str | os.PathLike | None = None, *, base_model: str | None = None) -> LoadedAdapter:
        """The adapter ``adapter_id``, from the cache or loaded from ``path``. Checks that it was
        made for the base model (fingerprint) and, when given, that it is ``base_model``."""
        cached = self.adapters.get(adapter_id)
        if cached is not None and (path is None or Path(path) == cached.path):
            if base_model is not None and cached.base_model != base_model:
                raise AdapterMismatchError(f"adapter {adapter_id!r} is for base model {cached.base_model!r}, not {base_model!r}")
            return cached
        if path is None:
            raise KeyError(f"adapter {adapter_id!r} is not loaded and no path was given")
        if base_model is None:
            _, meta = read_adapter_config(path)
            base_model = meta.get("base_model_name") or self.default_base_model
            if base_model is None:
                raise AdapterMismatchError(f"adapter {adapter_id!r} names no base model")
        runner = self.base_model(base_model)
        with self._adapter_lock:
            cached = self.adapters.get(adapter_id)
            if cached is not None and cached.path == Path(path) and cached.base_model == base_model:
                return cached
            adapter = load_adapter(
                adapter_id, path, base_model=base_model, fingerprint=runner.fingerprint,
                linear_shapes=runner.linear_shapes, device=runner.device, out_dtype=runner.dtype,
            )
            self.adapters.put(adapter)
            return adapter

    def evict(self, adapter_id: str) -> bool:
        """Drop a (deleted) adapter from the cache; requests already running finish with it."""
        return self.adapters.evict(adapter_id)

    # Requests.

    def submit(
        self,
        inputs: str | Sequence[int],
        parameters: GenerationParams | Mapping[str, Any] | None = None,
        *,
        adapter_id: str | None = None,
        adapter_path: str | os.PathLike | None = None,
        base_model: str | None = None,
    ) -> RequestHandle:
        """Validate and queue a request; returns at once. Raises `GenerationValidationError`
        (422), `rlora.basemodels.UnknownBaseModel` (LookupError), FileNotFoundError or
        `AdapterMismatchError` for the adapter, `EngineOverloaded` (429)."""
        params = as_params(parameters)
        adapter = None
        if adapter_id is not None:
            adapter = self.adapter(adapter_id, adapter_path, base_model=base_model)
            base_model = adapter.base_model
        base_model = base_model or self.default_base_model
        if base_model is None:
            raise GenerationValidationError("base_model", "no base model: give one, or an adapter")
        return self.base_model(base_model).submit(inputs, params, adapter)

    async def asubmit(self, inputs, parameters=None, **kwargs) -> RequestHandle:
        """`submit` without blocking the event loop (tokenizing and loading run in a thread)."""
        return await asyncio.to_thread(self.submit, inputs, parameters, **kwargs)

    def generate(self, inputs, parameters=None, *, timeout: float | None = None, **kwargs) -> GenerationResult:
        handle = self.submit(inputs, parameters, **kwargs)
        try:
            return handle.result(timeout)
        except BaseException:
            handle.cancel()
            raise

    async def agenerate(self, inputs, parameters=None, **kwargs) -> GenerationResult:
        handle = await self.asubmit(inputs, parameters, **kwargs)
        return await handle.aresult()

    def logits(self, sequences: Sequence[Sequence[int]], adapter_ids: Sequence[str | None], *, base_model: str) -> list[torch.Tensor]:
        """Logits of whole sequences through the serving path (adapters must be loaded)."""
        runner = self.base_model(base_model)
        adapters = [None if a is None else self.adapter(a, base_model=base_model) for a in adapter_ids]
        return runner.logits(sequences, adapters)

    def stats(self) -> dict:
        return {
            "base_models": {name: {"running": r.running, "pending": r.pending, "steps": r.steps} for name, r in self._runners.items()},
            "adapters": len(self.adapters),
            "adapter_bytes": self.adapters.nbytes,
            "adapter_cache_bytes": self.adapters.max_bytes,
        }

    def close(self) -> None:
        with self._models_lock:
            self._closed = True
            runners = list(self._runners.values())
        for runner in runners:
            runner.close()

    def __enter__(self) -> "InferenceEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
