"""Process settings, read once from the environment (pydantic-settings).

Secrets are `SecretStr`: their repr is `'**********'`, so printing or logging a
Settings object never leaks them.
"""
from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# torch.compile's modes, as GENQ_COMPILE_MODE and GENQ_CHAT_COMPILE_MODE accept them ("default": inductor's default)
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    # --- connections -----------------------------------------------------------------------
    redis_url: SecretStr = Field(SecretStr("redis://127.0.0.1:6379/0"), validation_alias="REDIS_URL")
    supabase_url: str | None = Field(None, validation_alias="SUPABASE_URL")
    supabase_service_role_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_SERVICE_KEY")
    )
    job_callback_url: str | None = Field(None, validation_alias="JOB_CALLBACK_URL")
    job_callback_secret: SecretStr | None = Field(None, validation_alias="JOB_CALLBACK_SECRET")

    # --- storage ---------------------------------------------------------------------------
    storage_backend: Literal["auto", "supabase", "local"] = Field("auto", validation_alias="GENQ_STORAGE")
    storage_bucket: str = Field("workspace-temp", validation_alias="GENQ_STORAGE_BUCKET")
    output_dir: Path = Field(Path("outputs"), validation_alias="GENQ_OUTPUT_DIR")
    # zlib level of the stored PNGs, lossless at every level: 1 encodes a 1024px image 6x faster
    # than 6 for files ~6% larger; 0 stores the rows uncompressed (docs/DAEMON.md).
    png_compress_level: int = Field(1, ge=0, le=9, validation_alias="GENQ_PNG_COMPRESS_LEVEL")

    # --- models ----------------------------------------------------------------------------
    # A diffusers folder, a single .safetensors file, or "tiny" (random weights, for tests/demo).
    sdxl_model_path: str | None = Field(None, validation_alias="SDXL_MODEL_PATH")
    wan_model_path: str | None = Field(None, validation_alias="WAN_MODEL_PATH")
    wan_vace_model_path: str | None = Field(None, validation_alias="WAN_VACE_MODEL_PATH")
    qwen_instruct_model_path: str | None = Field(None, validation_alias="QWEN_INSTRUCT_MODEL_PATH")
    qwen_base_model_path: str | None = Field(None, validation_alias="QWEN_BASE_MODEL_PATH")
    tiny_cache_dir: Path = Field(Path.home() / ".cache" / "genq" / "tiny", validation_alias="GENQ_TINY_CACHE")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", validation_alias="GENQ_DEVICE")
    gpu_index: int = Field(0, ge=0, validation_alias="GENQ_GPU_INDEX")

    # --- daemon ----------------------------------------------------------------------------
    worker_host: str = Field(default_factory=socket.gethostname, validation_alias="GENQ_HOST")
    max_attempts: int = Field(3, ge=1, le=20, validation_alias="GENQ_MAX_ATTEMPTS")
    # rq workers in one daemon process, sharing its model; unset: the family's default (consumers/families.py)
    worker_threads: int | None = Field(None, ge=1, le=64, validation_alias="GENQ_WORKER_THREADS")
    job_timeout_s: int = Field(3600, ge=10, validation_alias="GENQ_JOB_TIMEOUT_S")
    # A started job whose daemon stops heart-beating for this long is put back in play.
    job_heartbeat_ttl_s: int = Field(45, ge=5, le=600, validation_alias="GENQ_JOB_HEARTBEAT_TTL_S")
    maintenance_interval_s: int = Field(15, ge=1, le=600, validation_alias="GENQ_MAINTENANCE_INTERVAL_S")
    result_ttl_s: int = Field(7 * 86400, ge=60, validation_alias="GENQ_RESULT_TTL_S")
    failure_ttl_s: int = Field(14 * 86400, ge=60, validation_alias="GENQ_FAILURE_TTL_S")
    max_payload_bytes: int = Field(256 * 1024, ge=1024, validation_alias="GENQ_MAX_PAYLOAD_BYTES")
    chat_reply_ttl_s: int = Field(3600, ge=10, validation_alias="GENQ_CHAT_REPLY_TTL_S")
    progress_min_interval_s: float = Field(3.0, ge=0.0, validation_alias="GENQ_PROGRESS_MIN_INTERVAL_S")

    # --- reference fetching ----------------------------------------------------------------
    fetch_allowed_hosts: list[str] = Field(default_factory=list, validation_alias="GENQ_FETCH_ALLOWED_HOSTS")
    fetch_allow_private: bool = Field(False, validation_alias="GENQ_FETCH_ALLOW_PRIVATE")
    fetch_max_bytes: int = Field(20 * 1024 * 1024, ge=1024, validation_alias="GENQ_FETCH_MAX_BYTES")
    fetch_max_pixels: int = Field(40_000_000, ge=1024, validation_alias="GENQ_FETCH_MAX_PIXELS")
    fetch_timeout_s: float = Field(20.0, gt=0, validation_alias="GENQ_FETCH_TIMEOUT_S")

    # --- callbacks -------------------------------------------------------------------------
    callback_timeout_s: float = Field(15.0, gt=0, validation_alias="GENQ_CALLBACK_TIMEOUT_S")
    callback_max_age_s: int = Field(3 * 86400, ge=60, validation_alias="GENQ_CALLBACK_MAX_AGE_S")

    # --- content rule: extra terms make the built-in rule stricter, never weaker -----------
    policy_extra_minor_terms: list[str] = Field(default_factory=list, validation_alias="GENQ_POLICY_EXTRA_MINOR_TERMS")
    policy_extra_sexual_terms: list[str] = Field(default_factory=list, validation_alias="GENQ_POLICY_EXTRA_SEXUAL_TERMS")

    @model_validator(mode="after")
    def _derive(self) -> "Settings":
        if self.supabase_url:
            self.supabase_url = self.supabase_url.rstrip("/")
        if self.job_callback_url is None and self.supabase_url:
            self.job_callback_url = f"{self.supabase_url}/functions/v1/job-callback"
        if self.storage_backend == "auto":
            self.storage_backend = "supabase" if self.supabase_url else "local"
        if self.storage_backend == "supabase" and not (self.supabase_url and self.supabase_service_role_key):
            raise ValueError("GENQ_STORAGE=supabase needs SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY")
        return self

    def model_path(self, family: str) -> str | None:
        return {
            "sdxl": self.sdxl_model_path,
            "wan": self.wan_model_path or self.wan_vace_model_path,
            "chat": self.qwen_instruct_model_path or self.qwen_base_model_path,
        }[family]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
