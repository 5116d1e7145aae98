"""Qwen 2.5 text generation (instruct and base) for `chat` and `enhance` jobs.

Each configured model is loaded once in `setup()` and kept resident; `run()` is pure (no I/O) and
thread-safe: with batching on (pipelines/chat_batch.py) concurrent calls are decoded together by one
engine thread, otherwise they take turns through transformers' generate(). Rules that decide what the
model sees are written down in docs/CHAT.md: the prompt rendering (ChatML for instruct, a plain
transcript for base), the context rule (oldest turns dropped first), how each sampling field reaches
`generate()`, and batching.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList,
                          StoppingCriteria, StoppingCriteriaList)

from schemas.chat import ChatMessage, ChatRequest
from schemas.errors import PayloadError

from .accel import AccelOptions
from .chat_batch import BatchEngine, RowRequest, build_engine, row_request
from .chat_options import BatchOptions
from .fp8_linear import check_device, quantise_model
from .loading import pick_device, pick_dtype, resolve_model_path
from .tiny_qwen import build_tiny_qwen

log = logging.getLogger(__name__)

OnToken = Callable[[int, int], None]
# request.model -> the setting that serves it; tiny base and instruct differ by seed only.
MODEL_SETTINGS = {"qwen_instruct": "qwen_instruct_model_path", "qwen_base": "qwen_base_model_path"}
TINY_SEEDS = {"qwen_instruct": 0, "qwen_base": 1}
# Base models get a transcript; this is where a base model would start the next user turn.
BASE_ROLE_NAMES = {"user": "User", "assistant": "Assistant"}
BASE_STOP = "\nUser:"


class ContextTooLong(PayloadError):
    """Even with every droppable turn removed, prompt + max_tokens exceeds the model's context."""

    reason = "context_too_long"


@dataclass(frozen=True)
class ChatResult:
    text: str
    tokens_generated: int
    prompt_tokens: int
    truncated: bool
    model_info: dict[str, Any] = field(default_factory=dict)
    token_ids: tuple[int, ...] = ()  # the generated ids up to (not including) the stop token


@dataclass
class LoadedModel:
    key: str
    name: str
    model: Any
    tokenizer: Any
    context_limit: int
    device: torch.device


