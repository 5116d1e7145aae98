"""Batched decoding for the chat daemon: concurrent `ChatPipeline.run()` calls share one GPU decode.

`BatchEngine` owns one background thread that does all GPU work of the chat models. Callers (the
daemon's worker threads) `submit()` a prepared row and block until their own result; the engine
gathers waiting rows for a few milliseconds (`GENQ_CHAT_BATCH_WINDOW_MS`), takes up to
`GENQ_CHAT_MAX_BATCH` rows of one model, and decodes them together through `decoder.FastDecoder`.
At every sync point (every `GENQ_CHAT_SYNC_TOKENS` tokens) it hands each caller its progress, drops
rows whose caller cancelled, ends rows that met the base model's stop string, and lets waiting rows
of the same model join the running batch when the cache has room. Callbacks (`on_token`) run in the
caller's own thread, never in the engine's. A failure of a batch reaches every caller in it; the
engine then serves the next batch. Rows the engine cannot take (longer than its cache, or a
generation option it does not implement) run through transformers' generate() on the engine thread,
between batches (`run_exclusive`). docs/CHAT.md, "Batching", is the operator's view.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from .accel import configure_compile_cache, cudagraph_thread_state
from .decode_batch import DecodeBatch, DecodeRow, Sampling
from .decoder import FastDecoder, UnsupportedModel
from .chat_options import BatchOptions

log = logging.getLogger(__name__)

OnToken = Callable[[int, int], None]
# generate() options FastDecoder does not implement, with the values that leave them off: a checkpoint
# (or request) setting any other value is served by generate() instead.
_NEUTRAL: dict[str, tuple] = {
    "guidance_scale": (None, 1, 1.0), "sequence_bias": (None,), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "min_length": (None, 0), "min_new_tokens": (None, 0), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "remove_invalid_values": (None, False),
    "exponential_decay_length_penalty": (None,), "begin_suppress_tokens": (None,), "top_h": (None,),
    "min_p": (None,), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
    "watermarking_config": (None,), "renormalize_logits": (None, False), "num_beams": (None, 1),
    "num_return_sequences": (None, 1), "max_time": (None,), "penalty_alpha": (None,), "dola_layers": (None,),
}


class EngineClosed(RuntimeError):
    """The engine was closed (or stopped) before this request finished."""


# --- requests and results -----------------------------------------------------------------------


@dataclass(frozen=True)
class EngineModel:
    decoder: FastDecoder
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    suppress_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class RowRequest:
    model: str
    row: DecodeRow
    # Host-side stop rule: given the tokens so far, how many to keep if the row must end (None: go on).
    stop: Callable[[list[int]], int | None] | None = None


@dataclass(frozen=True)
class RowResult:
    token_ids: list[int]  # generated ids, through the end-of-text id or stop string (as generate() returns)
    batch_size: int  # the most rows decoding together while this one did (itself included)
    shape: tuple[int, int]  # (rows, cache length) of the decode graph it ran in
    queued_s: float
    ttft_s: float  # admitted -> first token known on the host
    decode_s: float  # admitted -> finished

    def info(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "batch_shape": f"{self.shape[0]}x{self.shape[1]}",
                "queue_time": round(self.queued_s, 3), "time_to_first_token": round(self.ttft_s, 3)}


class _TaskCancelled(Exception):
    pass


class Ticket:
    """One submitted row (or exclusive task) and its caller's side: progress, result, cancellation."""

    def __init__(self, engine: "BatchEngine", *, request: RowRequest | None = None,
                 task: Callable[[OnToken], Any] | None = None, total: int = 0):
        self.engine, self.request, self.task, self.total = engine, request, task, total
        self.submitted = time.perf_counter()
        self.admitted = self.first = 0.0
        self.batch_size = 0
        self._cond = threading.Condition()
        self._progress = 0
        self._finished = False
        self._result: Any = None
        self._error: BaseException | None = None
        self.cancelled: BaseException | None = None

    # engine side
    def post(self, produced: int) -> None:
        with self._cond:
            if produced != self._progress:
                self._progress = produced
                self._cond.notify_all()

    def finish(self, result: Any) -> None:
        with self._cond:
            if not self._finished:
                self._finished, self._result = True, result
                self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if not self._finished:
                self._finished, self._error = True, error
                self._cond.notify_all()

    @property
    def finished(self) -> bool:
        return self._finished

    # caller side
    def cancel(self, reason: BaseException) -> None:
        """The caller gives up (its on_token raised): the engine drops the row at its next sync point."""
        self.cancelled = reason
        self.engine._forget(self)

    def wait(self, on_token: OnToken | None = None) -> Any:
        """Block until the result; on_token(done, total) runs here, in the caller's thread, as progress
        arrives. An exception from on_token cancels the row and is raised to the caller."""
        reported = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._finished or self._progress != reported, timeout=1.0)
                progress, finished, result, error = self._progress, self._finished, self._result, self._error
            if progress != reported:
                reported = progress
                if on_token is not None:
                    try:
                        on_token(progress, self.total)
                    except BaseException as exc:
                        self.cancel(exc)
                        raise
            if finished:
                if error is not None:
                    raise error
                return result
            if not self.engine.alive():  # liveness only: the wait above is woken by the engine
                raise EngineClosed("the chat batch engine stopped before this request finished")


