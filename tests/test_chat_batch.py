"""Batched chat decoding (pipelines/chat_batch.py) on tiny random Qwen2 models, on CPU.

Every request is checked against transformers' generate() (the pipeline with batching off): greedy
output must be equal token for token, whatever else shares the batch. Requests are made to share a
batch with `engine.paused()` + `engine.wait_pending()`, never with sleeps.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from pipelines import chat
from pipelines.decode_batch import DecodeRow, Sampling
from pipelines.decoder import FastDecoder
from pipelines.chat import ChatPipeline
from pipelines.chat_batch import BatchEngine, BatchOptions, EngineClosed, EngineModel, RowRequest, first_stop
from pipelines.tiny_qwen import SPECIAL_TOKENS, build_tiny_qwen
from schemas.chat import ChatMessage, ChatRequest
from schemas.settings import Settings

DEADLINE = 1_900_000_000_000
# Small enough to exercise the buckets on a 512-token model: 8 rows x 128 or 1 row x 512.
OPTIONS = BatchOptions(enabled=True, max_batch=8, batch_buckets=(1, 2, 4, 8), window_ms=0, cache_tokens=1024,
                       min_cache_len=32, sync_tokens=4)


def request(text: str = "Tell me a story.", *, turns: int = 0, **fields) -> ChatRequest:
    messages = [ChatMessage(role="system", content="You are a noir storyteller.")]
    for i in range(turns):
        messages += [ChatMessage(role="user", content=f"question {i} about the fox"),
                     ChatMessage(role="assistant", content=f"answer {i}: the dog sleeps")]
    messages.append(ChatMessage(role="user", content=text))
    values = dict(job_id="chat-1", job_type="chat", reply_key="genq:reply:chat-1", deadline_ms=DEADLINE,
                  messages=messages, max_new_tokens=12, seed=7, temperature=0.0)
    return ChatRequest(**{**values, **fields})


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen")
    endless = build_tiny_qwen(root / "endless", seed=2)  # never emits an end-of-text id
    config = json.loads((endless / "generation_config.json").read_text())
    from transformers import AutoTokenizer
    config["suppress_tokens"] = AutoTokenizer.from_pretrained(endless).convert_tokens_to_ids(list(SPECIAL_TOKENS))
    (endless / "generation_config.json").write_text(json.dumps(config))
    return {"instruct": build_tiny_qwen(root / "instruct", seed=0), "base": build_tiny_qwen(root / "base", seed=1),
            "endless": endless, "root": root}


def pipeline(folders, batching: BatchOptions, **paths) -> ChatPipeline:
    settings = Settings(GENQ_DEVICE="cpu", GENQ_TINY_CACHE=str(folders["root"] / "tiny"), GENQ_STORAGE="local",
                        **{k: str(folders[v]) for k, v in paths.items()})
    pipe = ChatPipeline(settings, batching=batching)
    pipe.setup()
    return pipe


@pytest.fixture(scope="module")
def pipes(folders):
    both = dict(QWEN_INSTRUCT_MODEL_PATH="instruct", QWEN_BASE_MODEL_PATH="base")
    made = {"direct": pipeline(folders, BatchOptions(enabled=False), **both),
            "batched": pipeline(folders, OPTIONS, **both),
            "endless_direct": pipeline(folders, BatchOptions(enabled=False), QWEN_INSTRUCT_MODEL_PATH="endless"),
            "endless": pipeline(folders, OPTIONS, QWEN_INSTRUCT_MODEL_PATH="endless")}
    yield made
    for pipe in made.values():
        pipe.close()


def together(pipe: ChatPipeline, requests, on_tokens=None) -> list:
    """Run requests from one thread each, all queued before the engine may start them."""
    out: list = [None] * len(requests)
    on_tokens = on_tokens or [None] * len(requests)

    def call(i: int) -> None:
        try:
            out[i] = pipe.run(requests[i], on_token=on_tokens[i])
        except BaseException as exc:  # the test looks at it
            out[i] = exc
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    with pipe.engine.paused():
        for t in threads:
            t.start()
        assert pipe.engine.wait_pending(len(requests))
    for t in threads:
        t.join(120)
    return out


MIXED = [request(max_new_tokens=12), request("Hi", turns=2, max_new_tokens=20),
         request("A story about a fox?", turns=1, max_new_tokens=7, presence_penalty=2.0, frequency_penalty=0.5),
         request(model="qwen_base", max_new_tokens=16, repetition_penalty=1.3),
         request("Enhance this prompt: portrait of a woman", model="qwen_base", turns=3, max_new_tokens=9)]


def test_engine_is_off_on_cpu_unless_asked(pipes):
    assert pipes["direct"].engine is None and BatchOptions().active(torch.device("cpu")) is False
    assert BatchOptions().active(torch.device("cuda")) and pipes["batched"].engine is not None


def test_greedy_batched_equals_generate_token_for_token(pipes):
    want = [pipes["direct"].run(r) for r in MIXED]
    got = together(pipes["batched"], MIXED)
    for w, g in zip(want, got):
        assert not isinstance(g, BaseException), g
        assert g.token_ids == w.token_ids and g.text == w.text and g.tokens_generated == w.tokens_generated
        assert g.model_info["finish_reason"] == w.model_info["finish_reason"]
    # instruct and base rows are decoded in separate batches, each model's rows together
    assert [g.model_info["batch_size"] for g in got] == [3, 3, 3, 2, 2]
    assert got[0].model_info["batch_shape"] == "4x256" and w.model_info["batch_size"] == 1


def test_run_batch_decodes_together(pipes):
    want = [pipes["direct"].run(r) for r in MIXED[:3]]
    got = pipes["batched"].run_batch(MIXED[:3])
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert {g.model_info["batch_size"] for g in got} == {3}


def test_a_seed_samples_the_same_alone_or_in_a_batch(pipes):
    pipe = pipes["batched"]
    sampled = request(temperature=1.0, top_p=0.9, seed=11, max_new_tokens=16)
    alone = pipe.run(sampled)
    crowd = together(pipe, [request("Hi", turns=2, temperature=1.2, seed=s, max_new_tokens=10) for s in (1, 2)]
                     + [sampled, request(temperature=0.0)])
    assert crowd[2].model_info["batch_size"] == 4 and alone.model_info["batch_size"] == 1
    assert crowd[2].token_ids == alone.token_ids
    other = pipe.run(request(temperature=1.0, top_p=0.9, seed=12, max_new_tokens=16))
    assert other.token_ids != alone.token_ids and alone.model_info["do_sample"] is True


def test_presence_penalty_is_honoured_per_row(pipes):
    plain, penalised = together(pipes["batched"], [request(max_new_tokens=24),
                                                  request(max_new_tokens=24, presence_penalty=2.0)])
    assert penalised.token_ids != plain.token_ids
    assert len(set(penalised.token_ids)) == len(penalised.token_ids)  # as with generate(): no repeats


def test_the_base_stop_string_ends_a_row_where_generate_does(pipes, monkeypatch):
    # The tiny base model answers this prompt with ':' forever; the prompt ends with "Assistant:".
    base = request(model="qwen_base", max_new_tokens=20)
    assert pipes["direct"].run(base).text == ":" * 20
    tokenizer = pipes["direct"]._models["qwen_base"].tokenizer
    for stop, kept in (("::", 1), (":::", 2), ("\n", 20)):  # "::" and ":::" begin in the prompt
        monkeypatch.setattr(chat, "BASE_STOP", stop)
        want = pipes["direct"].run(base)
        got, _ = together(pipes["batched"], [base, request(model="qwen_base", turns=1, max_new_tokens=20)])
        assert got.token_ids == want.token_ids and got.text == want.text and want.tokens_generated == kept
        assert got.model_info["finish_reason"] == want.model_info["finish_reason"]
        assert got.model_info["batch_size"] == 2
    ids = tokenizer("ab:cd:User: x", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[:first_stop(tokenizer.decode, ids, ":User:")]).endswith(":User:")
    assert first_stop(tokenizer.decode, ids, "no such text") is None


class Stop(Exception):
    pass


def test_a_cancelled_row_stops_alone(pipes):
    want = [pipes["endless_direct"].run(request(max_new_tokens=n)) for n in (30, 25)]
    calls = []

    def cancel(done: int, total: int) -> None:
        calls.append(done)
        raise Stop("cancelled")
    got = together(pipes["endless"], [request(max_new_tokens=30), request(max_new_tokens=40),
                                      request(max_new_tokens=25)], [None, cancel, None])
    assert isinstance(got[1], Stop) and len(calls) == 1  # its first report (1 token, or more if it woke late)
    assert [got[0].token_ids, got[2].token_ids] == [w.token_ids for w in want]
    assert got[0].tokens_generated == 30 and got[0].model_info["batch_size"] == 3


def test_progress_reaches_the_caller_at_sync_points(pipes):
    seen = []
    result = pipes["endless"].run(request(max_new_tokens=9), on_token=lambda n, m: seen.append((n, m)))
    assert result.tokens_generated == 9 and result.model_info["finish_reason"] == "length"
    assert seen[-1] == (9, 9) and all(m == 9 and n in (1, 5, 9) for n, m in seen)
    assert [n for n, _ in seen] == sorted({n for n, _ in seen})


def test_a_row_joins_a_running_batch(pipes, monkeypatch):
    pipe = pipes["endless"]
    # The joiner brings penalties the running row does not use: its state starts at its admission.
    first = request(turns=3, max_new_tokens=60)
    second = request("Hi", max_new_tokens=20, presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.2)
    want = [pipes["endless_direct"].run(r) for r in (first, second)]
    decoder = pipe.engine.models["qwen_instruct"].decoder
    entered, go = threading.Event(), threading.Event()
    original = decoder.decode

    def held(*args, **kwargs):  # the first decode step waits until the second request is queued
        entered.set()
        assert go.wait(60)
        return original(*args, **kwargs)
    monkeypatch.setattr(decoder, "decode", held)
    out = {}
    runner = threading.Thread(target=lambda: out.setdefault("first", pipe.run(first)))
    runner.start()
    assert entered.wait(60)
    joiner = threading.Thread(target=lambda: out.setdefault("second", pipe.run(second)))
    joiner.start()
    assert pipe.engine.wait_pending(1)
    go.set()
    runner.join(120)
    joiner.join(120)
    assert out["first"].token_ids == want[0].token_ids and out["second"].token_ids == want[1].token_ids
    assert out["second"].model_info["batch_size"] == 2 and out["second"].model_info["batch_shape"] == "2x256"


def test_an_engine_error_reaches_every_caller_and_the_next_request_runs(pipes, monkeypatch):
    pipe = pipes["batched"]
    decoder = pipe.engine.models["qwen_instruct"].decoder
    original, failures = decoder.decode, []

    def broken(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)
    monkeypatch.setattr(decoder, "decode", broken)
    got = together(pipe, [request(max_new_tokens=10), request("Hi", max_new_tokens=10)])
    assert all(isinstance(g, RuntimeError) and "simulated" in str(g) for g in got)
    assert pipe.run(request()).token_ids == pipes["direct"].run(request()).token_ids


def test_a_request_longer_than_the_cache_falls_back_to_generate(folders):
    small = pipeline(folders, BatchOptions(enabled=True, cache_tokens=128, min_cache_len=32, window_ms=0),
                     QWEN_INSTRUCT_MODEL_PATH="endless")
    try:
        long, short = request(max_new_tokens=150), request(max_new_tokens=10)
        assert not small.engine.fits("qwen_instruct", len(small.prepare(long).input_ids), 150)
        seen = []
        result = small.run(long, on_token=lambda n, m: seen.append(n))
        assert result.tokens_generated == 150 and result.model_info["batch_size"] == 1
        assert "batch_shape" not in result.model_info and seen[-1] == 150
        assert small.run(short).model_info["batch_shape"] == "1x128"
    finally:
        small.close()


@pytest.fixture()
def engine():
    from bench.models import build_qwen

    model = build_qwen("cpu", tiny=True)
    made = BatchEngine({"m": EngineModel(FastDecoder(model, 64, max_batch=2, compile=False))},
                       BatchOptions(window_ms=0)).start()
    yield made
    made.close()


def test_close_fails_waiting_callers_clearly(engine):
    row = RowRequest("m", DecodeRow([5, 6, 7], 4, Sampling()))
    assert len(engine.submit(row).token_ids) == 4
    with engine.paused():
        tickets = [engine.submit_async(row) for _ in range(3)]
        engine.close()
    for ticket in tickets:
        with pytest.raises(EngineClosed, match="closed before this request ran"):
            ticket.wait()
    with pytest.raises(EngineClosed):
        engine.submit(row)
    with pytest.raises(ValueError, match="does not fit"):
        BatchEngine(engine.models).start().submit(RowRequest("m", DecodeRow([5] * 40, 30)))


def test_options_come_from_the_environment():
    opts = BatchOptions.from_env({"GENQ_CHAT_BATCH": "1", "GENQ_CHAT_MAX_BATCH": "8",
                                  "GENQ_CHAT_BATCH_WINDOW_MS": "2.5",
                                  "GENQ_CHAT_CACHE_TOKENS": "65536", "GENQ_CHAT_WARMUP": "1x1024, 8x2048",
                                  "GENQ_CHAT_COMPILE_MODE": "max-autotune-no-cudagraphs"})
    assert (opts.enabled, opts.max_batch, opts.window_ms, opts.cache_tokens) == (True, 8, 2.5, 65536)
    assert opts.warmup == ((1, 1024), (8, 2048)) and opts.compile_mode == "max-autotune-no-cudagraphs"
    assert BatchOptions.from_env({}) == BatchOptions()
    assert BatchOptions.from_env({"GENQ_CHAT_WARMUP": "none"}).warmup == ()
    assert BatchOptions().attention == "auto"
    assert BatchOptions.from_env({"GENQ_CHAT_ATTENTION": "matmul"}).attention == "matmul"
    assert BatchOptions.from_env({"GENQ_CHAT_ATTENTION": "split"}).attention == "split"
    assert BatchOptions.from_env({"GENQ_CHAT_COMPILE_MODE": "default"}).compile_mode is None
    auto = BatchOptions.from_env({"GENQ_CHAT_BATCH": "auto", "GENQ_CHAT_COMPILE": "",
                                  "GENQ_CHAT_TUNE_SINGLE_ROW": "AUTO"})
    assert (auto.enabled, auto.compile, auto.tune_single_row) == (None, None, True)
    assert BatchOptions.from_env({"GENQ_CHAT_BATCH_BUCKETS": "1, 4,16"}).batch_buckets == (1, 4, 16)
    assert BatchOptions.from_env({"UNRELATED": "x", "GENQ_CHAT_BATCH": "off"}).enabled is False


@pytest.mark.parametrize("name, value, shown", [
    ("GENQ_CHAT_BATCH", "maybe", "maybe"), ("GENQ_CHAT_MAX_BATCH", "lots", "lots"),
    ("GENQ_CHAT_MAX_BATCH", "0", "greater than or equal to 1"), ("GENQ_CHAT_BATCH_WINDOW_MS", "-1", "-1"),
    ("GENQ_CHAT_ATTENTION", "flash", "flash"), ("GENQ_CHAT_COMPILE_MODE", "reduce_overhead", "reduce_overhead"),
    ("GENQ_CHAT_BATCH_BUCKETS", "1,two", "two"), ("GENQ_CHAT_WARMUP", "16x", "16x")])
def test_a_bad_setting_is_refused_naming_the_variable_and_value(name, value, shown):
    with pytest.raises(ValueError, match=f"(?s){name}.*{shown}"):
        BatchOptions.from_env({name: value})


def test_without_the_engine_concurrent_runs_take_turns(pipes):
    reqs = [request(temperature=1.0, seed=s, max_new_tokens=10) for s in (1, 2, 3)]
    want = [pipes["direct"].run(r).token_ids for r in reqs]
    out: list = [None] * 3
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, pipes["direct"].run(reqs[i]))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [o.token_ids for o in out] == want  # each seeded generate() ran alone


def test_weights_moving_to_cpu_and_back_keep_the_engine_working(pipes):
    pipe = pipes["batched"]
    decoder = pipe.engine.models["qwen_instruct"].decoder
    pipe.run(request())
    builds = decoder.fused.builds
    pipe.move_to("cpu")  # frees the KV pool and the fused weights; the next batch makes them again
    assert decoder._pool is None and not decoder.fused.built
    pipe.move_to(pipe.device)
    assert pipe.run(request()).token_ids == pipes["direct"].run(request()).token_ids
    assert decoder.fused.builds == builds + 1
    attn = decoder.layers[0].self_attn  # still one copy: the projections are views of the fused weight
    assert attn.v_proj.weight.untyped_storage().data_ptr() == decoder.fused.layers()[0].qkv.data_ptr()
