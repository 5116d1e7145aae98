"""The chat daemon end to end on the tiny Qwen: answers on the reply key in the old HTTP shape, expired
deadlines, cancellation, and enhancement feeding an SDXL job as two linked rq jobs."""
from __future__ import annotations

import json
import time
import uuid

from rq.job import Job
from rq.serializers import JSONSerializer

from consumers.cancel import request_cancel
from tests.conftest import PAYLOADS
from tests.integration import blpop_wait, encode, load_payload, stack  # noqa: F401


def chat_job(job_type: str = "chat", deadline_s: float = 600, **request) -> dict:
    body = json.loads((PAYLOADS / "22_chat_request.json").read_text()) if job_type == "chat" else {}
    body.update(request)
    return {"id": str(uuid.uuid4()), "type": job_type, "reply_key": f"chat:reply:{uuid.uuid4()}",
            "deadline_ms": int((time.time() + deadline_s) * 1000), "request": body}


def reply(stack, job: dict, timeout: float = 300) -> dict:
    got = blpop_wait(stack.r, job["reply_key"], timeout)
    assert got is not None, "no reply"
    return json.loads(got)


def test_chat_and_enhance_answers_arrive_on_the_reply_key(stack):
    chat = chat_job(max_tokens=12, seed=3)
    enhance = chat_job("enhance", prompt="a cat on a roof", max_tokens=10)
    expired = chat_job(deadline_s=-5, max_tokens=5)
    for job in (chat, enhance, expired):
        stack.r.rpush("chat_queue", json.dumps(job))
    stack.run_burst("chat")
    answer = reply(stack, chat)
    assert answer["success"] is True and isinstance(answer["response"], str)
    assert 0 < answer["tokens_generated"] <= 12 and answer["generation_time"] >= 0
    assert answer["model_info"]["model"] == "qwen_instruct" and answer["model_info"]["seed"] == 3
    answer = reply(stack, enhance)
    assert answer["success"] is True and "enhanced_prompt" in answer and "response" not in answer
    answer = reply(stack, expired)
    assert answer == {**answer, "success": False, "reason": "deadline_passed", "tokens_generated": 0}
    job = Job.fetch(expired["id"], connection=stack.r, serializer=JSONSerializer)
    assert job.get_status() == "failed" and job.retries_left == 0  # answered without running


def test_cancelling_a_queued_chat_answers_cancelled_without_running(stack):
    queued = chat_job(max_tokens=5)
    after = chat_job(max_tokens=5)
    request_cancel(stack.r, queued["id"])
    stack.r.rpush("chat_queue", json.dumps(queued), json.dumps(after))
    stack.run_burst("chat")
    answer = reply(stack, queued)
    assert answer["success"] is False and answer["reason"] == "cancelled"
    assert Job.fetch(queued["id"], connection=stack.r, serializer=JSONSerializer).get_status() == "canceled"
    assert reply(stack, after)["success"] is True


def test_a_running_chat_stops_within_a_few_tokens(r, tiny_cache):
    """The daemon's own plumbing (Progress + the cancel key in Redis) around the real tiny Qwen."""
    from types import SimpleNamespace

    from consumers.outcomes import Cancelled
    from consumers.progress import Progress
    from pipelines.chat import ChatPipeline
    from schemas.chat import adapt_chat
    from schemas.settings import Settings

    settings = Settings(QWEN_INSTRUCT_MODEL_PATH="tiny", GENQ_TINY_CACHE=str(tiny_cache), GENQ_DEVICE="cpu")
    pipeline = ChatPipeline(settings)
    pipeline.setup()
    request = adapt_chat(chat_job(max_tokens=420, temperature=0, messages=[{"role": "user", "content": "hi"}]))
    runtime = SimpleNamespace(redis=r, settings=settings, worker_id="chat-test")
    progress = Progress(runtime, None, request.job_id, callbacks=False)
    seen = []

    def on_token(done: int, total: int) -> None:
        seen.append(done)
        if done == 5:
            request_cancel(r, request.job_id)  # what an edge function does, mid-generation
        progress.on_step(done, total)

    try:
        pipeline.run(request, on_token=on_token)
    except Cancelled:
        pass
    else:
        raise AssertionError(f"generation ran to the end ({len(seen)} tokens) despite the cancel key")
    assert 5 < seen[-1] < 420  # 79 prompt tokens + 420 fit the tiny model's 512


