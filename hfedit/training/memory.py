"""Activation memory, measured the same way on every device.

:func:`saved_for_backward` counts the bytes autograd keeps for the backward pass (each storage
once, parameters excluded): the activation memory of a training step, which is what activation
checkpointing trades for recomputation. Unlike the CPU's resident set or CUDA's allocator
statistics it does not depend on the allocator, so a CPU run predicts what a GPU step will hold
(plus weights, optimiser state and the largest transient buffer).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn


@dataclass
class SavedBytes:
    """Bytes saved for backward during the block (``bytes``), and how many storages."""

    bytes: int = 0
    storages: int = 0
    _seen: set = field(default_factory=set, repr=False)


@contextmanager
def saved_for_backward(*modules: nn.Module) -> Iterator[SavedBytes]:
    """Count, inside the block, the distinct storages autograd saves for backward, leaving
    out the parameters and buffers of ``modules`` (weights are memory anyway). Tensors that
    activation checkpointing drops are, by design, not seen here."""
    skip = {t.untyped_storage().data_ptr() for m in modules
            for t in [*m.parameters(), *m.buffers()]}
    out = SavedBytes()

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if storage.data_ptr() not in skip and key not in out._seen:
            out._seen.add(key)
            out.bytes += storage.nbytes()
            out.storages += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


__all__ = ["SavedBytes", "saved_for_backward"]
