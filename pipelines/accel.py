"""GPU speed-ups the production pipelines opt into from their setup().

Every helper keeps results equal to the plain diffusers / transformers path within the tolerances
measured by bench/ (docs/PERFORMANCE.md), except the opt-in WAN step cache, an approximation whose
difference is measured separately.  On a CPU the helpers apply only the eager, numerically
equivalent changes and never compile, so tests exercise the same code paths as the GPU daemon.

Switches (environment, read by AccelOptions.from_env):
  GENQ_ACCEL=1               fused QKV, channels-last, bf16 VAE decode, attention backend, FastDecoder
  GENQ_COMPILE=1             torch.compile on top (CUDA only)
  GENQ_COMPILE_MODE          torch.compile mode (default: inductor's default mode)
  GENQ_COMPILE_CACHE_DIR     on-disk inductor/triton cache so a restart skips code generation
  GENQ_WAN_ATTENTION         diffusers attention backend for WAN (default _native_cudnn; "" = library default)
  GENQ_WAN_VAE_BF16=1        decode WAN video in bf16 instead of fp32 (opt-in: see docs/PERFORMANCE.md)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class AccelOptions:
    enabled: bool = False
    compile: bool = False
    compile_mode: str | None = None
    cache_dir: str | None = None
    wan_attention_backend: str = "_native_cudnn"
    wan_vae_bf16: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "AccelOptions":
        env = os.environ if environ is None else environ
        enabled = env.get("GENQ_ACCEL", "0").strip().lower() in _TRUE
        return cls(
            enabled=enabled,
            compile=enabled and env.get("GENQ_COMPILE", "0").strip().lower() in _TRUE,
            compile_mode=env.get("GENQ_COMPILE_MODE") or None,
            cache_dir=env.get("GENQ_COMPILE_CACHE_DIR") or None,
            wan_attention_backend=env.get("GENQ_WAN_ATTENTION", "_native_cudnn"),
            wan_vae_bf16=env.get("GENQ_WAN_VAE_BF16", "0").strip().lower() in _TRUE,
        )


def _on_cuda(module: torch.nn.Module) -> bool:
    return next(module.parameters()).device.type == "cuda"


def configure_compile_cache(cache_dir: str | None) -> None:
    """Point inductor's and triton's caches at a persistent folder (must run before the first compile)."""
    if not cache_dir:
        return
    os.makedirs(cache_dir, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir)
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache_dir, "triton"))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True


def _cast_inputs_to_weight_dtype(module: torch.nn.Module) -> None:
    """Let a bf16 module take the fp16 tensors the pipeline hands it."""
    dtype = next(module.parameters()).dtype

    def hook(_mod, args, kwargs):
        first = args[0].to(dtype) if args else args
        return ((first,) + tuple(args[1:]) if args else args), kwargs

    module.register_forward_pre_hook(hook, with_kwargs=True)


def bf16_vae(vae) -> None:
    """fp16-safe VAE: bf16 has fp32's range, so the SDXL VAE needs no fp32 upcast (2x fewer bytes, tensor cores)."""
    vae.to(torch.bfloat16)
    vae.register_to_config(force_upcast=False)
    _cast_inputs_to_weight_dtype(vae.encoder)
    _cast_inputs_to_weight_dtype(vae.post_quant_conv if vae.post_quant_conv is not None else vae.decoder)


def _inductor_flags() -> None:
    import torch._inductor.config as inductor_config

    # 1x1 convolutions as matmuls and no epilogue fusion: the diffusers team's measured SDXL settings.
    inductor_config.conv_1x1_as_mm = True
    inductor_config.epilogue_fusion = False


def accelerate_sdxl(pipe, opts: AccelOptions) -> list[str]:
    """Speed up an SDXL diffusers pipeline in place; components shared with img2img pipelines follow.

    Returns the levers applied (for the start-up log).
    """
    if not opts.enabled:
        return []
    applied = []
    pipe.fuse_qkv_projections()
    applied.append("fused_qkv")
    bf16_vae(pipe.vae)
    applied.append("bf16_vae")
    if not _on_cuda(pipe.unet):
        return applied
    torch.backends.cudnn.benchmark = True
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    applied.append("channels_last")
    if opts.compile:
        applied.append(compile_sdxl(pipe, opts))
    return applied


def compile_sdxl(pipe, opts: AccelOptions) -> str:
    configure_compile_cache(opts.cache_dir)
    _inductor_flags()
    # In-place Module.compile keeps the same module objects, so an img2img pipeline built from
    # txt2img.components uses the compiled UNet and decoder too.
    pipe.unet.compile(fullgraph=True, mode=opts.compile_mode)
    pipe.vae.decoder.compile(fullgraph=True, mode=opts.compile_mode)
    return f"compile:{opts.compile_mode or 'default'}"


def warmup_sdxl(pipe, sizes: Sequence[tuple[int, int, int]], steps: int = 2) -> None:
    """Run each (width, height, images) once so compilation happens at start, not in a user's job."""
    for width, height, n in sizes:
        pipe(prompt="warm-up", width=width, height=height, num_images_per_prompt=n,
             num_inference_steps=steps, output_type="pil")


