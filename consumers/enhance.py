"""Enhancement before generation: the chat daemon rewrites the prompt, then generation runs with it.

The generation job enqueues an `enhance` rq job on `chat_queue` (linked both ways in the jobs' meta,
so rq-dashboard shows the pair) and waits on its reply key. A failed, expired or unanswered
enhancement fails the generation job with a callback saying why: it never waits forever.
"""
from __future__ import annotations

import json
import time

from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from schemas.errors import PayloadError

from .intake import TASK

CHAT_QUEUE = "chat_queue"
REPLY_TTL_S = 3600


class EnhancementFailed(PayloadError):
    reason = "enhancement_failed"


def enhance_payload(job_id: str, prompt: str, enhancement, deadline_ms: int) -> dict:
    return {
        "id": f"{job_id}-enhance", "type": "enhance", "reply_key": f"genq:reply:enhance:{job_id}",
        "deadline_ms": deadline_ms,
        "request": {"prompt": prompt, "system_prompt": enhancement.system_prompt, "model": enhancement.model,
                    "max_tokens": enhancement.max_tokens, "temperature": enhancement.temperature,
                    "top_p": enhancement.top_p},
    }


def apply_enhancement(runtime, job: Job | None, request, progress):
    """(request with the final prompt, {original_prompt, final_prompt}); unchanged without a block."""
    block = request.enhancement
    if block is None:
        return request, {}
    progress.set_stage("enhancing")
    deadline = time.time() + block.timeout_s
    payload = enhance_payload(request.job_id, request.prompt, block, int(deadline * 1000))
    runtime.redis.delete(payload["reply_key"])  # a stale answer from an earlier attempt must not count
    queue = Queue(CHAT_QUEUE, connection=runtime.redis, serializer=JSONSerializer)
    queue.enqueue(TASK, payload, job_id=payload["id"], at_front=True, result_ttl=runtime.settings.result_ttl_s,
                  failure_ttl=runtime.settings.failure_ttl_s, description=f"enhance for {request.job_id}",
                  meta={"parent_job": job.id if job is not None else request.job_id})
    if job is not None:
        job.meta["enhance_job"] = payload["id"]
        job.save_meta()
    reply = _wait(runtime, payload["reply_key"], deadline, progress)
    if not reply.get("success"):
        raise EnhancementFailed("enhancement", f"prompt enhancement failed: {reply.get('error', 'no reason given')}")
    final = str(reply.get("enhanced_prompt", "")).strip()
    if not final:
        raise EnhancementFailed("enhancement", "prompt enhancement returned an empty prompt")
    runtime.rule.check(final, "enhancement")
    return request.model_copy(update={"prompt": final}), {"original_prompt": request.prompt,
                                                          "final_prompt": final}


def _wait(runtime, reply_key: str, deadline: float, progress) -> dict:
    while True:
        progress.check_cancel(force=True)
        left = deadline - time.time()
        if left <= 0:
            raise EnhancementFailed("enhancement", "prompt enhancement timed out (is a chat daemon running?)")
        got = runtime.redis.blpop([reply_key], timeout=min(2.0, max(0.1, left)))
        if got is not None:
            return json.loads(got[1])
