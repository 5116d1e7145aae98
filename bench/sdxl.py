"""SDXL: plain StableDiffusionXLPipeline (fp16, default scheduler) against pipelines.accel, same run, same card.

    python -m bench.sdxl [--tiny] [--runs 3] [--compile-mode MODE] [--cache-dir DIR] [--skip-6img] [--skip-memory]
                         [--fp8-linear]

--skip-6img / --skip-memory leave out the 6-image figures and the memory tables (a shorter device call).
--fp8-linear: after the accelerated figures, the same pipeline with the UNet's token products in e4m3
(`use_fp8_linear`, an experiment: not a daemon setting), compiled anew: its figures (`fp8_*`), and its
difference from the baseline and from the exact accelerated path (`fp8_equality`). The whole-batch 6-image
figure is left out to fit the call.
Ours at 6 images is timed twice: as the daemon runs it by default (one-image chunks through the 1-image
graph, pipelines/unet_batches.py) and with the batch run whole on a graph of its own (SDXL_WARMUP_EXTRA).
"""
from __future__ import annotations

import torch

from bench.harness import Report, compare, import_accel, memory, parse_args, ratio, reset_memory, sync, timed
from bench.models import build_sdxl
from pipelines.unet_batches import whole_batches

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, sharp focus"
NEGATIVE = "blurry, low quality"


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


class UnetCapture:
    """Records the first UNet call's inputs and output (for a same-input comparison after accelerating)."""

    def __init__(self, unet):
        self.args = self.kwargs = self.out = None
        self.handle = unet.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, _m, args, kwargs, out):
        if self.out is None:
            self.args, self.kwargs = _clone(args), _clone(kwargs)
            self.out = (out[0] if isinstance(out, tuple) else out.sample).detach().clone()
        self.handle.remove()


