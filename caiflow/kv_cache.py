"""A key/value cache that grows in place, for caiflow's decode loop (`caiflow.decoding`).

transformers' ``DynamicLayer.update`` appends a step's keys and values with ``torch.cat``: every
decode step copies every layer's whole cache (at 64 rows of the default model, hundreds of MB
per token). A :class:`GrowingLayer` keeps each layer's keys (and, alike, values) in a buffer
with spare columns along the sequence dimension::

    buffer (rows, heads, capacity, head_dim)
      columns 0 .. length-1          length .. capacity-1
      [ filled: what attention reads | spare: written by the next steps ]

``update`` writes the new columns into the spare part and returns views of the filled part
(``buffer[:, :, :length]``), so a step copies one column per layer. When the spare part runs
out, the filled part moves to a buffer ``grow`` columns wider than needed: one copy every
``grow`` tokens instead of every token.

The views are not contiguous (a head's rows are ``capacity``, not ``length``, columns apart),
but each head's (length, head_dim) block is, which is what SDPA's kernels and the batched
matmuls of its math path take as they are, without a copy; the filled columns hold the same
numbers as ``torch.cat`` would, so attention computes the same result.

Assigning ``layer.keys = t`` / ``layer.values = t`` (what the loop's batch surgery does: select
rows, merge batches, start rows from a shared prefix) holds ``t`` itself as a full buffer, so a
plain :class:`~transformers.DynamicCache` and :class:`GrowingCache` take the same surgery code.
Such a tensor is never written to (it has no spare column; the next ``update`` moves it to a
new buffer first), so it may be a view of something else, even a stride-0 ``expand``.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROW_COLUMNS = 64  # spare columns added when a buffer is full: one whole-cache copy per 64 tokens


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose update writes into a preallocated buffer instead of concatenating."""

    def __init__(self, grow: int = GROW_COLUMNS):
        if grow < 1:
            raise ValueError(f"grow is {grow}: a buffer needs at least 1 spare column to grow by.")
        self.grow = grow
        self._keys: torch.Tensor | None = None  # (rows, heads, capacity, head_dim)
        self._values: torch.Tensor | None = None
        # Filled columns of each buffer, counted apart so that assigning keys, then values computed
        # from the old `layer.values`, reads the old values whole.
        self._key_columns = self._value_columns = 0
        self._owned = False  # whether the buffers are this layer's own (assigned tensors are not)
        super().__init__()  # sets keys and values to None through the setters below

    # What transformers and the loop read and assign: the filled part only.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[:, :, : self._key_columns]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._keys, self._owned = tensor, False
        self._key_columns = 0 if tensor is None else tensor.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[:, :, : self._value_columns]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._values, self._owned = tensor, False
        self._value_columns = 0 if tensor is None else tensor.shape[-2]

    @property
    def length(self) -> int:
        """Filled columns (the cached tokens, padding included)."""
        return self._key_columns

    @property
    def capacity(self) -> int:
        """Columns the buffers hold before the next update must move them."""
        if self._keys is None or self._values is None:
            return 0
        return min(self._keys.shape[-2], self._values.shape[-2])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # No empty placeholder tensors (DynamicLayer's): the first update allocates the buffers.
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new columns after the filled ones; return the filled keys and values (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._key_columns != self._value_columns:
            raise RuntimeError(
                f"the layer holds {self._key_columns} key columns but {self._value_columns} value "
                "columns: assign keys and values of the same width."
            )
        start = self.length
        end = start + key_states.shape[-2]
        if end > self.capacity or not self._owned:  # never write into an assigned tensor (even cropped)
            self._keys = self._moved(self._keys, key_states, end + self.grow)
            self._values = self._moved(self._values, value_states, end + self.grow)
            self._owned = True
        self._keys[:, :, start:end] = key_states
        self._values[:, :, start:end] = value_states
        self._key_columns = self._value_columns = end
        return self.keys, self.values

    def _moved(self, old: torch.Tensor | None, new: torch.Tensor, capacity: int) -> torch.Tensor:
        """A buffer of `capacity` columns holding `old`'s filled columns (the rest uninitialised)."""
        rows, heads, _, dim = new.shape
        buffer = new.new_empty((rows, heads, capacity, dim))
        if old is not None and self.length:
            buffer[:, :, : self.length] = old[:, :, : self.length]
        return buffer

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` columns (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative count of columns to remove.")
        self._key_columns = self._value_columns = max(0, self.length + tokens_to_remove)


class GrowingCache(DynamicCache):
    """A DynamicCache of :class:`GrowingLayer`, one per layer of `config` (all plain attention)."""

    def __init__(self, config, grow: int = GROW_COLUMNS):
        super().__init__(config=config)
        kinds = {type(layer) for layer in self.layers}
        if kinds - {DynamicLayer}:
            names = ", ".join(sorted(k.__name__ for k in kinds))
            raise ValueError(
                f"the model's cache layers are {names}: GrowingCache replaces plain DynamicLayers only; "
                "use a DynamicCache for this model (caiflow.decoding.supports says which)."
            )
        self.layers = [GrowingLayer(grow) for _ in self.layers]
        if self.layer_class_to_replicate is not None:  # layers added on first use
            self.layer_class_to_replicate = lambda: GrowingLayer(grow)
