"""GPU speed-ups the production pipelines opt into from their setup().

Every helper keeps results equal to the plain diffusers / transformers path within the tolerances
measured by bench/ (docs/PERFORMANCE.md); the opt-in WAN step cache, an approximation, lives in
pipelines/step_cache.py.  On a CPU the helpers apply only the eager, numerically
equivalent changes and never compile, so tests exercise the same code paths as the GPU daemon.

Switches (environment, read by AccelOptions.from_env):
  GENQ_ACCEL=1               fused QKV, channels-last, bf16 VAE decode, attention backend
  GENQ_COMPILE=1             torch.compile on top (CUDA only)
  GENQ_COMPILE_MODE          torch.compile mode: default, reduce-overhead (SDXL's when unset; WAN's is
                             inductor's default), max-autotune or max-autotune-no-cudagraphs
  GENQ_COMPILE_DYNAMIC=1     SDXL: one compiled graph with symbolic sizes for every shape (see below)
  GENQ_COMPILE_CACHE_DIR     on-disk inductor/triton cache so a restart skips code generation
  GENQ_COMPILE_DYNAMO_CACHE  SDXL, with a cache dir: keep dynamo's traced result there too, so a restart
                             skips tracing (pipelines/dynamo_cache.py; on unless set to 0)
  GENQ_WAN_ATTENTION         auto (default): flash4 where it runs (its package installed, a Hopper or Blackwell
                             card), else _native_cudnn; flash4: self- and cross-attention by FlashAttention-4
                             (pipelines/flash4.py, exact), refused at start where it cannot run; fp8:
                             self-attention in int8/e4m3 (pipelines/wan_fp8_attention.py, an approximation,
                             opt-in; Ada/Hopper cards), cross-attention by flash4 where it runs; or a
                             diffusers attention backend ("" = library default)
  GENQ_WAN_LINEAR            bf16 (default) or fp8: WAN's video-token products in e4m3
                             (pipelines/wan_fp8_linear.py, an approximation, opt-in; Ada/Hopper cards)
  GENQ_WAN_FUSE              1 (default) or 0: WAN's query/key norms with RoPE, and each layer norm with its
                             residual add and modulation, as Triton kernels, the feed-forward's GELU in its
                             product's epilogue (pipelines/wan_fusions.py, exact; CUDA)
  GENQ_WAN_VAE_BF16=1        decode WAN video in bf16 instead of fp32 (opt-in: see docs/PERFORMANCE.md)
  GENQ_CUDNN_BENCHMARK=1     cuDNN autotuning of convolutions (opt-in: see below)

Qwen 2.5 decoding (the chat batching engine's decoder) lives in pipelines/decoder.py; its switches are
GENQ_CHAT_* (pipelines/chat_batch.py, docs/CHAT.md "Batching").
"""
from __future__ import annotations

import os
from typing import Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.settings import CompileMode

from . import dynamo_cache
from .unet_batches import chunk_batches


WAN_ATTENTION = ("auto", "flash4", "fp8")  # GENQ_WAN_ATTENTION's own values; the others name diffusers' backends


