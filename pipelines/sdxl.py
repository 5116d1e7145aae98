"""SDXL text-to-image and image-to-image on ONE resident set of weights (diffusers' own pipelines).

What an operator provides (offline: nothing is fetched from a hub):

* ``SDXL_MODEL_PATH=/models/sdxl``: a diffusers folder (model_index.json, unet/, vae/, text_encoder/,
  text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/) with .safetensors weights; a folder holding only
  the ``*.fp16.safetensors`` variant files is loaded as that variant. Or
* ``SDXL_MODEL_PATH=/models/sdxl.safetensors``: one checkpoint in the original SDXL layout (what
  A1111/ComfyUI users have), PLUS ``SDXL_CONFIG_PATH=/models/sdxl-config``: a diffusers-layout folder
  without weights, i.e. model_index.json, unet/config.json, vae/config.json, text_encoder/config.json,
  text_encoder_2/config.json, scheduler/scheduler_config.json and the tokenizer/ and tokenizer_2/ files.
  diffusers 0.42's ``from_single_file`` converts the weights itself but takes every architecture and
  tokenizer from that folder (without it, it would download them). Fetch it once where there is internet:
  ``hf download stabilityai/stable-diffusion-xl-base-1.0 --include "*.json" "*.txt"
  --local-dir /models/sdxl-config`` (a few MB; it fits any SDXL-base fine-tune). Pickled ``.ckpt`` files
  are refused: convert them.
* ``SDXL_MODEL_PATH=tiny``: random weights built once under GENQ_TINY_CACHE (tests, demo).

Behaviour worth knowing:

* Image i is made with its own ``torch.Generator`` seeded with ``request.seeds[i]``, on the CPU so that a
  seed's starting noise does not depend on the GPU (the image still depends on device and precision); all
  images run in one batched call, and image i equals a one-image run of its seed.
* ``scheduler``: "default" keeps the checkpoint's scheduler; the others are built from its config. Every
  request gets fresh scheduler and pipeline objects around the shared weights, so nothing leaks between
  requests.
* An empty negative prompt means none: SDXL then uses zero embeddings, as it was trained to.
* The reference is turned upright (EXIF orientation), transparency goes on white, and it is resized to
  exactly width x height (aspect not kept: the caller chose the size).
* ``exact_copy``: an image-to-image run from the reference at ``request.strength`` (callers pick a light
  one), with a prompt that may be empty: the reference's content and layout stay, lightly re-rendered.
* VAE in fp16: the original SDXL VAE can overflow in half precision (NaN, black images). Images are
  decoded one at a time in the model's dtype; an image that comes out non-finite is decoded again in fp32,
  and from then on every decode goes straight to fp32. An fp16-safe VAE (e.g. "sdxl-vae-fp16-fix") in the
  model folder never needs that. A result that is still non-finite is an error, never a black image.
* ``setup()`` warms up at the largest shape requests may have (GENQ_LIMIT_SDXL_MAX_PIXELS as a square, six
  images; override with SDXL_WARMUP_WIDTH/HEIGHT/IMAGES), then at any SDXL_WARMUP_EXTRA shapes (so that
  GENQ_COMPILE compiles them at start, not in a job), and refuses to start if that fails (e.g. OOM). Under
  GENQ_COMPILE the UNet runs other image counts of a warmed size as chunks of one guided image
  (pipelines/unet_batches.py), so only a new size compiles after start.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Callable

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image, ImageOps
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.common import Reference
from schemas.errors import PayloadError
from schemas.limits import LIMITS
from schemas.sdxl import SdxlRequest
from schemas.settings import Settings

from . import dynamo_cache
from .accel import AccelOptions, accelerate_sdxl
from .loading import TINY, pick_device, pick_dtype, resolve_model_path, warm_up_or_refuse
from .tiny_sdxl import build_tiny_sdxl
from .unet_batches import whole_batches

log = logging.getLogger(__name__)

OnStep = Callable[[int, int], None]

SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
}


class SdxlSettings(BaseSettings):
    """SDXL-only settings, read from the environment beside schemas.settings.Settings."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    config_path: Path | None = Field(None, validation_alias="SDXL_CONFIG_PATH")
    warmup_width: int | None = Field(None, ge=64, multiple_of=8, validation_alias="SDXL_WARMUP_WIDTH")
    warmup_height: int | None = Field(None, ge=64, multiple_of=8, validation_alias="SDXL_WARMUP_HEIGHT")
    warmup_images: int | None = Field(None, ge=1, le=6, validation_alias="SDXL_WARMUP_IMAGES")
    # Shapes warmed up after the main one, "WIDTHxHEIGHTxIMAGES,...": under GENQ_COMPILE each new size
    # compiles the UNet again (minutes), at start instead of inside a job; every image count of a warmed
    # size runs on its one-image graph in chunks, unless listed here (then its batch gets a graph of its own).
    warmup_extra: Annotated[tuple[tuple[int, int, int], ...], NoDecode] = Field(
        (), validation_alias="SDXL_WARMUP_EXTRA")

    @field_validator("warmup_extra", mode="before")
    @classmethod
    def _parse_shapes(cls, value):
        if not isinstance(value, str):
            return value
        shapes = []
        for part in filter(None, value.replace(" ", "").lower().split(",")):
            numbers = part.split("x")
            if len(numbers) != 3 or not all(n.isdigit() for n in numbers):
                raise ValueError(f"{value!r}: use WIDTHxHEIGHTxIMAGES shapes separated by commas, e.g. 1024x1024x1")
            width, height, images = map(int, numbers)
            if min(width, height) < 64 or width % 8 or height % 8 or max(width, height) > LIMITS.sdxl_max_side \
                    or width * height > LIMITS.sdxl_max_pixels or images not in (1, 3, 6):
                raise ValueError(f"{width}x{height}x{images}: sides multiples of 8 from 64 to "
                                 f"{LIMITS.sdxl_max_side}, at most {LIMITS.sdxl_max_pixels} pixels, 1, 3 or 6 images")
            shapes.append((width, height, images))
        return tuple(shapes)