def main() -> None:
    args = parse_args(__doc__, lambda ap: (ap.add_argument("--steps", type=int, default=25),
                                           ap.add_argument("--fast-steps", type=int, default=15),
                                           ap.add_argument("--cache-dir", default="/tmp/genq_compile_cache"),
                                           ap.add_argument("--skip-6img", action="store_true",
                                                           help="leave out the 6-image figures"),
                                           ap.add_argument("--skip-memory", action="store_true",
                                                           help="leave out the memory tables"),
                                           ap.add_argument("--fp8-linear", action="store_true",
                                                           help="also time FP8 token products")))
    accel = import_accel()
    dev, tiny = args.device, args.tiny
    if tiny:  # a smoke run checks the code paths, not the speed
        args.steps, args.fast_steps = 2, 1
    side = 64 if tiny else 1024
    wide = (64, 48) if tiny else (1024, 576)
    rep = Report("sdxl", args)
    st: dict = {}

    def build():
        reset_memory(dev)
        import time
        t0 = time.perf_counter()
        st["pipe"] = build_sdxl(dev, torch.float16 if dev == "cuda" else torch.float32, tiny=tiny)
        sync(dev)
        return {"build_s": round(time.perf_counter() - t0, 1), **memory(dev),
                "params_b": {k: round(sum(p.numel() for p in getattr(st["pipe"], k).parameters()) / 1e9, 3)
                             for k in ("unet", "vae", "text_encoder", "text_encoder_2")}}

    rep.stage("build", build)
    pipe = st["pipe"]

    def call(n: int, steps: int, seed: int = 0, output_type: str = "np", w: int = side, h: int = side):
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, width=w, height=h, num_images_per_prompt=n,
                    num_inference_steps=steps, generator=torch.Generator(dev).manual_seed(seed),
                    output_type=output_type).images

    def figures(prefix: str, runs_6: int, between=None):
        # Both 1-image figures before anything else calls the UNet: the equality check's direct calls and the
        # 6-image batch are other input shapes and strides, which make dynamo recompile (then with dynamic
        # sizes), and the per-step time is read from the 25- minus the 15-step figure of one graph.
        rep.stage(f"{prefix}_1img_{args.steps}steps", lambda: timed(lambda: call(1, args.steps), dev, args.runs,
                                                                     images=1, steps=args.steps))
        rep.stage(f"{prefix}_1img_{args.fast_steps}steps",
                  lambda: timed(lambda: call(1, args.fast_steps), dev, args.runs, images=1, steps=args.fast_steps),
                  optional_cost_s=20)
        if between:
            between()
        if runs_6 and not args.skip_6img:
            # ours: the production default first (one-image chunks of the 1-image graph, no compile), then
            # with the shape listed as SDXL_WARMUP_EXTRA would (a batch-12 graph of its own, compiled here)
            rep.stage(f"{prefix}_6img_{args.steps}steps", lambda: timed(lambda: call(6, args.steps), dev, runs_6,
                                                                         images=6, steps=args.steps),
                      optional_cost_s={"baseline": None, "accel": 60}.get(prefix, 200))
            if prefix == "accel" and dev == "cuda" and not args.fp8_linear:
                def whole():
                    with whole_batches(pipe.unet):  # timed's warm-up run compiles the batch-12 graph
                        return timed(lambda: call(6, args.steps), dev, runs_6, images=6, steps=args.steps)
                rep.stage(f"accel_6img_{args.steps}steps_whole", whole, optional_cost_s=240)

    def reference():
        cap = UnetCapture(pipe.unet)
        st["ref_latents"] = call(1, args.steps, output_type="latent")
        st["unet_cap"] = cap
        st["ref_image"] = decode_fp32(st["ref_latents"])
        return {"latent_std": float(st["ref_latents"].float().std()), "image_std": float(st["ref_image"].std())}

    def decode_fp32(latents):
        """The baseline's own decode: the VAE upcast to fp32, as the pipeline does for force_upcast."""
        vae = pipe.vae
        old = vae.dtype
        vae.to(torch.float32)
        with torch.no_grad():
            img = vae.decode(latents.float() / vae.config.scaling_factor).sample
        vae.to(old)
        return (img / 2 + 0.5).clamp(0, 1).float()

    def shapes(path: str):
        rows = []
        for w, h in [(side, side), wide, wide[::-1]]:
            for n in (1, 3, 6):
                reset_memory(dev)
                resident = memory(dev).get("allocated_gib")
                call(n, 2, w=w, h=h)
                sync(dev)
                rows.append({"family": "sdxl", "path": path, "width": w, "height": h, "images": n,
                             "resident_gib": resident, **memory(dev)})
        return rows

    figures("baseline", runs_6=2)
    rep.stage("baseline_reference", reference)
    if not args.skip_memory:
        rep.stage("memory_baseline", lambda: shapes("baseline"), optional_cost_s=60)

    opts = accel.AccelOptions(enabled=True, compile=False, compile_mode=args.compile_mode, cache_dir=args.cache_dir)
    rep.stage("accel_eager_levers", lambda: accel.accelerate_sdxl(pipe, opts))
    if not args.skip_memory:
        rep.stage("memory_accel_eager", lambda: shapes("accel_eager"), optional_cost_s=60)
    rep.stage("eager_levers_1img", lambda: timed(lambda: call(1, args.steps), dev, 2, images=1), optional_cost_s=30)
    if dev == "cuda":
        rep.stage("accel_compile", lambda: accel.compile_sdxl(pipe, opts))

    def check(path: str = "accel"):
        cap = st["unet_cap"]
        with torch.no_grad():
            unet_out = pipe.unet(*cap.args, **cap.kwargs)
        # cloned: under CUDA graphs (reduce-overhead) the next UNet call reuses the output's memory
        unet_out = _clone(unet_out[0] if isinstance(unet_out, tuple) else unet_out.sample)
        st[f"{path}_latents"] = lat = call(1, args.steps, output_type="latent")
        with torch.no_grad():
            ours_img = (pipe.vae.decode(st["ref_latents"] / pipe.vae.config.scaling_factor).sample / 2 + 0.5)
            e2e_img = (pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample / 2 + 0.5)
        figures = {"unet_same_input": compare(cap.out, unet_out),
                   "vae_decode_same_latents": compare(st["ref_image"], ours_img.clamp(0, 1)),
                   "end_to_end_latents": compare(st["ref_latents"], lat),
                   "end_to_end_image": compare(st["ref_image"], e2e_img.clamp(0, 1))}
        if path == "accel":
            return {**figures, "tolerance": {"unet_same_input.rel_l2": 1e-2, "vae_decode_same_latents.psnr_db": 40,
                                             "end_to_end_image.psnr_db": 30}}
        # an opt-in approximation: its difference measured, from the baseline and from the exact path
        return {**figures, "end_to_end_latents_vs_accel": compare(st["accel_latents"], lat)}

    figures("accel", runs_6=3, between=lambda: rep.stage("equality", check))
    # no FP8 figures after a failed rewrite: a half-rewritten UNet is not the FP8 one
    if args.fp8_linear and rep.stage("fp8_levers", lambda: use_fp8_linear(pipe, accel, opts, compile=dev == "cuda")):
        figures("fp8", runs_6=3, between=lambda: rep.stage("fp8_equality", lambda: check("fp8")))

    s = rep.data["stages"]
    rep["summary"] = {
        f"speedup_1img_{args.steps}steps_min": ratio(s.get(f"baseline_1img_{args.steps}steps"),
                                                     s.get(f"accel_1img_{args.steps}steps")),
        f"speedup_1img_{args.steps}steps_median": ratio(s.get(f"baseline_1img_{args.steps}steps"),
                                                        s.get(f"accel_1img_{args.steps}steps"), "median_s"),
        f"throughput_6img_{args.steps}steps_min": ratio(s.get(f"baseline_6img_{args.steps}steps"),
                                                        s.get(f"accel_6img_{args.steps}steps")),
        f"throughput_6img_{args.steps}steps_whole_batch_min": ratio(s.get(f"baseline_6img_{args.steps}steps"),
                                                                    s.get(f"accel_6img_{args.steps}steps_whole")),
        f"speedup_1img_{args.fast_steps}steps_min": ratio(s.get(f"baseline_1img_{args.fast_steps}steps"),
                                                          s.get(f"accel_1img_{args.fast_steps}steps")),
        "accel_step_ms": _step_ms(s, "accel", args),  # one guided step
    }
    if args.fp8_linear:
        rep["summary"] = {**rep.data["summary"], "fp8": {
            **{f"{figure}_vs_baseline": ratio(s.get(f"baseline_{figure}"), s.get(f"fp8_{figure}"))
               for figure in (f"1img_{args.steps}steps", f"6img_{args.steps}steps", f"1img_{args.fast_steps}steps")},
            f"1img_{args.steps}steps_vs_accel": ratio(s.get(f"accel_1img_{args.steps}steps"),
                                                      s.get(f"fp8_1img_{args.steps}steps")),
            "step_ms": _step_ms(s, "fp8", args)}}
    print("SUMMARY", rep.data["env"].get("card"), rep.data["summary"], flush=True)


