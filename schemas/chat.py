"""Chat and prompt-enhancement jobs on `chat_queue` (contract section 5), and their reply bodies.

A job is `{id, type: "chat"|"enhance", reply_key, deadline_ms, request: {...}}` where `request` is
the body today's callers sent to the old HTTP chat worker (payloads/22_chat_request.json). The
answer is pushed to `reply_key` in the old HTTP reply's shape. docs/CHAT.md has the caller's side.
"""
from __future__ import annotations

import random
import re
import time
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator

from .common import Enhancement, Frozen, Seed, check_safe_id
from .errors import PayloadError, from_validation_error
from .limits import LIMITS
from .payload import SEED_RANGE, get_int, get_number, get_path, job_id_of, require_type

CHAT_JOB_TYPES = ("chat", "enhance")
REPLY_KEY = re.compile(r"^[A-Za-z0-9:_-]{1,200}$")
DEFAULT_MAX_TOKENS = {"chat": 512, "enhance": 200}
# What the old worker used for an `enhance` body without a system prompt (a preset, not policy).
ENHANCE_SYSTEM_PROMPT = (
    "You improve prompts for an image and video generator. Rewrite the user's prompt into one richer, "
    "more specific prompt that keeps its meaning. Reply with the rewritten prompt only."
)
# `sfw_mode: true` appends this to the system turn (or adds one): it is the field's whole effect.
SFW_SYSTEM_NOTE = "Keep every reply safe for work: no sexual or explicit content."
# Caller bookkeeping: accepted, type-checked, kept on the request (`caller_metadata()`, for logs and
# rq job meta), never shown to the model: the edge function already folded them into the system turn.
CALLER_FIELDS = ("conversation_id", "context_type", "project_context", "content_tier", "nsfw_enforce",
                 "nsfw_reason")
GENERATION_FIELDS = ("messages", "prompt", "system_prompt", "model", "max_tokens", "temperature", "top_p",
                     "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "sfw_mode")
# Canonical field -> the payload field a caller would fix.
PAYLOAD_FIELDS = {
    "job_id": "id", "job_type": "type", "reply_key": "reply_key", "deadline_ms": "deadline_ms",
    "max_new_tokens": "request.max_tokens", "messages": "request.messages", "model": "request.model",
    **{name: f"request.{name}" for name in GENERATION_FIELDS + CALLER_FIELDS if name != "max_tokens"},
}
# Epoch milliseconds between 2001 and 5138: a deadline in seconds is a caller bug worth naming.
_DEADLINE_MIN, _DEADLINE_MAX = 10**12, 10**14

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
ShortText = Annotated[str, Field(max_length=200)]


class ChatMessage(Frozen):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=LIMITS.chat_max_input_chars)]


