"""FlashAttention-4 (the `flash-attn-4` package, opt-in: `pip install '.[flash4]'`) as one opaque op.

FlashAttention-4's CuTe DSL kernels include a Hopper (sm90) forward ported from FlashAttention-3. They
compile on their first call (about 11 s on an H200), then stay in memory, and on disk with
GENQ_COMPILE_CACHE_DIR; token counts are not part of the compile key. It is exact attention, as cuDNN's
flash kernel that diffusers' `_native_cudnn` backend runs, within bf16 rounding; whether it is faster at a
model's shapes is measured by bench/fp8_attention.py and bench/wan_profile.py (docs/PERFORMANCE.md). The
call is a custom op so the compiled WAN blocks keep it whole.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

SWITCH = "GENQ_WAN_ATTENTION=flash4"
CARDS = (9, 10)  # compute capability majors with a FlashAttention-4 forward we use: Hopper, Blackwell
# The Hopper forward's launch shape at head dim 128. The package picks 128x128 with P V from registers;
# 192x128 with P V from shared memory ran 2.4% faster at WAN's shape on an H200 (689 against 672
# TFLOP/s, the best of 28 tiles: bench/fp8_attention.py --flash4-tiles). Set through the package's internal
# forward, whose signature is that of the pinned version; without it, the package's own choice.
HOPPER_TILE = {"tile_mn": (192, 128), "mma_pv_is_rs": False, "intra_wg_overlap": True}


@functools.cache
def _kernel() -> Callable:
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as exc:
        raise RuntimeError(f"{SWITCH} needs the flash-attn-4 package (pip install '.[flash4]'): {exc}") from exc
    return flash_attn_func


@functools.cache
def _hopper_forward() -> Callable | None:
    try:
        from flash_attn.cute.interface import _flash_attn_fwd
    except ImportError:
        return None
    return functools.partial(_flash_attn_fwd, **HOPPER_TILE)


def _forward(query: torch.Tensor) -> Callable:
    if query.is_cuda and query.shape[-1] == 128 and torch.cuda.get_device_capability(query.device)[0] == 9:
        return _hopper_forward() or _kernel()
    return _kernel()


def check_device(device: torch.device) -> None:
    """The package importable and a Hopper or Blackwell card, else a RuntimeError naming the switch."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] not in CARDS:
        raise RuntimeError(f"{SWITCH} needs a Hopper or Blackwell CUDA card (compute capability 9.x or 10.x); "
                           f"the model is on {device}")
    _kernel()


def usable(device: torch.device) -> bool:
    """Whether check_device passes: what GENQ_WAN_ATTENTION=auto asks before choosing FlashAttention-4."""
    try:
        check_device(device)
    except RuntimeError:
        return False
    return True


def takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether these [batch, tokens, heads, dim] inputs are ones the kernel takes: CUDA, 16-bit floats, one
    head count, head dims multiples of 8 up to 256 (the Hopper forward's range)."""
    return (query.is_cuda and query.dim() == 4 and query.dtype in (torch.bfloat16, torch.float16)
            and key.dtype == value.dtype == query.dtype and query.shape[2] == key.shape[2] == value.shape[2]
            and query.shape[0] == key.shape[0] and key.shape[:2] == value.shape[:2]
            and query.shape[-1] == key.shape[-1]
            and all(8 <= t.shape[-1] <= 256 and t.shape[-1] % 8 == 0 for t in (query, value)))


@torch.library.custom_op("genq::flash4", mutates_args=())
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v of [batch, tokens, heads, dim] tensors, no mask; out in q's layout."""
    return _forward(query)(query, key, value)[0]


@attention.register_fake
def _(query, key, value):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))
