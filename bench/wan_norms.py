"""WAN's row kernels (pipelines/wan_fusions.py, GENQ_WAN_FUSE) at a block's shape, per launch shape.

    python -m bench.wan_norms [--tiny] [--out DIR] [--budget-s S]

WAN 2.1 1.3B at 480x832x81: 32,760 tokens of 1536 channels. For each Launch (token rows per program,
warps) of a sweep: a block's three layer-norm passes (norm1 with modulation; the gated residual with the
affine norm2; the residual with the modulated norm3) and the query/key norm + RoPE, each timed as 60
calls (a guided step's blocks) replayed as a CUDA graph, with the bytes each moves at its TB/s. Writes
OUT/wan_norms.json: every launch shape's figures and the best per kernel (the module's defaults are
what to set from it).
"""
from __future__ import annotations

import itertools

import torch

from bench.harness import Report, graph_time, parse_args
from pipelines import wan_fusions

CALLS = 60  # 30 blocks, two forwards a guided step


def _inputs(tokens: int, c: int, heads: int, device: str):
    g = torch.Generator(device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, device=device, generator=g).to(dt)
    head_dim = c // heads
    angle = rand(tokens, head_dim // 2, dt=torch.float64)
    rotary = tuple(f(angle).repeat_interleave(2, -1).view(1, tokens, 1, head_dim) for f in (torch.cos, torch.sin))
    modulation = rand(1, 6, c, dt=torch.float32).chunk(6, dim=1)  # as the block slices its table
    norms = [torch.nn.LayerNorm(c, elementwise_affine=affine, device=device, dtype=dtype) for affine in (0, 1, 0)]
    return {"x": rand(1, tokens, c), "a": rand(1, tokens, c), "qkv": rand(1, tokens, 3 * c), "w": rand(c),
            "rotary": rotary, "modulation": modulation, "norms": norms, "head_dim": head_dim}


def _kernels(t: dict) -> dict:
    shift, scale, gate, c_shift, c_scale, _ = t["modulation"]
    x, a = t["x"], t["a"]
    n1, n2, n3 = t["norms"]
    row = x[0, 0].numel() * x.element_size()
    rows = x.shape[1]
    return {  # name: (call, bytes moved a call)
        "norm1_modulated": (lambda: wan_fusions.residual_norm(n1, x, scale=scale, shift=shift), 2 * rows * row),
        "residual_gated_norm2": (lambda: wan_fusions.residual_norm(n2, x, a, gate), 4 * rows * row),
        "residual_norm3_modulated": (lambda: wan_fusions.residual_norm(n3, x, a, scale=c_scale, shift=c_shift),
                                     4 * rows * row),
        "qk_norm_rope": (lambda: wan_fusions._qk_norm_rope(t["qkv"], t["w"], t["w"], *t["rotary"], 1e-6,
                                                           t["head_dim"]), 4 * rows * row),
    }


def _sweep(args, report: Report, device: str) -> dict:
    tokens, c, heads = (64, 48, 2) if args.tiny else (32760, 1536, 12)
    kernels = _kernels(_inputs(tokens, c, heads, device))
    launches = [wan_fusions.Launch(2, 2)] if args.tiny else \
        [wan_fusions.Launch(r, w) for r, w in itertools.product((1, 2, 4, 8), (2, 4, 8, 16))]
    reps = 1 if args.tiny else CALLS
    defaults = {"NORM_ROPE": wan_fusions.NORM_ROPE, "RESIDUAL_NORM": wan_fusions.RESIDUAL_NORM}
    out = {"tokens": tokens, "channels": c, "calls": reps, "defaults": {k: v._asdict() for k, v in defaults.items()},
           "kernels": {name: [] for name in kernels}}
    for launch in launches:
        if report.elapsed() > args.budget_s:
            out["sweep_cut_by_budget"] = True
            break
        wan_fusions.NORM_ROPE = wan_fusions.RESIDUAL_NORM = launch
        for name, (call, moved) in kernels.items():
            try:
                seconds = graph_time(lambda: [call() for _ in range(reps)], 1, device) / reps
                out["kernels"][name].append({**launch._asdict(), "us": round(seconds * 1e6, 1),
                                             "tb_s": round(moved / seconds / 1e12, 2)})
            except Exception as exc:  # noqa: BLE001  a launch shape Triton cannot build (registers): skip it
                out["kernels"][name].append({**launch._asdict(), "error": type(exc).__name__})
    wan_fusions.NORM_ROPE, wan_fusions.RESIDUAL_NORM = defaults.values()
    out["best"] = {name: min((r for r in rows if "us" in r), key=lambda r: r["us"], default=None)
                   for name, rows in out["kernels"].items()}
    out["at_defaults"] = {name: next((r for r in rows if "us" in r and (r["rows"], r["warps"]) == tuple(
        defaults["NORM_ROPE" if name == "qk_norm_rope" else "RESIDUAL_NORM"])), None)
        for name, rows in out["kernels"].items()}
    return out


def main():
    args = parse_args(__doc__)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    report = Report("wan_norms", args)
    report.stage("sweep", lambda: _sweep(args, report, device))


if __name__ == "__main__":
    main()
