"""The canonical, fully specified WAN 2.1 request, and the adapter from today's `wan_queue` payload.

Every bound sits next to its field. The adapter's choices for today's payloads are listed in docs/WAN.md.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from .common import Enhancement, JobIdentity, Prompt, Reference, Seed
from .errors import PayloadError, from_validation_error
from .limits import LIMITS
from .payload import enhancement_of, get_int, get_number, get_path, identity, require_type, seed_of

WAN_JOB_TYPES = ("video_fast", "video_high", "image_fast", "image_high")
IMAGE_JOB_TYPES = ("image_fast", "image_high")
WAN_FPS = 16  # WAN 2.1 is trained at 16 fps; the contract's MP4 plays at 16 fps
MIN_VIDEO_FRAMES = 5  # 4k+1 with k >= 1: a video has at least one latent frame after the first
MAX_SHIFT = 20.0

Sampler = Literal["dpm++", "unipc", "euler"]
ReferenceMode = Literal["none", "single", "start", "end", "both"]
REFERENCE_MODES: tuple[ReferenceMode, ...] = ("none", "single", "start", "end", "both")
# Which reference slots each mode fills. The slot names are the keys of `WanRequest.references`
# and of the images handed to the pipeline.
REFERENCE_SLOTS: dict[str, tuple[str, ...]] = {
    "none": (),
    "single": ("image",),
    "start": ("first_frame",),
    "end": ("last_frame",),
    "both": ("first_frame", "last_frame"),
}
# A single frame cannot start from one picture and end at another: conditioning it on a first or
# last frame would hand back the reference itself.
IMAGE_REFERENCE_MODES = ("none", "single")


class WanRequest(JobIdentity):
    family: Literal["wan"] = "wan"
    job_type: Literal["video_fast", "video_high", "image_fast", "image_high"]
    prompt: Prompt
    negative_prompt: Prompt = ""
    width: Annotated[int, Field(ge=16, le=LIMITS.wan_max_pixels // 16, multiple_of=16)]
    height: Annotated[int, Field(ge=16, le=LIMITS.wan_max_pixels // 16, multiple_of=16)]
    # WAN's VAE compresses time 4x after the first frame: 4k+1 frames (1 for the image job types).
    num_frames: Annotated[int, Field(ge=1, le=LIMITS.wan_max_frames)]
    fps: Literal[16] = WAN_FPS
    steps: Annotated[int, Field(ge=1, le=LIMITS.wan_max_steps)]
    guidance_scale: Annotated[float, Field(ge=0.0, le=LIMITS.wan_max_guidance)]
    sampler: Sampler
    # Flow-matching timestep shift: 3.0 suits 480p, 5.0 suits 720p (WAN's recommendation).
    shift: Annotated[float, Field(gt=0.0, le=MAX_SHIFT)]
    seed: Seed
    reference_mode: ReferenceMode = "none"
    reference_image: Reference | None = None
    first_frame: Reference | None = None
    last_frame: Reference | None = None
    enhancement: Enhancement | None = None
    # Opt-in step caching (faster, slightly different output): first-block cache at the server's
    # WAN_FAST_THRESHOLD (pipelines/wan.py). Payload field `config.fast_mode`; absent means False.
    fast_mode: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "WanRequest":
        if self.width * self.height > LIMITS.wan_max_pixels:
            raise ValueError(f"width*height must be at most {LIMITS.wan_max_pixels} pixels "
                             f"(got {self.width}x{self.height})")
        if self.is_image:
            if self.num_frames != 1:
                raise ValueError(f"num_frames: {self.job_type} makes exactly 1 frame (got {self.num_frames})")
            if self.reference_mode not in IMAGE_REFERENCE_MODES:
                raise ValueError(f"reference_mode: {self.job_type} makes one frame, so it takes "
                                 f"{' or '.join(IMAGE_REFERENCE_MODES)} (got {self.reference_mode})")
        elif self.num_frames < MIN_VIDEO_FRAMES or (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames: a video needs 4k+1 frames, at least {MIN_VIDEO_FRAMES} "
                             f"(got {self.num_frames})")
        wanted = set(REFERENCE_SLOTS[self.reference_mode])
        for slot, value in self.references_all().items():
            if slot in wanted and value is None:
                raise ValueError(f"{_SLOT_FIELDS[slot]}: missing (reference_mode is {self.reference_mode})")
            if slot not in wanted and value is not None:
                raise ValueError(f"{_SLOT_FIELDS[slot]}: not used by reference_mode {self.reference_mode}")
        if not self.prompt.strip():
            raise ValueError("prompt: must not be empty")
        return self

    @property
    def is_image(self) -> bool:
        return self.job_type in IMAGE_JOB_TYPES

    def references_all(self) -> dict[str, Reference | None]:
        return {slot: getattr(self, field) for slot, field in _SLOT_FIELDS.items()}

    @property
    def references(self) -> dict[str, Reference]:
        """The reference inputs this request needs, by slot (`image`, `first_frame`, `last_frame`)."""
        return {slot: ref for slot, ref in self.references_all().items() if ref is not None}


_SLOT_FIELDS = {"image": "reference_image", "first_frame": "first_frame", "last_frame": "last_frame"}


# ---------------------------------------------------------------------------------------------
# The adapter from today's payload (contract section 2).

# Presets the old workers used when a field is absent. Configuration, not policy.
WAN_PRESETS = {
    "video_fast": {"steps": 25, "guidance_scale": 6.5},
    "video_high": {"steps": 50, "guidance_scale": 7.5},
    "image_fast": {"steps": 25, "guidance_scale": 6.5},
    "image_high": {"steps": 50, "guidance_scale": 7.5},
}
DEFAULT_DURATION_S = 5.0  # -> 81 frames, the old workers' length
DEFAULT_SAMPLER: Sampler = "unipc"  # WAN's own default; today's callers always send "dpm++"
# WAN 2.1 1.3B is trained at 832x480 (both orientations); other aspects keep about that area.
NATIVE_SIZES = {(16, 9): (832, 480), (9, 16): (480, 832), (1, 1): (624, 624)}
NATIVE_AREA = 832 * 480
DEFAULT_ASPECT = (16, 9)
MAX_ASPECT = 4.0
# Below this area the 480p shift applies, above it the 720p one (halfway between the two areas).
SHIFT_480P, SHIFT_720P = 3.0, 5.0
SHIFT_AREA_SPLIT = (832 * 480 + 1280 * 720) // 2

# Canonical field -> the payload field a caller would fix.
PAYLOAD_FIELDS = {
    "width": "metadata.aspect_ratio", "height": "metadata.aspect_ratio", "num_frames": "metadata.duration",
    "steps": "config.num_inference_steps", "guidance_scale": "config.guidance_scale",
    "sampler": "config.sample_solver", "shift": "config.sample_shift", "seed": "config.seed",
    "reference_mode": "metadata.video_reference_mode", "reference_image": "config.image",
    "first_frame": "config.first_frame", "last_frame": "config.last_frame", "user_id": "user_id",
    "job_id": "id", "prompt": "prompt", "negative_prompt": "negative_prompt", "enhancement": "enhancement",
    "fast_mode": "config.fast_mode",
}
# Reference slot -> the payload fields that may carry it, first found wins.
REFERENCE_SOURCES = {
    "image": ("config.image",),
    "first_frame": ("config.first_frame", "metadata.start_reference_url"),
    "last_frame": ("config.last_frame", "metadata.end_reference_url"),
}

_RATIO = re.compile(r"^\s*(\d{1,5})\s*[:xX]\s*(\d{1,5})\s*$")


def parse_ratio(value: str, field: str) -> tuple[int, int]:
    match = _RATIO.match(value)
    if not match or not int(match[1]) or not int(match[2]):
        raise PayloadError(field, f"must look like \"16:9\" (got {value!r:.40})")
    w, h = int(match[1]), int(match[2])
    g = math.gcd(w, h)
    return w // g, h // g


def size_for_aspect(ratio: tuple[int, int], field: str = "metadata.aspect_ratio") -> tuple[int, int]:
    """(width, height), multiples of 16, for an aspect ratio: WAN's native sizes, else about the same area."""
    if ratio in NATIVE_SIZES:
        return NATIVE_SIZES[ratio]
    r = ratio[0] / ratio[1]
    if not 1 / MAX_ASPECT <= r <= MAX_ASPECT:
        raise PayloadError(field, f"must be between 1:{MAX_ASPECT:g} and {MAX_ASPECT:g}:1 "
                                  f"(got {ratio[0]}:{ratio[1]})")
    return _round16(math.sqrt(NATIVE_AREA * r)), _round16(math.sqrt(NATIVE_AREA / r))


