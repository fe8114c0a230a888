"""`BaseModelRunner`: one served base model and the continuously batched decode loop that serves
every adapter on it.

The runner owns the model and runs its loop in one background thread; only that thread runs
forward passes. Callers (any thread) `submit` requests: validation and tokenization happen in the
caller's thread, then the request is queued and the call returns a `RequestHandle` at once.
Between decode steps the loop admits queued requests (prefills them as one left-padded batch
and merges them into the running batch, KV caches included), runs one decode step for every
running row, and drops rows that finished or were cancelled, so a long request never holds up
short ones.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import threading
from collections import deque
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache

from ..adapter.folder import base_model_fingerprint
from ..basemodels import eos_token_ids
from ..data.tokenize import keep_last, left_pad, with_bos
from .adapters import LoadedAdapter
from .batch import RunningBatch, additive_mask, prefill_mask, prefill_positions
from .detokenize import IncrementalDecoder
from .handle import EngineClosed, EngineOverloaded, RequestCancelled, RequestHandle
from .multi_linear import BatchPlans, ForwardContext, wrap_linears
from .params import GenerationParams, GenerationValidationError, Limits
from .request import ActiveRequest, LogitsRow
from .sampling import TokenChooser, choose_tokens
from .stopping import StopCriteria


class BaseModelRunner:
    """One base model, its tokenizer, and the decode loop serving every adapter on it."""

    def __init__(self, name: str, model, tokenizer, limits: Limits):
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
        layers = wrap_linears(model, self.context)
        self.linear_shapes = {p: tuple(m.base_layer.weight.shape) for p, m in layers.items()}
        self._plans = BatchPlans(layers, self.linear_shapes, self.device, self.dtype)
        config = model.config
        self.limits = limits.resolved(getattr(config, "max_position_embeddings", None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = eos_token_ids(model, tokenizer)
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
        self._batch = RunningBatch(config, self.device)  # touched by the loop thread only
        # Queue shared with submitters.
        self._cv = threading.Condition()
        self._pending: deque[ActiveRequest] = deque()
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._closed = False
        self._next_id = 0
        self.steps = 0  # decode steps run, for tests and stats
        self._thread = threading.Thread(target=self._loop, name=f"rlora-inference-{name}", daemon=True)
        self._thread.start()

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
            # The default, within the limit a request may ask for and the context.
            max_new = max(1, min(limits.default_max_new_tokens, limits.max_new_tokens, limits.max_total_tokens - n))
        if n + max_new > limits.max_total_tokens:
            raise GenerationValidationError(
                "max_new_tokens",
                f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                f"Given: {n} `inputs` tokens and {max_new} `max_new_tokens`",
            )
        chooser = TokenChooser(params, prompt)
        stopping = StopCriteria(max_new, frozenset() if params.ignore_eos_token else self.eos_ids, params.stop)
        with self._cv:
            if self._closed:
                raise EngineClosed("the inference engine is shut down")
            if len(self._pending) >= limits.max_queue:
                raise EngineOverloaded("Model is overloaded")
            self._next_id += 1
            handle = RequestHandle(self._next_id, params, n)
            request = ActiveRequest(
                handle=handle, params=params, adapter=adapter, prompt=prompt, prompt_text=text,
                chooser=chooser, stopping=stopping, decoder=IncrementalDecoder(self._decode, prompt),
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
            ids, mask = self._left_pad(sequences)
            self._plans.set([LogitsRow(a) for a in adapters])
            self.context.token_mask, self.context.record_routing = mask, False
            out = self.model(input_ids=ids, attention_mask=additive_mask(prefill_mask(mask), self.dtype), position_ids=prefill_positions(mask), use_cache=False)
            self._plans.set(self._batch.rows)
            return [out.logits[i, mask.shape[1] - len(s):].float().cpu() for i, s in enumerate(sequences)]
        return self.call(job)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._batch)

    @property
    def max_rows(self) -> int:
        """The largest batch decoded so far."""
        return self._batch.max_rows

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # -- the decode loop (its own thread) --

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._pending and not self._batch.rows and not self._jobs:
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
                    if self._batch.rows:
                        self._decode_step()
            except Exception as err:  # noqa: BLE001 - a failed step fails its requests, not the loop
                for request in self._batch.rows + [r for r in admitted if not r.handle.done()]:
                    request.handle._close(error=err)
                self._reset_batch()
        error = EngineClosed("the inference engine is shut down")
        with self._cv:
            leftovers = list(self._pending) + self._batch.rows
            self._pending.clear()
            jobs = list(self._jobs)
        for request in leftovers:
            request.handle._close(error=error)
        for _, future in jobs:
            future.set_exception(error)

    def _admit(self) -> list[ActiveRequest]:
        """Queued requests that fit the batch now (called with ``_cv`` held)."""
        admitted = []
        room = self.limits.max_batch_size - len(self._batch)
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
        self._batch.clear()
        self._plans.set([])

    def _left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and the token mask as bool, on the model's device."""
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        return ids, mask.bool()

    def _forward(self, ids, attention_mask, positions, cache, keep_all: bool):
        kwargs = {"input_ids": ids, "attention_mask": additive_mask(attention_mask, self.dtype), "position_ids": positions,
                  self._cache_kwarg: cache, "use_cache": True}
        if self._has_logits_to_keep and not keep_all:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs).logits

    def _decode(self, ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False)

    # Steps.

    def _prefill(self, requests: list[ActiveRequest]) -> None:
        ids, mask = self._left_pad([r.prompt for r in requests])
        self._plans.set(requests)
        self.context.token_mask = mask
        self.context.record_routing = any(r.wants_routing for r in requests)
        cache = DynamicCache(config=self.model.config)
        keep_all = any(r.params.decoder_input_details for r in requests)
        logits = self._forward(ids, prefill_mask(mask), prefill_positions(mask), cache, keep_all)
        if keep_all:
            width = mask.shape[1]
            for i, request in enumerate(requests):
                if request.params.decoder_input_details:
                    request.record_prefill(logits[i, width - len(request.prompt) :], self._decode, self.special_ids)
        chosen = choose_tokens([r.chooser for r in requests], logits[:, -1, :].float())
        next_tokens = torch.tensor([token for token, _ in chosen], dtype=torch.long, device=self.device)
        finished = self._accept(requests, chosen)
        self._batch.merge(requests, cache, mask, mask.long().sum(1), next_tokens)
        self._retire(finished)

    def _decode_step(self) -> None:
        batch = self._batch
        self._plans.set(batch.rows)
        ones = torch.ones(len(batch), 1, dtype=torch.bool, device=self.device)
        mask = torch.cat([batch.mask, ones], dim=1)
        self.context.token_mask = ones
        self.context.record_routing = any(r.wants_routing for r in batch.rows)
        logits = self._forward(batch.next.unsqueeze(1), mask[:, None, None, :], batch.positions.unsqueeze(1), batch.cache, False)
        chosen = choose_tokens([r.chooser for r in batch.rows], logits[:, -1, :].float())
        batch.advance(mask, torch.tensor([token for token, _ in chosen], dtype=torch.long, device=self.device))
        self.steps += 1
        self._retire(self._accept(batch.rows, chosen))

    def _accept(self, requests: Sequence[ActiveRequest], chosen: Sequence[tuple[int, float]]) -> list[tuple[ActiveRequest, str]]:
        finished = []
        for request, (token, logprob) in zip(requests, chosen):
            reason = request.accept(token, logprob, token in self.special_ids)
            if reason is not None:
                finished.append((request, reason))
        return finished

    def _drop_cancelled(self) -> None:
        cancelled = [r for r in self._batch.rows if r.handle.cancelled]
        for request in cancelled:
            request.handle._close(error=RequestCancelled("request cancelled"))
        if cancelled:
            self._keep([r for r in self._batch.rows if not r.handle.cancelled])

    def _retire(self, finished: list[tuple[ActiveRequest, str]]) -> None:
        if not finished:
            return
        self._plans.flush_routing()
        for request, reason in finished:
            request.finish(reason)
        done = {id(r) for r, _ in finished}
        self._keep([r for r in self._batch.rows if id(r) not in done])

    def _keep(self, rows: list[ActiveRequest]) -> None:
        self._batch.keep(rows)
        if not rows:
            self._plans.set([])
