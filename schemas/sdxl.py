"""The canonical, fully specified SDXL request. Every bound sits next to its field."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .common import Enhancement, JobIdentity, Prompt, Reference, Seed
from .limits import LIMITS

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