def accelerate_wan(pipe, opts: AccelOptions) -> list[str]:
    """Speed up a WAN 2.1 diffusers pipeline in place (per-step results equal within bf16 rounding)."""
    if not opts.enabled:
        return []
    applied = []
    if opts.wan_vae_bf16:  # 1.6x faster decode, PSNR 49 dB on random weights; real-weight banding unverified
        pipe.vae.to(torch.bfloat16)
        applied.append("bf16_vae")
    if not _on_cuda(pipe.transformer):
        return applied
    torch.backends.cudnn.benchmark = True
    if opts.wan_attention_backend:
        pipe.transformer.set_attention_backend(opts.wan_attention_backend)
        applied.append(f"attention:{opts.wan_attention_backend}")
    if opts.compile:
        configure_compile_cache(opts.cache_dir)
        # Regional compilation: one compiled block serves all 30 (seconds of compile, not minutes);
        # no fullgraph, so the opt-in step cache's data-dependent hooks can graph-break around it.
        pipe.transformer.compile_repeated_blocks(mode=opts.compile_mode)
        applied.append(f"compile_blocks:{opts.compile_mode or 'default'}")
    return applied


def set_wan_step_cache(pipe, threshold: float | None) -> None:
    """Opt-in, per job: first-block cache (skip the other blocks while the first block's residual barely moves).

    threshold None or 0 turns it off.  An approximation: bench/ reports its difference.
    """
    from diffusers.hooks import FirstBlockCacheConfig

    transformer = pipe.transformer
    if getattr(transformer, "_genq_step_cache", None) == threshold:
        return
    if getattr(transformer, "_genq_step_cache", None):
        transformer.disable_cache()
    if threshold:
        transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    transformer._genq_step_cache = threshold or None


Sampler = Callable[[torch.Tensor], torch.Tensor]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def top_p_sampler(temperature: float, top_p: float, generator: torch.Generator | None = None) -> Sampler:
    """Temperature + nucleus sampling on [batch, vocab] logits; temperature 0 is greedy."""
    if temperature <= 0:
        return greedy

    def sample(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return sample


class FastDecoder:
    """Batched decoding of a transformers causal LM with a static KV cache and a compiled decode step.

    transformers' generate() spends milliseconds of Python per token; here a token costs one call of
    a CUDA-graphed forward plus the sampler, and the host syncs only every `sync_every` tokens.
    Prompts are left-padded; each row stops at its own limit or end-of-text id.
    """

    def __init__(self, model, max_len: int, compile: bool = True, compile_mode: str = "reduce-overhead",
                 sync_every: int = 16):
        self.model = model
        self.max_len = max_len
        self.sync_every = sync_every
        self._caches: dict[int, object] = {}
        self._step = self._forward_last
        if compile and _on_cuda(model):
            self._step = torch.compile(self._forward_last, mode=compile_mode, fullgraph=True, dynamic=False)

    def _cache(self, batch: int):
        from transformers import StaticCache

        if batch not in self._caches:
            self._caches[batch] = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        cache = self._caches[batch]
        cache.reset()
        return cache

    def _forward_last(self, ids, position_ids, cache_position, mask, cache):
        out = self.model(input_ids=ids, position_ids=position_ids, cache_position=cache_position,
                         attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: Sequence[int] | int,
                 sampler: Sampler = greedy, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                 on_first_token: Callable[[], None] | None = None) -> list[list[int]]:
        batch, prompt_len = input_ids.shape
        dev = input_ids.device
        limits = torch.as_tensor([max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens),
                                 device=dev)
        longest = int(limits.max())
        if prompt_len + longest > self.max_len:
            raise ValueError(f"prompt {prompt_len} + {longest} new tokens exceeds the cache ({self.max_len})")
        cache = self._cache(batch)
        mask = torch.zeros(batch, self.max_len, dtype=torch.long, device=dev)
        mask[:, :prompt_len] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self._forward_last(input_ids, positions, torch.arange(prompt_len, device=dev),
                                    mask[:, :prompt_len], cache)
        token = sampler(logits)
        if on_first_token is not None:
            on_first_token()
        eos = torch.as_tensor(list(eos_token_ids) or [-1], device=dev)
        out = torch.full((batch, longest), pad_token_id, dtype=torch.long, device=dev)
        done = torch.zeros(batch, dtype=torch.bool, device=dev)
        next_pos = positions[:, -1:] + 1
        # Positions live on the GPU and advance in place: a host-to-device copy per token would make
        # the host wait for the GPU every step instead of queueing the next step ahead.
        cache_pos = torch.tensor([prompt_len], device=dev)
        for i in range(longest):
            out[:, i] = torch.where(done, pad_token_id, token)
            done |= torch.isin(token, eos) | (i + 1 >= limits)
            if i + 1 == longest or ((i + 1) % self.sync_every == 0 and bool(done.all())):
                break
            mask[:, prompt_len + i] = 1
            torch.compiler.cudagraph_mark_step_begin()
            logits = self._step(token[:, None], next_pos, cache_pos, mask, cache)
            token = sampler(logits)
            next_pos = next_pos + 1
            cache_pos = cache_pos + 1
        return [self._trim(row, eos_token_ids, pad_token_id, int(n)) for row, n in zip(out.tolist(), limits.tolist())]

    @staticmethod
    def _trim(row: list[int], eos_token_ids: Sequence[int], pad: int, limit: int) -> list[int]:
        row = row[:limit]
        for i, tok in enumerate(row):
            if tok in eos_token_ids:
                return row[: i + 1]
        return row
