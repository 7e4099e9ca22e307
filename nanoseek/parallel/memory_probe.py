"""Measured tensor memory of a piece of training code, to check the accounting of
nanoseek/parallel/memory.py against a run (the activations of the DeepSeek-V3 report, section
3.2.3, that recomputation trades for compute). Plain PyTorch on any device: a dispatch mode sees
every aten op run inside it, forward, backward and recomputation alike, and keeps a weak reference
to the storage of every tensor the ops create, so the live bytes are known after each op (CPU has
no allocator statistics; on GPU they would also count the allocator's own slack).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages that ops created inside this mode and that are still alive: `live()`
    now, `peak` the most at any op boundary since entering (or since `reset_peak`). Tensors that
    existed before (parameters, inputs) are not counted."""

    def __init__(self):
        super().__init__()
        self.storages = WeakIdKeyDictionary()  # UntypedStorage -> bytes
        self.peak = 0

    def live(self) -> int:
        return sum(self.storages.values())

    def reset_peak(self) -> None:
        self.peak = self.live()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() in inputs:  # a view of an input, or written in place: not new memory
                    continue
                if storage not in self.storages:
                    self.storages[storage] = storage.nbytes()
        self.peak = max(self.peak, self.live())
        return out