@dataclass(frozen=True)
class PreparedPrompt:
    """A request made ready for `generate()`: the seam a batched `run_batch` builds on."""

    request: ChatRequest
    loaded: LoadedModel
    input_ids: list[int]
    dropped_messages: int


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence/frequency penalties over the tokens generated so far (not the prompt):
    logit[t] -= frequency_penalty * count(t) + presence_penalty * (count(t) > 0)."""

    def __init__(self, prompt_length: int, presence_penalty: float, frequency_penalty: float):
        self.prompt_length = prompt_length
        self.presence = presence_penalty
        self.frequency = frequency_penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class TokenProgress(StoppingCriteria):
    """Reports each generated token; an exception from the callback stops generation (cancellation)."""

    def __init__(self, prompt_length: int, max_new_tokens: int, on_token: OnToken):
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.on_token = on_token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.on_token(input_ids.shape[-1] - self.prompt_length, self.max_new_tokens)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def base_transcript(messages: Sequence[ChatMessage]) -> str:
    """The base model's prompt: system turns verbatim, then `User: ...` / `Assistant: ...` turns,
    separated by blank lines, ending with `Assistant:` for the model to continue."""
    parts = [m.content if m.role == "system" else f"{BASE_ROLE_NAMES[m.role]}: {m.content}" for m in messages]
    return "\n\n".join(parts + ["Assistant:"])


class ChatPipeline:
    family = "chat"

    def __init__(self, settings, *, context_limit: int | None = None, warmup_tokens: int | None = None,
                 batching: BatchOptions | None = None):
        self.settings = settings
        self._context_limit = context_limit  # a cap below each model's max_position_embeddings
        self._warmup_tokens = warmup_tokens  # None: the largest prompt that fits the context
        self._models: dict[str, LoadedModel] = {}
        self.batching = batching or BatchOptions.from_env()  # GENQ_CHAT_* (docs/CHAT.md, "Batching")
        self.engine: BatchEngine | None = None
        self._tokenizers = threading.RLock()  # tokenizers are not safe to share between threads
        self._direct = threading.Lock()  # generate() without the engine: one call at a time

    def _configured(self) -> dict[str, str]:
        paths = {key: getattr(self.settings, name, None) for key, name in MODEL_SETTINGS.items()}
        return {key: path for key, path in paths.items() if path}

    @property
    def served_models(self) -> set[str]:
        return set(self._models) if self._models else set(self._configured())

    def setup(self) -> None:
        configured = self._configured()
        if not configured:
            raise RuntimeError("chat: no model configured; set QWEN_INSTRUCT_MODEL_PATH and/or "
                               "QWEN_BASE_MODEL_PATH (a model folder, or \"tiny\")")
        device = pick_device(self.settings)
        # Qwen 2.5 overflows in fp16 (its activations exceed 65504): bf16 on GPU, as Qwen ships it.
        dtype = torch.bfloat16 if device.type == "cuda" else pick_dtype(device)
        for key, path in configured.items():
            folder = resolve_model_path(path, key, self.settings, partial(build_tiny_qwen, seed=TINY_SEEDS[key]),
                                        setting=MODEL_SETTINGS[key].upper())
            tokenizer = AutoTokenizer.from_pretrained(folder)
            tokenizer.padding_side = "left"  # decoder-only batches pad on the left
            started = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=str(device)).eval()
            log.info("chat %s weights on %s in %.1fs", key, device, time.perf_counter() - started)  # cold start
            if self.batching.weights == "fp8":
                check_device(device)
                replaced = quantise_model(model)
                log.info("chat %s: %d linear layers in FP8 (GENQ_CHAT_WEIGHTS=fp8), weights now %.2f GB",
                         key, replaced, sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9)
            limit = min(self._context_limit or 2**62, int(model.config.max_position_embeddings))
            name = f"tiny-{key}" if path == "tiny" else Path(str(folder)).name
            loaded = LoadedModel(key, name, model, tokenizer, limit, device)
            self._warm_up(loaded)
            self._models[key] = loaded
        if self.batching.active(device):
            self.engine = build_engine(self._models, self.batching, cache_dir=AccelOptions.from_env().cache_dir)

    def warmup_shape(self) -> Any:
        """The warm-up's largest prompt, for memory admission before setup() (consumers/gpu.py)."""
        limits = [self._context_limit or 2**62]
        for path in self._configured().values():
            config = Path(str(path)) / "config.json"
            if config.is_file():
                limits.append(int(json.loads(config.read_text()).get("max_position_embeddings", limits[0])))
        tokens = min(self._warmup_tokens or 2**62, *limits)
        return SimpleNamespace(family=self.family, tokens=tokens if tokens < 2**62 else 32768)

    def close(self) -> None:
        """Stop the batching engine (requests still waiting fail with chat_batch.EngineClosed)."""
        if self.engine is not None:
            self.engine.close()

    def _warm_up(self, loaded: LoadedModel) -> None:
        # Prefill the largest prompt once so the peak allocation happens now, not in a job.
        length = max(1, min(self._warmup_tokens or loaded.context_limit, loaded.context_limit) - 2)
        ids = (torch.arange(length, device=loaded.device) % min(1000, len(loaded.tokenizer))).unsqueeze(0)
        config = _with_sampling(copy.deepcopy(loaded.model.generation_config), temperature=0.0, top_p=1.0)
        config.max_new_tokens, config.pad_token_id = 2, self._pad_id(loaded)
        with torch.inference_mode():
            loaded.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)

    # --- prompt -------------------------------------------------------------------------------

    def render(self, request: ChatRequest, messages: Sequence[ChatMessage] | None = None) -> str:
        """The exact prompt text the model sees (before tokenisation)."""
        loaded = self._loaded(request)
        messages = request.messages if messages is None else messages
        if self._prompt_format(request) == "transcript":
            return base_transcript(messages)
        turns = [{"role": m.role, "content": m.content} for m in messages]
        return loaded.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    def _prompt_format(self, request: ChatRequest) -> str:
        # An instruct checkpoint without a chat template is treated like a base model (and says so).
        template = self._loaded(request).tokenizer.chat_template
        return "chatml" if request.model == "qwen_instruct" and template else "transcript"

    def _encode(self, request: ChatRequest, messages: Sequence[ChatMessage]) -> list[int]:
        tokenizer = self._loaded(request).tokenizer
        with self._tokenizers:
            return tokenizer(self.render(request, messages), add_special_tokens=False)["input_ids"]

    def prepare(self, request: ChatRequest) -> PreparedPrompt:
        """Apply the context rule: drop the oldest turns before the last user message until
        prompt + max_new_tokens fits; system turns and the last user turn onward are never dropped."""
        loaded = self._loaded(request)
        budget = loaded.context_limit - request.max_new_tokens
        messages = list(request.messages)
        last_user = max(i for i, m in enumerate(messages) if m.role == "user")
        droppable = [i for i in range(last_user) if messages[i].role != "system"]

        def without(n: int) -> list[ChatMessage]:
            gone = set(droppable[:n])
            return [m for i, m in enumerate(messages) if i not in gone]

        ids = self._encode(request, messages)
        if len(ids) <= budget:
            return PreparedPrompt(request, loaded, ids, 0)
        shortest = self._encode(request, without(len(droppable)))
        if len(shortest) > budget:
            raise ContextTooLong(
                "request.messages",
                f"the system turns and the last user turn need {len(shortest)} tokens; with max_tokens "
                f"{request.max_new_tokens} that exceeds the {loaded.context_limit}-token context")
        # Fewest turns dropped that fits: prompt length shrinks as more turns go, so bisect.
        lo, hi, best = 1, len(droppable), shortest
        while lo < hi:
            mid = (lo + hi) // 2
            candidate = self._encode(request, without(mid))
            if len(candidate) <= budget:
                hi, best = mid, candidate
            else:
                lo = mid + 1
        return PreparedPrompt(request, loaded, best, hi)

    @property
    def device(self) -> torch.device:
        """Where the served models run (the one device picked at setup)."""
        return next(iter(self._models.values())).device

    def move_to(self, device) -> None:
        """Idle weights to CPU and back (memory admission makes room for another daemon's job); the
        engine's KV pool is freed on the way out and allocated again by the next batch."""
        with self.engine.idle() if self.engine is not None else contextlib.nullcontext():
            for loaded in self._models.values():
                loaded.model.to(device)
            if self.engine is not None and torch.device(device).type == "cpu":
                self.engine.release_memory()

    def check_inputs(self, request: ChatRequest) -> None:
        """Refuse what cannot run here before any GPU work: an unserved model, an oversized prompt."""
        self.prepare(request)

    # --- generation ---------------------------------------------------------------------------

    def run(self, request: ChatRequest, on_token: OnToken | None = None) -> ChatResult:
        """Thread-safe. on_token(done, total) reports progress (every token on generate()'s path, at
        each sync point on the engine's); an exception from it stops this request and is raised here."""
        prepared = self.prepare(request)
        config = self._generation_config(prepared)
        row = self._row(prepared, config)
        if row is not None:
            return self._finish(prepared, config, self.engine.submit(row, on_token))
        return self._run_direct(prepared, config, on_token)

    def run_batch(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Decode the requests together (one batch per model when the engine is on); results in order."""
        prepared = [self.prepare(request) for request in requests]
        configs = [self._generation_config(p) for p in prepared]
        rows = [self._row(p, c) for p, c in zip(prepared, configs)]
        tickets = self.engine.submit_together(rows) if self.engine is not None else [None] * len(rows)
        return [self._run_direct(p, c, None) if t is None else self._finish(p, c, t.wait())
                for p, c, t in zip(prepared, configs, tickets)]

    def _row(self, prepared: PreparedPrompt, config) -> RowRequest | None:
        stop = BASE_STOP if prepared.request.model == "qwen_base" else None
        return row_request(self.engine, prepared, config, stop, partial(self._decode, prepared.loaded.tokenizer))

    def _decode(self, tokenizer, ids: list[int], **kwargs) -> str:
        with self._tokenizers:
            return tokenizer.decode(ids, **kwargs)

    def _finish(self, prepared: PreparedPrompt, config, out) -> ChatResult:
        return self._result(prepared, config, out.token_ids, out.decode_s, out.info())

    def _run_direct(self, prepared: PreparedPrompt, config, on_token: OnToken | None) -> ChatResult:
        """transformers' generate(): on the engine thread between batches when there is an engine."""
        started = time.perf_counter()
        if self.engine is not None:
            new_ids = self.engine.run_exclusive(lambda progress: self._generate(prepared, config, progress),
                                                on_token, total=prepared.request.max_new_tokens)
        else:
            with self._direct:
                new_ids = self._generate(prepared, config, on_token)
        return self._result(prepared, config, new_ids, time.perf_counter() - started, {"batch_size": 1})

    def _generate(self, prepared: PreparedPrompt, config, on_token: OnToken | None) -> list[int]:
        request, loaded = prepared.request, prepared.loaded
        prompt_length = len(prepared.input_ids)
        ids = torch.tensor([prepared.input_ids], dtype=torch.long, device=loaded.device)
        processors = LogitsProcessorList()
        if request.presence_penalty or request.frequency_penalty:
            processors.append(OpenAIPenalties(prompt_length, request.presence_penalty, request.frequency_penalty))
        criteria = StoppingCriteriaList()
        if on_token is not None:
            criteria.append(TokenProgress(prompt_length, request.max_new_tokens, on_token))
        # generate() takes no torch.Generator: seed the global RNG right before it. One generate() at a
        # time per process (the engine thread, or the direct lock) keeps this reproducible.
        torch.manual_seed(request.seed)
        with torch.inference_mode():
            out = loaded.model.generate(
                ids, attention_mask=torch.ones_like(ids), generation_config=config,
                logits_processor=processors, stopping_criteria=criteria, tokenizer=loaded.tokenizer)
        return out[0, prompt_length:].tolist()

    def _generation_config(self, prepared: PreparedPrompt):
        """The checkpoint's generation config with every field the request carries applied on top."""
        request, loaded = prepared.request, prepared.loaded
        config = _with_sampling(copy.deepcopy(loaded.model.generation_config), request.temperature, request.top_p)
        config.max_new_tokens = request.max_new_tokens
        config.max_length = None
        config.pad_token_id = self._pad_id(loaded)
        if request.repetition_penalty is not None:
            config.repetition_penalty = request.repetition_penalty
        config.stop_strings = [BASE_STOP] if request.model == "qwen_base" else None
        return config

    def _result(self, prepared: PreparedPrompt, config, new_ids: list[int], seconds: float,
                extra: dict[str, Any]) -> ChatResult:
        request, loaded = prepared.request, prepared.loaded
        stop_ids = set(_as_list(config.eos_token_id)) | {config.pad_token_id}
        kept = []
        for token in new_ids:
            if token in stop_ids:
                break
            kept.append(token)
        text = self._decode(loaded.tokenizer, kept, skip_special_tokens=True)
        if request.model == "qwen_base":
            text = text.split(BASE_STOP)[0]
        finish = "length" if len(kept) >= request.max_new_tokens else "stop"
        info = {
            "model": request.model, "name": loaded.name, "device": str(loaded.device),
            "dtype": str(loaded.model.dtype).removeprefix("torch."), "context_limit": loaded.context_limit,
            "prompt_tokens": len(prepared.input_ids), "truncated": prepared.dropped_messages > 0,
            "dropped_messages": prepared.dropped_messages, "finish_reason": finish,
            "prompt_format": self._prompt_format(request),
            "seed": request.seed, "seed_given": request.seed_given, "do_sample": config.do_sample,
            "temperature": request.temperature, "top_p": config.top_p if config.do_sample else None,
            "top_k": config.top_k if config.do_sample else None,
            "repetition_penalty": config.repetition_penalty, "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty, "max_new_tokens": request.max_new_tokens,
            "generation_time": round(seconds, 3), **extra,
        }
        if request.ignored_fields:
            info["ignored_fields"] = list(request.ignored_fields)
        return ChatResult(text=text.strip(), tokens_generated=len(kept), prompt_tokens=len(prepared.input_ids),
                          truncated=prepared.dropped_messages > 0, model_info=info, token_ids=tuple(kept))

    # --- helpers ------------------------------------------------------------------------------

    def _loaded(self, request: ChatRequest) -> LoadedModel:
        loaded = self._models.get(request.model)
        if loaded is None:
            served = ", ".join(sorted(self._models)) or "none (setup() not run)"
            raise PayloadError("request.model", f"{request.model} is not served by this daemon (serves: {served})")
        return loaded

    @staticmethod
    def _pad_id(loaded: LoadedModel) -> int:
        tokenizer = loaded.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _as_list(tokenizer.eos_token_id)[0]


def _with_sampling(config, temperature: float, top_p: float):
    """Temperature 0 is greedy decoding. generate() refills None fields from the checkpoint's config,
    so greedy gets the values its validation treats as neutral instead (1.0, 1.0, 50)."""
    config.do_sample = temperature > 0
    if config.do_sample:
        config.temperature, config.top_p = temperature, top_p
    else:
        config.temperature, config.top_p, config.top_k = 1.0, 1.0, 50
    return config


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