ENHANCEMENT = {"model": "qwen_instruct", "system_prompt": "Rewrite the prompt with more detail.",
               "max_tokens": 8, "timeout_s": 300}


def test_enhancement_then_generation_as_two_linked_jobs(stack):
    job = load_payload("01_sdxl_fast_1_image.json", config__resolution="64x64", config__num_inference_steps=2,
                       enhancement=ENHANCEMENT)
    stack.r.rpush("sdxl_queue", encode(job, 0))
    chat = stack.daemon("chat")
    sdxl = stack.daemon("sdxl")
    body = stack.final_callback(job["id"])
    assert body["status"] == "completed", body
    assert body["metadata"]["original_prompt"] == job["prompt"]
    final = body["metadata"]["final_prompt"]
    assert final and final != job["prompt"]
    generation = Job.fetch(job["id"], connection=stack.r, serializer=JSONSerializer)
    enhance = Job.fetch(generation.get_meta()["enhance_job"], connection=stack.r, serializer=JSONSerializer)
    assert enhance.get_meta()["parent_job"] == job["id"] and enhance.get_status() == "finished"
    assert enhance.origin == "chat_queue"
    for d in (chat, sdxl):
        d.terminate()
        assert d.wait(60) == 0


def test_a_failed_enhancement_fails_the_generation_job_with_a_reason(stack):
    job = load_payload("01_sdxl_fast_1_image.json", config__resolution="64x64", config__num_inference_steps=2,
                       enhancement={**ENHANCEMENT, "model": "qwen_base"})  # not served by this chat daemon
    stack.r.rpush("sdxl_queue", encode(job, 0))
    chat = stack.daemon("chat")
    sdxl = stack.daemon("sdxl")
    body = stack.final_callback(job["id"])
    assert body["status"] == "failed" and body["metadata"]["reason"] == "enhancement_failed"
    assert "qwen_base" in body["error_message"]
    assert stack.stored(f"{job['user_id']}/{job['id']}/") == {}
    for d in (chat, sdxl):
        d.terminate()
        assert d.wait(60) == 0


def test_waiting_chats_are_decoded_together_and_answer_as_they_would_alone(stack):
    """Four chats waiting at once go through the batching engine as one batch of 4 (its window
    closes when the batch is full), and each gets exactly the answer it gets decoded alone."""
    engine = {"GENQ_CHAT_BATCH": "1", "GENQ_CHAT_MAX_BATCH": "4"}

    def jobs() -> list[dict]:
        return [chat_job(max_tokens=6 + 2 * i, temperature=0, seed=i) for i in range(4)]

    alone = jobs()
    for job in alone:
        stack.r.rpush("chat_queue", json.dumps(job))
    stack.run_burst("chat", GENQ_WORKER_THREADS="1", GENQ_CHAT_BATCH_WINDOW_MS="0", **engine)
    together = jobs()
    for job in together:
        stack.r.rpush("chat_queue", json.dumps(job))
    stack.run_burst("chat", GENQ_WORKER_THREADS="4", GENQ_CHAT_BATCH_WINDOW_MS="600000", **engine)
    for single, batched in zip(alone, together):
        a, b = reply(stack, single), reply(stack, batched)
        assert a["success"] and b["success"], (a, b)
        assert a["model_info"]["batch_size"] == 1 and b["model_info"]["batch_size"] == 4
        assert (b["response"], b["tokens_generated"]) == (a["response"], a["tokens_generated"])
