"""WAN 2.1 video (and single-frame image) generation: text-to-video plus the VACE reference modes.

Weights are loaded once in `setup()`. `WAN_MODEL_PATH` is a text-to-video diffusers folder
(`Wan2.1-T2V-1.3B-Diffusers`), `WAN_VACE_MODEL_PATH` a VACE one (`Wan2.1-VACE-1.3B-diffusers`); either
may be "tiny". The text encoder, tokenizer and VAE are loaded once and shared by both pipelines; only
the transformers differ. Mode `none` runs on the T2V transformer when there is one, else on VACE
with an empty conditioning video; `single`, `start`, `end`, `both` need VACE (at 1.3B the I2V and
first-last-frame checkpoints do not exist). `setup()` ends with a warm-up: a 2-step run, decode
included, of the largest video the contract sends (832x480, 81 frames) through `run()` on each loaded
transformer that serves a mode, so the first user job pays no compilation or allocator set-up; a failure
refuses to start (WAN_WARMUP, WAN_WARMUP_WIDTH/HEIGHT/FRAMES). A job with `fast_mode` runs with the
first-block step cache at WAN_FAST_THRESHOLD (an approximation; every run sets the cache for its own job,
so a fast job never leaves it on for the next one). See docs/WAN.md.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Callable

from types import SimpleNamespace

import PIL.Image
import torch
from PIL import ImageOps
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.errors import PayloadError
from schemas.limits import LIMITS
from schemas.settings import Settings
from schemas.wan import (DEFAULT_DURATION_S, MIN_VIDEO_FRAMES, NATIVE_SIZES, REFERENCE_MODES, REFERENCE_SLOTS,
                         SHIFT_480P, SHIFT_720P, SHIFT_AREA_SPLIT, WAN_PRESETS, ReferenceMode, WanRequest,
                         frames_for_duration)

from .accel import AccelOptions, accelerate_wan
from .host_weights import HostWeights
from .loading import TINY, pick_device, pick_dtype, resolve_model_path, warm_up_or_refuse
from .step_cache import set_wan_step_cache
from .tiny_wan import build_tiny_wan, build_tiny_wan_vace

log = logging.getLogger(__name__)

OnStep = Callable[[int, int], None]
MAX_PROMPT_TOKENS = 512  # WAN's text context; longer prompts would be cut off
# VACE's "nothing here yet" value: mid grey, as in diffusers' first/last-frame example.
_GREY = (128, 128, 128)
_KEEP, _GENERATE = 0, 255  # VACE mask: black keeps the conditioning pixels, white lets the model paint
REFERENCE_MODES_NEEDING_VACE = ("single", "start", "end", "both")
_T2V_CLASS, _VACE_CLASS = "WanTransformer3DModel", "WanVACETransformer3DModel"
WARMUP_STEPS = 2  # enough to run every code path of a job (solver's first and later steps, decode)
TINY_WARMUP = (32, 32, 5)  # the tiny models' own shape (tests, demo): width, height, frames
# Where the default warm-up could never run on this card (fit_warmup), fewer frames at the same size.
FIT_WARMUP_FRAMES = (49, 33, 17, MIN_VIDEO_FRAMES)
# VACE's modes, cheapest first: `none`, `start`, `end`, `both` condition through a video and mask of
# num_frames; `single` adds its reference as one more latent frame (a longer sequence).
_VACE_MODE_COST = ("none", "start", "end", "both", "single")


class WanConfigError(RuntimeError):
    """The configured checkpoints cannot serve the configured modes: the daemon must not start."""


class WanSettings(BaseSettings):
    """WAN-only process settings (env `WAN_MODES_SERVED`, `WAN_TEXT_ENCODER_OFFLOAD`, `WAN_WARMUP*`,
    `WAN_FAST_*`)."""

    model_config = SettingsConfigDict(env_prefix="WAN_", extra="ignore", populate_by_name=True)

    # Comma-separated. The default is every mode today's callers send; an operator with only the
    # T2V checkpoint must say `none` explicitly rather than fail reference jobs one by one.
    modes_served: Annotated[tuple[ReferenceMode, ...], NoDecode] = REFERENCE_MODES
    # The UMT5-XXL encoder is ~11 GB in bf16: keep it on the CPU between jobs, on the GPU only to encode.
    text_encoder_offload: bool = True
    # setup()'s warm-up (docs/WAN.md): off with WAN_WARMUP=0; its shape defaults to the largest video the
    # contract sends (832x480, 81 frames; tiny models: 32x32, 5 frames), each side settable.
    warmup: bool = Field(True, validation_alias="WAN_WARMUP")
    warmup_width: int | None = Field(None, ge=16, le=LIMITS.wan_max_pixels // 16, multiple_of=16,
                                     validation_alias="WAN_WARMUP_WIDTH")
    warmup_height: int | None = Field(None, ge=16, le=LIMITS.wan_max_pixels // 16, multiple_of=16,
                                      validation_alias="WAN_WARMUP_HEIGHT")
    # A video's 4k+1 frames (the warm-up is a video job).
    warmup_frames: int | None = Field(None, ge=MIN_VIDEO_FRAMES, le=LIMITS.wan_max_frames,
                                      validation_alias="WAN_WARMUP_FRAMES")
    # Fast mode (a job's `config.fast_mode: true`): the first-block cache's threshold, the relative change
    # of the first block's residual below which a step reuses the other blocks' last residual. Higher
    # skips more steps and drifts further from the normal output; the right value depends on the real
    # weights (docs/WAN.md, docs/PERFORMANCE.md "Step cache").
    fast_threshold: float = Field(0.1, gt=0.0, le=1.0, validation_alias="WAN_FAST_THRESHOLD")
    # false: fast-mode jobs are refused (PayloadError naming config.fast_mode), e.g. until a threshold
    # has been checked on the real weights.
    fast_mode_allowed: bool = Field(True, validation_alias="WAN_FAST_MODE_ALLOWED")

    @field_validator("warmup_frames")
    @classmethod
    def _four_k_plus_one(cls, value):
        if value is not None and (value - 1) % 4:
            raise ValueError(f"a video has 4k+1 frames (5, 9, 13, ...); got {value}")
        return value

    @model_validator(mode="after")
    def _warmup_area(self) -> "WanSettings":
        if self.warmup_width and self.warmup_height and \
                self.warmup_width * self.warmup_height > LIMITS.wan_max_pixels:
            raise ValueError(f"WAN_WARMUP_WIDTH x WAN_WARMUP_HEIGHT ({self.warmup_width}x{self.warmup_height}) "
                             f"is over GENQ_LIMIT_WAN_MAX_PIXELS ({LIMITS.wan_max_pixels})")
        return self

    @field_validator("modes_served", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        if not value:
            raise ValueError("name at least one mode (none, single, start, end, both)")
        return tuple(dict.fromkeys(value))


def make_scheduler(sampler: str, shift: float):
    """A fresh flow-matching scheduler per request: cheap, and no solver state leaks between jobs."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    flow = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **flow)
    if sampler == "unipc":
        return UniPCMultistepScheduler(**flow)
    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    raise ValueError(f"unknown sampler {sampler!r}")