class AccelOptions(BaseModel):
    """The switches above; `from_env` reads them, and a bad value is refused naming its variable."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    enabled: bool = Field(False, validation_alias="GENQ_ACCEL")
    compile: bool = Field(False, validation_alias="GENQ_COMPILE")
    compile_mode: CompileMode | None = Field(None, validation_alias="GENQ_COMPILE_MODE")
    # One SDXL graph with symbolic batch, width and height would serve every size the contract allows,
    # but its first compile did not finish in 8 minutes on an H200 (docs/PERFORMANCE.md, cold start):
    # off by default, so each size compiles statically (its image counts share the graph in chunks,
    # pipelines/unet_batches.py) and an unlisted size compiles on first use.
    compile_dynamic: bool = Field(False, validation_alias="GENQ_COMPILE_DYNAMIC")
    cache_dir: str | None = Field(None, validation_alias="GENQ_COMPILE_CACHE_DIR")
    dynamo_cache: bool = Field(True, validation_alias="GENQ_COMPILE_DYNAMO_CACHE")
    wan_attention_backend: str = Field("auto", validation_alias="GENQ_WAN_ATTENTION")
    wan_linear: Literal["bf16", "fp8"] = Field("bf16", validation_alias="GENQ_WAN_LINEAR")
    wan_fuse: bool = Field(True, validation_alias="GENQ_WAN_FUSE")
    wan_vae_bf16: bool = Field(False, validation_alias="GENQ_WAN_VAE_BF16")
    # cuDNN autotuning tries algorithms whose workspaces reach tens of GB for each new convolution
    # shape (+35 GiB for a moment in a WAN VAE decode on an H200, beyond any admission budget): only
    # for a daemon that has its card to itself.
    cudnn_benchmark: bool = Field(False, validation_alias="GENQ_CUDNN_BENCHMARK")

    @field_validator("wan_attention_backend")
    @classmethod
    def _known_attention(cls, value: str) -> str:
        """Ours (auto, flash4, fp8), a diffusers backend, or "" (the library's default); refused before any
        model loads, not when the transformer first meets it."""
        from diffusers.models.attention_dispatch import AttentionBackendName

        known = {"", *WAN_ATTENTION, *(b.value for b in AttentionBackendName)}
        if value not in known:
            raise ValueError(f"{value!r} is not {', '.join(WAN_ATTENTION)} or a diffusers attention backend "
                             f"({', '.join(sorted(known - {''} - set(WAN_ATTENTION)))})")
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "AccelOptions":
        env = os.environ if environ is None else environ
        given = {name: value.strip() for name, value in env.items() if name.startswith("GENQ_")}
        # an empty switch is an unset one (GENQ_ACCEL= is off), but for the backend: "" = the library's
        opts = cls.model_validate({name: value for name, value in given.items()
                                   if value or name == "GENQ_WAN_ATTENTION"})
        # compile only on top of the eager levers: GENQ_COMPILE alone changes nothing
        return opts if opts.enabled else opts.model_copy(update={"compile": False})


def _on_cuda(module: torch.nn.Module) -> bool:
    return next(module.parameters()).device.type == "cuda"


def configure_compile_cache(cache_dir: str | None) -> None:
    """Point inductor's and triton's caches at a persistent folder (must run before the first compile)."""
    if not cache_dir:
        return
    os.makedirs(cache_dir, exist_ok=True)
    # Assigned, not defaulted: torch writes its default folder into TORCHINDUCTOR_CACHE_DIR the first time
    # it asks for it (at import of torch._dynamo.package), and startup.sh exports one too.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    os.environ["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
    # FlashAttention-4's kernels (GENQ_WAN_ATTENTION=flash4) too; it reads these when first imported
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", os.path.join(cache_dir, "flash4"))
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
    torch.backends.cudnn.benchmark = opts.cudnn_benchmark
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    applied.append("channels_last")
    if opts.compile:
        applied.append(compile_sdxl(pipe, opts))
    return applied


def compile_sdxl(pipe, opts: AccelOptions) -> str:
    """Compile the UNet and the VAE decoder in place: one static graph per input shape, the UNet's image
    counts served by one graph per size (pipelines/unet_batches.py), unless GENQ_COMPILE_DYNAMIC."""
    configure_compile_cache(opts.cache_dir)
    _inductor_flags()
    # Static graphs: under torch's default (dynamic=None) a second shape compiles with symbolic sizes, and
    # dynamo, trying the newest graph first, then runs the first shape's jobs on it too (measured after
    # warming 1 and 3 images on an H100: 1-image jobs at 1.31x plain diffusers, 1.8-2x on the static graph).
    dynamic = bool(opts.compile_dynamic)
    # CUDA graphs unless the operator says otherwise: default mode launches ~1500 kernels a UNet call from
    # the CPU, and on a slow host that, not the GPU, set the pace (an H100: 1-image jobs 1.32 s against
    # 0.88-0.92 s under CUDA graphs; 6 images in one-image chunks slower than plain diffusers).
    mode = opts.compile_mode or "reduce-overhead"
    raise_recompile_limit(32)  # 3 sizes x 3 image counts in today's contract, and room for more
    if opts.cache_dir and opts.dynamo_cache:
        dynamo_cache.enable()  # saved by SdxlPipeline.run() after each call that compiled (dynamo_cache.save_new)
    options = dict(fullgraph=True, mode=mode, dynamic=dynamic, inference_mode=True)  # as SdxlPipeline.run() calls
    unet = dynamo_cache.cached_compile(dynamo_cache.plain_forward(pipe.unet), **options)
    if dynamic:  # one graph takes every batch: nothing to chunk
        pipe.unet.forward = unet
    else:
        chunk_batches(pipe.unet, unet)
    # Decoded one image at a time (pipelines/sdxl.py): one graph per size. On the module object itself, so
    # an img2img pipeline built from txt2img.components decodes through it too.
    pipe.vae.decoder.forward = dynamo_cache.cached_compile(pipe.vae.decoder.forward, **options)
    return f"compile:{mode}:{'dynamic' if dynamic else 'static'}"


def raise_recompile_limit(n: int) -> None:
    """Let dynamo keep up to n compiled graphs per function (its default is 8): one per shape served."""
    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(torch._dynamo.config, name, n) < n:
            setattr(torch._dynamo.config, name, n)


def cudagraph_thread_state() -> None:
    """Give the calling thread the state CUDA graph trees replay from. torch 2.11 sets it up only in the
    thread that first imports them (a second thread replaying compiled graphs fails an assert in
    cudagraph_trees.get_obj); torch 2.13 does this itself. Each thread gets its own tree manager."""
    from collections import defaultdict
    import threading

    from torch._inductor import cudagraph_trees

    local = cudagraph_trees.local
    if not hasattr(local, "tree_manager_containers") and not torch._C._is_key_in_tls("tree_manager_containers"):
        local.tree_manager_containers = {}
        local.tree_manager_locks = defaultdict(threading.Lock)


def fuse_wan_qkv(transformer) -> int:
    """One q|k|v product per self-attention (diffusers' fuse_projections; VACE's hint blocks too), the three
    separate layers dropped so their weights are not held twice; returns how many attentions were fused."""
    fused = 0
    for block in [*transformer.blocks, *getattr(transformer, "vace_blocks", ())]:
        attn = block.attn1
        if getattr(attn, "fused_projections", False):
            continue
        attn.fuse_projections()
        for name in ("to_q", "to_k", "to_v"):
            delattr(attn, name)
        fused += 1
    return fused


def accelerate_wan(pipe, opts: AccelOptions) -> list[str]:
    """Speed up a WAN 2.1 diffusers pipeline in place (per-step results equal within bf16 rounding, with
    GENQ_WAN_ATTENTION=flash4 too, but with the opt-in GENQ_WAN_ATTENTION=fp8 and GENQ_WAN_LINEAR=fp8,
    whose differences bench/wan.py measures)."""
    if not opts.enabled:
        return []
    applied = []
    if opts.wan_vae_bf16:  # 1.6x faster decode, PSNR 49 dB on random weights; real-weight banding unverified
        pipe.vae.to(torch.bfloat16)
        applied.append("bf16_vae")
    if fuse_wan_qkv(pipe.transformer):
        applied.append("fused_qkv")
    if not _on_cuda(pipe.transformer):
        return applied
    torch.backends.cudnn.benchmark = opts.cudnn_benchmark
    if opts.compile:
        configure_compile_cache(opts.cache_dir)  # before FlashAttention-4's import reads its cache folder
    applied += _wan_attention(pipe.transformer, opts)
    if opts.wan_fuse:
        from . import wan_fusions

        applied.append(f"gelu_epilogue:{wan_fusions.gelu_in_epilogue(pipe.transformer)}")
        applied.append(f"fused_norms:{wan_fusions.fuse_block_norms(pipe.transformer)}")
    if opts.wan_linear == "fp8":
        from . import wan_fp8_linear

        wan_fp8_linear.check_device(pipe.transformer.device)
        applied.append(f"linear:fp8:{wan_fp8_linear.quantise_video_linears(pipe.transformer)}")
    if opts.compile:
        # Regional compilation: one compiled block serves all 30 (seconds of compile, not minutes);
        # no fullgraph, so the opt-in step cache's data-dependent hooks can graph-break around it.
        pipe.transformer.compile_repeated_blocks(mode=opts.compile_mode)
        applied.append(f"compile_blocks:{opts.compile_mode or 'default'}")
    return applied


def _wan_attention(transformer, opts: AccelOptions) -> list[str]:
    """Each block's attention per GENQ_WAN_ATTENTION (`auto` resolved for this card); with GENQ_WAN_FUSE the
    self-attention's queries and keys come from pipelines/wan_fusions.py's kernel, whichever backend attends."""
    from . import flash4, wan_self_attention

    backend, fuse = opts.wan_attention_backend, opts.wan_fuse
    if backend == "auto":
        backend = "flash4" if flash4.usable(transformer.device) else wan_self_attention.EXACT_BACKEND
    elif backend == "flash4":
        flash4.check_device(transformer.device)
    applied = [f"attention:{backend}"] if backend else []
    if backend == "flash4":
        wan_self_attention.use_self_attention(transformer, wan_self_attention.Flash4WanAttnProcessor, fuse_qk=fuse)
    elif backend == "fp8":
        from . import wan_fp8_attention

        wan_fp8_attention.check_device(transformer.device)
        if flash4.usable(transformer.device):  # the text cross-attention, exact, as `auto` would run it
            wan_self_attention.use_self_attention(transformer, wan_self_attention.Flash4WanAttnProcessor, fuse_qk=fuse)
            applied.append("cross_attention:flash4")
        wan_fp8_attention.use_fp8_attention(transformer, fuse_qk=fuse)
    elif fuse:
        wan_self_attention.use_self_attention(transformer, wan_self_attention.SelfAttnProcessor, backend, fuse_qk=True)
    elif backend:
        transformer.set_attention_backend(backend)
    return applied + (["qk_norm_rope"] if fuse else [])
