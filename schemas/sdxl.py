"""The canonical, fully specified SDXL request. Every bound sits next to its field."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationError, model_validator

from .common import Enhancement, JobIdentity, Prompt, Reference, Seed
from .errors import PayloadError, from_validation_error
from .limits import LIMITS
from .payload import enhancement_of, get_int, get_number, get_path, identity, require_type, seed_of

SDXL_JOB_TYPES = ("sdxl_image_fast", "sdxl_image_high")
Scheduler = Literal["default", "euler", "euler_a", "dpm++", "ddim"]


class SdxlRequest(JobIdentity):
    family: Literal["sdxl"] = "sdxl"
    job_type: Literal["sdxl_image_fast", "sdxl_image_high"]
    prompt: Prompt
    negative_prompt: Prompt = ""
    width: Annotated[int, Field(ge=64, le=LIMITS.sdxl_max_side, multiple_of=8)]
    height: Annotated[int, Field(ge=64, le=LIMITS.sdxl_max_side, multiple_of=8)]
    steps: Annotated[int, Field(ge=1, le=LIMITS.sdxl_max_steps)]
    guidance_scale: Annotated[float, Field(ge=0.0, le=LIMITS.sdxl_max_guidance)]
    num_images: Literal[1, 3, 6]
    seeds: list[Seed]
    # "default" keeps the checkpoint's own scheduler.
    scheduler: Scheduler = "default"
    reference: Reference | None = None
    strength: Annotated[float, Field(gt=0.0, le=1.0)] = 0.75
    exact_copy: bool = False
    enhancement: Enhancement | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "SdxlRequest":
        if self.width * self.height > LIMITS.sdxl_max_pixels:
            raise ValueError(f"width*height must be at most {LIMITS.sdxl_max_pixels} pixels "
                             f"(got {self.width}x{self.height})")
        if len(self.seeds) != self.num_images:
            raise ValueError(f"seeds: need one seed per image ({self.num_images}), got {len(self.seeds)}")
        if self.exact_copy and self.reference is None:
            raise ValueError("exact_copy needs a reference image")
        if not self.prompt.strip() and not self.exact_copy:
            raise ValueError("prompt: may be empty only for an exact copy of a reference image")
        return self

    @property
    def mode(self) -> Literal["txt2img", "img2img"]:
        return "img2img" if self.reference is not None else "txt2img"


# Presets the old workers used when a field is absent (contract section 2). Configuration, not policy.
SDXL_PRESETS = {
    "sdxl_image_fast": {"steps": 15, "guidance_scale": 6.0},
    "sdxl_image_high": {"steps": 25, "guidance_scale": 7.5},
}
DEFAULT_STRENGTH = 0.75
# Canonical field -> the payload field a caller would fix.
PAYLOAD_FIELDS = {
    "width": "config.resolution", "height": "config.resolution", "steps": "config.num_inference_steps",
    "guidance_scale": "config.guidance_scale", "num_images": "config.num_images", "seeds": "config.seed",
    "strength": "config.denoise_strength", "reference": "metadata.reference_image_url",
    "scheduler": "config.scheduler", "user_id": "user_id", "job_id": "id", "prompt": "prompt",
    "negative_prompt": "negative_prompt", "enhancement": "enhancement",
}


def parse_resolution(value: str | None) -> tuple[int, int]:
    if value is None:
        raise PayloadError("config.resolution", "missing (\"WxH\", e.g. \"1024x1024\")")
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise PayloadError("config.resolution", f"must look like \"1024x576\" (got {value!r:.40})")
    return int(parts[0]), int(parts[1])


def _strength(job: dict) -> float:
    for path in ("config.denoise_strength", "metadata.denoise_strength"):
        value = get_number(job, path)
        if value is not None:
            return value
    reference_strength = get_number(job, "metadata.reference_strength")
    if reference_strength is not None:
        return 1.0 - reference_strength
    return DEFAULT_STRENGTH


def adapt_sdxl(job: dict) -> SdxlRequest:
    """Today's `sdxl_queue` payload -> a fully specified SdxlRequest (presets only where absent)."""
    job_type = require_type(job, SDXL_JOB_TYPES)
    fields = identity(job)
    preset = SDXL_PRESETS[job_type]
    num_images = get_int(job, "config.num_images", 1)
    seed, _given = seed_of(job)
    width, height = parse_resolution(get_path(job, "config.resolution", str))
    pipeline = get_path(job, "config.pipeline", str, "txt2img")
    if pipeline not in ("txt2img", "img2img"):
        raise PayloadError("config.pipeline", f"must be txt2img or img2img for {job_type} (got {pipeline!r:.40})")
    reference_url = get_path(job, "metadata.reference_image_url", str)
    if pipeline == "img2img" and not reference_url:
        raise PayloadError("metadata.reference_image_url", "missing: config.pipeline is img2img")
    exact_copy = bool(get_path(job, "metadata.exact_copy_mode", bool, False))
    reference_mode = get_path(job, "metadata.reference_mode", str)
    if reference_mode not in (None, "modify", "copy"):
        raise PayloadError("metadata.reference_mode", f"must be modify or copy (got {reference_mode!r:.40})")
    exact_copy = exact_copy or reference_mode == "copy"
    values = dict(
        fields,
        job_type=job_type,
        width=width,
        height=height,
        steps=get_int(job, "config.num_inference_steps", preset["steps"]),
        guidance_scale=get_number(job, "config.guidance_scale", preset["guidance_scale"]),
        num_images=num_images,
        seeds=[seed + i for i in range(num_images if isinstance(num_images, int) and 0 < num_images <= 6 else 1)],
        scheduler=get_path(job, "config.scheduler", str, "default"),
        # A reference makes the job img2img whatever `pipeline` says: honouring it beats ignoring it.
        reference=Reference(source=reference_url) if reference_url else None,
        strength=_strength(job) if reference_url else DEFAULT_STRENGTH,
        exact_copy=exact_copy,
        enhancement=enhancement_of(job),
    )
    try:
        return SdxlRequest(**values)
    except ValidationError as err:
        raise from_validation_error(err, PAYLOAD_FIELDS) from None