class SdxlPipeline:
    family = "sdxl"

    def __init__(self, settings: Settings, sdxl_settings: SdxlSettings | None = None,
                 dtype: torch.dtype | None = None):
        self.settings = settings
        self.sdxl_settings = sdxl_settings or SdxlSettings()
        self._dtype_override = dtype
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.txt2img: StableDiffusionXLPipeline | None = None
        self.img2img: StableDiffusionXLImg2ImgPipeline | None = None
        self.vae_fp32 = False  # set once the VAE has overflowed in half precision
        self._fitted_warmup: tuple[int, int, int] | None = None  # set by fit_warmup()

    # --- loading ------------------------------------------------------------------------------

    def setup(self) -> None:
        self.device = pick_device(self.settings)
        self.dtype = self._dtype_override or pick_dtype(self.device)
        path = resolve_model_path(self.settings.sdxl_model_path, self.family, self.settings, build_tiny_sdxl)
        started = time.perf_counter()
        txt2img = self._load(path).to(self.device)
        log.info("SDXL weights on %s in %.1fs", self.device, time.perf_counter() - started)  # cold-start figure
        txt2img.set_progress_bar_config(disable=True)
        self.txt2img = txt2img
        self.img2img = StableDiffusionXLImg2ImgPipeline(**txt2img.components, add_watermarker=False,
                                                        **_pipeline_options(txt2img))
        # GPU speed-ups behind GENQ_ACCEL / GENQ_COMPILE (docs/PERFORMANCE.md); a no-op when unset
        applied = accelerate_sdxl(self.txt2img, AccelOptions.from_env())
        log.info("sdxl accel: %s", applied or "off")
        self._warm_up()

    def _load(self, path: Path) -> StableDiffusionXLPipeline:
        common = dict(dtype=self.dtype, local_files_only=True, add_watermarker=False)
        if path.is_dir():
            return StableDiffusionXLPipeline.from_pretrained(path, use_safetensors=True, variant=_variant(path),
                                                             **common)
        if path.suffix != ".safetensors":
            raise RuntimeError(f"SDXL_MODEL_PATH={path}: expected a diffusers folder or a .safetensors checkpoint "
                               "(pickled .ckpt files are refused: convert them to .safetensors)")
        config = self.sdxl_settings.config_path
        if config is None or not (Path(config) / "model_index.json").is_file():
            raise RuntimeError(f"SDXL_MODEL_PATH={path} is a single checkpoint: set SDXL_CONFIG_PATH to a "
                               "diffusers-layout config folder (model_index.json, component configs, tokenizers; "
                               f"got {config})")
        return StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), **common)

    def _warm_up(self) -> None:
        width, height, images = self._warmup_shape()
        main = self._warmup_request(width, height, images)
        reference = Image.new("RGB", (width, height), "gray")

        def txt2img_and_img2img() -> None:
            self.run(main)
            self.run(main.model_copy(update={"reference": Reference(source="warmup"), "strength": 0.5}), reference)

        self._warm(txt2img_and_img2img, f"at {width}x{height}, {images} image(s) failed, refusing to start "
                                        "(lower GENQ_LIMIT_SDXL_MAX_PIXELS or SDXL_WARMUP_*)")
        # the main shape again only with several images: listed, its batch runs whole instead of in chunks
        extra = [shape for shape in self.sdxl_settings.warmup_extra if shape != (width, height, images) or images > 1]
        for shape in extra:  # txt2img is enough: img2img runs the same UNet and VAE decoder
            # A listed shape's UNet batch gets a compiled graph of its own (pipelines/unet_batches.py)
            with whole_batches(self.txt2img.unet):
                self._warm(lambda: self.run(self._warmup_request(*shape)),
                           "at SDXL_WARMUP_EXTRA shape %dx%dx%d failed, refusing to start" % shape)
        log.info("SDXL ready on %s (%s), warmed up at %s", self.device, self.dtype,
                 ", ".join("%dx%d x%d" % shape for shape in [(width, height, images), *extra]))

    def _warm(self, runs: Callable[[], object], failure: str) -> None:
        with warm_up_or_refuse(self.device, self._release_pipelines, f"SDXL warm-up {failure}"):
            runs()

    def _release_pipelines(self) -> None:
        self.txt2img = self.img2img = None

    @staticmethod
    def _warmup_request(width: int, height: int, images: int) -> SdxlRequest:
        return SdxlRequest(job_id="warmup", user_id="warmup", job_type="sdxl_image_fast", prompt="warm-up",
                           width=width, height=height, steps=2, guidance_scale=5.0, num_images=images,
                           seeds=list(range(images)))

    def warmup_shape(self) -> SimpleNamespace:
        """The largest warm-up job's shape, for memory admission before setup() (consumers/gpu.py)."""
        shapes = [self._warmup_shape(), *self.sdxl_settings.warmup_extra]
        return self._shape(*max(shapes, key=lambda shape: shape[0] * shape[1] * shape[2]))

    def _shape(self, width: int, height: int, images: int) -> SimpleNamespace:
        return SimpleNamespace(family=self.family, width=width, height=height, num_images=images)

    def fit_warmup(self, fits: Callable[[SimpleNamespace], bool]) -> None:
        """Where the largest job allowed could never run on this card (a 48 GB card shared with WAN
        and Qwen), warm up at the largest that can: such jobs are refused there anyway.
        SDXL_WARMUP_* set by the operator always wins."""
        s = self.sdxl_settings
        if self.settings.sdxl_model_path == TINY or s.warmup_width or s.warmup_height or s.warmup_images:
            return
        side = self._largest_side()
        for candidate in ((side, side, 6), (1024, 1024, 6), (1024, 1024, 3), (1024, 1024, 1)):
            if fits(self._shape(*candidate)):
                self._fitted_warmup = candidate
                return
        self._fitted_warmup = (1024, 1024, 1)  # admission then says why even this cannot start

    def _warmup_shape(self) -> tuple[int, int, int]:
        s = self.sdxl_settings
        if self.settings.sdxl_model_path == TINY:
            side, images = 64, 1
        elif self._fitted_warmup is not None:
            return self._fitted_warmup
        else:
            side, images = self._largest_side(), 6
        images = s.warmup_images or images
        return s.warmup_width or side, s.warmup_height or side, max(n for n in (1, 3, 6) if n <= images)

    @staticmethod
    def _largest_side() -> int:
        return min(math.isqrt(LIMITS.sdxl_max_pixels), LIMITS.sdxl_max_side) // 8 * 8

    # --- requests -----------------------------------------------------------------------------

    def move_to(self, device) -> None:
        """Idle weights to CPU and back (memory admission makes room for another daemon's job).
        img2img shares txt2img's modules, so moving one moves both."""
        self.txt2img.to(device)

    def check_inputs(self, request: SdxlRequest, reference: Image.Image | None = None) -> None:
        if len(request.seeds) != request.num_images:
            raise PayloadError("seeds", f"need one seed per image ({request.num_images}), got {len(request.seeds)}")
        for field in ("width", "height"):
            if getattr(request, field) % 8:
                raise PayloadError(field, f"must be a multiple of 8 (got {getattr(request, field)})")
        if request.mode == "txt2img":
            if reference is not None:
                raise PayloadError("reference", "a reference image was given but the request has no reference")
            return
        if reference is None:
            raise PayloadError("reference", "image-to-image needs the reference image, none was given")
        if not isinstance(reference, Image.Image):
            raise PayloadError("reference", f"expected a PIL image, got {type(reference).__name__}")
        # diffusers runs int(steps * strength) denoising steps; zero would return the noised reference.
        if int(request.steps * request.strength) < 1:
            raise PayloadError("strength", f"strength {request.strength} x steps {request.steps} leaves no "
                               "denoising step: raise strength or steps so that steps*strength >= 1")

    def run(self, request: SdxlRequest, reference: Image.Image | None = None,
            on_step: OnStep | None = None) -> list[Image.Image]:
        self.check_inputs(request, reference)
        if self.txt2img is None:
            raise RuntimeError("SdxlPipeline.run() before setup()")
        args = dict(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.num_images,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in request.seeds],
            output_type="latent",
            callback_on_step_end=_step_callback(on_step),
        )
        if request.mode == "img2img":
            pipe = self._fresh(self.img2img, request.scheduler)
            image = _to_rgb(reference).resize((request.width, request.height), Image.Resampling.LANCZOS)
            args.update(image=image, strength=request.strength)
        else:
            pipe = self._fresh(self.txt2img, request.scheduler)
            args.update(width=request.width, height=request.height)
        with torch.inference_mode():
            latents = pipe(**args).images
            if not torch.isfinite(latents).all():
                raise RuntimeError("SDXL denoising produced non-finite latents (fp16 overflow in the UNet?)")
            images = [self._decode(one) for one in latents.split(1)]
        # A graph compiled by this call (a warm-up, or a job's new size) is stored so later starts load it
        # instead of tracing; a no-op without GENQ_COMPILE_CACHE_DIR or when nothing was compiled.
        dynamo_cache.save_new()
        return images

    def _fresh(self, base, scheduler: str):
        """A throw-away pipeline object of base's class around the shared weights, with its own scheduler.

        The weights always come from self.txt2img: a wrapper installed there (compiled UNet, other VAE)
        serves both modes.
        """
        proto = self.txt2img.scheduler
        cls = type(proto) if scheduler == "default" else SCHEDULERS[scheduler]
        components = {**self.txt2img.components, "scheduler": cls.from_config(proto.config)}
        pipe = type(base)(**components, add_watermarker=False, **_pipeline_options(base))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # --- decoding -----------------------------------------------------------------------------

    def _decode(self, latents: torch.Tensor) -> Image.Image:
        vae = self.txt2img.vae
        cfg = vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        pixels = None
        if not self.vae_fp32:
            pixels = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
            if not torch.isfinite(pixels).all() and vae.dtype != torch.float32:
                log.warning("SDXL VAE overflowed in %s: decoding in fp32 from now on", vae.dtype)
                self.vae_fp32, pixels = True, None
        if pixels is None:
            pixels = self._decode_fp32(latents)
        if not torch.isfinite(pixels).all():
            raise RuntimeError("SDXL VAE produced a non-finite image")
        return self.txt2img.image_processor.postprocess(pixels.float(), output_type="pil")[0]

    def _decode_fp32(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.txt2img.vae
        dtype = vae.dtype
        vae.to(torch.float32)
        try:
            return vae.decode(latents.float(), return_dict=False)[0]
        finally:
            vae.to(dtype)


def _pipeline_options(pipe) -> dict:
    return {k: pipe.config[k] for k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
            if k in pipe.config}


def _to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: honour the EXIF orientation (phone photos) and put transparency on white, not black."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    return image.convert("RGB")


def _variant(folder: Path) -> str | None:
    names = [p.name for p in (folder / "unet").glob("*.safetensors")]
    return "fp16" if names and all(".fp16." in name for name in names) else None


def _step_callback(on_step: OnStep | None):
    def callback(pipe, index: int, timestep, tensors: dict) -> dict:
        if on_step is not None:
            on_step(index + 1, pipe.num_timesteps)
        return {}

    return callback
