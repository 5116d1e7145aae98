"""The chat batching engine's settings (GENQ_CHAT_*, docs/CHAT.md "Batching").

Kept apart from the engine, and free of torch, so that memory.py (imported by the orchestrator,
which never loads torch) reads the same KV-pool size the engine allocates.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from schemas.settings import COMPILE_MODES

if TYPE_CHECKING:
    import torch

    from .decoder import FastDecoder

log = logging.getLogger(__name__)

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
# Decode attention (pipelines/decoder.py): "packed" fused SDPA on the key/value heads, "matmul" the same
# as matrix products, "auto" matmul for one row and packed for more, "repeat" the cache repeated per
# query head as transformers does. Here, not in decoder.py, so that settings parse without torch.
ATTENTION_MODES = ("auto", "packed", "matmul", "repeat")


# --- settings ---------------------------------------------------------------------------------


def _flag(env: Mapping[str, str], name: str, default: bool | None) -> bool | None:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "auto"):
        return default
    if raw in _TRUE | _FALSE:
        return raw in _TRUE
    raise ValueError(f"{name}={raw!r}: use 1/0, true/false, on/off or auto")


def _number(env: Mapping[str, str], name: str, default, kind=int, low=1):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < low:
        raise ValueError(f"{name}={raw!r}: must be >= {low}")
    return value


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    raw = env.get(name, "").strip()
    if raw and raw not in allowed:
        raise ValueError(f"{name}={raw!r}: use one of {', '.join(allowed)}")
    return raw or default


def _shapes(env: Mapping[str, str], name: str) -> tuple[tuple[int, int], ...] | None:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw in ("none", "0", "off"):
        return ()
    try:
        return tuple((int(b), int(n)) for b, n in (part.split("x") for part in raw.replace(" ", "").split(",")))
    except ValueError:
        raise ValueError(f"{name}={raw!r}: use shapes like 1x1024,16x1024 (rows x cache tokens)") from None


@dataclass(frozen=True)
class BatchOptions:
    """The chat engine's settings (environment: `from_env`; documented in docs/CHAT.md, "Batching")."""

    enabled: bool | None = None  # None: on when the chat models run on CUDA
    max_batch: int = 16
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16)
    window_ms: float = 5.0
    cache_tokens: int = 65536  # the KV pool: rows x cache length of any batch shape (memory.py counts it)
    min_cache_len: int = 512
    sync_tokens: int = 16
    prefill_tokens: int = 16384
    compile: bool | None = None  # None: on CUDA
    compile_mode: str | None = "reduce-overhead"
    tune_single_row: bool = True
    # ATTENTION_MODES. "auto": +7% one-row tok/s on an H200 with greedy steps agreeing with the uncached
    # forward as often as "packed" does there (docs/PERFORMANCE.md); batches run "packed" either way.
    attention: str = "auto"
    warmup: tuple[tuple[int, int], ...] | None = None  # None: 1x2048, max_batch x 1024, max_batch x 4096

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "BatchOptions":
        env = os.environ if environ is None else environ
        buckets = env.get("GENQ_CHAT_BATCH_BUCKETS", "").strip()
        try:
            parsed = tuple(int(b) for b in buckets.split(",")) if buckets else cls.batch_buckets
        except ValueError:
            raise ValueError(f"GENQ_CHAT_BATCH_BUCKETS={buckets!r}: use a list like 1,2,4,8,16") from None
        mode = _choice(env, "GENQ_CHAT_COMPILE_MODE", COMPILE_MODES, "")
        return cls(
            enabled=_flag(env, "GENQ_CHAT_BATCH", None),
            max_batch=_number(env, "GENQ_CHAT_MAX_BATCH", cls.max_batch),
            batch_buckets=parsed,
            window_ms=_number(env, "GENQ_CHAT_BATCH_WINDOW_MS", cls.window_ms, float, 0),
            cache_tokens=_number(env, "GENQ_CHAT_CACHE_TOKENS", cls.cache_tokens),
            min_cache_len=_number(env, "GENQ_CHAT_MIN_CACHE_LEN", cls.min_cache_len),
            sync_tokens=_number(env, "GENQ_CHAT_SYNC_TOKENS", cls.sync_tokens),
            prefill_tokens=_number(env, "GENQ_CHAT_PREFILL_TOKENS", cls.prefill_tokens),
            compile=_flag(env, "GENQ_CHAT_COMPILE", None),
            compile_mode=(None if mode == "default" else mode) if mode else cls.compile_mode,
            tune_single_row=bool(_flag(env, "GENQ_CHAT_TUNE_SINGLE_ROW", True)),
            attention=_choice(env, "GENQ_CHAT_ATTENTION", ATTENTION_MODES, cls.attention),
            warmup=_shapes(env, "GENQ_CHAT_WARMUP"),
        )

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
