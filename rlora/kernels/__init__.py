"""Triton kernels for the adapter's per-token work, with the PyTorch path as the fallback.

Two sets, each behind a function that takes and returns plain tensors:

* `heads` (training and eval, `RLoRALinear`): everything between the two matmuls of the fused
  adapter, the router softmax, the multi-head dropout and the weighing of the heads, in one
  kernel forward and one backward; the dropout masks come from a seed and are drawn again in
  backward, never stored.
* `multi_adapter` (serving, `MultiAdapterLinear`): punica-style "shrink" (each row's ``x A_s``
  against its own adapter slot) and "expand" (the router softmax and ``sum_i w_i B_{s,i}``, added
  into the base output in place), one launch each, whatever the mix of adapters in the batch.

Where they run: on CUDA tensors when Triton imports (``auto``, the default). ``backend("triton")``
runs them on any device: on the CPU that is Triton's interpreter (``TRITON_INTERPRET=1`` set
before Triton is first imported), which is how the tests check them against the PyTorch path.
``backend("torch")`` switches them off.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Iterator, Literal

import torch

Backend = Literal["auto", "triton", "torch"]
_backend: Backend = "auto"
_triton_importable = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Whether Triton is installed (the kernels can run at all)."""
    return _triton_importable


def enabled(tensor: torch.Tensor) -> bool:
    """Whether the kernels run on ``tensor``'s device under the current backend."""
    if _backend == "torch" or not _triton_importable:
        return False
    return _backend == "triton" or tensor.is_cuda


@contextlib.contextmanager
def backend(name: Backend) -> Iterator[None]:
    """Use ``name`` inside the block: ``auto`` (Triton on CUDA), ``triton`` (everywhere; on the
    CPU through Triton's interpreter) or ``torch`` (the PyTorch path everywhere)."""
    global _backend
    if name not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown kernel backend {name!r}: auto, triton or torch")
    if name == "triton" and not _triton_importable:
        raise RuntimeError("the triton backend needs the triton package")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous
