"""SDXL jobs: check, fetch, run, store, report."""
from __future__ import annotations

import time

from rq.job import Job

from schemas.sdxl import adapt_sdxl

from . import reporting
from .enhance import apply_enhancement
from .progress import Progress

report_failure = reporting.report_failure


def perform(runtime, job: Job | None, payload: dict) -> dict:
    reporting.check_decodable(payload)
    request = adapt_sdxl(payload)
    runtime.rule.check(request.prompt, "prompt")
    progress = Progress(runtime, job, request.job_id)
    try:
        progress.check_cancel(force=True)
        request, prompts = apply_enhancement(runtime, job, request, progress)
        reference = None
        if request.reference is not None:
            progress.set_stage("fetching")
            reference = runtime.uploader.fetch_reference(request.reference, "metadata.reference_image_url")
        runtime.pipeline.check_inputs(request, reference)
        progress.set_stage("generating")
        started = time.monotonic()
        with runtime.hold_gpu(request, job):
            images = runtime.pipeline.run(request, reference, on_step=progress.on_step)
        generation_time = round(time.monotonic() - started, 3)
        progress.set_stage("uploading")
        stored = runtime.uploader.store_images(request.user_id, request.job_id, images)
    finally:
        progress.close()
    negative_used = bool(request.negative_prompt.strip())
    assets = [
        {"type": "image", "url": s.url, "thumbnail_url": s.thumbnail_url,
         "metadata": {"width": s.width, "height": s.height, "format": "png", "batch_size": request.num_images,
                      "steps": request.steps, "guidance_scale": request.guidance_scale, "seed": seed,
                      "file_size_bytes": s.file_size_bytes, "asset_index": i,
                      "negative_prompt_used": negative_used, "scheduler": request.scheduler,
                      "mode": request.mode}}
        for i, (s, seed) in enumerate(zip(stored, request.seeds))
    ]
    metadata = {"seed": request.seeds[0], "generation_time": generation_time, "num_images": request.num_images,
                "job_type": request.job_type, "steps": request.steps, "guidance_scale": request.guidance_scale,
                "negative_prompt_used": negative_used, **prompts}
    return reporting.completed(runtime, request.job_id, assets, metadata)
