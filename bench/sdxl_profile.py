"""Where an SDXL guided denoising step (1024x1024, one image: UNet at batch 2; `--images N`: batch 2N) spends
its time: kernel time by kind for the plain fp16 UNet and for the accelerated one (pipelines.accel.accelerate_sdxl: fused q|k|v,
channels-last, torch.compile), against the step's FLOPs counted by torch's FlopCounterMode.

    python -m bench.sdxl_profile [--tiny] [--compile-mode MODE] [--images 1] [--out DIR]

Each mode: one warm-up step (the accelerated one compiles, ~2 min on an H200), three timed steps
(synchronised, min), one step under torch.profiler. Writes OUT/sdxl_profile.json and the top kernels per
mode in OUT/sdxl_profile_<mode>.txt. Needs CUDA.
"""
from __future__ import annotations

import json

import torch

from bench.harness import import_accel
from bench.models import build_sdxl
from bench.profiling import header, parse_args, print_report, profile_call


def _inputs(pipe, side: int, images: int, device: str = "cuda") -> tuple:
    """A guided step's UNet inputs for `images` images (batch 2 x images: the unconditional and the prompted
    halves): latents, timestep, text states, pooled states and time ids."""
    unet, g, n = pipe.unet, torch.Generator(device).manual_seed(0), 2 * images
    dtype, width = unet.dtype, unet.config.cross_attention_dim
    latents = torch.randn(n, unet.config.in_channels, side // 8, side // 8, device=device, dtype=dtype, generator=g)
    text = torch.randn(n, 77, width, device=device, dtype=dtype, generator=g)
    pooled = torch.randn(n, pipe.text_encoder_2.config.projection_dim, device=device, dtype=dtype, generator=g)
    time_ids = torch.tensor([[side, side, 0, 0, side, side]] * n, device=device, dtype=dtype)
    return latents, torch.tensor(500, device=device), text, {"text_embeds": pooled, "time_ids": time_ids}


def _step(unet, latents, t, text, added):
    return unet(latents, t, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]


def main() -> int:
    args, out = parse_args(__doc__, "sdxl_profile", lambda ap: (
        ap.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the accelerated UNet (reduce-overhead: graphs)"),
        ap.add_argument("--images", type=int, default=1, help="images per step (the UNet runs at twice this)")))
    if args is None:
        return 1
    pipe = build_sdxl("cuda", tiny=args.tiny)
    inputs = _inputs(pipe, 64 if args.tiny else 1024, args.images)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as flops:
        _step(pipe.unet, *inputs)
    tflop = flops.get_total_flops() / 1e12
    by_op = {str(op): round(n / 1e12, 3) for op, n in flops.get_flop_counts()["Global"].items()}
    report = {**header(), "images": args.images, "tflop_per_step": round(tflop, 2), "tflop_by_op": by_op, "modes": {}}
    path = out / "sdxl_profile.json"
    for mode in ("baseline", "accelerated"):
        if mode == "accelerated":
            accel = import_accel()
            opts = accel.AccelOptions(enabled=True, compile=True, compile_mode=args.compile_mode)
            report["accelerated_with"] = accel.accelerate_sdxl(pipe, opts)
            inputs = (inputs[0].contiguous(memory_format=torch.channels_last), *inputs[1:])
        rec = profile_call(lambda: _step(pipe.unet, *inputs), out / f"sdxl_profile_{mode}.txt")
        rec["tflop_s"] = round(tflop / rec["wall_s_min"], 1)
        report["modes"][mode] = rec
        path.write_text(json.dumps(report, indent=1))
    report["ratio"] = round(report["modes"]["baseline"]["wall_s_min"] / report["modes"]["accelerated"]["wall_s_min"], 3)
    path.write_text(json.dumps(report, indent=1))
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
