"""Where a Qwen 2.5 7B decode step spends its time: a kernel-level profile of the chat engine's compiled
decoder (the production `BatchOptions` defaults), against the bandwidth floor.

    python -m bench.qwen_profile [--tiny] [--attention packed,matmul,matmul@max-autotune,matmul+flex+pdl]
                                 [--rows 1] [--tokens 64] [--weights bf16,fp8] [--out DIR]

For each decode attention (GENQ_CHAT_ATTENTION), optionally `@` a torch.compile mode (GENQ_CHAT_COMPILE_MODE;
max-autotune turns the single-row coordinate-descent tuning off, as it autotunes itself) and `+` candidate
changes not in production yet (TWEAKS below, several joined by `+`), each measured against the same run's
production variant before it is adopted: warm the `--rows` x 1024 shape, time `--rows` 300-token prompts
+ `--tokens` greedy tokens, then run the same under torch.profiler and sum CUDA kernel time per step by
kind (matrix products, Triton reductions, Triton pointwise, attention, copies, other), count kernels per
step, and report the step's wall time minus its kernel time (idle gaps between kernels) and the fraction
of the card's datasheet bandwidth reached (weights read per step). Writes OUT/qwen_profile.json and the
top kernels table OUT/qwen_profile_<attention>[_<mode>].txt. `--weights bf16,fp8` runs every variant in
bf16, then quantises the same model in place (GENQ_CHAT_WEIGHTS=fp8, pipelines/fp8_linear.py) and runs
them again, labelled `<variant>_fp8`: the two weight formats' steps in one process.
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


def _flex_attention(q, keys, values, keep, scaling):
    """Decode attention as flex attention's decoding kernel (split over the cache length, the grouped
    query heads of a key/value head in one block), masked by a score modification."""
    from torch.nn.attention.flex_attention import flex_attention

    rows, kv_heads, rep, dim = q.shape
    live = keep.reshape(rows, -1)

    def masked(score, row, head, query, position):
        return torch.where(live[row, position], score, -float("inf"))

    o = flex_attention(q.reshape(rows, kv_heads * rep, 1, dim), keys, values, score_mod=masked, scale=scaling,
                       enable_gqa=True)
    return o.reshape(rows, kv_heads, rep, dim)


# name -> what the variant changes while it compiles and runs: (module, attribute, replacement) for a
# function the decode step reads as a global (dynamo guards on it), or a dict of inductor settings.
# main() resets dynamo before each variant, so every variant compiles its own graph (without the reset
# dynamo would reuse the first variant's graph for an equal decoder: a first try of a wider coordinate
# descent was warm in 0.1 s).
_cublas_linear = F.linear


def _skinny_or_cublas(x, weight, bias=None):
    """F.linear through pipelines/skinny_linear.py's kernels where they take the input (the decode step's
    products, the prefill's LM head), cuBLAS elsewhere."""
    from pipelines import skinny_linear

    if x.is_cuda and skinny_linear.supported(x, weight):
        return skinny_linear.linear(x, weight, bias)
    return _cublas_linear(x, weight, bias)


def _load_skinny_table(path: str, rows: int) -> None:
    """skinny_linear.TABLE from bench/skinny_gemm.py's JSON: each shape's best config at `rows` rows, for
    bf16 and FP8 weights."""
    from pipelines import skinny_linear

    stages = json.loads(Path(path).read_text())["stages"]
    for rec in stages.values():
        if rec.get("rows") == rows and "best" in rec:
            best = {k: v for k, v in rec["best"].items() if k in skinny_linear.Config._fields}
            key = (rec["n"], rec["k"], rows == 1, rec.get("weights", "bf16") == "fp8")
            skinny_linear.TABLE[key] = skinny_linear.Config(**best)


