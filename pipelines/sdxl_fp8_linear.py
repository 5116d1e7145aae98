"""The SDXL UNet's token products in float8 e4m3 (GENQ_SDXL_LINEAR=fp8, opt-in).

Linear layers inside the UNet's transformer blocks hold 64% of a guided step's 13.5 TFLOP at 1024x1024
(docs/PERFORMANCE.md, "where a guided step goes"), which cuBLAS runs at 613-700 TFLOP/s in fp16; Hopper
multiplies e4m3 at twice the fp16 rate. Each such layer becomes a pipelines/fp8_linear.Fp8Linear, as WAN's
do (pipelines/wan_fp8_linear.py): the weight in e4m3 with a scale per output feature, each token's
activations scaled to e4m3 in one pass (pipelines/fp8_rows.py), the product summed by the tensor cores and
rescaled, written in bf16 (torch's rowwise product writes nothing else) and handed on in fp16. An
approximation of every product, whose difference bench/sdxl.py --fp8-linear measures on the whole image.

An earlier attempt quantised the activations with torch's own two passes and ran 36.7 ms a step against
32.3 ms in fp16 on an H200: the one-pass kernel and fast accumulation are what this version adds.

Which layers: in every transformer block the self-attention's q|k|v (fused by accelerate_sdxl first) and
output, the cross-attention's query and output, the feed-forward's two layers; and each transformer's
input and output projections. What stays fp16: the cross-attention's keys and values (77 text tokens),
the time and text embeddings, every convolution.
"""
from __future__ import annotations

import torch

from . import fp8_linear

TOKEN_LINEARS = ("attn1.to_qkv", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
                 "proj_in", "proj_out")
UNET_PARTS = ("down_blocks.", "mid_block.", "up_blocks.")

# as WAN's: Hopper's FP8 sums without periodic promotion to fp32 (faster; the difference is measured)
FAST_ACCUM = True


def check_device(device: torch.device) -> None:
    """e4m3 tensor-core products need a CUDA card of compute capability 8.9 or later (Ada, Hopper)."""
    fp8_linear.require_fp8_card(device, "GENQ_SDXL_LINEAR=fp8")


def quantise_unet_linears(unet, fast_accum: bool = FAST_ACCUM) -> int:
    """TOKEN_LINEARS of every transformer replaced in place by Fp8Linear copies; returns how many. Run after
    fuse_qkv_projections (one quantisation of a self-attention's input for q, k and v) and before compiling.
    Idempotent: a replaced layer is no longer an nn.Linear."""
    from . import fp8_rows  # noqa: F401  registers genq::quantise_rows before a cached compiled graph names it

    names = fp8_linear.linear_names(unet, TOKEN_LINEARS, within=UNET_PARTS)
    # chunk=None: the UNet is compiled at fixed shapes, and its largest input (6 images at 1024x1024 in
    # one batch: 49,152 rows of 640) quantises to 31 MB
    return fp8_linear.replace_linears(unet, names, chunk=None, fast_accum=fast_accum)
