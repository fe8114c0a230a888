"""`CapturedSteps`: decode steps run as CUDA graphs, one graph per shape key, replayed with
whatever the step's input buffers hold. Off the GPU (or switched off) a step simply runs.

A step must read and write only tensors that keep their storage between calls (the runner's
input buffers, the KV cache, the adapter slot tables, the weights): replaying a graph repeats
its kernels on the same addresses. Capturing runs the step twice first on a side stream (lazy
library initialisation must not happen during capture); a decode step is idempotent (it writes
the same keys at the same positions), so those runs are harmless.
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch


class CapturedSteps:
    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled and device.type == "cuda"
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None  # one memory pool shared by every graph: they never run at once

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: Hashable, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``step()``'s output, by replaying the graph captured for ``key`` (captured now if new)."""
        if not self.enabled:
            return step()
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(step)
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
        with torch.cuda.graph(graph, pool=self._pool):
            output = step()
        self._pool = graph.pool()
        return graph, output

    def clear(self) -> None:
        """Forget every graph (the tensors a step reads were reallocated)."""
        self._graphs.clear()
