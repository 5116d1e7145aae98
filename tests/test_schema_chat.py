"""chat_queue jobs -> ChatRequest, and the reply bodies (contract section 5)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from schemas.chat import (CHAT_JOB_TYPES, ENHANCE_SYSTEM_PROMPT, SFW_SYSTEM_NOTE, ChatRequest, adapt_chat,
                          chat_failure, chat_reply, enhance_request_from, reply_target)
from schemas.common import Enhancement
from schemas.errors import PayloadError
from schemas.limits import LIMITS

PAYLOAD = json.loads((Path("/work/shared/contract/payloads") / "22_chat_request.json").read_text())
DEADLINE = 1_900_000_000_000


def job(body: dict | None = None, **top) -> dict:
    wrapped = {"id": "chat-1", "type": "chat", "reply_key": "genq:reply:chat-1", "deadline_ms": DEADLINE,
               "request": PAYLOAD if body is None else body}
    wrapped.update(top)
    return wrapped


def test_payload_22_as_a_queue_job():
    req = adapt_chat(job())
    assert (req.family, req.job_type, req.job_id, req.reply_key) == ("chat", "chat", "chat-1", "genq:reply:chat-1")
    assert req.model == "qwen_instruct"
    assert [m.role for m in req.messages] == ["system", "user", "assistant", "user"]
    assert req.messages[-1].content == "Noir detective, set in 1940s Los Angeles."
    assert (req.temperature, req.top_p) == (0.95, 0.95)
    assert (req.presence_penalty, req.frequency_penalty) == (0.6, 0.25)
    assert req.max_new_tokens == 512 and req.repetition_penalty is None
    assert not req.seed_given and req.seed > 0  # a random seed, recorded on the request
    assert req.caller_metadata() == {
        "conversation_id": "cccccccc-0000-4000-8000-000000000001", "context_type": "general",
        "content_tier": "nsfw", "nsfw_enforce": True, "nsfw_reason": "verified_nsfw_default"}
    assert req.ignored_fields == ()


@pytest.mark.parametrize("model, expected", [("qwen_base", "qwen_base"), ("qwen_instruct", "qwen_instruct"),
                                             ("gpt-4", "qwen_instruct"), (None, "qwen_instruct")])
def test_model_choice(model, expected):
    assert adapt_chat(job({**PAYLOAD, "model": model})).model == expected


def test_given_fields_are_honoured():
    req = adapt_chat(job({**PAYLOAD, "max_tokens": 64, "seed": 42, "repetition_penalty": 1.1, "temperature": 0}))
    assert (req.max_new_tokens, req.seed, req.seed_given, req.repetition_penalty, req.temperature) == (
        64, 42, True, 1.1, 0.0)


@pytest.mark.parametrize("change, field", [
    ({"max_tokens": "many"}, "request.max_tokens"),
    ({"max_tokens": 0}, "request.max_tokens"),
    ({"max_tokens": LIMITS.chat_max_new_tokens + 1}, "request.max_tokens"),
    ({"max_tokens": 10.5}, "request.max_tokens"),
    ({"temperature": True}, "request.temperature"),
    ({"temperature": 2.5}, "request.temperature"),
    ({"top_p": 0}, "request.top_p"),
    ({"presence_penalty": -3}, "request.presence_penalty"),
    ({"frequency_penalty": "high"}, "request.frequency_penalty"),
    ({"repetition_penalty": 0}, "request.repetition_penalty"),
    ({"seed": -1}, "request.seed"),
    ({"sfw_mode": "yes"}, "request.sfw_mode"),
    ({"model": 3}, "request.model"),
    ({"conversation_id": 12}, "request.conversation_id"),
    ({"nsfw_enforce": "true"}, "request.nsfw_enforce"),
    ({"messages": "hello"}, "request.messages"),
    ({"messages": []}, "request.messages"),
    ({"messages": ["hello"]}, "request.messages.0"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "request.messages.0.role"),
    ({"messages": [{"role": "user", "content": None}]}, "request.messages.0.content"),
    ({"messages": [{"role": "system", "content": "only a system turn"}]}, "request.messages"),
    ({"messages": [{"role": "user", "content": "x"}] * (LIMITS.chat_max_messages + 1)}, "request.messages"),
    ({"messages": [{"role": "user", "content": "x" * (LIMITS.chat_max_input_chars // 2 + 1)}] * 2},
     "request.messages"),
])
def test_wrong_request_fields_are_named(change, field):
    with pytest.raises(PayloadError) as err:
        adapt_chat(job({**PAYLOAD, **change}))
    assert err.value.field == field


@pytest.mark.parametrize("change, field", [
    ({"type": "image"}, "type"), ({"type": None}, "type"), ({"id": None}, "id"), ({"id": "../x"}, "id"),
    ({"reply_key": None}, "reply_key"), ({"reply_key": "a b"}, "reply_key"), ({"reply_key": "k" * 201}, "reply_key"),
    ({"deadline_ms": None}, "deadline_ms"), ({"deadline_ms": "tomorrow"}, "deadline_ms"),
    ({"deadline_ms": True}, "deadline_ms"), ({"request": None}, "request"), ({"request": "hi"}, "request"),
])
def test_wrong_job_fields_are_named(change, field):
    with pytest.raises(PayloadError) as err:
        adapt_chat(job(**change))
    assert err.value.field == field


def test_deadline_parsing():
    assert adapt_chat(job(deadline_ms=1.8e12)).deadline_ms == 1_800_000_000_000
    with pytest.raises(PayloadError, match="seconds") as err:
        adapt_chat(job(deadline_ms=1_800_000_000))  # a caller sending seconds is told so
    assert err.value.field == "deadline_ms"
    req = adapt_chat(job(deadline_ms=int(time.time() * 1000) + 45_000))
    assert not req.expired()
    assert req.expired(now_ms=req.deadline_ms)


def test_enhance_with_prompt_and_system_prompt():
    req = adapt_chat(job({"prompt": "a fox", "system_prompt": "Improve it.", "max_tokens": 50}, type="enhance"))
    assert req.job_type == "enhance" and req.max_new_tokens == 50
    assert [(m.role, m.content) for m in req.messages] == [("system", "Improve it."), ("user", "a fox")]


def test_enhance_defaults():
    req = adapt_chat(job({"prompt": "a fox"}, type="enhance"))
    assert req.max_new_tokens == 200
    assert [(m.role, m.content) for m in req.messages] == [("system", ENHANCE_SYSTEM_PROMPT), ("user", "a fox")]
    messages = [{"role": "user", "content": "a fox"}]
    assert adapt_chat(job({"messages": messages}, type="enhance")).messages[0].content == ENHANCE_SYSTEM_PROMPT


def test_prompt_shape_errors():
    with pytest.raises(PayloadError) as err:
        adapt_chat(job({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, type="enhance"))
    assert err.value.field == "request.prompt"
    with pytest.raises(PayloadError) as err:
        adapt_chat(job({"prompt": 5}, type="enhance"))
    assert err.value.field == "request.prompt"
    with pytest.raises(PayloadError) as err:
        adapt_chat(job({"prompt": "x" * (LIMITS.chat_max_input_chars + 1)}, type="enhance"))
    assert err.value.field == "request.prompt"
    with pytest.raises(PayloadError) as err:
        adapt_chat(job({"max_tokens": 5}, type="enhance"))
    assert err.value.field == "request.messages"


def test_sfw_mode_adds_the_note_to_the_system_turn():
    req = adapt_chat(job({**PAYLOAD, "sfw_mode": True}))
    assert req.messages[0].role == "system" and req.messages[0].content.endswith(SFW_SYSTEM_NOTE)
    assert len(req.messages) == len(PAYLOAD["messages"])
    bare = adapt_chat(job({"messages": [{"role": "user", "content": "hi"}], "sfw_mode": True}))
    assert [(m.role, m.content) for m in bare.messages] == [("system", SFW_SYSTEM_NOTE), ("user", "hi")]


def test_unknown_request_fields_are_reported_not_silently_dropped():
    req = adapt_chat(job({**PAYLOAD, "stream": True, "stop": ["\n"]}))
    assert req.ignored_fields == ("stop", "stream")


def test_reply_target_survives_an_invalid_job():
    assert reply_target(job({"messages": "broken"})) == ("chat-1", "genq:reply:chat-1")
    assert reply_target(job(reply_key="no spaces allowed")) == ("chat-1", None)
    assert reply_target(["not", "a", "job"]) == (None, None)


def test_reply_bodies_keep_the_old_http_shape():
    chat = adapt_chat(job())
    body = chat_reply(chat, text="Rain.", generation_time=1.23456, tokens_generated=3, model_info={"model": "m"})
    assert body == {"success": True, "response": "Rain.", "generation_time": 1.235, "tokens_generated": 3,
                    "model_info": {"model": "m"}, "job_id": "chat-1"}
    enhance = adapt_chat(job({"prompt": "a fox"}, type="enhance"))
    assert chat_reply(enhance, text="A red fox.", generation_time=0, tokens_generated=4,
                      model_info={})["enhanced_prompt"] == "A red fox."
    failure = chat_failure("chat-1", "deadline passed before the job ran", reason="deadline_passed")
    assert failure["success"] is False and failure["error"] and failure["reason"] == "deadline_passed"
    json.dumps(body), json.dumps(failure)


def test_enhance_request_from_an_enhancement_block():
    block = Enhancement(model="qwen_base", system_prompt="Make it vivid.", max_tokens=80, temperature=0.3)
    req = enhance_request_from(block, "a fox", "job-9-enhance", "genq:reply:enhance:job-9", DEADLINE)
    assert isinstance(req, ChatRequest) and req.job_type == "enhance" and req.model == "qwen_base"
    assert [(m.role, m.content) for m in req.messages] == [("system", "Make it vivid."), ("user", "a fox")]
    assert (req.max_new_tokens, req.temperature, req.top_p) == (80, 0.3, 0.9)
    with pytest.raises(PayloadError) as err:
        enhance_request_from(block, "a fox", "job/9", "k", DEADLINE)
    assert err.value.field == "id"


def test_job_types():
    assert CHAT_JOB_TYPES == ("chat", "enhance")


def test_the_enhance_job_generation_daemons_enqueue_adapts():
    from consumers.enhance import enhance_payload

    block = Enhancement(system_prompt="Make it vivid.", max_tokens=60)
    req = adapt_chat(enhance_payload("job-9", "a fox", block, DEADLINE))
    assert req.job_type == "enhance" and req.max_new_tokens == 60 and req.reply_key.endswith("job-9")
    assert [(m.role, m.content) for m in req.messages] == [("system", "Make it vivid."), ("user", "a fox")]