# Per transformer block: self-attention q|k|v (fused) and output, cross-attention query and output, the
# feed-forward's two layers; each transformer's input and output projections. The cross-attention's keys and
# values (77 text tokens), the embeddings and every convolution stay fp16.
TOKEN_LINEARS = ("attn1.to_qkv", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
                 "proj_in", "proj_out")


def use_fp8_linear(pipe, accel, opts, compile: bool) -> dict:
    """The accelerated pipeline with the UNet's TOKEN_LINEARS as pipelines/fp8_linear.Fp8Linear (e4m3 weights
    with per-feature scales, activations scaled per token by pipelines/fp8_rows.py, fast accumulation: WAN's
    GENQ_WAN_LINEAR=fp8 recipe), then, if `compile`, the UNet and the VAE decoder compiled anew from their
    class forwards."""
    from pipelines import fp8_linear

    for module in (pipe.unet, pipe.vae.decoder):
        vars(module).pop("forward", None)  # the compiled (and chunking) forwards from compile_sdxl
    torch._dynamo.reset()
    device = str(pipe.unet.device)
    reset_memory(device)
    before = memory(device).get("allocated_gib")
    names = fp8_linear.linear_names(pipe.unet, TOKEN_LINEARS, within=("down_blocks.", "mid_block.", "up_blocks."))
    levers = {"fp8_linears": fp8_linear.replace_linears(pipe.unet, names, chunk=None, fast_accum=True)}
    reset_memory(device)
    levers.update(resident_gib_before=before, resident_gib_after=memory(device).get("allocated_gib"))
    if compile:  # no dynamo cache: its entries keep no guard on which layer classes they traced
        levers["compile"] = accel.compile_sdxl(pipe, opts.model_copy(update={"dynamo_cache": False}))
    return levers


def _step_ms(stages: dict, prefix: str, args) -> float | None:
    long, short = stages.get(f"{prefix}_1img_{args.steps}steps"), stages.get(f"{prefix}_1img_{args.fast_steps}steps")
    if not long or not short or args.steps == args.fast_steps:
        return None
    return round(1000 * (long["min_s"] - short["min_s"]) / (args.steps - args.fast_steps), 2)


if __name__ == "__main__":
    main()
