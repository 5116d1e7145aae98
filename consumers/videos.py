"""WAN jobs (video_fast, video_high, image_fast, image_high): check, fetch, run, store, report."""
from __future__ import annotations

from rq.job import Job

from schemas.wan import adapt_wan

from . import reporting
from .generation import generate

report_failure = reporting.report_failure

# Reference slot -> the payload field a caller would fix when its fetch fails.
SLOT_FIELDS = {"image": "config.image", "first_frame": "config.first_frame", "last_frame": "config.last_frame"}


def perform(runtime, job: Job | None, payload: dict) -> dict:
    def fetch(request):
        return {slot: runtime.uploader.fetch_reference(ref, SLOT_FIELDS[slot])
                for slot, ref in request.references.items()}

    def store(request, frames):
        if request.is_image:
            return runtime.uploader.store_images(request.user_id, request.job_id, frames[:1])[0], "image", "png"
        return runtime.uploader.store_video(request.user_id, request.job_id, frames, request.fps), "video", "mp4"

    request, (stored, kind, fmt), timing = generate(runtime, job, payload, adapt_wan, fetch, store)
    duration = round(request.num_frames / request.fps, 3)
    asset = {"type": kind, "url": stored.url, "thumbnail_url": stored.thumbnail_url,
             "metadata": {"width": stored.width, "height": stored.height, "format": fmt, "seed": request.seed,
                          "steps": request.steps, "guidance_scale": request.guidance_scale,
                          "file_size_bytes": stored.file_size_bytes, "asset_index": 0,
                          "frame_num": request.num_frames, "duration": duration, "fps": request.fps,
                          "sampler": request.sampler, "shift": request.shift,
                          "reference_mode": request.reference_mode}}
    metadata = {"seed": request.seed, "frame_num": request.num_frames, "duration": duration,
                "job_type": request.job_type, "steps": request.steps, "guidance_scale": request.guidance_scale,
                "reference_mode": request.reference_mode,
                "negative_prompt_used": bool(request.negative_prompt.strip()), **timing}
    if request.fast_mode:  # only then: a normal job's callback stays as it always was
        metadata.update(fast_mode=True, fast_mode_threshold=runtime.pipeline.fast_threshold)
    return reporting.completed(runtime, request.job_id, [asset], metadata)
