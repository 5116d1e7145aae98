"""WAN's video-token products in float8 e4m3 (GENQ_WAN_LINEAR=fp8, opt-in).

After attention, the linear layers are the rest of a WAN step: at 480x832x81 each block multiplies the
32,760 video tokens by its q|k|v, attention-output, cross-attention query and output, and feed-forward
weights (about 2.7 TFLOP a block and pass, a quarter of the step), which cuBLAS runs at ~750 TFLOP/s in
bf16. Hopper multiplies e4m3 at twice that rate. Each such layer becomes a pipelines/fp8_linear.Fp8Linear:
the weight in e4m3 with a scale per output feature, each token's activations scaled to e4m3 on the fly
(a scale per token), the product summed in fp32 and rescaled (the `fp8` dynamic scheme of vLLM and
text-generation-inference). An approximation of every product, whose difference bench/wan_step.py and
bench/wan.py measure.

What stays as loaded: the cross-attention's keys and values (512 text tokens: too few rows to gain), the
embeddings, the output projection and the image-to-video branch.
"""
from __future__ import annotations

import torch

from . import fp8_linear

# per block, the products over the video tokens (VACE's hint blocks also project their input and output)
VIDEO_LINEARS = ("attn1.to_qkv", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                 "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_in", "proj_out")

# Hopper's FP8 products summed without periodic promotion to fp32: 1.2-1.35x faster at WAN's shapes with
# K = 1536, and the whole path's difference from bf16 unchanged (rel. L2 3.73e-2 either way; bench/fp8_gemm.py)
FAST_ACCUM = True


def check_device(device: torch.device) -> None:
    """e4m3 tensor-core products need a CUDA card of compute capability 8.9 or later (Ada, Hopper)."""
    fp8_linear.require_fp8_card(device, "GENQ_WAN_LINEAR=fp8")


def quantise_video_linears(transformer, fast_accum: bool = FAST_ACCUM) -> int:
    """Every block's VIDEO_LINEARS replaced in place by an Fp8Linear (fp8_linear.replace_linears); returns how
    many layers were replaced. accelerate_wan fuses q|k|v first (accel.fuse_wan_qkv), so each
    self-attention quantises its input once for the three."""
    names = fp8_linear.linear_names(transformer, VIDEO_LINEARS, within=("blocks.", "vace_blocks."))
    # one product for all 32,760 rows: chunks only bound an eager caller's fp32 temporaries
    return fp8_linear.replace_linears(transformer, names, chunk=None, fast_accum=fast_accum)
