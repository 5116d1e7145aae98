"""Kernel-level profiles for the bench/*_profile.py scripts: CUDA kernel time by kind under torch.profiler."""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

# Inductor's kernels first: their names list the ops fused in ("..._convolution_native_group_norm_silu")
_KINDS = [("triton_reduction", re.compile(r"^triton_(red|per)_", re.I)),
          ("triton_pointwise", re.compile(r"^triton_poi_", re.I)),
          ("triton_template", re.compile(r"^triton_tem_", re.I)),  # max-autotune's matrix-product templates
          ("fp8_rows", re.compile(r"^_rows_kernel")),  # pipelines/fp8_rows.py: activations to e4m3
          ("attention", re.compile(r"flash|fmha|attention|sdpa|efficient", re.I)),  # before gemm: cuDNN's say sm90
          ("conv", re.compile(r"conv|implicit_gemm|winograd|fprop", re.I)),  # cuDNN convolutions, before gemm too
          ("gemm", re.compile(r"gemv|gemm|sm90|cutlass|xmma|ampere_|nvjet|splitk|_partials_kernel|_skinny_kernel|_vector_kernel|_sum_slices_kernel", re.I)),
          ("copy_or_fill", re.compile(r"copy|memcpy|memset|fill|index|scatter|gather", re.I))]


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in _KINDS if pattern.search(name)), "other")


def kernel_times(prof, table: Path) -> tuple[dict[str, float], int, list[tuple[float, int, str]]]:
    """CUDA kernel time (us) by kind, the kernel count, and (us, calls, name) rows, longest first, of a
    finished torch.profiler run; the top 60 rows also go to `table`."""
    by_kind: dict[str, float] = defaultdict(float)
    count = 0
    rows = []
    for ev in prof.key_averages():
        cuda_us = getattr(ev, "device_time_total", None)
        if cuda_us is None:
            cuda_us = getattr(ev, "cuda_time_total", 0)
        if not cuda_us or getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        by_kind[kernel_kind(ev.key)] += cuda_us
        count += ev.count
        rows.append((cuda_us, ev.count, ev.key[:140]))
    rows.sort(reverse=True)
    table.write_text("\n".join(f"{us / 1000:9.3f} ms {n:7d}x  {name}" for us, n, name in rows[:60]))
    return by_kind, count, rows


def profile_call(fn: Callable[[], object], table: Path, runs: int = 3) -> dict:
    """One warm-up call of fn, `runs` synchronised timings (min), then one call under torch.profiler:
    seconds per call by kernel kind, kernel count and the top kernels (all of them in `table`)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()  # compilation, autotuning, allocator growth
        torch.cuda.synchronize()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    by_kind, count, rows = kernel_times(prof, table)
    return {"wall_s_min": round(min(times), 4), "kernels_s": round(sum(by_kind.values()) / 1e6, 4), "kernels": count,
            "by_kind_s": {k: round(v / 1e6, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"ms_total": round(us / 1000, 2), "calls": n, "name": name} for us, n, name in rows[:10]]}


def parse_args(doc: str, name: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """(args, out folder, created) of a profile script: --tiny, --out (default $OUT or /tmp/<name>), extras;
    args is None where there is no CUDA (the profiles are of CUDA kernels)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT") or f"/tmp/{name}")
    if extra:
        extra(ap)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print(f"{name} needs CUDA (the profile is of CUDA kernels)")
        return None, out
    return args, out


def header() -> dict:
    return {"card": torch.cuda.get_device_name(), "torch": torch.__version__}


def print_report(report: dict) -> None:
    print(json.dumps({k: v for k, v in report.items() if k != "modes"}), flush=True)
    for mode, rec in report["modes"].items():
        print(mode, json.dumps({k: v for k, v in rec.items() if k != "top_kernels"})[:1200], flush=True)
