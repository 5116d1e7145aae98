"""A module's weights kept in host memory that visit the GPU only while the module runs.

WAN's umT5-XXL text encoder (~11 GB in bf16) is needed for a moment per job, and the daemon keeps it off the
GPU in between (WAN_TEXT_ENCODER_OFFLOAD). `module.to(device)` and back took 9.3-10.1 s a job on an H200: 11 GB
copied in from pageable memory, and the way back allocating and filling fresh host pages with weights that
never changed. Here the weights are copied once into one host block, page-locked where CUDA runs (copies
from it go at the link's full rate), a visit copies them in, and the visit's end points the module back at
the block: nothing is copied back (0.26 s a visit, encoding included; docs/PERFORMANCE.md).
"""
from __future__ import annotations

import itertools
import logging
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch

log = logging.getLogger(__name__)

ALIGN = 256  # bytes: each tensor starts aligned in the block (vectorised copies and kernels want that)


class HostWeights:
    """`module`'s parameters and buffers held in one host block (page-locked if `pin`, by default where CUDA
    is available); `visit(device)` lends them to `device` for a `with` block."""

    def __init__(self, module: torch.nn.Module, pin: bool | None = None):
        self.module = module
        self._tensors = list(itertools.chain(module.parameters(), module.buffers()))
        starts, total = [], 0
        for tensor in self._tensors:
            starts.append(total)
            total += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
        # One block, pinned in one call: torch's pinned allocator would round each tensor up to a power of two.
        self._block = torch.empty(total, dtype=torch.uint8)
        self._host = []
        for tensor, start in zip(self._tensors, starts):
            size = tensor.numel() * tensor.element_size()
            host = self._block[start:start + size].view(tensor.dtype).view(tensor.shape)
            host.copy_(tensor.detach())
            tensor.data = host  # the module's own storage is released tensor by tensor
            self._host.append(host)
        self.nbytes = total
        self.pinned = bool(pin if pin is not None else torch.cuda.is_available()) and _page_lock(self._block)
        if self.pinned:  # unlocked before the block is released (the module's views may keep its memory alive)
            weakref.finalize(self, torch.cuda.cudart().cudaHostUnregister, self._block.data_ptr())

    @contextmanager
    def visit(self, device: torch.device | str) -> Iterator[torch.nn.Module]:
        """The module with its weights on `device` inside the block; on the host copies again after it,
        whatever the block raised. The device copies are then free for the caching allocator to reuse."""
        try:
            for tensor, host in zip(self._tensors, self._host):
                # a copy even to the host's own device, so what the block does cannot touch the host copy;
                # non-blocking from page-locked memory, ordered before the module's kernels on the stream
                tensor.data = host.to(device, non_blocking=True, copy=True)
            yield self.module
        finally:
            for tensor, host in zip(self._tensors, self._host):
                tensor.data = host


def _page_lock(block: torch.Tensor) -> bool:
    """Register the block with CUDA as page-locked memory (as torch's own state-dict staging does); on failure
    the weights stay in pageable memory, slower to copy in but correct."""
    code = int(torch.cuda.cudart().cudaHostRegister(block.data_ptr(), block.numel(), 0))
    if code != 0:
        log.warning("could not page-lock %.1f GB of host weights (cudaError %d): visits copy from pageable memory",
                    block.numel() / 1e9, code)
    return code == 0
