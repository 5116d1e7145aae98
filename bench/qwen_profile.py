"""Where a one-row Qwen 2.5 7B decode step spends its time: a kernel-level profile of the chat engine's
compiled decoder (the production `BatchOptions` defaults), against the bandwidth floor.

    python -m bench.qwen_profile [--tiny] [--attention packed,matmul,matmul@max-autotune,matmul+down-split] [--tokens 64] [--out DIR]

For each decode attention (GENQ_CHAT_ATTENTION), optionally `@` a torch.compile mode (GENQ_CHAT_COMPILE_MODE;
max-autotune turns the single-row coordinate-descent tuning off, as it autotunes itself) and `+` candidate
changes not in production yet (TWEAKS below, several joined by `+`), each measured against the same run's
production variant before it is adopted: warm the 1-row
shape, time a 300-token prompt + `--tokens` greedy tokens, then run the same under torch.profiler and sum
CUDA kernel time per step by kind (matrix products, Triton reductions, Triton pointwise, attention, copies,
other), count kernels per step, and report the step's wall time minus its kernel time (idle gaps between
kernels) and the fraction of the card's datasheet bandwidth reached. Writes OUT/qwen_profile.json and the
top kernels table OUT/qwen_profile_<attention>[_<mode>].txt.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import pipelines.decoder as decoder_module
from bench.harness import bandwidth_tb_s, decode_read_bytes
from bench.models import build_qwen
from bench.profiling import header, kernel_times, parse_args
from pipelines import fused
from pipelines.chat_options import BatchOptions


@torch.library.custom_op("genq_bench::silu_mul", mutates_args=())
def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@_silu_mul.register_fake
def _(gate, up):
    return torch.empty_like(gate)


def _mlp_down_split(module, h, f):
    """SiLU(gate) * up written out by an opaque op, so the down projection's reduction reads 2 bytes an
    input instead of recomputing SiLU from gate and up in every output row's program."""
    if f.gate_up is None:
        return module(h)
    gate, up = F.linear(h, f.gate_up, f.gate_up_bias).split(f.gate_up_sizes, dim=-1)
    return module.down_proj(_silu_mul(gate, up))


def _qkv_mm(attn, h, f):
    """q|k|v as a product plus the bias: one row's product becomes an inductor reduction with the bias
    fused, instead of cuBLAS's addmm."""
    if f.qkv is None:
        return fused.project_qkv(attn, h, f)
    return (F.linear(h, f.qkv) + f.qkv_bias).split(f.qkv_sizes, dim=-1)


def _scores_reduced(q, keys):
    """The scores as an fp32 reduction reading the bf16 keys, not a product of fp32 copies of the cache."""
    return (q.float().unsqueeze(-2) * keys.unsqueeze(-3).float()).sum(-1)


# name -> (module, attribute, replacement) while the variant compiles and runs. Only functions the decode
# step reads as globals: dynamo guards on them, so a patched variant compiles its own graph. (An inductor
# setting alone would not: dynamo reuses the first variant's graph for an equal decoder, as a first try of
# wider coordinate descent showed, warm in 0.1 s.)
TWEAKS = {"down-split": (decoder_module, "mlp", _mlp_down_split),
          "qkv-mm": (decoder_module, "project_qkv", _qkv_mm),
          "scores-red": (decoder_module, "attention_scores", _scores_reduced)}


@contextlib.contextmanager
def _tweaked(names: list[str]):
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(*TWEAKS[name]))
        yield


def _profile(decoder, prompt: list[int], tokens: int, out: Path, mode: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    def run() -> None:
        decoder.generate(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), tokens)

    run()  # warm (compiles the shape on first use)
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    by_kind, count, rows = kernel_times(prof, out / f"qwen_profile_{mode}.txt")
    steps = tokens  # the prefill's kernels are in the totals too; they are small next to the decode steps
    kernel_ms = sum(by_kind.values()) / 1000
    wall = min(times)
    return {"tokens": tokens, "wall_s_min": round(wall, 4), "tok_s": round(tokens / wall, 1),
            "step_ms_wall": round(wall / steps * 1000, 3),
            "step_ms_kernels": round(kernel_ms / steps, 3),
            "step_ms_idle_between_kernels": round(wall / steps * 1000 - kernel_ms / steps, 3),
            "kernels_per_step": round(count / steps, 1),
            "step_ms_by_kind": {k: round(v / 1000 / steps, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"ms_total": round(us / 1000, 3), "calls": n, "name": name} for us, n, name in rows[:12]]}


def main() -> int:
    args, out = parse_args(__doc__, "qwen_profile", lambda ap: (
        ap.add_argument("--attention", default="packed,matmul"), ap.add_argument("--tokens", type=int, default=64),
        ap.add_argument("--prompt-tokens", type=int, default=300)))
    if args is None:
        return 1
    variants = list(filter(None, args.attention.split(",")))
    unknown = {t for v in variants for t in v.split("+")[1:]} - TWEAKS.keys()
    if unknown:
        raise SystemExit(f"--attention: unknown tweak(s) {sorted(unknown)}; known: {sorted(TWEAKS)}")
    model = build_qwen("cuda", tiny=args.tiny)
    weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    read, bandwidth = decode_read_bytes(model), bandwidth_tb_s(torch.cuda.get_device_name()) or 4.8
    prompt = torch.randint(100, 1000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    report = {**header(), "weights_gb": round(weight_gb, 2), "modes": {}}
    path = out / "qwen_profile.json"
    for variant in variants:
        spec, *tweaks = variant.split("+")
        attention, _, mode = spec.partition("@")
        # otherwise the production defaults; max-autotune does its own tuning
        compiling = {"compile_mode": mode, "tune_single_row": not mode.startswith("max-")} if mode else {}
        decoder = BatchOptions(attention=attention, **compiling).decoder(model, 4096)
        label = variant.replace("@", "_").replace("+", "_")
        t0 = time.perf_counter()
        with torch.inference_mode(), _tweaked(tweaks):  # the patched functions are traced inside
            decoder.warm(1, 1024)
            rec = {"warm_s": round(time.perf_counter() - t0, 1)}
            rec.update(_profile(decoder, prompt, args.tokens, out, label))
        achieved = read / (rec["step_ms_wall"] / 1000) / 1e12
        rec.update(bytes_read_per_step_gb=round(read / 1e9, 2), card_bandwidth_tb_s=bandwidth,
                   bandwidth_floor_ms=round(read / (bandwidth * 1e12) * 1000, 3),
                   achieved_tb_s=round(achieved, 2), bandwidth_fraction=round(achieved / bandwidth, 3))
        report["modes"][label] = rec
        decoder.release_memory()
        path.write_text(json.dumps(report, indent=1))
        print(label, json.dumps(rec)[:1200], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
