"""pipelines.accel and pipelines.decoder on CPU: switches, equal results of the eager levers, FastDecoder against generate()."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

from bench.harness import compare
from bench.models import build_qwen, build_sdxl, build_wan
from pipelines.accel import AccelOptions, accelerate_sdxl, accelerate_wan, compile_sdxl
from pipelines.decode_batch import DecodeBatch, DecodeRow, Sampling
from pipelines.decoder import FastDecoder, length_buckets
from pipelines.step_cache import set_wan_step_cache


def test_options_come_from_the_environment():
    opts = AccelOptions.from_env({"GENQ_ACCEL": "1", "GENQ_COMPILE": "true", "GENQ_COMPILE_CACHE_DIR": "/c"})
    assert (opts.enabled, opts.compile, opts.cache_dir) == (True, True, "/c")
    assert AccelOptions.from_env({"GENQ_COMPILE": "1"}).compile is False  # compile only on top of accel
    assert AccelOptions.from_env({}) == AccelOptions()
    assert AccelOptions.from_env({"GENQ_ACCEL": "on", "GENQ_COMPILE": "1", "GENQ_COMPILE_MODE": ""}).compile_mode is None
    assert AccelOptions.from_env({"GENQ_COMPILE_MODE": " max-autotune "}).compile_mode == "max-autotune"
    assert AccelOptions.from_env({"GENQ_ACCEL": "", "GENQ_COMPILE": " ", "GENQ_COMPILE_CACHE_DIR": ""}) == AccelOptions()
    assert AccelOptions.from_env({"GENQ_WAN_ATTENTION": ""}).wan_attention_backend == ""  # the library's default
    for backend in ("flash4", "fp8", "native", "_native_cudnn", "flex"):  # ours and diffusers' own
        assert AccelOptions.from_env({"GENQ_WAN_ATTENTION": f" {backend} "}).wan_attention_backend == backend
    assert AccelOptions.from_env({}).dynamo_cache is True
    assert AccelOptions.from_env({"GENQ_COMPILE_DYNAMO_CACHE": "0"}).dynamo_cache is False


@pytest.mark.parametrize("name, value", [("GENQ_ACCEL", "ture"), ("GENQ_COMPILE", "2"),
                                         ("GENQ_COMPILE_MODE", "reduce_overhead"), ("GENQ_CUDNN_BENCHMARK", "maybe"),
                                         ("GENQ_COMPILE_DYNAMO_CACHE", "sometimes"), ("GENQ_WAN_ATTENTION", "flash5"),
                                         ("GENQ_WAN_ATTENTION", "cudnn")])
def test_a_bad_switch_is_refused_naming_its_variable(name, value):
    with pytest.raises(ValueError, match=name):
        AccelOptions.from_env({"GENQ_ACCEL": "1", name: value})


class _Module:
    def forward(self, sample):
        return sample


@pytest.mark.parametrize("dynamic_env, mode_env, dynamic, mode, tag", [
    # one static graph per shape, image counts chunked, CUDA graphs unless the mode is set
    ("0", "", False, "reduce-overhead", "compile:reduce-overhead:static"),
    ("0", "default", False, "default", "compile:default:static"),
    ("1", "", True, "reduce-overhead", "compile:reduce-overhead:dynamic"),  # one symbolic graph for every shape
])
def test_compile_sdxl_compiles_static_graphs_and_chunks_the_unet_batch(monkeypatch, dynamic_env, mode_env, dynamic,
                                                                      mode, tag):
    """What compile_sdxl asks of torch.compile (which runs only on CUDA in production)."""
    import torch._dynamo.config as dynamo_config

    from pipelines.unet_batches import BatchChunks

    asked = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: asked.append((fn, kw)) or ("compiled", fn))
    pipe = SimpleNamespace(unet=_Module(), vae=SimpleNamespace(decoder=_Module()))
    opts = AccelOptions.from_env({"GENQ_ACCEL": "1", "GENQ_COMPILE": "1", "GENQ_COMPILE_DYNAMIC": dynamic_env,
                                  "GENQ_COMPILE_MODE": mode_env})
    with dynamo_config.patch(recompile_limit=8):
        assert compile_sdxl(pipe, opts) == tag
        assert dynamo_config.recompile_limit == 32
    assert [kw for _, kw in asked] == [{"fullgraph": True, "mode": mode, "dynamic": dynamic}] * 2
    assert [fn.__func__ for fn, _ in asked] == [_Module.forward] * 2  # the forwards, not Module._call_impl
    assert [fn.__self__ for fn, _ in asked] == [pipe.unet, pipe.vae.decoder]
    unet_forward = vars(pipe.unet)["forward"]
    if dynamic:  # one graph for every batch
        assert unet_forward == ("compiled", asked[0][0])
    else:  # the compiled forward behind the chunker
        assert isinstance(unet_forward, BatchChunks) and unet_forward.forward == ("compiled", asked[0][0])
    assert vars(pipe.vae.decoder)["forward"] == ("compiled", asked[1][0])


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(0)
    return build_sdxl("cpu", dtype=torch.float32, tiny=True)


def _image(pipe, **kw):
    return pipe(prompt="a red cube", width=64, height=64, num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(3), **kw).images


def test_disabled_accel_changes_nothing(sdxl):
    assert accelerate_sdxl(sdxl, AccelOptions()) == []
    assert sdxl.vae.dtype == torch.float32 and sdxl.vae.config.force_upcast


@pytest.mark.slow
def test_sdxl_levers_keep_the_image_and_img2img_follows(sdxl):
    before = _image(sdxl)
    applied = accelerate_sdxl(sdxl, AccelOptions(enabled=True, compile=True))
    assert applied == ["fused_qkv", "bf16_vae"]  # no compile on a CPU
    after = _image(sdxl)
    assert compare(before, after)["psnr_db_if_unit_range"] > 40
    img2img = StableDiffusionXLImg2ImgPipeline(**sdxl.components)
    out = img2img(prompt="x", image=before, strength=0.5, num_inference_steps=2, output_type="pt").images
    assert out.shape == before.shape and torch.isfinite(out).all()
    assert sdxl.vae.dtype == torch.bfloat16  # img2img's encode did not upcast the shared VAE


@pytest.mark.slow
def test_wan_levers_and_step_cache_toggle(tiny_wan_video):
    pipe = build_wan("cpu", tiny=True)

    def video():
        return tiny_wan_video(pipe)
    before = video()
    assert accelerate_wan(pipe, AccelOptions(enabled=True, wan_vae_bf16=True)) == ["bf16_vae", "fused_qkv"]
    assert compare(before, video())["psnr_db_if_unit_range"] > 35
    set_wan_step_cache(pipe, 0.05)
    assert torch.isfinite(video()).all()
    set_wan_step_cache(pipe, None)
    assert compare(before, video())["psnr_db_if_unit_range"] > 35  # off again: same path as before


@pytest.fixture(scope="module")
def qwen():
    return build_qwen("cpu", tiny=True)


@pytest.mark.parametrize("attention", ["auto", "packed", "matmul", "repeat"])
def test_fast_decoder_matches_generate_on_left_padded_batches(qwen, attention):
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    ref = qwen.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, 12:].tolist()
    got = FastDecoder(qwen, max_len=64, compile=True, attention=attention).generate(ids, mask, [10, 7])
    assert got == [ref[0], ref[1][:7]]


def test_fast_decoder_stops_rows_at_end_of_text(qwen):
    ids = torch.randint(5, 1000, (1, 8))
    first = FastDecoder(qwen, max_len=32, compile=False).generate(ids, torch.ones_like(ids), 6)[0]
    stop = first[2]
    again = FastDecoder(qwen, max_len=32, compile=False).generate(ids, torch.ones_like(ids), 6, eos_token_ids=[stop])
    assert again == [first[: first.index(stop) + 1]]
    with pytest.raises(ValueError):
        FastDecoder(qwen, max_len=10, compile=False).generate(ids, torch.ones_like(ids), 6)


def test_sampling_keeps_to_top_k_and_the_nucleus(qwen):
    dec = FastDecoder(qwen, max_len=64, max_batch=2, compile=False)
    run = DecodeBatch(dec, 2, 64)
    run.admit([(0, DecodeRow([5, 6, 7], 4, Sampling(temperature=1.0, top_k=3, seed=1))),
               (1, DecodeRow([5, 6, 7], 4, Sampling(temperature=1.0, top_p=0.5, seed=2)))])
    logits = torch.full((2, dec.vocab), -10.0)
    logits[:, :4] = torch.tensor([4.0, 3.9, 3.8, 3.7])
    picks = set()
    for i in range(64):  # every draw position of both rows
        run.gen[:2] = i
        a, b = run._pick(logits, slice(0, 2)).tolist()
        picks.add((a, b))
        assert a in {0, 1, 2} and b in {0, 1}  # top 3; the smallest set with mass > 0.5 is the top two
    assert {a for a, _ in picks} == {0, 1, 2} and {b for _, b in picks} == {0, 1}


def test_shapes_are_bucketed_to_what_the_rows_need(qwen):
    assert length_buckets(512, 32768) == (512, 1024, 2048, 4096, 8192, 16384, 32768)
    assert length_buckets(512, 3000) == (512, 1024, 2048, 3000)
    dec = FastDecoder(qwen, max_len=4096, max_batch=16, pool_tokens=16 * 1024, compile=False)
    assert dec.shape_for(1, 300) == (1, 512) and dec.shape_for(3, 556) == (4, 1024)
    assert dec.shape_for(16, 1024) == (16, 1024) and dec.shape_for(16, 1025) is None  # 16 x 2048 > the pool
    assert dec.shape_for(8, 2000) == (8, 2048) and dec.shape_for(1, 4097) is None


def test_rows_join_a_running_batch_and_decode_as_if_alone(qwen):
    torch.manual_seed(1)
    a, b = torch.randint(5, 1000, (1, 10)), torch.randint(5, 1000, (1, 6))
    alone = FastDecoder(qwen, max_len=64, compile=False)
    want_a = alone.generate(a, torch.ones_like(a), 12)[0]
    want_b = alone.generate(b, torch.ones_like(b), 9)[0]
    dec = FastDecoder(qwen, max_len=64, max_batch=4, batch_buckets=(1, 4), compile=False, sync_every=4)
    with torch.inference_mode():
        run = DecodeBatch(dec, 1, 64)
        run.admit([(0, DecodeRow(a[0].tolist(), 12))])
        run.sync()
        run.advance()  # a is 5 tokens in; b joins at a later column, in a bigger batch
        assert len(run.slots[0].tokens) == 5 and not run.slots[0].done
        assert run.free_slots() == [] and run.can_join(DecodeRow(b[0].tolist(), 9))
        run.grow(4)
        run.admit([(2, DecodeRow(b[0].tolist(), 9))])
        run.sync()
        while run.active:
            run.advance()
    assert run.slots[0].tokens == want_a and run.slots[2].tokens == want_b


def _storage_bytes(model) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    return sum(storages.values())


def _reference(model, ids, n):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False)[:, ids.shape[1]:].tolist()


def test_fused_projections_share_the_parameters_memory():
    model = build_qwen("cpu", tiny=True).float()
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    before, want = _storage_bytes(model), _reference(model, ids, 8)
    dec = FastDecoder(model, max_len=64, compile=False)
    assert dec.generate(ids, torch.ones_like(ids), 8) == want
    for layer, f in zip(model.model.layers, dec.fused.layers()):
        attn, mlp = layer.self_attn, layer.mlp
        assert f.qkv_sizes == (64, 32, 32) and f.gate_up_sizes == (128, 128)
        for fused, params in ((f.qkv, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                              (f.qkv_bias, [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]),
                              (f.gate_up, [mlp.gate_proj.weight, mlp.up_proj.weight])):
            assert {p.untyped_storage().data_ptr() for p in params} == {fused.untyped_storage().data_ptr()}
            assert torch.equal(fused, torch.cat(params))
    assert _storage_bytes(model) == before  # one copy of the weights
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)  # the model's own forward reads the views
    again = FastDecoder(model, max_len=64, compile=False)  # a second decoder views the same storage
    assert again.generate(ids, torch.ones_like(ids), 8) == want and _storage_bytes(model) == before
    assert dec.fused.layers()[0].qkv.data_ptr() == again.fused.layers()[0].qkv.data_ptr() and dec.fused.builds == 1


def test_fused_projections_are_rebuilt_after_the_weights_move():
    import gc
    import weakref

    model = build_qwen("cpu", tiny=True).float()
    ids = torch.randint(5, 1000, (1, 10), generator=torch.Generator().manual_seed(5))
    want = _reference(model, ids, 8)
    dec = FastDecoder(model, max_len=64, compile=False)
    assert dec.generate(ids, torch.ones_like(ids), 8) == want and dec.fused.builds == 1
    old = weakref.ref(dec.fused.layers()[0].gate_up)
    model.to(torch.float64).to(torch.float32)  # like the daemon's .to("cpu") / .to("cuda"): new, separate tensors
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() != mlp.up_proj.weight.untyped_storage().data_ptr()
    dec.release_memory()
    gc.collect()
    assert not dec.fused.built and old() is None  # nothing keeps the old fused weights alive
    assert dec.generate(ids, torch.ones_like(ids), 8) == want and dec.fused.builds == 2
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == dec.fused.layers()[0].gate_up.data_ptr()
    model.to(torch.float64).to(torch.float32)  # moved without release_memory: a decode step notices too
    with torch.inference_mode():
        run = DecodeBatch(dec, 1, 64)
        run.admit([(0, DecodeRow(ids[0].tolist(), 8))])
        model.to(torch.float64).to(torch.float32)  # even between prefill and decoding
        while run.active:
            run.advance()
    assert run.slots[0].tokens == want[0] and dec.fused.builds == 4


def test_projections_that_are_not_plain_linear_layers_stay_unfused():
    class Wrapped(torch.nn.Module):  # LoRA-like: not an nn.Linear
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    class Quantised(torch.nn.Linear):  # bitsandbytes-like: a subclass with its own forward
        pass

    model = build_qwen("cpu", tiny=True).float()
    first, second = model.model.layers
    first.self_attn.q_proj = Wrapped(first.self_attn.q_proj)
    gate = Quantised(64, 128, bias=False)
    gate.load_state_dict(second.mlp.gate_proj.state_dict())
    second.mlp.gate_proj = gate
    ids = torch.randint(5, 1000, (2, 7), generator=torch.Generator().manual_seed(6))
    dec = FastDecoder(model, max_len=64, compile=False)
    assert dec.generate(ids, torch.ones_like(ids), 8) == _reference(model, ids, 8)
    assert [(f.qkv is not None, f.gate_up is not None) for f in dec.fused.layers()] == [(False, True), (True, False)]
    assert FastDecoder(model, max_len=64, compile=False, fuse=False).generate(ids, torch.ones_like(ids), 8) == \
        dec.generate(ids, torch.ones_like(ids), 8)