def _round16(x: float) -> int:
    return max(16, int(math.floor(x / 16 + 0.5)) * 16)


def frames_for_duration(seconds: float) -> int:
    """The 4k+1 frame count nearest to `seconds` at 16 fps (5 s -> 81)."""
    k = math.floor((seconds * WAN_FPS - 1) / 4 + 0.5)
    return 4 * max(k, 0) + 1


def _size(job: dict) -> tuple[int, int]:
    aspect = get_path(job, "metadata.aspect_ratio", str)
    if aspect is not None:
        return size_for_aspect(parse_ratio(aspect, "metadata.aspect_ratio"))
    # Without an aspect, only the shape of the 1024-based resolution is used, never its pixel count.
    resolution = get_path(job, "config.resolution", str)
    if resolution is not None:
        return size_for_aspect(parse_ratio(resolution, "config.resolution"), "config.resolution")
    return NATIVE_SIZES[DEFAULT_ASPECT]


def _num_frames(job: dict, job_type: str) -> int:
    if job_type in IMAGE_JOB_TYPES:
        return 1  # the job type asks for one frame; a duration the UI may attach does not apply
    seconds = get_number(job, "metadata.duration", DEFAULT_DURATION_S)
    if not math.isfinite(seconds) or seconds <= 0:
        raise PayloadError("metadata.duration", f"must be a positive number of seconds (got {seconds!r})")
    frames = frames_for_duration(seconds)
    if frames < MIN_VIDEO_FRAMES:
        raise PayloadError("metadata.duration", f"{seconds:g} s is too short: a video needs at least "
                                                f"{MIN_VIDEO_FRAMES} frames at {WAN_FPS} fps")
    if frames > LIMITS.wan_max_frames:
        longest = (LIMITS.wan_max_frames - 1) / WAN_FPS
        raise PayloadError("metadata.duration", f"{seconds:g} s would be {frames} frames at {WAN_FPS} fps; "
                                                f"at most {LIMITS.wan_max_frames} frames ({longest:g} s) allowed")
    return frames


