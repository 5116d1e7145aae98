"""ChatPipeline on tiny random-weight Qwen2 models built locally (real transformers generate())."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.chat import ChatPipeline, ContextTooLong, OpenAIPenalties
from pipelines.tiny_qwen import SPECIAL_TOKENS, build_tiny_qwen
from schemas.chat import ChatMessage, ChatRequest
from schemas.errors import PayloadError
from schemas.settings import Settings

DEADLINE = 1_900_000_000_000
SYSTEM = "You are a noir storyteller."


def settings(tmp: Path, **paths) -> Settings:
    return Settings(GENQ_DEVICE="cpu", GENQ_TINY_CACHE=str(tmp / "tiny"), GENQ_STORAGE="local", **paths)


def request(*turns: tuple[str, str], **fields) -> ChatRequest:
    messages = [ChatMessage(role=role, content=content) for role, content in turns] or [
        ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content="Tell me a story.")]
    values = dict(job_id="chat-1", job_type="chat", reply_key="genq:reply:chat-1", deadline_ms=DEADLINE,
                  messages=messages, max_new_tokens=12, seed=7)
    return ChatRequest(**{**values, **fields})


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen")
    instruct, base = build_tiny_qwen(root / "instruct", seed=0), build_tiny_qwen(root / "base", seed=1)
    # A checkpoint that never emits a stop token: generation must run to exactly max_tokens.
    endless = build_tiny_qwen(root / "endless", seed=2)
    config = json.loads((endless / "generation_config.json").read_text())
    from transformers import AutoTokenizer
    config["suppress_tokens"] = AutoTokenizer.from_pretrained(endless).convert_tokens_to_ids(list(SPECIAL_TOKENS))
    (endless / "generation_config.json").write_text(json.dumps(config))
    return {"instruct": instruct, "base": base, "endless": endless, "root": root}


@pytest.fixture(scope="module")
def pipe(folders) -> ChatPipeline:
    pipeline = ChatPipeline(settings(folders["root"], QWEN_INSTRUCT_MODEL_PATH=str(folders["instruct"]),
                                     QWEN_BASE_MODEL_PATH=str(folders["base"])))
    pipeline.setup()
    return pipeline


def test_serves_both_configured_models(pipe):
    assert pipe.family == "chat" and pipe.served_models == {"qwen_instruct", "qwen_base"}


def test_instruct_prompt_uses_the_chat_template(pipe):
    text = pipe.render(request())
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    assert "<|im_start|>user\nTell me a story.<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_base_prompt_is_a_plain_transcript(pipe):
    req = request(("system", SYSTEM), ("user", "Hi"), ("assistant", "Hello."), ("user", "A story?"),
                  model="qwen_base")
    assert pipe.render(req) == f"{SYSTEM}\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: A story?\n\nAssistant:"
    result = pipe.run(req)
    assert result.model_info["model"] == "qwen_base" and 0 <= result.tokens_generated <= 12
    assert result.model_info["prompt_format"] == "transcript"


def test_max_tokens_is_exact_when_the_model_never_stops(folders):
    pipeline = ChatPipeline(settings(folders["root"], QWEN_INSTRUCT_MODEL_PATH=str(folders["endless"])))
    pipeline.setup()
    seen = []
    result = pipeline.run(request(max_new_tokens=9, temperature=1.0), on_token=lambda n, m: seen.append((n, m)))
    assert result.tokens_generated == 9 == len(result.token_ids)
    assert result.model_info["finish_reason"] == "length"
    assert seen == [(n, 9) for n in range(1, 10)]


def test_generation_never_exceeds_max_tokens(pipe):
    for seed in range(3):
        result = pipe.run(request(max_new_tokens=5, seed=seed, temperature=1.5))
        assert result.tokens_generated <= 5 and result.prompt_tokens == result.model_info["prompt_tokens"] > 0


def test_same_seed_same_text_different_seed_different_text(pipe):
    first = pipe.run(request(seed=11, temperature=1.0, top_p=1.0, max_new_tokens=16))
    again = pipe.run(request(seed=11, temperature=1.0, top_p=1.0, max_new_tokens=16))
    other = pipe.run(request(seed=12, temperature=1.0, top_p=1.0, max_new_tokens=16))
    assert first.token_ids == again.token_ids and first.text == again.text
    assert first.token_ids != other.token_ids
    assert first.model_info["seed"] == 11 and first.model_info["do_sample"] is True


def test_temperature_zero_is_greedy(pipe):
    one = pipe.run(request(temperature=0, seed=1))
    two = pipe.run(request(temperature=0, seed=2))
    assert one.token_ids == two.token_ids and one.model_info["do_sample"] is False


def test_penalties_processor_follows_openai_semantics():
    prompt = [5, 5, 5]  # the prompt's tokens are never penalised
    generated = [1, 1, 1, 2]
    ids = torch.tensor([prompt + generated])
    scores = torch.zeros(1, 6)
    out = OpenAIPenalties(len(prompt), presence_penalty=0.5, frequency_penalty=0.25)(ids, scores)
    assert out.tolist() == [[0.0, -(0.5 + 3 * 0.25), -(0.5 + 0.25), 0.0, 0.0, 0.0]]
    untouched = OpenAIPenalties(len(ids[0]), 2.0, 2.0)(ids, scores.clone())
    assert torch.equal(untouched, scores)
    assert OpenAIPenalties(3, -1.0, 0.0)(ids, scores)[0, 2].item() == 1.0  # negative ones encourage


def test_presence_penalty_changes_generation(pipe):
    plain = pipe.run(request(temperature=0, max_new_tokens=24))
    penalised = pipe.run(request(temperature=0, max_new_tokens=24, presence_penalty=2.0))
    assert penalised.token_ids != plain.token_ids
    # A random model's logits are small: 2.0 outweighs them, so greedy decoding never repeats a token.
    assert len(set(penalised.token_ids)) == len(penalised.token_ids)


def test_repetition_penalty_reaches_generate(pipe):
    result = pipe.run(request(temperature=0, repetition_penalty=1.3))
    assert result.model_info["repetition_penalty"] == 1.3


@pytest.fixture(scope="module")
def small_context(folders) -> ChatPipeline:
    pipeline = ChatPipeline(settings(folders["root"], QWEN_INSTRUCT_MODEL_PATH=str(folders["instruct"])),
                            context_limit=160)
    pipeline.setup()
    return pipeline


def long_conversation() -> ChatRequest:
    filler = "the quick brown fox jumps over the lazy dog " * 3
    turns = [("system", "Be brief.")]
    for i in range(6):
        turns += [("user", f"old question {i} {filler}"), ("assistant", f"old answer {i} {filler}")]
    return request(*turns, ("user", "The latest question?"), max_new_tokens=20)


def test_context_rule_drops_the_oldest_turns_first(small_context):
    req = long_conversation()
    prepared = small_context.prepare(req)
    kept = small_context._loaded(req).tokenizer.decode(prepared.input_ids)
    assert prepared.dropped_messages > 0
    assert len(prepared.input_ids) + req.max_new_tokens <= 160
    assert "Be brief." in kept and "The latest question?" in kept
    assert "old question 0" not in kept and "old answer 5" in kept  # oldest gone, newest kept
    # The fewest turns that fit: dropping one fewer would not fit.
    one_fewer = [m for i, m in enumerate(req.messages) if not 1 <= i < prepared.dropped_messages]
    assert len(small_context._encode(req, one_fewer)) + req.max_new_tokens > 160
    result = small_context.run(req)
    assert result.truncated and result.model_info["dropped_messages"] == prepared.dropped_messages


def test_context_rule_refuses_what_cannot_fit(small_context):
    too_long = request(("system", "Be brief."), ("user", "word " * 400))
    with pytest.raises(ContextTooLong) as err:
        small_context.check_inputs(too_long)
    assert err.value.field == "request.messages" and isinstance(err.value, PayloadError)
    with pytest.raises(ContextTooLong):
        small_context.run(request(max_new_tokens=158))


def test_untruncated_request_reports_so(pipe):
    result = pipe.run(request())
    assert result.truncated is False and result.model_info["dropped_messages"] == 0
    assert result.model_info["prompt_format"] == "chatml"


class Stop(Exception):
    pass


def test_an_exception_in_on_token_stops_generation_and_propagates(pipe):
    calls = []

    def on_token(done: int, total: int) -> None:
        calls.append(done)
        if done == 3:
            raise Stop("cancelled")

    with pytest.raises(Stop):
        pipe.run(request(max_new_tokens=50, temperature=1.0), on_token=on_token)
    assert calls[-1] == 3 and len(calls) == 3


def test_unserved_model_is_refused(small_context):
    with pytest.raises(PayloadError) as err:
        small_context.check_inputs(request(model="qwen_base"))
    assert err.value.field == "request.model"


def test_setup_refuses_without_a_model(tmp_path):
    with pytest.raises(RuntimeError, match="QWEN_INSTRUCT_MODEL_PATH"):
        ChatPipeline(settings(tmp_path)).setup()


def test_tiny_models_are_built_once_and_cached(tmp_path):
    first = ChatPipeline(settings(tmp_path, QWEN_INSTRUCT_MODEL_PATH="tiny", QWEN_BASE_MODEL_PATH="tiny"))
    first.setup()
    assert first.served_models == {"qwen_instruct", "qwen_base"}
    built = sorted(p.name for p in (tmp_path / "tiny").iterdir() if not p.name.startswith("."))
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "tiny").rglob("*.safetensors")}
    second = ChatPipeline(settings(tmp_path, QWEN_BASE_MODEL_PATH="tiny"))
    second.setup()
    assert second.served_models == {"qwen_base"}
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "tiny").rglob("*.safetensors")} == stamps
    assert built == ["qwen_base", "qwen_instruct"]  # each its own folder (different seeds)
    assert second.run(request(model="qwen_base")).model_info["name"] == "tiny-qwen_base"
