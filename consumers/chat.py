"""Chat and enhance jobs: the answer goes to the job's reply key in the old HTTP reply's shape."""
from __future__ import annotations

import time

from rq.job import Job

from schemas.chat import adapt_chat, chat_failure, chat_reply, reply_target

from .outcomes import DeadlinePassed, describe, reason_of
from .progress import Progress
from .reporting import check_decodable


def perform(runtime, job: Job | None, payload: dict) -> dict:
    check_decodable(payload)
    request = adapt_chat(payload)
    if request.expired():
        raise DeadlinePassed(f"deadline_ms {request.deadline_ms} passed before the job could run")
    for i, message in enumerate(request.messages):
        runtime.rule.check(message.content, f"request.messages.{i}")
    # No callback endpoint for chat: progress lives in the rq job's meta; cancellation still applies.
    progress = Progress(runtime, job, request.job_id, callbacks=False)
    try:
        progress.check_cancel(force=True)
        runtime.pipeline.check_inputs(request)
        started = time.monotonic()
        with runtime.hold_gpu(request, job):
            result = runtime.pipeline.run(request, on_token=progress.on_step)
    finally:
        progress.close()
    reply = chat_reply(request, text=result.text, generation_time=time.monotonic() - started,
                       tokens_generated=result.tokens_generated, model_info=result.model_info)
    runtime.uploader.push_reply(request.reply_key, reply, runtime.settings.chat_reply_ttl_s)
    return reply


def report_failure(runtime, payload: dict, exc: BaseException | None) -> None:
    job_id, reply_key = reply_target(payload)
    if reply_key is None:
        return
    runtime.uploader.push_reply(reply_key, chat_failure(job_id, describe(exc), reason_of(exc)),
                                runtime.settings.chat_reply_ttl_s)