# --- the engine ---------------------------------------------------------------------------------


class BatchEngine:
    def __init__(self, models: Mapping[str, EngineModel], options: BatchOptions | None = None,
                 *, name: str = "genq-chat-batch"):
        self.models = dict(models)
        self.options = options or BatchOptions()
        self.name = name
        self.stats = collections.Counter()
        self._cond = threading.Condition()
        self._queue: collections.deque[Ticket] = collections.deque()
        self._closed = False
        self._paused = 0
        self._gpu = threading.Lock()  # held by the engine thread while it works
        self._thread: threading.Thread | None = None

    # --- caller API ---------------------------------------------------------------------------

    def start(self) -> "BatchEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def fits(self, model: str, prompt_tokens: int, max_new_tokens: int) -> bool:
        entry = self.models.get(model)
        return entry is not None and entry.decoder.shape_for(1, prompt_tokens + max_new_tokens) is not None

    def submit_async(self, request: RowRequest) -> Ticket:
        if not self.fits(request.model, len(request.row.prompt), request.row.max_new_tokens):
            raise ValueError(f"{request.model}: a row of {len(request.row.prompt)} + {request.row.max_new_tokens} "
                             "tokens does not fit the engine's cache")
        ticket = Ticket(self, request=request, total=request.row.max_new_tokens)
        self._enqueue(ticket)
        return ticket

    def submit_together(self, requests: Sequence[RowRequest | None]) -> list[Ticket | None]:
        """Queue rows so that they start in one batch (None entries stay None)."""
        with self.paused():
            return [None if r is None else self.submit_async(r) for r in requests]

    def submit(self, request: RowRequest, on_token: OnToken | None = None) -> RowResult:
        """Decode one row with whatever else is waiting; blocks the calling thread until its result."""
        return self.submit_async(request).wait(on_token)

    def run_exclusive(self, fn: Callable[[OnToken], Any], on_token: OnToken | None = None, total: int = 0) -> Any:
        """Run fn(progress) on the engine thread between batches (fallback generate(), warm-up).
        fn reports with progress(done, total); it raises there once the caller has cancelled."""
        ticket = Ticket(self, task=fn, total=total)
        self._enqueue(ticket)
        return ticket.wait(on_token)

    @contextlib.contextmanager
    def paused(self):
        """No batch starts and no row joins while inside: rows submitted meanwhile start together."""
        with self._cond:
            self._paused += 1
        try:
            yield self
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()

    def wait_pending(self, count: int, timeout: float = 60.0) -> bool:
        """Until `count` requests are queued (tests and run_batch use it with `paused()`)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._queue) >= count, timeout)

    @contextlib.contextmanager
    def idle(self):
        """Hold the engine between batches (weights move while inside)."""
        with self._gpu:
            yield

    def release_memory(self) -> None:
        for entry in self.models.values():
            entry.decoder.release_memory()

    def warm_up(self) -> dict[str, float]:
        """Allocate each model's KV pool and compile the configured shapes, on the engine thread."""
        spent = {}
        for key, entry in self.models.items():
            self.run_exclusive(lambda _: entry.decoder.pool())
            for rows, length in self.options.warm_shapes(entry.decoder):
                seconds = self.run_exclusive(lambda _: entry.decoder.warm(rows, length))
                spent[f"{key}:{rows}x{length}"] = round(seconds, 1)
                log.info("chat batching: %s decode shape %dx%d ready in %.1fs", key, rows, length, seconds)
        return spent

    def close(self, timeout: float = 60.0) -> None:
        """Stop: queued requests fail with EngineClosed now, running ones at the next sync point."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for ticket in pending:
            ticket.fail(EngineClosed("the chat batch engine closed before this request ran"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # --- engine thread ------------------------------------------------------------------------

    def _enqueue(self, ticket: Ticket) -> None:
        with self._cond:
            if self._closed or not self.alive():
                raise EngineClosed("the chat batch engine is not running")
            self._queue.append(ticket)
            self._cond.notify_all()

    def _forget(self, ticket: Ticket) -> None:
        with self._cond:
            with contextlib.suppress(ValueError):
                self._queue.remove(ticket)

    def _main(self) -> None:
        device = next(iter(self.models.values())).decoder.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
            cudagraph_thread_state()  # a second engine's thread (bench/qwen.py --weights fp8) replays too
        try:
            with torch.inference_mode():
                while (work := self._next()) is not None:
                    with self._gpu:
                        if isinstance(work, Ticket):
                            self._run_task(work)
                        else:
                            self._run_rows(*work)
        except BaseException as exc:  # only non-Exception errors get here; nothing may hang on us
            log.exception("chat batch engine stopped")
            with self._cond:
                self._closed = True
                pending = list(self._queue)
                self._queue.clear()
            for ticket in pending:
                ticket.fail(EngineClosed(f"the chat batch engine stopped: {exc!r}"))
            raise

    def _next(self) -> Ticket | tuple[str, list[Ticket]] | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._queue and not self._paused:
                    head = self._queue[0]
                    if head.task is not None:
                        return self._queue.popleft()
                    left = self._window_left(head)
                    if left > 0:
                        self._cond.wait(left)  # the gather window: more rows may come
                        continue
                    taken = self._take(head.request.model)
                    if taken:
                        return head.request.model, taken
                    self._queue.popleft().fail(ValueError("this row fits none of the engine's shapes"))
                else:
                    self._cond.wait()

    def _window_left(self, head: Ticket) -> float:
        same = sum(1 for t in self._queue if t.request is not None and t.request.model == head.request.model)
        if same >= self.models[head.request.model].decoder.max_batch:
            return 0.0
        return head.submitted + self.options.window_ms / 1000 - time.perf_counter()

    def _take(self, model: str) -> list[Ticket]:
        """Rows of `model` in arrival order, as many as fit one shape; the rest keep their place."""
        decoder = self.models[model].decoder
        taken: list[Ticket] = []
        kept: collections.deque[Ticket] = collections.deque()
        blocked = False
        for ticket in self._queue:
            if not blocked and ticket.task is not None:
                blocked = True  # nothing overtakes an exclusive task
            if blocked or ticket.request.model != model or len(taken) == decoder.max_batch:
                kept.append(ticket)
                continue
            if decoder.shape_for(len(taken) + 1, _need(taken + [ticket])) is None:
                blocked = True
                kept.append(ticket)
                continue
            taken.append(ticket)
        self._queue = kept
        return taken

    def _run_task(self, ticket: Ticket) -> None:
        if ticket.cancelled is not None:
            return

        def progress(done: int, total: int | None = None) -> None:
            if ticket.cancelled is not None:
                raise _TaskCancelled()
            ticket.post(done)
        ticket.admitted = time.perf_counter()
        try:
            result = ticket.task(progress)
        except _TaskCancelled:
            return
        except BaseException as exc:
            ticket.fail(exc)
            if not isinstance(exc, Exception):
                raise
            return
        ticket.finish(result)

    def _run_rows(self, model: str, tickets: list[Ticket]) -> None:
        entry = self.models[model]
        decoder = entry.decoder
        everyone = list(tickets)
        owners: dict[int, Ticket] = {}
        self.stats["batches"] += 1
        try:
            shape = decoder.shape_for(len(tickets), _need(tickets))
            batch = DecodeBatch(decoder, *shape, eos_token_ids=entry.eos_token_ids, pad_token_id=entry.pad_token_id,
                                suppress_token_ids=entry.suppress_token_ids)
            self._admit(batch, list(enumerate(tickets)), owners)
            while owners:
                # The next steps are queued first: the host's bookkeeping below overlaps them on the GPU
                # (a row stopped or cancelled there decodes one chunk of padding at most).
                launched = batch.launch()
                self._collect(batch, owners)
                if self._closed:
                    for ticket in owners.values():
                        ticket.fail(EngineClosed("the chat batch engine closed while this request ran"))
                    return
                joining = self._joiners(batch, model) if owners else []
                if joining:
                    everyone += [t for _, t in joining]
                    self._admit(batch, joining, owners)  # its sync also reads the queued steps
                elif launched:
                    batch.sync()
        except Exception as exc:  # a failed batch (CUDA OOM, a bug): every caller in it hears of it
            log.exception("chat batch of %d rows failed", len(everyone))
            self.stats["failed_batches"] += 1
            for ticket in everyone:
                ticket.fail(exc)
            with contextlib.suppress(Exception):
                decoder.reset()
        except BaseException as exc:
            for ticket in everyone:
                ticket.fail(EngineClosed(f"the chat batch engine stopped: {exc!r}"))
            raise

    def _admit(self, batch: DecodeBatch, pairs: Sequence[tuple[int, Ticket]], owners: dict[int, Ticket]) -> None:
        if not pairs:
            return
        now = time.perf_counter()
        for slot, ticket in pairs:
            owners[slot], ticket.admitted = ticket, now
        batch.admit([(slot, ticket.request.row) for slot, ticket in pairs])
        batch.sync()  # first tokens on the host: time to first token, and rows that ended at once
        now = time.perf_counter()
        for _, ticket in pairs:
            ticket.first = now
        self.stats["rows"] += len(pairs)

    def _collect(self, batch: DecodeBatch, owners: dict[int, Ticket]) -> None:
        """What the last sync read: progress to every caller; finished, stopped and cancelled rows leave."""
        together = len(owners)
        now = time.perf_counter()
        for slot, ticket in list(owners.items()):
            ticket.batch_size = max(ticket.batch_size, together)
            state = batch.slots[slot]
            if ticket.cancelled is not None:  # its caller already raised; the slot is free again
                batch.release(slot)
                del owners[slot]
                continue
            tokens, done = state.tokens, state.done
            if ticket.request.stop is not None:
                keep = ticket.request.stop(tokens)
                if keep is not None:
                    tokens, done = tokens[:keep], True
            ticket.post(len(tokens))
            if done:
                ticket.finish(RowResult(list(tokens), ticket.batch_size, (batch.B, batch.L),
                                        ticket.admitted - ticket.submitted, ticket.first - ticket.admitted,
                                        now - ticket.admitted))
                batch.release(slot)
                del owners[slot]

    def _joiners(self, batch: DecodeBatch, model: str) -> list[tuple[int, Ticket]]:
        """Waiting rows that can join the running batch now, in arrival order (the first that cannot
        stops the others, so nothing waits forever behind rows that keep joining)."""
        picks: list[tuple[int, Ticket]] = []
        with self._cond:
            if self._paused:
                return picks
            free = batch.free_slots()
            for ticket in self._queue:
                if ticket.task is not None or ticket.request.model != model or not batch.can_join(ticket.request.row):
                    break
                if not free:
                    grown = batch.grow_target()
                    if grown is None:
                        break
                    free = list(range(batch.B, grown))
                    batch.grow(grown)
                picks.append((free.pop(0), ticket))
            for _, ticket in picks:
                self._queue.remove(ticket)
        return picks


def _need(tickets: Sequence[Ticket]) -> int:
    """Cache columns a batch of these rows needs: the longest prompt plus the longest output."""
    return max(len(t.request.row.prompt) for t in tickets) + max(t.request.row.max_new_tokens for t in tickets)


# --- glue for ChatPipeline ----------------------------------------------------------------------


def sampling_for(config, request) -> Sampling | None:
    """The row's rule from the generation config ChatPipeline builds for generate(); None when the
    config asks for something FastDecoder does not implement (that request keeps generate())."""
    for name, neutral in _NEUTRAL.items():
        if getattr(config, name, None) not in neutral:
            return None
    sample = bool(config.do_sample)
    return Sampling(
        temperature=float(config.temperature) if sample else 0.0,
        top_p=float(config.top_p) if sample and config.top_p is not None else 1.0,
        top_k=int(config.top_k or 0) if sample else 0,
        repetition_penalty=float(config.repetition_penalty or 1.0),
        presence_penalty=float(request.presence_penalty), frequency_penalty=float(request.frequency_penalty),
        seed=int(request.seed))


def first_stop(decode: Callable[[list[int]], str], ids: list[int], stop: str, prompt: Sequence[int] = ()) -> int | None:
    """How many generated tokens to keep when `stop` first appears, or None. As generate()'s
    StopStringCriteria: the row ends on the token that completes it, and an occurrence may begin in the
    prompt's last tokens but must reach into the output."""
    tail = list(prompt[-len(stop.encode()):]) if prompt else []
    head = len(decode(tail)) if tail else 0

    def hit(count: int) -> bool:
        return decode(tail + list(ids[:count])).find(stop, max(0, head - len(stop) + 1)) >= 0
    if not ids or not hit(len(ids)):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def row_request(engine: BatchEngine | None, prepared, config, stop_text: str | None,
                decode: Callable[[list[int]], str]) -> RowRequest | None:
    """The engine's form of a ChatPipeline request (PreparedPrompt + its generation config); None when
    the engine cannot take it (no engine, too long for its cache, an option it lacks)."""
    request = prepared.request
    if engine is None or not engine.fits(request.model, len(prepared.input_ids), request.max_new_tokens):
        return None
    sampling = sampling_for(config, request)
    if sampling is None:
        return None
    stop = None
    if stop_text:
        prompt = list(prepared.input_ids)

        def stop(ids: list[int]) -> int | None:
            return first_stop(decode, ids, stop_text, prompt)
    return RowRequest(request.model, DecodeRow(prepared.input_ids, request.max_new_tokens, sampling), stop)


