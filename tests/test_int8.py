"""Weight-only int8 for the one-row decode step (pipelines/int8.py, GENQ_CHAT_WEIGHTS=int8), on CPU.

The int8 path runs eagerly here with the code the GPU compiles. Its logits are an approximation of the
bf16 decoder's (tolerance below); every other shape must stay exactly the bf16 decoder.
"""
from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

import memory
from bench.harness import compare
from bench.models import build_qwen
from bench.qwen import teacher_forced
from pipelines.chat_options import BatchOptions
from pipelines.decoder import FastDecoder
from pipelines.int8 import dequantize, int8_linear, quantize

# Relative L2 of the int8 step logits against the bf16 decoder's, tiny model in fp32: measured 0.0046
# (0.0072 with the model in bf16; 0.0073 / 0.0095 with an int8 lm_head too); greedy picks agreed on every step.
LOGITS_REL_L2 = 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantisation_error_is_at_most_half_a_step_per_row(dtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(37, 50, generator=gen) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different sizes
    w[5] = 0.0
    w = w.to(dtype)
    q, scale = quantize(w)
    assert q.dtype == torch.int8 and scale.dtype == dtype and scale.shape == (37,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    err = (w.float() - q.float() * scale.float()[:, None]).abs().amax(dim=1)
    assert (err <= scale.float() / 2 * (1 + 1e-6)).all()
    assert (q[5] == 0).all() and float(scale[5]) == 1.0 and (dequantize(q, scale)[5] == 0).all()  # zero row


def test_int8_linear_is_the_dequantised_matmul():
    gen = torch.Generator().manual_seed(1)
    w, bias = torch.randn(24, 16, generator=gen), torch.randn(24, generator=gen)
    x = torch.randn(3, 1, 16, generator=gen)
    q, scale = quantize(w)
    want = x @ dequantize(q, scale).T
    torch.testing.assert_close(int8_linear(x, q, scale), want)
    torch.testing.assert_close(int8_linear(x, q, scale, bias), want + bias)


@pytest.fixture(scope="module")
def model():
    return build_qwen("cpu", tiny=True).float()


def test_one_row_decoding_is_close_to_bf16_and_other_shapes_are_bf16(model):
    ids = torch.randint(5, 1000, (2, 10), generator=torch.Generator().manual_seed(3))
    ones = torch.ones_like(ids)
    ref = FastDecoder(model, max_len=64, max_batch=2, batch_buckets=(1, 2), compile=False)
    q8 = FastDecoder(model, max_len=64, max_batch=2, batch_buckets=(1, 2), compile=False, weights="int8")
    tokens = ref.generate(ids[:1], ones[:1], 24)[0]
    # row 0's logits at every step, each decoder fed the same tokens: prefill's, then 23 decode steps
    want, got = teacher_forced(ref, ids[0].tolist(), tokens, 64), teacher_forced(q8, ids[0].tolist(), tokens, 64)
    assert torch.equal(want[0], got[0])  # prefill reads the bf16 weights
    diff = compare(want[1:], got[1:])
    assert 0 < diff["rel_l2"] < LOGITS_REL_L2, diff  # > 0: the one-row steps did read the int8 copies
    # greedy picks, teacher-forced so that one flip does not shift the rest (all 23 agree here today)
    assert (want[1:].argmax(-1) == got[1:].argmax(-1)).float().mean() >= 0.9
    assert len(q8.generate(ids[:1], ones[:1], 24)[0]) == 24
    # Two rows: the 2-row shape reads the bf16 weights, so every logit and token is the bf16 decoder's.
    assert torch.equal(teacher_forced(ref, ids[0].tolist(), tokens, 64, batch=2),
                       teacher_forced(q8, ids[0].tolist(), tokens, 64, batch=2))
    assert q8.generate(ids, ones, 16) == ref.generate(ids, ones, 16)


def test_int8_copies_are_counted_and_cover_every_projection(model):
    dec = FastDecoder(model, max_len=64, compile=False, weights="int8", int8_lm_head=True)
    assert FastDecoder(model, max_len=64, compile=False).int8 is None
    default = FastDecoder(model, max_len=64, compile=False, weights="int8")  # lm_head stays bf16
    assert default.int8.weights(default.fused.layers()).lm_head is None and default.int8_bytes < dec.int8_bytes
    with torch.inference_mode():
        dec.pool()  # the copies are made with the pool (warm-up), not in a batch
    w = dec.int8.weights(dec.fused.layers())
    assert dec.int8.builds == 1 and w.lm_head is not None
    assert all(x is not None for layer in w.layers for x in (layer.qkv, layer.o, layer.gate_up, layer.down))
    assert w.layers[0].qkv_sizes == (64, 32, 32) and w.layers[0].qkv.bias is not None  # Qwen2's q/k/v biases
    built = sum(t.numel() * t.element_size() for lin in [w.lm_head] + [x for l in w.layers
                for x in (l.qkv, l.o, l.gate_up, l.down)] for t in (lin.weight, lin.scale))
    assert dec.int8_bytes == built
    assert dec.single_row_weight_bytes < dec.weight_bytes
    assert dec.cost((1, 64)) == FastDecoder(model, max_len=64, compile=False).cost((1, 64))  # same shape choice
    with pytest.raises(ValueError, match="weights 'fp4'"):
        FastDecoder(model, max_len=64, compile=False, weights="fp4")


def test_int8_copies_are_dropped_and_rebuilt_when_the_weights_move():
    model = build_qwen("cpu", tiny=True).float()
    ids = torch.randint(5, 1000, (1, 10), generator=torch.Generator().manual_seed(5))
    dec = FastDecoder(model, max_len=64, compile=False, weights="int8")
    want = dec.generate(ids, torch.ones_like(ids), 8)
    assert dec.int8.builds == 1
    old = weakref.ref(dec.int8.weights(dec.fused.layers()).layers[0].gate_up.weight)
    model.to(torch.float64).to(torch.float32)  # like the daemon's .to("cpu") / .to("cuda"): new tensors
    dec.release_memory()
    gc.collect()
    assert not dec.int8.built and old() is None  # nothing keeps the old copies alive
    assert dec.generate(ids, torch.ones_like(ids), 8) == want and dec.int8.builds == 2
    model.to(torch.float64).to(torch.float32)  # moved without release_memory: a decode step notices
    assert dec.generate(ids, torch.ones_like(ids), 8) == want and dec.int8.builds == 3


def test_the_switch_comes_from_the_environment_and_memory_counts_it(model, monkeypatch):
    assert BatchOptions.from_env({}).weights == "bf16" == BatchOptions().weights
    opts = BatchOptions.from_env({"GENQ_CHAT_WEIGHTS": "int8"})
    assert opts.weights == "int8"
    assert BatchOptions(compile=False, weights="int8").decoder(model, 64).int8 is not None
    with pytest.raises(ValueError, match="GENQ_CHAT_WEIGHTS"):
        BatchOptions.from_env({"GENQ_CHAT_WEIGHTS": "fp4"})
    parts = {"qwen_instruct": 15_232_000_000, "chat.kv_pool": 1}
    assert memory.chat_int8_bytes(parts, {}) == {}
    assert memory.chat_int8_bytes(parts, {"GENQ_CHAT_WEIGHTS": "int8", "GENQ_CHAT_BATCH": "0"}) == {}
    assert memory.chat_int8_bytes(parts, {"GENQ_CHAT_WEIGHTS": "int8"}) == {"qwen_instruct.int8": 6_549_760_000}
    monkeypatch.setenv("GENQ_CHAT_WEIGHTS", "int8")
    real = SimpleNamespace(qwen_instruct_model_path="/models/qwen", qwen_base_model_path="/models/base")
    got = memory.resident_parts("chat", real)
    assert set(got) == {"qwen_instruct", "qwen_base", "chat.kv_pool", "qwen_instruct.int8", "qwen_base.int8"}
    assert got["qwen_base.int8"] == int(got["qwen_base"] * memory.CHAT_INT8_SHARE)
