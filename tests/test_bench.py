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


@pytest.mark.parametrize("name, figures", [
    ("sdxl", {"speedup_1img_2steps_min", "throughput_6img_2steps_min", "accel_step_ms"}),
    ("qwen", {"speedup_1stream", "engine_1stream_tok_s", "engine_3streams_tok_s", "engine_1stream_ttft_s",
              "engine_1stream_bandwidth_fraction", "targets"}),
    ("wan", {"speedup_per_step_min", "vae_decode_speedup"}),
])
def test_each_benchmark_runs_every_stage_and_writes_its_summary(tmp_path, name, figures):
    done = run_bench(f"bench.{name}", tmp_path, "--runs", "1", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / f"{name}_tiny.json").read_text())
    assert report["errors"] == {} and report["skipped"] == []
    assert figures <= set(report["summary"]), report["summary"]
    assert "equality" in report["stages"]  # every speed-up is checked against the baseline
    assert report["env"]["card"] == "cpu"


def test_the_profiles_need_a_gpu_and_say_so(tmp_path):
    done = run_bench("bench.sdxl_profile", tmp_path)
    assert done.returncode == 1 and "needs CUDA" in done.stdout


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
