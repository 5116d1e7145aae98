"""Bounds that protect the GPU, configurable from the environment (GENQ_LIMIT_*).

Request models declare each bound next to its field by reading it from `LIMITS`, so the
number that rejects a payload is the number an operator set. Read once at import.
"""
from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Limits(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENQ_LIMIT_", extra="ignore")

    prompt_chars: int = Field(4000, ge=1)
    sdxl_max_pixels: int = Field(1536 * 1536, ge=64 * 64)
    sdxl_max_side: int = Field(2048, ge=64)
    sdxl_max_steps: int = Field(100, ge=1)
    sdxl_max_guidance: float = Field(30.0, gt=0)
    wan_max_steps: int = Field(100, ge=1)
    wan_max_frames: int = Field(161, ge=1)
    wan_max_pixels: int = Field(1280 * 720, ge=16 * 16)
    wan_max_guidance: float = Field(30.0, gt=0)
    chat_max_new_tokens: int = Field(2048, ge=1)
    chat_max_messages: int = Field(200, ge=1)
    chat_max_input_chars: int = Field(64_000, ge=1)


LIMITS = Limits()