def _shift(job: dict, width: int, height: int) -> float:
    default = SHIFT_480P if width * height <= SHIFT_AREA_SPLIT else SHIFT_720P
    return get_number(job, "config.sample_shift", default)


def _references(job: dict, job_type: str) -> dict[str, Any]:
    mode = get_path(job, "metadata.video_reference_mode", str, "none")
    if mode not in REFERENCE_MODES:
        raise PayloadError("metadata.video_reference_mode",
                           f"must be one of {', '.join(REFERENCE_MODES)} (got {mode!r:.40})")
    if job_type in IMAGE_JOB_TYPES and mode not in IMAGE_REFERENCE_MODES:
        raise PayloadError("metadata.video_reference_mode",
                           f"{job_type} makes one frame, so it takes none or single (got {mode})")
    values: dict[str, Any] = {"reference_mode": mode}
    # Only the slots the mode names are read: reference fields outside the mode (null in practice) do
    # not condition the video, and the mode is the caller's explicit choice.
    for slot in REFERENCE_SLOTS[mode]:
        sources = REFERENCE_SOURCES[slot]
        found = next((v for v in (get_path(job, p, str) for p in sources) if v and v.strip()), None)
        if found is None:
            raise PayloadError(sources[0], f"missing: metadata.video_reference_mode is {mode}"
                               + (f" (nor is {sources[1]} set)" if len(sources) > 1 else ""))
        values[_SLOT_FIELDS[slot]] = {"source": found.strip()}
    return values


def _check_one_output(job: dict, job_type: str) -> None:
    num_images = get_int(job, "config.num_images", 1)
    if num_images != 1:
        raise PayloadError("config.num_images", f"must be 1 for {job_type} (got {num_images})")
    pipeline = get_path(job, "config.pipeline", str)
    if job_type not in IMAGE_JOB_TYPES and pipeline not in (None, "video"):
        raise PayloadError("config.pipeline", f"must be video for {job_type} (got {pipeline!r:.40})")


def adapt_wan(job: dict) -> WanRequest:
    """Today's `wan_queue` payload -> a fully specified WanRequest (presets only where absent)."""
    job_type = require_type(job, WAN_JOB_TYPES)
    _check_one_output(job, job_type)
    preset = WAN_PRESETS[job_type]
    seed, _given = seed_of(job)
    width, height = _size(job)
    values = dict(
        identity(job),
        job_type=job_type,
        width=width,
        height=height,
        num_frames=_num_frames(job, job_type),
        steps=get_int(job, "config.num_inference_steps", preset["steps"]),
        guidance_scale=get_number(job, "config.guidance_scale", preset["guidance_scale"]),
        sampler=get_path(job, "config.sample_solver", str, DEFAULT_SAMPLER),
        shift=_shift(job, width, height),
        seed=seed,
        enhancement=enhancement_of(job),
        # Opt-in, JSON true/false only: a string or number is refused naming the field. Today's callers
        # never send it, so their jobs run exactly as before.
        fast_mode=get_path(job, "config.fast_mode", bool, False),
        **_references(job, job_type),
    )
    try:
        return WanRequest(**values)
    except ValidationError as err:
        raise _named(from_validation_error(err, PAYLOAD_FIELDS)) from None


def _named(err: PayloadError) -> PayloadError:
    """A whole-request rule's message starts with the canonical field it is about: name the payload's."""
    head, _, rest = err.message.removeprefix("Value error, ").partition(": ")
    if not err.field and head in PAYLOAD_FIELDS:
        return PayloadError(PAYLOAD_FIELDS[head], rest)
    return err
