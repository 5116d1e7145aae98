"""One compiled SDXL UNet graph for every image count: batches it has no graph for run as chunks.

Under GENQ_COMPILE each input shape the UNet meets is a graph of its own, minutes to compile (an H200:
115 s for the first, 169 s for a new image count). A job's UNet batch is its image count, doubled by
classifier-free guidance: 2, 6 or 12 for the contract's 1, 3 or 6 images. Without this, the first job of
an image count the daemon had not warmed up waited for that compile. `BatchChunks` sits in front of the
compiled forward and runs such a batch as consecutive chunks of the unit batch (2: one guided image),
padding the last chunk with a copy of its last sample; the UNet computes each sample on its own, so
every image is the same as in a one-image job. A 6-image job then costs about 7% more GPU time than one
static batch-12 graph (bench/sdxl.py, docs/PERFORMANCE.md); a shape listed in SDXL_WARMUP_EXTRA is
warmed up inside `whole_batches`, which gives that exact input shape its own graph and runs it whole.
The one-image chunks pay the CPU's launch time once each: on a host whose CPU launches kernels slower
than the GPU runs them, default compile mode made a 6-image job slower than plain diffusers (0.94x on an
H100), so SDXL compiles with CUDA graphs unless GENQ_COMPILE_MODE says otherwise (pipelines/accel.py).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.utils._pytree import tree_map

UNIT = 2  # one image with classifier-free guidance: what a one-image job runs


class BatchChunks:
    """Calls `forward` (the compiled UNet forward) only with the unit batch or with a sample shape
    registered through `whole_batches`."""

    def __init__(self, forward: Callable[..., Any], unit: int = UNIT):
        self.forward, self.unit = forward, unit
        self.whole: set[tuple[int, ...]] = set()  # sample shapes that run in one call
        self._registering = False

    def __call__(self, sample: torch.Tensor, *args, **kwargs):
        shape = tuple(sample.shape)
        if self._registering:
            self.whole.add(shape)
        batch = shape[0]
        if batch == self.unit or shape in self.whole:
            return self.forward(sample, *args, **kwargs)
        parts = []
        for start in range(0, batch, self.unit):
            rows = torch.arange(start, start + self.unit, device=sample.device).clamp_(max=batch - 1)
            # a copy, and the output itself dropped before the next chunk: under CUDA graphs the next replay
            # writes its output into the same memory
            parts.append(_copy(self.forward(*_take((sample, *args), rows, batch), **_take(kwargs, rows, batch))))
        return _join(parts, batch)


def _take(value, rows: torch.Tensor, batch: int):
    """value with every tensor whose first dimension is the batch cut to `rows` (nested dicts, tuples)."""
    return tree_map(lambda t: t.index_select(0, rows) if _batched(t, batch) else t, value)


def _batched(t, batch: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch


def _copy(value):
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, value)


def _join(parts: list, batch: int):
    """The chunks' outputs as one batch (a tensor, a tuple, or diffusers' output dataclass, which diffusers
    registers as a pytree node), padding cut."""
    return tree_map(lambda *xs: torch.cat(xs)[:batch] if isinstance(xs[0], torch.Tensor) else xs[0], *parts)


def chunk_batches(unet, compiled_forward: Callable[..., Any]) -> BatchChunks:
    """Route unet's calls through BatchChunks in front of compiled_forward; the same module object stays
    in place (an img2img pipeline built from txt2img's components follows)."""
    chunks = BatchChunks(compiled_forward)
    unet.forward = chunks
    return chunks


@contextlib.contextmanager
def whole_batches(unet) -> Iterator[None]:
    """Every UNet input shape met inside runs whole from now on (a listed warm-up shape: it gets its own
    compiled graph). A no-op for a UNet that is not chunked (no compile, a CPU)."""
    chunks = vars(unet).get("forward")
    if not isinstance(chunks, BatchChunks):
        yield
        return
    chunks._registering = True
    try:
        yield
    finally:
        chunks._registering = False