TWEAKS = {"down-split": [(decoder_module, "mlp", _mlp_down_split)],
          "qkv-mm": [(decoder_module, "project_qkv", _qkv_mm)],
          "scores-red": [(decoder_module, "attention_scores", _scores_reduced)],
          "flex": [(decoder_module, "matmul_attention", _flex_attention),
                   (decoder_module, "packed_attention", _flex_attention)],
          # Programmatic dependent launch: a Triton kernel starts while the one before it drains (Hopper)
          "pdl": [{"triton.enable_pdl": True}],
          # inductor benchmarks Triton templates against cuBLAS for every matrix product of the graph
          "mm-autotune": [{"max_autotune_gemm": True}],
          # every product of up to 16 rows through the Triton kernels (--skinny-table: their configs)
          "skinny": [(F, "linear", _skinny_or_cublas)]}


@contextlib.contextmanager
def _tweaked(names: list[str]):
    import torch._inductor.config as inductor_config

    with contextlib.ExitStack() as stack:
        for name in names:
            for change in TWEAKS[name]:
                stack.enter_context(inductor_config.patch(change) if isinstance(change, dict)
                                    else mock.patch.object(*change))
        yield


def _profile(decoder, prompt: list[int], rows: int, tokens: int, out: Path, mode: str, rec: dict) -> list[int]:
    """Times the decoder into `rec`; row 0's greedy tokens."""
    from torch.profiler import ProfilerActivity, profile

    def run() -> list[int]:
        return decoder.generate(torch.tensor([prompt] * rows), torch.ones(rows, len(prompt), dtype=torch.long),
                                tokens)[0]

    run()  # warm (compiles the shape on first use)
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        tokens_out = run()
        torch.cuda.synchronize()
    by_kind, count, table = kernel_times(prof, out / f"qwen_profile_{mode}.txt")
    steps = tokens  # the prefill's kernels are in the totals too; they are small next to the decode steps
    kernel_ms = sum(by_kind.values()) / 1000
    wall = min(times)
    rec.update({"rows": rows, "tokens": tokens, "wall_s_min": round(wall, 4), "tok_s": round(rows * tokens / wall, 1),
                "step_ms_wall": round(wall / steps * 1000, 3),
                "step_ms_kernels": round(kernel_ms / steps, 3),
                "step_ms_idle_between_kernels": round(wall / steps * 1000 - kernel_ms / steps, 3),
                "kernels_per_step": round(count / steps, 1),
                "step_ms_by_kind": {k: round(v / 1000 / steps, 3)
                                    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
                "top_kernels": [{"ms_total": round(us / 1000, 3), "calls": n, "name": name}
                                for us, n, name in table[:12]]})
    return tokens_out


def _attention_error(decoder, rows: int, length: int = 1024, live: int = 364) -> float:
    """Rel. L2 of the variant's decode attention against an fp32 computation, on random bf16 inputs of
    the profiled shape (every other row left-padded by 100 columns); read through the decoder module, so
    a `+` candidate's replacement is what is measured."""
    mode = decoder.attention_mode(rows)
    dev = decoder.device
    g = torch.Generator(dev).manual_seed(0)
    shape = (rows, decoder.kv_heads, length, decoder.head_dim)
    q = torch.randn(rows, decoder.kv_heads, decoder.n_rep, decoder.head_dim, device=dev, generator=g)
    keys, values = torch.randn(shape, device=dev, generator=g), torch.randn(shape, device=dev, generator=g)
    cols = torch.arange(length, device=dev)
    start = (torch.arange(rows, device=dev) % 2 * 100)[:, None]
    keep = ((cols >= start) & (cols < live))[:, None, None, :]
    bf = [t.to(torch.bfloat16) for t in (q, keys, values)]
    exact = decoder_module.matmul_attention(*(t.float() for t in bf), keep, decoder.scaling)
    got = getattr(decoder_module, f"{mode}_attention")(*bf, keep, decoder.scaling).float()
    return float((got - exact).norm() / exact.norm())


def _variant(model, variant: str, prompt: list[int], args, out: Path, label: str) -> tuple[dict, list[int]]:
    spec, *tweaks = variant.split("+")
    attention, _, mode = spec.partition("@")
    # otherwise the production defaults; max-autotune does its own tuning
    compiling = {"compile_mode": mode, "tune_single_row": not mode.startswith("max-")} if mode else {}
    decoder = BatchOptions(attention=attention, **compiling).decoder(model, 4096)
    t0 = time.perf_counter()
    torch._dynamo.reset()
    try:
        with torch.inference_mode(), _tweaked(tweaks):  # the patched functions are traced inside
            decoder.warm(args.rows, 1024)
            rec = {"warm_s": round(time.perf_counter() - t0, 1)}
            tokens = _profile(decoder, prompt, args.rows, args.tokens, out, label, rec)
            if decoder.attention_mode(args.rows) != "repeat":  # the modes with a function of their own
                rec["attention_rel_l2_vs_fp32"] = round(_attention_error(decoder, args.rows), 6)
    finally:
        decoder.release_memory()
    return rec, tokens


def main() -> int:
    args, out = parse_args(__doc__, "qwen_profile", lambda ap: (
        ap.add_argument("--attention", default="packed,matmul"), ap.add_argument("--tokens", type=int, default=64),
        ap.add_argument("--prompt-tokens", type=int, default=300), ap.add_argument("--rows", type=int, default=1),
        ap.add_argument("--skinny-table", default=None, help="bench/skinny_gemm.py's JSON: configs for +skinny"),
        ap.add_argument("--weights", default="bf16", help="bf16, fp8 or bf16,fp8 (in that order, one model)")))
    if args is None:
        return 1
    variants = list(filter(None, args.attention.split(",")))
    unknown = {t for v in variants for t in v.split("+")[1:]} - TWEAKS.keys()
    if unknown:
        raise SystemExit(f"--attention: unknown tweak(s) {sorted(unknown)}; known: {sorted(TWEAKS)}")
    formats = args.weights.split(",")
    # bf16 first: fp8 quantises the model in place
    if not formats or set(formats) - {"bf16", "fp8"} or formats != sorted(set(formats)):
        raise SystemExit(f"--weights: {args.weights!r}; expected bf16, fp8 or bf16,fp8")
    if args.skinny_table:
        _load_skinny_table(args.skinny_table, args.rows)
    model = build_qwen("cuda", tiny=args.tiny)
    bandwidth = bandwidth_tb_s(torch.cuda.get_device_name()) or 4.8
    prompt = torch.randint(100, 1000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    report = {**header(), "modes": {}}
    path = out / "qwen_profile.json"
    first_tokens = None
    for weights, variant in [(w, v) for w in formats for v in variants]:
        if weights == "fp8" and "weights_gb_fp8" not in report:
            from pipelines.fp8_linear import quantise_model

            report["fp8_replaced_layers"] = quantise_model(model)
            first_tokens = None  # FP8 weights' tokens are compared among themselves
        key = "weights_gb" if weights == "bf16" else "weights_gb_fp8"
        report[key] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 2)
        read = decode_read_bytes(model)
        label = variant.replace("@", "_").replace("+", "_") + ("_fp8" if weights == "fp8" else "")
        try:
            rec, tokens = _variant(model, variant, prompt, args, out, label)
        except Exception as exc:  # a candidate that does not compile on this torch is a result too
            rec = {"error": repr(exc)[-3000:]}  # the message is at the end
        else:
            first_tokens = tokens if first_tokens is None else first_tokens
            # greedy tokens of row 0 agreeing with the first variant's, up to the first difference
            rec["tokens_agreeing_with_first_variant"] = next(
                (i for i, (a, b) in enumerate(zip(tokens, first_tokens)) if a != b), len(tokens))
            achieved = read / (rec["step_ms_wall"] / 1000) / 1e12
            rec.update(bytes_read_per_step_gb=round(read / 1e9, 2), card_bandwidth_tb_s=bandwidth,
                       bandwidth_floor_ms=round(read / (bandwidth * 1e12) * 1000, 3),
                       achieved_tb_s=round(achieved, 2), bandwidth_fraction=round(achieved / bandwidth, 3))
        report["modes"][label] = rec
        path.write_text(json.dumps(report, indent=1))
        print(label, json.dumps(rec)[:1200], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