def check_modes(settings: Settings, wan: WanSettings) -> None:
    """Refuse, before any weights load, a configuration that cannot serve the modes it is asked to serve."""
    t2v, vace = settings.wan_model_path, settings.wan_vace_model_path
    if not t2v and not vace:
        raise WanConfigError("WAN needs WAN_MODEL_PATH (Wan2.1-T2V-1.3B-Diffusers folder) and/or "
                             "WAN_VACE_MODEL_PATH (Wan2.1-VACE-1.3B-diffusers folder); neither is set")
    needs_vace = [m for m in wan.modes_served if m in REFERENCE_MODES_NEEDING_VACE]
    if needs_vace and not vace:
        raise WanConfigError(
            f"WAN_MODES_SERVED asks for reference modes {','.join(needs_vace)}, which need the VACE "
            "checkpoint (Wan2.1-VACE-1.3B-diffusers) in WAN_VACE_MODEL_PATH; it is not set. Set it, or "
            "serve text-to-video only with WAN_MODES_SERVED=none")


def _transformer_class(folder: Path, env: str) -> str:
    config = folder / "transformer" / "config.json"
    if not config.is_file():
        raise WanConfigError(f"{env}={folder} is not a diffusers WAN folder (no transformer/config.json)")
    data = json.loads(config.read_text())
    if data.get("image_dim"):
        raise WanConfigError(f"{env}={folder} is an image-to-video checkpoint; genq serves references "
                             "through VACE: use a T2V folder here and a VACE folder in WAN_VACE_MODEL_PATH")
    return data.get("_class_name", "")


