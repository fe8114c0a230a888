"""`TenantQueues`: the requests waiting for a row of one base model, per tenant, so that one
tenant cannot crowd out the others: a tenant's queue has its own bound, rows are handed out
round-robin across the tenants that wait, and a tenant may be held to a number of running
requests (while others wait: alone, it may use every row) and a rate of generated tokens (a
request reserves its ``max_new_tokens`` when it starts and gives back what it did not use).

A tenant is whatever string the caller names (the service: its tenant id; "" for callers that
name none, which then share one queue).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Callable, Mapping

from .handle import EngineOverloaded, RequestCancelled
from .params import Limits
from .request import ActiveRequest


class TenantQueues:
    """`add` runs in submitters' threads, the rest in the runner's loop; all under the runner's
    lock but `refund`, which only the loop calls."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._clock = clock
        self._queues: OrderedDict[str, deque[ActiveRequest]] = OrderedDict()  # in round-robin order
        self._size = 0
        self._allowance: dict[str, tuple[float, float]] = {}  # tenant -> (tokens it may still take, when)

    def __len__(self) -> int:
        return self._size

    def waiting(self, tenant: str) -> int:
        queue = self._queues.get(tenant)
        return len(queue) if queue else 0

    def add(self, request: ActiveRequest) -> None:
        """Queue ``request``; `EngineOverloaded` when the base model's queue or its tenant's is full."""
        if self._size >= self.limits.max_queue:
            raise EngineOverloaded("Model is overloaded")
        share = self.limits.max_pending_per_tenant
        if share is not None and self.waiting(request.tenant) >= share:
            raise EngineOverloaded(f"Model is overloaded: {share} of your requests are waiting already")
        self._queues.setdefault(request.tenant, deque()).append(request)
        self._size += 1

    def take(self, room: int, running: Mapping[str, int]) -> list[ActiveRequest]:
        """Up to ``room`` requests, one per tenant in turn, from tenants under their running cap
        (``running``: rows each tenant holds) and with token allowance left. Cancelled requests
        met on the way end here."""
        taken: list[ActiveRequest] = []
        held = dict(running)
        while len(taken) < room:
            progressed = False
            for tenant in list(self._queues):
                if len(taken) >= room:
                    break
                if not self._may_start(tenant, held.get(tenant, 0)):
                    continue
                request = self._pop(tenant)
                if request is None:
                    continue
                progressed = True
                if request.handle.cancelled:
                    request.handle._close(error=RequestCancelled("request cancelled"))
                    continue
                self._reserve(request)
                taken.append(request)
                held[tenant] = held.get(tenant, 0) + 1
                if tenant in self._queues:
                    self._queues.move_to_end(tenant)  # the next turn starts with the next tenant
            if not progressed:
                break
        return taken

    def put_back(self, requests: list[ActiveRequest]) -> None:
        """Requests taken but not started, back at the front of their tenants' queues, in order."""
        for request in reversed(requests):
            self.refund(request)
            self._queues.setdefault(request.tenant, deque()).appendleft(request)
            self._size += 1

    def sweep_cancelled(self) -> None:
        for tenant, queue in list(self._queues.items()):
            for request in [r for r in queue if r.handle.cancelled]:
                queue.remove(request)
                self._size -= 1
                request.handle._close(error=RequestCancelled("request cancelled"))
            if not queue:
                del self._queues[tenant]

    def drain(self) -> list[ActiveRequest]:
        requests = [r for queue in self._queues.values() for r in queue]
        self._queues.clear()
        self._size = 0
        return requests

    def refund(self, request: ActiveRequest) -> None:
        """Give back the tokens ``request`` reserved and did not generate (it ended or did not start)."""
        unused = request.reserved_tokens - request.generated_count
        if request.reserved_tokens and unused > 0:
            self._allowance[request.tenant] = (self._refilled(request.tenant) + unused, self._clock())
        request.reserved_tokens = 0

    def _reserve(self, request: ActiveRequest) -> None:
        """The tokens ``request`` may generate, out of its tenant's allowance (which may go below
        zero by at most one request's worth: the tenant then waits for it to refill)."""
        if self.limits.max_tokens_per_second_per_tenant is not None:
            request.reserved_tokens = request.stopping.max_new_tokens
            self._allowance[request.tenant] = (self._refilled(request.tenant) - request.reserved_tokens, self._clock())

    def _may_start(self, tenant: str, running: int) -> bool:
        cap = self.limits.max_running_per_tenant
        if cap is not None and running >= cap and any(t != tenant for t in self._queues):
            return False  # at its share while others wait (alone, it may use the idle rows)
        return self.limits.max_tokens_per_second_per_tenant is None or self._refilled(tenant) > 0

    def _refilled(self, tenant: str) -> float:
        """A token bucket of one second's tokens."""
        rate = self.limits.max_tokens_per_second_per_tenant
        allowance, then = self._allowance.get(tenant, (rate, self._clock()))
        return min(rate, allowance + rate * (self._clock() - then))

    def _pop(self, tenant: str) -> ActiveRequest | None:
        queue = self._queues.get(tenant)
        if not queue:
            self._queues.pop(tenant, None)
            return None
        request = queue.popleft()
        self._size -= 1
        if not queue:
            del self._queues[tenant]
        return request
