"""GENQ_CHAT_WEIGHTS=fp8 (pipelines/fp8_linear.py) on this CPU: the quantisation, the products it runs,
the model rewrite, and the chat pipeline and batching engine serving the FP8 model. The Triton kernel
itself is checked through Triton's interpreter in tests/test_skinny_linear.py, its speed on the GPU by
bench/skinny_gemm.py and bench/qwen.py --weights fp8."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memory import resident_parts
from pipelines import fp8_linear
from pipelines.accel import cudagraph_thread_state
from pipelines.chat_batch import BatchOptions
from pipelines.fp8_linear import Fp8Linear, dequantise, quantise, quantise_model
from schemas.settings import Settings
from tests.test_chat_batch import MIXED, OPTIONS, folders, pipeline, request, together  # noqa: F401  (fixture)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm()).detach())


def test_quantise_keeps_each_row_within_e4m3_rounding():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    w[5] = 0  # a row of zeros: scale 1, no NaN
    q, scale = quantise(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (48,)
    back = dequantise(q, scale, torch.float32)
    assert torch.isfinite(back).all() and scale[5] == 1 and back[5].abs().max() == 0
    # 3 mantissa bits: at most 1/16 off per value, 2-3% in the norm for Gaussian weights
    assert rel(back, w) < 0.04
    assert ((back - w).abs() <= w.abs() / 16 + 1e-9).all()
    assert torch.allclose(q.float().abs().amax(dim=1)[scale != 1], torch.tensor(448.0))


def test_an_fp8_linear_on_a_cpu_multiplies_by_its_dequantised_weight():
    torch.manual_seed(1)
    lin = nn.Linear(64, 40, bias=True)
    fp8 = Fp8Linear.from_linear(lin)
    x = torch.randn(3, 7, 64)
    want = F.linear(x.double(), dequantise(fp8.weight, fp8.weight_scale, torch.float64), lin.bias.double())
    got = fp8(x)
    assert got.shape == (3, 7, 40) and got.dtype == x.dtype
    assert rel(got.double(), want) < 1e-6
    assert "fp8" in repr(fp8) and fp8.weight.requires_grad is False


def test_the_prompt_path_quantises_activations_per_row():
    # what a prompt on CUDA runs (torch._scaled_mm; this CPU's torch implements it too)
    torch.manual_seed(2)
    w, x, b = torch.randn(64, 32), torch.randn(5, 32), torch.randn(64)
    x[3] = 0  # a row of zeros stays zero (no NaN from its scale)
    q, s = quantise(w)
    got = fp8_linear.scaled_mm(x, q, s, b)
    want = F.linear(x, dequantise(q, s, torch.float32), b)
    assert torch.isfinite(got).all() and torch.allclose(got[3], b)
    assert rel(got, want) < 0.05  # the activations' own e4m3 rounding



def test_a_long_prompt_is_quantised_in_chunks_with_the_same_result(monkeypatch):
    torch.manual_seed(3)
    w, x = torch.randn(48, 32), torch.randn(2, 5, 32)
    q, s = quantise(w)
    whole = fp8_linear.scaled_mm(x, q, s)
    monkeypatch.setattr(fp8_linear, "PROMPT_CHUNK", 3)  # 10 rows: chunks of 3, 3, 3 and 1
    chunked = fp8_linear.scaled_mm(x, q, s)
    assert chunked.shape == (2, 5, 48) and rel(chunked, whole) < 1e-6  # each row quantised alike


def test_linear_names_match_whole_path_components_under_the_given_parts():
    model = nn.ModuleDict({
        "blocks": nn.ModuleList([nn.ModuleDict({"to_q": nn.Linear(4, 4), "add_to_q": nn.Linear(4, 4),
                                                "norm": nn.LayerNorm(4)})]),
        "head": nn.ModuleDict({"to_q": nn.Linear(4, 4)}),
    })
    assert fp8_linear.linear_names(model, ("to_q",), within=("blocks.",)) == ["blocks.0.to_q"]
    assert fp8_linear.replace_linears(model, ["blocks.0.to_q"], chunk=None) == 1
    assert isinstance(model["blocks"][0]["to_q"], Fp8Linear) and type(model["head"]["to_q"]) is nn.Linear
    assert fp8_linear.linear_names(model, ("to_q",), within=("blocks.",)) == []  # replaced: not an nn.Linear
    # a path naming nothing (or no nn.Linear) fails before any replacement, naming the paths
    with pytest.raises(LookupError, match=r"2 of 3 paths, model unchanged: 'head.to_', 'blocks.0.norm'"):
        fp8_linear.replace_linears(model, ["head.to_q", "head.to_", "blocks.0.norm"])
    assert type(model["head"]["to_q"]) is nn.Linear


def test_quantise_model_rewrites_the_decoder_layers_and_an_untied_head_only():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def model(tied: bool):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=tied)).eval()

    untied, tied = model(False), model(True)
    before = sum(p.numel() * p.element_size() for p in untied.parameters())
    assert quantise_model(untied) == 2 * 7 + 1
    assert isinstance(untied.lm_head, Fp8Linear) and type(untied.model.embed_tokens) is nn.Embedding
    assert isinstance(untied.model.layers[1].mlp.down_proj, Fp8Linear)
    assert sum(p.numel() * p.element_size() for p in untied.parameters()) < 0.6 * before
    assert quantise_model(tied) == 2 * 7  # the head is the embedding table: left as it is
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.isfinite(untied(input_ids=ids).logits).all()


@pytest.fixture(scope="module")
def fp8_pipes(folders):  # noqa: F811
    made = {"direct": pipeline(folders, BatchOptions(enabled=False, weights="fp8"), QWEN_INSTRUCT_MODEL_PATH="instruct",
                               QWEN_BASE_MODEL_PATH="base"),
            "batched": pipeline(folders, OPTIONS.model_copy(update={"weights": "fp8"}),
                                QWEN_INSTRUCT_MODEL_PATH="instruct", QWEN_BASE_MODEL_PATH="base"),
            "bf16": pipeline(folders, BatchOptions(enabled=False), QWEN_INSTRUCT_MODEL_PATH="instruct")}
    yield made
    for pipe in made.values():
        pipe.close()


def test_the_pipeline_serves_fp8_weights_batched_and_direct_alike(fp8_pipes):
    direct, batched = fp8_pipes["direct"], fp8_pipes["batched"]
    layer = direct._models["qwen_instruct"].model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Fp8Linear) and isinstance(layer.mlp.gate_proj, Fp8Linear)
    want = [direct.run(r) for r in MIXED]
    got = together(batched, MIXED)
    for w, g in zip(want, got):
        assert not isinstance(g, BaseException), g
        assert g.token_ids == w.token_ids and g.text == w.text
    # the engine fused q|k|v and gate|up with their scales, and the modules now view the fused tensors
    decoder = batched.engine.models["qwen_instruct"].decoder
    fused = decoder.fused.layers()[0]
    attn = decoder.layers[0].self_attn
    assert fused.qkv.dtype == torch.float8_e4m3fn and fused.qkv_scale.shape == (fused.qkv.shape[0],)
    assert attn.k_proj.weight_scale.untyped_storage().data_ptr() == fused.qkv_scale.untyped_storage().data_ptr()
    assert decoder.weight_bytes < 0.75 * sum(p.numel() * p.element_size()
                                             for p in fp8_pipes["bf16"]._models["qwen_instruct"].model.parameters())


def test_fp8_weights_differ_from_the_loaded_ones_only_by_their_rounding(fp8_pipes):
    ids = torch.tensor([[3, 17, 42, 8, 99, 5]])
    with torch.no_grad():
        fp8 = fp8_pipes["direct"]._models["qwen_instruct"].model(input_ids=ids).logits
        ref = fp8_pipes["bf16"]._models["qwen_instruct"].model(input_ids=ids).logits
    assert 0 < rel(fp8, ref) < 0.1


def test_fp8_weights_survive_a_move_to_cpu_and_back(fp8_pipes):
    pipe = fp8_pipes["batched"]
    decoder = pipe.engine.models["qwen_instruct"].decoder
    want = pipe.run(request()).token_ids
    builds = decoder.fused.builds
    pipe.move_to("cpu")
    pipe.move_to(pipe.device)
    assert pipe.run(request()).token_ids == want and decoder.fused.builds == builds + 1


def test_the_setting_is_parsed_and_a_bad_value_refused_by_name():
    assert BatchOptions().weights == "as-loaded"
    assert BatchOptions.from_env({"GENQ_CHAT_WEIGHTS": "fp8"}).weights == "fp8"
    with pytest.raises(ValueError, match="(?s)GENQ_CHAT_WEIGHTS.*int4"):
        BatchOptions.from_env({"GENQ_CHAT_WEIGHTS": "int4"})


def test_a_gpu_without_fp8_conversion_is_refused_at_start(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match="GENQ_CHAT_WEIGHTS=fp8 needs .* 8.9 .*A100.* 8.0"):
        fp8_linear.check_device(torch.device("cuda"))
    fp8_linear.check_device(torch.device("cpu"))  # the CPU path needs nothing


def test_admission_counts_the_fp8_weights(monkeypatch):
    settings = Settings(QWEN_INSTRUCT_MODEL_PATH="/models/qwen", GENQ_STORAGE="local")
    monkeypatch.setenv("GENQ_CHAT_BATCH", "0")
    bf16 = resident_parts("chat", settings)["qwen_instruct"]
    monkeypatch.setenv("GENQ_CHAT_WEIGHTS", "fp8")
    fp8 = resident_parts("chat", settings)["qwen_instruct"]
    assert fp8 == 8167117824 and bf16 == 15232000000


def test_each_engine_thread_gets_cuda_graph_state_of_its_own():
    from torch._inductor import cudagraph_trees

    seen = []

    def thread():
        cudagraph_thread_state()
        cudagraph_thread_state()  # a second call keeps what the first made
        seen.append(cudagraph_trees.get_obj(cudagraph_trees.local, "tree_manager_containers"))
        seen.append(cudagraph_trees.get_obj(cudagraph_trees.local, "tree_manager_containers"))

    runner = threading.Thread(target=thread)
    runner.start()
    runner.join()
    main = cudagraph_trees.get_obj(cudagraph_trees.local, "tree_manager_containers")
    assert seen[0] is seen[1] and seen[0] is not main
