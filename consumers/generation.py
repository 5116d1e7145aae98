"""The steps every image and video job shares: check, enhance, fetch, run on the GPU, store."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rq.job import Job

from . import reporting
from .enhance import apply_enhancement
from .progress import Progress


def generate(runtime, job: Job | None, payload: dict, adapt: Callable[[dict], Any],
             fetch: Callable[[Any], Any], store: Callable[[Any, Any], Any]) -> tuple[Any, Any, dict]:
    """(final request, what `store` returned, callback metadata: generation_time and prompts).
    `fetch(request)` gives the pipeline's inputs (references); `store(request, outputs)` uploads."""
    reporting.check_decodable(payload)
    request = adapt(payload)
    runtime.rule.check(request.prompt, "prompt")
    progress = Progress(runtime, job, request.job_id)
    try:
        progress.check_cancel(force=True)
        request, prompts = apply_enhancement(runtime, job, request, progress)
        progress.set_stage("fetching")
        inputs = fetch(request)
        runtime.pipeline.check_inputs(request, inputs)
        progress.set_stage("generating")
        started = time.monotonic()
        with runtime.hold_gpu(request, job):
            outputs = runtime.pipeline.run(request, inputs, on_step=progress.on_step)
        runtime.turn.give_back()  # the next job's GPU work may start while this one uploads
        generation_time = round(time.monotonic() - started, 3)
        progress.set_stage("uploading", complete=True)
        stored = store(request, outputs)
    finally:
        progress.close()
    return request, stored, {"generation_time": generation_time, **prompts}
