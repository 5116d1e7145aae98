"""Where a WAN 2.1 1.3B guided step (480x832, 81 frames) spends its time: kernel time by kind for the plain
transformer (diffusers' default attention) and the accelerated one (pipelines.accel: compiled blocks) with
each attention backend in --backends (GENQ_WAN_ATTENTION; `+fp8-linear` after one adds GENQ_WAN_LINEAR=fp8,
`+unfused` sets GENQ_WAN_FUSE=0),
and the attention kernels' achieved TFLOP/s.

    python -m bench.wan_profile [--tiny] [--backends _native_cudnn,native,fp8+fp8-linear] [--out DIR]

A guided step is two transformer forwards (with and without the prompt), as WanPipeline runs them. Each
mode: one warm-up step (compiles), three timed steps (synchronised, min), one step under torch.profiler.
Each accelerated mode's output of one forward is compared with the baseline's on the same inputs and
weights (`vs_baseline`: rel. L2, as bench.wan's equality). Writes OUT/wan_profile.json and the top
kernels per mode in OUT/wan_profile_<mode>.txt. Needs CUDA.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.harness import compare, import_accel
from bench.models import build_wan, wan_text_dim
from bench.profiling import header, parse_args, print_report, profile_call


def _attention_tflop(config, frames: int, height: int, width: int, text_tokens: int) -> float:
    """Attention FLOPs of one forward: self-attention over every latent patch, cross-attention to the text."""
    pt, ph, pw = config.patch_size
    tokens = ((frames - 1) // 4 + 1) // pt * (height // 8 // ph) * (width // 8 // pw)
    inner = config.num_attention_heads * config.attention_head_dim
    per_block = 4 * tokens * tokens * inner + 4 * tokens * text_tokens * inner  # QK^T and PV, 2 FLOPs a MAC
    return config.num_layers * per_block / 1e12


def _step(transformer, x, t, cond, uncond) -> None:
    transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)
    transformer(hidden_states=x, timestep=t, encoder_hidden_states=uncond, return_dict=False)


def _forward(transformer, x, t, cond, uncond) -> torch.Tensor:
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0].float()


def _measure(transformer, inputs, out: Path, mode: str, attention_tflop: float) -> dict:
    rec = profile_call(lambda: _step(transformer, *inputs), out / f"wan_profile_{mode.replace('+', '_')}.txt")
    attention_s = rec["by_kind_s"].get("attention", 0.0)
    return {**rec, "attention_tflop_s": round(2 * attention_tflop / attention_s, 1) if attention_s else None}


def main() -> int:
    args, out = parse_args(__doc__, "wan_profile", lambda ap: ap.add_argument(
        "--backends", default="_native_cudnn,native", help="diffusers attention backends to accelerate with"))
    if args is None:
        return 1
    pipe = build_wan("cuda", tiny=args.tiny)
    frames, height, width, text_tokens = (5, 32, 32, 16) if args.tiny else (81, 480, 832, 512)
    tr = pipe.transformer
    g = torch.Generator("cuda").manual_seed(0)
    latent = (1, tr.config.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
    x = torch.randn(latent, device="cuda", dtype=torch.bfloat16, generator=g)
    cond, uncond = (torch.randn(1, text_tokens, wan_text_dim(pipe), device="cuda", dtype=torch.bfloat16, generator=g)
                    for _ in range(2))
    inputs = (x, torch.tensor([500], device="cuda"), cond, uncond)
    attention = _attention_tflop(tr.config, frames, height, width, text_tokens)
    report = {**header(), "attention_tflop_per_forward": round(attention, 1), "modes": {}, "ratio": {}}
    path = out / "wan_profile.json"
    report["modes"]["baseline"] = _measure(tr, inputs, out, "baseline", attention)
    reference = _forward(tr, *inputs)
    path.write_text(json.dumps(report, indent=1))
    accel = import_accel()
    for backend in filter(None, args.backends.split(",")):
        del pipe, tr
        pipe = build_wan("cuda", tiny=args.tiny)  # same seed: the same weights, uncompiled
        tr = pipe.transformer
        mode = f"accelerated:{backend}"
        attention_backend, *flags = backend.split("+")
        applied = accel.accelerate_wan(pipe, accel.AccelOptions(
            enabled=True, compile=True, wan_attention_backend=attention_backend,
            wan_linear="fp8" if "fp8-linear" in flags else "bf16", wan_fuse="unfused" not in flags))
        rec = report["modes"][mode] = {"applied": applied,
                                       **_measure(tr, inputs, out, mode.replace(":", "-"), attention),
                                       "vs_baseline": compare(reference, _forward(tr, *inputs))}
        report["ratio"][mode] = round(report["modes"]["baseline"]["wall_s_min"] / rec["wall_s_min"], 3)
        path.write_text(json.dumps(report, indent=1))
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