def build_engine(models: Mapping[str, Any], options: BatchOptions, *,
                 cache_dir: str | None = None) -> BatchEngine | None:
    """One engine for the loaded chat models (each with .model, .tokenizer, .context_limit); models of
    another architecture keep generate(). Starts the thread, allocates the pools, warms the shapes."""
    entries = {}
    for key, loaded in models.items():
        try:
            decoder = options.decoder(loaded.model, loaded.context_limit)
        except UnsupportedModel as exc:
            log.warning("chat %s: no batched decoding (%s); its jobs use generate()", key, exc)
            continue
        config, tokenizer = loaded.model.generation_config, loaded.tokenizer
        eos = config.eos_token_id
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or (0,))[0]
        entries[key] = EngineModel(decoder, eos, pad, tuple(config.suppress_tokens or ()))
        owner = next(iter(entries.values())).decoder
        if owner is not decoder and decoder.share_pool(owner):
            log.info("chat %s shares the KV pool of the first model", key)
    if not entries:
        return None
    if cache_dir and any(e.decoder.compiled for e in entries.values()):
        configure_compile_cache(cache_dir)
    engine = BatchEngine(entries, options).start()
    started = time.perf_counter()
    try:
        spent = engine.warm_up()
    except Exception:  # the daemon still serves, through generate(); the log says why it is slower
        log.exception("chat batching OFF: the engine's warm-up failed; every job uses generate()")
        engine.close()
        engine.release_memory()
        return None
    log.info("chat batching on: %s; warm-up %.1fs %s", {k: f"pool {e.decoder.pool_tokens} tokens" for k, e in
                                                       entries.items()}, time.perf_counter() - started, spent)
    return engine
