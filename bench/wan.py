"""WAN 2.1 1.3B: plain WanPipeline (bf16 transformer, fp32 VAE) against pipelines.accel, same run, same card.

Per-step times come from the step callback (synchronised), so one call yields several step timings.

    python -m bench.wan [--tiny] [--runs 3] [--full-steps 25] [--cache-thresholds 0.2,0.3,0.4] [--fp8-attention]
                        [--fp8-linear] [--attention auto|_native_cudnn|flash4|...]

--attention is the accelerated path's GENQ_WAN_ATTENTION (default the production default, `auto`: FlashAttention-4,
pipelines/flash4.py, where its package is installed and the card runs it, else `_native_cudnn`).

With --fp8-attention, after the accelerated stages the self-attention switches to pipelines/fp8_attention.py
(GENQ_WAN_ATTENTION=fp8, an opt-in approximation) and the per-step time, the difference from the baseline,
the full job and the step cache at each threshold run again (stages `fp8_*`, `summary.fp8`); with
--fp8-linear as well, those `fp8_*` stages also run the video-token products in e4m3
(GENQ_WAN_LINEAR=fp8, pipelines/wan_fp8_linear.py).
"""
from __future__ import annotations

import statistics
import time

import torch

from bench.harness import Report, compare, import_accel, memory, parse_args, ratio, reset_memory, sync
from bench.models import build_umt5, build_wan
from pipelines.step_cache import set_wan_step_cache


def served_shape(tiny: bool) -> tuple[int, int, int]:
    """(height, width, frames): the contract's largest WAN job, or a tiny one for CPU smoke runs."""
    return (32, 32, 5) if tiny else (480, 832, 81)


class Denoiser:
    """The pipeline called at the served shape with fixed random prompt embeddings (what the umT5 encoder
    would hand it), returning latents; per-step times come from the step callback, synchronised."""

    def __init__(self, pipe, dev: str, tiny: bool):
        self.pipe, self.dev = pipe, dev
        self.h, self.w, self.frames = served_shape(tiny)
        g = torch.Generator(dev).manual_seed(0)
        text = (16, 32) if tiny else (512, 4096)
        self.emb, self.neg = (torch.randn(1, *text, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))

    def __call__(self, steps: int, n_frames: int | None = None, stamps: list | None = None):
        def on_step(_p, _i, _t, kw):
            if stamps is not None:
                sync(self.dev)
                stamps.append(time.perf_counter())
            return kw
        return self.pipe(prompt_embeds=self.emb, negative_prompt_embeds=self.neg, height=self.h, width=self.w,
                         num_frames=n_frames or self.frames, num_inference_steps=steps, guidance_scale=6.5,
                         generator=torch.Generator(self.dev).manual_seed(0), output_type="latent",
                         callback_on_step_end=on_step).frames

    def per_step(self, steps: int) -> dict:
        """Time of each step after the first of a `steps`-step call, after a 2-step warm-up (and compile)."""
        self(2)
        reset_memory(self.dev)
        stamps: list[float] = []
        self(steps, stamps=stamps)
        steps_s = [b - a for a, b in zip(stamps, stamps[1:])]
        return {"step_s": [round(t, 4) for t in steps_s], "min_s": round(min(steps_s), 4),
                "median_s": round(statistics.median(steps_s), 4), "frames": self.frames, **memory(self.dev)}


def fp8_levers(transformer, linear: bool) -> dict:
    """GENQ_WAN_ATTENTION=fp8 on an accelerated pipeline, and GENQ_WAN_LINEAR=fp8 with `linear`."""
    from pipelines.wan_fp8_attention import use_fp8_attention
    from pipelines.wan_fp8_linear import quantise_video_linears

    levers = {"attention_blocks": use_fp8_attention(transformer, fuse_qk=True)}  # as accelerate_wan does
    if linear:
        levers["fp8_linears"] = quantise_video_linears(transformer)
    return levers


