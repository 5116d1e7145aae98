"""One WAN 2.1 1.3B guided step at 480x832x81, three ways in one process: plain diffusers (the baseline),
pipelines.accel's exact path, and the same with GENQ_WAN_ATTENTION=fp8. A short call for when the whole
bench.wan does not fit the device time left; figures in OUT/wan_step.json.

    python -m bench.wan_step [--tiny] [--runs 3] [--out DIR]
"""
from __future__ import annotations

import statistics
import time

import torch

from bench.harness import Report, import_accel, parse_args, ratio, sync
from bench.models import build_wan


def main() -> None:
    args = parse_args(__doc__)
    accel, dev = import_accel(), args.device
    h, w, frames = (32, 32, 5) if args.tiny else (480, 832, 81)
    rep = Report("wan_step", args)
    pipe = build_wan(dev, tiny=args.tiny)
    g = torch.Generator(dev).manual_seed(0)
    text = (16, 32) if args.tiny else (512, 4096)
    emb, neg = (torch.randn(1, *text, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))

    def per_step() -> dict:
        stamps: list[float] = []

        def on_step(_p, _i, _t, kw):
            sync(dev)
            stamps.append(time.perf_counter())
            return kw

        def call(steps, cb=None):
            pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=h, width=w, num_frames=frames,
                 num_inference_steps=steps, guidance_scale=6.5, generator=torch.Generator(dev).manual_seed(0),
                 output_type="latent", callback_on_step_end=cb)

        call(2)  # warm-up (and compilation) at the served shape
        call(2 + args.runs, on_step)
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        return {"step_s": [round(t, 4) for t in steps], "min_s": round(min(steps), 4),
                "median_s": round(statistics.median(steps), 4)}

    rep.stage("baseline_per_step", per_step)
    opts = accel.AccelOptions(enabled=True, compile=dev == "cuda")
    rep.stage("accel_levers", lambda: accel.accelerate_wan(pipe, opts))
    rep.stage("accel_per_step", per_step)
    if dev == "cuda":
        from pipelines.wan_fp8_attention import use_fp8_attention

        rep.stage("fp8_levers", lambda: {"blocks": use_fp8_attention(pipe.transformer)})
        rep.stage("fp8_per_step", per_step)
    s = rep.data["stages"]
    rep["summary"] = {"speedup_per_step_min": ratio(s.get("baseline_per_step"), s.get("accel_per_step")),
                      "fp8_speedup_per_step_min": ratio(s.get("baseline_per_step"), s.get("fp8_per_step")),
                      "fp8_speedup_per_step_median": ratio(s.get("baseline_per_step"), s.get("fp8_per_step"),
                                                           "median_s")}
    print("SUMMARY", rep.data["env"].get("card"), rep.data["summary"], flush=True)


if __name__ == "__main__":
    main()
