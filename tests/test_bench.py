"""The benchmark harness (bench/) on this CPU with tiny models: every stage of the three benchmarks runs
without errors and writes the figures docs/PERFORMANCE.md reads, so a rerun on a GPU finds them working."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import bandwidth_tb_s, decode_read_bytes
from bench.models import build_qwen

ROOT = Path(__file__).resolve().parents[1]


def run_bench(module: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", module, "--tiny", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def tiny_report(name: str, out: Path, *args: str) -> dict:
    """bench.<name> --tiny on the CPU, one timed run: its report, after checking no stage failed."""
    done = run_bench(f"bench.{name}", out, "--runs", "1", "--device", "cpu", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / f"{name}_tiny.json").read_text())
    assert report["errors"] == {}
    return report


@pytest.mark.parametrize("name, figures", [
    ("sdxl", {"speedup_1img_2steps_min", "throughput_6img_2steps_min", "accel_step_ms"}),
    ("qwen", {"speedup_1stream", "engine_1stream_tok_s", "engine_3streams_tok_s", "engine_1stream_ttft_s",
              "engine_1stream_bandwidth_fraction", "targets"}),
    ("wan", {"speedup_per_step_min", "vae_decode_speedup"}),
])
def test_each_benchmark_runs_every_stage_and_writes_its_summary(tmp_path, name, figures):
    report = tiny_report(name, tmp_path)
    assert report["skipped"] == []
    assert figures <= set(report["summary"]), report["summary"]
    assert "equality" in report["stages"]  # every speed-up is checked against the baseline
    assert report["env"]["card"] == "cpu"


def test_qwen_with_fp8_weights_runs_the_engine_again_and_measures_the_difference(tmp_path):
    report = tiny_report("qwen", tmp_path, "--weights", "fp8")
    stages = report["stages"]
    assert stages["fp8_quantise"]["replaced_layers"] > 0 and "equality_fp8" in stages
    assert report["canary"] == {"strings": 100_000, "changed_after": None}  # no host memory overwritten
    assert stages["engine_setup_fp8"]["weights_gb"] <= stages["engine_setup"]["weights_gb"]
    fp8 = report["summary"]["fp8"]
    assert fp8["engine_3streams_tok_s"] > 0 and 0 < fp8["difference"]["logits"]["rel_l2"] < 0.5


def test_the_qwen_canary_names_the_first_stage_after_which_its_strings_differ(tmp_path):
    from argparse import Namespace

    from bench.qwen import CanaryReport

    rep = CanaryReport("qwen", Namespace(out=str(tmp_path), tiny=True, budget_s=60.0))
    rep.stage("clean", lambda: {"ok": True})
    assert rep.data["canary"]["changed_after"] is None
    rep.canary[7] = "model.layers.7.mlp.down_pro"  # as the ninth session's lost character read
    rep.stage("overwrites", lambda: {"ok": True})
    rep.stage("later", lambda: {"ok": True})
    saved = json.loads((tmp_path / "qwen_tiny.json").read_text())["canary"]
    assert saved == {"strings": 100_000, "changed_after": "overwrites", "changed": 1,
                     "examples": [[7, "'model.layers.7.mlp.down_pro'"]]}


def test_sdxl_with_fp8_products_times_them_and_measures_their_difference(tmp_path):
    report = tiny_report("sdxl", tmp_path, "--skip-memory", "--fp8-linear")
    stages = report["stages"]
    assert stages["fp8_levers"]["fp8_linears"] > 0 and "fp8_6img_2steps" in stages
    # an approximation: measured against the exact accelerated path, and not equal to it
    assert 0 < stages["fp8_equality"]["end_to_end_latents_vs_accel"]["rel_l2"] < 0.2
    assert report["summary"]["fp8"]["1img_2steps_vs_accel"] > 0


def test_skinny_gemm_times_fp8_weights_against_bf16_cublas(tmp_path):
    env = {"TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.skinny_gemm", "--tiny", "--device", "cpu", "--rows", "4,1",
                           "--weights", "fp8", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    stages = json.loads((tmp_path / "skinny_gemm_tiny.json").read_text())["stages"]
    # four rows through the tile kernel, one row through the vector kernel
    assert set(stages) == {"qkv_4rows_fp8", "down_4rows_fp8", "qkv_1rows_fp8", "down_1rows_fp8"}
    assert stages["qkv_1rows_fp8"]["best"]["vector"] and not stages["qkv_4rows_fp8"]["best"]["vector"]
    for row in stages.values():
        assert row["weights"] == "fp8" and row["cublas_us"] > 0 and row["best"]["us"] > 0
        assert row["rel_l2_vs_dequantised"] < 1e-5 and row["deterministic"]


def test_wan_norms_times_each_row_kernel_per_launch_shape(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.wan_norms", "--tiny", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = json.loads((tmp_path / "wan_norms_tiny.json").read_text())["stages"]["sweep"]
    assert set(sweep["best"]) == {"norm1_modulated", "residual_gated_norm2", "residual_norm3_modulated", "qk_norm_rope"}
    for name, best in sweep["best"].items():
        assert best["us"] > 0 and best["tb_s"] >= 0 and (best["rows"], best["warps"]) == (2, 2), name
        assert sweep["at_defaults"][name] is None  # the tiny sweep's one launch shape is not a default


def test_fp8_attention_times_the_kernel_against_bf16_attention_and_measures_its_difference(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.fp8_attention", "--tiny", "--device", "cpu", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "fp8_attention_tiny.json").read_text())
    assert report["errors"] == {}
    row = report["stages"]["tiny"]
    assert row["math_bf16_ms"] > 0 and row["diff_gaussian_bf16"]["rel_l2"] < 0.01
    for qk in ("int8", "fp8"):
        assert row[qk]["kernel_top"] and row[qk]["path_eager_ms"] > 0
        assert 0 < row[qk]["diff_gaussian"]["rel_l2"] < 0.2 and row[qk]["diff_peaked_x4"]["finite"]


def test_wan_step_times_the_baseline_and_the_exact_path_in_one_process(tmp_path):
    report = tiny_report("wan_step", tmp_path)
    assert report["stages"]["baseline_per_step"]["min_s"] > 0 and report["stages"]["accel_per_step"]["min_s"] > 0
    assert report["summary"]["speedup_per_step_min"] > 0  # the FP8 stages need CUDA: None here
    assert report["summary"]["fp8_speedup_per_step_min"] is None
    assert report["summary"]["fp8_linear_fast_speedup_per_step_min"] is None
    # fused q|k|v in fp32 on a CPU: the exact path's latents are the baseline's
    assert report["stages"]["accel_per_step"]["latents_after_4_steps_vs_baseline"]["rel_l2"] < 1e-5


def test_fp8_gemm_times_wans_products_in_bf16_and_e4m3(tmp_path):
    report = tiny_report("fp8_gemm", tmp_path)
    row = report["stages"]["tiny"]
    assert row["bf16_ms"] > 0 and row["path_ms"] > 0 and row["path_fast_ms"] > 0
    assert 1e-4 < row["path_rel_l2_vs_bf16"] < 0.1  # e4m3 weights: a few percent
    assert report["tiny_pass_bf16_ms"] > 0


@pytest.mark.parametrize("module", ["bench.sdxl_profile", "bench.wan_vae"])
def test_the_profiles_need_a_gpu_and_say_so(tmp_path, module):
    done = run_bench(module, tmp_path)
    assert done.returncode == 1 and "needs CUDA" in done.stdout


def test_wan_vae_modes_decode_the_baselines_video():
    """bench.wan_vae's layouts decode what diffusers' fp32 decode does; bf16 (the opt-in) only approximately."""
    import torch

    from bench.harness import compare
    from bench.models import build_wan
    from bench.wan_vae import _vae_for

    base = build_wan("cpu", tiny=True).vae
    z = torch.randn(1, base.config.z_dim, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = base.decode(z, return_dict=False)[0]
        assert _vae_for(base, "fp32-channels-last").decode(z, return_dict=False)[0].equal(ref)
        bf16 = _vae_for(base, "bf16").decode(z.bfloat16(), return_dict=False)[0].float()
    assert bf16.shape == ref.shape and 0 < compare(ref, bf16)["rel_l2"] < 5e-2
    assert next(base.parameters()).dtype == torch.float32  # each mode on its own copy


def test_text_encoder_visit_times_both_ways_and_compares_their_embeddings(tmp_path):
    done = run_bench("bench.text_encoder_visit", tmp_path, "--runs", "1", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "text_encoder_visit_tiny.json").read_text())
    assert report["errors"] == {} and report["stages"]["equality"] == {"embeddings_equal": True}
    assert {"plain_to_and_back", "host_weights_visit"} <= set(report["stages"]) and "speedup_min" in report["summary"]


def test_the_one_stream_target_follows_the_card():
    assert bandwidth_tb_s("NVIDIA H100 80GB HBM3") == 3.35
    assert bandwidth_tb_s("NVIDIA H200") == 4.8
    assert bandwidth_tb_s("NVIDIA H100 PCIe") == 2.0
    assert bandwidth_tb_s("cpu") is None


def test_a_decode_step_reads_every_weight_but_one_embedding_row():
    model = build_qwen("cpu", tiny=True)
    embed = model.get_input_embeddings().weight
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model.get_output_embeddings().weight is not embed  # as in Qwen 2.5 7B
    assert decode_read_bytes(model) == everything - embed.numel() * embed.element_size() > 0
    model.lm_head.weight = embed  # tied: the head reads the whole table every step
    assert decode_read_bytes(model) == sum(p.numel() * p.element_size() for p in model.parameters())


def test_cold_start_times_every_warmed_shape_and_passes_settings_to_its_starts(tmp_path):
    common = ("--families", "sdxl", "--sdxl-extra", "72x64x1", "--models", str(tmp_path / "models"),
              "--cache", str(tmp_path / "cache"))
    done = run_bench("bench.cold_start", tmp_path / "ok", *common, "--env", "GENQ_COMPILE_MODE=reduce-overhead")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "ok" / "cold_start.json").read_text())
    assert report["env"] == {"GENQ_COMPILE_MODE": "reduce-overhead"}
    first, second = report["families"]["sdxl"]["starts"]
    assert first["exit_code"] == second["exit_code"] == 0 and second["ready_after_launch_s"] > 0
    jobs = second["warm_jobs"]  # the main size's image counts and the extra shape, ours and plain diffusers
    assert set(jobs["ours"]) == set(jobs["baseline"]) == set(jobs["ratio_min"]) == {"64x64x1", "64x64x3", "72x64x1"}
    assert jobs["graphs_compiled_after_start"] == 0
    # a setting the start refuses shows that --env reaches it
    refused = run_bench("bench.cold_start", tmp_path / "bad", *common, "--starts", "1",
                        "--env", "GENQ_COMPILE_MODE=fast")
    assert refused.returncode == 0
    start = json.loads((tmp_path / "bad" / "cold_start.json").read_text())["families"]["sdxl"]["starts"][0]
    assert start["exit_code"] != 0 and "GENQ_COMPILE_MODE" in (tmp_path / "bad" / "cold_start.log").read_text()


def test_the_qwen_profile_candidates_decode_what_production_decodes():
    """bench.qwen_profile's `+` tweaks swap a function of the decode step; each must be used and change
    only the speed: greedy tokens equal the production decoder's on a tiny model."""
    import torch

    from bench import qwen_profile
    from pipelines.chat_options import BatchOptions

    model = build_qwen("cpu", tiny=True)
    prompt = torch.randint(100, 1000, (1, 30), generator=torch.Generator().manual_seed(0))

    def counted(name, change, calls):
        if isinstance(change, dict):  # inductor settings: nothing to count on a CPU
            return change
        module, attr, fn = change
        return module, attr, lambda *a: calls.append(name) or fn(*a)

    def decode(tweaks, attention, rows):
        calls = []
        wrapped = {name: [counted(name, change, calls) for change in changes]
                   for name, changes in qwen_profile.TWEAKS.items()}
        with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(qwen_profile, "TWEAKS", wrapped)
            with qwen_profile._tweaked(tweaks):
                tokens = BatchOptions(attention=attention).decoder(model, 4096).generate(
                    prompt.expand(rows, -1), torch.ones(rows, prompt.shape[1], dtype=torch.long), 12)
        return tokens, set(calls)

    functions = sorted(name for name, changes in qwen_profile.TWEAKS.items()
                       if not all(isinstance(change, dict) for change in changes))
    # flex replaces the whole attention, scores-red a part of matmul's: they are checked apart. flex
    # rounds as the products do (bf16 weights times bf16 values), not as the fused SDPA kernel does.
    for attention, rows in (("matmul", 1), ("packed", 3)):
        expected, _ = decode([], attention, rows)
        others = sorted(set(qwen_profile.TWEAKS) - {"flex"})
        used = set(functions) - {"flex"} - ({"scores-red"} if attention == "packed" else set())
        assert decode(others, attention, rows) == (expected, used)
        assert decode(["flex"], attention, rows) == (decode([], "matmul", rows)[0], {"flex"})


@pytest.mark.parametrize("name, kind", [
    ("triton_poi_fused_clone_convolution_native_group_norm_silu_94", "triton_pointwise"),  # not a cuDNN conv
    ("triton_tem_fused__to_copy_add_addmm_1", "triton_template"),  # not a copy
    ("triton_red_fused__to_copy_add_mean_mm_8", "triton_reduction"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
    ("_attention_partial_kernel", "attention"),  # pipelines/split_kv_attention.py's
    ("_skinny_kernel", "gemm"),  # pipelines/skinny_linear.py's
    ("_vector_kernel", "gemm"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc", "conv"),
    ("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_bias_TNT", "gemm"),
    ("Memcpy DtoD (Device -> Device)", "copy_or_fill"),
])
def test_profiles_file_each_kernel_under_what_it_computes(name, kind):
    from bench.profiling import kernel_kind

    assert kernel_kind(name) == kind
