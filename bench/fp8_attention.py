"""Self-attention at WAN's (and SDXL's) shapes: cuDNN's bf16 flash kernel against pipelines/fp8_attention.py.

    python -m bench.fp8_attention [--tiny] [--shapes wan,sdxl64,sdxl32] [--variants int8,fp8]
                                  [--configs 128x128x8x3,64x128x4x4] [--flash4-tiles] [--out DIR] [--budget-s S]

Per shape: SDPA in bf16 with the cuDNN and flash backends (what diffusers' `_native_cudnn` and `native`
run) and FlashAttention-4 where its package imports (pipelines/flash4.py, GENQ_WAN_ATTENTION=flash4; with
--flash4-tiles, every Hopper launch shape of FLASH4_TILES too, through the package's internal forward, its five
best recorded), then per variant (Q K^T in int8 or fp8) the kernel alone on quantised operands, the whole path (quantisation and kernel)
eager and compiled, and the difference from an fp32 reference on Gaussian inputs and on "peaked" ones
(queries x4: a sharper softmax, as trained models have). The first variant sweeps every Config (or, with
--configs, the production default and the listed ones: block_m x block_n x warps x stages); the others
try its five best. Times are CUDA-graph replays (bench.harness.graph_time), in TFLOP/s of the
exact product (4 S^2 H D per batch entry). Writes OUT/fp8_attention.json.
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
# FlashAttention-4's Hopper forward: query rows 128 (two consumer warpgroups) or 192 (three) a CTA,
# key columns as GMMA allows, P V from registers or shared memory
FLASH4_TILES = [(m, n, rs) for m, ns in ((128, range(96, 208, 16)), (192, range(64, 176, 16)))
                for n in ns for rs in (True, False)]


def configs(tiny: bool, listed: str = ""):
    from pipelines.fp8_attention import Config

    if tiny:
        yield Config(64, 64, 4, 1)
        return
    yield Config()  # the production default first, so a sweep cut short still times it
    if listed:
        for item in listed.split(","):
            cfg = Config(*(int(n) for n in item.split("x")))
            if cfg != Config():
                yield cfg
        return
    for bm, bn, warps, stages in itertools.product((64, 128), (64, 128, 256), (4, 8), (2, 3, 4)):
        cfg = Config(bm, bn, warps, stages)
        # a 64x256 or 128x256 score tile needs 8 warps' registers
        if (bm * bn <= 128 * 128 or warps == 8) and cfg != Config():
            yield cfg


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return run


def _flash4() -> str | None:
    """Why pipelines.flash4 cannot run here (its package is not on the GPU image unless carried), or None."""
    try:
        from pipelines import flash4

        flash4.check_device(torch.device("cuda"))
    except RuntimeError as exc:
        return str(exc)[:300]
    return None


def _flash4_tile(q, k, v, m: int, n: int, rs: bool):
    """FlashAttention-4 at one launch shape, through the forward its public function calls (not public
    itself: flash-attn-4 4.0.0b36's signature)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    return _flash_attn_fwd(q, k, v, tile_mn=(m, n), mma_pv_is_rs=rs, intra_wg_overlap=True)[0]


def _reference(q, k, v):
    """fp32 attention, query chunks so no score matrix beyond 2 GB is held."""
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))
    step = max(1, int(5e8 // (kf.shape[1] * kf.shape[2])))
    outs = [(qf[:, :, i:i + step] @ kf.transpose(-1, -2) / qf.shape[-1] ** 0.5).softmax(-1) @ vf
            for i in range(0, qf.shape[2], step)]
    return torch.cat(outs, dim=2).transpose(1, 2)


class _Shape:
    def __init__(self, shape, args, report: Report, device: str):
        b, s, h, d = shape
        self.args, self.report, self.device, self.tokens = args, report, device, s
        self.flop = 4 * b * s * s * h * d
        g = torch.Generator(device).manual_seed(0)
        self.qkv = [torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3)]
        self.reps = 1 if args.tiny else 5
        self.row = {"batch": b, "tokens": s, "heads": h, "head_dim": d, "tflop": round(self.flop / 1e12, 2)}

    def tflops(self, sec: float) -> float:
        return round(self.flop / sec / 1e12, 1)

    def timed(self, label: str, fn, into: dict) -> float | None:
        try:
            sec = graph_time(fn, self.reps, self.device)
        except Exception as exc:  # noqa: BLE001  a backend this build or card lacks: recorded, not fatal
            into[f"{label}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            return None
        into[f"{label}_ms"], into[f"{label}_tflop_s"] = round(sec * 1e3, 3), self.tflops(sec)
        return sec

    def sweep(self, x, cfgs, into: dict) -> list:
        from pipelines import fp8_attention as fa

        results = []
        for cfg in cfgs:
            if self.report.elapsed() > self.args.budget_s:
                into["sweep_cut_by_budget"] = True
                break
            try:
                sec = graph_time(lambda: fa.product(x, self.tokens, torch.bfloat16, cfg),
                                 self.reps, self.device)
            except Exception as exc:  # noqa: BLE001  registers or shared memory out of reach: skip the config
                into.setdefault("failed_configs", []).append([*cfg, f"{type(exc).__name__}"])
                continue
            results.append((sec, cfg))
        results.sort(key=lambda item: item[0])
        into["kernel_top"] = [{**c._asdict(), "ms": round(t * 1e3, 3), "tflop_s": self.tflops(t)} for t, c in results[:5]]
        return results

    def variant(self, qk: str, cfgs, base: float | None) -> tuple[dict, list]:
        from pipelines import fp8_attention as fa

        q, k, v = self.qkv
        row: dict = {}
        results = self.sweep(fa.quantise(q, k, v, qk=qk), cfgs, row)
        best = results[0][1] if results else fa.Config()
        row["best_config"] = best._asdict()
        run = lambda q, k, v: fa.attention(q, k, v, cfg=best, qk=qk)  # noqa: E731
        eager = self.timed("path_eager", lambda: run(q, k, v), row)
        compiled = torch.compile(run) if self.device == "cuda" else None
        path = self.timed("path_compiled", lambda: compiled(q, k, v), row) if compiled else eager
        if base and results:
            row["kernel_speedup_vs_cudnn"] = round(base / results[0][0], 3)
            row["path_speedup_vs_cudnn"] = round(base / min(t for t in (eager, path) if t), 3)
        for label, qq in (("gaussian", q), ("peaked_x4", q * 4)):
            row[f"diff_{label}"] = compare(_reference(qq, k, v), run(qq, k, v))
        return row, results

    def flash4(self, base: float | None, row: dict) -> None:
        """FlashAttention-4 in bf16: its time, against cuDNN's, and its difference from the fp32 reference."""
        row["flash4_error"] = _flash4()
        if row["flash4_error"] is not None:
            return
        from pipelines import flash4

        q, k, v = self.qkv
        sec = self.timed("flash4_bf16", lambda: flash4.attention(q, k, v), row)
        if base and sec:
            row["flash4_speedup_vs_cudnn"] = round(base / sec, 3)
        for label, qq in (("gaussian", q), ("peaked_x4", q * 4)):
            row[f"diff_{label}_flash4"] = compare(_reference(qq, k, v), flash4.attention(qq, k, v))
        if self.args.flash4_tiles:
            self.flash4_tiles(row)

    def flash4_tiles(self, row: dict) -> None:
        q, k, v = self.qkv
        timed = []
        for m, n, rs in FLASH4_TILES:
            if self.report.elapsed() > self.args.budget_s:
                row["flash4_tiles_cut_by_budget"] = True
                break
            tile = f"{m}x{n}x{int(rs)}"  # query rows x key columns x P V from registers
            try:
                sec = graph_time(lambda: _flash4_tile(q, k, v, m, n, rs), self.reps, self.device)
            except Exception as exc:  # noqa: BLE001  registers or shared memory out of reach: skip the tile
                row.setdefault("flash4_failed_tiles", []).append([tile, type(exc).__name__])
                continue
            timed.append((sec, tile, (m, n, rs)))
        timed.sort()
        row["flash4_tiles_top"] = [{"tile": t, "ms": round(s * 1e3, 3), "tflop_s": self.tflops(s)}
                                   for s, t, _ in timed[:5]]
        if timed:
            row["flash4_best_tile_diff_gaussian"] = compare(_reference(q, k, v), _flash4_tile(q, k, v, *timed[0][2]))

    def run(self, variants: list[str]) -> dict:
        q, k, v = self.qkv
        row = self.row
        if self.device == "cuda":
            base = self.timed("cudnn_bf16", lambda: _sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v), row)
            self.timed("flash_bf16", lambda: _sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v), row)
            base_fn = _sdpa(SDPBackend.CUDNN_ATTENTION)
            self.flash4(base, row)
        else:
            base = self.timed("math_bf16", lambda: _sdpa(SDPBackend.MATH)(q, k, v), row)
            base_fn = _sdpa(SDPBackend.MATH)
        for label, qq in (("gaussian", q), ("peaked_x4", q * 4)):
            row[f"diff_{label}_bf16"] = compare(_reference(qq, k, v), base_fn(qq, k, v))
        top = None
        for qk in filter(None, variants):
            cfgs = list(configs(self.args.tiny, self.args.configs)) if top is None else [c for _, c in top[:5]]
            row[qk], results = self.variant(qk, cfgs, base)
            top = top or results
            self.report.save()
        return row


def main():
    args = parse_args(__doc__, lambda ap: (ap.add_argument("--shapes", default="wan,sdxl64,sdxl32"),
                                           ap.add_argument("--variants", default="int8,fp8"),
                                           ap.add_argument("--configs", default=""),
                                           ap.add_argument("--flash4-tiles", action="store_true")))
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    report = Report("fp8_attention", args)
    shapes = TINY if args.tiny else {n: SHAPES[n] for n in args.shapes.split(",")}
    for name, shape in shapes.items():
        report.stage(name, lambda: _Shape(shape, args, report, device).run(args.variants.split(",")))


if __name__ == "__main__":
    main()