class ChatRequest(Frozen):
    family: Literal["chat"] = "chat"
    job_id: str
    job_type: Literal["chat", "enhance"]
    reply_key: str
    deadline_ms: Annotated[int, Field(ge=_DEADLINE_MIN, lt=_DEADLINE_MAX)]
    model: Literal["qwen_instruct", "qwen_base"] = "qwen_instruct"
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=LIMITS.chat_max_messages)]
    max_new_tokens: Annotated[int, Field(ge=1, le=LIMITS.chat_max_new_tokens)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7  # 0 = greedy
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None  # transformers' multiplicative one
    seed: Seed
    seed_given: bool = True
    sfw_mode: bool = False
    conversation_id: ShortText | None = None
    context_type: ShortText | None = None
    project_context: Any = None
    content_tier: ShortText | None = None
    nsfw_enforce: bool | None = None
    nsfw_reason: ShortText | None = None
    # Request keys genq does not know: not used, but reported back in model_info (never silent).
    ignored_fields: tuple[str, ...] = ()

    @field_validator("job_id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        return check_safe_id(v, "id")

    @field_validator("reply_key")
    @classmethod
    def _safe_key(cls, v: str) -> str:
        if not REPLY_KEY.match(v):
            raise ValueError("must be 1-200 letters, digits, ':', '_' or '-'")
        return v

    @field_validator("deadline_ms", mode="before")
    @classmethod
    def _epoch_ms(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and 0 < v < _DEADLINE_MIN:
            raise ValueError("must be epoch milliseconds (this looks like seconds)")
        return v

    @field_validator("messages")
    @classmethod
    def _conversation(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        total = sum(len(m.content) for m in v)
        if total > LIMITS.chat_max_input_chars:
            raise ValueError(f"{total} characters in all, more than {LIMITS.chat_max_input_chars}")
        if not any(m.role == "user" for m in v):
            raise ValueError("need at least one user message")
        return v

    def expired(self, now_ms: int | None = None) -> bool:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return now >= self.deadline_ms

    def caller_metadata(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in CALLER_FIELDS if getattr(self, name) is not None}


def _message_list(job: dict[str, Any], job_type: str, sfw_mode: bool) -> list[ChatMessage]:
    messages = get_path(job, "request.messages", list)
    prompt = get_path(job, "request.prompt", str)
    system_prompt = get_path(job, "request.system_prompt", str)
    if messages is not None and (prompt is not None or system_prompt is not None):
        raise PayloadError("request.prompt", "send either messages or prompt (+ system_prompt), not both")
    if messages is None:
        if prompt is None:
            raise PayloadError("request.messages", "missing (or send request.prompt)")
        given = [("request.system_prompt", "system", system_prompt), ("request.prompt", "user", prompt)]
    else:
        if len(messages) > LIMITS.chat_max_messages:  # before looking into a hostile list
            raise PayloadError("request.messages",
                               f"at most {LIMITS.chat_max_messages} messages (got {len(messages)})")
        given = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise PayloadError(f"request.messages.{i}", "must be an object {role, content}")
            given.append((f"request.messages.{i}", message.get("role"), message.get("content")))
    out = []
    for field, role, content in given:
        if content is None and field == "request.system_prompt":
            continue
        try:
            out.append(ChatMessage(role=role, content=content))
        except ValidationError as err:
            named = from_validation_error(err, prefix=field)
            # prompt/system_prompt are one string each: name them, not our {role, content} wrapper
            raise (named if messages is not None else PayloadError(field, named.message)) from None
    if job_type == "enhance" and not any(m.role == "system" for m in out):
        out.insert(0, ChatMessage(role="system", content=ENHANCE_SYSTEM_PROMPT))
    if sfw_mode:
        if out and out[0].role == "system":
            out[0] = ChatMessage(role="system", content=f"{out[0].content}\n\n{SFW_SYSTEM_NOTE}")
        else:
            out.insert(0, ChatMessage(role="system", content=SFW_SYSTEM_NOTE))
    return out


def _seed(job: dict[str, Any]) -> tuple[int, bool]:
    seed = get_int(job, "request.seed")
    if seed is None:
        return random.randint(*SEED_RANGE), False
    return seed, True


def adapt_chat(job: dict[str, Any]) -> ChatRequest:
    """A `chat_queue` job -> a fully specified ChatRequest (defaults only where a field is absent)."""
    job_type = require_type(job, CHAT_JOB_TYPES)
    job_id = job_id_of(job)
    if job_id is None:
        raise PayloadError("id", "missing (a string of 1-64 characters)")
    reply_key = get_path(job, "reply_key", str)
    if reply_key is None:
        raise PayloadError("reply_key", "missing")
    deadline_ms = get_int(job, "deadline_ms")
    if deadline_ms is None:
        raise PayloadError("deadline_ms", "missing (epoch milliseconds)")
    request = get_path(job, "request", dict)
    if request is None:
        raise PayloadError("request", "missing")
    sfw_mode = get_path(job, "request.sfw_mode", bool, False)
    model = get_path(job, "request.model", str)
    seed, seed_given = _seed(job)
    values: dict[str, Any] = dict(
        job_id=job_id, job_type=job_type, reply_key=reply_key, deadline_ms=deadline_ms,
        model="qwen_base" if model == "qwen_base" else "qwen_instruct",
        messages=_message_list(job, job_type, sfw_mode),
        max_new_tokens=get_int(job, "request.max_tokens", DEFAULT_MAX_TOKENS[job_type]),
        temperature=get_number(job, "request.temperature", 0.7),
        top_p=get_number(job, "request.top_p", 0.9),
        presence_penalty=get_number(job, "request.presence_penalty", 0.0),
        frequency_penalty=get_number(job, "request.frequency_penalty", 0.0),
        repetition_penalty=get_number(job, "request.repetition_penalty"),
        seed=seed, seed_given=seed_given, sfw_mode=sfw_mode,
        conversation_id=get_path(job, "request.conversation_id", str),
        context_type=get_path(job, "request.context_type", str),
        project_context=get_path(job, "request.project_context", (dict, list, str)),
        content_tier=get_path(job, "request.content_tier", str),
        nsfw_enforce=get_path(job, "request.nsfw_enforce", bool),
        nsfw_reason=get_path(job, "request.nsfw_reason", str),
        ignored_fields=tuple(sorted(k for k in request if k not in GENERATION_FIELDS + CALLER_FIELDS))[:20],
    )
    try:
        return ChatRequest(**values)
    except ValidationError as err:
        raise from_validation_error(err, PAYLOAD_FIELDS) from None


def enhance_request_from(enhancement: Enhancement, prompt: str, job_id: str, reply_key: str,
                         deadline_ms: int) -> ChatRequest:
    """The `enhancement` block of an image/video job as an `enhance` job for the chat daemon."""
    names = {"max_new_tokens": "enhancement.max_tokens", "temperature": "enhancement.temperature",
             "top_p": "enhancement.top_p", "messages": "prompt", "job_id": "id"}
    try:
        return ChatRequest(
            job_id=job_id, job_type="enhance", reply_key=reply_key, deadline_ms=deadline_ms,
            model=enhancement.model,
            messages=[ChatMessage(role="system", content=enhancement.system_prompt),
                      ChatMessage(role="user", content=prompt)],
            max_new_tokens=enhancement.max_tokens, temperature=enhancement.temperature,
            top_p=enhancement.top_p, seed=random.randint(*SEED_RANGE), seed_given=False,
        )
    except ValidationError as err:
        raise from_validation_error(err, names) from None


def reply_target(job: Any) -> tuple[str | None, str | None]:
    """(job id, reply key) of a job, usable even when the rest of it is invalid; None where unusable."""
    if not isinstance(job, dict):
        return None, None
    key = job.get("reply_key")
    return job_id_of(job), key if isinstance(key, str) and REPLY_KEY.match(key) else None


def chat_reply(request: ChatRequest, *, text: str, generation_time: float, tokens_generated: int,
               model_info: dict[str, Any]) -> dict[str, Any]:
    """The old HTTP worker's success body: `response` for chat, `enhanced_prompt` for enhance."""
    key = "enhanced_prompt" if request.job_type == "enhance" else "response"
    return {"success": True, key: text, "generation_time": round(generation_time, 3),
            "tokens_generated": tokens_generated, "model_info": model_info, "job_id": request.job_id}


def chat_failure(job_id: str | None, error: str, reason: str = "failed",
                 generation_time: float = 0.0) -> dict[str, Any]:
    """The failure body: `reason` is machine-readable (invalid_payload, expired, cancelled, ...)."""
    return {"success": False, "error": error[:2000], "reason": reason,
            "generation_time": round(generation_time, 3), "tokens_generated": 0, "job_id": job_id}
