"""Decode attention of the chat engine at its batch shapes: kernel time and bandwidth per implementation.

    python -m bench.decode_attention [--tiny] [--out DIR] [--budget-s S]

Qwen 2.5 7B's heads (4 key/value heads, 7 grouped query heads of 128). For each (rows, cache length,
live columns) shape: cuDNN's fused SDPA (`packed`), the matrix products (`matmul`) and the split-KV Triton
kernels (pipelines/split_kv_attention.py) over a sweep of Config (inner block, blocks per SM, warps,
stages). A figure is the 28 layers' attention of one step (each layer its own cache, as in a step, so L2
does not serve it), replayed as a CUDA graph; GB/s counts the live keys and values read. Writes
OUT/decode_attention.json with every config's time and the best one per shape, and each method's rel. L2
against an fp32 computation.
"""
from __future__ import annotations

import itertools

import torch

from bench.harness import Report, graph_time, parse_args
from pipelines import decoder

LAYERS, KV_HEADS, REP, HEAD_DIM = 28, 4, 7, 128
# name: rows, cache length, live columns (the bench's 300 + 256 tokens; a 3500-token prompt)
SHAPES = {"1x2048": (1, 2048, 556), "16x1024": (16, 1024, 556), "1x4096": (1, 4096, 3600),
          "16x4096": (16, 4096, 3600)}
TINY = {"2x128": (2, 128, 100)}


def _configs(tiny: bool):
    from pipelines.split_kv_attention import Config

    if tiny:
        yield Config()
        return
    for block, per_sm, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (4, 8), (2, 3)):
        yield Config(block, per_sm, warps, stages)


def _shape(rows: int, length: int, live: int, args, report: Report, device: str) -> dict:
    from pipelines import split_kv_attention as split

    layers = 2 if args.tiny else LAYERS
    g = torch.Generator(device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(rows, KV_HEADS, REP, HEAD_DIM, device=device, generator=g).to(dtype)
    caches = [[torch.randn(rows, KV_HEADS, length, HEAD_DIM, device=device, generator=g).to(dtype) for _ in range(2)]
              for _ in range(layers)]
    keep = (torch.arange(length, device=device) < live).expand(rows, length)[:, None, None, :]
    scale = HEAD_DIM ** -0.5
    live_bytes = layers * rows * live * KV_HEADS * HEAD_DIM * 2 * q.element_size()
    reps = 1 if args.tiny else 20
    exact = decoder.matmul_attention(q.float(), caches[0][0].float(), caches[0][1].float(), keep, scale)

    def measure(attend) -> dict:
        seconds = graph_time(lambda: [attend(q, k, v, keep, scale) for k, v in caches], reps, device)
        got = attend(q, caches[0][0], caches[0][1], keep, scale).float()
        return {"us_per_step": round(seconds * 1e6, 1), "gbs": round(live_bytes / seconds / 1e9, 1),
                "rel_l2_vs_fp32": round(float((got - exact).norm() / exact.norm()), 6)}

    row = {"rows": rows, "length": length, "live": live, "layers": layers,
           "packed": measure(decoder.packed_attention), "matmul": measure(decoder.matmul_attention), "split": []}
    attend = decoder.split_attention if device == "cuda" else split.split_kv_attention
    for cfg in _configs(args.tiny):
        if report.elapsed() > args.budget_s:
            row["sweep_cut_by_budget"] = True
            break
        split.CONFIG = cfg
        try:
            row["split"].append({**cfg._asdict(), **measure(attend)})
        except Exception as exc:  # a config Triton cannot compile (shared memory, registers): skip it
            row["split"].append({**cfg._asdict(), "error": type(exc).__name__})
    split.CONFIG = split.Config()
    timed = [r for r in row["split"] if "us_per_step" in r]
    if timed:
        row["split_best"] = min(timed, key=lambda r: r["us_per_step"])
        row["split_default"] = next((r for r in timed if tuple(r[f] for f in split.Config._fields) == split.CONFIG),
                                    None)
    return row


def main():
    args = parse_args(__doc__)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    report = Report("decode_attention", args)
    for name, (rows, length, live) in (TINY if args.tiny else SHAPES).items():
        report.stage(name, lambda: _shape(rows, length, live, args, report, device))


if __name__ == "__main__":
    main()
