"""Self-attention at WAN's (and SDXL's) shapes: cuDNN's bf16 flash kernel against pipelines/fp8_attention.py.

    python -m bench.fp8_attention [--tiny] [--shapes wan,sdxl64,sdxl32] [--out DIR] [--budget-s S]

Per shape: SDPA in bf16 with the cuDNN and flash backends (what diffusers' `_native_cudnn` and `native`
run), the FP8 kernel alone on quantised operands over a sweep of Config, and the whole FP8 path
(quantisation and kernel) eager and compiled, in TFLOP/s of the exact product (4 S^2 H D per batch
entry). Every time is a CUDA-graph replay (bench.harness.graph_time). The difference of each bf16 and FP8
result from an fp32 reference is measured on Gaussian inputs and on "peaked" ones (queries x4: a sharper
softmax, as trained models have). Writes OUT/fp8_attention.json.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.harness import Report, compare, graph_time, parse_args

# (batch, tokens, heads, head dim): WAN 2.1 1.3B at 480x832x81 (one forward), SDXL 1024^2 at its two
# attention resolutions (UNet batch 2)
SHAPES = {"wan": (1, 32760, 12, 128), "sdxl64": (2, 4096, 10, 64), "sdxl32": (2, 1024, 20, 64)}
TINY = {"tiny": (1, 200, 2, 32)}


def configs(tiny: bool):
    from pipelines.fp8_attention import Config

    if tiny:
        yield Config(64, 64, 4, 1)
        return
    for bm, bn, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4)):
        yield Config(bm, bn, warps, stages)


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return run


def _reference(q, k, v):
    """fp32 attention, query chunks so no score matrix beyond 2 GB is held."""
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))
    step = max(1, int(5e8 // (kf.shape[1] * kf.shape[2])))
    outs = [(qf[:, :, i:i + step] @ kf.transpose(-1, -2) / qf.shape[-1] ** 0.5).softmax(-1) @ vf
            for i in range(0, qf.shape[2], step)]
    return torch.cat(outs, dim=2).transpose(1, 2)


def _shape(name, shape, args, report: Report, device: str) -> dict:
    from pipelines import fp8_attention as fa

    b, s, h, d = shape
    flop = 4 * b * s * s * h * d
    g = torch.Generator(device).manual_seed(0)
    dtype = torch.bfloat16
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype, generator=g) for _ in range(3))
    reps = 1 if args.tiny else 5
    row = {"batch": b, "tokens": s, "heads": h, "head_dim": d, "tflop": round(flop / 1e12, 2)}
    tflops = lambda sec: round(flop / sec / 1e12, 1)  # noqa: E731

    def timed(label, fn):
        try:
            sec = graph_time(fn, reps, device) / reps
        except Exception as exc:  # noqa: BLE001  a backend this build or card lacks: recorded, not fatal
            row[f"{label}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            return None
        row[f"{label}_ms"], row[f"{label}_tflop_s"] = round(sec * 1e3, 3), tflops(sec)
        return sec

    if device == "cuda":
        base = timed("cudnn_bf16", lambda: _sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v))
        timed("flash_bf16", lambda: _sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v))
    else:
        base = timed("math_bf16", lambda: _sdpa(SDPBackend.MATH)(q, k, v))
    x = fa.quantise(q, k, v)
    results = []
    for cfg in configs(args.tiny):
        if report.elapsed() > args.budget_s:
            row["sweep_cut_by_budget"] = True
            break
        try:
            sec = graph_time(lambda: torch.ops.genq.fp8_attention(*x, s, dtype, *cfg), reps, device) / reps
        except Exception as exc:  # noqa: BLE001  registers or shared memory out of reach: skip the config
            row.setdefault("failed_configs", []).append([*cfg, f"{type(exc).__name__}"])
            continue
        results.append((sec, cfg))
    results.sort(key=lambda item: item[0])
    row["kernel_top"] = [{**c._asdict(), "ms": round(t * 1e3, 3), "tflop_s": tflops(t)} for t, c in results[:5]]
    best = results[0][1] if results else fa.Config()
    row["best_config"] = best._asdict()
    eager = timed("fp8_eager_path", lambda: fa.attention(q, k, v, cfg=best))
    compiled_fn = torch.compile(lambda q, k, v: fa.attention(q, k, v, cfg=best)) if device == "cuda" else None
    path = timed("fp8_compiled_path", lambda: compiled_fn(q, k, v)) if compiled_fn else eager
    if base and results:
        row["kernel_speedup_vs_base"] = round(base / results[0][0], 3)
        row["path_speedup_vs_base"] = round(base / min(t for t in (eager, path) if t), 3)
    # differences from fp32, on Gaussian inputs and on sharper softmaxes
    base_fn = _sdpa(SDPBackend.CUDNN_ATTENTION if device == "cuda" else SDPBackend.MATH)
    for label, qq in (("gaussian", q), ("peaked_x4", q * 4)):
        ref = _reference(qq, k, v)
        row[f"diff_{label}"] = {"bf16_sdpa": compare(ref, base_fn(qq, k, v)),
                                "fp8": compare(ref, fa.attention(qq, k, v, cfg=best)),
                                "fp8_operands_only": compare(ref, fa.reference(fa.quantise(qq, k, v), s))}
    return row


def main():
    args = parse_args(__doc__, lambda ap: ap.add_argument("--shapes", default="wan,sdxl64,sdxl32"))
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    report = Report("fp8_attention", args)
    shapes = TINY if args.tiny else {n: SHAPES[n] for n in args.shapes.split(",")}
    for name, shape in shapes.items():
        report.stage(name, lambda: _shape(name, shape, args, report, device))


if __name__ == "__main__":
    main()
