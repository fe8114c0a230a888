"""`SlotKVCache`: the key/value cache of one served base model, allocated once: ``slots`` rows of
``length`` positions per layer. A request holds one slot from admission to its end and writes
its tokens at their own positions, so requests of any lengths share one decode step and nothing
is copied when requests join or leave.

The model's attention calls ``update(key, value, layer)`` (transformers' cache protocol); what
it writes where and which keys it returns is set per forward pass by `bind_decode` or
`bind_prefill`. Column ``length`` is a scratch column: writes of padding tokens and of slots
that are not decoding go there, never over a real position.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, config, slots: int, length: int, device: torch.device, dtype: torch.dtype):
        shape = (slots, *_head_shape(config, length))
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        # The same storage indexed (slot, position): `index_put_` takes one index tensor per
        # leading dimension, and is much cheaper to call than indexing with a slice between.
        self._keys_by_position = [k.transpose(1, 2) for k in self.keys]
        self._values_by_position = [v.transpose(1, 2) for v in self.values]
        self.slots, self.length, self.scratch = slots, length, length
        self._rows = torch.arange(slots, device=device)
        self._decode: tuple[int, int, torch.Tensor] | None = None
        self._prefill: tuple[torch.Tensor, torch.Tensor, int] | None = None

    @staticmethod
    def row_bytes(config, length: int, dtype: torch.dtype) -> int:
        """The bytes of one slot (every layer's keys and values)."""
        kv_heads, columns, head_dim = _head_shape(config, length)
        return 2 * config.num_hidden_layers * kv_heads * columns * head_dim * torch.finfo(dtype).bits // 8

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def clear(self, slot: int) -> None:
        """Zero a slot: a request whose values were not finite leaves NaN there, and a masked-out
        NaN still poisons attention (0 * NaN) for the next request in the slot."""
        for keys, values in zip(self.keys, self.values):
            keys[slot].zero_()
            values[slot].zero_()

    def bind_decode(self, rows: int, width: int, positions: torch.Tensor) -> None:
        """The next forward is one token for slots [0, rows): slot i writes at ``positions[i]``
        (the scratch column for a slot that is not decoding) and attends to [0, width)."""
        self._decode, self._prefill = (rows, width, positions), None

    def bind_prefill(self, slots: torch.Tensor, positions: torch.Tensor, width: int) -> None:
        """The next forward is (B', T) tokens of slots ``slots`` (B',), token t written at
        ``positions[:, t]``, attending to [0, width) of its slot."""
        self._prefill, self._decode = (slots, positions, width), None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._decode is not None:
            rows, width, positions = self._decode
            index = (self._rows[:rows], positions)
            self._keys_by_position[layer_idx].index_put_(index, key[:, :, 0])
            self._values_by_position[layer_idx].index_put_(index, value[:, :, 0])
            return keys[:rows, :, :width], values[:rows, :, :width]
        slots, positions, width = self._prefill
        index = (slots.unsqueeze(1), positions)
        self._keys_by_position[layer_idx].index_put_(index, key.transpose(1, 2))
        self._values_by_position[layer_idx].index_put_(index, value.transpose(1, 2))
        return keys[:, :, :width].index_select(0, slots), values[:, :, :width].index_select(0, slots)


def _head_shape(config, length: int) -> tuple[int, int, int]:
    """(kv heads, positions incl. the scratch column, head dim) of one slot of one layer."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_heads, length + 1, head_dim