def main() -> None:
    args = parse_args(__doc__, lambda ap: (ap.add_argument("--full-steps", type=int, default=25),
                                           ap.add_argument("--check-steps", type=int, default=4),
                                           ap.add_argument("--cache-thresholds", default="0.2,0.3,0.4"),
                                           ap.add_argument("--cache-dir", default="/tmp/genq_compile_cache"),
                                           ap.add_argument("--fp8-attention", action="store_true"),
                                           ap.add_argument("--fp8-linear", action="store_true"),
                                           ap.add_argument("--attention", default="auto")))
    accel = import_accel()
    dev, tiny = args.device, args.tiny
    h, w, frames = served_shape(tiny)
    if tiny:
        args.full_steps, args.check_steps = 3, 2
    rep = Report("wan", args)
    st: dict = {}

    def build():
        reset_memory(dev)
        t0 = time.perf_counter()
        st["pipe"] = build_wan(dev, tiny=tiny)
        sync(dev)
        pipe = st["pipe"]
        gib = {k: round(sum(p.numel() * p.element_size() for p in getattr(pipe, k).parameters()) / 1024**3, 3)
               for k in ("transformer", "vae")}
        return {"build_s": round(time.perf_counter() - t0, 1), **memory(dev), "weights_gib": gib}

    rep.stage("build", build)
    pipe = st["pipe"]
    call = Denoiser(pipe, dev, tiny)
    text_len = call.emb.shape[1]
    per_step = call.per_step

    def decode(latents):
        vae = pipe.vae
        z = vae.config.z_dim
        lat = latents.to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(lat.device, lat.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(lat.device, lat.dtype)
        with torch.no_grad():
            video = vae.decode(lat / inv_std + mean, return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1)

    def timed_decode(name: str):
        decode(st["ref_latents"][:, :, :2])  # warm-up: kernels and handles, short clip
        reset_memory(dev)
        t0 = time.perf_counter()
        st[name] = decode(st["ref_latents"])
        sync(dev)
        return {"decode_s": round(time.perf_counter() - t0, 3), "frames": frames, **memory(dev)}

    class Capture:
        def __init__(self, module):
            self.out = None
            self.handle = module.register_forward_hook(self.hook, with_kwargs=True)

        def hook(self, _m, a, kw, out):
            if self.out is None:
                self.args = tuple(x.clone() if torch.is_tensor(x) else x for x in a)
                self.kwargs = {k: v.clone() if torch.is_tensor(v) else v for k, v in kw.items()}
                self.out = out[0].clone()
            self.handle.remove()

    def reference():
        st["cap"] = Capture(pipe.transformer)
        st["ref_latents"] = call(args.check_steps)
        return {"latent_std": float(st["ref_latents"].float().std())}

    steps_timed = 2 + args.runs
    rep.stage("baseline_per_step", lambda: per_step(steps_timed))
    rep.stage("baseline_reference", reference)
    rep.stage("baseline_vae_decode_fp32", lambda: timed_decode("ref_video"))

    def memory_1frame(path: str):
        reset_memory(dev)
        resident = memory(dev).get("allocated_gib")
        decode(call(2, n_frames=1))
        sync(dev)
        return {"family": "wan", "path": path, "width": w, "height": h, "frames": 1, "resident_gib": resident,
                **memory(dev)}

    rep.stage("memory_baseline_1frame", lambda: memory_1frame("baseline"), optional_cost_s=30)

    opts = accel.AccelOptions(enabled=True, compile=dev == "cuda", compile_mode=args.compile_mode,
                              cache_dir=args.cache_dir, wan_vae_bf16=True, wan_attention_backend=args.attention)
    rep.stage("accel_levers", lambda: accel.accelerate_wan(pipe, opts))
    rep.stage("accel_per_step", lambda: per_step(steps_timed))

    def check(tolerance: bool = True):
        cap = st["cap"]
        with torch.no_grad():
            out = pipe.transformer(*cap.args, **cap.kwargs)[0]
        lat = call(args.check_steps)
        res = {"transformer_same_input": compare(cap.out, out), f"latents_after_{args.check_steps}_steps":
               compare(st["ref_latents"], lat)}
        return {**res, "tolerance": {"transformer_same_input.rel_l2": 2e-2}} if tolerance else res

    rep.stage("equality", check)
    rep.stage("accel_vae_decode_bf16", lambda: timed_decode("bf16_video"))
    rep.stage("vae_decode_equality", lambda: compare(st["ref_video"], st["bf16_video"]))
    rep.stage("memory_accel_1frame", lambda: memory_1frame("accel"), optional_cost_s=30)

    def full(threshold: float | None, reference: str = "full_latents"):
        set_wan_step_cache(pipe, threshold)
        try:
            call(2)  # warm-up: hooks change the traced code
            t0 = time.perf_counter()
            lat = call(args.full_steps)
            sync(dev)
            took = time.perf_counter() - t0
        finally:
            set_wan_step_cache(pipe, None)
        res = {"denoise_s": round(took, 3), "steps": args.full_steps}
        if threshold is None:
            if reference != "full_latents":
                res["vs_accel_uncached"] = compare(st["full_latents"], lat)
            st[reference] = lat
        else:
            res["vs_accel_uncached"] = compare(st["full_latents"], lat)
        return res

    thresholds = [float(x) for x in args.cache_thresholds.split(",") if x]
    rep.stage(f"accel_full_{args.full_steps}steps", lambda: full(None), optional_cost_s=60)
    for thr in thresholds:
        rep.stage(f"accel_stepcache_{thr}", lambda thr=thr: full(thr), optional_cost_s=45)
    if args.fp8_attention and dev == "cuda":
        rep.stage("fp8_levers", lambda: fp8_levers(pipe.transformer, args.fp8_linear))
        rep.stage("fp8_per_step", lambda: per_step(steps_timed))
        rep.stage("fp8_difference", lambda: check(tolerance=False))
        rep.stage(f"fp8_full_{args.full_steps}steps", lambda: full(None, "fp8_latents"), optional_cost_s=60)
        for thr in thresholds:
            rep.stage(f"fp8_stepcache_{thr}", lambda thr=thr: full(thr), optional_cost_s=45)

    def text_encoder():
        pipe.to("cpu") if tiny else None
        reset_memory(dev)
        enc = build_umt5(dev, tiny=tiny)
        sync(dev)
        resident = memory(dev)["allocated_gib"] if dev == "cuda" else None
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the peak so far is the fp32 initialisation
        ids = torch.randint(0, enc.config.vocab_size, (2, text_len), device=dev)
        with torch.no_grad():
            enc(ids, attention_mask=torch.ones_like(ids))
        sync(dev)
        return {"component": "umt5_xxl", "weights_gib": round(sum(p.numel() * 2 for p in enc.parameters()) / 1024**3, 3),
                "resident_gib": resident, "forward_2x512": memory(dev)}

    rep.stage("memory_text_encoder", text_encoder, optional_cost_s=40)
    s = rep.data["stages"]
    base, ours = s.get("baseline_per_step"), s.get("accel_per_step")
    est_base = base and round(base["median_s"] * args.full_steps, 2)
    summary = {
        "speedup_per_step_min": ratio(base, ours), "speedup_per_step_median": ratio(base, ours, "median_s"),
        "vae_decode_speedup": ratio(s.get("baseline_vae_decode_fp32"), s.get("accel_vae_decode_bf16"), "decode_s"),
        f"baseline_{args.full_steps}steps_estimated_s": est_base,
        **{f"stepcache_{k.rsplit('_', 1)[1]}_vs_baseline_estimate": round(est_base / v["denoise_s"], 3)
           for k, v in s.items() if k.startswith("accel_stepcache_") and est_base},
    }
    # What a user waits for: denoising plus decoding. Baseline: its steps and the fp32 decode; the opt-in
    # fast job: the step cache plus the bf16 decode (both opt-in, both approximations, differences above).
    fp32, bf16 = s.get("baseline_vae_decode_fp32"), s.get("accel_vae_decode_bf16")
    if est_base and fp32 and bf16:
        base_job = est_base + fp32["decode_s"]
        summary[f"job_baseline_{args.full_steps}steps_estimated_s"] = round(base_job, 2)
        for k, v in s.items():
            if k.startswith(("accel_stepcache_", "fp8_stepcache_", "fp8_full_")) and "denoise_s" in v:
                kind = "fp8_" if k.startswith("fp8_") else ""
                name = "uncached" if "_full_" in k else k.rsplit("_", 1)[1]
                summary[f"job_fast_{kind}{name}_vs_baseline"] = round(base_job / (v["denoise_s"] + bf16["decode_s"]), 3)
    fp8 = s.get("fp8_per_step")
    if fp8:
        summary["fp8"] = {"speedup_per_step_min": ratio(base, fp8), "speedup_per_step_median": ratio(base, fp8, "median_s"),
                          "vs_accel_per_step": ratio(ours, fp8), "difference": s.get("fp8_difference")}
    rep["summary"] = summary
    print("SUMMARY", rep.data["env"].get("card"), rep.data["summary"], flush=True)


if __name__ == "__main__":
    main()
