"""`BaseModelRunner`: one served base model and the continuously batched loop that serves every
adapter on it.

The runner owns the model and runs its loop in one background thread; only that thread runs
forward passes. Callers (any thread) `submit` requests: validation and tokenization happen in the
caller's thread, then the request is queued and the call returns a `RequestHandle` at once.

Everything a step touches is allocated once, so a decode step has a few static shapes and runs
as a captured CUDA graph on a GPU (`graphs.CapturedSteps`):

* the KV cache has a slot per row (`kv_cache.SlotKVCache`): a request holds one from admission
  to its end, writing at its own positions, so requests join and leave without copying;
* the adapters of the running requests sit in slot tables (`slots.AdapterSlots`); each row
  carries its adapter's slot, so another mix of adapters is other data, not another graph;
* tokens are chosen for every row at once on the device (`sampling.BatchSampler`), and the
  text, stop sequences and events are made by the output thread (`output.OutputThread`).

Each turn of the loop admits queued requests into free slots, prefills one chunk of prompt
tokens (smaller while rows are decoding, so a long prompt does not stall them), and runs one
decode step for the rows past their prompts: slots [0, B) with B and the attended width
bucketed to powers of two; slots in that range that are not decoding write to a scratch column.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import logging
import os
import threading
import time
from collections import Counter, deque
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache

from ..adapter.folder import base_model_fingerprint
from ..quantization import linear_shape
from ..basemodels import eos_token_ids
from ..data.tokenize import keep_last, left_pad, with_bos
from .adapters import LoadedAdapter
from .batch import additive_mask, bucket, decode_mask, prefill_chunk, prefill_mask, prefill_positions
from .detokenize import IncrementalDecoder
from .graphs import CapturedSteps
from .handle import EngineClosed, NonFiniteScores, RequestCancelled, RequestFailed, RequestHandle
from .kv_cache import SlotKVCache
from .multi_linear import ForwardContext, wrap_linears
from .observer import ServingObserver
from .output import OutputThread
from .params import GenerationParams, GenerationValidationError, Limits
from .queues import TenantQueues
from .request import ActiveRequest
from .sampling import BatchSampler
from .slots import AdapterSlots
from .stopping import StopCriteria

log = logging.getLogger(__name__)

# How long the loop sleeps when every waiting request is held back by its tenant's token rate.
_HELD_BACK_WAIT = 0.02

# The smallest attended width of a decode step: fewer shapes to capture for short requests.
_MIN_WIDTH = 64


class BaseModelRunner:
    """One base model, its tokenizer, and the loop serving every adapter on it."""

    def __init__(self, name: str, model, tokenizer, limits: Limits, cuda_graphs: bool = True, observer: ServingObserver | None = None):
        self.name = name
        self.observer = observer or ServingObserver()
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        # Fast tokenizers can refuse concurrent use ("Already borrowed"): submitters encode while
        # the output thread decodes, so both take this lock.
        self._tokenizer_lock = threading.Lock()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.fingerprint = base_model_fingerprint(model)
        config = model.config
        self.limits = limits.resolved(getattr(config, "max_position_embeddings", None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.special_ids = set(tokenizer.all_special_ids)
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        kinds = {type(layer).__name__ for layer in getattr(DynamicCache(config=config), "layers", [])}
        if kinds - {"DynamicLayer"}:
            # The slot cache keeps every position of every layer: full attention only.
            raise NotImplementedError(f"base model {name!r} has cache layers {sorted(kinds)}; only full attention is supported")
        if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
            model.set_attn_implementation("sdpa")  # the runner builds its own 4-D masks
        self.context = ForwardContext()
        layers = wrap_linears(model, self.context)
        self.linear_shapes = {p: linear_shape(m.base_layer) for p, m in layers.items()}
        self.adapter_slots = AdapterSlots(layers, self.limits.max_batch_adapters, self.device, self.dtype)
        rows = self._rows_that_fit(config)
        self.cache = SlotKVCache(config, rows, self.limits.max_total_tokens, self.device, self.dtype)
        self.sampler = BatchSampler(rows, config.vocab_size, self.device)
        self.graphs = CapturedSteps(self.device, cuda_graphs)
        # Per-slot inputs of a decode step, read by the captured graphs (fixed storage).
        self._next_tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._positions = torch.full((rows,), self.cache.scratch, dtype=torch.long, device=self.device)
        self._row_slots = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._row_on = torch.zeros(rows, dtype=torch.float32, device=self.device)
        # A decode step's output, written in place: captured graphs share it (none keeps its own).
        self._logits = torch.zeros(rows, config.vocab_size, dtype=torch.float32, device=self.device)
        self._rows: list[ActiveRequest | None] = [None] * rows  # by slot; touched by the loop thread only
        self._graphs_version = self.adapter_slots.version
        self._decoding: tuple[list[ActiveRequest], torch.Tensor] | None = None  # rows decoding and their slots, until one joins or leaves
        self._output = OutputThread(name)
        # Queue shared with submitters.
        self._cv = threading.Condition()
        self._pending = TenantQueues(self.limits)
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._closed = False
        self._sweep_pending = False
        self._next_id = 0
        self.steps = 0  # decode steps run, for tests and stats
        self.max_rows = 0  # the most rows decoded in one step
        self._thread = threading.Thread(target=self._loop, name=f"rlora-inference-{name}", daemon=True)
        self._thread.start()

    def _rows_that_fit(self, config) -> int:
        """``max_batch_size``, or fewer where that many full-length KV cache rows would take more
        than half of the free memory of the device (then ``limits`` says the smaller size)."""
        rows = self.limits.max_batch_size
        per_row = SlotKVCache.row_bytes(config, self.limits.max_total_tokens, self.dtype)
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        fits = free // 2 // per_row
        if fits < 1:
            raise RuntimeError(
                f"base model {self.name!r}: one KV cache row of {self.limits.max_total_tokens} tokens takes {per_row} bytes, "
                f"over half the free memory of {self.device}; lower max_total_tokens"
            )
        if fits < rows:
            log.warning("base model %r: KV cache for %d rows of %d tokens (not %d): device memory", self.name, fits, self.limits.max_total_tokens, rows)
            self.limits = dataclasses.replace(self.limits, max_batch_size=int(fits))
        return self.limits.max_batch_size

    # -- submission (any thread) --

    def encode(self, inputs: str | Sequence[int], params: GenerationParams) -> tuple[list[int], str]:
        """The prompt's ids (bos first, truncated to ``params.truncate``) and its text."""
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
        if params.truncate is not None:
            ids = keep_last(self.tokenizer, ids, params.truncate)
        return ids, text

    def submit(self, inputs: str | Sequence[int], params: GenerationParams, adapter: LoadedAdapter | None, tenant: str = "") -> RequestHandle:
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
            # The default, within the limit a request may ask for and the context.
            max_new = max(1, min(limits.default_max_new_tokens, limits.max_new_tokens, limits.max_total_tokens - n))
        if n + max_new > limits.max_total_tokens:
            raise GenerationValidationError(
                "max_new_tokens",
                f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                f"Given: {n} `inputs` tokens and {max_new} `max_new_tokens`",
            )
        stopping = StopCriteria(max_new, frozenset() if params.ignore_eos_token else self.eos_ids, params.stop)
        with self._cv:
            if self._closed:
                raise EngineClosed("the inference engine is shut down")
            handle = RequestHandle(self._next_id + 1, params, n)
            request = ActiveRequest(
                handle=handle, params=params, adapter=adapter, prompt=prompt, prompt_text=text,
                stopping=stopping, decoder=IncrementalDecoder(self._decode, prompt), tenant=tenant,
            )
            self._pending.add(request)  # EngineOverloaded: the queue, or this tenant's share, is full
            self._next_id += 1
            handle._on_cancel = self._cancelled
            self._cv.notify_all()
        return handle

    def _cancelled(self) -> None:
        with self._cv:
            self._sweep_pending = True
            self._cv.notify_all()

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` in the loop's thread, between steps, and return its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise EngineClosed("the inference engine is shut down")
            self._jobs.append((fn, future))
            self._cv.notify_all()
        return future.result(timeout)

    def logits(self, sequences: Sequence[Sequence[int]], adapters: Sequence[LoadedAdapter | None]) -> list[torch.Tensor]:
        """Full-sequence logits of each sequence with its adapter, computed in one batch (left
        padded, no cache) through the served layers; ``[i]`` is (len_i, vocab). For tests and
        diagnostics; raises RuntimeError when the adapter slots are all held by running requests."""
        def job():
            slots = []
            try:
                for adapter in adapters:
                    slot = -1 if adapter is None else self.adapter_slots.acquire(adapter)
                    if slot is None:
                        raise RuntimeError("every adapter slot is in use by running requests")
                    slots.append(slot)
                ids, mask = left_pad(sequences, self.pad_id, self.device)
                mask = mask.bool()
                self._set_adapters(slots, mask)
                out = self.model(input_ids=ids, attention_mask=additive_mask(prefill_mask(mask), self.dtype),
                                 position_ids=prefill_positions(mask), use_cache=False)
                return [out.logits[i, mask.shape[1] - len(s):].float().cpu() for i, s in enumerate(sequences)]
            finally:
                for slot in slots:
                    if slot >= 0:
                        self.adapter_slots.release(slot)
        return self.call(job)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return sum(row is not None for row in self._rows)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        self._output.close()

    # -- the loop (its own thread) --

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._pending and not self.running and not self._jobs:
                    self._cv.wait()
                if self._closed:
                    break
                jobs = list(self._jobs)
                self._jobs.clear()
                candidates = self._take_pending()
                if not candidates and not jobs and not self.running and self._pending:
                    self._cv.wait(_HELD_BACK_WAIT)  # every waiting tenant is at a cap: look again shortly
                    continue
            try:
                with torch.inference_mode():
                    for fn, future in jobs:
                        try:
                            future.set_result(fn())
                        except BaseException as err:  # noqa: BLE001 - handed to the caller
                            future.set_exception(err)
                    self._admit(candidates)
                    self._drop_ended()
                    self._prefill()
                    self._decode_step()
            except Exception as err:  # noqa: BLE001 - a failed step fails its requests, not the loop
                log.exception("a decode step failed; its requests fail")
                for request in [r for r in self._rows if r is not None]:
                    self._free(request)
                    self._output.submit(lambda r=request, e=err: r.handle._close(error=e))
        error = EngineClosed("the inference engine is shut down")
        with self._cv:
            leftovers = self._pending.drain() + [r for r in self._rows if r is not None]
            jobs = list(self._jobs)
        for request in leftovers:
            self._output.submit(lambda r=request: r.handle._close(error=error))
        for _, future in jobs:
            future.set_exception(error)

    def _take_pending(self) -> list[ActiveRequest]:
        """Queued requests for the free rows (called with ``_cv`` held); cancelled ones end here."""
        if self._sweep_pending:  # a queued request was cancelled: end it now, not when a row frees
            self._sweep_pending = False
            self._pending.sweep_cancelled()
        running = Counter(r.tenant for r in self._rows if r is not None)
        return self._pending.take(self._rows.count(None), running)

    def _admit(self, candidates: list[ActiveRequest]) -> None:
        """Give each candidate a row and its adapter a slot; those whose adapter finds no free
        slot go back to the front of the queue, in order."""
        waiting = []
        for request in candidates:
            try:
                if request.adapter is not None:
                    slot = self.adapter_slots.acquire(request.adapter)
                    if slot is None:
                        waiting.append(request)
                        continue
                    request.adapter_slot = slot
                request.slot = self._rows.index(None)  # the lowest free row: the decode batch stays dense
                self._rows[request.slot] = request
                self._row_slots[request.slot] = max(request.adapter_slot, 0)
                request.seed = self.sampler.set_row(request.slot, request.params, request.prompt)
            except Exception as err:  # noqa: BLE001 - e.g. out of memory growing a table: this request fails
                if request.slot >= 0:
                    self._free(request)
                else:
                    self._pending.refund(request)
                    if request.adapter_slot >= 0:
                        self.adapter_slots.release(request.adapter_slot)
                request.handle._close(error=err)
        if waiting:
            with self._cv:
                self._pending.put_back(waiting)
        if self.adapter_slots.version != self._graphs_version:  # tables reallocated: graphs read old ones
            self.graphs.clear()
            self._graphs_version = self.adapter_slots.version

    def _drop_ended(self) -> None:
        """Free the rows of requests cancelled or ended by a stop sequence (output thread)."""
        for request in [r for r in self._rows if r is not None]:
            if request.handle.cancelled:
                self._free(request)
                self._output.submit(lambda r=request: r.handle._close(error=RequestCancelled("request cancelled")))
            elif request.handle.done():
                self._free(request)

    def _free(self, request: ActiveRequest) -> None:
        slot = request.slot
        self._rows[slot] = None
        self._decoding = None
        self._positions[slot] = self.cache.scratch
        self._row_on[slot] = 0.0
        self._row_slots[slot] = 0  # a row that is not decoding still takes part in a step: a slot in range
        self.sampler.free_row(slot)
        self._pending.refund(request)
        if request.adapter_slot >= 0:
            self.adapter_slots.release(request.adapter_slot)
            request.adapter_slot = -1

    def _set_adapters(self, adapter_slots: Sequence[int], token_mask: torch.Tensor | None) -> None:
        """The forward context of an eager pass over rows with these adapter slots (-1: none)."""
        used = [s for s in adapter_slots if s >= 0]
        self.context.row_slots = torch.tensor([max(s, 0) for s in adapter_slots], dtype=torch.long, device=self.device)
        self.context.row_on = None if all(s >= 0 for s in adapter_slots) else torch.tensor([float(s >= 0) for s in adapter_slots], device=self.device)
        self.context.slots_used = max(used) + 1 if used else 0
        self.context.token_mask = token_mask
        self.context.routing = None

    def _forward(self, **kwargs) -> torch.Tensor:
        kwargs[self._cache_kwarg] = self.cache
        return self.model(use_cache=True, **kwargs).logits

    def _decode(self, ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False)

    # Steps.

    def _prefill(self) -> None:
        """One chunk of prompt tokens of the rows still in their prompts, oldest first, within the
        token budget (padded tokens)."""
        waiting = sorted((r for r in self._rows if r is not None and not r.decoding), key=lambda r: r.handle.id)
        if not waiting:
            return
        decoding = any(r is not None and r.decoding for r in self._rows)
        budget = self.limits.prefill_chunk_tokens if decoding else self.limits.max_prefill_tokens
        rows, chunks = [], []
        for request in waiting:
            if request.prefill_alone and rows:
                continue  # it goes in a pass of its own
            take = min(len(request.prompt) - request.prefilled, budget)
            width = max([len(c) for c in chunks] + [take])
            if rows and width * (len(rows) + 1) > budget:
                break
            rows.append(request)
            chunks.append(request.prompt[request.prefilled : request.prefilled + take])
            if request.prefill_alone:
                break
        try:
            logits = self._prefill_forward(rows, chunks)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: the prompt that fails fails alone
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(rows) > 1:  # which one? each goes again in a pass of its own
                log.warning("a prefill pass of %d prompts failed (%s: %s); retrying them one by one", len(rows), type(err).__name__, err)
                for request in rows:
                    request.prefill_alone = True
                return
            log.exception("a prompt could not be prefilled; its request fails")
            request = rows[0]
            self._free(request)
            failure = RequestFailed(f"the prompt could not be processed ({type(err).__name__}: {err}); try again later")
            self._output.submit(lambda e=failure: request.handle._close(error=e))
            return
        for request, tokens in zip(rows, chunks):
            request.prefilled += len(tokens)
        done = [i for i, r in enumerate(rows) if r.decoding]
        if not done:
            return
        index = torch.tensor(done, device=self.device)
        slots = torch.tensor([rows[i].slot for i in done], device=self.device)
        scores = logits[:, -1, :].index_select(0, index).float()
        tokens, logprobs = self.sampler.choose(scores, slots)
        finished = [rows[i] for i in done]
        self._decoding = None
        for request in finished:
            request.length = len(request.prompt)
            self._row_slots[request.slot] = max(request.adapter_slot, 0)
            self._row_on[request.slot] = float(request.adapter_slot >= 0)
            if request.params.decoder_input_details:
                self._output.submit(lambda r=request: r.record_prefill(self._decode, self.special_ids))
        self._positions.index_copy_(0, slots, torch.tensor([r.length for r in finished], device=self.device))
        self._next_tokens.index_copy_(0, slots, tokens)
        self._hand_over(finished, scores, tokens, logprobs)

    def _prefill_forward(self, rows: list[ActiveRequest], chunks: list[list[int]]) -> torch.Tensor:
        """The logits of one chunk of each row's prompt (the last position, or all with
        ``decoder_input_details``); records prompt logprobs and routing."""
        chunk = prefill_chunk(chunks, [r.prefilled for r in rows], [r.slot for r in rows], self.pad_id, self.cache.scratch, self.device)
        self._set_adapters([r.adapter_slot for r in rows], chunk.token_mask)
        if any(r.wants_routing for r in rows):
            self.context.routing = {}
        keep_all = any(r.params.decoder_input_details for r in rows)
        self.cache.bind_prefill(chunk.slots, chunk.write_positions, chunk.width)
        logits = self._forward(
            input_ids=chunk.ids, attention_mask=additive_mask(chunk.attention, self.dtype), position_ids=chunk.position_ids,
            logits_to_keep=0 if keep_all else 1,
        )
        if keep_all:
            self._record_prompt_logprobs(rows, chunks, logits)
        self._flush_routing(rows)
        return logits

    def _record_prompt_logprobs(self, rows: list[ActiveRequest], chunks: list[list[int]], logits: torch.Tensor) -> None:
        """Each prompt token's log-probability given the tokens before it, from this chunk's logits."""
        width = logits.shape[1]
        for i, (request, tokens) in enumerate(zip(rows, chunks)):
            if not request.params.decoder_input_details:
                continue
            start = request.prefilled
            targets = request.prompt[start + 1 : start + len(tokens) + 1]  # the next token of each position
            if not targets:
                continue
            rows_logits = logits[i, width - len(tokens) : width - len(tokens) + len(targets)].float()
            ids = torch.tensor(targets, device=logits.device).unsqueeze(1)
            request.prompt_logprobs += torch.log_softmax(rows_logits, -1).gather(1, ids).squeeze(1).tolist()

    def _decode_step(self) -> None:
        if self._decoding is None:
            requests = [r for r in self._rows if r is not None and r.decoding]
            self._decoding = (requests, torch.tensor([r.slot for r in requests], dtype=torch.long, device=self.device))
        decoding, slots = self._decoding
        if not decoding:
            return
        rows = bucket(max(r.slot for r in decoding) + 1, self.limits.max_batch_size)
        width = bucket(max(r.length for r in decoding) + 1, self.cache.length, _MIN_WIDTH)
        adapted = [r.adapter_slot for r in decoding if r.adapter_slot >= 0]
        used = bucket(max(adapted) + 1, self.adapter_slots.capacity) if adapted else 0
        # Rows past the decoding ones (and those not decoding) give outputs nobody reads: with an
        # adapter on every decoding row, no row needs switching off.
        base_rows = len(adapted) < len(decoding)
        context = self.context
        context.row_slots, context.slots_used = self._row_slots[:rows], used
        context.row_on = self._row_on[:rows] if base_rows else None
        context.token_mask = None
        record = any(r.wants_routing for r in decoding)
        context.routing = {} if record else None
        positions = self._positions[:rows]
        self.cache.bind_decode(rows, width, positions)

        def step() -> torch.Tensor:
            logits = self._forward(
                input_ids=self._next_tokens[:rows].unsqueeze(1), attention_mask=decode_mask(positions, width, self.dtype),
                position_ids=positions.unsqueeze(1), logits_to_keep=1,
            )
            return self._logits[:rows].copy_(logits[:, -1, :])

        # Recording routing adds work to the step: such steps run as they are, not captured.
        logits = step() if record else self.graphs.run((rows, width, used, base_rows), step)
        if record:
            self._flush_routing([r if r is not None and r.decoding else None for r in self._rows[:rows]])
        scores = logits.index_select(0, slots)
        tokens, logprobs = self.sampler.choose(scores, slots)
        self._next_tokens.index_copy_(0, slots, tokens)
        self._positions.index_add_(0, slots, torch.ones_like(slots))
        for request in decoding:
            request.length += 1
        self.steps += 1
        self.max_rows = max(self.max_rows, len(decoding))
        self.observer.decode_step(self.name, len(decoding))
        self._hand_over(decoding, scores, tokens, logprobs)

    def _hand_over(self, requests: list[ActiveRequest], scores: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        """The chosen tokens to the output thread (one device-to-host copy); rows that reached
        their length or eos are freed now. A row whose ``scores`` are not all finite (an adapter
        whose activations overflow) fails alone: its token means nothing."""
        finite = torch.isfinite(scores).all(-1)
        chosen = torch.stack([tokens.double(), logprobs.double(), finite.double()]).tolist()
        items = []
        for request, token, logprob, ok in zip(requests, *chosen):
            if not ok:
                self._free(request)
                self.cache.clear(request.slot)
                failure = NonFiniteScores(
                    f"the scores of this request are not finite numbers (NaN or infinity): "
                    f"{'adapter ' + repr(request.adapter.adapter_id) if request.adapter else 'the base model'} cannot be served"
                )
                self._output.submit(lambda r=request, e=failure: r.handle._close(error=e))
                continue
            token = int(token)
            reason = request.count(token)
            # The routing so far, as the output thread finishes with it (the loop adds to it).
            routing = dict(request.routing) if request.wants_routing else None
            items.append((request, token, logprob, reason, routing))
        self._output.submit(lambda: self._deliver(items))
        for request, _, _, reason, _ in items:
            if reason is not None:
                self._free(request)

    def _deliver(self, items: list[tuple[ActiveRequest, int, float, str | None, dict | None]]) -> None:
        accepted = 0
        for request, token, logprob, reason, routing in items:
            try:
                taken = request.accept(token, logprob, token in self.special_ids, reason, routing)
            except Exception as err:  # noqa: BLE001 - this request fails, the others go on
                request.handle._close(error=err)
                continue
            if not taken:
                continue  # it had ended already
            accepted += 1
            if len(request.generated) == 1:
                self.observer.first_token(self.name, time.monotonic() - request.submitted_at)
            if isinstance(taken, str):
                self.observer.request_finished(self.name, taken)
        if accepted:
            self.observer.tokens_generated(self.name, accepted)

    def _flush_routing(self, rows: Sequence[ActiveRequest | None]) -> None:
        """Move the routing sums the last forward recorded into rows (row i of the forward is
        ``rows[i]``; None: not a request's row)."""
        recorded = self.context.routing
        self.context.routing = None
        if not recorded:
            return
        for path, (sums, entropy, counts) in recorded.items():
            sums, entropy, counts = sums.cpu(), entropy.cpu(), counts.cpu()
            for i, request in enumerate(rows):
                if request is None or not request.wants_routing:
                    continue
                packed = request.adapter.layers.get(path)
                if packed is None or not packed.has_router or counts[i] == 0:
                    continue
                weights, entropies, tokens = request.routing.get(path, (torch.zeros(packed.heads), 0.0, 0))
                # A new tuple, never one changed in place: the output thread may hold the old one.
                request.routing[path] = (weights + sums[i, : packed.heads], entropies + float(entropy[i]), tokens + int(counts[i]))
