"""Pieces every family's request shares: identity of the job, the reference input, enhancement."""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .limits import LIMITS

# Ids become Redis keys and storage path segments: no separators, no dots, bounded.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

Prompt = Annotated[str, Field(max_length=LIMITS.prompt_chars)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]


def check_safe_id(value: str, what: str) -> str:
    if not SAFE_ID.match(value):
        raise ValueError(f"{what} must be 1-64 letters, digits, '-' or '_'")
    return value


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Reference(Frozen):
    """An input image: an https URL or a bare `bucket/path` in the configured Supabase project."""

    source: Annotated[str, Field(min_length=1, max_length=4096)]

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))


class Enhancement(Frozen):
    """Rewrite the prompt with the chat daemon before generating (fully specified by the caller)."""

    model: Literal["qwen_instruct", "qwen_base"] = "qwen_instruct"
    system_prompt: Annotated[str, Field(min_length=1, max_length=LIMITS.prompt_chars)]
    max_tokens: Annotated[int, Field(ge=1, le=1024)] = 200
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 120.0


class JobIdentity(Frozen):
    job_id: str
    user_id: str
    job_type: str

    @field_validator("job_id", "user_id")
    @classmethod
    def _safe(cls, v: str, info) -> str:
        return check_safe_id(v, info.field_name)
