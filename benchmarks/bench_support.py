"""What the benchmarks share: the machine's name for their tables, and autograd's saved bytes."""

from __future__ import annotations

import platform
from typing import Callable, Iterable

import torch


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def saved_activation_bytes(forward: Callable[[], object], excluded: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``forward()`` runs, not
    counting the storages of ``excluded`` (inputs, weights: they exist with or without backward)."""
    skipped = {t.untyped_storage().data_ptr() for t in excluded}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skipped:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())
