"""Bytes held for backward, counted exactly: every saved tensor from the moment autograd packs it until it
frees it, including what a custom backward saves while it recomputes (a reversible chain's blocks, a
Moonwalk sweep) and what an engine keeps between sweeps through :class:`gradxform.autodiff.moonwalk.Held`.

A tensor packed twice (the same storage saved by two ops) is counted once while both hold it. Tensors that
live anyway (a model's parameters and buffers, which layers save for their backward) can be left out.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


class HeldBytes:
    """``live``: bytes held now; ``peak``: the most held at once; ``packed``: all bytes ever packed."""

    def __init__(self, exclude: set[int] | None = None) -> None:
        self.exclude = exclude or set()   # data pointers of storages not to count
        self.live = 0
        self.peak = 0
        self.packed = 0
        self._refs: dict[tuple, int] = {}

    def _key(self, t: torch.Tensor) -> tuple:
        storage = t.untyped_storage()
        return (storage.data_ptr(), storage.nbytes(), t.device)

    def pack(self, t: torch.Tensor) -> Any:
        if t.untyped_storage().data_ptr() in self.exclude:
            return t
        key = self._key(t)
        n = t.untyped_storage().nbytes()
        if self._refs.get(key, 0) == 0:
            self.live += n
            self.peak = max(self.peak, self.live)
        self._refs[key] = self._refs.get(key, 0) + 1
        self.packed += t.numel() * t.element_size()
        return _Packed(self, key, n, t)

    def _free(self, key: tuple, n: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= n


class _Packed:
    """What autograd stores in place of a saved tensor; freeing it is the tensor's release."""

    __slots__ = ("owner", "key", "n", "tensor")

    def __init__(self, owner: HeldBytes, key: tuple, n: int, tensor: torch.Tensor):
        self.owner, self.key, self.n, self.tensor = owner, key, n, tensor

    def __del__(self) -> None:
        self.owner._free(self.key, self.n)


@contextlib.contextmanager
def held_bytes(exclude: torch.nn.Module | None = None) -> Iterator[HeldBytes]:
    """Count the bytes held for backward by everything run (forward and backward) inside the block; with
    ``exclude``, not that module's parameters and buffers."""
    skip = set()
    if exclude is not None:
        skip = {t.untyped_storage().data_ptr() for t in [*exclude.parameters(), *exclude.buffers()]}
    counter = HeldBytes(skip)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda p: p.tensor if isinstance(p, _Packed) else p):
        yield counter
