"""Where WAN 2.1's VAE decode of a 480x832x81 video (latents 16 x 21 x 60 x 104) spends its time, and what
compiling it or a channels-last layout would give: kernel time by kind per mode, each mode's video against
the first mode's (`fp32`, the baseline's: WanPipeline's fp32 VAE).

    python -m bench.wan_vae [--tiny] [--modes fp32,fp32-channels-last,fp32-compiled,bf16] [--out DIR]

Modes: `fp32` diffusers' decode as the baseline runs it; `fp32-channels-last` the same with the weights in
channels_last_3d; `fp32-compiled` with the decoder's per-frame call under torch.compile (inductor's default
mode); `bf16` the opt-in GENQ_WAN_VAE_BF16 decode. Each: one warm-up decode (compiles), three timed
(synchronised, min), one under torch.profiler. Writes OUT/wan_vae.json and the top kernels per mode in
OUT/wan_vae_<mode>.txt. Needs CUDA.
"""
from __future__ import annotations

import copy
import json

import torch

from bench.harness import compare
from bench.models import build_wan
from bench.profiling import header, parse_args, print_report, profile_call

MODES = ("fp32", "fp32-channels-last", "fp32-compiled", "bf16")


def _vae_for(base, mode: str):
    """A copy of the baseline VAE set up for `mode`."""
    vae = copy.deepcopy(base)
    if mode == "bf16":
        vae.to(torch.bfloat16)
    if mode == "fp32-channels-last":  # the 3D convolutions' weights (the resamplers' 2D ones stay as they are)
        for p in vae.parameters():
            if p.dim() == 5:
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    if mode == "fp32-compiled":
        vae.decoder.forward = torch.compile(vae.decoder.forward, dynamic=False)
    return vae


def main() -> int:
    args, out = parse_args(__doc__, "wan_vae", lambda ap: ap.add_argument("--modes", default=",".join(MODES)))
    if args is None:
        return 1
    base = build_wan("cuda", tiny=args.tiny).vae
    frames, h, w = (2, 4, 4) if args.tiny else (21, 60, 104)
    g = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(1, base.config.z_dim, frames, h, w, device="cuda", generator=g)
    report = {**header(), "latents": list(latents.shape), "modes": {}}
    path = out / "wan_vae.json"
    reference = first = None
    for mode in args.modes.split(","):
        vae = base if mode == "fp32" else _vae_for(base, mode)
        z = latents.to(next(vae.parameters()).dtype)
        videos = []

        def decode():
            videos[:] = [vae.decode(z, return_dict=False)[0].float()]

        torch.cuda.reset_peak_memory_stats()
        try:
            rec = profile_call(decode, out / f"wan_vae_{mode}.txt")
        except Exception as exc:  # noqa: BLE001  a mode that fails is recorded, the others still run
            report["modes"][mode] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            path.write_text(json.dumps(report, indent=1))
            continue
        rec["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
        if reference is None:  # the first mode is what the others are compared with (fp32 unless --modes says)
            reference, first = videos[0], rec
        else:
            rec["vs_first"] = compare(reference, videos[0])
            rec["ratio_vs_first"] = round(first["wall_s_min"] / rec["wall_s_min"], 3)
        report["modes"][mode] = rec
        path.write_text(json.dumps(report, indent=1))
        del vae, videos
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
