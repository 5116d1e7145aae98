"""SDXL jobs: check, fetch, run, store, report."""
from __future__ import annotations

from rq.job import Job

from schemas.sdxl import adapt_sdxl

from . import reporting
from .generation import generate

report_failure = reporting.report_failure


def perform(runtime, job: Job | None, payload: dict) -> dict:
    def fetch(request):
        if request.reference is None:
            return None
        return runtime.uploader.fetch_reference(request.reference, "metadata.reference_image_url")

    def store(request, images):
        return runtime.uploader.store_images(request.user_id, request.job_id, images)

    request, stored, timing = generate(runtime, job, payload, adapt_sdxl, fetch, store)
    metadata = {"seed": request.seeds[0], "num_images": request.num_images, "job_type": request.job_type,
                "steps": request.steps, "guidance_scale": request.guidance_scale,
                "negative_prompt_used": bool(request.negative_prompt.strip()), **timing}
    return reporting.completed(runtime, request.job_id, image_assets(request, stored), metadata)


def image_assets(request, stored) -> list[dict]:
    """The completion callback's `assets`: one per stored image, in output order."""
    negative_used = bool(request.negative_prompt.strip())
    return [
        {"type": "image", "url": s.url, "thumbnail_url": s.thumbnail_url,
         "metadata": {"width": s.width, "height": s.height, "format": "png", "batch_size": request.num_images,
                      "steps": request.steps, "guidance_scale": request.guidance_scale, "seed": seed,
                      "file_size_bytes": s.file_size_bytes, "asset_index": i,
                      "negative_prompt_used": negative_used, "scheduler": request.scheduler,
                      "mode": request.mode}}
        for i, (s, seed) in enumerate(zip(stored, request.seeds))
    ]
