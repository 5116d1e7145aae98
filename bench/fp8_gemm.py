"""WAN 2.1 1.3B's video-token products at 480x832x81 (32,760 rows): bf16 cuBLAS against e4m3 (`fp8`).

    python -m bench.fp8_gemm [--tiny] [--shapes wan,qwen,sdxl] [--out DIR] [--budget-s S]

`qwen`: Qwen 2.5 7B's products for a 300-token prompt (GENQ_CHAT_WEIGHTS=fp8's prefill path) instead.
`sdxl`: the SDXL UNet's transformer products of one guided 1024x1024 image (UNet batch 2: 8,192 rows at
640 channels, 2,048 at 1280), in fp16 as the UNet runs (bench/sdxl.py --fp8-linear); `sdxl6`: a 6-image job's
(batch 12, one graph).

Per layer of a block (q|k|v fused, attention output, cross-attention query, feed-forward in and out):
F.linear in the model's dtype (the exact path; labelled `bf16`, fp16 for SDXL), pipelines/fp8_rows.py's
quantisation alone (and whether it gives torch's values), torch._scaled_mm alone on operands quantised beforehand (rowwise
scales; with and without fast accumulation), and pipelines/fp8_linear.scaled_mm whole (each row's
quantisation and the product) compiled with fullgraph=True, as the compiled WAN blocks call it
(GENQ_WAN_LINEAR=fp8), and the Fp8Linear module compiled the same way (`module`: an error there is a graph
break in its forward). Times are CUDA-graph replays, in TFLOP/s of the product; `rel_l2_vs_bf16` is the
whole path's difference from bf16 on Gaussian inputs. Writes OUT/fp8_gemm.json.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import Report, compare, graph_time, parse_args

ROWS = 32760  # video tokens of one pass at 480x832x81
DIM, FFN = 1536, 8960
LAYERS = {"attn1.to_qkv": (3 * DIM, DIM), "attn_out": (DIM, DIM), "ffn.net.0.proj": (FFN, DIM),
          "ffn.net.2": (DIM, FFN)}  # (out features, in features); attn2.to_q and to_out.0 are attn_out's shape
# Qwen 2.5 7B, a 300-token prompt: q|k|v, o, gate|up, down
QWEN_ROWS, QWEN = 300, {"qwen.qkv": (4608, 3584), "qwen.o": (3584, 3584), "qwen.gate_up": (37888, 3584),
                        "qwen.down": (3584, 18944)}
TINY_ROWS, TINY = 64, {"tiny": (32, 32)}


def _sdxl(images: int) -> dict:
    """Per transformer block: q|k|v, the output shape three times (self-attention output, cross-attention
    query and output), the feed-forward's two layers; and each transformer's proj_in and proj_out (output
    shape). (out, in, rows, count per guided step): 10 blocks in 5 transformers at 64x64 latents, 60 in 6
    at 32x32."""
    layers = {}
    for side, width, blocks, transformers in ((64, 640, 10, 5), (32, 1280, 60, 6)):
        rows = 2 * images * side * side
        layers.update({f"sdxl{side}.qkv": (3 * width, width, rows, blocks),
                       f"sdxl{side}.out": (width, width, rows, 3 * blocks + 2 * transformers),
                       f"sdxl{side}.ff1": (8 * width, width, rows, blocks),
                       f"sdxl{side}.ff2": (width, 4 * width, rows, blocks)})
    return layers


def _counted(layers: dict, rows: int, counts: dict | None = None) -> dict:
    return {name: (n, k, rows, (counts or {}).get(name, 1)) for name, (n, k) in layers.items()}


# name: (out features, in features, rows, times per block pass or guided step), and the dtype the model runs in
SETS = {
    # one WAN block, one pass: the attention-output shape three times (attn1, attn2 q and out)
    "wan": (_counted(LAYERS, ROWS, {"attn_out": 3}), torch.bfloat16),
    "qwen": (_counted(QWEN, QWEN_ROWS), torch.bfloat16),
    "sdxl": (_sdxl(1), torch.float16),
    "sdxl6": ({f"{name}@6": shape for name, shape in _sdxl(6).items()}, torch.float16),
}


def layer(name: str, shape: tuple[int, int], rows: int, device: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    from pipelines import fp8_linear

    n, k = shape
    torch._dynamo.reset()  # each layer compiles the same lambdas afresh: past dynamo's recompile limit otherwise
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(rows, k, device=device, dtype=dtype, generator=g)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=g) / k**0.5
    b = torch.randn(n, device=device, dtype=dtype, generator=g) * 0.1
    wq, ws = fp8_linear.quantise(w)
    flop = 2 * rows * n * k
    # `bf16_*` figures are F.linear in the model's own dtype (fp16 for SDXL)
    row: dict = {"rows": rows, "out_features": n, "in_features": k, "dtype": str(dtype).removeprefix("torch."),
                 "gflop": round(flop / 1e9, 1)}
    reps = 1 if device != "cuda" else 10

    def timed(label, fn):
        try:
            sec = graph_time(fn, reps, device)
        except Exception as exc:  # noqa: BLE001  an op this build or card lacks: recorded, not fatal
            row[f"{label}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            return None
        row[f"{label}_ms"], row[f"{label}_tflop_s"] = round(sec * 1e3, 4), round(flop / sec / 1e12, 1)
        return sec

    base = timed("bf16", lambda: F.linear(x, w, b))
    if device == "cuda":
        from pipelines import fp8_rows

        xq, xs = fp8_linear.quantise_rows_reference(x)
        timed("quantise_rows", lambda: fp8_rows.quantise_rows(x))
        kq, ks = fp8_rows.quantise_rows(x)  # the kernel against torch's arithmetic, value for value
        row["quantise_rows_equal_fraction"] = round(float((kq.float() == xq.float()).float().mean()), 6)
        row["quantise_rows_scales_equal"] = bool(torch.equal(ks, xs))
        for fast in (False, True):
            timed(f"scaled_mm{'_fast' if fast else ''}", lambda fast=fast: torch._scaled_mm(
                xq, wq.t(), scale_a=xs, scale_b=ws[None, :], bias=b.to(torch.bfloat16), out_dtype=torch.bfloat16,
                use_fast_accum=fast))
    for fast in (False, True):
        path = torch.compile(lambda x, fast=fast: fp8_linear.scaled_mm(x, wq, ws, b, chunk=None, fast_accum=fast),
                             fullgraph=True) if device == "cuda" else (
            lambda x, fast=fast: fp8_linear.linear(x, wq, b, ws, chunk=None))
        label = f"path{'_fast' if fast else ''}"
        sec = timed(label, lambda path=path: path(x))
        if sec and base:
            row[f"{label}_speedup_vs_bf16"] = round(base / sec, 3)
            row[f"{label}_rel_l2_vs_bf16"] = compare(F.linear(x, w, b), path(x))["rel_l2"]
    if device == "cuda":  # the module as the blocks hold it: fullgraph fails on any graph break in its forward
        module = torch.compile(fp8_linear.Fp8Linear(wq, ws, b, chunk=None), fullgraph=True)
        timed("module", lambda: module(x))
    return row


def main():
    args = parse_args(__doc__, lambda ap: ap.add_argument("--shapes", default="wan"))
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    report = Report("fp8_gemm", args)
    sets = {"tiny": (_counted(TINY, TINY_ROWS), torch.bfloat16)} if args.tiny else {
        name: SETS[name] for name in args.shapes.split(",")}
    s = report.data["stages"]
    for set_name, (layers, dtype) in sets.items():
        for name, (n, k, rows, _) in layers.items():
            report.stage(name, lambda name=name, n=n, k=k, rows=rows, dtype=dtype: layer(name, (n, k), rows, device,
                                                                                          dtype))
        # every layer as often as a WAN block pass (or an SDXL guided step) runs it; "bf16" is the model's dtype
        for label in ("bf16", "path", "path_fast"):
            try:
                report[f"{set_name}_pass_{label}_ms"] = round(
                    sum(s[name][f"{label}_ms"] * count for name, (_, _, _, count) in layers.items()), 3)
            except (KeyError, TypeError):
                pass
    print("SUMMARY", report.data["env"].get("card"), {k: v for k, v in report.data.items() if "_pass_" in k},
          flush=True)


if __name__ == "__main__":
    main()
