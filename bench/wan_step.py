"""One WAN 2.1 1.3B guided step at 480x832x81, several ways in one process: plain diffusers (the baseline),
pipelines.accel's exact path, the same with GENQ_WAN_ATTENTION=fp8, then with GENQ_WAN_LINEAR=fp8 as well
(its products with and without fast accumulation; the shipped choice is wan_fp8_linear.FAST_ACCUM).
A short call for when the whole bench.wan does not fit the device time left; figures in OUT/wan_step.json.

    python -m bench.wan_step [--tiny] [--runs 3] [--out DIR]
"""
from __future__ import annotations

from bench.harness import Report, compare, import_accel, parse_args, ratio
from bench.models import build_wan
from bench.wan import Denoiser


def main() -> None:
    args = parse_args(__doc__)
    accel, dev = import_accel(), args.device
    rep = Report("wan_step", args)
    pipe = build_wan(dev, tiny=args.tiny)
    call = Denoiser(pipe, dev, args.tiny)
    steps = 2 + args.runs
    latents: dict = {}

    def timed(name: str):
        """Per-step times, then the latents after 4 steps: against the baseline's, and each approximation's
        against the exact path's (random weights amplify any difference step to step)."""
        res = call.per_step(steps)
        latents[name] = call(4)
        for ref in ("baseline", "accel"):
            if name != ref and ref in latents and (ref == "baseline" or name.startswith("fp8")):
                res[f"latents_after_4_steps_vs_{ref}"] = compare(latents[ref], latents[name])
        return res

    def set_fast_accum(on: bool) -> dict:
        from pipelines.fp8_linear import Fp8Linear

        layers = [m for m in pipe.transformer.modules() if isinstance(m, Fp8Linear)]
        for m in layers:
            m.fast_accum = on
        return {"linears": len(layers), "fast_accum": on}

    rep.stage("baseline_per_step", lambda: timed("baseline"))
    opts = accel.AccelOptions(enabled=True, compile=dev == "cuda")
    rep.stage("accel_levers", lambda: accel.accelerate_wan(pipe, opts))
    rep.stage("accel_per_step", lambda: timed("accel"))
    if dev == "cuda":
        from pipelines.wan_fp8_attention import use_fp8_attention
        from pipelines.wan_fp8_linear import quantise_video_linears

        rep.stage("fp8_levers", lambda: {"blocks": use_fp8_attention(pipe.transformer, fuse_qk=True)})
        rep.stage("fp8_per_step", lambda: timed("fp8"))
        rep.stage("fp8_linear_levers", lambda: {"linears": quantise_video_linears(pipe.transformer, fast_accum=False)})
        rep.stage("fp8_linear_per_step", lambda: timed("fp8_linear"))
        rep.stage("fp8_linear_fast_levers", lambda: set_fast_accum(True))
        rep.stage("fp8_linear_fast_per_step", lambda: timed("fp8_linear_fast"))
    s = rep.data["stages"]
    base = s.get("baseline_per_step")
    rep["summary"] = {"speedup_per_step_min": ratio(base, s.get("accel_per_step")),
                      **{f"{name}_speedup_per_step_{key}": ratio(base, s.get(f"{name}_per_step"), f"{key}_s")
                         for name in ("fp8", "fp8_linear", "fp8_linear_fast") for key in ("min", "median")}}
    print("SUMMARY", rep.data["env"].get("card"), rep.data["summary"], flush=True)


if __name__ == "__main__":
    main()
