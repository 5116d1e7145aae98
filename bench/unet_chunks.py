"""SDXL's UNet batches in one-image chunks (pipelines/unet_batches.py) on the GPU: equal to one eager call?

    python -m bench.unet_chunks [--tiny] [--compile-mode MODE] [--out DIR]

Builds SDXL's UNet (full size, or --tiny), records its eager fp16 output for batches 1, 2, 3, 6 and 12,
then applies the production levers (`accelerate_sdxl`: fused q|k|v, channels-last, compile with CUDA
graphs unless --compile-mode says otherwise, the chunker in front of the UNet) and calls it three times
per batch: the third output against the eager one (rel. L2), and whether the chunks of one call differ
from each other (under CUDA graphs each replay writes into the same memory, so a chunk output kept
without a copy would show the last chunk's values everywhere). Writes OUT/unet_chunks.json.
"""
from __future__ import annotations

import torch

from bench.harness import Report, compare, import_accel, parse_args
from bench.models import build_sdxl


def _inputs(unet, batch: int, side: int, device: str):
    g = torch.Generator(device).manual_seed(batch)
    cfg, dtype = unet.config, unet.dtype
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return ((torch.randn(batch, cfg.in_channels, side, side, generator=g, device=device, dtype=dtype),
             torch.tensor(500.0, device=device)),
            {"encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, generator=g, device=device,
                                                  dtype=dtype),
             "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, generator=g, device=device, dtype=dtype),
                                   "time_ids": torch.randn(batch, 6, generator=g, device=device, dtype=dtype)},
             "return_dict": False})


def main() -> None:
    args = parse_args(__doc__)
    accel = import_accel()
    dev = args.device
    pipe = build_sdxl(dev, torch.float16 if dev == "cuda" else torch.float32, tiny=args.tiny)
    side = 8 if args.tiny else 128  # latents of 1024x1024
    rep = Report("unet_chunks", args)
    batches = (1, 2, 3, 6, 12)
    inputs = {b: _inputs(pipe.unet, b, side, dev) for b in batches}
    with torch.no_grad():
        eager = {b: pipe.unet(*a, **kw)[0].clone() for b, (a, kw) in inputs.items()}
    opts = accel.AccelOptions(enabled=True, compile=True, compile_mode=args.compile_mode)
    rep.stage("accelerate", lambda: accel.accelerate_sdxl(pipe, opts))
    for b, (a, kw) in inputs.items():
        def check(b=b, a=a, kw=kw):
            with torch.no_grad():
                for _ in range(3):  # warm-up, recording, replay
                    out = pipe.unet(*a, **kw)[0].clone()
            row = compare(eager[b], out)
            if b > 2:  # neighbouring chunks must not hold the same values
                row["chunks_distinct"] = not torch.equal(out[0], out[2])
            return row
        rep.stage(f"batch_{b}", check)


if __name__ == "__main__":
    main()
