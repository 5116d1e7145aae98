"""The chat batching engine's settings (GENQ_CHAT_*, docs/CHAT.md "Batching").

Kept apart from the engine, and free of torch, so that memory.py (imported by the orchestrator,
which never loads torch) reads the same KV-pool size the engine allocates.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Literal, Mapping, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.settings import CompileMode

if TYPE_CHECKING:
    import torch

    from .decoder import FastDecoder

log = logging.getLogger(__name__)

# Decode attention (pipelines/decoder.py): "packed" fused SDPA on the key/value heads, "matmul" the same
# as matrix products, "split" the same split over the cache length (Triton kernels on CUDA,
# pipelines/split_kv_attention.py), "auto" split on CUDA, else matmul for one row and packed for more,
# "repeat" the cache repeated per query head as transformers does. Here, not in decoder.py, so that
# settings parse without torch.
AttentionMode = Literal["auto", "packed", "matmul", "split", "repeat"]
ATTENTION_MODES: tuple[str, ...] = get_args(AttentionMode)
# The served models' linear layers: "as-loaded" (bf16 on CUDA), or "fp8", e4m3 with a scale per output
# feature (pipelines/fp8_linear.py): half the bytes, an approximation of the weights (docs/CHAT.md).
WeightsMode = Literal["as-loaded", "fp8"]
# Switches that also take "auto" (or nothing): their default, which for the first two depends on the device
_AUTO = {"GENQ_CHAT_BATCH", "GENQ_CHAT_COMPILE", "GENQ_CHAT_TUNE_SINGLE_ROW", "GENQ_CHAT_WARMUP"}


class BatchOptions(BaseModel):
    """The chat engine's settings (environment: `from_env`; documented in docs/CHAT.md, "Batching").
    A bad value is refused naming its variable; booleans take 1/0, true/false, yes/no, on/off."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    enabled: bool | None = Field(None, validation_alias="GENQ_CHAT_BATCH")  # None: on when the models run on CUDA
    max_batch: int = Field(16, ge=1, validation_alias="GENQ_CHAT_MAX_BATCH")
    batch_buckets: tuple[int, ...] = Field((1, 2, 4, 8, 16), min_length=1, validation_alias="GENQ_CHAT_BATCH_BUCKETS")
    window_ms: float = Field(5.0, ge=0, validation_alias="GENQ_CHAT_BATCH_WINDOW_MS")
    # the KV pool: rows x cache length of any batch shape (memory.py counts it)
    cache_tokens: int = Field(65536, ge=1, validation_alias="GENQ_CHAT_CACHE_TOKENS")
    min_cache_len: int = Field(512, ge=1, validation_alias="GENQ_CHAT_MIN_CACHE_LEN")
    sync_tokens: int = Field(16, ge=1, validation_alias="GENQ_CHAT_SYNC_TOKENS")
    prefill_tokens: int = Field(16384, ge=1, validation_alias="GENQ_CHAT_PREFILL_TOKENS")
    compile: bool | None = Field(None, validation_alias="GENQ_CHAT_COMPILE")  # None: on CUDA
    # None: inductor's default mode (GENQ_CHAT_COMPILE_MODE=default)
    compile_mode: CompileMode | None = Field("reduce-overhead", validation_alias="GENQ_CHAT_COMPILE_MODE")
    tune_single_row: bool = Field(True, validation_alias="GENQ_CHAT_TUNE_SINGLE_ROW")
    # "auto": +7% one-row tok/s on an H200 with greedy steps agreeing with the uncached forward as often
    # as "packed" does there (docs/PERFORMANCE.md); batches run "packed" either way.
    attention: AttentionMode = Field("auto", validation_alias="GENQ_CHAT_ATTENTION")
    weights: WeightsMode = Field("as-loaded", validation_alias="GENQ_CHAT_WEIGHTS")
    # None: 1x2048, max_batch x 1024, max_batch x 4096; () ("none"): no warm-up
    warmup: tuple[tuple[int, int], ...] | None = Field(None, validation_alias="GENQ_CHAT_WARMUP")

    @field_validator("batch_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value):
        return tuple(part.strip() for part in value.split(",")) if isinstance(value, str) else value

    @field_validator("compile_mode", mode="before")
    @classmethod
    def _default_mode(cls, value):
        return None if value == "default" else value

    @field_validator("warmup", mode="before")
    @classmethod
    def _parse_shapes(cls, value):
        if not isinstance(value, str):
            return value
        if value.lower() in ("none", "0", "off"):
            return ()
        parts = value.lower().replace(" ", "").split(",")
        try:
            return tuple((int(rows), int(length)) for rows, length in (part.split("x") for part in parts))
        except ValueError:
            raise ValueError("use shapes like 1x1024,16x1024 (rows x cache tokens), or none") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "BatchOptions":
        env = os.environ if environ is None else environ
        given = {name: value.strip() for name, value in env.items() if name.startswith("GENQ_CHAT_")}
        return cls.model_validate({name: value for name, value in given.items()
                                   if value and not (name in _AUTO and value.lower() == "auto")})

    def active(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.enabled is None else self.enabled

    def decoder(self, model, context_limit: int) -> FastDecoder:
        from .decoder import FastDecoder

        return FastDecoder(
            model, context_limit, max_batch=self.max_batch, batch_buckets=self.batch_buckets,
            min_len=self.min_cache_len, pool_tokens=self.cache_tokens, compile=self.compile is not False,
            compile_mode=self.compile_mode, tune_single_row=self.tune_single_row, sync_every=self.sync_tokens,
            prefill_tokens=self.prefill_tokens, attention=self.attention)

    def warm_shapes(self, decoder: FastDecoder) -> list[tuple[int, int]]:
        """The shapes to compile at start: the configured ones, rounded up to buckets that fit."""
        if not decoder.compiled:
            return []
        # By default one 1-row shape and two full-batch ones: with the 1.5x rule of shape_for they serve
        # every batch up to 4096 cache tokens without compiling in a job.
        wanted = self.warmup if self.warmup is not None else (
            (1, 2048), (decoder.max_batch, 1024), (decoder.max_batch, 4096))
        shapes = []
        for rows, length in wanted:
            shape = next(((b, n) for b in decoder.batch_buckets if b >= rows for n in decoder.length_buckets
                          if n >= length and decoder.allowed(b, n)), None)
            if shape is None:
                log.warning("chat batching: warm-up shape %dx%d fits no bucket of the %d-token pool; skipped",
                            rows, length, decoder.pool_tokens)
            elif shape not in shapes:
                shapes.append(shape)
        return shapes