def _check_checkpoint(folder: Path, env: str, expected: str) -> None:
    found = _transformer_class(folder, env)
    if found != expected:
        raise WanConfigError(f"{env}={folder} holds a {found or 'unknown'} transformer; expected {expected} "
                             f"({'a VACE' if expected == _VACE_CLASS else 'a text-to-video'} checkpoint)")


def fit_frame(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """Cover width x height and crop the overflow evenly: a frame must fill the video, not be letterboxed."""
    return ImageOps.fit(image.convert("RGB"), (width, height), method=PIL.Image.Resampling.LANCZOS)


def conditioning_video(mode: str, refs: dict[str, PIL.Image.Image], width: int, height: int,
                       num_frames: int) -> tuple[list[PIL.Image.Image], list[PIL.Image.Image]]:
    """VACE `video` and `mask` for the frame modes: the given frames are kept, every other one painted."""
    grey = PIL.Image.new("RGB", (width, height), _GREY)
    keep = PIL.Image.new("L", (width, height), _KEEP)
    paint = PIL.Image.new("L", (width, height), _GENERATE)
    video, mask = [grey] * num_frames, [paint] * num_frames
    pinned = {"first_frame": 0, "last_frame": num_frames - 1}
    for slot in REFERENCE_SLOTS[mode]:
        index = pinned[slot]
        video[index], mask[index] = fit_frame(refs[slot], width, height), keep
    return video, mask


class WanVideoPipeline:
    family = "wan"

    def __init__(self, settings: Settings, wan_settings: WanSettings | None = None):
        self.settings = settings
        self.wan = wan_settings or WanSettings()
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self._t2v = None
        self._vace = None
        self._text_weights: HostWeights | None = None  # the text encoder's host copy, when it visits the GPU
        self._fitted_warmup: tuple[int, int, int] | None = None  # set by fit_warmup()
        self.warmup_runs: list[tuple[str, str]] = []  # (transformer, mode) the warm-up ran
        self.warmup_s: float | None = None

    # --- loading -----------------------------------------------------------------------------
    def setup(self) -> None:
        from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel, WanVACEPipeline, \
            WanVACETransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        check_modes(self.settings, self.wan)
        # Only a T2V-less daemon answers `none` on VACE; with both, T2V's lighter transformer does it.
        t2v = self._resolve(self.settings.wan_model_path, "wan", build_tiny_wan, "WAN_MODEL_PATH", _T2V_CLASS)
        vace = self._resolve(self.settings.wan_vace_model_path, "wan_vace", build_tiny_wan_vace,
                             "WAN_VACE_MODEL_PATH", _VACE_CLASS)
        self.device = pick_device(self.settings)
        started = time.perf_counter()
        # WAN is trained in bf16; its activations overflow fp16 (the family default on GPU).
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else pick_dtype(self.device)
        base = t2v or vace
        shared = dict(
            tokenizer=AutoTokenizer.from_pretrained(base, subfolder="tokenizer"),
            text_encoder=UMT5EncoderModel.from_pretrained(base, subfolder="text_encoder",
                                                          dtype=self.dtype).eval(),
            # fp32 VAE: WAN's decoder bands and shifts colours in bf16 (diffusers' recommendation).
            vae=AutoencoderKLWan.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32).eval(),
            scheduler=make_scheduler("unipc", 3.0),
        )
        text_dim = shared["text_encoder"].config.d_model
        if t2v:
            self._t2v = WanPipeline(transformer=self._transformer(WanTransformer3DModel, t2v, text_dim), **shared)
        if vace:
            self._vace = WanVACEPipeline(transformer=self._transformer(WanVACETransformer3DModel, vace, text_dim),
                                         **shared)
        shared["vae"].to(self.device)
        if self.wan.text_encoder_offload and self.device.type != "cpu":
            self._text_weights = HostWeights(shared["text_encoder"])  # pinned once; each job's visit copies it in
        else:
            shared["text_encoder"].to(self.device)
        log.info("wan weights loaded in %.1fs", time.perf_counter() - started)  # cold-start figure
        accel = AccelOptions.from_env()  # GPU speed-ups behind GENQ_ACCEL (docs/PERFORMANCE.md)
        for pipe in self._pipelines():
            pipe.set_progress_bar_config(disable=True)
            log.info("wan accel (%s): %s", type(pipe.transformer).__name__, accelerate_wan(pipe, accel))
        warmed = self._warm_up() if self.wan.warmup else "warm-up off (WAN_WARMUP=0)"
        log.info("wan ready on %s (%s): t2v=%s vace=%s modes=%s text_encoder_offload=%s, %s", self.device,
                 self.dtype, bool(t2v), bool(vace), ",".join(self.wan.modes_served), self.wan.text_encoder_offload,
                 warmed)

    # --- warm-up -----------------------------------------------------------------------------
    def _warm_up(self) -> str:
        """A short real job per serving transformer through run() (same code, no-grad mode, dtype and
        shapes as a user's job): compiles the blocks, sets up cuDNN and the allocator, decodes."""
        width, height, frames = self._warmup_shape()
        started = time.perf_counter()
        for name, mode in self._warmup_plan():
            failure = (f"WAN warm-up of the {name} transformer (mode {mode}) at {width}x{height}, {frames} frames "
                       "failed, refusing to start (lower WAN_WARMUP_WIDTH/HEIGHT/FRAMES or GENQ_LIMIT_WAN_MAX_FRAMES; "
                       "WAN_WARMUP=0 skips the warm-up)")
            with warm_up_or_refuse(self.device, self._release_transformers, failure):
                request = self._warmup_request(width, height, frames, mode)
                grey = PIL.Image.new("RGB", (width, height), _GREY)
                self.run(request, {slot: grey for slot in REFERENCE_SLOTS[mode]})
            self.warmup_runs.append((name, mode))
        self.warmup_s = time.perf_counter() - started
        runs = ", ".join(f"{name} {mode}" for name, mode in self.warmup_runs)
        return f"warmed up at {width}x{height}x{frames} in {self.warmup_s:.1f} s ({runs})"

    def _release_transformers(self) -> None:
        self._t2v = self._vace = None

    def _warmup_plan(self) -> list[tuple[str, str]]:
        """(transformer, mode) per loaded transformer that serves a mode, with its cheapest mode."""
        served = self.wan.modes_served
        plan = []
        if self._t2v is not None and "none" in served:
            plan.append(("T2V", "none"))
        if self._vace is not None:
            # With T2V loaded, `none` runs there; VACE serves only the reference modes.
            modes = [m for m in _VACE_MODE_COST if m in served and (m != "none" or self._t2v is None)]
            if modes:
                plan.append(("VACE", modes[0]))
        return plan

    @staticmethod
    def _warmup_request(width: int, height: int, frames: int, mode: str) -> WanRequest:
        """The request a user's video job becomes (schemas/wan.py validates it, check_inputs runs in run())."""
        preset = WAN_PRESETS["video_fast"]
        source = {"source": "warmup"}  # never fetched: run() takes the pictures directly
        refs = {field: source for field, slot in (("reference_image", "image"), ("first_frame", "first_frame"),
                                                ("last_frame", "last_frame")) if slot in REFERENCE_SLOTS[mode]}
        return WanRequest(job_id="warmup", user_id="warmup", job_type="video_fast", prompt="warm-up",
                          width=width, height=height, num_frames=frames, steps=WARMUP_STEPS,
                          guidance_scale=preset["guidance_scale"],  # > 1: both guidance passes, as jobs
                          sampler="dpm++",  # what today's callers send
                          shift=SHIFT_480P if width * height <= SHIFT_AREA_SPLIT else SHIFT_720P,
                          seed=0, reference_mode=mode, **refs)

    def warmup_shape(self) -> SimpleNamespace:
        """The warm-up job's shape, for memory admission before setup() (consumers/gpu.py); zeros when off."""
        if not self.wan.warmup:
            return self._shape(0, 0, 0)
        return self._shape(*self._warmup_shape())

    def _shape(self, width: int, height: int, frames: int) -> SimpleNamespace:
        return SimpleNamespace(family=self.family, width=width, height=height, num_frames=frames)

    def fit_warmup(self, fits: Callable[[SimpleNamespace], bool]) -> None:
        """Where the default warm-up could never run on this card, warm up with the most frames that can
        (longer videos are refused there anyway: memory.never_fits_message). WAN_WARMUP_* set by the
        operator always wins. Called by consumers/gpu.py's loading() before setup()."""
        w = self.wan
        if not w.warmup or self._tiny() or w.warmup_width or w.warmup_height or w.warmup_frames:
            return
        width, height, frames = self._default_warmup()
        candidates = [(width, height, n) for n in dict.fromkeys((frames, *FIT_WARMUP_FRAMES)) if n <= frames]
        self._fitted_warmup = next((c for c in candidates if fits(self._shape(*c))), candidates[-1])
        # The smallest even when it does not fit: admission then says why this card cannot start.

    def _warmup_shape(self) -> tuple[int, int, int]:
        if self._fitted_warmup is not None:
            return self._fitted_warmup
        width, height, frames = TINY_WARMUP if self._tiny() else self._default_warmup()
        w = self.wan
        return w.warmup_width or width, w.warmup_height or height, w.warmup_frames or frames

    @staticmethod
    def _default_warmup() -> tuple[int, int, int]:
        """The largest video the contract sends: WAN's native size (832x480 / 480x832) and the default
        duration (5 s = 81 frames), capped by GENQ_LIMIT_WAN_MAX_FRAMES."""
        width, height = max(NATIVE_SIZES.values(), key=lambda size: size[0] * size[1])
        frames = frames_for_duration(DEFAULT_DURATION_S)
        cap = max(MIN_VIDEO_FRAMES, (LIMITS.wan_max_frames - 1) // 4 * 4 + 1)
        return width, height, min(frames, cap)

    def _tiny(self) -> bool:
        paths = [p for p in (self.settings.wan_model_path, self.settings.wan_vace_model_path) if p]
        return bool(paths) and all(p == TINY for p in paths)

    def _resolve(self, path: str | None, family: str, builder, env: str, expected: str) -> str | None:
        if not path:
            return None
        folder = Path(resolve_model_path(path, family, self.settings, builder, setting=env))
        _check_checkpoint(folder, env, expected)
        return str(folder)

    def _transformer(self, cls, folder: str, text_dim: int):
        model = cls.from_pretrained(folder, subfolder="transformer", torch_dtype=self.dtype).eval()
        if model.config.text_dim != text_dim:
            raise WanConfigError(f"{folder}: its transformer reads {model.config.text_dim}-wide text features, "
                                 f"the shared text encoder makes {text_dim}: the checkpoints do not belong together")
        return model.to(self.device)

    def _pipelines(self):
        return [p for p in (self._t2v, self._vace) if p is not None]

    # --- running -----------------------------------------------------------------------------
    def move_to(self, device) -> None:
        """Idle weights to CPU and back (memory admission makes room for another daemon's job)."""
        pipes = self._pipelines()
        for pipe in pipes:
            pipe.transformer.to(device)
        pipes[0].vae.to(device)
        if not self.wan.text_encoder_offload:
            pipes[0].text_encoder.to(device)

    def check_inputs(self, request: WanRequest, refs: dict[str, PIL.Image.Image]) -> None:
        """Refuse what this daemon cannot honour, before any GPU work."""
        if not self._pipelines():
            raise RuntimeError("WanVideoPipeline.setup() has not run")
        if request.reference_mode not in self.wan.modes_served:
            raise PayloadError("metadata.video_reference_mode",
                               f"{request.reference_mode} is not served here (WAN_MODES_SERVED="
                               f"{','.join(self.wan.modes_served)})")
        if request.fast_mode and not self.wan.fast_mode_allowed:
            raise PayloadError("config.fast_mode", "fast mode is turned off on this server "
                                                   "(WAN_FAST_MODE_ALLOWED=false); send false or leave it out")
        for field in ("prompt", "negative_prompt"):
            tokens = len(self._tokenizer(getattr(request, field)).input_ids)
            if tokens > MAX_PROMPT_TOKENS:
                raise PayloadError(field, f"{tokens} tokens; WAN reads at most {MAX_PROMPT_TOKENS}")
        for slot in REFERENCE_SLOTS[request.reference_mode]:
            if not isinstance(refs.get(slot), PIL.Image.Image):
                raise ValueError(f"refs[{slot!r}]: reference mode {request.reference_mode} needs a PIL image")

    @property
    def _tokenizer(self):
        return self._pipelines()[0].tokenizer

    @property
    def fast_threshold(self) -> float:
        """The step cache's threshold a fast-mode job runs with (reported in its callback)."""
        return self.wan.fast_threshold

    def run(self, request: WanRequest, refs: dict[str, PIL.Image.Image] | None = None,
            on_step: OnStep | None = None) -> list[PIL.Image.Image]:
        """`request.num_frames` frames of `request.width` x `request.height`."""
        refs = refs or {}
        self.check_inputs(request, refs)
        pipe, conditioning = self._route(request, refs)
        pipe.scheduler = make_scheduler(request.sampler, request.shift)
        # Every run sets the cache for its own job on the transformer it uses: on for a fast job, off for
        # any other, so a fast job that failed or was cancelled mid-way never carries over.
        set_wan_step_cache(pipe, self.wan.fast_threshold if request.fast_mode else None)
        positive, negative = self._encode(pipe, request)
        output = pipe(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            height=request.height,
            width=request.width,
            num_frames=request.num_frames,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            # A CPU generator draws the same noise on every device: a seed means one video.
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="pil",
            callback_on_step_end=_step_callback(on_step, request.steps) if on_step else None,
            **conditioning,
        )
        return list(output.frames[0])

    def _route(self, request: WanRequest, refs: dict[str, PIL.Image.Image]):
        mode = request.reference_mode
        if mode == "none":
            return (self._t2v, {}) if self._t2v is not None else (self._vace, {})
        if self._vace is None:  # check_modes makes this unreachable through settings
            raise WanConfigError(f"reference mode {mode} needs WAN_VACE_MODEL_PATH")
        if mode == "single":
            return self._vace, {"reference_images": [refs["image"].convert("RGB")]}
        video, mask = conditioning_video(mode, refs, request.width, request.height, request.num_frames)
        return self._vace, {"video": video, "mask": mask}

    def _encode(self, pipe, request: WanRequest):
        if self._text_weights is None:
            return self._encode_prompt(pipe, request)
        try:
            with self._text_weights.visit(self.device):
                return self._encode_prompt(pipe, request)
        finally:
            torch.cuda.empty_cache()  # hand the encoder's memory back to the other processes on the GPU

    def _encode_prompt(self, pipe, request: WanRequest):
        with torch.no_grad():
            return pipe.encode_prompt(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                do_classifier_free_guidance=request.guidance_scale > 1.0,
                max_sequence_length=MAX_PROMPT_TOKENS,
                device=self.device,
                dtype=self.dtype,
            )


def _step_callback(on_step: OnStep, total: int):
    def callback(_pipe, index: int, _timestep, _tensors) -> dict:
        on_step(index + 1, total)
        return {}

    return callback
