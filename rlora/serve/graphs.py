"""`CapturedSteps`: decode steps run as CUDA graphs, one graph per shape key, replayed with
whatever the step's input buffers hold. Off the GPU (or switched off) a step simply runs.

A step must read and write only tensors that keep their storage between calls (the runner's
input buffers, the KV cache, the adapter slot tables, the weights, its output buffer): replaying
a graph repeats its kernels on the same addresses. Capturing runs the step twice first on a side
stream (lazy library initialisation must not happen during capture); a decode step is idempotent
(it writes the same keys at the same positions), so those runs are harmless. Capture is
thread-local: other threads (adapter loading, other base models' loops) may use the GPU
meanwhile. A step that cannot be captured (a host sync in some model's code) is logged and runs
as it is from then on.
"""

from __future__ import annotations

import logging
from typing import Callable, Hashable

import torch

log = logging.getLogger(__name__)


class CapturedSteps:
    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled and device.type == "cuda"
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # One memory pool for every graph: safe because a replay's output is read before the next
        # replay (and the runner's steps write their output into one buffer of their own).
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: Hashable, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``step()``'s output, by replaying the graph captured for ``key`` (captured now if new)."""
        if not self.enabled:
            return step()
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._graphs[key] = self._capture(step)
            except Exception:  # noqa: BLE001 - serving goes on uncaptured, more slowly
                log.exception("a decode step could not be captured as a CUDA graph; steps run uncaptured from now on")
                self.enabled = False
                self.clear()
                return step()
        graph, output = entry
        graph.replay()
        return output

    def _capture(self, step: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = step()
        self._pool = graph.pool()
        return graph, output

    def clear(self) -> None:
        """Forget every graph (the tensors a step reads were reallocated), and their memory pool:
        it is freed with the last graph that used it, and capturing into a freed pool fails."""
        self._graphs.clear()
        self._pool = None
