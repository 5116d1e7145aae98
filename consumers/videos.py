"""WAN jobs (video_fast, video_high, image_fast, image_high): check, fetch, run, store, report."""
from __future__ import annotations

import time

from rq.job import Job

from schemas.wan import adapt_wan

from . import reporting
from .enhance import apply_enhancement
from .progress import Progress

report_failure = reporting.report_failure

# Reference slot -> the payload field a caller would fix when its fetch fails.
SLOT_FIELDS = {"image": "config.image", "first_frame": "config.first_frame", "last_frame": "config.last_frame"}


def perform(runtime, job: Job | None, payload: dict) -> dict:
    reporting.check_decodable(payload)
    request = adapt_wan(payload)
    runtime.rule.check(request.prompt, "prompt")
    progress = Progress(runtime, job, request.job_id)
    try:
        progress.check_cancel(force=True)
        request, prompts = apply_enhancement(runtime, job, request, progress)
        refs = {}
        if request.references:
            progress.set_stage("fetching")
            refs = {slot: runtime.uploader.fetch_reference(ref, SLOT_FIELDS[slot])
                    for slot, ref in request.references.items()}
        runtime.pipeline.check_inputs(request, refs)
        progress.set_stage("generating")
        started = time.monotonic()
        with runtime.hold_gpu(request, job):
            frames = runtime.pipeline.run(request, refs, on_step=progress.on_step)
        generation_time = round(time.monotonic() - started, 3)
        progress.set_stage("uploading")
        if request.is_image:
            stored, kind, fmt = runtime.uploader.store_images(request.user_id, request.job_id, frames[:1])[0], "image", "png"
        else:
            stored, kind, fmt = runtime.uploader.store_video(request.user_id, request.job_id, frames, request.fps), "video", "mp4"
    finally:
        progress.close()
    duration = round(request.num_frames / request.fps, 3)
    asset = {"type": kind, "url": stored.url, "thumbnail_url": stored.thumbnail_url,
             "metadata": {"width": stored.width, "height": stored.height, "format": fmt, "seed": request.seed,
                          "steps": request.steps, "guidance_scale": request.guidance_scale,
                          "file_size_bytes": stored.file_size_bytes, "asset_index": 0,
                          "frame_num": request.num_frames, "duration": duration, "fps": request.fps,
                          "sampler": request.sampler, "shift": request.shift,
                          "reference_mode": request.reference_mode}}
    metadata = {"seed": request.seed, "frame_num": request.num_frames, "duration": duration,
                "generation_time": generation_time, "job_type": request.job_type, "steps": request.steps,
                "guidance_scale": request.guidance_scale, "reference_mode": request.reference_mode,
                "negative_prompt_used": bool(request.negative_prompt.strip()), **prompts}
    return reporting.completed(runtime, request.job_id, [asset], metadata)
